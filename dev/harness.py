"""Throwaway local services for tests, `make demo` and `make bench`: a PostgreSQL cluster started
from the machine's server binaries, and an S3 endpoint (moto's server) over HTTP."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bin_dir() -> Path:
    """PG_BIN, else the newest /usr/lib/postgresql/N/bin with a server, else pg_config's."""
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise RuntimeError("PostgreSQL server binaries not found: apt-get install postgresql (or set PG_BIN)")


class PostgresCluster:
    """initdb + pg_ctl in a temp dir on a free port, password authentication on 127.0.0.1.

    As root the server runs as the unprivileged `postgres` user (PostgreSQL refuses root).
    """

    def __init__(self, password: str = "pg-s3cret@42", user: str = "postgres"):
        self.password = password
        self.user = user
        self.bin = postgres_bin_dir()
        self.port = free_port()
        self.base = Path(tempfile.mkdtemp(prefix="backup-test-pg-"))
        self.data = self.base / "data"
        self._run_as: list[str] = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.base, owner.pw_uid, owner.pw_gid)
            self._run_as = ["runuser", "-u", "postgres", "--"]

    def _server_cmd(self, *argv: str) -> None:
        subprocess.run([*self._run_as, *argv], check=True, capture_output=True, cwd=self.base)

    def start(self) -> PostgresCluster:
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._run_as:
            shutil.chown(pwfile, "postgres")
        os.chmod(pwfile, 0o600)
        self._server_cmd(str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user, "--auth=scram-sha-256",
                         f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C", "--no-sync")
        pwfile.unlink()
        options = (f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=50")
        self._server_cmd(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options,
                         "-l", str(self.base / "server.log"), "-w", "-t", "60", "start")
        return self

    def stop(self) -> None:
        try:
            self._server_cmd(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.base, ignore_errors=True)

    def url(self, database: str = "postgres", password: bool = True) -> str:
        auth = f"{self.user}:{quote(self.password, safe='')}" if password else self.user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    def env(self) -> dict[str, str]:
        return {**os.environ, "PGPASSWORD": self.password}

    def psql(self, sql: str, database: str = "postgres", check: bool = True) -> str:
        done = subprocess.run(
            [str(self.bin / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-d", database],
            input=sql, capture_output=True, text=True, env=self.env(), check=False,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr}")
        return done.stdout.strip()

    def create_database(self, name: str) -> str:
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


SAMPLE_SCHEMA = """
CREATE TABLE applications (
    id bigserial PRIMARY KEY,
    applicant text NOT NULL,
    answers jsonb NOT NULL,
    attachment bytea,
    submitted_at timestamptz NOT NULL,
    decided_on date
);
CREATE TABLE admin_user (
    id serial PRIMARY KEY,
    email text UNIQUE NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
"""

SAMPLE_ADMIN = "INSERT INTO admin_user (email) VALUES ('admin@example.org');"


def create_sample_database(cluster: PostgresCluster, name: str, rows: int = 500) -> str:
    """The sample app database: jsonb, bytea, timestamps and unicode text, plus the default admin
    row the app creates when it starts."""
    url = cluster.create_database(name)
    cluster.psql(
        SAMPLE_SCHEMA
        + SAMPLE_ADMIN
        + f"""
INSERT INTO applications (applicant, answers, attachment, submitted_at, decided_on)
SELECT
    (ARRAY['Zoë Ångström', 'José Müller', '李小龍', 'Ólafur Þórsson', 'O''Brien; DROP TABLE x; --'])[1 + i % 5] || ' #' || i,
    jsonb_build_object('n', i, 'tags', jsonb_build_array('a', 'ß', i % 7), 'note', repeat('ü', i % 13)),
    CASE WHEN i % 4 = 0 THEN NULL ELSE decode(md5(i::text) || md5((i * 7)::text), 'hex') END,
    timestamptz '2026-01-01 00:00:00+00' + i * interval '37 minutes 13.123456 seconds',
    CASE WHEN i % 3 = 0 THEN date '2026-02-01' + i END
FROM generate_series(1, {rows}) AS i;
""",
        name,
    )
    return url


def table_fingerprint(cluster: PostgresCluster, database: str, table: str) -> str:
    """md5 of every row of a table in primary-key order: equal fingerprints, equal data."""
    return cluster.psql(f"SELECT count(*) || ':' || coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM {table} t", database)


class S3Server:
    """moto's S3 (and IAM/STS) server on 127.0.0.1, reached over HTTP like any S3 endpoint."""

    def __init__(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log per request

        self.port = free_port()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self):
        import boto3

        env = self.env()
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_REGION"],
        )

    def create_bucket(self, name: str, object_lock: bool = True) -> str:
        client = self.client()
        client.create_bucket(Bucket=name, ObjectLockEnabledForBucket=object_lock)
        if not object_lock:
            client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        return name
