"""dev.measure.TreeMemory, which the memory bounds of the tests and the bench rely on: a tree's
memory is counted once, whatever the sampler catches the tree doing."""

from __future__ import annotations

import subprocess
import sys
import time

from dev.measure import TreeMemory

MIB = 1024 * 1024

# A parent holding 60 MiB that either starts a child which execs and allocates 40 MiB of its own,
# or forks a child that never execs (what every spawn looks like between fork and exec).
PARENT = """
import os, subprocess, sys, time
held = bytearray(60 * 1024 * 1024)
for i in range(0, len(held), 4096):
    held[i] = 1
if sys.argv[1] == "exec":
    child = subprocess.Popen([sys.executable, "-c",
        "b = bytearray(40 * 1024 * 1024)\\nfor i in range(0, len(b), 4096): b[i] = 1\\nimport time; time.sleep(1.5)"])
    child.wait()
else:
    pid = os.fork()
    if pid == 0:
        time.sleep(1.5)
        os._exit(0)
    os.waitpid(pid, 0)
"""


def peak_tree_mib(mode: str) -> float:
    proc = subprocess.Popen([sys.executable, "-c", PARENT, mode])
    with TreeMemory(proc.pid, interval=0.02) as memory:
        proc.wait(timeout=60)
        time.sleep(0.05)
    assert proc.returncode == 0
    return memory.peak_tree_kib / 1024


def test_a_child_that_execs_is_counted():
    assert peak_tree_mib("exec") >= 60 + 40


def test_a_fork_that_has_not_exec_d_is_not_counted_twice():
    assert 60 <= peak_tree_mib("fork") < 60 + 40
