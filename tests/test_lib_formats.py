"""backupkit.formats: one registry knows every backup format, and a new compression is the
registry plus its stage. `fakez` (tests/fake_compression.py, a stdlib filter) is registered in
this test only, and a database backup goes through it and back (backup, list, verify, restore)
with every script unchanged."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from backupkit import formats
from backupkit.compression import ZSTD_MAGIC
from backupkit.errors import VerificationError
from backupkit.manifest import backup_key, build_manifest, key_time, match_key, validate_manifest
from dev.harness import table_fingerprint
from tests.conftest import PASSPHRASE
from tests.fake_compression import MAGIC, register

LAUNCHER = "tests/with_fake_compression.py"
NOW = datetime(2026, 11, 29, 10, 0, 0, tzinfo=UTC)
HEX = "ab" * 32


@pytest.fixture
def fakez():
    fmt = register()
    yield fmt
    formats.unregister(fmt)


def test_the_registry_holds_every_format_and_its_suffix():
    assert [(f.kind, f.compression.name, f.encryption.name, f.suffix) for f in formats.all_formats()] == [
        ("database", "zstd", "openssl-aes-256-cbc-pbkdf2", ".sql.zst.encrypted"),
        ("database", "none", "openssl-aes-256-cbc-pbkdf2", ".sql.encrypted"),
        ("files", "none", "aescrypt-v2", ".zip.encrypted"),
    ]
    assert formats.kinds() == ("database", "files")
    assert [c.name for c in formats.compressions("database")] == ["zstd", "none"]
    assert formats.find("files", "zstd") is None and formats.find("database", ["zstd"]) is None
    assert formats.detect_encryption(b"Salted__xxxxxxxx").name == "openssl-aes-256-cbc-pbkdf2"
    assert formats.detect_encryption(b"AES\x02\x00").name == "aescrypt-v2"
    assert formats.detect_encryption(b"PK\x03\x04") is None
    assert formats.sniff_compression("database", ZSTD_MAGIC + b"...").name == "zstd"
    assert formats.sniff_compression("database", b"--\n-- PostgreSQL").name == "none"
    with pytest.raises(ValueError, match="exists"):
        zstd = formats.find("database", "zstd")
        formats.register(formats.Format("database", ".sql", zstd.compression, zstd.encryption))


def fake_manifest(**changes) -> dict:
    manifest = build_manifest(
        kind="database", environment="production", key=backup_key("production", "database", NOW, "fakez"),
        version_id="v1", started_at=NOW, completed_at=NOW + timedelta(seconds=30), key_id="0" * 16,
        encrypted_size=10, encrypted_sha256=HEX, plaintext_size=20, plaintext_sha256=HEX,
        source={"database": "app", "server_version": "16.1", "pg_dump_version": "16.1"},
        compression={"compression": "fakez", "compressed_size": 5, "compressed_sha256": HEX})
    manifest.update(changes)
    return manifest


def test_a_registered_compression_is_known_everywhere_and_only_while_registered(fakez):
    key = "production/database/2026-11-29--10-00-00.sql.fz.encrypted"
    assert fakez.suffix == ".sql.fz.encrypted" and backup_key("production", "database", NOW, "fakez") == key
    assert match_key(key) and key_time(key) == NOW
    assert formats.sniff_compression("database", MAGIC + b"x").name == "fakez"
    assert formats.magic_length("database") == 4
    manifest = fake_manifest()
    assert validate_manifest(manifest)["compression"] == "fakez"
    with pytest.raises(VerificationError, match="lacks a valid 'compressed_size' or 'compressed_sha256'"):
        validate_manifest(fake_manifest(compressed_sha256="x"))
    with pytest.raises(VerificationError, match="says compression zstd, which does not fit the name"):
        validate_manifest(fake_manifest(compression="zstd"))
    formats.unregister(fakez)
    try:
        assert match_key(key) is None and key_time(key) is None
        with pytest.raises(VerificationError, match="not a backup key"):
            validate_manifest(manifest)
    finally:
        formats.register(fakez)


def test_a_database_backup_round_trips_through_a_compression_registered_in_a_test_only(
        run, pg, sample_db, s3server, bucket, scratch_db, tmp_path):
    done = run(LAUNCHER, "backup_database.py", "--database-url", pg.url(sample_db), "--compression", "fakez",
               "--compression-level", "6", "--json", check=True)
    manifest = json.loads(done.stdout)
    assert manifest["key"].endswith(".sql.fz.encrypted") and manifest["compression"] == "fakez"
    assert "fakez -6" in done.stderr
    body = s3server.client().get_object(Bucket=bucket, Key=manifest["key"])["Body"].read()
    # Stock openssl and the filter itself read it back: the stages are what the format says.
    stream = subprocess.run(["openssl", "enc", "-d", "-aes-256-cbc", "-pbkdf2", "-pass", "env:K"], input=body,
                            capture_output=True, check=True, env={"K": PASSPHRASE, "PATH": "/usr/bin:/bin"}).stdout
    assert stream.startswith(MAGIC)
    assert (len(stream), hashlib.sha256(stream).hexdigest()) == (manifest["compressed_size"], manifest["compressed_sha256"])
    sql = subprocess.run([sys.executable, "tests/fake_compression.py", "-d"], input=stream, capture_output=True,
                         check=True).stdout
    assert (len(sql), hashlib.sha256(sql).hexdigest()) == (manifest["plaintext_size"], manifest["plaintext_sha256"])

    listed = json.loads(run(LAUNCHER, "list_backups.py", "--kind", "database", "--json", check=True).stdout)
    assert [(b["key"], b["status"]) for b in listed] == [(manifest["key"], "complete")]
    verified = run(LAUNCHER, "verify_backup.py", "--kind", "database", "--latest", check=True)
    assert "fakez-compressed" in verified.stdout and "completion trailer present" in verified.stdout
    run(LAUNCHER, "restore_database.py", "--latest", "--target-database-url", pg.url(scratch_db), check=True)
    for table in ("applications", "admin_user"):
        assert table_fingerprint(pg, scratch_db, table) == table_fingerprint(pg, sample_db, table)

    # A local copy without its manifest: the registry tells the compression by the stream's magic.
    local = tmp_path / "backup.sql.fz.encrypted"
    local.write_bytes(body)
    restored = run(LAUNCHER, "restore_database.py", "--file", str(local), "--without-manifest", "--replace",
                   "--target-database-url", pg.url(scratch_db), check=True)
    assert "restored" in restored.stdout

    # Without the registration the scripts do not know the format: the backup is not one of theirs.
    plain = run("list_backups.py", "--kind", "database", "--json")
    assert manifest["key"] not in plain.stdout
