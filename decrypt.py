#!/usr/bin/env python3
"""Decrypt an external backup: openssl `enc -aes-256-cbc -pbkdf2` (.sql.encrypted, and
.sql.zst.encrypted which it also decompresses with zstd) or AES Crypt v2 (.zip.encrypted),
recognised by their magic bytes.

Standalone on purpose (standard library + pyAesCrypt + the openssl and zstd binaries): copy this
one file to any machine during an incident.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import getpass
import hashlib
import json
import os
import re
import secrets
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import typing
from collections.abc import Iterator
from datetime import UTC, datetime

# Copies of the toolkit's rules (scripts/backupkit), standalone on purpose: tests/test_decrypt_parity.py
# runs this file and the library on the same inputs (key_id, passphrase rule and choice, manifests,
# child environment, failure causes), so neither can drift from the other.
OPENSSL_ARGS = ["-aes-256-cbc", "-pbkdf2", "-md", "sha256", "-iter", "10000"]
OPENSSL_WRITE_FAILED = "error writing output"
KEY_ID_SALT = b"external-backups key id"
KEY_ID_ITERATIONS = 600_000
MAX_MANIFEST_BYTES = 256 * 1024
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
TRAILER = b"-- PostgreSQL database dump complete"
BUFFER = 1024 * 1024
# Without a manifest nothing says how large the plaintext is: the output may be at most this many
# times the input (--max-ratio). A dump compresses 3-10× (zstd -1); a planted zstd stream can
# promise 30,000× (131 KB → 4 GiB).
MAX_RATIO = 1000
# Never handed to openssl or zstd (the passphrase goes through a pipe).
SECRET_VARIABLES = (
    "EXTERNAL_BACKUP_ENCRYPTION_KEY", "EXTERNAL_BACKUP_ENCRYPTION_KEY_PREVIOUS", "DATABASE_URL", "TARGET_DATABASE_URL",
    "PGPASSWORD", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "SOURCE_AWS_SECRET_ACCESS_KEY", "SOURCE_AWS_SESSION_TOKEN",
    "BACKUP_HEARTBEAT_URL",
)
# Nor these: inside GitHub Actions they let any process that reads them act as this job (a
# child's environment is readable by every process of the same user, /proc/PID/environ).
CHILD_ENV_PREFIXES = ("ACTIONS_",)
CHILD_ENV_DROPPED = ("GITHUB_TOKEN",)

# A manifest as the backup scripts write it; one they would refuse is refused here too.
ENVIRONMENT_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
KEY_RE = re.compile(
    r"^(?P<env>[a-z0-9][a-z0-9-]{0,62})/(?P<kind>database|files)/"
    r"(?P<ts>[0-9]{4}-[0-9]{2}-[0-9]{2}--[0-9]{2}-[0-9]{2}-[0-9]{2})(?P<suffix>\.sql\.encrypted|\.sql\.zst\.encrypted|\.zip\.encrypted)$"
)
TIMESTAMP_FORMAT = "%Y-%m-%d--%H-%M-%S"
ENCRYPTION = {"database": "openssl-aes-256-cbc-pbkdf2", "files": "aescrypt-v2"}
FORMAT_NAMES = {"openssl-aes-256-cbc-pbkdf2": "openssl aes-256-cbc", "aescrypt-v2": "AES Crypt"}
SUFFIXES = {("database", "none"): ".sql.encrypted", ("database", "zstd"): ".sql.zst.encrypted",
            ("files", "none"): ".zip.encrypted"}
MANIFEST_FIELDS: dict[str, type] = {
    "manifest_version": int, "kind": str, "environment": str, "key": str, "started_at": str, "completed_at": str,
    "encryption": str, "key_id": str, "encrypted_size": int, "encrypted_sha256": str, "plaintext_size": int,
    "plaintext_sha256": str, "source": dict, "tool_version": str,
}
SOURCE_FIELDS: dict[str, dict[str, type]] = {
    "database": {"database": str, "server_version": str, "pg_dump_version": str},
    "files": {"bucket": str, "prefix": str, "object_count": int, "total_bytes": int, "skipped": list},
}
MAX_SKIPPED_LISTED = 100
# The optional `profile` field (the loss tripwire's record of the backup: scripts/backupkit/profile.py).
PROFILE_SUFFIX = ".profile.encrypted"
PROFILE_FIELDS = ("key", "version_id", "size", "sha256", "entries")
MAX_SIZE = 2**53
MAX_TEXT = 1024
HEX64 = re.compile(r"[0-9a-f]{64}")
HEX16 = re.compile(r"[0-9a-f]{16}")
ISO_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")

EPILOG = """\
The passphrase comes from EXTERNAL_BACKUP_ENCRYPTION_KEY (and EXTERNAL_BACKUP_ENCRYPTION_KEY_PREVIOUS,
comma-separated older ones), else from a prompt without echo. --password works too but puts the
passphrase in the process list: avoid it on shared machines. A trailing line break is not part of
a passphrase; one inside it is refused (openssl would read only the first line).

