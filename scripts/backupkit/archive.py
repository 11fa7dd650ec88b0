"""The files backup's archive: S3 objects as members of one ZIP, encrypted with AES Crypt v2.

Writing: `ArchiveWriter` streams members into a ZIP on a non-seekable sink (stored, data
descriptors, ZIP64 where needed); `EncryptingSink` is that sink: it encrypts in a thread and hands
the ciphertext on (to a StreamingUpload). Reading: `decrypt_file`, `member_attributes`,
`check_archive` and `member_range`, shared by restore_files.py and verify_backup.py.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any

import pyAesCrypt

from .crypto import AESCRYPT_BUFFER, FullReader
from .errors import BackupError, VerificationError
from .pipeline import CHUNK, Tally

ZIP_MAGIC = b"PK"
# Headers kept with each object besides its bytes. ContentType and Metadata are what the SPEC
# asks for; the other standard headers change how browsers serve a file, so they come along.
ATTRIBUTES = ("ContentType", "Metadata", "CacheControl", "ContentDisposition", "ContentEncoding", "ContentLanguage")
# Members this large are written with ZIP64 headers from the start: zipfile decides at 2 GiB
# from the size we declare, this leaves room should the bytes we receive ever differ.
ZIP64_FROM = 1024 * 1024 * 1024
EARLIEST = datetime(1980, 1, 1, tzinfo=UTC)  # ZIP's DOS dates cannot say anything earlier
LATEST = datetime(2107, 12, 31, 23, 59, 58, tzinfo=UTC)
LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # ZIP local file header (30 bytes)
# A bigger pipe means fewer wake-ups between the ZIP writer and the encryption thread.
PIPE_SIZE = 1024 * 1024


# -- member comments ----------------------------------------------------------------------------
def encode_attributes(head: dict[str, Any]) -> bytes:
    """The member comment: JSON of an object's ContentType, user Metadata and serving headers
    (`head` is a GetObject/HeadObject response or a dict with those keys)."""
    attributes: dict[str, Any] = {"ContentType": head.get("ContentType") or "binary/octet-stream",
                                  "Metadata": dict(head.get("Metadata") or {})}
    for name in ATTRIBUTES[2:]:
        if head.get(name):
            attributes[name] = head[name]
    return json.dumps(attributes, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()


def decode_attributes(comment: bytes, name: str = "member") -> dict[str, Any]:
    """The attributes from a member comment; an empty comment (a ZIP made by another tool)
    gives none. Raises VerificationError for a comment that is not ours."""
    if not comment:
        return {"Metadata": {}}
    try:
        attributes = json.loads(comment.decode())
    except (UnicodeDecodeError, ValueError):
        raise VerificationError(f"the ZIP comment of {name!r} is not the JSON this tool writes") from None
    if not isinstance(attributes, dict) or not isinstance(attributes.get("Metadata", {}), dict):
        raise VerificationError(f"the ZIP comment of {name!r} is not the JSON this tool writes")
    result = {k: v for k, v in attributes.items() if k in ATTRIBUTES and isinstance(v, (str, dict))}
    result["Metadata"] = {str(k): str(v) for k, v in (attributes.get("Metadata") or {}).items()}
    return result


def member_attributes(info: zipfile.ZipInfo) -> dict[str, Any]:
    return decode_attributes(info.comment, info.filename)


def zip_date(moment: datetime) -> tuple[int, int, int, int, int, int]:
    """A LastModified as a ZIP date (UTC, clamped to what a ZIP can hold)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    moment = min(max(moment.astimezone(UTC), EARLIEST), LATEST)
    return moment.timetuple()[:6]


# -- writing ------------------------------------------------------------------------------------
class ArchiveWriter:
    """A ZIP written front to back on a sink that cannot seek (stored members, data descriptors);
    ZIP64 where a member, the archive or the member count needs it."""

    def __init__(self, sink: Any):
        # No tell() on the sink: zipfile then streams, counting the offsets itself.
        self._zip = zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self.members = 0
        self.bytes = 0

    def add(self, name: str, size: int, last_modified: datetime, attributes: bytes,
            chunks: Iterable[bytes], progress: Callable[[int], None] | None = None) -> int:
        """Write one member from `chunks` (which must yield exactly `size` bytes)."""
        info = zipfile.ZipInfo(name, zip_date(last_modified))
        info.compress_type = zipfile.ZIP_STORED
        info.file_size = size
        info.comment = attributes
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
        self.members += 1
        self.bytes += written
        return written

    def close(self) -> None:
        """Write the central directory (with every member's comment)."""
        self._zip.close()


