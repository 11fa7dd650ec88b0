"""Bad input to any script: flags, variables and files that are wrong. Each is a usage error
(exit 2) or an operational one (exit 1) with exactly one `error:` line that names the problem,
never a traceback, and nothing is changed anywhere."""

from __future__ import annotations

import os
import re

import pytest

from tests.backup_factory import openssl_encrypt
from tests.conftest import PASSPHRASE, error_lines, one_error, versions

VALID_ARGS = {
    "backup_database.py": [],
    "restore_database.py": ["--latest", "--target-database-url", "postgresql://postgres@127.0.0.1:1/nowhere"],
    "list_backups.py": [],
}


SCRIPTS_WITH_TARGET = list(VALID_ARGS)


def bad_run(run, script: str, *args: str, env: dict | None = None):
    return run(script, *args, env=env, input="", timeout=120)


def usage_error(done, code: int, *words: str) -> None:
    assert done.returncode == code, (done.returncode, done.stderr)
    one_error(done, *words)


@pytest.mark.parametrize("script", SCRIPTS_WITH_TARGET)
@pytest.mark.parametrize(("name", "how"), [("prod/uction", "env"), ("..", "flag"), ("Production", "env"), ("-prod", "flag"),
                                           ("prod\n", "env")])
def test_bad_environment_name(run, script, name, how):
    args = [f"--environment={name}"] if how == "flag" else []
    env = {"BACKUP_ENVIRONMENT": name} if how == "env" else {}
    usage_error(bad_run(run, script, *VALID_ARGS[script], *args, env=env), 2, "invalid environment")


@pytest.mark.parametrize("script", SCRIPTS_WITH_TARGET)
@pytest.mark.parametrize(("name", "how"), [("Bad_Bucket", "env"), ("s3://bucket", "flag")])
def test_bad_bucket_name(run, script, name, how):
    args = [f"--bucket={name}"] if how == "flag" else []
    env = {"BACKUP_BUCKET": name} if how == "env" else {}
    usage_error(bad_run(run, script, *VALID_ARGS[script], *args, env=env), 2, "invalid bucket")


@pytest.mark.parametrize("script", SCRIPTS_WITH_TARGET)
@pytest.mark.parametrize(("variable", "words"), [
    ("BACKUP_ENVIRONMENT", ("no environment", "BACKUP_ENVIRONMENT")),
    ("BACKUP_BUCKET", ("no bucket", "BACKUP_BUCKET")),
])
def test_missing_variable(run, script, variable, words):
    usage_error(bad_run(run, script, *VALID_ARGS[script], env={variable: None}), 2, *words)


@pytest.mark.parametrize(("script", "variable", "value"), [
    ("backup_database.py", "EXTERNAL_BACKUPS_NOW", "yesterday"),
    ("list_backups.py", "EXTERNAL_BACKUPS_NOW", "2026-13-45"),
    *[(script, "BACKUP_S3_READ_TIMEOUT", "soon") for script in SCRIPTS_WITH_TARGET],
    *[(script, "BACKUP_S3_CONNECT_TIMEOUT", "-1") for script in SCRIPTS_WITH_TARGET],
])
def test_malformed_variable(run, pg, sample_db, script, variable, value):
    # A reachable database, so the variable is the only thing wrong.
    live = {"DATABASE_URL": pg.url(sample_db), "TARGET_DATABASE_URL": pg.url("postgres")}
    args = ["--latest"] if script == "restore_database.py" else []
    usage_error(bad_run(run, script, *args, env={**live, variable: value}), 2, variable)


@pytest.mark.parametrize("script", SCRIPTS_WITH_TARGET)
def test_unknown_flag(run, script):
    usage_error(bad_run(run, script, *VALID_ARGS[script], "--frobnicate"), 2, "frobnicate")


BAD_URLS = ["not a url", "mysql://user:pw@db/app", "postgresql://", "app"]


@pytest.mark.parametrize("url", BAD_URLS)
def test_database_url_that_is_not_a_url(run, url):
    usage_error(bad_run(run, "backup_database.py", env={"DATABASE_URL": url}), 2, "DATABASE_URL")
    usage_error(bad_run(run, "backup_database.py", "--database-url", url), 2, "DATABASE_URL")
    usage_error(bad_run(run, "restore_database.py", "--latest", "--target-database-url", url), 2, "TARGET_DATABASE_URL")
    usage_error(bad_run(run, "restore_database.py", "--latest", env={"TARGET_DATABASE_URL": url}), 2, "TARGET_DATABASE_URL")
    assert "expected postgresql://USER@HOST:PORT/DATABASE, with the password in PGPASSWORD" in run.calls[-1].stderr  # not garbled by redaction


