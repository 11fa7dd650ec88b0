"""A new encryption is the registry plus its stage: `fakecrypt` (tests/fake_encryption.py, a stdlib
stream cipher with a magic, a salt and a rule for its secret of its own) is registered in these
tests only, as the default of both kinds, and a database backup and a files backup go through it
and back (backup, list, verify, restore from the bucket and from a file, the loss tripwire's profiles)
with every script and every reader unchanged. Also: the plain ZIP restore_files.py --file takes is a registered plain
format, which no manifest, key or bucket read accepts."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess

import pytest

from backupkit import formats
from backupkit.crypto import PLAIN_ZIP
from backupkit.errors import UsageError, VerificationError
from backupkit.manifest import validate_manifest
from backupkit.retrieve import local_format
from dev.harness import table_fingerprint
from tests.backup_factory import at
from tests.conftest import OLD_PASSPHRASE, PASSPHRASE, error_lines
from tests.fake_encryption import MAGIC, decrypt, encrypt, register
from tests.files_helpers import Obj, download, expected_snapshot, fill, new_bucket, snapshot

LAUNCHER = "tests/with_fake_encryption.py"
FAKE = "fakecrypt-v1"
SAMPLE = {
    "docs/a.txt": Obj(b"alpha\n", "text/plain", {"author": "ann"}),
    "img/c.png": Obj(bytes(range(256)) * 40, "image/png", {"w": "10"}),
    "d é/zero": Obj(b""),
}


@pytest.fixture
def fakecrypt():
    added = register()
    yield added
    for fmt in added:
        formats.unregister(fmt)


def test_a_registered_encryption_is_the_default_and_known_only_while_registered(fakecrypt, tmp_path):
    assert [(f.kind, f.compression.name, f.suffix) for f in fakecrypt] == [
        ("files", "none", ".zip.fkc"), ("database", "none", ".sql.fkc"), ("database", "zstd", ".sql.zst.fkc")]
    assert formats.default("database").suffix == ".sql.zst.fkc" and formats.default("files").suffix == ".zip.fkc"
    assert formats.detect_encryption(MAGIC + b"salt").name == FAKE
    path = tmp_path / "x.zip.fkc"
    path.write_bytes(MAGIC + b"\0" * 40)
    assert local_format(str(path), "files").name == FAKE
    for fmt in fakecrypt:
        formats.unregister(fmt)
    try:
        with pytest.raises(UsageError, match=r"is not an encrypted files backup \(AES Crypt\)$"):
            local_format(str(path), "files")
        assert formats.detect_encryption(MAGIC) is None
    finally:
        for fmt in fakecrypt:
            formats.register(fmt, default=True)


def test_the_fake_cipher_round_trips_and_refuses_a_wrong_passphrase():
    plain = bytes(range(256)) * 1000
    sealed = io.BytesIO()
    encrypt(io.BytesIO(plain), sealed, PASSPHRASE, 4096)
    assert sealed.getvalue().startswith(MAGIC) and plain not in sealed.getvalue()
    out = io.BytesIO()
    decrypt(io.BytesIO(sealed.getvalue()), out, PASSPHRASE)
    assert out.getvalue() == plain
    with pytest.raises(VerificationError, match=r"decryption failed, wrong passphrase or corrupted backup \(fakecrypt: wrong passphrase\)"):
        decrypt(io.BytesIO(sealed.getvalue()), io.BytesIO(), OLD_PASSPHRASE)


def test_the_plain_zip_is_a_registered_plain_format_and_never_a_backup_format(tmp_path):
    assert formats.plain("files").encryption is PLAIN_ZIP and formats.plain("database") is None
    assert PLAIN_ZIP not in formats.encryptions("files") and formats.detect_encryption(b"PK\x03\x04") is None
    with pytest.raises(ValueError, match="does not encrypt"):
        formats.register(formats.Format("files", ".zip", formats.uncompressed("files").compression, PLAIN_ZIP))
    path = tmp_path / "plain.zip"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 40)
    assert local_format(str(path), "files", plain=True) is PLAIN_ZIP
    with pytest.raises(UsageError, match=r"is not an encrypted files backup \(AES Crypt\)$"):
        local_format(str(path), "files")
    with pytest.raises(UsageError, match=r"is not an encrypted database backup \(no 'Salted__' header\)$"):
        local_format(str(path), "database", plain=True)
    manifest = {"manifest_version": 1, "kind": "files", "environment": "production",
                "key": "production/files/2026-11-29--10-00-00.zip.encrypted", "version_id": "v1",
                "started_at": "2026-11-29T10:00:00Z", "completed_at": "2026-11-29T10:01:00Z",
                "encryption": PLAIN_ZIP.name, "key_id": "0" * 16, "encrypted_size": 10, "encrypted_sha256": "ab" * 32,
                "plaintext_size": 10, "plaintext_sha256": "ab" * 32, "tool_version": "1",
                "source": {"bucket": "b", "prefix": "", "object_count": 0, "total_bytes": 0, "skipped": []}}
    with pytest.raises(VerificationError, match="says encryption 'none', which is not how files backups are made"):
        validate_manifest(manifest)


def test_a_database_backup_round_trips_through_an_encryption_registered_in_a_test_only(
        run, pg, sample_db, s3server, bucket, scratch_db, tmp_path):
    done = run(LAUNCHER, "backup_database.py", "--database-url", pg.url(sample_db), "--json", check=True)
    manifest = json.loads(done.stdout)
    assert manifest["key"].endswith(".sql.zst.fkc") and manifest["encryption"] == FAKE
    body = s3server.client().get_object(Bucket=bucket, Key=manifest["key"])["Body"].read()
    # The fake cipher itself and stock zstd read it back: the stages are what the format says.
    stream = io.BytesIO()
    decrypt(io.BytesIO(body), stream, PASSPHRASE)
    sql = subprocess.run(["zstd", "-dc"], input=stream.getvalue(), capture_output=True, check=True).stdout
    assert (len(sql), hashlib.sha256(sql).hexdigest()) == (manifest["plaintext_size"], manifest["plaintext_sha256"])

    listed = json.loads(run(LAUNCHER, "list_backups.py", "--kind", "database", "--json", check=True).stdout)
    assert [(b["key"], b["status"]) for b in listed] == [(manifest["key"], "complete")]
    verified = run(LAUNCHER, "verify_backup.py", "--kind", "database", "--latest", check=True)
    assert "zstd-compressed" in verified.stdout and "completion trailer present" in verified.stdout
    run(LAUNCHER, "restore_database.py", "--latest", "--target-database-url", pg.url(scratch_db), check=True)
    for table in ("applications", "admin_user"):
        assert table_fingerprint(pg, scratch_db, table) == table_fingerprint(pg, sample_db, table)

    # The passphrase is picked by the encryption's own rule (its message says so), before any download.
    wrong = run(LAUNCHER, "restore_database.py", "--key", manifest["key"], "--replace",
                "--target-database-url", pg.url(scratch_db), env={"EXTERNAL_BACKUP_ENCRYPTION_KEY": OLD_PASSPHRASE})
    assert wrong.returncode != 0 and "fakecrypt: no passphrase given has the key_id" in "\n".join(error_lines(wrong.stderr))

    # From a file: fetched with its manifest (the rule picks the passphrase among the two given),
    # and a copy without one (each passphrase tried, the stage refusing the wrong one).
    local = tmp_path / "backup.sql.zst.fkc"
    run(LAUNCHER, "fetch_backup.py", "--kind", "database", "--latest", "--out", str(local), check=True)
    both = {"EXTERNAL_BACKUP_ENCRYPTION_KEY": OLD_PASSPHRASE, "EXTERNAL_BACKUP_ENCRYPTION_KEY_PREVIOUS": PASSPHRASE}
    restored = run(LAUNCHER, "restore_database.py", "--file", str(local), "--replace",
                   "--target-database-url", pg.url(scratch_db), env=both, check=True)
    assert "restored" in restored.stdout
    bare = tmp_path / "bare.sql.zst.fkc"
    bare.write_bytes(body)
    run(LAUNCHER, "restore_database.py", "--file", str(bare), "--without-manifest", "--replace",
        "--target-database-url", pg.url(scratch_db), env=both, check=True)
    assert table_fingerprint(pg, scratch_db, "applications") == table_fingerprint(pg, sample_db, "applications")

    # The loss tripwire reads the profiles, encrypted as their backups are.
    earlier = {"EXTERNAL_BACKUPS_NOW": at(1).strftime("%Y-%m-%dT%H:%M:%SZ")}
    run(LAUNCHER, "backup_database.py", "--database-url", pg.url(sample_db), env=earlier, check=True)
    assert s3server.client().get_object(Bucket=bucket, Key=manifest["profile"]["key"])["Body"].read().startswith(MAGIC)
    compared = json.loads(run(LAUNCHER, "compare_backups.py", "--kind", "database", "--json", check=True).stdout)
    assert len(compared["profiled"]) == 2 and {"name": "public.applications", "now": 1500, "previous": 1500}.items() <= \
        next(r for r in compared["rows"] if r["name"] == "public.applications").items()

    # Without the registration the scripts do not know the format: the backup is not one of theirs.
    assert manifest["key"] not in run("list_backups.py", "--kind", "database", "--json").stdout


def test_a_files_backup_round_trips_through_an_encryption_registered_in_a_test_only(run, s3server, bucket, tmp_path):
    client = s3server.client()
    source = new_bucket(s3server)
    fill(client, source, SAMPLE)
    manifest = json.loads(run(LAUNCHER, "backup_files.py", "--source-bucket", source, "--json", check=True).stdout)
    assert manifest["key"].endswith(".zip.fkc") and manifest["encryption"] == FAKE
    body = client.get_object(Bucket=bucket, Key=manifest["key"])["Body"].read()
    assert body.startswith(MAGIC)
    zipped = io.BytesIO()
    decrypt(io.BytesIO(body), zipped, PASSPHRASE)
    assert hashlib.sha256(zipped.getvalue()).hexdigest() == manifest["plaintext_sha256"]

    verified = run(LAUNCHER, "verify_backup.py", "--kind", "files", "--latest", check=True)
    assert "3 members" in verified.stdout and "CRCs and central directory match" in verified.stdout
    target = new_bucket(s3server, "restored")
    run(LAUNCHER, "restore_files.py", "--latest", "--target-bucket", target, check=True)
    assert snapshot(client, target) == expected_snapshot(SAMPLE)

    # From a file, with its manifest beside it, and as the plain ZIP the fake cipher decrypts to.
    path = download(client, bucket, manifest["key"], tmp_path / "files.zip.fkc")
    (tmp_path / "files.zip.fkc.manifest.json").write_text(json.dumps(manifest))
    other = new_bucket(s3server, "restored")
    run(LAUNCHER, "restore_files.py", "--file", str(path), "--target-bucket", other, check=True,
        env={"EXTERNAL_BACKUP_ENCRYPTION_KEY": OLD_PASSPHRASE, "EXTERNAL_BACKUP_ENCRYPTION_KEY_PREVIOUS": PASSPHRASE})
    assert snapshot(client, other) == expected_snapshot(SAMPLE)
    (tmp_path / "plain.zip").write_bytes(zipped.getvalue())
    third = new_bucket(s3server, "restored")
    run(LAUNCHER, "restore_files.py", "--file", str(tmp_path / "plain.zip"), "--target-bucket", third, check=True,
        env={"EXTERNAL_BACKUP_ENCRYPTION_KEY": None})
    assert snapshot(client, third) == expected_snapshot(SAMPLE)

    earlier = {"EXTERNAL_BACKUPS_NOW": at(1).strftime("%Y-%m-%dT%H:%M:%SZ")}
    run(LAUNCHER, "backup_files.py", "--source-bucket", source, env=earlier, check=True)
    assert client.get_object(Bucket=bucket, Key=manifest["profile"]["key"])["Body"].read().startswith(MAGIC)
    compared = json.loads(run(LAUNCHER, "compare_backups.py", "--kind", "files", "--json", check=True).stdout)
    assert len(compared["profiled"]) == 2 and [(r["name"], r["now"]) for r in compared["rows"]] == [
        ("d é/", 1), ("docs/", 1), ("img/", 1)]

    assert manifest["key"] not in run("list_backups.py", "--kind", "files", "--json").stdout
