"""Reading a database backup back: `openssl -d` (then `zstd -d` when it is compressed) into this
process, which hashes the SQL and hands it on, either to a sink that keeps only its end (verify),
or to psql (restore).

psql is the dangerous reader. It executes backslash meta-commands as it reads them (`\\!` runs a
shell command) long before the end of the dump could be checked, and a backup writer with the
passphrase can plant any dump. So psql runs restricted from its first byte of input: we send
`\\restrict KEY` first, with a random key of ours that no dump can know, and drop pg_dump's own
`\\restrict`/`\\unrestrict` framing lines (exactly those two, where pg_dump writes them); any other
meta-command in the dump is refused by psql and the restore rolls back.

psql commits `--single-transaction` when its input ends, so the last HOLD_BACK bytes (which hold
pg_dump's completion trailer) reach it only after decryption ended cleanly, the SQL's size and
SHA-256 matched the manifest and the trailer is there; otherwise psql is killed and rolls back.
"""

from __future__ import annotations

import collections
import re
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import IO, Any

from .compression import ZSTD_MAGIC, start_zstd
from .config import DatabaseTarget
from .crypto import OPENSSL_WRITE_FAILED, start_openssl
from .errors import BackupError, Problem, VerificationError
from .output import log, shown
from .pipeline import Pipeline
from .postgres import TRAILER, TRAILER_WINDOW, client_version, has_trailer, user_tables, warn_if_superuser
from .retrieve import Fetched, check_plaintext
from .streams import CHUNK, Tally, copy

HOLD_BACK = 64 * 1024  # plaintext kept from psql until verified; holds pg_dump's trailer
# pg_dump writes `\restrict KEY` after its header comments: it is dropped only if it is the first
# line that is neither blank nor a comment, within this many bytes.
HEAD_WINDOW = 64 * 1024
_FRAME_LINE = re.compile(rb"\\(un)?restrict ([0-9A-Za-z]+)\r?\n?")
# psql learned \restrict in these releases (CVE-2025-8714); older ones cannot be restricted.
RESTRICT_SINCE = {13: 22, 14: 19, 15: 14, 16: 10, 17: 6}


def check_restore_psql(version: str, psql: str) -> None:
    """Refuse a psql that cannot run restricted (it would execute a planted dump's commands)."""
    parts = [int(p) for p in re.findall(r"\d+", version)[:2]] + [0]
    major, minor = parts[0], parts[1]
    if major < 13 or (major in RESTRICT_SINCE and minor < RESTRICT_SINCE[major]):
        raise BackupError(
            f"{shown(psql)} is psql {shown(version)}, too old to restore safely: it cannot run restricted (\\restrict), "
            "so a planted backup could run shell commands here. Install a current PostgreSQL client "
            "(13.22, 14.19, 15.14, 16.10, 17.6 or newer; apt.postgresql.org has them) and pass --psql or set PSQL")


def check_restore_target(target: DatabaseTarget, psql: str) -> list[str]:
    """Before anything is downloaded: psql can restore safely, the target answers (warned about
    when its role is a superuser); returns the tables it already has."""
    check_restore_psql(client_version(psql)[1], psql)
    tables = user_tables(target, psql, restore_target=True)
    warn_if_superuser(target, psql)
    return tables


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


class DumpReader:
    """The SQL of one backup file, read from `stdout`; `finish()` raises unless every stage that
    produced it exited cleanly."""

    def __init__(self, pipeline: Pipeline, fetched: Fetched):
        self._pipeline = pipeline
        self.decrypt = start_openssl(pipeline, fetched.passphrase, decrypt=True, infile=fetched.path)
        self.decompress = None
        compression, first = fetched.compression, b""
        if compression is None:  # a local dump without manifest: its first bytes say
            while len(first) < len(ZSTD_MAGIC) and (more := self.decrypt.stdout.read1(CHUNK)):
                first += more
            compression = "zstd" if first.startswith(ZSTD_MAGIC) else "none"
        if compression == "zstd":
            if first:
                self.decompress = start_zstd(pipeline, stdin=subprocess.PIPE)
                pipeline.pump(_Prefixed(first, self.decrypt.stdout), self.decompress.stdin)
            else:
                self.decompress = start_zstd(pipeline, stdin=self.decrypt.stdout)
                self.decrypt.stdout.close()  # zstd holds it now: if zstd dies, openssl gets EPIPE
            self.stdout: Any = self.decompress.stdout
        else:
            self.stdout = _Prefixed(first, self.decrypt.stdout) if first else self.decrypt.stdout

    def finish(self) -> None:
        self._pipeline.join_pumps()
        decrypted = self.decrypt.wait()
        decompressed = self.decompress.wait() if self.decompress is not None else 0
        # zstd stopping on bad data makes openssl fail writing to it (SIGPIPE, or "error writing
        # output file"): then zstd's failure is the cause.
        secondary = decompressed != 0 and (decrypted == -signal.SIGPIPE or OPENSSL_WRITE_FAILED in self.decrypt.stderr_text())
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


def _check_dump(plaintext: Tally, tail: bytes, fetched: Fetched) -> None:
    check_plaintext(plaintext, fetched.manifest, "dump")
    if not has_trailer(tail):
        raise VerificationError("the dump is incomplete: pg_dump's completion trailer is missing", Problem.BAD_CONTENT)


