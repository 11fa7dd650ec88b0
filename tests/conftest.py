"""Shared fixtures: a real PostgreSQL cluster, a moto S3 server over HTTP, and a runner that
starts the scripts as an operator would (subprocess, real argv, environment variables)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dev.harness import REPO, PostgresCluster, S3Server, create_sample_database
from dev.measure import TreeMemory

PASSPHRASE = "correct-horse-Passphrase-91c2"
OLD_PASSPHRASE = "old-battery-Passphrase-55aa"
_counter = itertools.count()


@pytest.fixture(scope="session")
def pg():
    cluster = PostgresCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def s3server():
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sample_db(pg):
    """The sample app database (do not modify it in tests)."""
    create_sample_database(pg, "app", rows=1500)
    return "app"


@pytest.fixture
def bucket(s3server):
    return s3server.create_bucket(f"ext-backups-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def scratch_db(pg):
    """An empty database, dropped afterwards."""
    name = f"scratch_{os.getpid()}_{next(_counter)}"
    pg.create_database(name)
    yield name
    pg.drop_database(name)


@dataclass
class Runner:
    """Runs scripts with a clean environment built from the fixtures."""

    env: dict[str, str]
    cwd: Path = REPO
    calls: list = field(default_factory=list)

    def command(self, script: str, *args: str) -> list[str]:
        path = REPO / script if script.endswith(".py") and "/" in script else REPO / "scripts" / script
        return [sys.executable, str(path), *args]

    def __call__(self, script: str, *args: str, env: dict | None = None, check: bool | None = None,
                 timeout: float = 300, input: str | None = None) -> subprocess.CompletedProcess:
        merged = {**self.env, **(env or {})}
        merged = {k: v for k, v in merged.items() if v is not None}
        done = subprocess.run(self.command(script, *args), env=merged, cwd=self.cwd, capture_output=True,
                              text=True, timeout=timeout, input=input)
        self.calls.append(done)
        if check is True and done.returncode != 0:
            raise AssertionError(f"{script} {args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def popen(self, script: str, *args: str, env: dict | None = None) -> subprocess.Popen:
        merged = {**self.env, **(env or {})}
        merged = {k: v for k, v in merged.items() if v is not None}
        return subprocess.Popen(self.command(script, *args), env=merged, cwd=self.cwd,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def measured(self, script: str, *args: str, env: dict | None = None, interval: float = 0.1,
                 timeout: float = 300) -> tuple[subprocess.CompletedProcess, TreeMemory]:
        """Run a script while `TreeMemory` samples it and its children every `interval` seconds;
        returns the finished process (its exit code unchecked) and the memory figures."""
        proc = self.popen(script, *args, env=env)
        with TreeMemory(proc.pid, interval=interval) as memory:
            stdout, stderr = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), memory


def base_env() -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER", "SYSTEMROOT")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env["PYTHONPATH"] = str(REPO)
    env["BACKUP_PROGRESS_INTERVAL"] = "1"
    return env


@pytest.fixture
def run(s3server, bucket, pg):
    env = {
        **base_env(),
        **s3server.env(),
        "BACKUP_BUCKET": bucket,
        "BACKUP_ENVIRONMENT": "production",
        "EXTERNAL_BACKUP_ENCRYPTION_KEY": PASSPHRASE,
        "PG_DUMP": str(pg.bin / "pg_dump"),
        "PSQL": str(pg.bin / "psql"),
        # The fixtures' databases belong to the cluster's superuser; the tests of the refusal
        # (and of a restore as the app's own role) take this out.
        "BACKUP_ALLOW_SUPERUSER": "1",
    }
    return Runner(env)


APP_ROLE, APP_PASSWORD = "app_owner", "owner-pw-3"


def app_role(pg) -> None:
    """The app's own role (APP_ROLE, APP_PASSWORD): logs in, not a superuser, no CREATEDB, no
    settings."""
    pg.psql(f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN "
            f"CREATE ROLE {APP_ROLE} LOGIN NOSUPERUSER; END IF; END $$")
    pg.psql(f"ALTER ROLE {APP_ROLE} RESET ALL; ALTER ROLE {APP_ROLE} PASSWORD '{APP_PASSWORD}'")


@pytest.fixture
def app_db(pg):
    """An empty database owned by the app's own role, not a superuser: the restore target the
    README asks for. Yields (name, URL with the password); the role starts with no settings."""
    app_role(pg)
    name = f"app_owned_{os.getpid()}_{next(_counter)}"
    pg.drop_database(name)
    pg.psql(f'CREATE DATABASE "{name}" OWNER {APP_ROLE}')
    yield name, f"postgresql://{APP_ROLE}:{APP_PASSWORD}@127.0.0.1:{pg.port}/{name}"
    pg.drop_database(name)


def role_untouched(pg, database: str) -> None:
    """The app's role has no settings and still logs in with its password."""
    assert pg.psql(f"SELECT rolconfig FROM pg_roles WHERE rolname = '{APP_ROLE}'") == ""
    login = subprocess.run([str(pg.bin / "psql"), "-X", "-A", "-t", "-c", "SELECT 1",
                            f"postgresql://{APP_ROLE}@127.0.0.1:{pg.port}/{database}"],
                           env={**os.environ, "PGPASSWORD": APP_PASSWORD}, capture_output=True, text=True)
    assert login.stdout.strip() == "1", login.stderr


def versions(client, bucket: str, prefix: str = "") -> list[dict]:
    """Every object version in the bucket (to assert nothing was completed)."""
    out = []
    for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        out += page.get("Versions", [])
    return out


def public_tables(pg, database: str) -> str:
    """How many tables the database's public schema holds, as psql prints it ("0" when none)."""
    return pg.psql("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'", database)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def one_error(done, *words: str) -> str:
    """Exactly one `error:` line, no traceback; the line names the problem (each of `words`)."""
    stderr = done.stderr
    assert "Traceback" not in stderr, stderr
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    print(lines[0])  # shown with -s: read them as an operator would
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]
    return lines[0]
