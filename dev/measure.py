"""Memory measurement for tests and benchmarks.

`ru_maxrss` from wait4() is useless here: Linux carries the high-water mark across fork+exec, so
a child forked from a large process (pytest holding an in-process S3 server) reports the
parent's size. VmHWM in /proc/PID/status belongs to the process's own address space (reset at
exec), and the tree's summed RSS is sampled while it runs.
"""

from __future__ import annotations

import threading

import psutil


def _hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Poller:
    """A thread that calls `poll()` every `interval` seconds from start() (or `with`) until stop(),
    and once more when stopped: the shape of every watcher the tests and the bench use."""

    def __init__(self, interval: float):
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)

    def start(self) -> Poller:
        self._thread.start()
        return self

    def stop(self) -> Poller:
        self._stop.set()
        self._thread.join()
        self.poll()
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.interval)

    def poll(self) -> None:
        raise NotImplementedError


class TreeMemory(Poller):
    """Samples a process and its descendants until stopped.

    `peak_process_kib`: the largest VmHWM any process of the tree reached (the script itself).
    `peak_tree_kib`: the largest sum of RSS over the tree at one sample.

    A child caught between fork and exec (still running its parent's command line) shares its
    parent's pages and would count them twice: a sample landing in that window once reported
    119 MiB for a tree of 96. It is left out of the sum; every child in the trees measured here
    execs (subprocess), and what it allocates after exec is counted.
    """

    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(interval)
        self.pid = pid
        self.peak_process_kib = 0
        self.peak_tree_kib = 0
        self.per_name: dict[str, int] = {}
        try:
            self._root: psutil.Process | None = psutil.Process(pid)
        except psutil.NoSuchProcess:
            self._root = None

    def poll(self) -> None:
        if self._root is None:
            return
        try:
            procs = [self._root, *self._root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        cmdlines: dict[int, list[str]] = {}
        for proc in procs:
            try:
                cmdlines[proc.pid] = proc.cmdline()
            except psutil.Error:
                continue
        total = 0
        for proc in procs:
            try:
                rss = proc.memory_info().rss // 1024
                name = proc.name()
                parent = proc.ppid()
            except psutil.Error:
                continue
            if proc is not self._root and parent in cmdlines and cmdlines.get(proc.pid) == cmdlines[parent]:
                continue  # forked, not exec'd yet: its pages are its parent's
            total += rss
            hwm = _hwm_kib(proc.pid)
            self.peak_process_kib = max(self.peak_process_kib, hwm)
            self.per_name[name] = max(self.per_name.get(name, 0), hwm)
        self.peak_tree_kib = max(self.peak_tree_kib, total)
