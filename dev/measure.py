"""Memory measurement for tests and benchmarks.

`ru_maxrss` from wait4() is useless here: Linux carries the high-water mark across fork+exec, so
a child forked from a large process (pytest holding an in-process S3 server) reports the
parent's size. VmHWM in /proc/PID/status belongs to the process's own address space (reset at
exec), and the tree's summed RSS is sampled while it runs.
"""

from __future__ import annotations

import threading
import time

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


class TreeMemory:
    """Samples a process and its descendants until stopped.

    `peak_process_kib`: the largest VmHWM any process of the tree reached (the script itself).
    `peak_tree_kib`: the largest sum of RSS over the tree at one sample.
    """

    def __init__(self, pid: int, interval: float = 0.1):
        self.pid = pid
        self.interval = interval
        self.peak_process_kib = 0
        self.peak_tree_kib = 0
        self.per_name: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for proc in procs:
                try:
                    rss = proc.memory_info().rss // 1024
                    name = proc.name()
                except psutil.Error:
                    continue
                total += rss
                hwm = _hwm_kib(proc.pid)
                self.peak_process_kib = max(self.peak_process_kib, hwm)
                self.per_name[name] = max(self.per_name.get(name, 0), hwm)
            self.peak_tree_kib = max(self.peak_tree_kib, total)
            time.sleep(self.interval)