@pytest.mark.parametrize(("script", "args", "env", "code", "words"), [
    pytest.param("backup_database.py", [], {"EXTERNAL_BACKUP_ENCRYPTION_KEY": None}, 2, ("passphrase", "EXTERNAL_BACKUP_ENCRYPTION_KEY"),
                 id="backup-no-passphrase"),
    pytest.param("backup_database.py", [], {"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/app"}, 1, ("cannot query the database",),
                 id="backup-database-unreachable"),
    pytest.param("backup_database.py", [], {"PG_DUMP": "/nonexistent/pg_dump"}, 1, ("/nonexistent/pg_dump", "not found"),
                 id="backup-pg_dump-missing"),
    pytest.param("restore_database.py", [], {}, 2, ("one of the arguments",), id="restore-no-source"),
    pytest.param("restore_database.py", ["--latest"], {"TARGET_DATABASE_URL": None}, 2, ("no target database",), id="restore-no-target"),
    pytest.param("restore_database.py", ["--latest", "--version-id", "v1", "--target-database-url", "postgresql://u@h/d"], {}, 2,
                 ("--version-id",), id="restore-version-without-key"),
    pytest.param("restore_database.py", ["--latest", "--target-database-url", "postgresql://u@h/d"],
                 {"EXTERNAL_BACKUP_ENCRYPTION_KEY": None}, 2, ("passphrase",), id="restore-no-passphrase"),
    pytest.param("list_backups.py", ["--max-age", "soon"], {}, 2, ("invalid duration", "soon"), id="list-max-age-word"),
    pytest.param("list_backups.py", ["--max-age", "0h"], {}, 2, ("invalid duration",), id="list-max-age-zero"),
    pytest.param("list_backups.py", ["--max-age", "2 hours"], {}, 2, ("invalid duration",), id="list-max-age-spelled"),
    pytest.param("list_backups.py", ["--max-age", "-1h"], {}, 2, ("--max-age",), id="list-max-age-negative"),
    pytest.param("list_backups.py", ["--kind", "logs"], {}, 2, ("--kind", "logs"), id="list-bad-kind"),
    pytest.param("list_backups.py", ["--max-age", "1h"], {}, 1, ("no backups under",), id="list-max-age-nothing-there"),
])
def test_bad_input(run, script, args, env, code, words):
    usage_error(bad_run(run, script, *args, env=env), code, *words)


@pytest.fixture
def not_backups(tmp_path):
    (tmp_path / "empty.sql.encrypted").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("this is not a backup\n" * 10)
    (tmp_path / "a-directory").mkdir()
    return tmp_path


@pytest.mark.parametrize(("name", "restore_words", "decrypt_words"), [
    ("does-not-exist.sql.encrypted", ("no such file",), ("no such file",)),
    ("a-directory", ("no such file",), ("not a regular file",)),
    ("empty.sql.encrypted", ("empty",), ("empty",)),
    ("notes.txt", ("not an encrypted database backup",), ("not an encrypted backup",)),
])
def test_file_that_is_not_a_backup(run, pg, not_backups, name, restore_words, decrypt_words):
    path = str(not_backups / name)
    done = bad_run(run, "restore_database.py", "--file", path, "--target-database-url", pg.url("postgres"))
    usage_error(done, 2, *restore_words)
    done = bad_run(run, "./decrypt.py", "-i", path, "-o", str(not_backups / "out"))
    usage_error(done, 1, *decrypt_words)
    assert not (not_backups / "out").exists()


