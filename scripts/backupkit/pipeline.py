"""Subprocess pipelines: start stages, connect them, read their stderr, wait, and fail loudly.

`Pipeline` owns every process it starts: on leaving its `with` block with an error, every stage
still running is terminated (psql's transaction then rolls back). `finish()` waits for all stages
and raises a BackupError naming the first command that failed, its exit status and its stderr.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import threading
from collections.abc import Sequence
from typing import IO, Any

from . import signals
from .errors import BackupError
from .streams import Tally, copy, enlarge_pipe, is_pipe, tee_pipes

STDERR_TAIL = 64 * 1024  # keep this much of a stage's stderr for its error message


class Stage:
    """One running command whose stderr is collected by a thread."""

    def __init__(self, name: str, argv: Sequence[str], proc: subprocess.Popen):
        self.name = name
        self.argv = list(argv)
        self.proc = proc
        self._stderr: collections.deque[bytes] = collections.deque()
        self._stderr_size = 0
        self._reader = threading.Thread(target=self._read_stderr, name=f"{name}-stderr", daemon=True)
        self._reader.start()

    @property
    def stdin(self) -> IO[bytes]:
        return self.proc.stdin

    @property
    def stdout(self) -> IO[bytes]:
        return self.proc.stdout

    def _read_stderr(self) -> None:
        # Lines are read at most STDERR_TAIL bytes at a time: a stage echoing a huge planted
        # string back (psql quoting a statement) cannot grow memory.
        for line in iter(lambda: self.proc.stderr.readline(STDERR_TAIL), b""):
            self._stderr.append(line)
            self._stderr_size += len(line)
            while self._stderr_size > STDERR_TAIL and len(self._stderr) > 1:
                self._stderr_size -= len(self._stderr.popleft())
        self.proc.stderr.close()

    def stderr_text(self) -> str:
        self._reader.join(timeout=5)
        return b"".join(self._stderr).decode("utf-8", "replace").strip()

    def wait(self) -> int:
        code = self.proc.wait()
        self._reader.join(timeout=5)
        return code

    def describe_failure(self) -> str:
        code = self.proc.returncode
        status = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        stderr = self.stderr_text()
        detail = f": {stderr.splitlines()[-1] if len(stderr) > 300 else stderr}" if stderr else ""
        return f"{self.name} failed ({status}){detail}".replace("\n", " | ")

    def terminate(self, grace: float = 5.0) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=signals.time_left(grace))  # after a signal, within the run's exit bound
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Pipeline:
    """Stages started in order; `pump()` connects two of them through Python (to hash bytes)."""

    def __init__(self) -> None:
        self.stages: list[Stage] = []
        self._pumps: list[threading.Thread] = []
        self._pump_errors: list[BaseException] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str],
        stdin: Any = subprocess.DEVNULL,
        stdout: Any = subprocess.PIPE,
        pass_fds: Sequence[int] = (),
        missing_hint: str = "install it or put it on PATH",
    ) -> Stage:
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=stdin,
                stdout=stdout,
                stderr=subprocess.PIPE,
                env=env,
                pass_fds=tuple(pass_fds),
                # Own process group: a Ctrl-C in the terminal reaches us, and we stop the
                # stages in order. No code runs in the child between fork and exec: if we are
                # killed outright, our pipes close and each stage ends on EOF or EPIPE (the
                # restore's psql then ends outside a COMMIT of ours, which rolls it back).
                start_new_session=True,
            )
        except FileNotFoundError:
            raise BackupError(f"{name}: command not found: {argv[0]} ({missing_hint})") from None
        finally:
            for fd in pass_fds:
                os.close(fd)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                enlarge_pipe(pipe.fileno())
        stage = Stage(name, argv, proc)
        self.stages.append(stage)
        return stage

    def pump(self, src: IO[bytes], dst: IO[bytes], tally: Tally | None = None) -> None:
        """Copy src → dst in a thread (hashing on the way), then close both: when the reader
        died, closing src passes the failure upstream (the writer gets SIGPIPE instead of
        blocking on a full pipe forever), and finish() names the stage that really failed."""

        # Pipe to pipe, the kernel copies (tee_pipes) on descriptors of the thread's own: the
        # streams' buffers are bypassed, which is safe as nothing else ever uses them.
        fds = (os.dup(src.fileno()), os.dup(dst.fileno())) if tally is not None and is_pipe(src) and is_pipe(dst) else None

        def run() -> None:
            try:
                if fds is None or tee_pipes(*fds, tally) is None:  # None: tee(2) refused, nothing copied yet
                    copy(src, dst.write, tally)
            except BrokenPipeError:
                pass  # the reader died: its own exit status tells why
            except BaseException as exc:  # noqa: BLE001 - re-raised by finish()
                self._pump_errors.append(exc)
            finally:
                for end in (dst, src):
                    try:
                        end.close()
                    except OSError:
                        pass

        thread = threading.Thread(target=run, name="pump", daemon=True)
        thread.start()
        self._pumps.append(thread)

    def join_pumps(self) -> None:
        """Wait for the pump threads; raise what one of them raised."""
        for thread in self._pumps:
            thread.join()
        if self._pump_errors:
            raise self._pump_errors[0]

    def finish(self) -> None:
        """Wait for every stage; raise for the first that failed (a stage killed by SIGPIPE
        only because a later one died is not the cause)."""
        for thread in self._pumps:
            thread.join()
        for stage in self.stages:
            stage.wait()
        failed = [s for s in self.stages if s.proc.returncode != 0]
        causes = [s for s in failed if s.proc.returncode != -signal.SIGPIPE] or failed
        if causes:
            raise BackupError(causes[0].describe_failure())
        if self._pump_errors:
            raise self._pump_errors[0]

    def terminate(self) -> None:
        # Kill first, close pipes after: a stage that saw EOF on its input before dying would
        # take it for the end of its input.
        for stage in self.stages:
            stage.terminate()
        for stage in self.stages:
            for pipe in (stage.proc.stdin, stage.proc.stdout):
                if pipe:
                    try:
                        pipe.close()
                    except OSError:
                        pass

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.terminate()