When IN.manifest.json lies beside the input (fetch_backup.py puts it there), or --manifest names
one, it must be a manifest the backup scripts accept (every field checked as they check it) that
describes IN's format; the encrypted and plaintext sizes and SHA-256 are checked against it and the
passphrase is chosen by its key_id. Without a manifest nothing can prove the output is the whole,
unaltered backup (openssl has no integrity check): it says so, and a dump must at least end with
pg_dump's completion trailer. A compressed dump (.sql.zst.encrypted) is written as plain SQL (zstd -d;
the zstd program is ZSTD, default zstd on PATH).

OUT must not exist (--force replaces it). The plaintext goes to a file with no name in OUT's
directory and gets its name only once checked: on any failure, Ctrl-C or even SIGKILL, nothing is
left. It never grows past the manifest's plaintext_size; without a manifest, past --max-ratio
(default 1000) times the input, so a planted zstd stream cannot fill the disk. IN and its manifest
must be regular files (a FIFO is refused, never waited on).

examples:
  export EXTERNAL_BACKUP_ENCRYPTION_KEY=…        # or let it prompt
  ./decrypt.py --filein backup.sql.encrypted --fileout database-backup.sql
  ./decrypt.py -i files.zip.encrypted -o files.zip
"""


class Failure(Exception):
    pass


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised so the partial output is removed (and openssl killed) on the way out."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM held while a child starts (`openssl = Popen(...)` inside): raised
    inside Popen after the child's exec, they would leave it running with nothing holding it to
    kill it. A held signal is raised on leaving, once the caller holds the child."""
    held: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: held.append(signum)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if held:
            signal.raise_signal(held[0])


class ArgumentParser(argparse.ArgumentParser):
    """Usage errors as one `error:` line (after the usage) and exit 2, like the other scripts."""

    def error(self, message: str) -> typing.NoReturn:
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


@functools.cache  # slow on purpose (a fifth of a second): each passphrase's is derived once
def key_id(passphrase: str) -> str:
    return hashlib.pbkdf2_hmac("sha256", passphrase.encode(), KEY_ID_SALT, KEY_ID_ITERATIONS)[:8].hex()


def one_line(passphrase: str, where: str) -> str:
    """The toolkit's passphrase rule: a trailing line break is dropped, one inside is refused, and
    so are bytes that are not UTF-8 (held as lone surrogates; no message shows any of them)."""
    passphrase = passphrase.rstrip("\r\n")
    if "\n" in passphrase or "\r" in passphrase:
        raise Failure(f"{where} contains a line break: openssl would use only its first line")
    if not passphrase.isascii():
        try:
            passphrase.encode("utf-8")
        except UnicodeEncodeError:
            raise Failure(f"{where} is not valid UTF-8 text: store the passphrase as UTF-8 "
                          "(the backups' key_id is derived from its UTF-8 bytes)") from None
    return passphrase