@pytest.mark.parametrize(("args", "env", "code", "words"), [
    pytest.param([], {}, 2, ("required",), id="no-arguments"),
    pytest.param(["-i", "x"], {}, 2, ("required",), id="no-output"),
    pytest.param(["-i", "SELF", "-o", "OUT", "--bogus"], {}, 2, ("--bogus",), id="unknown-flag"),
    pytest.param(["-i", "SELF", "-o", "SELF"], {}, 1, ("differ",), id="same-input-and-output"),
    pytest.param(["-i", "SELF", "-o", "/nonexistent/dir/out"], {}, 1, ("No such file",), id="output-directory-missing"),
    pytest.param(["-i", "SELF", "-o", "OUT"], {"EXTERNAL_BACKUP_ENCRYPTION_KEY": None}, 1, ("no passphrase",), id="no-passphrase"),
])
def test_decrypt_bad_input(run, tmp_path, args, env, code, words):
    encrypted = tmp_path / "backup.sql.encrypted"
    encrypted.write_bytes(openssl_encrypt(b"SELECT 1;\n", PASSPHRASE))
    args = [{"SELF": str(encrypted), "OUT": str(tmp_path / "out.sql")}.get(a, a) for a in args]
    usage_error(bad_run(run, "./decrypt.py", *args, env=env), code, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backup.sql.encrypted"]


# -- per script --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, env, expect",
    [
        (["--environment", "../prod"], {}, "invalid environment name"),
        (["--environment", "Prod"], {}, "invalid environment name"),
        (["--environment", "prod/db"], {}, "invalid environment name"),
        (["--bucket", "Not_A_Bucket"], {}, "invalid bucket name"),
        ([], {"EXTERNAL_BACKUP_ENCRYPTION_KEY": None}, "EXTERNAL_BACKUP_ENCRYPTION_KEY"),
        (["--database-url", "mysql://x@y/z"], {}, "not a PostgreSQL URL"),
        (["--compression", "gzip"], {}, "use zstd or none"),
        ([], {"BACKUP_COMPRESSION": "lz4"}, "use zstd or none"),
        (["--compression-level", "0"], {}, "use 1 to 19"),
        ([], {"BACKUP_COMPRESSION_LEVEL": "fast"}, "use 1 to 19"),
    ],
)
def test_backup_database_usage_errors(run, pg, sample_db, s3server, bucket, args, env, expect):
    done = run("backup_database.py", "--database-url", pg.url(sample_db), *args, env=env)
    assert done.returncode == 2, done.stderr
    assert expect in done.stderr and "Traceback" not in done.stderr
    assert versions(s3server.client(), bucket) == []


def test_backup_files_usage_errors(run):
    done = run("backup_files.py")
    assert done.returncode == 2 and error_lines(done.stderr)
    done = run("backup_files.py", "--source-bucket", "Not_A_Bucket")
    assert done.returncode == 2 and "source bucket" in done.stderr


@pytest.mark.parametrize(
    "args, expect, code",
    [
        (["--latest", "--key", "x"], "not allowed with", 2),
        ([], "one of the arguments", 2),
        (["--file", "/no/such/file"], "no such file", 2),
        (["--latest", "--environment", "../x"], "invalid environment name", 2),
        (["--latest", "--timeout", "soon"], "invalid duration 'soon'", 2),
        (["--latest", "--statement-timeout", "0s"], "invalid duration '0s'", 2),
    ],
)
def test_restore_database_usage_errors(run, pg, scratch_db, args, expect, code):
    done = run("restore_database.py", "--target-database-url", pg.url(scratch_db), *args)
    assert done.returncode == code and expect in done.stderr and "Traceback" not in done.stderr


def test_fetch_backup_usage_errors(run, tmp_path):
    assert run("fetch_backup.py", "--kind", "database", "--latest").returncode == 2
    assert run("fetch_backup.py", "--kind", "database", "--latest", "--version-id", "x", "--out", "f").returncode == 2
    assert run("fetch_backup.py", "--kind", "database", "--latest", "--out", str(tmp_path / "no" / "f")).returncode == 2


def test_bad_duration_is_a_usage_error(run):
    done = run("list_backups.py", "--max-age", "2 fortnights")
    assert done.returncode == 2
    assert "invalid duration" in done.stderr
    done = run("verify_backup.py", "--kind", "database", "--latest", env={"BACKUP_RESTORE_TIMEOUT": "forever"})
    assert done.returncode == 2 and "invalid duration 'forever'" in done.stderr


# -- input that reached 'unexpected failure' once ------------------------------------------------


