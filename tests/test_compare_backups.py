"""compare_backups.py, the loss tripwire: real backups of a real PostgreSQL database (their
profiles counted from the dump as it streams), compared through the bucket as the hourly check
does; data deleted between backups as a housekeeping job with a mistake would."""

from __future__ import annotations

import json
import os
import subprocess
import uuid

import pytest

from tests.backup_factory import at, database_backup, put_with_manifest, read_object, upload_dump
from tests.conftest import PASSPHRASE, error_lines, one_error, versions

ORDERS = 1000


@pytest.fixture
def app(pg):
    """An app database of its own: orders (1,000 rows), sessions (200), a table with a name that
    needs quoting, and an empty one."""
    name = f"tripwire_{uuid.uuid4().hex[:8]}"
    pg.create_database(name)
    pg.psql(f"""
CREATE TABLE orders (id int PRIMARY KEY, customer text, note text);
INSERT INTO orders SELECT i, 'Zoë Customer ' || i, E'line one\\nline two' FROM generate_series(1, {ORDERS}) AS i;
CREATE TABLE sessions (id int PRIMARY KEY, token text);
INSERT INTO sessions SELECT i, md5(i::text) FROM generate_series(1, 200) AS i;
CREATE SCHEMA billing;
CREATE TABLE billing."Invoice Lines (2026)" (id int, amount numeric);
INSERT INTO billing."Invoice Lines (2026)" SELECT i, i * 1.5 FROM generate_series(1, 300) AS i;
CREATE TABLE empty_one (id int);
""", name)
    yield name
    pg.drop_database(name)


def backup(run, pg, database: str, hours_ago: float) -> dict:
    """A database backup named `hours_ago` hours back (so that the backups of a test order as made)."""
    return database_backup(run, started_at=at(hours_ago), pg=pg, sample_db=database)


def compare(run, *args: str, env: dict | None = None):
    return run("compare_backups.py", "--kind", "database", *args, env=env)


def compared(run, *args: str) -> dict:
    done = compare(run, "--json", *args)
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout)



def not_held(client, bucket: str, key: str, version_id: str) -> bool:
    try:
        return client.get_object_legal_hold(Bucket=bucket, Key=key, VersionId=version_id)["LegalHold"].get("Status") != "ON"
    except client.exceptions.ClientError:  # AWS: no legal hold was ever placed
        return True


def decrypt_stock(ciphertext: bytes) -> bytes:
    return subprocess.run(["openssl", "enc", "-d", "-aes-256-cbc", "-pbkdf2", "-pass", "env:K"], input=ciphertext,
                          capture_output=True, check=True, env={**os.environ, "K": PASSPHRASE}).stdout


def test_each_backup_records_rows_per_table_readable_with_stock_openssl_only(run, pg, app, s3server, bucket):
    manifest = backup(run, pg, app, 1)
    profile = manifest["profile"]
    assert profile["key"] == manifest["key"] + ".profile.encrypted" and profile["entries"] == 4
    client = s3server.client()
    stored = read_object(client, bucket, profile["key"], profile["version_id"])
    assert stored.startswith(b"Salted__") and len(stored) == profile["size"]
    lines = [json.loads(line) for line in decrypt_stock(stored).splitlines()]
    assert lines[0] == {"format": "profile-v1", "kind": "database", "backup_key": manifest["key"]}
    tables = {line["table"]: line["rows"] for line in lines[1:]}
    assert tables == {"public.orders": ORDERS, "public.sessions": 200, 'billing."Invoice Lines (2026)"': 300,
                      "public.empty_one": 0}
    assert all(line["bytes"] > 0 for line in lines[1:] if line["rows"])
    # Nothing in the bucket names a table, without the passphrase.
    for version in versions(client, bucket):
        body = read_object(client, bucket, version["Key"], version["VersionId"])
        for word in (b"orders", b"sessions", b"Invoice", b"empty_one", b"Customer"):
            assert word not in body, (version["Key"], word)


