"""A signal ends a run honestly (issue 25): SIGINT or SIGTERM at any moment of a database or a
files backup, and of the restores. For every moment: the process exits within BOUND seconds of
the signal and leaves no child behind; the bucket holds either nothing or a complete backup with
its manifest; the last line says which (exit 0 and the backup's key, or the signal's exit status
and one `error:` line that names the completed backup or says nothing was completed).

Each moment is made exact without hooks in the scripts: tests/faultproxy.py holds the S3 request
of that phase until the signal has landed, a heartbeat monitor holds the last ping, a slow
wrapper holds the pg_dump version check or the query after a restore. A sweep of delays (slow)
covers the moments in between.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import error_lines, public_tables, versions
from tests.faultproxy import FaultProxy
from tests.files_helpers import MIB, Obj, fill, new_bucket, snapshot
from tests.procwatch import ProcWatch
from tests.test_heartbeat import Monitor

BOUND = 10.0  # seconds from the signal to the end of the process (signals.EXIT_BOUND)
CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}
MEDIUM_DB = "signals_medium"
HOLD = 2.0  # how long a request is held when the signal is to stop the run before it
LAST_HOLD = 0.5  # … when it is a request of the last step, which the run must wait for


@pytest.fixture(scope="session")
def medium_db(pg):
    """A database whose plain dump (13 MB) is three upload parts."""
    pg.create_database(MEDIUM_DB)
    pg.psql("CREATE TABLE m (id int PRIMARY KEY, payload text NOT NULL);"
            "INSERT INTO m SELECT i, md5(i::text) || md5((-i)::text) || md5((i * 3)::text) FROM generate_series(1, 120000) AS i;",
            MEDIUM_DB)
    return MEDIUM_DB


@pytest.fixture(scope="module")
def app_bucket(s3server):
    """An app bucket whose archive (9.5 MB) is two upload parts."""
    name = new_bucket(s3server, "signals-app")
    objects = {f"small/{i:03d}.txt": Obj(os.urandom(2000 + i), "text/plain") for i in range(40)}
    objects["big/video.bin"] = Obj(os.urandom(9 * MIB), "video/mp4", {"duration": "42"})
    fill(s3server.client(), name, objects)
    return name


@pytest.fixture
def proxy(s3server):
    with FaultProxy(s3server.endpoint, seed=25) as p:
        yield p


# -- running a script and stopping it at one moment ------------------------------------------------
@dataclass
class Ending:
    code: int
    stdout: str
    stderr: str
    seconds: float  # from the signal to the end of the process

    def last_line(self) -> str:
        """The last line on stderr (a heartbeat's warning after it does not count)."""
        lines = [line for line in self.stderr.splitlines() if line and not line.startswith("warning: heartbeat")]
        return lines[-1] if lines else ""


def stopped(run, script: str, args: list[str], env: dict, sig: int, moment: Callable[[subprocess.Popen, ProcWatch], None],
            may_finish: bool = False) -> Ending:
    """Start the script, wait for `moment`, send `sig`; the ending, once no child of it is left.
    `may_finish`: the run may end before the moment (a sweep's late moments); then no signal."""
    proc = run.popen(script, *args, env=env)
    watch = ProcWatch(proc.pid, interval=0.02).start()
    try:
        moment(proc, watch)
        if proc.poll() is not None:
            assert may_finish, f"the run ended before the moment came:\n{proc.communicate()[1]}"
            stdout, stderr = proc.communicate()
            return Ending(proc.returncode, stdout, stderr, 0.0)
        sent = time.monotonic()
        proc.send_signal(sig)
        try:
            stdout, stderr = proc.communicate(timeout=BOUND + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            raise AssertionError(f"still running {BOUND + 30:.0f} s after {NAMES[sig]}:\n{stderr}") from None
        seconds = time.monotonic() - sent
    finally:
        watch.stop()
    deadline = time.monotonic() + 5
    while watch.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert watch.alive() == [], "children left behind"
    return Ending(proc.returncode, stdout, stderr, seconds)


def after(seconds: float) -> Callable:
    """`seconds` after the script took SIGTERM (from its first import of the library): before,
    the interpreter is still starting and the script has done nothing."""
    def moment(proc, watch):
        deadline = time.monotonic() + 30
        while not catches(proc.pid, signal.SIGTERM) and proc.poll() is None:
            assert time.monotonic() < deadline, "the script never took SIGTERM"
            time.sleep(0.002)
        time.sleep(seconds)
    return moment


def catches(pid: int, sig: int) -> bool:
    """Whether the process has a handler for `sig` (its SigCgt mask in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next((int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:")), 0)
    return bool(mask >> (sig - 1) & 1)


def when_held(proxy: FaultProxy, rule) -> Callable:
    """Once the proxy holds a request by `rule` (a "delay" or "stall" fault)."""
    def moment(proc, watch):
        deadline = time.monotonic() + 60
        while not rule.injected:
            assert proc.poll() is None and time.monotonic() < deadline, f"no {'/'.join(rule.operations)} was held"
            time.sleep(0.01)
        time.sleep(0.1)  # the client is now waiting for the answer
    return moment


def when_pinged(monitor: Monitor, path: str) -> Callable:
    def moment(proc, watch):
        assert monitor.arrived[path].wait(60), f"no {path} ping"
        time.sleep(0.1)
    return moment


def when_file(path: Path) -> Callable:
    def moment(proc, watch):
        deadline = time.monotonic() + 60
        while not path.exists():
            assert proc.poll() is None and time.monotonic() < deadline, f"{path.name} never appeared"
            time.sleep(0.02)
        time.sleep(0.1)
    return moment


# -- what a stopped backup must leave, and say -----------------------------------------------------
def judge(ending: Ending, sig: int, s3server, bucket: str, *, unanswered: bool = False) -> str:
    """Asserts the ending is honest; returns "complete" or "nothing". `unanswered`: S3 stopped
    answering the last step, so an object may stay without its manifest, if the line says so."""
    assert ending.seconds < BOUND, f"{ending.seconds:.1f} s after the signal:\n{ending.stderr}"
    assert "Traceback" not in ending.stderr, ending.stderr
    client = s3server.client()
    stored = versions(client, bucket)
    objects = [v for v in stored if not v["Key"].endswith((".manifest.json", ".profile.encrypted"))]
    manifests = [v for v in stored if v["Key"].endswith(".manifest.json")]
    profiles = [v for v in stored if v["Key"].endswith(".profile.encrypted")]
    assert len(manifests) <= len(objects) <= 1, [v["Key"] for v in stored]
    assert len(manifests) <= len(profiles) <= len(objects), [v["Key"] for v in stored]  # a profile only after its backup
    last = ending.last_line()
    if objects and not manifests:
        assert unanswered, f"an object without its manifest: {objects[0]['Key']}\n{ending.stderr}"
        assert ending.code == CODES[sig] and objects[0]["Key"] in last and "manifest was not written" in last, last
        return "incomplete"
    if objects:
        manifest = json.loads(client.get_object(Bucket=bucket, Key=manifests[0]["Key"])["Body"].read())
        assert (manifest["key"], manifest["version_id"]) == (objects[0]["Key"], objects[0]["VersionId"])
    if not unanswered:
        assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == [], "an upload left unaborted"
    if ending.code == 0:
        assert objects, ending.stdout
        assert objects[0]["Key"] in ending.stdout
        return "complete"
    assert ending.code == CODES[sig], (ending.code, ending.stderr)
    assert len(error_lines(ending.stderr)) == 1 and last.startswith("error: ") and NAMES[sig] in last, ending.stderr
    print(last)
    if objects:
        assert objects[0]["Key"] in last and "it is a complete backup" in last, last
        return "complete"
    if unanswered:
        assert "nothing was completed" in last or "may exist without its manifest" in last, last
    else:
        assert "nothing was completed" in last, last
    return "nothing"


def _both(moments: list[tuple], slow: tuple[str, ...] = ()) -> list:
    """Each moment with both signals: one of them in `make test` (alternating), the other slow;
    the moments in `slow` with both slow."""
    params = []
    for i, (name, *rest) in enumerate(moments):
        for j, sig in enumerate((signal.SIGINT, signal.SIGTERM)):
            marks = [pytest.mark.slow] if (i + j) % 2 or name in slow else []
            params.append(pytest.param(name, *rest, sig, id=f"{name}-{NAMES[sig]}", marks=marks))
    return params


def slow_pg_dump(tmp_path: Path, real: str) -> Path:
    """A pg_dump whose version check takes 30 s (the backup's checks, before the dump)."""
    wrapper = tmp_path / "pg_dump"
    wrapper.write_text(f"#!{sys.executable}\nimport os, sys, time\nif '--version' in sys.argv:\n    time.sleep(30)\n"
                       f"os.execv({real!r}, [{real!r}, *sys.argv[1:]])\n")
    wrapper.chmod(0o755)
    return wrapper


# -- the database backup ---------------------------------------------------------------------------
DATABASE_MOMENTS = [
    # (name, S3 operation held by the proxy (or None), expected outcome)
    ("importing", None, "nothing"),
    ("version-check", None, "nothing"),
    ("dump-started", "CreateMultipartUpload", "nothing"),
    ("mid-upload", "UploadPart", "nothing"),
    ("completing", "CompleteMultipartUpload", "complete"),
    ("writing-manifest", "PutObject", "complete"),
    ("after-manifest", None, "complete"),
]


@pytest.mark.parametrize(("name", "held", "expected", "sig"), _both(DATABASE_MOMENTS))
def test_database_backup_stopped_at_each_moment(run, pg, medium_db, proxy, s3server, bucket, tmp_path, name, held, expected, sig):
    env = {"DATABASE_URL": pg.url(medium_db), "BACKUP_COMPRESSION": "none", "AWS_ENDPOINT_URL": proxy.endpoint}
    monitor = None
    if held:
        # A part after the first: the dump is well under way. The last step's requests are held
        # shorter than signals.LAST_STEP_GRACE: the run must wait for them.
        hold = LAST_HOLD if expected == "complete" else HOLD
        rule = proxy.add(held, fault="delay", seconds=hold, after=1 if held == "UploadPart" else 0, limit=1)
        moment = when_held(proxy, rule)
    elif name == "importing":
        moment = after(0)
    elif name == "version-check":
        env["PG_DUMP"] = str(slow_pg_dump(tmp_path, env.get("PG_DUMP") or run.env["PG_DUMP"]))
        moment = lambda proc, watch: (watch.wait_for("pg_dump", timeout=60), time.sleep(0.3))  # noqa: E731
    else:
        monitor = Monitor(delay=1.0, hold="/")  # the success ping, once the result is printed
        env["BACKUP_HEARTBEAT_URL"] = monitor.url
        moment = when_pinged(monitor, "/")
    try:
        ending = stopped(run, "backup_database.py", [], env, sig, moment)
    finally:
        if monitor:
            monitor.close()
    assert judge(ending, sig, s3server, bucket) == expected


@pytest.mark.parametrize(("held", "sig"), [
    pytest.param("CompleteMultipartUpload", signal.SIGTERM, id="completion-unanswered", marks=pytest.mark.slow),
    pytest.param("PutObject", signal.SIGINT, id="manifest-unanswered", marks=pytest.mark.slow),
])
def test_database_backup_stopped_while_s3_does_not_answer_the_last_step(run, pg, medium_db, proxy, s3server, bucket, held, sig):
    """S3 stops answering the last step: the run abandons it within the bound and its line says
    exactly what may be left (it cannot know more)."""
    rule = proxy.add(held, fault="stall", seconds=60)
    env = {"DATABASE_URL": pg.url(medium_db), "BACKUP_COMPRESSION": "none", "AWS_ENDPOINT_URL": proxy.endpoint}
    ending = stopped(run, "backup_database.py", [], env, sig, when_held(proxy, rule))
    outcome = judge(ending, sig, s3server, bucket, unanswered=True)
    assert outcome == ("nothing" if held == "CompleteMultipartUpload" else "incomplete")
    assert ("may exist without its manifest" if held == "CompleteMultipartUpload" else "manifest was not written") in ending.last_line()


@pytest.mark.slow
def test_database_backup_stopped_at_a_sweep_of_moments(run, pg, medium_db, s3server, bucket):
    """SIGINT and SIGTERM in turn at delays spread over a whole backup (compressed, so zstd is in
    the pipeline too), as a scheduler would stop it: every ending honest, whatever it was."""
    env = {"DATABASE_URL": pg.url(medium_db)}
    began = time.monotonic()
    run("backup_database.py", env=env, check=True)
    duration = time.monotonic() - began
    outcomes = []
    steps = 24
    for i in range(steps):
        # Each in a fresh bucket, so what one run left cannot hide what the next one did.
        target = s3server.create_bucket(f"{bucket}-{i}")
        sig = (signal.SIGINT, signal.SIGTERM)[i % 2]
        ending = stopped(run, "backup_database.py", [], {**env, "BACKUP_BUCKET": target}, sig,
                         after(duration * 1.5 * i / steps), may_finish=True)
        outcomes.append(judge(ending, sig, s3server, target))
    print(outcomes)
    assert {"nothing", "complete"} <= set(outcomes)  # the sweep spans the whole backup


# -- the files backup ------------------------------------------------------------------------------
FILES_MOMENTS = [
    ("listing", "ListObjects", "nothing"),
    ("archiving", "GetObject", "nothing"),
    ("mid-upload", "UploadPart", "nothing"),
    ("completing", "CompleteMultipartUpload", "complete"),
    ("writing-manifest", "PutObject", "complete"),
    ("after-manifest", None, "complete"),
]


# The last step is the database backup's code (laststep.py): in `make test` there, slow here.
@pytest.mark.parametrize(("name", "held", "expected", "sig"),
                         _both(FILES_MOMENTS, slow=("completing", "writing-manifest", "after-manifest")))
def test_files_backup_stopped_at_each_moment(run, app_bucket, proxy, s3server, bucket, name, held, expected, sig):
    env = {"SOURCE_BUCKET": app_bucket, "AWS_ENDPOINT_URL": proxy.endpoint}
    monitor = None
    if held:
        hold = LAST_HOLD if expected == "complete" else HOLD
        rule = proxy.add(held, fault="delay", seconds=hold, after=5 if held == "GetObject" else 0, limit=1)
        moment = when_held(proxy, rule)
    else:
        monitor = Monitor(delay=1.0, hold="/")
        env["BACKUP_HEARTBEAT_URL"] = monitor.url
        moment = when_pinged(monitor, "/")
    try:
        ending = stopped(run, "backup_files.py", [], env, sig, moment)
    finally:
        if monitor:
            monitor.close()
    assert judge(ending, sig, s3server, bucket) == expected


@pytest.mark.slow
def test_files_backup_stopped_at_a_sweep_of_moments(run, app_bucket, s3server, bucket):
    env = {"SOURCE_BUCKET": app_bucket}
    began = time.monotonic()
    run("backup_files.py", env=env, check=True)
    duration = time.monotonic() - began
    outcomes = []
    steps = 12
    for i in range(steps):
        target = s3server.create_bucket(f"{bucket}-{i}")
        sig = (signal.SIGTERM, signal.SIGINT)[i % 2]
        ending = stopped(run, "backup_files.py", [], {**env, "BACKUP_BUCKET": target}, sig,
                         after(duration * 1.5 * i / steps), may_finish=True)
        outcomes.append(judge(ending, sig, s3server, target))
    print(outcomes)
    assert {"nothing", "complete"} <= set(outcomes)


# -- the restores: their line says what they left ------------------------------------------------
@pytest.mark.parametrize(("fault", "sig"), [
    pytest.param("delay", signal.SIGTERM, id="uploads-answered"),
    pytest.param("stall", signal.SIGINT, id="uploads-unanswered", marks=pytest.mark.slow),
])
def test_files_restore_stopped_mid_upload_counts_what_it_uploaded(run, app_bucket, proxy, s3server, bucket, fault, sig):
    """The count in the line is the target's: uploads under way when the signal came are waited
    for (each PutObject is whole or absent) until the bound, and said to be under way if S3 has
    not answered them by then."""
    run("backup_files.py", env={"SOURCE_BUCKET": app_bucket}, check=True)
    target = new_bucket(s3server, "signals-restored")
    rule = proxy.add("PutObject", fault=fault, seconds=1.5 if fault == "delay" else 60, after=10)
    ending = stopped(run, "restore_files.py", ["--latest", "--target-bucket", target], {"AWS_ENDPOINT_URL": proxy.endpoint},
                     sig, when_held(proxy, rule))
    assert ending.seconds < BOUND and "Traceback" not in ending.stderr
    assert ending.code == CODES[sig]
    line = ending.last_line()
    assert len(error_lines(ending.stderr)) == 1 and line.startswith("error: ") and NAMES[sig] in line, ending.stderr
    print(line)
    restored = len(snapshot(s3server.client(), target))
    uploaded = int(line.split(" of ")[0].rsplit(" ", 1)[1])
    if fault == "delay":
        assert uploaded == restored and "being uploaded" not in line
    else:
        assert "being uploaded when it stopped (each is either complete or absent)" in line
        assert uploaded == restored


def test_database_restore_stopped_after_its_commit_says_so(run, pg, sample_db, scratch_db, tmp_path):
    """A signal after psql committed (here while the tables are counted for the report): the line
    names the restored backup, never "nothing was completed"."""
    run("backup_database.py", env={"DATABASE_URL": pg.url(sample_db)}, check=True)
    marker = tmp_path / "committed"
    real = run.env["PSQL"]
    wrapper = tmp_path / "psql"
    wrapper.write_text(
        f"#!{sys.executable}\nimport os, subprocess, sys, time\nreal, marker = {real!r}, {str(marker)!r}\n"
        "if 'ON_ERROR_STOP=1' in sys.argv and '-c' not in sys.argv:\n"
        "    code = subprocess.call([real, *sys.argv[1:]])\n"
        "    if code == 0:\n        open(marker, 'w').close()\n    sys.exit(code)\n"
        "if os.path.exists(marker) and not os.path.exists(marker + '.held'):\n"
        "    open(marker + '.held', 'w').close()\n    time.sleep(30)\n"
        "os.execv(real, [real, *sys.argv[1:]])\n")
    wrapper.chmod(0o755)
    ending = stopped(run, "restore_database.py", ["--latest", "--target-database-url", pg.url(scratch_db)],
                     {"PSQL": str(wrapper)}, signal.SIGTERM, when_file(Path(f"{marker}.held")))
    assert ending.seconds < BOUND and ending.code == 143, ending.stderr
    line = ending.last_line()
    assert line.startswith("error: terminated (SIGTERM)") and "had been restored into database" in line and "(committed)" in line, line
    assert "nothing was completed" not in line
    assert pg.psql("SELECT count(*) FROM applications", scratch_db) == pg.psql("SELECT count(*) FROM applications", sample_db)


def test_database_restore_stopped_while_psql_commits_says_so(run, pg, sample_db, scratch_db, tmp_path):
    """A signal once psql was given the end of its input (from which it commits): the line says
    the restore was committing and to look at the target, never "nothing was completed"."""
    run("backup_database.py", env={"DATABASE_URL": pg.url(sample_db)}, check=True)
    marker = tmp_path / "committing"
    real = run.env["PSQL"]
    wrapper = tmp_path / "psql"
    wrapper.write_text(  # the restore's psql reads its whole input, then is slow to go on
        f"#!{sys.executable}\nimport os, subprocess, sys, time\nreal, marker = {real!r}, {str(marker)!r}\n"
        "if 'ON_ERROR_STOP=1' in sys.argv and '-c' not in sys.argv:\n"
        "    data = sys.stdin.buffer.read()\n    open(marker, 'w').close()\n    time.sleep(30)\n"
        "    sys.exit(subprocess.run([real, *sys.argv[1:]], input=data).returncode)\n"
        "os.execv(real, [real, *sys.argv[1:]])\n")
    wrapper.chmod(0o755)
    ending = stopped(run, "restore_database.py", ["--latest", "--target-database-url", pg.url(scratch_db)],
                     {"PSQL": str(wrapper)}, signal.SIGINT, when_file(marker))
    assert ending.seconds < BOUND and ending.code == 130, ending.stderr
    line = ending.last_line()
    assert line.startswith("error: interrupted (SIGINT)") and "was committing when it was stopped" in line, line
    assert "nothing was completed" not in line
    assert public_tables(pg, scratch_db) == "0"  # killed before its commit: rolled back


# -- in process: the mechanism ---------------------------------------------------------------------
def test_a_signal_during_a_held_step_is_raised_when_it_ends():
    from backupkit import signals

    previous = signals.install()
    try:
        done = []
        with pytest.raises(signals.Terminated):
            with signals.held():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                done.append("the step went on")
                os.kill(os.getpid(), signal.SIGINT)  # a second signal changes nothing
                time.sleep(0.05)
                done.append("to its end")
        assert done == ["the step went on", "to its end"]
    finally:
        signals.restore(previous)


def test_a_held_network_call_is_abandoned_once_its_grace_has_passed(monkeypatch):
    from backupkit import signals

    monkeypatch.setattr(signals, "LAST_STEP_GRACE", 0.3)
    previous = signals.install()
    release = threading.Event()
    try:
        began = time.monotonic()
        with pytest.raises(KeyboardInterrupt), signals.held():
            threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
            signals.finish(release.wait)  # a request S3 never answers
        assert 0.3 < time.monotonic() - began < 2
        assert signals.time_left(60) <= signals.CLEANUP_BOUND
    finally:
        release.set()
        signals.restore(previous)


def test_worker_threads_never_hold_up_the_exit():
    """A call stuck in each of the library's pools: the interpreter still exits at once."""
    code = ("import threading, time\n"
            "from backupkit import s3, crypto, threads\n"
            "stuck = threading.Event()\n"
            "pool = threads.DaemonPool(2)\n"
            "pool.submit(stuck.wait)\n"
            "threads.in_background(stuck.wait)\n"
            "assert not pool.shutdown(wait=True, timeout=0.2)\n"
            "print('exiting')\n")
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "scripts")})
    assert done.returncode == 0 and done.stdout == "exiting\n", done.stderr
    assert time.monotonic() - began < 5


