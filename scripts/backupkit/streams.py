"""Bytes on the move: the chunk size every copy uses, a running size and SHA-256 (`Tally`),
`copy()`, and enlarging a pipe. Shared by the pipelines, the uploader and the readers."""

from __future__ import annotations

import fcntl
import hashlib
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


def enlarge_pipe(fd: int) -> None:
    """Give a pipe PIPE_SIZE bytes of buffer, when the system allows it."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # over the user's pipe quota or pipe-max-size: the default size still works