def test_a_bulk_delete_alarms_naming_the_table_and_both_counts_and_hold_keeps_the_backup_before_it(run, pg, app, s3server, bucket):
    backup(run, pg, app, 3)
    good = backup(run, pg, app, 2)
    quiet = compare(run)
    assert quiet.returncode == 0, quiet.stderr
    assert "public.orders" in quiet.stdout and "ALARM" not in quiet.stdout
    pg.psql("DELETE FROM orders WHERE id % 10 <> 0", app)  # the housekeeping job's mistake: 90% gone
    damaged = backup(run, pg, app, 1)

    done = compare(run, "--hold")
    line = one_error(done, "public.orders", "100 rows", "1,000", "90%")
    assert good["key"] in line  # the backup that still held them
    assert "LOSS: table public.orders" in done.stdout and "HELD: backup" in done.stdout
    client = s3server.client()
    manifest_versions = {v["Key"]: v["VersionId"] for v in versions(client, bucket) if v["Key"] == good["key"] + ".manifest.json"}
    for key, version in ((good["key"], good["version_id"]), (good["key"] + ".manifest.json", manifest_versions[good["key"] + ".manifest.json"]),
                         (good["profile"]["key"], good["profile"]["version_id"])):
        assert client.get_object_legal_hold(Bucket=bucket, Key=key, VersionId=version)["LegalHold"]["Status"] == "ON"
    assert not_held(client, bucket, damaged["key"], damaged["version_id"])  # the damaged one is not held

    result = compared(run)
    assert [c["name"] for c in result["crossings"]] == ["public.orders"]
    assert result["crossings"][0]["now"] == 100 and result["crossings"][0]["before"] == ORDERS
    orders = next(r for r in result["rows"] if r["name"] == "public.orders")
    assert orders["series"] == [ORDERS, ORDERS, 100] and orders["previous"] == ORDERS

    # The rows put back, the next backup is quiet again.
    pg.psql(f"INSERT INTO orders SELECT i, 'Zoë Customer ' || i, 'back' FROM generate_series(1, {ORDERS}) AS i "
            "WHERE i % 10 <> 0", app)
    backup(run, pg, app, 0)
    assert compare(run).returncode == 0


def test_a_slow_leak_alarms_on_the_cumulative_drop_not_on_the_first_step(run, pg, app):
    backup(run, pg, app, 5)
    results = {}
    for step in (1, 2, 3, 4):  # 3% of what is left, every hour: 970, 941, 913, 886
        pg.psql("DELETE FROM orders WHERE id IN (SELECT id FROM orders ORDER BY id LIMIT (SELECT count(*) * 3 / 100 FROM orders))", app)
        backup(run, pg, app, 5 - step)
        if step != 2:
            results[step] = compare(run)
    assert [results[step].returncode for step in (1, 3, 4)] == [0, 0, 1], [d.stderr for d in results.values()]
    assert "-3%" in results[1].stdout  # the first step is seen, and is no loss
    one_error(results[4], "public.orders", "886 rows", "1,000", "11%")


def test_a_dropped_table_alarms_and_a_table_allowed_to_churn_does_not(run, pg, app):
    backup(run, pg, app, 2)
    pg.psql('DROP TABLE billing."Invoice Lines (2026)"; DELETE FROM sessions', app)
    backup(run, pg, app, 1)
    done = compare(run, "--allow-drop", "public.sessions")
    one_error(done, 'billing."Invoice Lines (2026)"', "gone", "300 rows")
    assert "public.sessions" in done.stdout and "allowed" in done.stdout
    # Allowed by the variable too, and by the bare table name; the dropped table is still a loss.
    by_variable = compare(run, env={"BACKUP_ALLOW_DROP": "other_*, sessions"})
    assert len(error_lines(by_variable.stderr)) == 1 and "sessions" not in error_lines(by_variable.stderr)[0]
    # Without the allowance, both are losses: the error names one, stdout lists both.
    both = compare(run)
    assert both.returncode == 1 and both.stdout.count("LOSS: ") == 2


