"""A second encryption that exists only in tests: `fakecrypt`, a stdlib stream cipher (a SHAKE-256
keystream XORed in, the key derived from the passphrase with PBKDF2 and a salt of its own)
behind a magic of its own, registered in the format registry by `register()` as the default of
both kinds, so new backups are written in it. Not a real cipher: no authentication, made to be
simple; the proof it serves is of the seams, not of the cryptography.

A stream is MAGIC, a 16-byte salt, an 8-byte check of the key (a wrong passphrase is told at
once), then the data XORed with the keystream. Run as a program it is the pipeline stage the
database formats use (`-e` encrypts, `-d` decrypts; the passphrase comes through `--pass-fd N`
as openssl's does, never argv or the environment; `-in FILE` reads a file instead of stdin); the
files format calls `encrypt` and `decrypt` in process. Its rule for the secret (`pick_secret`)
is its own too: by key_id, as openssl's, but without the legacy trailing-newline fallback (a
new encryption has no old backups) and with its own message, so a test can tell which rule ran.

`with_fake_encryption.py` registers it and then runs a script unchanged: the proof that a new
encryption touches the registry and its stage, and no script or reader.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sys
from pathlib import Path

MAGIC = b"FKC1"  # how a fakecrypt stream starts (openssl's is "Salted__", AES Crypt's "AES")
SALT = 16
CHECK = 8
BLOCK = 1 << 16  # keystream block: block j is SHAKE-256(key, j)
ITERATIONS = 20_000
CHUNK = 1 << 20
WRITE_FAILED = "fakecrypt: error writing output"


class Fail(Exception):
    pass


def derive(passphrase: str, salt: bytes) -> tuple[bytes, bytes]:
    key = hashlib.pbkdf2_hmac("sha256", passphrase.encode(), salt, ITERATIONS)
    return key, hmac.new(key, b"fakecrypt check", "sha256").digest()[:CHECK]


class Keystream:
    """XOR with the keystream from its start, whatever the sizes of the pieces."""

    def __init__(self, key: bytes):
        self._key = key
        self._offset = 0

    def _stream(self, start: int, size: int) -> bytes:
        first, last = start // BLOCK, (start + size - 1) // BLOCK
        blocks = b"".join(hashlib.shake_256(self._key + j.to_bytes(8, "big")).digest(BLOCK) for j in range(first, last + 1))
        skip = start - first * BLOCK
        return blocks[skip:skip + size]

    def xor(self, data: bytes) -> bytes:
        if not data:
            return b""
        stream = self._stream(self._offset, len(data))
        self._offset += len(data)
        return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(len(data), "big")


def read_full(reader, size: int) -> bytes:
    parts, missing = [], size
    while missing > 0 and (chunk := reader.read(missing)):
        parts.append(chunk)
        missing -= len(chunk)
    return b"".join(parts)


def encrypt(reader, writer, passphrase: str, buffer_size: int = CHUNK) -> None:
    """In process (the files format's `encrypt`, called as EncryptingSink calls AES Crypt's)."""
    salt = os.urandom(SALT)
    key, check = derive(passphrase, salt)
    writer.write(MAGIC + salt + check)
    stream = Keystream(key)
    while chunk := reader.read(buffer_size):
        writer.write(stream.xor(chunk))


def _opened(reader, passphrase: str) -> Keystream:
    head = read_full(reader, len(MAGIC) + SALT + CHECK)
    if len(head) < len(MAGIC) + SALT + CHECK or not head.startswith(MAGIC):
        raise Fail("fakecrypt: not a fakecrypt stream")
    key, check = derive(passphrase, head[len(MAGIC):len(MAGIC) + SALT])
    if not hmac.compare_digest(check, head[-CHECK:]):
        raise Fail("fakecrypt: wrong passphrase")
    return Keystream(key)


def decrypt(reader, writer, passphrase: str) -> None:
    """In process (the files format's `decrypt`): raises VerificationError as AES Crypt's does."""
    from backupkit.errors import Problem, VerificationError

    try:
        stream = _opened(reader, passphrase)
    except Fail as exc:
        raise VerificationError(f"decryption failed, wrong passphrase or corrupted backup ({exc})",
                                Problem.UNDECRYPTABLE) from None
    while chunk := reader.read(CHUNK):
        writer.write(stream.xor(chunk))


def pick_secret(wanted_key_id: str, candidates: list[str]) -> str:
    """fakecrypt's rule: the candidate whose key_id is the manifest's, nothing else."""
    from backupkit.crypto import key_id
    from backupkit.errors import Problem, VerificationError

    for candidate in candidates:
        if key_id(candidate) == wanted_key_id:
            return candidate
    raise VerificationError(f"fakecrypt: no passphrase given has the key_id {wanted_key_id}", Problem.UNKNOWN_PASSPHRASE)


def start(pipeline, passphrase: str, *, decrypt: bool, infile: str | None = None, stdin=None):
    """The pipeline stage, as crypto.start_openssl: the passphrase through a pipe."""
    import subprocess

    from backupkit.config import child_env
    from backupkit.crypto import passphrase_pipe

    fd = passphrase_pipe(passphrase)
    argv = [sys.executable, str(Path(__file__).resolve()), "-d" if decrypt else "-e", "--pass-fd", str(fd),
            *(["-in", infile] if infile else [])]
    return pipeline.start("fakecrypt", argv, env=child_env(), stdin=subprocess.DEVNULL if stdin is None else stdin,
                          pass_fds=[fd])


def register():
    """Add `fakecrypt` to the registry as the default of both kinds (database: with each of its
    compressions, zstd first). Returns the Formats added."""
    from backupkit import formats
    from backupkit.crypto import Encryption

    fake = Encryption("fakecrypt-v1", MAGIC, "no 'FKC1' header", suffix=".fkc", start=start, write_failed=WRITE_FAILED,
                      encrypt=encrypt, decrypt=decrypt, pick_secret=pick_secret)
    added = [formats.register(formats.Format("files", ".zip", formats.uncompressed("files").compression, fake), default=True)]
    for compression in reversed(formats.compressions("database")):
        added.append(formats.register(formats.Format("database", ".sql", compression, fake), default=True))
    return added


def main(argv: list[str]) -> int:
    mode, fd = argv[0], int(argv[argv.index("--pass-fd") + 1])
    with os.fdopen(fd, "rb") as pipe:
        passphrase = pipe.read().decode()[:-1]  # crypto.passphrase_pipe adds a newline
    source = open(argv[argv.index("-in") + 1], "rb") if "-in" in argv else sys.stdin.buffer
    out = sys.stdout.buffer
    try:
        if mode == "-e":
            encrypt(source, out, passphrase)
        else:
            stream = _opened(source, passphrase)
            while chunk := source.read(CHUNK):
                out.write(stream.xor(chunk))
        out.flush()
    except Fail as exc:
        print(exc, file=sys.stderr)
        return 1
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())  # nothing more to flush at exit
        print(WRITE_FAILED, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
