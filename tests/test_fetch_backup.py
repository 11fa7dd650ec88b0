"""fetch_backup.py: the encrypted backup and its manifest land beside each other, checked;
decrypt.py and the stock openssl command both turn it back into the data."""

from __future__ import annotations

import json
import os
import stat
import subprocess

import pytest

from dev.harness import table_fingerprint
from tests.backup_factory import at, database_backup, flip_byte, put_with_manifest, read_object, streamed_zip, upload_archive
from tests.conftest import PASSPHRASE, error_lines


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_fetch_decrypt_and_psql_reproduce_the_data(run, pg, sample_db, scratch_db, tmp_path, compression):
    manifest = database_backup(run, pg=pg, compression=compression)
    assert manifest["key"].endswith(".sql.zst.encrypted" if compression == "zstd" else ".sql.encrypted")
    out = tmp_path / "backup.encrypted"
    done = run("fetch_backup.py", "--kind", "database", "--latest", "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["key"] == manifest["key"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert json.loads((tmp_path / "backup.encrypted.manifest.json").read_text()) == manifest
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    sql = tmp_path / "database-backup.sql"
    done = run("./decrypt.py", "--filein", str(out), "--fileout", str(sql), env={"PYTHONPATH": None})
    assert done.returncode == 0, done.stderr
    assert "checked against its manifest" in done.stdout
    assert sql.stat().st_size == manifest["plaintext_size"]  # the plain SQL, decompressed
    subprocess.run([str(pg.bin / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction",
                    f"--dbname={pg.url(scratch_db, password=False)}", "-f", str(sql)],
                   env=pg.env(), check=True, capture_output=True)
    for table in ("applications", "admin_user"):
        assert table_fingerprint(pg, scratch_db, table) == table_fingerprint(pg, sample_db, table)

    # The stock commands an operator finds in any tutorial turn it back into the same SQL: openssl,
    # then zstd (-f passes an uncompressed dump through unchanged), straight into psql too.
    stock = tmp_path / "stock.sql"
    shell = {**os.environ, "BACKUP_PASS": PASSPHRASE, "PGPASSWORD": pg.password}
    decrypt = f"openssl enc -d -aes-256-cbc -pbkdf2 -in {out} -pass env:BACKUP_PASS"
    subprocess.run(["bash", "-c", f"set -o pipefail; {decrypt} | zstd -dcf > {stock}"], env=shell, check=True)
    assert stock.read_bytes() == sql.read_bytes()
    if compression == "none":  # the original system's documented command, byte for byte
        subprocess.run(["openssl", "enc", "-d", "-aes-256-cbc", "-pbkdf2", "-in", str(out), "-out", str(tmp_path / "orig.sql"),
                        "-pass", "env:BACKUP_PASS"], env=shell, check=True)
        assert (tmp_path / "orig.sql").read_bytes() == sql.read_bytes()
    pg.drop_database(scratch_db)
    pg.create_database(scratch_db)
    zstd = "zstd -d" if compression == "zstd" else "cat"
    subprocess.run(["bash", "-c", f"set -o pipefail; {decrypt} | {zstd} | {pg.bin / 'psql'} -X -q -o /dev/null -v ON_ERROR_STOP=1 "
                    f"--single-transaction {pg.url(scratch_db, password=False)}"], env=shell, check=True, capture_output=True)
    assert table_fingerprint(pg, scratch_db, "applications") == table_fingerprint(pg, sample_db, "applications")


def test_fetch_files_backup_and_decrypt(run, s3server, bucket, tmp_path):
    archive = streamed_zip({"a.txt": b"hello", "b/c.bin": bytes(range(256))})
    manifest = upload_archive(s3server.client(), bucket, at(1), archive, PASSPHRASE, 2)
    out = tmp_path / "files.zip.encrypted"
    run("fetch_backup.py", "--kind", "files", "--key", manifest["key"].rsplit("/", 1)[1], "--out", str(out), check=True)
    done = run("./decrypt.py", "-i", str(out), "-o", str(tmp_path / "files.zip"), env={"PYTHONPATH": None})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "files.zip").read_bytes() == archive


def test_latest_skips_a_newer_corrupt_backup(run, pg, sample_db, s3server, bucket, tmp_path):
    client = s3server.client()
    older = database_backup(run, pg=pg, started_at=at(2))
    newer = database_backup(run, pg=pg, started_at=at(1))
    body = read_object(client, bucket, newer["key"], newer["version_id"])
    # The newer key's only version is replaced in the catalogue's eyes by a damaged newest version
    # (and a manifest copied from the good one); its original version stays good.
    bad = put_with_manifest(client, bucket, newer["key"], flip_byte(body, 50), newer)
    out = tmp_path / "latest.sql.encrypted"
    done = run("fetch_backup.py", "--kind", "database", "--latest", "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["key"], result["version_id"]) == (newer["key"], newer["version_id"])
    [skipped] = result["skipped"]
    assert (skipped["version_id"], skipped["problem"]) == (bad["version_id"], "corrupt")
    assert f"skipped {newer['key']} (version {bad['version_id']})" in done.stderr
    assert older["key"] not in done.stdout


def test_a_corrupt_backup_leaves_nothing_behind(run, pg, sample_db, s3server, bucket, tmp_path):
    client = s3server.client()
    good = database_backup(run, pg=pg)
    body = read_object(client, bucket, good["key"], good["version_id"])
    bad = put_with_manifest(client, bucket, good["key"], body[:-16], good)
    out = tmp_path / "bad.sql.encrypted"
    done = run("fetch_backup.py", "--kind", "database", "--key", good["key"], "--version-id", bad["version_id"], "--out", str(out))
    assert done.returncode == 1
    assert "truncated or corrupted" in error_lines(done.stderr)[0]
    assert list(tmp_path.iterdir()) == []


