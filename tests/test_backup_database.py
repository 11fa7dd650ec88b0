"""backup_database.py as an operator runs it: real PostgreSQL, real pg_dump/openssl, S3 over HTTP."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time

import pytest

from dev.harness import table_fingerprint
from tests.conftest import PASSPHRASE, error_lines, versions

ENV = "production"


def only_backup(client, bucket):
    objects = versions(client, bucket)
    data = [v for v in objects if v["Key"].endswith((".sql.encrypted", ".sql.zst.encrypted"))]
    manifests = [v for v in objects if v["Key"].endswith(".manifest.json")]
    return data, manifests


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_backup_writes_object_and_manifest_that_match(run, pg, sample_db, s3server, bucket, tmp_path, compression):
    done = run("backup_database.py", "--database-url", pg.url(sample_db), "--compression", compression, "--json", check=True)
    manifest = json.loads(done.stdout)
    client = s3server.client()
    data, manifests = only_backup(client, bucket)
    assert len(data) == 1 and len(manifests) == 1
    assert data[0]["Key"] == manifest["key"]
    suffix = ".sql.zst.encrypted" if compression == "zstd" else ".sql.encrypted"
    assert manifest["key"].startswith(f"{ENV}/database/") and manifest["key"].endswith(suffix)
    assert manifest["version_id"] == data[0]["VersionId"]
    stored = json.loads(client.get_object(Bucket=bucket, Key=manifest["key"] + ".manifest.json")["Body"].read())
    assert stored == manifest
    body = client.get_object(Bucket=bucket, Key=manifest["key"])["Body"].read()
    assert body.startswith(b"Salted__")
    assert len(body) == manifest["encrypted_size"]
    assert hashlib.sha256(body).hexdigest() == manifest["encrypted_sha256"]
    assert manifest["encryption"] == "openssl-aes-256-cbc-pbkdf2" and manifest["compression"] == compression
    # The SQL (end to end) and, when compressed, the zstd stream that openssl encrypted.
    sql = subprocess.run(["bash", "-c", "set -o pipefail; openssl enc -d -aes-256-cbc -pbkdf2 -pass env:K | tee stream | zstd -dcf"],
                         input=body, capture_output=True, check=True, env={"K": PASSPHRASE, "PATH": "/usr/bin:/bin"},
                         cwd=tmp_path).stdout
    stream = (tmp_path / "stream").read_bytes()
    assert (len(sql), hashlib.sha256(sql).hexdigest()) == (manifest["plaintext_size"], manifest["plaintext_sha256"])
    if compression == "zstd":
        assert (len(stream), hashlib.sha256(stream).hexdigest()) == (manifest["compressed_size"], manifest["compressed_sha256"])
        assert len(stream) * 2 < len(sql)
    else:
        assert stream == sql and "compressed_size" not in manifest
    assert manifest["source"] == {"database": sample_db, "server_version": manifest["source"]["server_version"],
                                  "pg_dump_version": manifest["source"]["pg_dump_version"]}
    assert len(manifest["key_id"]) == 16 and PASSPHRASE not in json.dumps(manifest)
    assert pg.password not in json.dumps(manifest) and pg.password not in done.stderr + done.stdout


def test_stock_openssl_decrypts_to_sql_that_psql_restores(run, pg, sample_db, s3server, bucket, scratch_db, tmp_path):
    """The contract's promise for --compression none, the original format:
    `openssl enc -d -aes-256-cbc -pbkdf2 -in F -out database-backup.sql -pass pass:PASSWORD`."""
    manifest = json.loads(run("backup_database.py", "--database-url", pg.url(sample_db), "--compression", "none", "--json",
                              check=True).stdout)
    encrypted = tmp_path / "backup.sql.encrypted"
    encrypted.write_bytes(s3server.client().get_object(Bucket=bucket, Key=manifest["key"])["Body"].read())
    plain = tmp_path / "database-backup.sql"
    subprocess.run(["openssl", "enc", "-d", "-aes-256-cbc", "-pbkdf2", "-in", str(encrypted), "-out", str(plain),
                    "-pass", f"pass:{PASSPHRASE}"], check=True)
    sql = plain.read_bytes()
    assert b"-- PostgreSQL database dump complete" in sql[-1024:]
    assert b"DROP TABLE IF EXISTS" in sql and b"OWNER TO" not in sql and b"GRANT " not in sql
    assert hashlib.sha256(sql).hexdigest() == manifest["plaintext_sha256"]
    subprocess.run([str(pg.bin / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction",
                    "-f", str(plain), pg.url(scratch_db)], check=True, capture_output=True)
    for table in ("applications", "admin_user"):
        assert table_fingerprint(pg, scratch_db, table) == table_fingerprint(pg, sample_db, table)


def test_password_from_pg_variables_when_no_url(run, pg, sample_db, s3server, bucket):
    done = run("backup_database.py", env={"PGHOST": "127.0.0.1", "PGPORT": str(pg.port), "PGUSER": "postgres",
                                          "PGDATABASE": sample_db, "PGPASSWORD": pg.password}, check=True)
    assert "backed up database" in done.stdout
    assert len(only_backup(s3server.client(), bucket)[1]) == 1


@pytest.mark.parametrize(
    "url_for, expect",
    [
        (lambda pg: f"postgresql://postgres:wrong-password@127.0.0.1:{pg.port}/app", "password authentication failed"),
        (lambda pg: pg.url("no_such_database"), "no_such_database"),
        (lambda pg: "postgresql://postgres:x@127.0.0.1:1/app", "connect"),
    ],
    ids=["wrong-password", "wrong-database", "unreachable"],
)
def test_database_problems_fail_cleanly(run, pg, sample_db, s3server, bucket, url_for, expect):
    done = run("backup_database.py", "--database-url", url_for(pg))
    assert done.returncode == 1
    errors = error_lines(done.stderr)
    assert len(errors) == 1 and expect in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert versions(s3server.client(), bucket) == []


def test_missing_bucket_fails_and_leaves_nothing(run, pg, sample_db):
    done = run("backup_database.py", "--database-url", pg.url(sample_db), "--bucket", "no-such-bucket-here")
    assert done.returncode == 1
    assert "does not exist" in done.stderr and len(error_lines(done.stderr)) == 1


def test_old_pg_dump_is_refused_with_what_to_install(run, pg, sample_db, s3server, bucket, tmp_path):
    fake = tmp_path / "pg_dump"
    fake.write_text("#!/bin/sh\necho 'pg_dump (PostgreSQL) 9.6.24'\n")
    fake.chmod(0o755)
    done = run("backup_database.py", "--database-url", pg.url(sample_db), "--pg-dump", str(fake),
               env={"PSQL": None})
    assert done.returncode == 1
    assert f"install postgresql-client-{pg.psql('SHOW server_version_num')[:2]}" in done.stderr
    assert versions(s3server.client(), bucket) == []


@pytest.mark.slow
def test_memory_stays_bounded_on_a_large_dump(run, pg, s3server, bucket):
    """Peak RSS of the backup process (and of every child) on a dump of several hundred MB."""
    name = "largedump"
    pg.create_database(name)
    try:
        pg.psql("CREATE TABLE big AS SELECT i, repeat(md5(i::text), 12) AS a, md5((i*3)::text) AS b "
                "FROM generate_series(1, 900000) i", name)
        began = time.monotonic()
        done, memory = run.measured("backup_database.py", "--database-url", pg.url(name), "--json", interval=0.1, timeout=600)
        seconds = time.monotonic() - began
        assert done.returncode == 0, done.stderr
        manifest = json.loads(done.stdout)
        size_mb = manifest["plaintext_size"] / 1e6
        print(f"\ndump {size_mb:.0f} MB in {seconds:.1f} s ({size_mb / seconds:.0f} MB/s); peak RSS: "
              f"backup_database.py {memory.per_name.get('python', memory.peak_process_kib) / 1024:.0f} MiB, "
              f"whole tree {memory.peak_tree_kib / 1024:.0f} MiB; {memory.per_name}")
        assert manifest["plaintext_size"] > 300_000_000
        assert memory.peak_process_kib < 100 * 1024
    finally:
        pg.drop_database(name)
