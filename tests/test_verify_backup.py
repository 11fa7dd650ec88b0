"""verify_backup.py: good backups verify; every kind of damage is reported FAILED with its reason
and exit 1; --latest skips newer broken backups; --since checks every version; --restore-into
restores into a scratch database and reports row counts."""

from __future__ import annotations

import json
import re
import subprocess
import time
from datetime import timedelta

from tests.backup_factory import (
    at,
    database_backup,
    flip_byte,
    put_with_manifest,
    read_object,
    sha256,
    streamed_zip,
    upload_archive,
    upload_dump,
)
from tests.conftest import OLD_PASSPHRASE, PASSPHRASE, error_lines

OBJECTS = {"uploads/a.pdf": b"%PDF-1.4 " + bytes(range(256)) * 40, "uploads/b.txt": "Zoë, 李小龍\n".encode(),
           "empty": b"", "deep/dir/c.bin": b"\x00PK\x07\x08" * 1000}


def verify(run, *args, env=None):
    return run("verify_backup.py", *args, env=env)


def result_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.split(" ", 1)[0] in ("OK", "FAILED", "SKIPPED")]


def test_good_database_backup_verifies(run, pg, sample_db):
    manifest = database_backup(run, pg=pg)
    done = verify(run, "--kind", "database", "--key", manifest["key"])
    assert done.returncode == 0, done.stderr
    [line] = result_lines(done.stdout)
    assert line.startswith(f"OK      {manifest['key']}") and "completion trailer present" in line

    done = verify(run, "--kind", "database", "--latest", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] and report["results"][0]["plaintext_size"] == manifest["plaintext_size"]


