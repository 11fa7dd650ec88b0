"""The zstd stage of database backups: the stock `zstd` command, run like openssl (a process of
its own, on another core), so what it writes is what `zstd -d` reads anywhere."""

from __future__ import annotations

import os
import subprocess
from typing import Any

from .config import child_env
from .pipeline import Pipeline, Stage

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # every zstd frame starts with it
INSTALL_HINT = "install the zstd package (apt-get install zstd), or set ZSTD to its path"


def zstd_binary() -> str:
    return os.environ.get("ZSTD") or "zstd"


def start_zstd(pipeline: Pipeline, *, level: int | None = None, stdin: Any = subprocess.PIPE) -> Stage:
    """`zstd -d` when `level` is None, else compression at `level`; stdin → stdout. zstd writes a
    checksum of the content into each frame and checks it when decompressing."""
    mode = ["-d"] if level is None else [f"-{level}", "--no-progress"]
    return pipeline.start("zstd", [zstd_binary(), *mode, "-q", "-c"], env=child_env(), stdin=stdin,
                          missing_hint=INSTALL_HINT)
