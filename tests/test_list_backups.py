"""list_backups.py: every version listed; --max-age is the dead-man switch, and its message names
the kind, the newest complete backup and its age."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

from tests.backup_factory import ENVIRONMENT, at, database_backup, iso
from tests.conftest import error_lines


def test_fresh_backup_passes(run, pg, sample_db):
    manifest = database_backup(run, pg=pg)
    done = run("list_backups.py", "--kind", "database", "--max-age", "2h")
    assert done.returncode == 0, done.stderr
    assert manifest["key"] in done.stdout
    assert f"fresh: database: newest usable backup {manifest['key']} (version {manifest['version_id']}) is" in done.stderr
    assert "(max age 2h 0m)" in done.stderr


def test_stale_backup_fails_naming_kind_backup_and_age(run, pg, sample_db):
    started = at(0)
    manifest = database_backup(run, pg=pg, started_at=started)
    later = iso(started + timedelta(hours=3, minutes=5))
    done = run("list_backups.py", "--kind", "database", "--max-age", "2h", env={"EXTERNAL_BACKUPS_NOW": later})
    assert done.returncode == 1
    [line] = error_lines(done.stderr)
    newest = f"{manifest['key']} (version {manifest['version_id']})"
    assert f"stale backups in {ENVIRONMENT}: database: the newest usable backup, {newest}, is 3h 5m old" in line
    assert "(allowed: 2h 0m)" in line
    # Within the limit at that same "now", it passes.
    assert run("list_backups.py", "--kind", "database", "--max-age", "4h", env={"EXTERNAL_BACKUPS_NOW": later}).returncode == 0


def test_an_incomplete_newer_backup_does_not_count(run, pg, sample_db, s3server, bucket):
    older = database_backup(run, pg=pg, started_at=at(5))
    newest_key = f"{ENVIRONMENT}/database/{at(0).strftime('%Y-%m-%d--%H-%M-%S')}.sql.encrypted"
    s3server.client().put_object(Bucket=bucket, Key=newest_key, Body=b"Salted__ no manifest", ChecksumAlgorithm="CRC32")
    done = run("list_backups.py", "--kind", "database", "--max-age", "2h", "--json")
    assert done.returncode == 1
    listed = json.loads(done.stdout)
    assert [(b["key"], b["complete"], b["status"]) for b in listed] == [(newest_key, False, "incomplete"), (older["key"], True, "complete")]
    assert f"the newest usable backup, {older['key']} (version {older['version_id']}), is 5h 0m old" in error_lines(done.stderr)[0]


def test_no_backup_at_all_is_an_error_naming_the_environments_there(run, pg, sample_db):
    done = run("list_backups.py", "--max-age", "1d")
    assert done.returncode == 1
    [line] = error_lines(done.stderr)
    assert f"no backups under s3://{run.env['BACKUP_BUCKET']}/{ENVIRONMENT}/: check --environment" in line
    database_backup(run, pg=pg)
    done = run("list_backups.py", env={"BACKUP_ENVIRONMENT": "prodution"})  # mistyped
    assert done.returncode == 1
    assert "(the bucket has: production)" in error_lines(done.stderr)[0]


def test_every_kind_is_checked(run, pg, sample_db):
    database_backup(run, pg=pg)
    done = run("list_backups.py", "--kind", "all", "--max-age", "1h")
    assert done.returncode == 1
    line = error_lines(done.stderr)[0]
    assert "files: no usable backup" in line and "database:" not in line


def test_max_age_per_kind(run, pg, sample_db):
    started = at(0)
    database_backup(run, pg=pg, started_at=started)
    later = {"EXTERNAL_BACKUPS_NOW": iso(started + timedelta(hours=3))}
    ok = run("list_backups.py", "--kind", "database", "--max-age", "database=4h", env=later)
    assert ok.returncode == 0, ok.stderr
    stale = run("list_backups.py", "--kind", "database", "--max-age", "database=2h", env=later)
    assert stale.returncode == 1 and "is 3h 0m old (allowed: 2h 0m)" in error_lines(stale.stderr)[0]
    both = run("list_backups.py", "--max-age", "database=4h", "--max-age", "files=1d", env=later)
    assert both.returncode == 1
    assert "files: no usable backup" in error_lines(both.stderr)[0] and "database:" not in error_lines(both.stderr)[0]
    assert run("list_backups.py", "--max-age", "logs=1h").returncode == 2
    assert run("list_backups.py", "--kind", "files", "--max-age", "database=1h").returncode == 2




def test_retain_until_dash_is_explained_once_under_the_table(run, pg, sample_db, s3server, bucket):
    """The test endpoint's bucket has Object Lock but no default retention (setup_bucket.py
    --apply sets one): no version is locked, and the table says why once, not per row."""
    database_backup(run, pg=pg, started_at=at(2))
    database_backup(run, pg=pg, started_at=at(1))
    done = run("list_backups.py", "--kind", "database", check=True)
    notes = [line for line in done.stdout.splitlines() if "RETAIN UNTIL" in line and line.startswith("note:")]
    assert notes == ['note: RETAIN UNTIL "-" for 2 of the 2 versions shown: the bucket\'s Object Lock has no default '
                     "retention, so only versions written with a lock of their own are locked (setup_bucket.py --check "
                     "says what to fix)"]
    assert "not read (--no-retention)" in run("list_backups.py", "--no-retention", check=True).stdout

    # Locked by default, every version shows its date and nothing needs saying.
    locked = s3server.create_bucket(f"locked-{uuid.uuid4().hex[:12]}")
    s3server.client().put_object_lock_configuration(Bucket=locked, ObjectLockConfiguration={
        "ObjectLockEnabled": "Enabled", "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 1}}})
    database_backup(run, pg=pg, BACKUP_BUCKET=locked)
    done = run("list_backups.py", env={"BACKUP_BUCKET": locked}, check=True)
    assert "RETAIN UNTIL \"-\"" not in done.stdout and done.stdout.count("complete") == 1


def test_a_bucket_without_object_lock_is_named_as_the_reason(run, pg, sample_db, s3server):
    plain = s3server.create_bucket(f"plain-{uuid.uuid4().hex[:12]}", object_lock=False)
    database_backup(run, pg=pg, BACKUP_BUCKET=plain)
    done = run("list_backups.py", env={"BACKUP_BUCKET": plain}, check=True)
    assert 'RETAIN UNTIL "-" for 1 of the 1 versions shown: the bucket has no Object Lock, so nothing in it is locked' in done.stdout