def test_flipped_byte_in_a_new_version_fails(run, pg, sample_db, s3server, bucket):
    # Object Lock keeps the original version; what can happen is a new version under the same key
    # (any writer may PutObject) whose manifest is copied from the good one.
    client = s3server.client()
    good = database_backup(run, pg=pg)
    body = read_object(client, bucket, good["key"], good["version_id"])
    bad = put_with_manifest(client, bucket, good["key"], flip_byte(body, len(body) // 2), good)

    done = verify(run, "--kind", "database", "--key", good["key"], "--version-id", bad["version_id"])
    assert done.returncode == 1
    [line] = result_lines(done.stdout)
    assert line.startswith(f"FAILED  {good['key']} (version {bad['version_id']})")
    assert "does not match the manifest's SHA-256" in line
    assert len(error_lines(done.stderr)) == 1

    # --since sees both versions: the good one OK, the tampered one FAILED.
    done = verify(run, "--kind", "database", "--since", "1h")
    assert done.returncode == 1
    lines = result_lines(done.stdout)
    assert sorted(line.split()[0] for line in lines) == ["FAILED", "OK"]


def test_truncated_object_fails(run, pg, sample_db, s3server, bucket):
    client = s3server.client()
    good = database_backup(run, pg=pg)
    body = read_object(client, bucket, good["key"], good["version_id"])
    bad = put_with_manifest(client, bucket, good["key"], body[: len(body) - 1000], good)
    done = verify(run, "--kind", "database", "--key", good["key"], "--version-id", bad["version_id"])
    assert done.returncode == 1
    assert "truncated or corrupted" in result_lines(done.stdout)[0]


def test_manifest_with_another_sha256_fails(run, pg, sample_db, s3server, bucket):
    client = s3server.client()
    good = database_backup(run, pg=pg, started_at=at(2))
    body = read_object(client, bucket, good["key"], good["version_id"])
    key = good["key"].replace(good["key"].split("/")[-1][:10], "2020-01-01")
    put_with_manifest(client, bucket, key, body, {**good, "encrypted_sha256": sha256(b"something else")})
    done = verify(run, "--kind", "database", "--key", key)
    assert done.returncode == 1
    assert "does not match the manifest's SHA-256" in result_lines(done.stdout)[0]


def test_dump_without_its_trailer_fails(run, pg, sample_db, s3server, bucket):
    dump = subprocess.run([str(pg.bin / "pg_dump"), "--no-owner", "--no-privileges", "--clean", "--if-exists",
                           f"--dbname={pg.url(sample_db, password=False)}"],
                          env=pg.env(), capture_output=True, check=True).stdout
    cut = dump[: dump.index(b"-- PostgreSQL database dump complete")]  # a statement boundary
    manifest = upload_dump(s3server.client(), bucket, at(1), cut, PASSPHRASE)
    done = verify(run, "--kind", "database", "--key", manifest["key"])
    assert done.returncode == 1
    assert "pg_dump's completion trailer is missing" in result_lines(done.stdout)[0]
    # The untouched dump, through the same stock command, verifies.
    manifest = upload_dump(s3server.client(), bucket, at(2), dump, PASSPHRASE)
    assert verify(run, "--kind", "database", "--key", manifest["key"]).returncode == 0


def test_backup_made_with_another_passphrase_is_refused_by_key_id(run, pg, sample_db):
    manifest = database_backup(run, pg=pg, passphrase=OLD_PASSPHRASE)
    done = verify(run, "--kind", "database", "--key", manifest["key"])
    assert done.returncode == 1
    line = result_lines(done.stdout)[0]
    assert line.startswith("FAILED") and manifest["key_id"] in line and "decryption" not in line
    assert OLD_PASSPHRASE not in done.stdout + done.stderr


def test_manifest_naming_our_key_over_data_encrypted_with_another(run, s3server, bucket):
    archive = streamed_zip(OBJECTS)
    manifest = upload_archive(s3server.client(), bucket, at(1), archive, OLD_PASSPHRASE, len(OBJECTS), key_id_of=PASSPHRASE)
    done = verify(run, "--kind", "files", "--key", manifest["key"])
    assert done.returncode == 1
    assert "decryption failed" in result_lines(done.stdout)[0]


def test_latest_skips_a_newer_corrupt_backup(run, pg, sample_db, s3server, bucket):
    client = s3server.client()
    older = database_backup(run, pg=pg, started_at=at(2))
    newer = database_backup(run, pg=pg, started_at=at(1))
    body = read_object(client, bucket, newer["key"], newer["version_id"])
    put_with_manifest(client, bucket, newer["key"], flip_byte(body, 100), newer)  # newest version, damaged

    done = verify(run, "--kind", "database", "--latest")
    assert done.returncode == 0, done.stderr
    lines = result_lines(done.stdout)
    assert lines[0].startswith(f"SKIPPED {newer['key']}") and "SHA-256" in lines[0]
    assert lines[-1].startswith(f"OK      {newer['key']} (version {newer['version_id']})")
    assert older["key"] not in done.stdout


def test_two_versions_in_the_same_second_are_both_checked(run, pg, sample_db):
    moment = at(0)
    first = database_backup(run, pg=pg, started_at=moment)
    second = database_backup(run, pg=pg, started_at=moment)
    assert first["key"] == second["key"] and first["version_id"] != second["version_id"]

    listing = run("list_backups.py", "--kind", "database", "--json", check=True)
    assert sorted(b["version_id"] for b in json.loads(listing.stdout)) == sorted([first["version_id"], second["version_id"]])

    done = verify(run, "--kind", "database", "--since", "1h", env={"EXTERNAL_BACKUPS_NOW": moment.strftime("%Y-%m-%dT%H:%M:%SZ")})
    assert done.returncode == 0, done.stderr
    lines = result_lines(done.stdout)
    assert len(lines) == 2 and all(line.startswith("OK") for line in lines)
    assert {first["version_id"], second["version_id"]} == {line.split("(version ")[1].split(")")[0] for line in lines}


def test_since_with_nothing_in_the_window_fails(run, pg, sample_db):
    database_backup(run, pg=pg, started_at=at(30))
    done = verify(run, "--kind", "database", "--since", "1d")
    assert done.returncode == 1
    assert "no database backup started within the last 1d" in error_lines(done.stderr)[0]


def test_restore_into_reports_row_counts(run, pg, sample_db, scratch_db, tmp_path):
    manifest = database_backup(run, pg=pg)
    summary = tmp_path / "summary.md"
    done = verify(run, "--kind", "database", "--key", manifest["key"], "--restore-into", pg.url(scratch_db),
                  env={"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary)})
    assert done.returncode == 0, done.stderr
    # The drill's step summary shows the restore's wall time and throughput.
    timing = re.search(rf"Restore of `{re.escape(manifest['key'])}` into `{scratch_db}`: (\d+\.\d) s wall, "
                       r"[\d.]+ \w+ of SQL at [\d.]+ \w+/s, [\d.]+ \w+ downloaded at [\d.]+ \w+/s", summary.read_text())
    assert timing and float(timing.group(1)) < 60, summary.read_text()
    assert f"restored into '{scratch_db}': 2 tables, 1501 rows" in done.stdout
    assert "public.applications: 1500 rows" in done.stdout and "public.admin_user: 1 rows" in done.stdout
    assert pg.psql("SELECT count(*) FROM applications", scratch_db) == "1500"
    assert pg.password not in done.stdout + done.stderr

    again = verify(run, "--kind", "database", "--latest", "--restore-into", pg.url(scratch_db))
    assert again.returncode == 1 and "already has 2 tables" in error_lines(again.stderr)[0]


def test_restore_into_rolls_back_a_dump_without_trailer(run, pg, sample_db, scratch_db, s3server, bucket):
    manifest = upload_dump(s3server.client(), bucket, at(1), b"CREATE TABLE leaked (id int);\n", PASSPHRASE)
    done = verify(run, "--kind", "database", "--key", manifest["key"], "--restore-into", pg.url(scratch_db))
    assert done.returncode == 1
    assert "trailer is missing" in result_lines(done.stdout)[0]
    assert pg.psql("SELECT count(*) FROM pg_tables WHERE tablename = 'leaked'", scratch_db) == "0"


NAMES = '''
CREATE SCHEMA "v1.2";
CREATE TABLE "v1.2".items (id int);
INSERT INTO "v1.2".items SELECT generate_series(1, 3);
CREATE TABLE "new
line" (id int);
INSERT INTO "new
line" VALUES (1), (2);
CREATE TABLE "it's ""quoted""" (id int);
INSERT INTO "it's ""quoted""" VALUES (1);
'''


def test_the_drill_counts_the_rows_of_tables_whatever_their_names(run, pg, app_db):
    """A schema called v1.2 was counted as "v1"."2.items"; a name holding a newline as two names."""
    source = "names_src"
    pg.create_database(source)
    try:
        pg.psql(NAMES, source)
        database_backup(run, pg=pg, sample_db=source)
    finally:
        pg.drop_database(source)
    name, url = app_db
    done = verify(run, "--kind", "database", "--latest", "--restore-into", url, "--json", env={"BACKUP_ALLOW_SUPERUSER": None})
    assert done.returncode == 0, done.stderr
    [result] = json.loads(done.stdout)["results"]
    assert result["rows"] == {"public.it's \"quoted\"": 1, "public.new\nline": 2, "v1.2.items": 3}
    human = verify(run, "--kind", "database", "--latest", "--restore-into", url)  # the drill is refused: not empty
    assert human.returncode == 1 and "already has 3 tables" in error_lines(human.stderr)[0]


def test_restore_into_a_superusers_database_is_refused(run, pg, sample_db, scratch_db):
    manifest = database_backup(run, pg=pg)
    done = verify(run, "--kind", "database", "--key", manifest["key"], "--restore-into", pg.url(scratch_db),
                  env={"BACKUP_ALLOW_SUPERUSER": None})
    assert done.returncode == 1
    [line] = error_lines(done.stderr)
    assert "'postgres' is a superuser" in line and "--allow-superuser" in line
    assert pg.psql("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'", scratch_db) == "0"
    done = verify(run, "--kind", "database", "--key", manifest["key"], "--restore-into", pg.url(scratch_db),
                  "--allow-superuser", env={"BACKUP_ALLOW_SUPERUSER": None})
    assert done.returncode == 0, done.stderr
    assert "warning: the target's role 'postgres' is a superuser" in done.stderr


# -- files backups (AES Crypt + ZIP), built here so they do not depend on backup_files.py ------


def test_good_files_backup_verifies(run, s3server, bucket):
    manifest = upload_archive(s3server.client(), bucket, at(1), streamed_zip(OBJECTS), PASSPHRASE, len(OBJECTS))
    done = verify(run, "--kind", "files", "--latest", "--json")
    assert done.returncode == 0, done.stderr
    [result] = json.loads(done.stdout)["results"]
    assert result["key"] == manifest["key"] and result["members"] == len(OBJECTS)
    assert result["member_bytes"] == sum(len(v) for v in OBJECTS.values())
    human = verify(run, "--kind", "files", "--key", manifest["key"])
    assert f"{len(OBJECTS)} members" in result_lines(human.stdout)[0]


def test_zip_missing_a_member_fails(run, s3server, bucket):
    manifest = upload_archive(s3server.client(), bucket, at(1), streamed_zip(OBJECTS), PASSPHRASE, len(OBJECTS) + 1)
    done = verify(run, "--kind", "files", "--key", manifest["key"])
    assert done.returncode == 1
    assert f"the ZIP holds {len(OBJECTS)} members, the manifest says {len(OBJECTS) + 1} objects" in result_lines(done.stdout)[0]


def test_zip_with_a_damaged_member_fails(run, s3server, bucket):
    archive = streamed_zip(OBJECTS)
    damaged = flip_byte(archive, archive.index(b"%PDF") + 1000)
    manifest = upload_archive(s3server.client(), bucket, at(1), damaged, PASSPHRASE, len(OBJECTS))
    done = verify(run, "--kind", "files", "--key", manifest["key"])
    assert done.returncode == 1
    assert "the ZIP member 'uploads/a.pdf' is damaged" in result_lines(done.stdout)[0]


def test_truncated_zip_fails(run, s3server, bucket):
    archive = streamed_zip(OBJECTS)
    manifest = upload_archive(s3server.client(), bucket, at(1), archive[:-30], PASSPHRASE, len(OBJECTS))
    done = verify(run, "--kind", "files", "--key", manifest["key"])
    assert done.returncode == 1
    assert "truncated" in result_lines(done.stdout)[0]


def test_tampered_files_object_fails_before_decryption(run, s3server, bucket):
    client = s3server.client()
    good = upload_archive(client, bucket, at(1), streamed_zip(OBJECTS), PASSPHRASE, len(OBJECTS))
    body = read_object(client, bucket, good["key"], good["version_id"])
    bad = put_with_manifest(client, bucket, good["key"], flip_byte(body, len(body) - 5), good)
    done = verify(run, "--kind", "files", "--since", "1d")
    assert done.returncode == 1
    lines = result_lines(done.stdout)
    assert len(lines) == 2
    assert any(line.startswith(f"FAILED  {good['key']} (version {bad['version_id']})") and "SHA-256" in line for line in lines)


def test_restore_into_is_for_database_backups_only(run):
    done = verify(run, "--kind", "files", "--latest", "--restore-into", "postgresql://x@localhost/y")
    assert done.returncode == 2


def test_tampering_with_a_recomputed_manifest_is_caught_by_decryption(run, pg, sample_db, s3server, bucket):
    # Whoever can PutObject can also write a manifest with the tampered object's own hashes; without
    # the passphrase they cannot fix the AES Crypt HMAC or the plaintext SHA-256.
    client = s3server.client()
    files = upload_archive(client, bucket, at(3), streamed_zip(OBJECTS), PASSPHRASE, len(OBJECTS))
    plain = database_backup(run, pg=pg, started_at=at(2), compression="none")
    compressed = database_backup(run, pg=pg, started_at=at(1))
    for manifest, reason in ((files, "Bad HMAC"), (plain, "does not match the manifest's plaintext SHA-256"),
                             (compressed, "decompression failed: the backup is corrupted")):
        body = flip_byte(read_object(client, bucket, manifest["key"], manifest["version_id"]), 4000)
        bad = put_with_manifest(client, bucket, manifest["key"], body,
                                {**manifest, "encrypted_size": len(body), "encrypted_sha256": sha256(body)})
        done = verify(run, "--kind", manifest["kind"], "--key", manifest["key"], "--version-id", bad["version_id"])
        assert done.returncode == 1
        assert reason in result_lines(done.stdout)[0]


def test_incomplete_backups(run, pg, sample_db, s3server, bucket):
    good = database_backup(run, pg=pg, started_at=at(2))
    key = good["key"].replace(good["key"].split("/")[-1][:10], "2099-01-01")  # newest, never got its manifest
    s3server.client().put_object(Bucket=bucket, Key=key, Body=b"Salted__partial", ChecksumAlgorithm="CRC32")

    done = verify(run, "--kind", "database", "--key", key)
    assert done.returncode == 1
    assert result_lines(done.stdout)[0].startswith(f"FAILED  {key}")
    assert "no manifest: the backup did not complete" in result_lines(done.stdout)[0]

    done = verify(run, "--kind", "database", "--latest")
    assert done.returncode == 0, done.stderr
    assert [line.split()[:2] for line in result_lines(done.stdout)] == [["SKIPPED", key], ["OK", good["key"]]]
    assert "no manifest" in result_lines(done.stdout)[0]


def test_since_counts_past_the_first_hundred_results(run, pg, sample_db, s3server, bucket, tmp_path):
    """A flood of planted objects in the window fails the daily check, loudly, without making
    a line and a summary row for each: the first 100 are shown, the rest counted."""
    database_backup(run, pg=pg, started_at=at(1))
    time.sleep(1.1)  # S3 dates to the second: the plants are stored strictly after the genuine backup
    client = s3server.client()
    for i in range(120):
        key = f"production/database/{at(2) - timedelta(seconds=i):%Y-%m-%d--%H-%M-%S}.sql.encrypted"
        client.put_object(Bucket=bucket, Key=key, Body=b"Salted__planted", ChecksumAlgorithm="CRC32")
    summary = tmp_path / "summary.md"
    done = verify(run, "--kind", "database", "--since", "1d", env={"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary)})
    assert done.returncode == 1
    assert len(result_lines(done.stdout)) == 100
    # ordered by when S3 stored them: the genuine backup, stored first, is among the counted
    assert "… and 21 more: 1 OK, 20 FAILED (--json lists every one)" in done.stdout, done.stdout[-500:]
    rows = [line for line in summary.read_text().splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 100 + 1 and "21 more" in rows[-1]
    assert "121 of 121" not in done.stderr and "120 of 121 database backups failed verification" in done.stderr
