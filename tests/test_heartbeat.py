"""Heartbeats from the scripts to a dead-man's-switch monitor: a local HTTP server stands in for
healthchecks.io. Start, then success or fail with the error line; the URL (it carries a token)
is never printed; a dead or slow monitor costs seconds and never changes the result."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import error_lines


@dataclass
class Ping:
    method: str
    path: str
    body: str


class Monitor:
    """A healthchecks.io stand-in. `delay`: each answer waits this long (only the ping to `hold`,
    e.g. "/" for success, when given; `arrived[path]` is set when a ping comes). `trickle`: the
    answer is sent one byte every that many seconds, as a monitor that is barely alive would."""

    def __init__(self, delay: float = 0.0, hold: str | None = None, trickle: float | None = None):
        self.pings: list[Ping] = []
        self.token = f"hc-{os.urandom(8).hex()}"
        self.arrived: dict[str, threading.Event] = {p: threading.Event() for p in ("/start", "/", "/fail")}
        monitor = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                length = int(self.headers.get("Content-Length") or 0)
                ping = Ping(self.command, self.path, self.rfile.read(length).decode() if length else "")
                monitor.pings.append(ping)
                path = monitor.path_of(ping)
                monitor.arrived.setdefault(path, threading.Event()).set()
                if hold is None or path == hold:
                    time.sleep(delay)
                answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK"
                if trickle is None:
                    self.wfile.write(answer)
                    return
                for byte in answer:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(trickle)

            do_POST = do_GET

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False  # a slow answer still sleeping does not hold up the test
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/ping/{self.token}"

    def path_of(self, ping: Ping) -> str:
        return ping.path.removeprefix(f"/ping/{self.token}") or "/"

    def paths(self) -> list[str]:
        return [self.path_of(p) for p in self.pings]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def monitor():
    server = Monitor()
    yield server
    server.close()


def test_a_good_run_pings_start_then_success(run, pg, sample_db, monitor):
    done = run("backup_database.py", env={"DATABASE_URL": pg.url(sample_db), "BACKUP_HEARTBEAT_URL": monitor.url})
    assert done.returncode == 0, done.stderr
    assert monitor.paths() == ["/start", "/"]
    assert [p.method for p in monitor.pings] == ["GET", "GET"]
    assert monitor.token not in done.stdout + done.stderr
    # The flag works as the variable does.
    monitor.pings.clear()
    done = run("list_backups.py", "--heartbeat-url", monitor.url)
    assert done.returncode == 0, done.stderr
    assert monitor.paths() == ["/start", "/"]


@pytest.mark.parametrize(("script", "args", "env"), [
    pytest.param("list_backups.py", ["--max-age", "1h"], {}, id="check-fails"),
    pytest.param("backup_database.py", [], {"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/app"}, id="database-unreachable"),
    pytest.param("verify_backup.py", ["--kind", "files", "--latest"], {}, id="nothing-to-verify"),
    pytest.param("backup_files.py", [], {"SOURCE_BUCKET": None}, id="usage-error-after-start"),
])
def test_each_failing_path_pings_fail_with_its_error_line(run, monitor, script, args, env, tmp_path):
    summary = tmp_path / "summary.md"
    done = run(script, *args, env={**env, "BACKUP_HEARTBEAT_URL": monitor.url, "GITHUB_ACTIONS": "true",
                                   "GITHUB_STEP_SUMMARY": str(summary)})
    assert done.returncode in (1, 2), done.stderr
    assert monitor.paths() == ["/start", "/fail"]
    fail = monitor.pings[1]
    [line] = error_lines(done.stderr)
    assert fail.method == "POST" and fail.body == f"{script}: {line.removeprefix('error: ')}"
    assert monitor.token not in done.stdout + done.stderr + (summary.read_text() if summary.exists() else "")


def test_an_empty_variable_means_no_heartbeat(run, monitor):
    done = run("list_backups.py", "--max-age", "1h", env={"BACKUP_HEARTBEAT_URL": ""})
    assert done.returncode == 1 and monitor.pings == []


def test_a_url_that_is_not_http_is_a_usage_error_that_does_not_show_it(run):
    done = run("list_backups.py", env={"BACKUP_HEARTBEAT_URL": "ftp://hc-secret-token@example.org/x"})
    assert done.returncode == 2
    assert "hc-secret-token" not in done.stderr and "BACKUP_HEARTBEAT_URL" in error_lines(done.stderr)[0]


@pytest.mark.parametrize("monitor_state", ["dead", pytest.param("slow", marks=pytest.mark.slow),
                                           pytest.param("trickling", marks=pytest.mark.slow)])
def test_a_dead_or_slow_monitor_costs_seconds_and_never_fails_a_backup(run, pg, sample_db, monitor_state):
    slow = {"slow": lambda: Monitor(delay=30), "trickling": lambda: Monitor(trickle=2)}.get(monitor_state, lambda: None)()
    url = slow.url if slow else "http://127.0.0.1:9/ping/hc-dead-token"
    try:
        started = time.monotonic()
        done = run("backup_database.py", "--json", env={"DATABASE_URL": pg.url(sample_db), "BACKUP_HEARTBEAT_URL": url})
        elapsed = time.monotonic() - started
        quick = time.monotonic()
        run("backup_database.py", "--json", env={"DATABASE_URL": pg.url(sample_db)}, check=True)
        baseline = time.monotonic() - quick
    finally:
        if slow:
            slow.close()
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("warning: heartbeat") == 2  # start and success, each a warning
    assert "hc-dead-token" not in done.stderr and (slow is None or slow.token not in done.stderr)
    # Two pings, each at most 2 tries × 3 s (+ 0.5 s between tries).
    assert elapsed - baseline < 2 * (2 * 3 + 0.5) + 2, f"{elapsed:.1f} s against {baseline:.1f} s without a monitor"


def test_a_monitor_answering_garbage_never_changes_the_result(run, pg, sample_db, tmp_path):
    """A monitor (or whatever answers at its address) that speaks no HTTP: a good backup still
    succeeds, a failing one still ends in its own error line, exit status and error file."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)

    def answer_garbage() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(b"SPEAKS NO HTTP\r\n" + b"x" * 70000 + b"\r\n\r\n")

    threading.Thread(target=answer_garbage, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/ping/hc-garbled-token"
    try:
        good = run("backup_database.py", "--json", env={"DATABASE_URL": pg.url(sample_db), "BACKUP_HEARTBEAT_URL": url})
        errors = tmp_path / "errors.txt"
        bad = run("backup_database.py", env={"DATABASE_URL": pg.url("no_such_db"), "BACKUP_HEARTBEAT_URL": url,
                                             "BACKUP_ERROR_FILE": str(errors)})
    finally:
        listener.close()
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["kind"] == "database"
    assert good.stderr.count("warning: heartbeat") == 2 and "Traceback" not in good.stderr
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    [line] = error_lines(bad.stderr)
    assert errors.read_text() == f"backup_database.py: {line.removeprefix('error: ')}\n"
    assert "hc-garbled-token" not in good.stderr + bad.stderr


@pytest.mark.parametrize("behaviour", ["trickling", "stalled"])
def test_one_deadline_per_try_whatever_the_monitor_does(monkeypatch, capsys, behaviour):
    """A monitor that sends its answer a byte at a time (each read well within the timeout) or
    never answers: each try is abandoned when its deadline has passed (issue 21, item 12)."""
    from backupkit import heartbeat

    monkeypatch.setattr(heartbeat, "TIMEOUT", 0.5)
    monitor = Monitor(trickle=0.3) if behaviour == "trickling" else Monitor(delay=30)
    try:
        began = time.monotonic()
        heartbeat.Heartbeat(monitor.url).start()
        elapsed = time.monotonic() - began
    finally:
        monitor.close()
    assert monitor.paths() == ["/start", "/start"]  # both tries reached it
    assert elapsed < heartbeat.TRIES * 0.5 + 0.5 + 0.5, f"{elapsed:.1f} s"
    assert "warning: heartbeat start ping failed (no answer within" in capsys.readouterr().err
