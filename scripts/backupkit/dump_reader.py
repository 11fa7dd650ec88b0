"""Reading a database backup back: the format's decryption (then its decompression, when it is
compressed), fed from a file or straight from the bucket as it downloads (`Fetched.body`, whose
size and SHA-256 are checked in `finish()`, before anything else), into this process, which
hashes the SQL and hands it on, either to a sink that keeps only its end (verify, here), or to
psql (restore, dump_restore.py); never more of it than the manifest promised.

`hold_back` keeps the last HOLD_BACK bytes of the SQL (which hold pg_dump's completion trailer)
from psql until decryption ended cleanly, the download, the SQL's size and SHA-256 matched the
manifest and the trailer is there (dump_restore.py sends its COMMIT only after them).
"""

from __future__ import annotations

import collections
import signal
import subprocess
import threading
from typing import IO, Any

from . import formats
from .errors import Problem, VerificationError
from .manifest import check_plaintext
from .pipeline import Pipeline
from .postgres import TRAILER_WINDOW, has_trailer
from .retrieve import Fetched
from .sqlstream import Refused, SqlGuard
from .streams import CHUNK, Tally

HOLD_BACK = 64 * 1024  # plaintext kept from psql until verified; holds pg_dump's trailer


class _Prefixed:
    """A stream with some bytes already read from it put back in front."""

    def __init__(self, first: bytes, rest: IO[bytes]):
        self._first = first
        self._rest = rest

    def read1(self, size: int = -1) -> bytes:
        if self._first:
            data, self._first = self._first, b""
            return data
        return self._rest.read1(size)

    read = read1

    def close(self) -> None:
        self._rest.close()


class _Draining:
    """The decryption's input, fed from the download: when the decryption stops reading (it, or
    the decompression after it, failed), the rest of the download is still read and hashed
    (and dropped), so that DumpReader.finish() can tell a corrupted download from the rest."""

    def __init__(self, stdin: IO[bytes]):
        self._stdin = stdin
        self._broken = False

    def write(self, chunk: bytes) -> None:
        if self._broken:
            return
        try:
            self._stdin.write(chunk)
        except BrokenPipeError:
            self._broken = True
            self.close()

    def close(self) -> None:
        try:
            self._stdin.close()
        except OSError:
            pass


class DumpReader:
    """The SQL of one backup file, read from `stdout`; `finish()` raises unless every stage that
    produced it exited cleanly."""

    def __init__(self, pipeline: Pipeline, fetched: Fetched):
        self._pipeline = pipeline
        self._encryption = fetched.encryption
        assert self._encryption.start is not None, f"{fetched.encryption.name} is not a pipeline stage"
        self.body = fetched.body
        if self.body is None:
            self.decrypt = self._encryption.start(pipeline, fetched.secret, decrypt=True, infile=fetched.path)
        else:  # streamed from the bucket: fed to the decryption as it downloads, hashed on the way
            self.decrypt = self._encryption.start(pipeline, fetched.secret, decrypt=True, stdin=subprocess.PIPE)
            pipeline.pump(self.body, _Draining(self.decrypt.stdin))
        self.decompress = None
        first = b""
        if fetched.compression is None:  # a local dump without manifest: its first bytes say
            while len(first) < formats.magic_length("database") and (more := self.decrypt.stdout.read1(CHUNK)):
                first += more
            compression = formats.sniff_compression("database", first)
        else:
            compression = formats.compression_named(fetched.compression)
        if compression.start is not None:
            if first:
                self.decompress = compression.start(pipeline, None, subprocess.PIPE)
                pipeline.pump(_Prefixed(first, self.decrypt.stdout), self.decompress.stdin)
            else:
                self.decompress = compression.start(pipeline, None, self.decrypt.stdout)
                self.decrypt.stdout.close()  # the decompression holds it now: if it dies, openssl gets EPIPE
            self.stdout: Any = self.decompress.stdout
        else:
            self.stdout = _Prefixed(first, self.decrypt.stdout) if first else self.decrypt.stdout

    def abandon(self) -> None:
        """Stop reading the download (a deadline, a stop): it then never checks out."""
        if self.body is not None:
            self.body.abandon()

    def finish(self) -> None:
        self._pipeline.join_pumps()
        if self.body is not None:
            # The ciphertext first, as when it was downloaded before the decryption: a corrupted
            # download is named as such, whatever the decryption made of it.
            self.body.check()
        decrypted = self.decrypt.wait()
        decompressed = self.decompress.wait() if self.decompress is not None else 0
        # The decompression stopping on bad data makes openssl fail writing to it (SIGPIPE, or
        # "error writing output file"): then the decompression's failure is the cause.
        write_failed = self._encryption.write_failed
        secondary = decompressed != 0 and (decrypted == -signal.SIGPIPE or
                                           (write_failed is not None and write_failed in self.decrypt.stderr_text()))
        if decrypted != 0 and not secondary:
            raise VerificationError(f"decryption failed, wrong passphrase or corrupted backup ({self.decrypt.describe_failure()})",
                                    Problem.UNDECRYPTABLE)
        if decompressed != 0:
            raise VerificationError(f"decompression failed: the backup is corrupted ({self.decompress.describe_failure()})",
                                    Problem.CORRUPT)


