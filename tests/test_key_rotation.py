"""Key rotation: the manifest's key_id picks the passphrase among EXTERNAL_BACKUP_ENCRYPTION_KEY and
EXTERNAL_BACKUP_ENCRYPTION_KEY_PREVIOUS; a backup whose key is in neither is refused, naming its
key_id, before anything is decrypted or restored."""

from __future__ import annotations

import json

from tests.backup_factory import at, database_backup, streamed_zip, upload_archive
from tests.conftest import OLD_PASSPHRASE, PASSPHRASE, error_lines, public_tables

NEW_PASSPHRASE = "new-staple-Passphrase-7e01"
ROTATED = {"EXTERNAL_BACKUP_ENCRYPTION_KEY": NEW_PASSPHRASE, "EXTERNAL_BACKUP_ENCRYPTION_KEY_PREVIOUS": f"{OLD_PASSPHRASE},{PASSPHRASE}"}
UNRELATED = {"EXTERNAL_BACKUP_ENCRYPTION_KEY": NEW_PASSPHRASE, "EXTERNAL_BACKUP_ENCRYPTION_KEY_PREVIOUS": "some-other-Passphrase-0000"}


def test_backups_under_the_old_key_restore_after_rotation(run, pg, sample_db, scratch_db, tmp_path):
    old = database_backup(run, pg=pg, started_at=at(2), passphrase=OLD_PASSPHRASE)
    new = database_backup(run, pg=pg, started_at=at(1), passphrase=NEW_PASSPHRASE)
    assert old["key_id"] != new["key_id"]

    done = run("verify_backup.py", "--kind", "database", "--since", "1d", env=ROTATED)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("OK ") == 2

    done = run("restore_database.py", "--key", old["key"], "--target-database-url", pg.url(scratch_db), "--json", env=ROTATED)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["key"] == old["key"]
    assert pg.psql("SELECT count(*) FROM applications", scratch_db) == "1500"

    out = tmp_path / "old.sql.encrypted"
    run("fetch_backup.py", "--kind", "database", "--key", old["key"], "--out", str(out), check=True, env=ROTATED)
    done = run("./decrypt.py", "-i", str(out), "-o", str(tmp_path / "old.sql"), env={**ROTATED, "PYTHONPATH": None})
    assert done.returncode == 0, done.stderr
    for secret in (NEW_PASSPHRASE, OLD_PASSPHRASE, PASSPHRASE):
        assert secret not in "".join(c.stdout + c.stderr for c in run.calls)


def test_files_backup_under_the_old_key_verifies_after_rotation(run, s3server, bucket):
    manifest = upload_archive(s3server.client(), bucket, at(1), streamed_zip({"a": b"1"}), OLD_PASSPHRASE, 1)
    done = run("verify_backup.py", "--kind", "files", "--key", manifest["key"], env=ROTATED)
    assert done.returncode == 0, done.stderr


def test_a_backup_whose_key_is_in_neither_is_refused_naming_its_key_id(run, pg, sample_db, scratch_db, tmp_path):
    backup = database_backup(run, pg=pg, passphrase=OLD_PASSPHRASE)

    done = run("restore_database.py", "--key", backup["key"], "--target-database-url", pg.url(scratch_db), env=UNRELATED)
    assert done.returncode == 1
    line = error_lines(done.stderr)[0]
    assert f"key_id is {backup['key_id']}" in line and "EXTERNAL_BACKUP_ENCRYPTION_KEY_PREVIOUS" in line
    assert "decryption failed" not in done.stderr and "restoring" not in done.stderr
    assert public_tables(pg, scratch_db) == "0"

    done = run("verify_backup.py", "--kind", "database", "--key", backup["key"], env=UNRELATED)
    assert done.returncode == 1
    assert f"key_id is {backup['key_id']}" in done.stdout

    out = tmp_path / "b.sql.encrypted"
    run("fetch_backup.py", "--kind", "database", "--key", backup["key"], "--out", str(out), check=True, env=UNRELATED)
    done = run("./decrypt.py", "-i", str(out), "-o", str(tmp_path / "b.sql"), env={**UNRELATED, "PYTHONPATH": None})
    assert done.returncode == 1
    assert f"key_id {backup['key_id']}" in done.stderr
    assert not (tmp_path / "b.sql").exists()


def test_latest_skips_a_newer_backup_under_an_unknown_key(run, pg, sample_db, scratch_db):
    good = database_backup(run, pg=pg, started_at=at(2), passphrase=NEW_PASSPHRASE)
    stray = database_backup(run, pg=pg, started_at=at(1), passphrase="stray-Passphrase-from-a-test-run")
    done = run("restore_database.py", "--latest", "--target-database-url", pg.url(scratch_db), "--json", env=ROTATED)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["key"] == good["key"]
    [skipped] = result["skipped"]
    assert skipped["key"] == stray["key"] and stray["key_id"] in skipped["reason"] and skipped["problem"] == "unknown passphrase"