def open_regular(path: str, what: str) -> typing.BinaryIO:
    """`path` opened for reading if it is a regular file. A FIFO, a device or a directory is
    refused without blocking: opening a FIFO for reading waits for a writer forever."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise Failure(f"{what} {path}: no such file") from None
    except OSError as exc:
        raise Failure(f"{what} {path}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise Failure(f"{what} {path} is not a regular file (a FIFO, a device or a directory?): give the file itself")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def sha256_file(handle: typing.BinaryIO) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    handle.seek(0)
    while chunk := handle.read(BUFFER):
        digest.update(chunk)
        size += len(chunk)
    handle.seek(0)
    return size, digest.hexdigest()


class TooLarge(Exception):
    pass


class Output:
    """Where the plaintext goes until it is checked: a file with no name (O_TMPFILE) in OUT's
    directory, so nothing is left on disk whatever happens to this process, SIGKILL included;
    given its name only at the end (publish). Where the filesystem cannot make unnamed files,
    a hidden 0600 temporary file instead, removed on any failure. `write` refuses to take the
    output past `limit` bytes; size and SHA-256 are taken on the way."""

    def __init__(self, outfile: str, limit: int):
        self.outfile = outfile
        self.limit = limit
        self.temp: str | None = None  # the named temporary file, when unnamed ones are not possible
        directory = os.path.dirname(os.path.abspath(outfile))
        try:
            if not os.path.isdir("/proc/self/fd"):
                raise OSError("no /proc to name the file at the end")
            fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except (AttributeError, OSError):  # no O_TMPFILE (not Linux, or not this filesystem)
            fd, self.temp = tempfile.mkstemp(prefix=".decrypt-", dir=directory)  # 0600
        self.file = os.fdopen(fd, "w+b")
        self.reset()

    def reset(self) -> None:
        """Empty again, for the next passphrase."""
        self.file.seek(0)
        self.file.truncate()
        self.size = 0
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> int:
        if self.size + len(data) > self.limit:
            raise TooLarge()
        self.file.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return len(data)

    def publish(self, force: bool) -> None:
        """Give the checked output its name: atomically, and never over an existing file
        without `force` (one created meanwhile included)."""
        self.file.flush()
        source = self.temp or f"/proc/self/fd/{self.file.fileno()}"
        directory = os.open(os.path.dirname(os.path.abspath(self.outfile)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        # linkat(…, AT_SYMLINK_FOLLOW), which os.link uses only given a directory descriptor: it
        # links the file /proc/self/fd/N points to, not that symbolic link.
        name = os.path.basename(self.outfile)
        try:
            if not force:
                os.link(source, name, dst_dir_fd=directory)
            else:
                beside = f".decrypt-{secrets.token_hex(6)}"
                os.link(source, beside, dst_dir_fd=directory)
                os.replace(beside, name, src_dir_fd=directory, dst_dir_fd=directory)
        except FileExistsError:
            raise Failure(f"{self.outfile} exists: pass --force to replace it") from None
        finally:
            os.close(directory)

    def discard(self) -> None:
        self.file.close()
        if self.temp is not None and os.path.exists(self.temp):
            os.unlink(self.temp)


def candidate_passphrases(explicit: str | None) -> list[str]:
    if explicit:
        return [one_line(explicit, "--password")]
    found = [one_line(os.environ.get("EXTERNAL_BACKUP_ENCRYPTION_KEY", ""), "EXTERNAL_BACKUP_ENCRYPTION_KEY")]
    found += [one_line(p, "EXTERNAL_BACKUP_ENCRYPTION_KEY_PREVIOUS")
              for p in os.environ.get("EXTERNAL_BACKUP_ENCRYPTION_KEY_PREVIOUS", "").split(",")]
    found = [p for p in found if p]
    if not found and sys.stdin.isatty():
        found = [one_line(getpass.getpass("Backup passphrase: "), "the passphrase")]
    if not found:
        raise Failure("no passphrase: set EXTERNAL_BACKUP_ENCRYPTION_KEY (or run on a terminal to be prompted)")
    return found


def child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in SECRET_VARIABLES and k not in CHILD_ENV_DROPPED and not k.startswith(CHILD_ENV_PREFIXES)}


def decrypt_openssl(source: typing.BinaryIO, out: Output, passphrase: str, compression: str | None) -> None:
    """openssl -d into `out`, through `zstd -d` when the data is compressed (told by the
    manifest, else by the first bytes of the decrypted stream)."""
    source.seek(0)
    os.lseek(source.fileno(), 0, os.SEEK_SET)  # openssl reads the descriptor: seek() may only move the buffer
    read_end, write_end = os.pipe()
    os.write(write_end, passphrase.encode() + b"\n")
    os.close(write_end)
    openssl = zstd = None
    try:  # started inside the try whose finally kills them: a Ctrl-C right after a start leaves none behind
        try:
            with _signals_held():
                openssl = subprocess.Popen(
                    ["openssl", "enc", "-d", *OPENSSL_ARGS, "-pass", f"fd:{read_end}"],
                    pass_fds=(read_end,), stdin=source, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
        except FileNotFoundError:
            raise Failure("openssl: command not found (apt-get install openssl)") from None
        finally:
            os.close(read_end)
        first = openssl.stdout.read(len(ZSTD_MAGIC))
        try:
            if compression == "zstd" or (compression is None and first == ZSTD_MAGIC):
                try:
                    with _signals_held():
                        zstd = subprocess.Popen([os.environ.get("ZSTD") or "zstd", "-d", "-q", "-c"], stdin=subprocess.PIPE,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
                except FileNotFoundError:
                    raise Failure("zstd: command not found: this backup is compressed; install the zstd package "
                                  "(apt-get install zstd), or set ZSTD to its path") from None
                # openssl → zstd in a thread; zstd → OUT here, where the output is bounded.
                threading.Thread(target=_feed, args=(first, openssl.stdout, zstd.stdin), name="zstd-feed", daemon=True).start()
                while chunk := zstd.stdout.read1(BUFFER):
                    out.write(chunk)
            else:
                out.write(first)
                while chunk := openssl.stdout.read1(BUFFER):
                    out.write(chunk)
        except BaseException:
            _kill(zstd, openssl)  # first: the feeding thread may be reading openssl's output
            raise
        finally:
            openssl.stdout.close()  # so an openssl still writing gets SIGPIPE, not a full pipe
        problem = openssl.stderr.read().decode(errors="replace")
        code, unzstd = openssl.wait(), (zstd.wait() if zstd is not None else 0)
        # zstd stopping on bad data makes openssl fail writing to it: then zstd's failure is the cause.
        secondary = unzstd != 0 and (code == -signal.SIGPIPE or OPENSSL_WRITE_FAILED in problem)
        if code != 0 and not secondary:
            raise ValueError(f"wrong passphrase or corrupted file (openssl: {' '.join(problem.split())[:300]})")
        if unzstd != 0:  # ValueError: without a manifest, the next passphrase is tried all the same
            detail = " ".join(zstd.stderr.read().decode(errors="replace").split())[:300]
            raise ValueError(f"decompression failed: the file is corrupted, it does not decompress (zstd: {detail})")
    finally:
        _kill(openssl, zstd)


def _kill(*procs: subprocess.Popen | None) -> None:
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


def _feed(first: bytes, source: typing.BinaryIO, sink: typing.BinaryIO) -> None:
    """Copy openssl's output into zstd; a zstd that stopped (bad data, or killed) ends it."""
    try:
        sink.write(first)
        while chunk := source.read1(BUFFER):
            sink.write(chunk)
    except (BrokenPipeError, ValueError, OSError):
        pass  # zstd stopped, or openssl's output was closed: their exit statuses say why
    finally:
        try:
            sink.close()
        except OSError:
            pass