class EncryptingSink:
    """A file-like sink: bytes written to it are encrypted with pyAesCrypt.encryptStream in a
    thread and the ciphertext is passed to `out` (e.g. StreamingUpload.write).

    The thread reads from a pipe through FullReader: encryptStream takes any short read for the
    end of input and would silently truncate the archive. Use as a context manager: leaving the
    block with an error stops the thread before the caller aborts its upload.
    """

    def __init__(self, passphrase: str, out: Callable[[bytes], Any], buffer_size: int = AESCRYPT_BUFFER):
        self.plaintext = Tally()
        self._out = out
        self._error: BaseException | None = None
        self._cancelled = False
        read_end, write_end = os.pipe()
        try:
            import fcntl

            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except (ImportError, AttributeError, OSError):
            pass  # not Linux, or over the user's pipe limit: the default size only costs speed
        self._reader = open(read_end, "rb", buffering=0)  # noqa: SIM115 - closed by the thread
        self._writer = open(write_end, "wb")  # noqa: SIM115 - closed by close()/cancel()
        self._thread = threading.Thread(target=self._encrypt, args=(passphrase, buffer_size),
                                        name="encrypt", daemon=True)
        self._thread.start()

    def _encrypt(self, passphrase: str, buffer_size: int) -> None:
        try:
            pyAesCrypt.encryptStream(FullReader(self._reader), _Forward(self), passphrase, buffer_size)
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
        self._thread.join()

    def __enter__(self) -> EncryptingSink:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.cancel()


class _Forward:
    """encryptStream's output: forwards ciphertext unless the writer gave up."""

    def __init__(self, sink: EncryptingSink):
        self._sink = sink

    def write(self, data: bytes) -> int:
        if self._sink._cancelled:
            raise BackupError("cancelled")
        self._sink._out(data)
        return len(data)


# -- reading ------------------------------------------------------------------------------------
class _HashingFile:
    def __init__(self, handle: IO[bytes], tally: Tally, progress: Callable[[int], None] | None):
        self._handle = handle
        self._tally = tally
        self._progress = progress

    def write(self, data: bytes) -> int:
        self._tally.update(data)
        self._handle.write(data)
        if self._progress is not None:
            self._progress(len(data))
        return len(data)


def decrypt_file(src: str, dst: str, passphrase: str, progress: Callable[[int], None] | None = None) -> Tally:
    """Decrypt AES Crypt `src` into a new 0600 file `dst`; returns the plaintext's size and
    SHA-256. The HMAC is only checked at the very end: `dst` means nothing unless this returns."""
    tally = Tally()
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
        try:
            pyAesCrypt.decryptStream(fin, _HashingFile(fout, tally, progress), passphrase, AESCRYPT_BUFFER)
        except (ValueError, IndexError) as exc:
            raise VerificationError(f"decryption failed, wrong passphrase or corrupted backup ({exc})") from None
    return tally


@dataclass
class ArchiveSummary:
    members: int
    bytes: int


def members(archive: zipfile.ZipFile) -> Iterator[zipfile.ZipInfo]:
    """Every member, in archive order (one per backed-up object)."""
    yield from archive.infolist()


def check_archive(path: str, progress: Callable[[int], None] | None = None) -> ArchiveSummary:
    """Read every member of the ZIP at `path`, checking its CRC and its comment; raise
    VerificationError on the first problem."""
    count = total = 0
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                member_attributes(info)
                with archive.open(info) as member:
                    while chunk := member.read(CHUNK):
                        total += len(chunk)
                        if progress is not None:
                            progress(len(chunk))
                count += 1
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, NotImplementedError) as exc:
        raise VerificationError(f"the archive is not a valid ZIP: {exc}") from None
    return ArchiveSummary(count, total)


def member_range(handle: IO[bytes], info: zipfile.ZipInfo) -> tuple[int, int]:
    """(offset, length) of a stored member's bytes in the archive file: a stored member is a
    plain byte range, so it can be uploaded straight from the file."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise VerificationError(f"member {info.filename!r} is compressed; this tool writes stored members only")
    handle.seek(info.header_offset)
    header = handle.read(LOCAL_HEADER.size)
    if len(header) != LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise VerificationError(f"the ZIP header of member {info.filename!r} is damaged")
    name_length, extra_length = LOCAL_HEADER.unpack(header)[-2:]
    return info.header_offset + LOCAL_HEADER.size + name_length + extra_length, info.file_size


class FileSection:
    """A read-only, seekable window on part of a file (a member's bytes), for boto3 bodies."""

    def __init__(self, path: str, offset: int, length: int):
        self._handle = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._offset = offset
        self._length = length
        self._position = 0
        self._handle.seek(offset)

    def __len__(self) -> int:
        return self._length

    def read(self, size: int = -1) -> bytes:
        left = self._length - self._position
        if size is None or size < 0 or size > left:
            size = left
        data = self._handle.read(size)
        self._position += len(data)
        return data

    def seek(self, position: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._length}[whence]
        self._position = min(max(base + position, 0), self._length)
        self._handle.seek(self._offset + self._position)
        return self._position

    def tell(self) -> int:
        return self._position

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> FileSection:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close()
