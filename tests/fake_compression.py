"""A second compression that exists only in tests: `fakez`, a stdlib filter program (zlib behind a
magic of its own), registered in the format registry by `register()`.

Run as a program it is the filter (`-N` compresses at level N, `-d` decompresses, stdin →
stdout). `with_fake_compression.py` registers it and then runs a script unchanged: the proof
that a new compression touches the registry and its stage, and no script.
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

MAGIC = b"FKZ1"  # how a fakez stream starts (zstd's is 28 b5 2f fd)
CHUNK = 1 << 20


def compress(level: int) -> None:
    out = sys.stdout.buffer
    packer = zlib.compressobj(level)
    out.write(MAGIC)
    while chunk := sys.stdin.buffer.read1(CHUNK):
        out.write(packer.compress(chunk))
    out.write(packer.flush())


def decompress() -> int:
    out = sys.stdout.buffer
    head = sys.stdin.buffer.read(len(MAGIC))
    if head != MAGIC:
        print("fakez: not a fakez stream", file=sys.stderr)
        return 1
    unpacker = zlib.decompressobj()
    try:
        while chunk := sys.stdin.buffer.read1(CHUNK):
            out.write(unpacker.decompress(chunk))
        out.write(unpacker.flush())
    except zlib.error as exc:
        print(f"fakez: corrupted stream ({exc})", file=sys.stderr)
        return 1
    if not unpacker.eof:
        print("fakez: the stream ends early", file=sys.stderr)
        return 1
    return 0


def register():
    """Add `fakez` to the registry: a Compression entry and one database Format. Returns the Format."""
    from backupkit import formats
    from backupkit.compression import COMPRESSED_FIELDS, Compression
    from backupkit.config import child_env
    from backupkit.crypto import OPENSSL

    def start(pipeline, level, stdin):
        mode = ["-d"] if level is None else [f"-{level}"]
        return pipeline.start("fakez", [sys.executable, str(Path(__file__).resolve()), *mode], env=child_env(), stdin=stdin)

    fakez = Compression("fakez", ".fz", start, magic=MAGIC, levels=range(1, 10), manifest_fields=COMPRESSED_FIELDS)
    return formats.register(formats.Format("database", ".sql", fakez, OPENSSL))


if __name__ == "__main__":
    if sys.argv[1:] == ["-d"]:
        sys.exit(decompress())
    compress(int(sys.argv[1].lstrip("-")))
