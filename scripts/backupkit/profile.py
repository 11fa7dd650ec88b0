"""What a backup holds, recorded as it is made, for the loss tripwire (compare_backups.py).

A profile is JSON Lines: a header ({"format": "profile-v1", "kind", "backup_key"}) then one line
per table of a database backup ({"table", "rows", "bytes"}, in the dump's order) or per object of
a files backup ({"key", "size", "crc32"}, in key order). Table names, counts and keys can be
personal data: the profile is encrypted as its backup is (by its format's Encryption entry:
openssl for a dump, AES Crypt for an archive; same passphrase, same key_id), stored at `<backup key>.profile.encrypted`, and named by
the manifest's `profile` field (key, version_id, size, sha256 of the stored bytes, entries).

Recording: `DumpRows` reads the plain dump as it streams past (the `COPY … FROM stdin;` blocks),
`ArchiveEntries` is told each archive member; neither keeps more than a line per table, and
nothing per object. Reading: `read_profile` downloads one profile named by a manifest, bounded
and checked against the manifest's size and SHA-256 before anything is decrypted.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import os
import re
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .crypto import Encryption, FullReader
from .errors import BackupError, Problem, VerificationError
from .formats import MAGIC_READ, detect_encryption, encryption_named
from .manifest import PROFILE_SUFFIX, profile_key, profile_problem, valid_size  # noqa: F401 - the profile's names live with the manifest that checks them
from .output import shown
from .pipeline import Pipeline
from .streams import CHUNK, Tally

FORMAT = "profile-v1"
# A database profile is a line per table (under 2 KiB each: identifiers are at most 63 bytes, but
# quoted they may double): 64 MiB is over 30,000 tables of the longest names.
MAX_DATABASE_PROFILE = 64 * 1024 * 1024
# A files profile is a line per object: a key of at most 1,024 bytes, JSON-escaped (6 × for
# control characters), and three numbers.
MAX_FILES_LINE = 8 * 1024
MAX_LINE = MAX_FILES_LINE


# -- recording: database ----------------------------------------------------------------------
# A COPY line longer than this is not one pg_dump writes (1,600 columns of 63-byte names quoted).
MAX_COPY_LINE = 1024 * 1024
_END = b"\n\\.\n"  # the line `\.` that ends a COPY block's data


def copy_table(line: bytes) -> str | None:
    """The table of a `COPY name [(columns)] FROM stdin;` line as pg_dump writes it, or None."""
    if not (line.startswith(b"COPY ") and line.endswith(b" FROM stdin;")):
        return None
    text = line[5:-12].decode("utf-8", "replace")
    # The qualified name: identifiers, plain or "quoted" ("" inside a quoted one), joined by dots.
    i, name = 0, []
    while True:
        if text.startswith('"', i):
            j = i + 1
            while True:
                j = text.find('"', j)
                if j < 0:
                    return None
                if text.startswith('""', j):
                    j += 2
                    continue
                break
            name.append(text[i:j + 1])
            i = j + 1
        else:
            m = re.compile(r"[^\s.\"(]+").match(text, i)
            if not m:
                return None
            name.append(m.group())
            i = m.end()
        if text.startswith(".", i):
            name.append(".")
            i += 1
            continue
        break
    rest = text[i:].strip()
    if rest and not (rest.startswith("(") and rest.endswith(")")):
        return None
    return "".join(name)


def _starts(view: memoryview) -> bool:
    """Whether `view` is a leading slice of a bytearray (its bytes are then obj[:len(view)])."""
    obj = view.obj
    if not isinstance(obj, bytearray) or view.format != "B" or not view.c_contiguous or view.readonly:
        return False
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) == ctypes.addressof(ctypes.c_char.from_buffer(obj))


_HEADER = b"-- Data for Name: "  # pg_dump's comment before each table's data: "…; Type: TABLE DATA; …"


def _may_start_header(head: bytes) -> bool:
    """Whether a line starting with `head` (its first bytes) may be a TABLE DATA header."""
    size = min(len(head), len(_HEADER))
    return head[:size] == _HEADER[:size]


class DumpRows:
    """Rows and data bytes per table, counted from a plain pg_dump as its chunks go past
    (`feed`). A table's data is pg_dump's `-- Data for Name: …; Type: TABLE DATA; …` comment, a
    `--` line, a blank line, then `COPY name (columns) FROM stdin;` (so a function body holding a
    COPY line is not taken for one); each line of the block is a row (COPY's text format escapes
    newlines in values), and the block ends at the line `\\.`, found across chunk boundaries.
    Memory: the tables seen, and at most one line of the dump outside COPY data."""

    def __init__(self) -> None:
        self.tables: dict[str, list[int]] = {}  # name → [rows, bytes], in the dump's order
        self._current: list[int] | None = None  # inside a COPY block: its counters
        self._tail = b""  # inside: the block's last bytes (at most 3), to find `\.` across chunks
        self._line: bytearray | None = None  # outside: the line being read, when it matters
        self._skip_line = False  # outside: in the middle of a line that does not matter
        self._expect = "header"  # outside: the line wanted next: header, dashes, blank, copy
        self._scratch = bytearray()

    def feed(self, chunk: bytes | memoryview) -> None:
        n = len(chunk)
        if isinstance(chunk, bytes):
            data: bytes | bytearray = chunk
        elif _starts(chunk):  # the pump's buffer[:count]: read in place
            data = chunk.obj
        else:  # another view: copied into one reused buffer (no allocation per chunk)
            if len(self._scratch) < n:
                self._scratch = bytearray(n)
            self._scratch[:n] = chunk
            data = self._scratch
        pos = 0
        while pos < n:
            pos = self._inside(data, pos, n) if self._current is not None else self._outside(data, pos, n)

    def _inside(self, data: bytes | bytearray, pos: int, n: int) -> int:
        counters, tail = self._current, self._tail
        assert counters is not None
        probe = tail + bytes(data[pos:min(pos + 3, n)])
        at = probe.find(_END)
        if 0 <= at < len(tail):  # the end line began in the bytes before this chunk
            end = pos + at + 4 - len(tail)
            counters[1] -= len(tail) - at - 1  # those bytes (`\` or `\.`) were counted as data
        else:
            # Most chunks hold no end at all: rfind says so fastest (bench/RESULTS.md, tripwire-profile).
            at = -1 if data.rfind(_END, pos, n) < 0 else data.find(_END, pos, n)
            if at < 0:
                counters[0] += data.count(b"\n", pos, n)
                counters[1] += n - pos
                self._tail = (tail + bytes(data[max(pos, n - 3):n]))[-3:]
                return n
            counters[0] += data.count(b"\n", pos, at + 1)
            counters[1] += at + 1 - pos
            end = at + 4
        self._current, self._tail = None, b""
        return end

    def _outside(self, data: bytes | bytearray, pos: int, n: int) -> int:
        if self._skip_line:
            newline = data.find(b"\n", pos, n)
            if newline < 0:
                return n
            self._skip_line = False
            return newline + 1
        if self._line is None:  # at the start of a line
            if self._expect == "header" and not _may_start_header(bytes(data[pos:min(pos + len(_HEADER), n)])):
                found = data.find(b"\n" + _HEADER, pos, n)
                if found >= 0:
                    return found + 1
                last = data.rfind(b"\n", pos, n)
                rest = bytes(data[last + 1:n])
                if last < 0 or (rest and not _may_start_header(rest)):
                    self._skip_line = True
                elif rest:
                    self._line = bytearray(rest)
                return n
            self._line = bytearray()
        newline = data.find(b"\n", pos, n)
        self._line += data[pos:n] if newline < 0 else data[pos:newline]
        if len(self._line) > MAX_COPY_LINE or (self._expect == "header" and not _may_start_header(bytes(self._line[:len(_HEADER)]))):
            self._line, self._expect = None, "header"
            self._skip_line = newline < 0
            return n if newline < 0 else newline + 1
        if newline < 0:
            return n
        line, self._line = bytes(self._line), None
        self._next_line(line)
        return newline + 1

    def _next_line(self, line: bytes) -> None:
        expect, self._expect = self._expect, "header"
        if expect == "dashes" and line == b"--":
            self._expect = "blank"
        elif expect == "blank" and line == b"":
            self._expect = "copy"
        elif expect == "copy" and (table := copy_table(line)) is not None:
            self._current = self.tables.setdefault(table, [0, 0])
            self._tail = b"\n"
        elif line.startswith(_HEADER) and b"; Type: TABLE DATA;" in line:
            self._expect = "dashes"

    def entries(self) -> list[dict[str, Any]]:
        return [{"table": name, "rows": rows, "bytes": size} for name, (rows, size) in self.tables.items()]


class ObservedTally(Tally):
    """A Tally whose bytes are also fed to `observer.feed` (the backup's plaintext hook)."""

    def __init__(self, observer: Any) -> None:
        super().__init__()
        self.observer = observer

    def update(self, data: bytes) -> None:
        super().update(data)
        self.observer.feed(data)


def header(kind: str, backup_key: str) -> dict[str, Any]:
    return {"format": FORMAT, "kind": kind, "backup_key": backup_key}


def lines(kind: str, backup_key: str, entries: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(e, ensure_ascii=False).encode() + b"\n" for e in [header(kind, backup_key), *entries])


def _through_stage(encryption: Encryption, data: bytes, secret: str, *, decrypt: bool) -> bytes:
    """`data` through the encryption's pipeline stage (a profile is small: held in memory)."""
    assert encryption.start is not None, f"{encryption.name} is not a pipeline stage"
    with Pipeline() as pipeline:
        stage = encryption.start(pipeline, secret, decrypt=decrypt, stdin=subprocess.PIPE)
        pipeline.pump(io.BytesIO(data), stage.stdin)
        out = stage.stdout.read()
        pipeline.join_pumps()
        code = stage.wait()
    if code != 0:
        if decrypt:
            raise VerificationError(f"the profile does not decrypt ({stage.name}): wrong passphrase or corrupted",
                                    Problem.UNDECRYPTABLE)
        raise BackupError(f"{stage.name} failed to encrypt the profile: {stage.stderr_text()[-300:]}")
    return out


def encrypt_profile(encryption: Encryption, plaintext: bytes, secret: str) -> bytes:
    """`plaintext` encrypted as a backup in `encryption` is: through its stage, or in process."""
    if encryption.start is not None:
        return _through_stage(encryption, plaintext, secret, decrypt=False)
    assert encryption.encrypt is not None, f"{encryption.name} does not encrypt"
    out = io.BytesIO()
    encryption.encrypt(FullReader(io.BytesIO(plaintext)), out, secret)
    return out.getvalue()


@dataclass
class ProfileWritten:
    """A profile's upload (parts sent, not yet completed) and what its manifest field says."""

    upload: Any  # a StreamingUpload
    entries: int

    def field(self) -> dict[str, Any]:
        """The manifest's `profile` field, once the upload completed."""
        return {"key": self.upload.key, "version_id": self.upload.version_id, "size": self.upload.size,
                "sha256": self.upload.sha256.hexdigest(), "entries": self.entries}


def send_database_profile(upload: Any, backup_key: str, rows: DumpRows, encryption: Encryption,
                          passphrase: str) -> ProfileWritten:
    """Encrypt the database profile (as its backup: `encryption`) into `upload` (a StreamingUpload
    of profile_key(backup_key)), every byte sent; the caller completes it after the backup and
    before the manifest."""
    entries = rows.entries()
    upload.write(encrypt_profile(encryption, lines("database", backup_key, entries), passphrase))
    upload.flush()
    return ProfileWritten(upload, len(entries))


# -- recording: files ---------------------------------------------------------------------------
class ArchiveEntries:
    """The files profile, written as the archive is: `member()` for each object archived (in key
    order, as listed) appends its line to an AES Crypt stream whose ciphertext goes to an unnamed
    temporary file (ciphertext on disk, never plaintext); `send()` uploads it after the archive.
    Memory: the encryption's buffers, nothing per object."""

    def __init__(self, backup_key: str, passphrase: str):
        from .archive_read import unnamed_file
        from .archive_write import EncryptingSink  # the archive's own encryption stream

        self.backup_key = backup_key
        self.entries = 0
        self._file = os.fdopen(unnamed_file(tempfile.gettempdir()), "w+b")
        self._sink = EncryptingSink(passphrase, self._file.write)
        self._pending = bytearray()
        self._write(header("files", backup_key))

    def _write(self, entry: dict[str, Any]) -> None:
        self._pending += json.dumps(entry, ensure_ascii=False).encode() + b"\n"
        if len(self._pending) >= CHUNK:
            self._sink.write(bytes(self._pending))
            self._pending.clear()

    def member(self, key: str, size: int, crc32: int) -> None:
        self._write({"key": key, "size": size, "crc32": f"{crc32:08x}"})
        self.entries += 1

    def send(self, upload: Any) -> ProfileWritten:
        """End the encryption and send the ciphertext into `upload` (every part sent; the caller
        completes it after the backup and before the manifest)."""
        if self._pending:
            self._sink.write(bytes(self._pending))
            self._pending.clear()
        self._sink.close()
        self._file.seek(0)
        while chunk := self._file.read(CHUNK):
            upload.write(chunk)
        upload.flush()
        return ProfileWritten(upload, self.entries)

    def close(self) -> None:
        self._sink.cancel()
        self._file.close()

    def __enter__(self) -> ArchiveEntries:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- reading ------------------------------------------------------------------------------------
def max_profile_bytes(manifest: dict[str, Any]) -> int:
    """The most a genuine profile of this backup can hold (a bigger one is not read at all)."""
    if manifest["kind"] == "database":
        return MAX_DATABASE_PROFILE
    return MAX_DATABASE_PROFILE + MAX_FILES_LINE * manifest["source"]["object_count"]


def download_profile(client: Any, bucket: str, manifest: dict[str, Any], path: str) -> None:
    """The encrypted profile a manifest names, to `path` (0600), never more than the manifest
    says, and checked against its size and SHA-256: raises VerificationError otherwise."""
    from .s3 import read_body

    profile = manifest["profile"]
    if profile["size"] > max_profile_bytes(manifest):
        raise VerificationError(f"its profile is {profile['size']} bytes, more than a profile of this backup can be: not read",
                                Problem.BAD_MANIFEST)
    extra = {"VersionId": profile["version_id"]} if profile["version_id"] else {}
    where = f"s3://{bucket}/{shown(profile['key'])}"

    def save(body: Any) -> Tally:
        tally = Tally()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            while chunk := body.read(CHUNK):
                tally.update(chunk)
                if tally.size > profile["size"]:
                    break
                out.write(chunk)
        return tally

    range_end = profile["size"]  # one byte more than promised, to see it is longer
    tally = read_body(f"read the profile {where}",
                      lambda: client.get_object(Bucket=bucket, Key=profile["key"], Range=f"bytes=0-{range_end}", **extra),
                      save)
    if tally.size != profile["size"] or tally.hexdigest() != profile["sha256"]:
        raise VerificationError(f"its profile {where} does not match the manifest's size and SHA-256: corrupted",
                                Problem.CORRUPT)
    with open(path, "rb") as handle:
        found = detect_encryption(handle.read(MAGIC_READ))
    if found is None or found.name != manifest["encryption"]:
        raise VerificationError(f"its profile is not in the backup's format {manifest['encryption']}", Problem.BAD_CONTENT)


def decrypted_lines(path: str, encryption_name: str, secret: str) -> Iterator[bytes]:
    """The lines of a downloaded (checked) profile, decrypted as they are read by its backup's
    encryption (a stage: at once, in memory; in process: streamed). An in-process decryption's
    check (AES Crypt's HMAC) comes only at the end: the caller acts on nothing before the
    iterator ended."""
    try:
        encryption = encryption_named(encryption_name)
    except KeyError:
        raise VerificationError(f"unknown profile encryption {shown(encryption_name)}", Problem.BAD_CONTENT) from None
    if encryption.start is not None:
        with open(path, "rb") as handle:
            plaintext = _through_stage(encryption, handle.read(), secret, decrypt=True)
        yield from plaintext.splitlines(keepends=True)
        return
    yield from _streamed_lines(encryption, path, secret)


def _streamed_lines(encryption: Encryption, path: str, secret: str) -> Iterator[bytes]:
    decrypt_stream = encryption.decrypt
    assert decrypt_stream is not None, f"{encryption.name} does not decrypt in process"
    read_end, write_end = os.pipe()
    failure: list[BaseException] = []

    def decrypt() -> None:
        try:
            with open(path, "rb") as source, open(write_end, "wb") as sink:
                decrypt_stream(source, sink, secret)
        except BaseException as exc:  # noqa: BLE001 - raised in the reader's thread at the end
            failure.append(exc)

    thread = threading.Thread(target=decrypt, name="profile-decrypt", daemon=True)
    thread.start()
    with open(read_end, "rb") as reader:
        try:
            while line := reader.readline(MAX_LINE + 1):
                yield line
        finally:
            reader.close()  # a decryption still writing gets EPIPE and ends
            thread.join()
    if failure:
        exc = failure[0]
        raise exc if isinstance(exc, BackupError) else VerificationError(
            f"the profile does not decrypt: {type(exc).__name__}", Problem.UNDECRYPTABLE)


def parse_lines(raw: Iterator[bytes], manifest: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The entries of a profile (its header checked against the manifest), each checked for its
    kind's fields; the count is checked against the manifest's `entries` at the end."""
    kind = manifest["kind"]
    count = -1

    def bad(what: str) -> VerificationError:
        return VerificationError(f"its profile {what}: not one this tool writes", Problem.BAD_CONTENT)

    for line in raw:
        if len(line) > MAX_LINE or not line.endswith(b"\n"):
            raise bad("has an overlong or unterminated line")
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):
            raise bad("has a line that is not JSON") from None
        if not isinstance(entry, dict):
            raise bad("has a line that is not a JSON object")
        if count < 0:
            if entry != header(kind, manifest["key"]):
                raise bad("has a header that does not name its backup")
            count = 0
            continue
        if kind == "database":
            if not (isinstance(entry.get("table"), str) and valid_size(entry.get("rows")) and valid_size(entry.get("bytes"))):
                raise bad("has a malformed table line")
        elif not (isinstance(entry.get("key"), str) and valid_size(entry.get("size")) and isinstance(entry.get("crc32"), str)):
            raise bad("has a malformed object line")
        count += 1
        yield entry
    if count != manifest["profile"]["entries"]:
        raise bad(f"holds {max(count, 0)} entries, the manifest says {manifest['profile']['entries']}")


def digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_profile(client: Any, bucket: str, manifest: dict[str, Any], passphrase: str, directory: str,
                 consume: Callable[[Iterator[dict[str, Any]]], Any]) -> Any:
    """Download the profile `manifest` names into `directory`, check it, and hand its entries to
    `consume` (which must read them to the end: the last checks run there)."""
    path = os.path.join(directory, f"profile-{digest_of(manifest['key'].encode())[:16]}")
    download_profile(client, bucket, manifest, path)
    try:
        return consume(parse_lines(decrypted_lines(path, manifest["encryption"], passphrase), manifest))
    finally:
        os.unlink(path)