def decrypt_aescrypt(source: typing.BinaryIO, out: Output, passphrase: str, compression: str | None) -> None:
    try:
        import pyAesCrypt
    except ImportError:
        raise Failure("pyAesCrypt is not installed: pip install pyAesCrypt") from None
    source.seek(0)
    try:
        pyAesCrypt.decryptStream(source, out, passphrase, BUFFER)
    except (ValueError, IndexError) as exc:  # IndexError: cut right after the header
        raise ValueError(f"wrong passphrase or corrupted file (AES Crypt: {exc})") from None


def check_looks_like_a_dump(out: Output) -> None:
    """Without a manifest: openssl has no MAC, so a wrong passphrase passes its padding check
    about once in 256 tries and yields noise, and a damaged or cut file decrypts silently. A dump
    is UTF-8 text that ends with pg_dump's completion trailer; noise and a cut dump are not."""
    out.file.flush()
    out.file.seek(0)
    head = out.file.read(64 * 1024)
    out.file.seek(max(out.size - 1024, 0))
    tail = out.file.read()
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a character cut at the end of the sample
            raise ValueError("wrong passphrase (the output is not the SQL text of a dump)") from None
    if TRAILER not in tail:
        raise Failure("the decrypted dump is incomplete: it does not end with pg_dump's completion trailer (cut short)")


def read_manifest(path: str) -> dict:
    try:
        with open_regular(path, "the manifest") as handle:
            body = handle.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise Failure(f"cannot read the manifest {path}: {exc.strerror}") from None
    return parse_manifest(body, path)


