"""Watching a script from the outside while it runs, for the security and fault tests.

- `ProcWatch` polls the argv and environment of every descendant process (via /proc, psutil).
- `SpyBin` puts wrappers named pg_dump/psql/openssl first, which record their exact argv and
  environment before exec'ing the real program: even a child that lives for a millisecond is seen.
- `DirWatch` polls directories for files (their modes) and for a marker string in their content.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import psutil

from dev.measure import Poller

WATCHED = ("pg_dump", "psql", "openssl")


def _comm(pid: int) -> str:
    """The process's name as the kernel has it now (/proc/PID/comm, set by exec; psutil caches
    name(), so it cannot tell an exec between two reads)."""
    with open(f"/proc/{pid}/comm") as handle:
        return handle.read().rstrip("\n")


@dataclass(frozen=True)
class Seen:
    pid: int
    name: str
    cmdline: tuple[str, ...]
    environ: tuple[tuple[str, str], ...]

    @property
    def env(self) -> dict[str, str]:
        return dict(self.environ)


class ProcWatch(Poller):
    """Snapshots of every descendant of `pid`, taken every `interval` seconds until stop()."""

    def __init__(self, pid: int, interval: float = 0.003):
        super().__init__(interval)
        self.root = psutil.Process(pid)
        self.seen: set[Seen] = set()
        self.pids: set[int] = set()
        self._procs: dict[int, psutil.Process] = {}

    def poll(self) -> None:
        try:
            children = self.root.children(recursive=True)
        except psutil.Error:
            return
        for proc in children:
            try:
                before = _comm(proc.pid)
                cmdline = tuple(proc.cmdline())
                environ = tuple(sorted(proc.environ().items()))
                name = proc.name()
                if _comm(proc.pid) != before:
                    continue  # it exec'd while being read: argv and environment may be either program's
            except (psutil.Error, OSError):
                continue
            if not cmdline or not environ:
                # Exiting: /proc no longer shows argv or environment (our children always get at
                # least PATH). The spy wrappers record every child's real environment anyway.
                continue
            self.pids.add(proc.pid)
            self._procs.setdefault(proc.pid, proc)
            self.seen.add(Seen(proc.pid, name, cmdline, environ))

    def programs(self, name: str) -> list[Seen]:
        """Snapshots of processes that exec'd `name` (not the forked copy of Python before exec)."""
        return [s for s in self.seen if s.name == name or (s.cmdline and os.path.basename(s.cmdline[0]) == name)]

    def alive(self) -> list[str]:
        """Descendants seen during the run that still exist (orphans), as 'pid name'."""
        out = []
        for pid, proc in self._procs.items():
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    out.append(f"{pid} {proc.name()} {' '.join(proc.cmdline())}")
            except psutil.Error:
                continue
        return out

    def wait_for(self, name: str, timeout: float = 30) -> psutil.Process | None:
        """The first running descendant that exec'd `name`."""
        end = self._stop.wait  # just a sleep that ends early on stop()
        for _ in range(int(timeout / 0.01)):
            try:
                for proc in self.root.children(recursive=True):
                    if proc.name() == name:
                        return proc
            except psutil.Error:
                pass
            end(0.01)
        return None


@dataclass
class Record:
    program: str
    argv: list[str]
    env: dict[str, str]


class SpyBin:
    """A directory of wrappers that log argv and environment, then exec the real program."""

    def __init__(self, directory: Path, real: dict[str, str]):
        self.dir = directory / "bin"
        self.log = directory / "log"
        self.dir.mkdir(mode=0o700, parents=True)
        self.log.mkdir(mode=0o700)
        for name, target in real.items():
            wrapper = self.dir / name
            wrapper.write_text(
                "#!/bin/sh\n"
                f'n="{self.log}/{name}.$$"\n'
                'cat /proc/$$/environ > "$n.env"\n'
                'for a in "$0" "$@"; do printf "%s\\0" "$a"; done > "$n.argv"\n'
                f'exec "{target}" "$@"\n'
            )
            wrapper.chmod(0o755)

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def records(self) -> list[Record]:
        out = []
        for argv_file in sorted(self.log.glob("*.argv")):
            program = argv_file.name.split(".")[0]
            env_file = argv_file.with_suffix(".env")
            argv = argv_file.read_bytes().decode(errors="replace").split("\0")[:-1]
            env = dict(item.split("=", 1) for item in env_file.read_bytes().decode(errors="replace").split("\0") if "=" in item)
            out.append(Record(program, argv, env))
        return out


class DirWatch(Poller):
    """Polls directories: every path seen with its mode, and any file whose content held `marker`."""

    def __init__(self, directories: list[Path], marker: bytes | None = None, interval: float = 0.005):
        super().__init__(interval)
        self.directories = directories
        self.marker = marker
        self.modes: dict[str, int] = {}
        self.with_marker: set[str] = set()

    def poll(self) -> None:
        for top in self.directories:
            for root, dirs, files in os.walk(top):
                for name in dirs + files:
                    path = os.path.join(root, name)
                    try:
                        mode = os.lstat(path).st_mode
                    except OSError:
                        continue
                    self.modes[path] = mode
                    if self.marker and stat.S_ISREG(mode):
                        try:
                            with open(path, "rb") as handle:
                                if self.marker in handle.read():
                                    self.with_marker.add(path)
                        except OSError:
                            pass

    def bad_modes(self) -> list[str]:
        """Paths that were not 0700 directories or 0600 files."""
        out = []
        for path, mode in self.modes.items():
            wanted = 0o700 if stat.S_ISDIR(mode) else 0o600
            if stat.S_IMODE(mode) != wanted:
                out.append(f"{path} {oct(stat.S_IMODE(mode))}")
        return out