class Tail:
    """A sink that keeps only the last `size` bytes written."""

    def __init__(self, size: int = TRAILER_WINDOW):
        self.size = size
        self.data = b""

    def write(self, chunk: bytes) -> int:
        self.data = (self.data + chunk[-self.size:])[-self.size:]
        return len(chunk)



def check_dump(plaintext: Tally, tail: bytes, fetched: Fetched) -> None:
    check_plaintext(plaintext, fetched.manifest, "dump")
    if not has_trailer(tail):
        raise VerificationError("the dump is incomplete: pg_dump's completion trailer is missing", Problem.BAD_CONTENT)


def refusal(exc: Refused) -> VerificationError:
    if not exc.never:
        return VerificationError(f"{exc} (README, Threat model)", Problem.BAD_CONTENT)
    return VerificationError(f"{exc}: this backup was not made by the backup job; keep it out of restores and tell "
                             "the team", Problem.BAD_CONTENT)


class Bounded:
    """Reads of the dump, never more than the manifest promised: a compressed stream promises
    nothing about its output (16 GiB of zeros fit in a few KB)."""

    def __init__(self, src: Any, tally: Tally, fetched: Fetched):
        self._read = getattr(src, "read1", src.read)
        self._tally = tally
        self._limit = fetched.manifest["plaintext_size"] if fetched.manifest else None

    def read(self, size: int) -> bytes:
        chunk = self._read(size)
        self._tally.update(chunk)
        if self._limit is not None and self._tally.size > self._limit:
            raise VerificationError(f"the SQL goes on past the {self._limit} bytes its manifest promised: corrupted, or a "
                                    "decompression bomb; nothing more of it is read", Problem.CORRUPT)
        return chunk


def verify_dump(fetched: Fetched) -> dict[str, Any]:
    """Decrypt (and decompress) into a hashing sink that also reads the SQL as psql would and
    refuses what pg_dump never writes; then the SQL's hash and pg_dump's trailer."""
    plaintext = Tally()
    tail = Tail()
    guard = SqlGuard()
    with Pipeline() as pipeline:
        reader = DumpReader(pipeline, fetched)
        source = Bounded(reader.stdout, plaintext, fetched)
        refused: Refused | None = None
        try:
            while chunk := source.read(CHUNK):
                tail.write(chunk)
                if refused is None:
                    try:
                        guard.feed(chunk)
                    except Refused as exc:
                        # Read on: a corrupted stream (or, without a manifest, a wrong passphrase)
                        # also yields what pg_dump never writes, and that is the failure to name.
                        refused = exc
            reader.finish()
            check_dump(plaintext, tail.data, fetched)
            if refused is not None:
                raise refused
            guard.finish()
        except Refused as exc:
            raise refusal(exc) from None
    return {"plaintext_size": plaintext.size, "trailer": True}


def hold_back(src: Bounded, guard: SqlGuard, stop: threading.Event,
              keep: int = HOLD_BACK) -> tuple[bytes, bool, Refused | None]:
    """Copy src → guard (→ psql) except the last `keep` bytes, which are returned for the caller
    to release only once the whole stream verified. If psql's input breaks (psql died), or the
    guard refuses, nothing more reaches psql but src is still read to the end and hashed (unless
    `stop` is set): a corrupted stream, or without a manifest a wrong passphrase, also yields
    bytes pg_dump never writes, and the failure to name is the one found at the end. Returns
    (held tail, psql's input given up, refusal)."""
    # Whole chunks are held and released as they are: no byte is copied on the way (the dump can
    # be hundreds of GB, and this core is shared with psql's).
    held: collections.deque[bytes] = collections.deque()
    size = 0
    broken = False
    refused: Refused | None = None
    while not stop.is_set() and (chunk := src.read(CHUNK)):
        held.append(chunk)
        size += len(chunk)
        while size - len(held[0]) >= keep:
            oldest = held.popleft()
            size -= len(oldest)
            if not broken:
                try:
                    guard.feed(oldest)
                except BrokenPipeError:
                    broken = True
                except Refused as exc:
                    broken, refused = True, exc
    return b"".join(held), broken, refused