def parse_manifest(body: bytes, path: str) -> dict:
    """A manifest from its bytes, accepted only if the backup scripts would accept it (every field
    present, well formed, bounded, and agreeing with the others); a value is shown only once valid."""
    if len(body) > MAX_MANIFEST_BYTES:
        raise Failure(f"{path} is over {MAX_MANIFEST_BYTES // 1024} KiB: not a backup manifest")
    try:
        manifest = json.loads(body)
    except (ValueError, RecursionError):
        raise Failure(f"{path} is not valid JSON: not a backup manifest") from None
    problem = manifest_problem(manifest)
    if problem:
        raise Failure(f"{path} is not a backup manifest the backup scripts wrote: it {problem}")
    return manifest


def _text(value: object, limit: int = MAX_TEXT) -> bool:
    return isinstance(value, str) and len(value) <= limit


def _size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_SIZE


def key_time(key: str) -> datetime | None:
    match = KEY_RE.fullmatch(key)
    try:
        return datetime.strptime(match.group("ts"), TIMESTAMP_FORMAT).replace(tzinfo=UTC) if match else None
    except ValueError:  # e.g. month 13: not a name the backup scripts write
        return None


def manifest_problem(manifest: object) -> str | None:
    """What is wrong with a manifest, by the backup scripts' rules (scripts/backupkit/manifest.py,
    without the key, kind and environment a bucket reader compares it with); None: nothing."""
    if not isinstance(manifest, dict):
        return "is not a JSON object"
    for name, wanted in MANIFEST_FIELDS.items():
        value = manifest.get(name)
        if not isinstance(value, wanted) or isinstance(value, bool):
            return f"lacks a valid {name!r}"
    if manifest["manifest_version"] != 1:
        return "has a manifest_version other than 1"
    if "version_id" not in manifest or not (manifest["version_id"] is None or _text(manifest["version_id"])):
        return "lacks a valid 'version_id'"
    if manifest["kind"] not in ENCRYPTION:
        return "has an unknown kind"
    if not ENVIRONMENT_RE.fullmatch(manifest["environment"]):
        return "has an invalid 'environment'"
    match = KEY_RE.fullmatch(manifest["key"]) if _text(manifest["key"]) else None
    if not match or key_time(manifest["key"]) is None:
        return "names an object that is not a backup key"
    if (match.group("env"), match.group("kind")) != (manifest["environment"], manifest["kind"]):
        return "names a key of another kind or environment than it says"
    if manifest["encryption"] != ENCRYPTION[manifest["kind"]]:
        return f"says an encryption that is not how {manifest['kind']} backups are made"
    compression = manifest.get("compression", "none")
    if compression not in ("zstd", "none") or (manifest["kind"] == "files" and compression != "none"):
        return "has an invalid 'compression'"
    if SUFFIXES[(manifest["kind"], compression)] != match.group("suffix"):
        return f"says compression {compression}, which does not fit its key's name"
    if compression == "zstd" and not (_size(manifest.get("compressed_size"))
                                      and isinstance(manifest.get("compressed_sha256"), str)
                                      and HEX64.fullmatch(manifest["compressed_sha256"])):
        return "lacks a valid 'compressed_size' or 'compressed_sha256'"
    if not HEX16.fullmatch(manifest["key_id"]):
        return "has an invalid 'key_id' (16 hexadecimal digits)"
    for name in ("encrypted_sha256", "plaintext_sha256"):
        if not HEX64.fullmatch(manifest[name]):
            return f"has an invalid {name!r}"
    for name in ("encrypted_size", "plaintext_size"):
        if not _size(manifest[name]):
            return f"has an invalid {name!r}"
    for name in ("started_at", "completed_at"):
        if not ISO_TIME.fullmatch(manifest[name]):
            return f"has an invalid {name!r}"
    started = key_time(manifest["key"]).strftime("%Y-%m-%dT%H:%M:%SZ")
    if manifest["started_at"] != started or manifest["completed_at"] < manifest["started_at"]:
        return "has times that do not fit its key's name"
    if not _text(manifest["tool_version"], 64):
        return "has an invalid 'tool_version'"
    source = manifest["source"]
    for name, wanted in SOURCE_FIELDS[manifest["kind"]].items():
        value = source.get(name)
        if ((wanted is str and not _text(value)) or (wanted is int and not _size(value))
                or (wanted is list and not (isinstance(value, list) and len(value) <= 10 * MAX_SKIPPED_LISTED
                                            and all(_text(item) for item in value)))):
            return f"lacks a valid source {name!r}"
    if manifest["kind"] == "files" and "skipped_count" in source and not _size(source["skipped_count"]):
        return "lacks a valid source 'skipped_count'"
    return profile_problem(manifest)


