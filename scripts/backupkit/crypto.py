"""Encryptions, one `Encryption` entry each (formats.py puts them in backup formats): openssl
`enc -aes-256-cbc -pbkdf2` for dumps (a pipeline stage), AES Crypt v2 for archives (in process).

Also the passphrase's `key_id` (names a passphrase without revealing it) and the rule that picks
the passphrase a backup needs (`pick_passphrase`, today's entries' `pick_secret`), and `PLAIN_ZIP`,
the identity a local, already decrypted archive is read through (never a backup's format).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, BinaryIO

from .config import child_env
from .errors import Problem, UsageError, VerificationError
from .pipeline import Pipeline, Stage
from .streams import copy
from .threads import DaemonPool

OPENSSL_MAGIC = b"Salted__"
AESCRYPT_MAGIC = b"AES"
ZIP_MAGIC = b"PK\x03\x04"  # a ZIP's first local header: how an already decrypted archive starts
OPENSSL_FORMAT = "openssl-aes-256-cbc-pbkdf2"
AESCRYPT_FORMAT = "aescrypt-v2"
# openssl's own defaults for -pbkdf2 (3.x), spelled out so an older openssl cannot differ.
OPENSSL_CIPHER_ARGS = ["-aes-256-cbc", "-pbkdf2", "-md", "sha256", "-iter", "10000"]
# What openssl enc says when the stage after it stopped reading: that stage's failure is the cause.
OPENSSL_WRITE_FAILED = "error writing output"
# openssl enc reads and writes 8 KiB at a time by default: every 8 KiB is then a pipe wakeup
# and a Python read on our side. The buffer size does not change the output.
OPENSSL_BUFSIZE = 1024 * 1024
# AES Crypt buffer: a multiple of the AES block; 1 MiB keeps Python overhead per byte low.
AESCRYPT_BUFFER = 1024 * 1024
KEY_ID_SALT = b"external-backups key id"
KEY_ID_ITERATIONS = 600_000


def _derive_key_id(passphrase: str) -> str:
    digest = hashlib.pbkdf2_hmac("sha256", passphrase.encode(), KEY_ID_SALT, KEY_ID_ITERATIONS)
    return digest[:8].hex()


# Each key_id is derived once, in the background: PBKDF2 releases the GIL, so its third of a
# second overlaps with listing, downloading or dumping instead of adding to them.
_key_ids: dict[str, Future[str]] = {}
_key_ids_lock = threading.Lock()
_key_id_pool = DaemonPool(max_workers=2, thread_name_prefix="key-id")  # never waited for at exit


def start_key_ids(passphrases: Iterable[str]) -> None:
    """Begin deriving these passphrases' key_ids now; key_id() then waits for the result."""
    for passphrase in passphrases:
        _key_id_future(passphrase)


def _key_id_future(passphrase: str) -> Future[str]:
    with _key_ids_lock:
        future = _key_ids.get(passphrase)
        if future is None:
            future = _key_ids[passphrase] = _key_id_pool.submit(_derive_key_id, passphrase)
        return future


def key_id(passphrase: str) -> str:
    """16 hex chars naming a passphrase; slow on purpose (PBKDF2, 600k rounds)."""
    return _key_id_future(passphrase).result()


def pick_passphrase(wanted_key_id: str, candidates: list[str]) -> str:
    """The candidate whose key_id is the manifest's. Before the one-line rule (config.passphrase)
    a secret stored with a trailing newline got the key_id of passphrase + newline: those backups
    are found too, and get exactly the passphrase they were made with."""
    if not candidates:
        raise VerificationError("no encryption passphrase: set EXTERNAL_BACKUP_ENCRYPTION_KEY", Problem.UNKNOWN_PASSPHRASE)
    for candidate in candidates:
        if key_id(candidate) == wanted_key_id:
            return candidate
    for candidate in candidates:
        if key_id(candidate + "\n") == wanted_key_id:
            return candidate + "\n"
    raise VerificationError(
        f"this backup was encrypted with the passphrase whose key_id is {wanted_key_id}; neither "
        "EXTERNAL_BACKUP_ENCRYPTION_KEY nor EXTERNAL_BACKUP_ENCRYPTION_KEY_PREVIOUS has that key_id "
        f"(they have {', '.join(key_id(c) for c in candidates)}): mistyped, or an older passphrase missing "
        "from EXTERNAL_BACKUP_ENCRYPTION_KEY_PREVIOUS?",
        Problem.UNKNOWN_PASSPHRASE,
    )


def passphrase_pipe(passphrase: str) -> int:
    """A pipe whose read end yields the passphrase, for `openssl -pass fd:N`.

    Returns the read end (pass it with `pass_fds`, close it after the child started).
    """
    data = passphrase.encode() + b"\n"
    if len(data) > 60000:  # stay within the pipe buffer so the write cannot block
        raise UsageError("the encryption passphrase is too long (over 60000 bytes)")
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, data)
    finally:
        os.close(write_end)
    return read_end


