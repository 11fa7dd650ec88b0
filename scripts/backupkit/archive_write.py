"""Writing the files backup's archive: S3 objects as members of one ZIP, encrypted with the files
format's encryption (AES Crypt v2).

`archive_objects` writes the source bucket's objects, fetched in order, into an `ArchiveWriter`,
which streams them into a ZIP on a non-seekable sink (stored, data descriptors, ZIP64 where
needed); `EncryptingSink` is that sink: it encrypts in a thread and hands the ciphertext on (to a
StreamingUpload). Reading it back: archive_read.py.

Not stream-zip: it writes a stored member's size and CRC before its bytes, so it buffers every
uncompressed member whole in memory (its documented limit, uktrade/stream-zip#17); zipfile streams
stored members with data descriptors, chunk by chunk as they arrive, and our extra field carries
the exact size.
"""

from __future__ import annotations

import os
import threading
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from . import formats, signals
from .attributes import NotArchivable, encode_attributes
from .crypto import AESCRYPT_BUFFER, FullReader
from .errors import BackupError
from .objects import SourceObject, fetch_in_order
from .output import log, shown
from .s3 import explain
from .streams import Tally, enlarge_pipe
from .zipcheck import size_extra

# Members this large are written with ZIP64 headers from the start: zipfile decides at 2 GiB
# from the size we declare, this leaves room should the bytes we receive ever differ.
ZIP64_FROM = 1024 * 1024 * 1024
EARLIEST = datetime(1980, 1, 1, tzinfo=UTC)  # ZIP's DOS dates cannot say anything earlier
LATEST = datetime(2107, 12, 31, 23, 59, 58, tzinfo=UTC)


