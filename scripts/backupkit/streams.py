"""Bytes on the move: the chunk size every copy uses, a running size and SHA-256 (`Tally`),
`copy()`, `tee_pipes()`, and enlarging a pipe. Shared by the pipelines, the uploader and the
readers."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import stat
from collections.abc import Callable
from typing import IO, Any

CHUNK = 256 * 1024  # bytes per read between stages: Python's per-call cost is negligible at this size
# Pipes between stages: Linux's default 64 KiB makes every stage wake up and every Python read
# return at most 64 KiB; 1 MiB (the default pipe-max-size) cuts the switches and reads 16-fold.
PIPE_SIZE = 1024 * 1024


class Tally:
    """Size and SHA-256 of the bytes that went past."""

    def __init__(self) -> None:
        self.sha256 = hashlib.sha256()
        self.size = 0

    def update(self, data: bytes) -> None:
        self.sha256.update(data)
        self.size += len(data)

    def hexdigest(self) -> str:
        return self.sha256.hexdigest()

    @classmethod
    def of_file(cls, path: str) -> Tally:
        tally = cls()
        with open(path, "rb") as handle:
            copy(handle, tally.update)
        return tally


def copy(src: IO[bytes], write: Callable[[bytes], Any], tally: Tally | None = None,
         progress: Callable[[int], None] | None = None) -> int:
    """Copy until EOF in CHUNK reads; returns the byte count."""
    total = 0
    read = getattr(src, "read1", src.read)
    while True:
        chunk = read(CHUNK)
        if not chunk:
            return total
        if tally is not None:
            tally.update(chunk)
        write(chunk)
        total += len(chunk)
        if progress is not None:
            progress(len(chunk))


_libc = ctypes.CDLL(None, use_errno=True)


def is_pipe(stream: object) -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(stream.fileno()).st_mode)  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False


def tee_pipes(source: int, target: int, tally: Tally) -> int | None:
    """Copy pipe → pipe, hashing, with tee(2): the kernel shares the source's pages with the
    target, and we only read them to hash. Against read + write, a pass through Python costs a
    third less system time (bench/RESULTS.md, summary), and on a busy machine the stages' CPU is
    what a backup's wall time is made of. Takes both descriptors over (closes them): give it
    duplicates (os.dup), so that another thread closing the streams cannot make it use a
    reused descriptor number. Returns the byte count, or None when tee(2) is not allowed here (a
    sandbox) and nothing was copied: the caller copies instead. BrokenPipeError when the
    target's reader is gone, as write() would."""
    buffer = memoryview(bytearray(PIPE_SIZE))
    total = 0
    try:
        while True:
            count = _libc.tee(source, target, PIPE_SIZE, 0)
            if count < 0:
                code = ctypes.get_errno()
                if code == errno.EINTR:
                    continue
                if code in (errno.ENOSYS, errno.EPERM, errno.EINVAL) and total == 0:
                    return None
                raise OSError(code, f"tee: {os.strerror(code)}")  # EPIPE: BrokenPipeError
            if count == 0:
                return total
            _read_exactly(source, buffer[:count])  # the same bytes, now consumed
            tally.update(buffer[:count])
            total += count
    finally:
        os.close(source)
        os.close(target)


def _read_exactly(fd: int, view: memoryview) -> None:
    done = 0
    while done < len(view):
        read = os.readv(fd, [view[done:]])
        if not read:
            raise OSError(errno.EIO, "tee: the source pipe ended before its copied bytes")
        done += read


def enlarge_pipe(fd: int) -> None:
    """Give a pipe PIPE_SIZE bytes of buffer, when the system allows it."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # over the user's pipe quota or pipe-max-size: the default size still works