def test_the_first_backup_alone_and_a_backup_without_profile_are_no_loss(run, pg, app, s3server, bucket):
    client = s3server.client()
    upload_dump(client, bucket, at(3), b"-- an older backup, made before profiles\n", PASSPHRASE)
    done = compare(run)
    assert done.returncode == 0, done.stderr
    assert "has no profile" in done.stdout
    backup(run, pg, app, 2)
    first = compare(run)
    assert first.returncode == 0 and "no profile (made before profiles existed): left out" in first.stdout


def test_a_profile_that_does_not_match_its_manifest_is_not_decrypted(run, pg, app, s3server, bucket):
    backup(run, pg, app, 3)
    newest = backup(run, pg, app, 2)
    client = s3server.client()
    # A writer adds a version to the profile's key: the manifest names its own version, so nothing changes.
    client.put_object(Bucket=bucket, Key=newest["profile"]["key"], Body=b"Salted__" + b"x" * 40, ChecksumAlgorithm="CRC32")
    assert compare(run).returncode == 0
    # A newer backup whose manifest promises other profile bytes than are stored: refused before decryption.
    key = f"production/database/{at(1).strftime('%Y-%m-%d--%H-%M-%S')}.sql.zst.encrypted"
    stored = read_object(client, bucket, newest["profile"]["key"], newest["profile"]["version_id"])
    version = client.put_object(Bucket=bucket, Key=key + ".profile.encrypted", Body=stored, ChecksumAlgorithm="CRC32")["VersionId"]
    body = read_object(client, bucket, newest["key"], newest["version_id"])
    put_with_manifest(client, bucket, key, body, {**newest, "profile": {**newest["profile"], "key": key + ".profile.encrypted",
                                                                        "version_id": version, "sha256": "0" * 64}})
    one_error(compare(run), "profile of the newest backup", "does not match the manifest's size and SHA-256")


def test_a_profile_in_another_format_than_its_backup_is_not_decrypted(run, pg, app, s3server, bucket):
    """A writer plants a backup whose manifest names, with the right size and SHA-256, a profile
    in AES Crypt's format beside a database backup (openssl's): refused by its magic, unread."""
    import hashlib

    backup(run, pg, app, 3)
    newest = backup(run, pg, app, 2)
    client = s3server.client()
    key = f"production/database/{at(1).strftime('%Y-%m-%d--%H-%M-%S')}.sql.zst.encrypted"
    planted = b"AES\x02\x00" + b"\x00" * 64
    version = client.put_object(Bucket=bucket, Key=key + ".profile.encrypted", Body=planted, ChecksumAlgorithm="CRC32")["VersionId"]
    body = read_object(client, bucket, newest["key"], newest["version_id"])
    put_with_manifest(client, bucket, key, body, {**newest, "profile": {
        **newest["profile"], "key": key + ".profile.encrypted", "version_id": version, "size": len(planted),
        "sha256": hashlib.sha256(planted).hexdigest()}})
    one_error(compare(run), "profile of the newest backup", "not in the backup's format")


@pytest.mark.parametrize("args", [
    ["--max-drop", "150%"], ["--max-drop", "ten"], ["--min-rows", "-1"], ["--window", "0d"], ["--kind", "wal"],
    ["--environment", "Production"],
])
def test_bad_input_exits_2_without_a_traceback(run, args):
    done = run("compare_backups.py", "--kind", "database", *args)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr


def test_nothing_to_compare_is_a_failure_that_says_so(run):
    one_error(compare(run), "no usable database backup")


# -- files --------------------------------------------------------------------------------------------

def files_backup_at(run, source: str, hours_ago: float) -> dict:
    done = run("backup_files.py", "--source-bucket", source, "--json",
               env={"EXTERNAL_BACKUPS_NOW": at(hours_ago).strftime("%Y-%m-%dT%H:%M:%SZ")}, check=True)
    return json.loads(done.stdout)


def compare_files(run, *args: str, env: dict | None = None):
    return run("compare_backups.py", "--kind", "files", *args, env=env)