def zip_date(moment: datetime) -> tuple[int, int, int, int, int, int]:
    """A LastModified as a ZIP date (UTC, clamped to what a ZIP can hold)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    moment = min(max(moment.astimezone(UTC), EARLIEST), LATEST)
    return moment.timetuple()[:6]


def unzippable(key: str) -> str | None:
    """Why an object key cannot be a ZIP member name as it is (None: it can). zipfile cuts a name
    at its first NUL, which S3-compatible stores accept in keys: `report.pdf\\0.exe` would come back
    as `report.pdf`."""
    if "\0" in key:
        return "its key holds a NUL byte, which a ZIP member name cannot carry (it would be cut there)"
    try:
        encoded = key.encode("utf-8")
    except UnicodeEncodeError:
        return "its key is not valid Unicode"
    if len(encoded) > 0xFFFF:
        return "its key is longer than a ZIP member name can be (65,535 bytes)"
    if zipfile.ZipInfo(key).filename != key:  # by construction: whatever else zipfile would change
        return "zipfile would change its key"
    return None


class _Gate:
    """The ZIP writer's sink until the archive is abandoned; then writes go nowhere, so zipfile
    finishing the archive when it is garbage-collected cannot reach a sink already closed."""

    def __init__(self, sink: Any):
        self.sink: Any = sink

    def write(self, data: bytes) -> int:
        if self.sink is not None:
            self.sink.write(data)
        return len(data)

    def flush(self) -> None:
        if self.sink is not None:
            self.sink.flush()


class ArchiveWriter:
    """A ZIP written front to back on a sink that cannot seek (stored members, data descriptors);
    ZIP64 where a member, the archive or the member count needs it. Use as a context manager:
    leaving the block with an error abandons the archive (nothing more reaches the sink)."""

    def __init__(self, sink: Any, observer: Any = None):
        """`observer.member(name, size, crc32)` is told each member written (profile.ArchiveEntries)."""
        self._gate = _Gate(sink)
        self.observer = observer
        # No tell() on the sink: zipfile then streams, counting the offsets itself.
        self._zip = zipfile.ZipFile(self._gate, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self.members = 0
        self.bytes = 0

    def add(self, name: str, size: int, last_modified: datetime, attributes: bytes,
            chunks: Iterable[bytes], progress: Callable[[int], None] | None = None) -> int:
        """Write one member from `chunks` (which must yield exactly `size` bytes); NotArchivable
        for a name the member could not carry as it is."""
        why = unzippable(name)
        if why is not None:
            raise NotArchivable(why)
        info = zipfile.ZipInfo(name, zip_date(last_modified))
        info.compress_type = zipfile.ZIP_STORED
        info.file_size = size
        info.comment = attributes
        info.extra = size_extra(size)  # the checker reads exactly this many bytes: no content can end it early
        info.external_attr = 0o644 << 16
        written = 0
        with self._zip.open(info, "w", force_zip64=size >= ZIP64_FROM) as member:
            for chunk in chunks:
                member.write(chunk)
                written += len(chunk)
                if progress is not None:
                    progress(len(chunk))
        if written != size:
            raise BackupError(f"s3 object {name!r} was {written} bytes, its listing said {size}")
        if self.observer is not None:
            self.observer.member(name, written, info.CRC)
        self.members += 1
        self.bytes += written
        return written

    def close(self) -> None:
        """Write the central directory (with every member's comment)."""
        self._zip.close()

    def abandon(self) -> None:
        """Stop writing: what was written is an incomplete archive its caller throws away."""
        self._gate.sink = None
        try:
            self._zip.close()
        except Exception:  # noqa: BLE001,S110 - a member left open mid-write: nothing more to write anyway
            pass

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abandon()


@dataclass
class ArchiveResult:
    object_count: int
    total_bytes: int
    skipped: list[tuple[str, str]]  # (key, why)


def archive_objects(client: Any, bucket: str, objects: Iterable[SourceObject], writer: ArchiveWriter,
                    progress: Callable[..., None] | None = None, **fetch_options: int) -> ArchiveResult:
    """Write every object into `writer`, in order. An object is skipped and named, never cut or
    renamed, when it vanished, is archived, GetObject refuses it, its key cannot be a member name
    or S3 would not store its attributes. But when GetObject refused objects and none could be
    archived, the problem is the job's access, not one object's: that raises BackupError. On any
    error the writer is abandoned. `progress(nbytes=…, objects=…)` is called as bytes and objects
    are done."""
    skipped: list[tuple[str, str]] = []
    refused: list[tuple[str, str]] = []

    def advance(nbytes: int) -> None:
        if progress is not None:
            progress(nbytes=nbytes)

    try:
        for fetched in fetch_in_order(client, bucket, objects, skip=lambda obj: unzippable(obj.key), **fetch_options):
            key = fetched.source.key
            comment = b""
            if not fetched.skipped:
                try:
                    comment = encode_attributes(fetched.head)
                except NotArchivable as exc:
                    fetched.discard()
                    fetched.skipped = str(exc)
            if fetched.skipped:
                skipped.append((key, fetched.skipped))
                if fetched.refused:
                    refused.append((key, fetched.skipped))
                if progress is not None:
                    progress(objects=1)
                continue
            if fetched.head.get("MissingMeta"):  # S3 leaves out metadata with unprintable characters
                log(f"warning: s3://{bucket}/{shown(key)}: S3 did not return {shown(fetched.head['MissingMeta'])} of its "
                    "metadata entries (unprintable characters), so the backup and a restore lack them")
            try:
                writer.add(key, fetched.size, fetched.head.get("LastModified") or fetched.source.last_modified,
                           comment, fetched.chunks(), advance)
            except BackupError:
                raise
            except Exception as exc:
                raise explain(exc, f"download s3://{bucket}/{shown(key)}") from exc
            if progress is not None:
                progress(objects=1)
        if refused and not writer.members:
            first, why = refused[0]
            raise BackupError(
                f"GetObject refused {len(refused)} objects of s3://{bucket} and no object could be archived "
                f"(the first, {shown(first)}: {why}): that is this job's access to the source bucket, not one object's. "
                "Check the source credentials, the bucket's policy and its KMS key")
    except BaseException:
        writer.abandon()  # or zipfile, collected later, writes its directory into a sink already closed
        raise
    return ArchiveResult(writer.members, writer.bytes, skipped)


class EncryptingSink:
    """A file-like sink: bytes written to it are encrypted with pyAesCrypt.encryptStream in a
    thread and the ciphertext is passed to `out` (e.g. StreamingUpload.write).

    The thread reads from a pipe through FullReader: encryptStream takes any short read for the
    end of input and would silently truncate the archive. Use as a context manager: leaving the
    block with an error stops the thread before the caller aborts its upload.
    """

    def __init__(self, passphrase: str, out: Callable[[bytes], Any], buffer_size: int = AESCRYPT_BUFFER,
                 fmt: formats.Format | None = None):
        self._encrypt_stream = (fmt or formats.default("files")).encryption.encrypt
        self.plaintext = Tally()
        self._out = out
        self._error: BaseException | None = None
        self._cancelled = False
        read_end, write_end = os.pipe()
        enlarge_pipe(write_end)  # fewer wake-ups between the ZIP writer and the encryption thread
        self._reader = open(read_end, "rb", buffering=0)  # closed by the thread
        self._writer = open(write_end, "wb")  # closed by close()/cancel()
        self._thread = threading.Thread(target=self._encrypt, args=(passphrase, buffer_size),
                                        name="encrypt", daemon=True)
        self._thread.start()

    def _encrypt(self, passphrase: str, buffer_size: int) -> None:
        try:
            self._encrypt_stream(FullReader(self._reader), _Forward(self._out, lambda: self._cancelled), passphrase, buffer_size)
        except BaseException as exc:  # noqa: BLE001 - raised in the writer's thread by close()
            self._error = exc
        finally:
            self._reader.close()  # a writer still writing gets EPIPE instead of blocking forever

    def write(self, data: bytes) -> int:
        self.plaintext.update(data)
        try:
            self._writer.write(data)
        except (BrokenPipeError, ValueError):
            self._thread.join()
            raise self._failure() from None
        return len(data)

    def flush(self) -> None:
        pass  # the pipe is flushed by close(); zipfile calls this after its end record

    def _failure(self) -> BaseException:
        if isinstance(self._error, BackupError):
            return self._error
        return BackupError(f"encryption failed: {type(self._error).__name__}: {self._error}")

    def close(self) -> None:
        """End of plaintext: wait for the encryption to finish, raise if it failed."""
        try:
            self._writer.close()
        except BrokenPipeError:
            pass
        self._thread.join()
        if self._error is not None:
            raise self._failure()

    def cancel(self) -> None:
        self._cancelled = True
        try:
            self._writer.close()
        except OSError:
            pass
        # After a signal, no longer than the run may still take: the thread is a daemon, and an
        # upload stuck in it must not hold up the end of the run.
        self._thread.join(signals.time_left())

    def __enter__(self) -> EncryptingSink:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.cancel()


class _Forward:
    """encryptStream's output: forwards ciphertext to `out` unless the writer gave up (`cancelled()`)."""

    def __init__(self, out: Callable[[bytes], Any], cancelled: Callable[[], bool]):
        self._out = out
        self._cancelled = cancelled

    def write(self, data: bytes) -> int:
        if self._cancelled():
            raise BackupError("cancelled")
        self._out(data)
        return len(data)
