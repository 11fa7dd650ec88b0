"""Reading a downloaded backup back through decryption and checking its content, without writing
any plaintext to disk: the dump's completion trailer, or the ZIP's members and directory."""

from __future__ import annotations

from typing import Any

from . import config, crypto
from .errors import VerificationError
from .pipeline import Pipeline, Tally, copy
from .postgres import TRAILER_WINDOW, has_trailer
from .retrieve import check_plaintext
from .zipcheck import ZipStreamChecker


class Tail:
    """A sink that keeps only the last `size` bytes written."""

    def __init__(self, size: int = TRAILER_WINDOW):
        self.size = size
        self.data = b""

    def write(self, chunk: bytes) -> int:
        self.data = (self.data + chunk[-self.size:])[-self.size:]
        return len(chunk)


def verify_dump(path: str, passphrase: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """openssl -d into a hashing sink; then the plaintext hash and pg_dump's trailer."""
    plaintext = Tally()
    tail = Tail()
    with Pipeline() as pipeline:
        fd = crypto.passphrase_pipe(passphrase)
        decrypt = pipeline.start("openssl", [*crypto.openssl_args(fd, decrypt=True), "-in", path],
                                 env=config.child_env(), pass_fds=[fd])
        copy(decrypt.stdout, tail.write, plaintext)
        if decrypt.wait() != 0:
            raise VerificationError(f"decryption failed, wrong passphrase or corrupted backup ({decrypt.describe_failure()})")
    check_plaintext(plaintext, manifest, "dump")
    if not has_trailer(tail.data):
        raise VerificationError("the dump is incomplete: pg_dump's completion trailer is missing")
    return {"plaintext_size": plaintext.size, "trailer": True}


class _HashingZipSink:
    """pyAesCrypt's output: hashed and parsed as it goes, never stored."""

    def __init__(self) -> None:
        self.tally = Tally()
        self.checker = ZipStreamChecker()

    def write(self, data: bytes) -> int:
        self.tally.update(data)
        return self.checker.write(data)


def verify_archive(path: str, passphrase: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """AES Crypt decryption (HMAC checked at its end) into the ZIP checker; then the plaintext
    hash, the ZIP's directory and CRCs, and the member count against the manifest."""
    import pyAesCrypt  # here, so database-only use does not need it

    sink = _HashingZipSink()
    with open(path, "rb") as source:
        try:
            pyAesCrypt.decryptStream(source, sink, passphrase, crypto.AESCRYPT_BUFFER)
        except ValueError as exc:
            raise VerificationError(f"decryption failed, wrong passphrase or corrupted backup (AES Crypt: {exc})") from None
    check_plaintext(sink.tally, manifest, "archive")
    summary = sink.checker.finish()
    expected = manifest.get("source", {}).get("object_count")
    if expected is not None and summary.count != expected:
        raise VerificationError(f"the ZIP holds {summary.count} members, the manifest says {expected} objects: incomplete archive")
    return {"plaintext_size": sink.tally.size, "members": summary.count, "member_bytes": summary.total_bytes}


def verify_file(path: str, passphrase: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Check one downloaded (already size- and hash-checked) backup by its encryption format."""
    with open(path, "rb") as handle:
        found = crypto.detect_format(handle.read(8))
    wanted = manifest["encryption"]
    if found != wanted:
        raise VerificationError(f"the object is not in the manifest's format {wanted} (it looks like {found or 'neither format'})")
    if wanted == crypto.OPENSSL_FORMAT:
        return verify_dump(path, passphrase, manifest)
    return verify_archive(path, passphrase, manifest)