@pytest.fixture
def uploads(s3server):
    """An app bucket: 100 uploads (documents that never change) and 20 avatars."""
    from tests.files_helpers import new_bucket

    client = s3server.client()
    source = new_bucket(s3server)
    for i in range(100):
        client.put_object(Bucket=source, Key=f"uploads/Zoë Ångström contract {i:03}.pdf", Body=os.urandom(200 + i))
    for i in range(20):
        client.put_object(Bucket=source, Key=f"avatars/user-{i}.png", Body=os.urandom(50))
    return source


def test_files_loss_40_of_100_uploads_deleted_names_the_prefix_and_a_restored_bucket_is_quiet(run, s3server, bucket, uploads):
    client = s3server.client()
    first = files_backup_at(run, uploads, 5)
    profile = first["profile"]
    assert profile["entries"] == 120 and profile["key"] == first["key"] + ".profile.encrypted"
    alone = compare_files(run)
    assert alone.returncode == 0, alone.stderr

    # 40 of the 100 uploads deleted.
    gone = {}
    for i in range(0, 100, 5):
        for j in (i, i + 1):
            key = f"uploads/Zoë Ångström contract {j:03}.pdf"
            gone[key] = client.get_object(Bucket=uploads, Key=key)["Body"].read()
            client.delete_object(Bucket=uploads, Key=key)
    files_backup_at(run, uploads, 4)
    done = compare_files(run)
    one_error(done, "prefix uploads/", "60 objects", "100", "40%")
    assert "40 gone" in done.stdout

    # Put back: quiet again.
    for key, body in gone.items():
        client.put_object(Bucket=uploads, Key=key, Body=body)
    files_backup_at(run, uploads, 3)
    back = compare_files(run)
    assert back.returncode == 0, back.stderr + back.stdout


def test_files_loss_one_upload_overwritten_in_place_names_its_key_and_holds_the_backup_before(run, s3server, bucket, uploads):
    client = s3server.client()
    files_backup_at(run, uploads, 3)
    key = "uploads/Zoë Ångström contract 042.pdf"
    client.put_object(Bucket=uploads, Key=key, Body=bytes(242))  # same size, zeros
    files_backup_at(run, uploads, 2)
    done = compare_files(run, "--hold")
    line = one_error(done, key, "changed in place", "242 bytes")
    assert "HELD: backup" in done.stdout
    listed = json.loads(run("list_backups.py", "--kind", "files", "--json", check=True).stdout)
    before = listed[1]  # newest first: the backup before the overwrite
    assert before["key"] in line
    held = client.get_object_legal_hold(Bucket=bucket, Key=before["key"], VersionId=before["version_id"])
    assert held["LegalHold"]["Status"] == "ON"
    assert not_held(client, bucket, listed[0]["key"], listed[0]["version_id"])
    # Allowed where objects are rewritten on purpose.
    assert compare_files(run, "--allow-change", "uploads/").returncode == 0
    assert compare_files(run, env={"BACKUP_ALLOW_CHANGE": "avatars/,uploads/"}).returncode == 0

    # No object key is readable in any object of the bucket without the passphrase.
    for version in versions(client, bucket):
        body = read_object(client, bucket, version["Key"], version["VersionId"])
        assert "Ångström".encode() not in body and b"contract" not in body and b"avatars/" not in body, version["Key"]


