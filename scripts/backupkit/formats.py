"""Every backup format, in one registry: its kind, its compression (compression.py), its
encryption (crypto.py), the suffix of its key, the manifest fields it adds, and its pipeline in
both directions (`start_writing` here; dump_reader.py and archive_read.py read it back).

Readers find a backup's format here, from its manifest, its key or its first bytes; nothing else
tests "zstd" or a suffix by name. A new compression is a `Compression` entry and one `register`
line (tests/test_lib_formats.py adds one in a test only); a new encryption, an `Encryption` entry
(its stages and its rule for the secret it needs) and its `register` lines, `default=True` to
write new backups in it (tests/test_lib_encryption_seam.py adds one in a test only).

`register_plain` names what a kind's plaintext looks like where a reader accepts it already
decrypted (restore_files.py --file takes a plain ZIP): an identity `Encryption` that no manifest,
key or bucket reader ever accepts.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import IO, Any

from .compression import NONE, ZSTD, Compression
from .crypto import AESCRYPT, OPENSSL, PLAIN_ZIP, Encryption
from .pipeline import Pipeline
from .streams import Tally


@dataclass(frozen=True)
class Format:
    """One backup format: `content` is what the plaintext is (".sql", ".zip")."""

    kind: str
    content: str
    compression: Compression
    encryption: Encryption

    @property
    def suffix(self) -> str:
        return f"{self.content}{self.compression.suffix}{self.encryption.suffix}"

    def manifest_compression(self, compressed: Tally) -> dict[str, Any] | None:
        """What a manifest says of the compression (None: the default for the kind, said by
        manifest.build_manifest): its name and the compressed stream's size and SHA-256."""
        if not self.compression.compresses:
            return None
        size, sha256 = self.compression.manifest_fields
        return {"compression": self.compression.name, size: compressed.size, sha256: compressed.hexdigest()}

    def start_writing(self, pipeline: Pipeline, source: IO[bytes], passphrase: str, level: int | None,
                      plaintext: Tally, compressed: Tally) -> IO[bytes]:
        """The write direction of a stage-run format: `source` (pg_dump's output, counted into
        `plaintext`) → compression (its output counted into `compressed`) → encryption; returns
        the ciphertext stream to upload. The stages' exit statuses: `pipeline.finish()`."""
        assert self.encryption.start is not None, f"{self.encryption.name} is not a pipeline stage"
        encrypt = self.encryption.start(pipeline, passphrase, decrypt=False, stdin=subprocess.PIPE)
        if not self.compression.compresses:
            pipeline.pump(source, encrypt.stdin, plaintext)
        else:
            assert self.compression.start is not None
            compress = self.compression.start(pipeline, level, subprocess.PIPE)
            pipeline.pump(source, compress.stdin, plaintext)
            pipeline.pump(compress.stdout, encrypt.stdin, compressed)
        return encrypt.stdout


_formats: list[Format] = []
_plain: list[Format] = []


def register(fmt: Format, *, default: bool = False) -> Format:
    """Add a format (a kind's first is its default, what new backups are written in; a
    compression's first format names it). `default`: put it first."""
    if not fmt.encryption.encrypts:
        raise ValueError(f"{fmt.encryption.name} does not encrypt: a backup format must (register_plain)")
    if any(f.suffix == fmt.suffix or (f.kind, f.compression.name, f.encryption.name) ==
           (fmt.kind, fmt.compression.name, fmt.encryption.name) for f in _formats):
        raise ValueError(f"a format with suffix {fmt.suffix} or the same kind, compression and encryption exists")
    if default:
        _formats.insert(0, fmt)
    else:
        _formats.append(fmt)
    return fmt


def unregister(fmt: Format) -> None:
    """Take a format out again (a test's own)."""
    _formats.remove(fmt)


def register_plain(fmt: Format) -> Format:
    """Add what `fmt.kind`'s plaintext is when a local file is accepted already decrypted: its
    encryption the identity (`encrypts` False). Never a backup format: no manifest, key or
    bucket reader knows it; only `plain(kind)` hands it out."""
    if fmt.encryption.encrypts or plain(fmt.kind) is not None:
        raise ValueError(f"{fmt.kind}'s plaintext is registered, or {fmt.encryption.name} encrypts")
    _plain.append(fmt)
    return fmt


def plain(kind: str) -> Format | None:
    """The kind's plaintext as a local file may hold it (register_plain), or None."""
    return next((f for f in _plain if f.kind == kind), None)


def all_formats() -> tuple[Format, ...]:
    return tuple(_formats)


def kinds() -> tuple[str, ...]:
    return tuple(dict.fromkeys(f.kind for f in all_formats()))


def of_kind(kind: str) -> list[Format]:
    return [f for f in _formats if f.kind == kind]


def default(kind: str) -> Format:
    """What new `kind` backups are written in (manifest.build_manifest names its encryption)."""
    return of_kind(kind)[0]


def suffixes() -> tuple[str, ...]:
    return tuple(f.suffix for f in all_formats())


def find(kind: str, compression: Any, encryption: Any = None) -> Format | None:
    """The format of `kind` with this compression (and encryption) name, or None. Any value may
    come in (a manifest's field): only a registered name finds one."""
    for f in _formats:
        if f.kind == kind and f.compression.name == compression and encryption in (None, f.encryption.name):
            return f
    return None


def compressions(kind: str = "database") -> list[Compression]:
    """The compressions `kind` can be written with, in the registry's order (the first is the default)."""
    return list({f.compression.name: f.compression for f in of_kind(kind)}.values())


def compression_named(name: str) -> Compression:
    for f in _formats:
        if f.compression.name == name:
            return f.compression
    raise KeyError(name)


def uncompressed(kind: str) -> Format:
    """The kind's format without compression (a manifest without a "compression" field)."""
    return next(f for f in of_kind(kind) if not f.compression.compresses)


def sniff_compression(kind: str, first: bytes) -> Compression:
    """The compression of a plaintext that starts with `first` (a dump without manifest): the one
    whose magic it starts with, else the kind's that does not compress."""
    found = [c for c in compressions(kind) if c.magic and first.startswith(c.magic)]
    return found[0] if found else next(c for c in compressions(kind) if not c.compresses)


def magic_length(kind: str) -> int:
    """How many plaintext bytes `sniff_compression` needs."""
    return max((len(c.magic) for c in compressions(kind) if c.magic), default=0)


def encryptions(kind: str) -> list[Encryption]:
    return list({f.encryption.name: f.encryption for f in of_kind(kind)}.values())


def encryption_named(name: str) -> Encryption:
    for f in _formats:
        if f.encryption.name == name:
            return f.encryption
    raise KeyError(name)


def detect_encryption(head: bytes) -> Encryption | None:
    """The encryption a file that starts with `head` was made with, told by its magic."""
    return next((f.encryption for f in _formats if head.startswith(f.encryption.magic)), None)


MAGIC_READ = 8  # bytes read to tell a file's encryption: the longest magic ("Salted__")

# The order says the defaults: a kind's first format (and compression) is what it is written in.
register(Format("database", ".sql", ZSTD, OPENSSL))
register(Format("database", ".sql", NONE, OPENSSL))
register(Format("files", ".zip", NONE, AESCRYPT))
register_plain(Format("files", ".zip", NONE, PLAIN_ZIP))