def profile_problem(manifest: dict) -> str | None:
    """The optional `profile` field, as scripts/backupkit/profile.py checks it."""
    if "profile" not in manifest:
        return None
    profile = manifest["profile"]
    if not isinstance(profile, dict) or set(profile) != set(PROFILE_FIELDS):
        return "has an invalid 'profile'"
    if profile["key"] != manifest["key"] + PROFILE_SUFFIX:
        return "names a profile that is not its backup's"
    if not (profile["version_id"] is None or _text(profile["version_id"])):
        return "has an invalid profile 'version_id'"
    if not (_size(profile["size"]) and _size(profile["entries"])):
        return "has an invalid profile 'size' or 'entries'"
    if not (isinstance(profile["sha256"], str) and HEX64.fullmatch(profile["sha256"])):
        return "has an invalid profile 'sha256'"
    return None


def pick_passphrase(wanted: str, candidates: list[str]) -> str:
    """The candidate whose key_id the manifest names. Before the one-line rule a secret stored with
    a trailing newline got the key_id of passphrase + newline: such a backup is found too, and gets
    exactly the passphrase it was made with."""
    for candidate in candidates:
        if key_id(candidate) == wanted:
            return candidate
    for candidate in candidates:
        if key_id(candidate + "\n") == wanted:
            return candidate + "\n"
    raise Failure(f"this backup needs the passphrase with key_id {wanted}; the passphrases given have "
                  f"key_id {', '.join(key_id(c) for c in candidates)}: mistyped, or an older one missing?")


def decrypt(infile: str, outfile: str, passphrases: list[str], manifest: dict | None, force: bool = False,
            max_ratio: float = MAX_RATIO) -> str:
    """Decrypt infile to outfile (atomically; an existing outfile only with `force`); returns the
    format's name. The output never grows past the manifest's plaintext_size, or, without a
    manifest, past `max_ratio` times the input."""
    with open_regular(infile, "--filein") as source:
        head = source.read(8)
        if head.startswith(b"Salted__"):
            encryption, function = ENCRYPTION["database"], decrypt_openssl
        elif head.startswith(b"AES"):
            encryption, function = ENCRYPTION["files"], decrypt_aescrypt
        elif not head:
            raise Failure(f"{infile} is empty: not a backup")
        else:
            raise Failure(f"{infile} is not an encrypted backup (it starts with neither 'Salted__' nor 'AES')")

        compression = None
        size = os.fstat(source.fileno()).st_size
        limit = int(size * max_ratio)
        if manifest is not None:
            size, digest = sha256_file(source)
            if size != manifest["encrypted_size"]:
                raise Failure(f"{infile} is {size} bytes, its manifest says {manifest['encrypted_size']}: truncated or "
                              "corrupted download")
            if digest != manifest["encrypted_sha256"]:
                raise Failure(f"{infile} does not match its manifest's SHA-256 ({digest}): corrupted download")
            if encryption != manifest["encryption"]:
                raise Failure(f"{infile} is {FORMAT_NAMES[encryption]}, but its manifest says {manifest['encryption']} "
                              f"({manifest['kind']} backup): not the file it describes")
            passphrases = [pick_passphrase(manifest["key_id"], passphrases)]
            compression = manifest.get("compression", "none")
            limit = manifest["plaintext_size"]

        out = Output(outfile, limit)
        try:
            problems = []
            for passphrase in passphrases:
                out.reset()
                try:
                    function(source, out, passphrase, compression)
                    if function is decrypt_openssl and manifest is None:
                        check_looks_like_a_dump(out)
                    break
                except ValueError as exc:
                    problems.append(str(exc))
                except TooLarge:
                    raise Failure(too_large(infile, manifest, size, max_ratio)) from None
            else:
                tried = f" (tried {len(passphrases)} passphrases)" if len(passphrases) > 1 else ""
                raise Failure(f"cannot decrypt {infile}{tried}: {problems[-1]}")
            if manifest is not None and (out.size, out.sha256.hexdigest()) != (manifest["plaintext_size"], manifest["plaintext_sha256"]):
                raise Failure(f"the decrypted data does not match the manifest's plaintext size and SHA-256: {infile} is corrupted")
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # from here the output exists: a signal changes nothing
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            out.publish(force)
        finally:
            out.discard()
    return FORMAT_NAMES[encryption]