def test_a_week_of_hourly_profiles_is_compared_in_seconds_without_downloading_a_backup(run, s3server, bucket):
    """168 backups, each with a profile of 60 tables (stored as the backup job stores them): the
    comparison reads the 168 profiles, never a backup object."""
    import hashlib
    import time
    from datetime import timedelta

    from backupkit import crypto
    from backupkit.manifest import backup_key, build_manifest, write_manifest
    from backupkit.profile import encrypt_profile, lines, profile_key

    client = s3server.client()
    key_id = crypto.key_id(PASSPHRASE)
    now = at(0)
    backups = []
    for i in range(168):  # every 17 minutes over 47.6 hours (a name more than 48 h before S3 stored it is suspicious)
        started = now - timedelta(minutes=17 * (168 - i))
        key = backup_key("production", "database", started)
        tables = [{"table": f"public.t{n:02}", "rows": 1000 + i + n, "bytes": 50_000} for n in range(60)]
        profile = encrypt_profile(crypto.OPENSSL, lines("database", key, tables), PASSPHRASE)
        profile_version = client.put_object(Bucket=bucket, Key=profile_key(key), Body=profile, ChecksumAlgorithm="CRC32")["VersionId"]
        body = b"Salted__" + os.urandom(24)  # never read: a download would fail its checks
        version = client.put_object(Bucket=bucket, Key=key, Body=body, ChecksumAlgorithm="CRC32")["VersionId"]
        write_manifest(client, bucket, build_manifest(
            kind="database", environment="production", key=key, version_id=version, started_at=started, completed_at=started,
            key_id=key_id, encrypted_size=len(body), encrypted_sha256=hashlib.sha256(body).hexdigest(), plaintext_size=1,
            plaintext_sha256="0" * 64, source={"database": "app", "server_version": "17", "pg_dump_version": "17"},
            profile={"key": profile_key(key), "version_id": profile_version, "size": len(profile),
                     "sha256": hashlib.sha256(profile).hexdigest(), "entries": len(tables)}))
        backups.append(key)
    began = time.monotonic()
    result = compared(run)
    seconds = time.monotonic() - began
    print(f"\ncompared 168 profiles of 60 tables in {seconds:.1f} s")
    assert len(result["profiled"]) == 168 and result["crossings"] == []
    assert next(r for r in result["rows"] if r["name"] == "public.t00")["series"][-1] == 1167
    assert seconds < 30


@pytest.mark.slow
@pytest.mark.parametrize("objects", [65_600, 656_000])
def test_two_files_profiles_are_merged_as_they_stream(run, s3server, bucket, objects):
    """Two files backups' profiles (as large as the ZIP64 test's bucket, and ten times that), one
    object changed in place between them: the comparison merges the two key-ordered streams, its
    memory does not grow with the objects, and it names the changed key."""
    import hashlib
    import time

    from backupkit import crypto
    from backupkit.manifest import backup_key, build_manifest, write_manifest
    from backupkit.profile import header, profile_key
    from tests.backup_factory import aescrypt

    client = s3server.client()
    changed = f"uploads/{objects // 2:08}.pdf"
    for hours_ago in (2, 1):
        started = at(hours_ago)
        key = backup_key("production", "files", started)
        rows = [header("files", key)] + [{"key": f"uploads/{i:08}.pdf", "size": 1000 + i % 97,
                                           "crc32": "deadbeef" if hours_ago == 1 and f"uploads/{i:08}.pdf" == changed else f"{i:08x}"}
                                          for i in range(objects)]
        profile = aescrypt(b"".join(json.dumps(r).encode() + b"\n" for r in rows), PASSPHRASE)
        del rows
        profile_version = client.put_object(Bucket=bucket, Key=profile_key(key), Body=profile, ChecksumAlgorithm="CRC32")["VersionId"]
        body = b"AES" + os.urandom(40)
        version = client.put_object(Bucket=bucket, Key=key, Body=body, ChecksumAlgorithm="CRC32")["VersionId"]
        write_manifest(client, bucket, build_manifest(
            kind="files", environment="production", key=key, version_id=version, started_at=started, completed_at=started,
            key_id=crypto.key_id(PASSPHRASE), encrypted_size=len(body), encrypted_sha256=hashlib.sha256(body).hexdigest(),
            plaintext_size=1, plaintext_sha256="0" * 64,
            source={"bucket": "app", "prefix": "", "object_count": objects, "total_bytes": 0, "skipped": [], "skipped_count": 0},
            profile={"key": profile_key(key), "version_id": profile_version, "size": len(profile),
                     "sha256": hashlib.sha256(profile).hexdigest(), "entries": objects}))
    began = time.monotonic()
    done, memory = run.measured("compare_backups.py", "--kind", "files", timeout=900)
    seconds = time.monotonic() - began
    print(f"\ncompared two files profiles of {objects:,} objects in {seconds:.1f} s, peak {memory.peak_tree_kib / 1024:.0f} MiB")
    one_error(done, changed, "changed in place")
    assert memory.peak_tree_kib < 200 * 1024
