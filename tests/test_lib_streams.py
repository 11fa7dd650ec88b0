"""Bytes between stages: tee_pipes (the kernel copies, we hash) and Pipeline.pump, with real
processes at both ends of real pipes."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import io
import os
import subprocess

import pytest

from backupkit import streams
from backupkit.config import child_env
from backupkit.pipeline import Pipeline
from backupkit.streams import PIPE_SIZE, Tally, is_pipe, tee_pipes


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def data(tmp_path):
    # Several pipe-fulls, not a multiple of any buffer, so tee and the reads end on odd sizes.
    payload = os.urandom(5 * PIPE_SIZE + 12_345)
    path = tmp_path / "in.bin"
    path.write_bytes(payload)
    return payload, path


class _NoTee:
    """libc as a sandbox that refuses tee(2) shows it."""

    def tee(self, *_args) -> int:
        ctypes.set_errno(errno.ENOSYS)
        return -1


def test_tee_pipes_passes_every_byte_and_hashes_it(data, tmp_path):
    payload, path = data
    out = tmp_path / "out.bin"
    producer = subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE)
    with open(out, "wb") as sink:
        consumer = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=sink)
    before = open_fds()
    tally = Tally()
    count = tee_pipes(os.dup(producer.stdout.fileno()), os.dup(consumer.stdin.fileno()), tally)
    assert open_fds() == before  # both duplicates closed
    producer.stdout.close()
    consumer.stdin.close()
    assert producer.wait() == 0 and consumer.wait() == 0
    assert count == len(payload) == tally.size
    assert tally.hexdigest() == hashlib.sha256(payload).hexdigest()
    assert out.read_bytes() == payload


def test_tee_pipes_refused_copies_nothing_and_says_so(data, monkeypatch):
    monkeypatch.setattr(streams, "_libc", _NoTee())
    _, path = data
    producer = subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE)
    read, write = os.pipe()
    before = open_fds()
    tally = Tally()
    assert tee_pipes(os.dup(producer.stdout.fileno()), os.dup(write), tally) is None
    assert open_fds() == before and tally.size == 0
    os.close(write)
    with os.fdopen(read, "rb") as nothing:
        assert nothing.read() == b""
    producer.stdout.close()
    producer.wait()


def test_tee_pipes_raises_broken_pipe_when_the_reader_is_gone(data):
    _, path = data
    producer = subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE)
    consumer = subprocess.Popen(["head", "-c", "1000"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    before = open_fds()
    with pytest.raises(BrokenPipeError):
        tee_pipes(os.dup(producer.stdout.fileno()), os.dup(consumer.stdin.fileno()), Tally())
    assert open_fds() == before
    producer.stdout.close()  # as the pump does: the writer then dies of SIGPIPE, never blocks
    consumer.stdin.close()
    assert consumer.wait() == 0
    assert producer.wait(timeout=10) != 0


def test_is_pipe():
    read, write = os.pipe()
    with os.fdopen(read, "rb") as r, os.fdopen(write, "wb") as w:
        assert is_pipe(r) and is_pipe(w)
    assert not is_pipe(io.BytesIO(b"x"))
    with open(os.devnull, "rb") as null:
        assert not is_pipe(null)


@pytest.mark.parametrize("through", ["pipe", "pipe, tee refused", "python object"])
def test_pump_between_stages_hashes_and_delivers(data, tmp_path, monkeypatch, through):
    if through == "pipe, tee refused":  # read + write instead, nothing lost
        monkeypatch.setattr(streams, "_libc", _NoTee())
    payload, path = data
    out = tmp_path / "out.bin"
    tally = Tally()
    with Pipeline() as pipeline:
        if through.startswith("pipe"):
            src = pipeline.start("cat-in", ["cat", str(path)], env=child_env()).stdout
        else:
            src = io.BufferedReader(io.BytesIO(payload))  # not a pipe: read and written by Python
        sink = pipeline.start("cat-out", ["sh", "-c", f'cat > "{out}"'], env=child_env(), stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL)
        pipeline.pump(src, sink.stdin, tally)
        pipeline.finish()
    assert out.read_bytes() == payload
    assert tally.size == len(payload) and tally.hexdigest() == hashlib.sha256(payload).hexdigest()


def test_pump_stops_the_writer_when_the_reader_dies(data):
    _, path = data
    with Pipeline() as pipeline:
        writer = pipeline.start("yes", ["yes"], env=child_env())  # never ends by itself
        reader = pipeline.start("head", ["head", "-c", "100000"], env=child_env(), stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL)
        pipeline.pump(writer.stdout, reader.stdin, Tally())
        pipeline.join_pumps()  # returns: the reader's death reached the pump
        assert reader.wait() == 0
        assert writer.wait() == -13  # SIGPIPE: the pump closed its end, nobody blocks

