"""Secrets and plaintext, watched from outside while each script runs.

- No secret (passphrase, database password, AWS secret key) in any process's argv, in stdout,
  stderr or a manifest, whether the run succeeds or fails.
- Each child gets only the secret it needs: pg_dump/psql the database password (PGPASSWORD),
  openssl none (the passphrase comes through a pipe, `-pass fd:N`).
- No plaintext on disk; temporary files 0600 in a 0700 directory, and removed.

Children are seen twice: wrappers (tests/procwatch.SpyBin) record the exact argv and environment
of every pg_dump/psql/openssl, however short-lived, and ProcWatch polls /proc of the live tree.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import OLD_PASSPHRASE, PASSPHRASE, Runner, error_lines
from tests.procwatch import WATCHED, DirWatch, ProcWatch, SpyBin

MARKER = "plaintext-marker-5ec7e7"
AWS_SECRET = "testing-secret-key"


@pytest.fixture(scope="session")
def marker_db(pg):
    """A small database whose rows carry MARKER, to look for plaintext on disk."""
    name = "markerdb"
    pg.create_database(name)
    pg.psql(f"CREATE TABLE notes (id int PRIMARY KEY, body text); "
            f"INSERT INTO notes SELECT i, '{MARKER} ' || md5(i::text) FROM generate_series(1, 20000) AS i;", name)
    return name


@pytest.fixture
def spy(tmp_path, pg):
    return SpyBin(tmp_path / "spy", {
        "pg_dump": str(pg.bin / "pg_dump"),
        "psql": str(pg.bin / "psql"),
        "openssl": shutil.which("openssl"),
    })


@pytest.fixture
def spied(run, spy):
    """The runner, with pg_dump/psql/openssl replaced by recording wrappers."""
    return Runner({**run.env, "PG_DUMP": spy.path("pg_dump"), "PSQL": spy.path("psql"),
                   "PATH": f"{spy.dir}:{run.env['PATH']}",
                   "EXTERNAL_BACKUP_ENCRYPTION_KEY_PREVIOUS": OLD_PASSPHRASE})


def secrets(pg) -> dict[str, str]:
    from urllib.parse import quote

    return {
        "passphrase": PASSPHRASE,
        "previous passphrase": OLD_PASSPHRASE,
        "database password": pg.password,
        "database password (URL-quoted)": quote(pg.password, safe=""),
        "AWS secret key": AWS_SECRET,
    }


def leaks(text: str, pg, allowed: tuple[str, ...] = ()) -> list[str]:
    return [name for name, value in secrets(pg).items() if value in text and name not in allowed]


def check_children(programs: list[tuple[str, list[str], dict[str, str]]], pg, password: str | None = None) -> None:
    """argv never holds a secret; the environment holds only what the program needs."""
    password = password or pg.password
    for name, argv, env in programs:
        assert leaks("\0".join(argv), pg) == [], (name, argv)
        environment = "\0".join(f"{k}={v}" for k, v in env.items())
        if name in ("pg_dump", "psql") and "--version" not in argv:
            assert env.get("PGPASSWORD") == password, (name, sorted(env))
            assert leaks(environment.replace(f"PGPASSWORD={password}", ""), pg) == [], (name, argv)
        else:
            assert leaks(environment, pg) == [], (name, argv)
        for variable in ("EXTERNAL_BACKUP_ENCRYPTION_KEY", "EXTERNAL_BACKUP_ENCRYPTION_KEY_PREVIOUS", "DATABASE_URL",
                         "TARGET_DATABASE_URL", "AWS_SECRET_ACCESS_KEY"):
            assert variable not in env, (name, variable)


def run_watched(runner: Runner, spy: SpyBin, pg, script: str, *args: str, env: dict | None = None, password: str | None = None):
    """Run a script while polling its process tree; check every child seen both ways."""
    proc = runner.popen(script, *args, env=env)
    with ProcWatch(proc.pid) as watch:
        stdout, stderr = proc.communicate(timeout=300)
    recorded = [(r.program, r.argv, r.env) for r in spy.records()]
    polled = [(s.name, list(s.cmdline), s.env) for s in watch.seen if s.name in WATCHED]
    check_children(recorded + polled, pg, password)
    own = [s for s in watch.seen if s.name not in WATCHED]
    for seen in own:  # any other descendant (a forked Python before exec) never has secrets in argv
        assert leaks("\0".join(seen.cmdline), pg) == [], seen.cmdline
    assert leaks(stdout, pg) == [] and leaks(stderr, pg) == [], stderr
    assert "Traceback" not in stderr
    return proc.returncode, stdout, stderr, {r.program for r in spy.records()}, {s.name for s in watch.seen}


def manifests(s3server, bucket: str) -> list[bytes]:
    client = s3server.client()
    out = []
    for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket):
        for v in page.get("Versions", []):
            if v["Key"].endswith(".manifest.json"):
                out.append(client.get_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])["Body"].read())
    return out


# -- secrets: argv, environment, output, manifests -------------------------------------------------
def test_backup_and_restore_keep_secrets(spied, spy, pg, marker_db, scratch_db, s3server, bucket):
    code, stdout, stderr, recorded, polled = run_watched(
        spied, spy, pg, "backup_database.py", "--json", env={"DATABASE_URL": pg.url(marker_db)})
    assert code == 0, stderr
    assert recorded >= {"pg_dump", "psql", "openssl"}
    assert polled >= {"pg_dump", "openssl"}  # the long-lived ones are also seen live
    found = manifests(s3server, bucket)
    assert len(found) == 1 and leaks(found[0].decode(), pg) == []

    shutil.rmtree(spy.log)
    spy.log.mkdir()
    code, stdout, stderr, recorded, polled = run_watched(
        spied, spy, pg, "restore_database.py", "--latest", env={"TARGET_DATABASE_URL": pg.url(scratch_db)})
    assert code == 0, stderr
    assert recorded >= {"psql", "openssl"}
    assert pg.psql("SELECT count(*) FROM notes", scratch_db) == "20000"


def test_database_password_in_the_url_query_is_kept_out_of_argv(spied, spy, pg, marker_db):
    url = pg.url(marker_db, password=False) + "?password=" + pg.password.replace("@", "%40") + "&sslmode=disable"
    code, _, stderr, recorded, _ = run_watched(spied, spy, pg, "backup_database.py", env={"DATABASE_URL": url})
    assert code == 0, stderr
    assert "pg_dump" in recorded


@pytest.mark.parametrize("failure", ["wrong-database-password", "s3-unreachable", "wrong-bucket"])
def test_failing_backup_keeps_secrets(spied, spy, pg, marker_db, s3server, bucket, failure):
    env = {"DATABASE_URL": pg.url(marker_db)}
    if failure == "wrong-database-password":
        # The wrong password is a secret too; the right one must not show up either.
        env["DATABASE_URL"] = pg.url(marker_db).replace("pg-s3cret%4042", "Wr0ng-Passw0rd-77")
    elif failure == "s3-unreachable":
        env["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"
    else:
        env["BACKUP_BUCKET"] = "no-such-bucket-here"
    wrong = "Wr0ng-Passw0rd-77" if failure == "wrong-database-password" else None
    code, stdout, stderr, _, _ = run_watched(spied, spy, pg, "backup_database.py", "--debug", env=env, password=wrong)
    assert code == 1
    assert len(error_lines(stderr)) == 1
    assert "Wr0ng-Passw0rd-77" not in stdout + stderr
    assert manifests(s3server, bucket) == []


def test_failing_restore_keeps_secrets(spied, spy, pg, sample_db, scratch_db):
    spied("backup_database.py", env={"DATABASE_URL": pg.url(sample_db)}, check=True)
    code, _, stderr, _, _ = run_watched(
        spied, spy, pg, "restore_database.py", "--latest",
        env={"TARGET_DATABASE_URL": pg.url(scratch_db), "EXTERNAL_BACKUP_ENCRYPTION_KEY": "another-Passphrase-0000",
             "EXTERNAL_BACKUP_ENCRYPTION_KEY_PREVIOUS": None})
    assert code == 1
    assert "another-Passphrase-0000" not in stderr
    assert "key_id" in error_lines(stderr)[0]


@pytest.mark.parametrize("passphrase", [PASSPHRASE, "not-the-Passphrase-42"])
def test_decrypt_keeps_secrets(spied, spy, pg, sample_db, s3server, bucket, tmp_path, passphrase):
    done = spied("backup_database.py", "--json", env={"DATABASE_URL": pg.url(sample_db)}, check=True)
    manifest = json.loads(done.stdout)
    encrypted = tmp_path / "backup.sql.encrypted"
    encrypted.write_bytes(s3server.client().get_object(Bucket=bucket, Key=manifest["key"])["Body"].read())
    shutil.rmtree(spy.log)
    spy.log.mkdir()
    # An operator's shell during an incident may well hold DATABASE_URL and AWS keys too.
    code, stdout, stderr, recorded, _ = run_watched(
        spied, spy, pg, "./decrypt.py", "-i", str(encrypted), "-o", str(tmp_path / "out.sql"),
        env={"EXTERNAL_BACKUP_ENCRYPTION_KEY": passphrase, "EXTERNAL_BACKUP_ENCRYPTION_KEY_PREVIOUS": None,
             "DATABASE_URL": pg.url(sample_db), "PGPASSWORD": pg.password})
    assert recorded == {"openssl"}
    assert code == (0 if passphrase == PASSPHRASE else 1), stderr
    assert passphrase not in stdout + stderr


# -- temporary files and plaintext on disk ---------------------------------------------------------
def test_backup_writes_nothing_to_disk(run, pg, marker_db, tmp_path):
    tmpdir, cwd = tmp_path / "tmp", tmp_path / "cwd"
    tmpdir.mkdir()
    cwd.mkdir()
    runner = Runner({**run.env, "TMPDIR": str(tmpdir)}, cwd=cwd)
    with DirWatch([tmpdir, cwd], marker=MARKER.encode()) as watch:
        runner("backup_database.py", env={"DATABASE_URL": pg.url(marker_db)}, check=True)
    assert watch.modes == {}  # not even a ciphertext
    assert watch.with_marker == set()
    assert list(tmpdir.iterdir()) == list(cwd.iterdir()) == []


def test_restore_temp_files_are_private_ciphertext_and_removed(run, pg, marker_db, scratch_db, tmp_path):
    run("backup_database.py", env={"DATABASE_URL": pg.url(marker_db)}, check=True)
    tmpdir, cwd = tmp_path / "tmp", tmp_path / "cwd"
    tmpdir.mkdir()
    cwd.mkdir()
    runner = Runner({**run.env, "TMPDIR": str(tmpdir)}, cwd=cwd)
    with DirWatch([tmpdir, cwd], marker=MARKER.encode(), interval=0.001) as watch:
        runner("restore_database.py", "--latest", "--target-database-url", pg.url(scratch_db), check=True)
    # The restore streams from the bucket (issue 24): it writes no file at all, ciphertext or not.
    assert watch.modes == {}, watch.modes
    assert watch.bad_modes() == []
    assert watch.with_marker == set()
    assert list(tmpdir.iterdir()) == list(cwd.iterdir()) == []


def test_decrypt_output_is_private_and_nothing_is_left_on_failure(run, pg, sample_db, s3server, bucket, tmp_path):
    manifest = json.loads(run("backup_database.py", "--json", env={"DATABASE_URL": pg.url(sample_db)}, check=True).stdout)
    encrypted = tmp_path / "in" / "backup.sql.encrypted"
    encrypted.parent.mkdir()
    encrypted.write_bytes(s3server.client().get_object(Bucket=bucket, Key=manifest["key"])["Body"].read())
    out = tmp_path / "out"
    out.mkdir()
    with DirWatch([out], interval=0.001) as watch:
        run("./decrypt.py", "-i", str(encrypted), "-o", str(out / "db.sql"), check=True)
    assert watch.bad_modes() == []
    assert os.stat(out / "db.sql").st_mode & 0o777 == 0o600

    (out / "db.sql").unlink()
    done = run("./decrypt.py", "-i", str(encrypted), "-o", str(out / "db.sql"), env={"EXTERNAL_BACKUP_ENCRYPTION_KEY": "wrong-Passphrase-1"})
    assert done.returncode == 1
    assert list(Path(out).iterdir()) == []


# -- a database password never shows, however it is written in a URL -------------------------------
# Every character that ends or splits a part of a URL, and a space; and the issue's own, whose '@'
# comes before its '/' (issue 21, item 11).
PASSWORDS = {"reserved": "Zq:/?#[]@!$&'()*+,;=% Xv", "issue": "p@ss#w/rd?"}


def written(password: str) -> dict[str, str]:
    """The password as operators write it in a URL: encoded, or only in part."""
    from urllib.parse import quote

    return {
        "encoded": quote(password, safe=""),
        "only-#-encoded": password.replace("#", "%23"),  # the URL
        "raw": password,
        "all-but-@": quote(password, safe="@"),
        "all-but-/?": quote(password, safe="/?"),
        "all-but-[]": quote(password, safe="[]"),
        "all-but-&=": quote(password, safe="&="),
        "all-but-%": quote(password, safe="").replace("%25", "%"),
        "all-but-space": quote(password, safe=" "),
    }


def fragments(password: str, forms: dict[str, str]) -> set[str]:
    """Every 4-character piece of the password, decoded or as written."""
    return {text[i:i + 4] for text in (password, *forms.values()) for i in range(len(text) - 3)}


ENTRY_POINTS = [
    # (script, args before the URL, the URL's flag or None: its variable, variable)
    ("backup_database.py", [], None, "DATABASE_URL"),
    ("backup_database.py", [], "--database-url", None),
    ("restore_database.py", ["--latest"], None, "TARGET_DATABASE_URL"),
    ("restore_database.py", ["--latest"], "--target-database-url", None),
    ("verify_backup.py", ["--kind", "database", "--latest"], "--restore-into", None),
]
FAST_FORMS = ("encoded", "only-#-encoded")


def _leak_cases() -> list:
    cases = []
    for which, password in PASSWORDS.items():
        for form in written(password) if which == "reserved" else FAST_FORMS:
            for where in ("userinfo", "query"):
                for script, args, flag, variable in ENTRY_POINTS:
                    fast = form in FAST_FORMS and where == "userinfo" and (which, form) != ("reserved", "only-#-encoded")
                    cases.append(pytest.param(which, form, where, script, args, flag, variable,
                                              marks=[] if fast else [pytest.mark.slow],
                                              id=f"{script}-{flag or variable}-{which}-{where}-{form}"))
    return cases


@pytest.mark.parametrize(("which", "form", "where", "script", "args", "flag", "variable"), _leak_cases())
def test_no_fragment_of_a_database_password_in_any_output(run, pg, tmp_path, which, form, where, script, args, flag, variable):
    """The URL is refused, or reaches the server with a wrong password, or an unreachable one:
    stdout, stderr, the error file, the heartbeat's /fail body and the step summary hold no
    4-character piece of the password, decoded or as written."""
    from tests.test_heartbeat import Monitor

    raw = PASSWORDS[which]
    password = written(raw)[form]
    base = "postgresql://app-user@127.0.0.1:{port}/appdb"
    if where == "userinfo":
        url = base.replace("app-user@", f"app-user:{password}@")
    else:
        url = base + f"?password={password}&sslmode=disable"
    monitor = Monitor()
    try:
        for port in (pg.port, 1):  # a server that refuses the password, and none at all
            summary, errors = tmp_path / f"summary-{port}.md", tmp_path / f"errors-{port}.txt"
            target = url.format(port=port)
            env = {"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary), "BACKUP_ERROR_FILE": str(errors),
                   "BACKUP_HEARTBEAT_URL": monitor.url, "DATABASE_URL": None, "TARGET_DATABASE_URL": None}
            if variable:
                env[variable] = target
            done = run(script, *args, *([flag, target] if flag else []), env=env)
            assert done.returncode in (1, 2), done.stderr
            outputs = {"stdout": done.stdout, "stderr": done.stderr,
                       "error file": errors.read_text() if errors.exists() else "",
                       "step summary": summary.read_text() if summary.exists() else "",
                       "heartbeat": " ".join(p.body for p in monitor.pings)}
            assert error_lines(done.stderr), done.stderr
            leaked = {name: sorted(f for f in fragments(raw, {form: password}) if f in text)
                      for name, text in outputs.items()}
            assert not any(leaked.values()), (leaked, done.stderr)
            if done.returncode == 2:
                break  # refused before any connection: the port changes nothing
    finally:
        monitor.close()