def too_large(infile: str, manifest: dict | None, size: int, max_ratio: float) -> str:
    if manifest is not None:
        return (f"{infile} decrypts to more than the {manifest['plaintext_size']} bytes its manifest promises: stopped "
                "there, nothing was written. It is damaged or was planted (a decompression bomb): restore another backup")
    return (f"{infile} decrypts to more than {max_ratio:g} times its own size ({size * max_ratio / 2**20:.0f} MiB) and has no "
            "manifest to say how large it should be: stopped there, nothing was written. A decompression bomb, or a genuine "
            "but very repetitive dump: fetch it with its manifest (fetch_backup.py), or pass a larger --max-ratio")


def use_the_checkouts_venv() -> None:
    """In a checkout (README: python3 -m venv .venv && .venv/bin/pip install -r requirements.txt),
    run again with the venv's Python when this one lacks pyAesCrypt; copied alone, go on."""
    from importlib.util import find_spec

    venv = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".venv")
    python = os.path.join(venv, "bin", "python")
    if (find_spec("pyAesCrypt") is None and os.path.exists(python) and not os.environ.get("BACKUPKIT_REEXECUTED")
            and os.path.realpath(sys.prefix) != os.path.realpath(venv)):
        os.environ["BACKUPKIT_REEXECUTED"] = "1"
        os.execv(python, [python, os.path.abspath(__file__), *sys.argv[1:]])  # noqa: S606 - this script, the checkout's Python


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        use_the_checkouts_venv()
    parser = ArgumentParser(
        prog="decrypt.py", description=__doc__.split("\n\n")[0], epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-i", "--filein", "--infile", dest="infile", required=True, help="encrypted backup file")
    parser.add_argument("-o", "--fileout", "--outfile", dest="outfile", required=True, help="where to write the plaintext (must not exist)")
    parser.add_argument("-p", "--password", help="passphrase (visible to other users: prefer the environment)")
    parser.add_argument("--manifest", help="manifest to check against (default: INFILE.manifest.json when present)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--max-ratio", type=float, default=MAX_RATIO, metavar="N",
                        help=f"without a manifest: stop when the output grows past N times the input (default {MAX_RATIO}; "
                             "a decompression bomb would fill the disk); with one, its plaintext_size is the limit")
    args = parser.parse_args(argv)
    if not args.max_ratio > 0:
        parser.error("--max-ratio must be a positive number")
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if not os.path.lexists(args.infile):
            raise Failure(f"{args.infile}: no such file")
        if os.path.abspath(args.infile) == os.path.abspath(args.outfile):
            raise Failure("--fileout must differ from --filein")
        if os.path.lexists(args.outfile) and not args.force:
            raise Failure(f"{args.outfile} exists: pass --force to replace it, or choose another --fileout")
        if args.password:
            print("warning: --password is visible in the process list; prefer EXTERNAL_BACKUP_ENCRYPTION_KEY", file=sys.stderr)
        if args.manifest and not os.path.lexists(args.manifest):
            raise Failure(f"--manifest {args.manifest}: no such file")
        manifest_path = args.manifest or args.infile + ".manifest.json"
        manifest = read_manifest(manifest_path) if os.path.lexists(manifest_path) else None
        if os.path.abspath(args.outfile) == os.path.abspath(manifest_path):
            raise Failure("--fileout must differ from the manifest")
        if manifest is None:
            print(f"warning: no manifest ({manifest_path}): the integrity of the output cannot be checked; fetch the "
                  "backup with fetch_backup.py to get its manifest", file=sys.stderr)
        kind = decrypt(args.infile, args.outfile, candidate_passphrases(args.password), manifest, args.force, args.max_ratio)
    except Failure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Terminated:
        print("error: terminated (SIGTERM): nothing was written", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("error: interrupted (SIGINT): nothing was written", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}", file=sys.stderr)
        return 1
    checked = " (checked against its manifest)" if manifest else " (NOT checked: no manifest)"
    print(f"decrypted {args.infile} ({kind}) to {args.outfile}{checked}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