def openssl_args(fd: int, decrypt: bool = False) -> list[str]:
    return ["openssl", "enc", *(["-d"] if decrypt else []), *OPENSSL_CIPHER_ARGS, "-bufsize", str(OPENSSL_BUFSIZE), "-pass", f"fd:{fd}"]


def start_openssl(pipeline: Pipeline, passphrase: str, *, decrypt: bool, infile: str | None = None,
                  stdin: Any = subprocess.DEVNULL) -> Stage:
    """The one openssl stage (encrypting or decrypting), passphrase through a pipe, no secret in
    its environment; `infile` to decrypt a file, else it reads `stdin`."""
    fd = passphrase_pipe(passphrase)
    argv = [*openssl_args(fd, decrypt=decrypt), *(["-in", infile] if infile else [])]
    return pipeline.start("openssl", argv, env=child_env(), stdin=stdin, pass_fds=[fd])


class FullReader:
    """Wraps a stream so every read(n) returns n bytes until real end of input.

    pyAesCrypt.encryptStream takes any short read for end of file and would silently truncate
    the archive (with a valid HMAC); pipes and generators return short reads all the time.
    """

    def __init__(self, raw: BinaryIO):
        self._raw = raw

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self._raw.read()
        parts = []
        missing = size
        while missing > 0:
            chunk = self._raw.read(missing)
            if not chunk:
                break
            parts.append(chunk)
            missing -= len(chunk)
        return b"".join(parts)


def aescrypt_encrypt(reader: BinaryIO, writer: Any, passphrase: str, buffer_size: int = AESCRYPT_BUFFER) -> None:
    """AES Crypt v2 from `reader` (which must return full buffers: FullReader) to `writer`."""
    import pyAesCrypt  # here: database-only use never needs it

    pyAesCrypt.encryptStream(reader, writer, passphrase, buffer_size)


def aescrypt_decrypt(reader: BinaryIO, writer: Any, passphrase: str) -> None:
    """AES Crypt v2 from `reader` to `writer`. The HMAC is checked only at the very end: what
    `writer` got means nothing unless this returns."""
    import pyAesCrypt

    try:
        pyAesCrypt.decryptStream(reader, writer, passphrase, AESCRYPT_BUFFER)
    except (ValueError, IndexError) as exc:
        raise VerificationError(f"decryption failed, wrong passphrase or corrupted backup (AES Crypt: {exc})",
                                Problem.UNDECRYPTABLE) from None


def unchanged(reader: BinaryIO, writer: Any, secret: str = "") -> None:
    """PLAIN_ZIP's "decryption": the bytes as they are."""
    copy(reader, writer.write)


@dataclass(frozen=True)
class Encryption:
    """One way of encrypting a backup: `name` is the manifest's "encryption" value, `magic` how
    its files start, `looks_like` what a file that is not one lacks (for the refusal of --file).
    A stream cipher run as a pipeline stage has `start` (and `write_failed`, what it says when
    the stage after it stopped reading: that stage's failure is the cause); one run in process
    has `encrypt` and `decrypt` (reader → writer). `pick_secret(key_id, candidates)` is its rule
    for the secret a backup needs: the manifest's key_id and the secrets given (the passphrases
    of EXTERNAL_BACKUP_ENCRYPTION_KEY and _PREVIOUS, current first) in, the one to decrypt with
    out (or VerificationError, Problem.UNKNOWN_PASSPHRASE); readers hand it to `start` or
    `decrypt` as it is (retrieve.Fetched.secret). `encrypts` is False only for the identity a
    local plaintext is read through (PLAIN_ZIP), which no manifest and no bucket reader accepts."""

    name: str
    magic: bytes
    looks_like: str
    suffix: str = ".encrypted"
    start: Callable[..., Stage] | None = None
    write_failed: str | None = None
    encrypt: Callable[..., None] | None = None
    decrypt: Callable[..., None] | None = None
    pick_secret: Callable[[str, list[str]], str] = pick_passphrase
    encrypts: bool = True


OPENSSL = Encryption(OPENSSL_FORMAT, OPENSSL_MAGIC, "no 'Salted__' header", start=start_openssl,
                     write_failed=OPENSSL_WRITE_FAILED)
AESCRYPT = Encryption(AESCRYPT_FORMAT, AESCRYPT_MAGIC, "AES Crypt", encrypt=aescrypt_encrypt, decrypt=aescrypt_decrypt)
# restore_files.py --file also takes the archive already decrypted (decrypt.py's output): read
# through this identity, checked as any archive is, but never a backup format (formats.register_plain).
PLAIN_ZIP = Encryption("none", ZIP_MAGIC, "a ZIP", suffix="", decrypt=unchanged, encrypts=False)