def verify_dump(fetched: Fetched) -> dict[str, Any]:
    """Decrypt (and decompress) into a hashing sink; then the SQL's hash and pg_dump's trailer."""
    plaintext = Tally()
    tail = Tail()
    with Pipeline() as pipeline:
        reader = DumpReader(pipeline, fetched)
        copy(reader.stdout, tail.write, plaintext)
        reader.finish()
    _check_dump(plaintext, tail.data, fetched)
    return {"plaintext_size": plaintext.size, "trailer": True}


class RestrictedInput:
    """psql's standard input: our `\\restrict KEY` first, then the dump without pg_dump's own
    framing lines (`\\restrict K` at its head, `\\unrestrict K` after its trailer)."""

    def __init__(self, dst: IO[bytes]):
        self._dst = dst
        self._key = secrets.token_hex(32)  # psql's \restrict takes letters and digits
        self._head: bytearray | None = bytearray()  # None once the head is decided
        self.dump_key: bytes | None = None

    def write(self, data: bytes, *, last: bool = False) -> None:
        if self._head is not None:
            self._head += data
            decided = self._decide_head(last)
            if decided is None:
                return
            data, self._head = decided, None
            self._dst.write(f"\\restrict {self._key}\n".encode())
        if last:
            data = self._without_unrestrict(data)
        self._dst.write(data)

    def _decide_head(self, last: bool) -> bytes | None:
        """The head to send, once it is known whether it starts with pg_dump's \\restrict."""
        head = self._head
        at = 0
        while True:
            end = head.find(b"\n", at)
            if end < 0:
                if last or len(head) >= HEAD_WINDOW:
                    line = bytes(head[at:])
                    break
                return None
            line = bytes(head[at:end + 1])
            if line.strip() and not line.startswith(b"--"):
                break
            at = end + 1
        match = _FRAME_LINE.fullmatch(line)
        if match and not match.group(1):
            self.dump_key = match.group(2)
            return bytes(head[:at]) + bytes(head[at + len(line):])
        return bytes(head)

    def _without_unrestrict(self, tail: bytes) -> bytes:
        at = tail.rfind(TRAILER)
        if self.dump_key is None or at < 0:
            return tail
        line = b"\\unrestrict " + self.dump_key
        found = re.search(rb"(?m)^" + re.escape(line) + rb"\r?\n?", tail[at:])
        if not found:
            return tail
        return tail[:at + found.start()] + tail[at + found.end():]


def hold_back(src: Any, dst: RestrictedInput, tally: Tally, keep: int = HOLD_BACK) -> tuple[bytes, bool]:
    """Copy src → dst except the last `keep` bytes, which are returned for the caller to release
    only once the whole stream verified. If dst breaks (its reader died), src is still read to
    the end and hashed. Returns (held tail, dst broken)."""
    # Whole chunks are held and released as they are: no byte is copied on the way (the dump can
    # be hundreds of GB, and this core is shared with psql's).
    held: collections.deque[bytes] = collections.deque()
    size = 0
    broken = False
    read = getattr(src, "read1", src.read)
    while chunk := read(CHUNK):
        tally.update(chunk)
        held.append(chunk)
        size += len(chunk)
        while size - len(held[0]) >= keep:
            oldest = held.popleft()
            size -= len(oldest)
            if not broken:
                try:
                    dst.write(oldest)
                except BrokenPipeError:
                    broken = True
    return b"".join(held), broken


@dataclass
class Restored:
    plaintext_size: int
    seconds: float


def restore_dump(fetched: Fetched, target: DatabaseTarget, psql: str) -> Restored:
    """Decrypt into a restricted psql in one transaction, releasing the held-back end only when
    everything verified; on any failure psql is killed and nothing is committed."""
    log(f"restoring {fetched.label} into '{shown(target.database)}'")
    began = time.monotonic()
    plaintext = Tally()
    with Pipeline() as pipeline:
        reader = DumpReader(pipeline, fetched)
        restore = pipeline.start(
            "psql",
            [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction", *target.args()],
            env=target.env(), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, die_with_parent=True,
        )
        feed = RestrictedInput(restore.stdin)
        held, broken = hold_back(reader.stdout, feed, plaintext)
        reader.finish()
        _check_dump(plaintext, held, fetched)
        if not broken:
            try:
                feed.write(held, last=True)
                restore.stdin.close()
            except BrokenPipeError:
                pass
        if restore.wait() != 0:
            message = restore.describe_failure()
            if "restricted" in message or "\\unrestrict" in message:
                raise VerificationError(
                    f"the restore was refused and rolled back: {message} — the dump holds psql commands (\\! would run "
                    "a shell command here), which pg_dump never writes: this backup was not made by the backup job; "
                    "keep it out of restores and tell the team", Problem.BAD_CONTENT)
            if "other objects depend on it" in message:
                message += (" — the target holds objects the backup does not (the app's newer tables, say) that depend "
                            "on tables the backup replaces: restore into a new, empty database instead, or drop those "
                            "objects first (runbook, 'Over a database the app has already started')")
            raise BackupError(f"the restore failed and was rolled back: {message}")
    return Restored(plaintext.size, time.monotonic() - began)