@pytest.mark.parametrize(("script", "args"), [
    pytest.param("list_backups.py", [], id="list_backups", marks=pytest.mark.slow),
    pytest.param("restore_database.py", ["--latest"], id="restore_database", marks=pytest.mark.slow),
])
def test_a_reader_stopped_while_s3_stalls_ends_within_the_bound(run, pg, sample_db, scratch_db, proxy, script, args):
    """A manifest read that S3 never answers (60 s of read timeout, five attempts) while the run
    is stopped: whatever still waits for it (here the catalogue's pool, which joins its workers),
    the process ends within the bound with its line (the watchdog's, at 9 s)."""
    run("backup_database.py", env={"DATABASE_URL": pg.url(sample_db)}, check=True)
    rule = proxy.add("GetObject", fault="stall", seconds=60)
    ending = stopped(run, script, [*args, *(["--target-database-url", pg.url(scratch_db)] if "--latest" in args else [])],
                     {"AWS_ENDPOINT_URL": proxy.endpoint}, signal.SIGTERM, when_held(proxy, rule))
    assert ending.seconds < BOUND and ending.code == 143, (ending.seconds, ending.stderr)
    line = ending.last_line()
    print(line, f"({ending.seconds:.1f} s)")
    assert line.startswith("error: terminated (SIGTERM): stopped;") and "nothing was completed" in line, ending.stderr
    assert "Traceback" not in ending.stderr
