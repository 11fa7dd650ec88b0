"""Reading the files backup's archive back: `read_archive`, the one check shared by
verify_backup.py and restore_files.py (decryption, then the ZIP checker on the stream), the
unnamed file a restore keeps the plaintext in, `unsafe_name`, and `FileSection`, a member's bytes
as an upload body.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

from .attributes import decode_attributes
from .errors import Problem, VerificationError
from .manifest import check_plaintext
from .output import has_unsafe_characters, shown
from .retrieve import CheckedBody, Fetched
from .streams import Tally
from .zipcheck import ZipStreamChecker


@dataclass
class ArchiveMember:
    """One member of a checked archive: a stored object, a plain byte range of the ZIP."""

    name: str
    offset: int  # where its bytes start in the ZIP
    size: int
    attributes: dict[str, Any]
    name_valid: bool = True


@dataclass
class ArchiveContents:
    members: list[ArchiveMember]
    plaintext_size: int

    @property
    def total_bytes(self) -> int:
        return sum(m.size for m in self.members)


class _ArchiveSink:
    """pyAesCrypt's output (or a plain ZIP's bytes): hashed, walked by the ZIP checker, and kept in
    the restore's unnamed file."""

    def __init__(self, keep: IO[bytes] | None, progress: Callable[[int], None] | None):
        self.tally = Tally()
        self.checker = ZipStreamChecker()
        self._keep = keep
        self._progress = progress

    def write(self, data: bytes) -> int:
        self.tally.update(data)
        self.checker.write(data)
        if self._keep is not None:
            self._keep.write(data)
        if self._progress is not None:
            self._progress(len(data))
        return len(data)


def unnamed_file(directory: str) -> int:
    """A new, empty 0600 file in `directory` that has no name, open for reading and writing: the
    plaintext it receives goes with the descriptor, so even SIGKILL leaves nothing on disk.
    O_TMPFILE where the filesystem has it, otherwise a file created and unlinked at once."""
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
    except AttributeError:  # not Linux
        pass
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    descriptor, path = tempfile.mkstemp(dir=directory)
    os.unlink(path)
    return descriptor


@contextmanager
def plaintext_file(fetched: Fetched, directory: str) -> Iterator[int]:
    """A descriptor for the ZIP a restore reads its members from: the plain ZIP it was given, or
    an `unnamed_file` in `directory` for the archive it decrypts (closed, and so gone, on exit)."""
    descriptor = unnamed_file(directory) if fetched.encryption.encrypts else os.open(fetched.path, os.O_RDONLY)
    try:
        yield descriptor
    finally:
        os.close(descriptor)


def read_archive(fetched: Fetched, keep: int | None = None,
                 progress: Callable[[int], None] | None = None) -> ArchiveContents:
    """Decrypt a files backup (AES Crypt: its HMAC is checked at the very end) or read a plain ZIP
    through the ZIP checker, then check everything a restore relies on: the plaintext against the
    manifest, the central directory against the local headers (so no entry can alias another's
    bytes), every CRC, unique names, each member's attributes, the member count. With `keep` (a
    descriptor open for writing, e.g. an `unnamed_file`), the plaintext is also written there from
    its start, and means nothing unless this returns."""
    handle = open(keep, "wb", closefd=False) if keep is not None else None
    sink = _ArchiveSink(handle, progress)
    try:
        decrypt = fetched.encryption.decrypt
        assert decrypt is not None, f"{fetched.encryption.name} does not decrypt in process"
        if fetched.body is not None:
            _decrypt_download(decrypt, fetched.body, fetched.secret, sink)
        else:
            with open(fetched.path, "rb") as source:
                decrypt(source, sink, fetched.secret)
    finally:
        if handle is not None:
            handle.close()
    check_plaintext(sink.tally, fetched.manifest, "archive")
    summary = sink.checker.finish()
    members: list[ArchiveMember] = []
    seen: set[str] = set()
    for member in summary.members:
        if member.name in seen:
            raise VerificationError(f"the ZIP holds '{shown(member.name)}' twice: not an archive this tool wrote",
                                    Problem.BAD_CONTENT)
        seen.add(member.name)
        members.append(ArchiveMember(member.name, member.data_offset, member.size,
                                     decode_attributes(member.comment, member.name), member.name_valid))
    expected = (fetched.manifest or {}).get("source", {}).get("object_count")
    if expected is not None and len(members) != expected:
        raise VerificationError(f"the ZIP holds {len(members)} members, the manifest says {expected} objects: "
                                "incomplete archive", Problem.BAD_CONTENT)
    return ArchiveContents(members, sink.tally.size)


def _decrypt_download(decrypt: Callable[..., None], body: CheckedBody, secret: str, sink: _ArchiveSink) -> None:
    """Decrypt a backup as it downloads, then check the download against the manifest (size,
    SHA-256). When the decryption or the ZIP checks fail, the download is read to its end and
    checked first: a corrupted download is named as such, as when it was downloaded whole before
    decrypting."""
    try:
        decrypt(body, sink, secret)
    except VerificationError:
        body.finish()
        raise
    body.finish()


def unsafe_name(member: ArchiveMember) -> str | None:
    """Why a member's name must not become an object key as it is (None: it may). S3 would store
    any of these, but tools that copy a bucket to disk follow '..' and '/', and control
    characters hide what a name really is."""
    name = member.name
    if not member.name_valid:
        return "its name is not valid UTF-8"
    if not name:
        return "its name is empty"
    if len(name.encode()) > 1024:
        return "its name is longer than S3's 1024-byte limit"
    if has_unsafe_characters(name):
        return "its name holds control or line-breaking characters"
    if name.startswith("/"):
        return "its name starts with '/'"
    if ".." in re.split(r"[/\\]", name):
        return "its name has a '..' segment"
    return None


class FileSection:
    """A read-only, seekable window on part of an open file (a member's bytes), for boto3 bodies.
    Reads with pread: any number of sections share one descriptor, each with its own position."""

    def __init__(self, descriptor: int, offset: int, length: int):
        self._descriptor = descriptor
        self._offset = offset
        self._length = length
        self._position = 0

    def __len__(self) -> int:
        return self._length

    def read(self, size: int = -1) -> bytes:
        left = self._length - self._position
        if size is None or size < 0 or size > left:
            size = left
        data = os.pread(self._descriptor, size, self._offset + self._position) if size else b""
        self._position += len(data)
        return data

    def seek(self, position: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._length}[whence]
        self._position = min(max(base + position, 0), self._length)
        return self._position

    def tell(self) -> int:
        return self._position

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        pass  # the descriptor is its owner's

    def __enter__(self) -> FileSection:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close()
