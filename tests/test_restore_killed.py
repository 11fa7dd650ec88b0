"""A restore (or a backup) killed outright, SIGKILL, no handler runs: nothing is committed, and no
child outlives it by more than a few seconds.

The restore's psql is not `--single-transaction` (which commits when its input ends): the restore
sends `BEGIN;` itself and `COMMIT;` only after everything verified, so a psql whose parent died
reads EOF outside that COMMIT, ends its session, and PostgreSQL rolls back. The other children
end on their pipes: EPIPE writing to us, or EOF reading from us. Nothing runs in the child between
fork and exec (no preexec_fn) to arrange it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from dev.harness import REPO
from tests.backup_factory import database_backup

SOURCE_DB = "killed_source"
CHILDREN = ("psql", "openssl", "zstd", "pg_dump")
# Seconds after the kill by which every child has ended: psql first runs what is left in its pipe
# (up to 1 MiB) at the slowed pace; measured 1.6 to 3.4 s on two busy cores.
GONE_WITHIN = 10.0


@pytest.fixture(scope="module")
def source_db(pg):
    """A 13 MB plain dump: one table of 120,000 rows."""
    pg.create_database(SOURCE_DB)
    pg.psql("CREATE TABLE m (id int PRIMARY KEY, payload text NOT NULL);"
            "INSERT INTO m SELECT i, md5(i::text) || md5((-i)::text) || md5((i * 3)::text) "
            "FROM generate_series(1, 120000) AS i;", SOURCE_DB)
    yield SOURCE_DB
    pg.drop_database(SOURCE_DB)


@pytest.fixture
def target(pg):
    """A target that already holds a table, and that loads the restored rows slowly (a row trigger
    that an event trigger puts on every table the restore creates sleeps every 200 rows): psql
    takes a few seconds to read the stream, and is killed while it does."""
    name = f"killed_target_{os.getpid()}_{time.monotonic_ns()}"
    pg.create_database(name)
    pg.psql(
        "CREATE TABLE keep_me (id int PRIMARY KEY, note text); INSERT INTO keep_me VALUES (1, 'before the restore');"
        "CREATE FUNCTION public.slow_rows() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.id % 200 = 0 THEN PERFORM pg_sleep(0.005); END IF; RETURN NEW; END $$;"
        "CREATE FUNCTION public.slow_tables() RETURNS event_trigger LANGUAGE plpgsql AS $$ DECLARE r record; BEGIN "
        "FOR r IN SELECT * FROM pg_event_trigger_ddl_commands() WHERE command_tag = 'CREATE TABLE' LOOP "
        "EXECUTE format('CREATE TRIGGER slow BEFORE INSERT ON %s FOR EACH ROW EXECUTE FUNCTION public.slow_rows()', "
        "r.object_identity); END LOOP; END $$;"
        "CREATE EVENT TRIGGER slow_tables ON ddl_command_end WHEN TAG IN ('CREATE TABLE') "
        "EXECUTE FUNCTION public.slow_tables();",
        name)
    yield name
    pg.drop_database(name)


def children(pid: int) -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if named(p) in CHILDREN]
    except psutil.Error:
        return []


def named(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return ""


def argv(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return ["gone"]


def wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def written_by(proc: psutil.Process) -> int:
    try:
        return proc.io_counters().write_chars
    except psutil.Error:
        return -1


def killed(proc, kids: list[psutil.Process]) -> list[str]:
    """SIGKILL the script; the children still running GONE_WITHIN seconds later."""
    proc.kill()
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(kids, timeout=GONE_WITHIN)
    return [f"{p.pid} {named(p)}" for p in alive]


def copied(pg, database: str) -> int:
    """Rows the COPY running in `database` has loaded so far (-1: no COPY running)."""
    return int(pg.psql("SELECT coalesce(max(p.tuples_processed), -1) FROM pg_stat_progress_copy p "
                       f"JOIN pg_database d ON d.oid = p.datid WHERE d.datname = '{database}'"))


# Not later: once all but psql's pipe (1 MiB) and socket buffers is read and verified, the
# restore has sent its COMMIT, by design, and a kill no longer stops it.
@pytest.mark.parametrize("fraction", [None, 0.0, 0.25, 0.5])
def test_restore_killed_while_psql_reads_commits_nothing(run, pg, source_db, target, fraction):
    """SIGKILL the restore as soon as its psql session exists (None), or once the COPY has loaded
    `fraction` of the rows: psql, openssl and zstd end within GONE_WITHIN seconds, and the target is exactly
    as it was (psql ends the COPY cut short cleanly, then reads EOF: with --single-transaction it
    would have committed the rows it had)."""
    manifest = database_backup(run, pg=pg, sample_db=source_db)
    assert manifest["key"].endswith(".sql.zst.encrypted")
    proc = run.popen("restore_database.py", "--latest", "--replace", "--target-database-url", pg.url(target))
    kids: list[psutil.Process] = []
    left: list[str] = []
    try:
        wait_for(lambda: proc.poll() is not None or pg.psql(
            f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{target}' "
            "AND application_name LIKE 'backupkit-restore-%'") == "1", "the restore's session")
        if fraction is not None:
            wanted = max(1, int(fraction * 120000))
            wait_for(lambda: proc.poll() is not None or copied(pg, target) >= wanted, f"{wanted} rows copied")
        kids = children(proc.pid)
        names = sorted(named(p) for p in kids)
        assert proc.poll() is None, f"the restore ended before the moment: {proc.communicate()}"
        # Early on, openssl and zstd are still writing; late, only what they wrote is left.
        assert {"psql", "openssl", "zstd"} <= set(names) if not fraction else "psql" in names, names
    finally:
        if proc.poll() is None:
            left = killed(proc, kids)
    assert proc.returncode == -9 and "restored" not in proc.stdout.read()
    assert left == [], f"still running {GONE_WITHIN} s after the restore was killed: {left}"
    wait_for(lambda: pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{target}' "
                             "AND pid <> pg_backend_pid()") == "0", "the restore's session to end")
    tables = pg.psql("SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables WHERE schemaname = 'public'",
                     target)
    assert tables == "keep_me"
    assert pg.psql("SELECT note FROM keep_me", target) == "before the restore"


def test_backup_killed_mid_stream_leaves_no_child(run, pg, source_db):
    """SIGKILL the database backup while pg_dump is writing: pg_dump, zstd and openssl end on
    their pipes (nothing arranged in the child)."""
    proc = run.popen("backup_database.py", env={"DATABASE_URL": pg.url(source_db)})
    kids: list[psutil.Process] = []
    left: list[str] = []
    try:
        def pg_dump() -> psutil.Process | None:
            return next((p for p in children(proc.pid) if named(p) == "pg_dump"
                         and "--format=plain" in argv(p)), None)

        wait_for(lambda: proc.poll() is not None or pg_dump() is not None, "pg_dump")
        dumper = pg_dump()
        assert dumper is not None, proc.communicate()
        wait_for(lambda: proc.poll() is not None or written_by(dumper) >= 1 << 20, "pg_dump writing 1 MiB")
        kids = children(proc.pid)
        assert proc.poll() is None, f"the backup ended before the moment: {proc.communicate()}"
        assert {"pg_dump", "openssl", "zstd"} <= {named(p) for p in kids}, kids
    finally:
        if proc.poll() is None:
            left = killed(proc, kids)
    assert left == [], f"still running {GONE_WITHIN} s after the backup was killed: {left}"


@pytest.mark.parametrize("fraction", [0.0, 0.25])
def test_runbook_filter_killed_while_psql_reads_commits_nothing(pg, source_db, target, tmp_path, fraction):
    """The runbook's manual restore (2.4), `sqlstream.py database-backup.sql | psql`, with the filter
    SIGKILLed while psql loads the rows: psql reads EOF without the filter's COMMIT, and the
    target is exactly as it was (with psql --single-transaction, the rows read would be committed)."""
    dump = tmp_path / "database-backup.sql"
    with dump.open("wb") as out:
        subprocess.run([str(pg.bin / "pg_dump"), "--format=plain", "--clean", "--if-exists", "--no-owner",
                        "--no-privileges", pg.url(source_db, password=False)], env=pg.env(), stdout=out, check=True)
    psql = subprocess.Popen([str(pg.bin / "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-q", "-o", "/dev/null",
                             pg.url(target, password=False)], env=pg.env(), stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    guard = subprocess.Popen([sys.executable, str(REPO / "scripts/backupkit/sqlstream.py"), str(dump)],
                             stdout=psql.stdin)
    psql.stdin.close()  # the filter holds the pipe's only write end, as in a shell pipeline
    try:
        wanted = max(1, int(fraction * 120000))
        wait_for(lambda: guard.poll() is not None or copied(pg, target) >= wanted, f"{wanted} rows copied")
        assert guard.poll() is None, "the filter ended before the moment"
    finally:
        guard.kill()
        guard.wait()
    psql.wait(timeout=120)
    tables = pg.psql("SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables WHERE schemaname = 'public'",
                     target)
    assert tables == "keep_me", psql.stderr.read()
    assert pg.psql("SELECT note FROM keep_me", target) == "before the restore"