@pytest.mark.parametrize(("args", "env", "code"), [
    (["list_backups.py", "--max-age", "99999999999w"], {}, 2),
    (["verify_backup.py", "--kind", "database", "--since", "99999999999w"], {}, 2),
    (["backup_database.py"], {"DATABASE_URL": "postgresql://[::1"}, 2),
    (["backup_database.py"], {"DATABASE_URL": "postgresql://u:pw@db:notaport/app"}, 2),
    (["list_backups.py"], {"AWS_ENDPOINT_URL": "htp//bad endpoint"}, 2),
    (["list_backups.py"], {"AWS_ENDPOINT_URL": "http://127.0.0.1:notaport"}, 2),
    (["fetch_backup.py", "--kind", "database", "--latest", "--out", "/proc/x"], {}, 2),
    (["restore_database.py", "--latest", "--target-database-url", "postgresql://u@h/d"], {"EXTERNAL_BACKUP_ENCRYPTION_KEY": "a\nb"}, 2),
])
def test_bad_input_is_one_clear_error(run, args, env, code):
    done = run(*args, env=env)
    assert done.returncode == code, done.stderr
    assert len(error_lines(done.stderr)) == 1 and "unexpected failure" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("script", ["backup_database.py", "restore_database.py", "verify_backup.py"])
def test_help_teaches_pgpassword_and_shows_no_password_in_a_url(run, script):
    """The runbook keeps passwords off command lines; the help must not show one inside a URL."""
    done = run(script, "--help", check=True)
    assert "PGPASSWORD" in done.stdout
    assert not re.search(r"postgres(ql)?://[^\s@/]*:[^\s@/]*@", done.stdout), done.stdout


def test_a_multi_host_url_is_taken_as_libpq_takes_it(run, pg, sample_db, scratch_db):
    """postgresql://u@h1:p1,h2:p2/db: libpq tries each host in turn (here the first refuses), the
    password comes from PGPASSWORD (issue 21, item 14: such URLs were refused)."""
    def hosts(database: str) -> str:
        return f"postgresql://{pg.user}@127.0.0.1:1,127.0.0.1:{pg.port}/{database}"

    env = {"PGPASSWORD": pg.password}
    done = run("backup_database.py", env={**env, "DATABASE_URL": hosts(sample_db)})
    assert done.returncode == 0, done.stderr
    done = run("restore_database.py", "--latest", "--target-database-url", hosts(scratch_db), env=env)
    assert done.returncode == 0, done.stderr
    assert pg.psql("SELECT count(*) FROM applications", scratch_db) == pg.psql("SELECT count(*) FROM applications", sample_db)


def test_a_fifo_in_place_of_a_backup_or_its_manifest_never_hangs(run, pg, scratch_db, tmp_path):
    """A FIFO named IN.manifest.json (or IN itself) is refused without being opened for a
    blocking read, which would wait for a writer forever (issue 21, item 14)."""
    encrypted = tmp_path / "x.sql.encrypted"
    encrypted.write_bytes(openssl_encrypt(b"SELECT 1;\n-- PostgreSQL database dump complete\n", PASSPHRASE))
    os.mkfifo(f"{encrypted}.manifest.json")
    done = run("./decrypt.py", "-i", str(encrypted), "-o", str(tmp_path / "out.sql"), input="", timeout=30)
    usage_error(done, 1, "not a regular file", "manifest")
    done = run("restore_database.py", "--file", str(encrypted), "--target-database-url", pg.url(scratch_db), input="", timeout=30)
    assert done.returncode in (1, 2), done.stderr
    one_error(done, "manifest")
    fifo = tmp_path / "fifo.sql.encrypted"
    os.mkfifo(fifo)
    done = run("./decrypt.py", "-i", str(fifo), "-o", str(tmp_path / "out.sql"), input="", timeout=30)
    usage_error(done, 1, "not a regular file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo.sql.encrypted", "x.sql.encrypted", "x.sql.encrypted.manifest.json"]


def test_a_profile_that_access_keys_override_is_said_to_be_ignored(run, tmp_path):
    """boto3 takes AWS_ACCESS_KEY_ID before AWS_PROFILE: switching to a profile with the keys of
    an earlier step still set would silently change nothing (the runbook's on-call walk)."""
    config = tmp_path / "aws-config"
    config.write_text("[profile restorer]\nregion = us-east-1\n")
    done = run("list_backups.py", env={"AWS_CONFIG_FILE": str(config), "AWS_PROFILE": "restorer"})
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: AWS_PROFILE")]
    assert len(warnings) == 1, done.stderr
    assert "boto3 uses the keys (access key id testing), not the profile" in warnings[0]
    assert "unset AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN" in warnings[0]
    done = run("list_backups.py", env={"AWS_CONFIG_FILE": str(config), "AWS_PROFILE": "restorer", "AWS_ACCESS_KEY_ID": None,
                                       "AWS_SECRET_ACCESS_KEY": None})
    assert "warning: AWS_PROFILE" not in done.stderr
