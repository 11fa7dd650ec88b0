"""Progress on stderr: a live line on a terminal, a plain line every few seconds otherwise."""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import TextIO


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_seconds(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Counts bytes (and objects); prints rate and, when the total is known, percent and ETA."""

    def __init__(self, label: str, total_bytes: int | None = None, total_objects: int | None = None,
                 stream: TextIO | None = None):
        self.label = label
        self.total_bytes = total_bytes
        self.total_objects = total_objects
        self.bytes = 0
        self.objects = 0
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()
        self._interval = 0.25 if self._tty else float(os.environ.get("BACKUP_PROGRESS_INTERVAL", "5"))
        self._start = time.monotonic()
        self._last = self._start
        self._lock = threading.Lock()

    def update(self, nbytes: int = 0, objects: int = 0) -> None:
        with self._lock:
            self.bytes += nbytes
            self.objects += objects
            now = time.monotonic()
            if now - self._last >= self._interval:
                self._last = now
                self._print(self._line(now), final=False)

    def _line(self, now: float) -> str:
        elapsed = max(now - self._start, 1e-6)
        rate = self.bytes / elapsed
        text = f"{self.label}: {human_bytes(self.bytes)}"
        if self.total_bytes:
            text += f" of {human_bytes(self.total_bytes)} ({100 * self.bytes / self.total_bytes:.0f}%)"
        if self.total_objects is not None:
            text += f", {self.objects} of {self.total_objects} objects"
        elif self.objects:
            text += f", {self.objects} objects"
        text += f", {human_bytes(rate)}/s"
        if self.total_bytes and rate > 0 and self.bytes < self.total_bytes:
            text += f", ETA {human_seconds((self.total_bytes - self.bytes) / rate)}"
        return text

    def _print(self, text: str, final: bool) -> None:
        if self._tty:
            self._stream.write("\r\033[K" + text + ("\n" if final else ""))
        else:
            self._stream.write(text + "\n")
        self._stream.flush()

    def done(self) -> None:
        with self._lock:
            now = time.monotonic()
            self._print(self._line(now) + f", done in {human_seconds(now - self._start)}", final=True)
