"""list_backups.py: every version listed; --max-age is the dead-man switch, and its message names
the kind, the newest complete backup and its age."""

from __future__ import annotations

import json
from datetime import timedelta

from tests.backup_factory import ENVIRONMENT, at, database_backup, iso
from tests.conftest import error_lines


def test_fresh_backup_passes(run, pg, sample_db):
    manifest = database_backup(run, pg=pg)
    done = run("list_backups.py", "--kind", "database", "--max-age", "2h")
    assert done.returncode == 0, done.stderr
    assert manifest["key"] in done.stdout
    assert f"fresh (max age 2h 0m): database: newest complete backup {manifest['key']} is" in done.stderr


def test_stale_backup_fails_naming_kind_backup_and_age(run, pg, sample_db):
    started = at(0)
    manifest = database_backup(run, pg=pg, started_at=started)
    later = iso(started + timedelta(hours=3, minutes=5))
    done = run("list_backups.py", "--kind", "database", "--max-age", "2h", env={"EXTERNAL_BACKUPS_NOW": later})
    assert done.returncode == 1
    [line] = error_lines(done.stderr)
    assert f"stale backups in {ENVIRONMENT}: database: the newest complete backup, {manifest['key']}, is 3h 5m old" in line
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
    assert [(b["key"], b["complete"]) for b in listed] == [(newest_key, False), (older["key"], True)]
    assert f"the newest complete backup, {older['key']}, is 5h 0m old" in error_lines(done.stderr)[0]


def test_no_backup_at_all_is_stale(run):
    done = run("list_backups.py", "--max-age", "1d")
    assert done.returncode == 1
    line = error_lines(done.stderr)[0]
    assert "database: no complete backup" in line and "files: no complete backup" in line


def test_every_kind_is_checked(run, pg, sample_db):
    database_backup(run, pg=pg)
    done = run("list_backups.py", "--kind", "all", "--max-age", "1h")
    assert done.returncode == 1
    line = error_lines(done.stderr)[0]
    assert "files: no complete backup" in line and "database:" not in line


def test_bad_duration_is_a_usage_error(run):
    done = run("list_backups.py", "--max-age", "2 fortnights")
    assert done.returncode == 2
    assert "invalid duration" in done.stderr
