"""The compression stages of database backups, one `Compression` entry each (formats.py puts them
in backup formats): zstd, the stock `zstd` command run like openssl (a process of its own, on
another core), so what it writes is what `zstd -d` reads anywhere; and none, the original format.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .config import child_env
from .errors import BackupError
from .pipeline import Pipeline, Stage

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # every zstd frame starts with it
INSTALL_HINT = "install the zstd package (apt-get install zstd), or set ZSTD to its path"
LEVELS = range(1, 20)  # zstd's regular levels (20-22 need --ultra and much more memory)
# The level with the fastest backup on an application-like dump: zstd runs beside pg_dump on
# another core, and at this level it keeps up with pg_dump while cutting the bytes that openssl
# encrypts and S3 receives to about a third. Measured (bench/RESULTS.md, section `compression`):
# level 1 5.2 s and 2.71 ×, level 2 5.4 s and 2.92 ×, level 3 6.2 s, level 6 11.3 s.
DEFAULT_LEVEL = 1

# A stage: (pipeline, level or None to decompress, its stdin) → the started process.
StartStage = Callable[[Pipeline, "int | None", Any], Stage]


@dataclass(frozen=True)
class Compression:
    """One way of compressing a dump between pg_dump and the encryption.

    `name` is the manifest's "compression" value and `suffix` its part of the key (".zst");
    `start` runs the stage (None: no stage at all); `magic` is how its stream starts, to tell a
    dump without a manifest; `manifest_fields` are what a manifest of it records besides the
    SQL's size and SHA-256 (the compressed stream's)."""

    name: str
    suffix: str = ""
    start: StartStage | None = None
    check: Callable[[], None] = lambda: None  # before anything starts: the command is there
    magic: bytes | None = None
    levels: range | None = None
    manifest_fields: tuple[str, ...] = field(default=())

    @property
    def compresses(self) -> bool:
        return self.start is not None

    def describe(self, level: int | None) -> str:
        """How the backup line names it: "zstd -1"; "" when it does not compress."""
        return f"{self.name} -{level}" if self.compresses and level is not None else ""


def zstd_binary() -> str:
    return os.environ.get("ZSTD") or "zstd"


def check_zstd() -> None:
    """Before anything starts: the zstd command is there."""
    if shutil.which(zstd_binary()) is None:
        raise BackupError(f"zstd: command not found: {zstd_binary()} ({INSTALL_HINT}; or back up with --compression none)")


def start_zstd(pipeline: Pipeline, level: int | None = None, stdin: Any = subprocess.PIPE) -> Stage:
    """`zstd -d` when `level` is None, else compression at `level`; stdin → stdout. zstd writes a
    checksum of the content into each frame and checks it when decompressing."""
    # --single-thread (zstd 1.4 and later): one thread for I/O and compression. zstd's default also starts an I/O thread
    # and buffers for it: 16 MiB of memory instead of 4, and more CPU, for no gain while pg_dump
    # is slower than zstd -1 anyway (bench/RESULTS.md, "compression").
    mode = ["-d"] if level is None else [f"-{level}", "--single-thread", "--no-progress"]
    return pipeline.start("zstd", [zstd_binary(), *mode, "-q", "-c"], env=child_env(), stdin=stdin,
                          missing_hint=INSTALL_HINT)


COMPRESSED_FIELDS = ("compressed_size", "compressed_sha256")  # the stream the encryption got
ZSTD = Compression("zstd", ".zst", start_zstd, check_zstd, ZSTD_MAGIC, LEVELS, COMPRESSED_FIELDS)
NONE = Compression("none")
