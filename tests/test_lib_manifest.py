"""backupkit.manifest: what makes a manifest valid where it was found, and the catalogue's
rules (pairing, ordering by S3's clock, suspicious names, bounded reads), in process against
moto's S3 (mock_aws: these are unit tests; the scripts' own tests use the HTTP server)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import boto3
import pytest
from moto import mock_aws

from backupkit import crypto
from backupkit import manifest as manifest_module
from backupkit.errors import Problem, VerificationError
from backupkit.manifest import (
    MAX_MANIFEST_BYTES,
    Backup,
    backup_key,
    build_manifest,
    catalogue,
    parse_manifest,
    suspicion,
    validate_manifest,
)

NOW = datetime(2026, 11, 29, 10, 0, 0, tzinfo=UTC)
HEX = "ab" * 32


def manifest(which: str = "database", started: datetime = NOW, **changes) -> dict:
    """A valid manifest of a `which` backup started at `started`, then `changes` applied."""
    kind = which
    compression = {"compression": "zstd", "compressed_size": 5, "compressed_sha256": HEX} if kind == "database" else None
    source = ({"database": "app", "server_version": "15.18", "pg_dump_version": "15.18"} if kind == "database" else
              {"bucket": "app-files", "prefix": "", "object_count": 1, "total_bytes": 1, "skipped": [], "skipped_count": 0})
    built = build_manifest(kind=kind, environment="production", key=backup_key("production", kind, started,
                                                                                "zstd" if kind == "database" else "none"),
                           version_id="v1", started_at=started, completed_at=started + timedelta(seconds=30), key_id="0" * 16,
                           encrypted_size=10, encrypted_sha256=HEX, plaintext_size=20, plaintext_sha256=HEX,
                           source=source, compression=compression)
    return {**built, **changes}


def test_a_built_manifest_is_valid_where_it_belongs():
    for kind in ("database", "files"):
        good = manifest(which=kind)
        assert validate_manifest(good, key=good["key"], kind=kind, environment="production") == good


@pytest.mark.parametrize(("change", "why"), [
    ({"key_id": ""}, "key_id"),
    ({"key_id": "\n::add-mask::x"}, "key_id"),
    ({"encrypted_sha256": "xyz"}, "encrypted_sha256"),
    ({"plaintext_size": -1}, "plaintext_size"),
    ({"plaintext_size": 1.5}, "plaintext_size"),
    ({"encrypted_size": True}, "encrypted_size"),
    ({"kind": "logs"}, "kind"),
    ({"encryption": "aescrypt-v2"}, "encryption"),
    ({"compression": "gzip"}, "compression"),
    ({"compression": "none"}, "does not fit the name"),
    ({"key": "production/files/2026-11-29--10-00-00.zip.encrypted"}, "names"),
    ({"key": "production/database/../../x.sql.encrypted"}, "not a backup key"),
    ({"environment": "staging"}, "names"),
    ({"started_at": "2099-01-01T00:00:00Z"}, "times"),
    ({"manifest_version": 2}, "manifest_version"),
    ({"source": {"database": 42}}, "source"),
    ({"version_id": 7}, "version_id"),
])
def test_invalid_manifests_are_refused_with_the_reason(change, why):
    bad = manifest(**change)
    with pytest.raises(VerificationError, match=why) as raised:
        validate_manifest(bad)
    assert raised.value.problem is Problem.BAD_MANIFEST


def test_a_manifest_must_agree_with_where_it_was_found():
    good = manifest()
    with pytest.raises(VerificationError, match="another object"):
        validate_manifest(good, key=good["key"].replace("10-00-00", "11-00-00"))
    with pytest.raises(VerificationError, match="not files"):
        validate_manifest(good, kind="files")
    with pytest.raises(VerificationError, match="not staging"):
        validate_manifest(good, environment="staging")


def test_manifest_bytes_are_bounded_and_must_be_json():
    good = json.dumps(manifest()).encode()
    assert parse_manifest(good)["key_id"] == "0" * 16
    for body in (good + b" " * MAX_MANIFEST_BYTES, b"[" * 50_000 + b"]" * 50_000, b"\xff", b"{"):
        with pytest.raises(VerificationError):
            parse_manifest(body)


@pytest.mark.parametrize(("name_offset", "suspicious"), [
    (timedelta(0), False), (timedelta(minutes=-30), False), (timedelta(hours=-47), False),
    (timedelta(minutes=4), False), (timedelta(minutes=6), True), (timedelta(days=-3), True), (timedelta(days=365 * 70), True),
])
def test_a_name_far_from_when_s3_stored_it_is_suspicious(name_offset, suspicious):
    stored = NOW
    backup = Backup(backup_key("production", "database", stored + name_offset, "zstd"), "database", "v", stored, 10)
    assert (suspicion(backup) is not None) == suspicious
    assert backup.taken_at <= stored


@pytest.fixture
def s3():
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="ext", ObjectLockEnabledForBucket=True)
        yield client


def put_backup(client, started: datetime, body: bytes = b"x" * 10, **changes) -> dict:
    key = backup_key("production", "database", started, "zstd")
    version = client.put_object(Bucket="ext", Key=key, Body=body)["VersionId"]
    written = manifest(started=started, **{"version_id": version, "encrypted_size": len(body), **changes})
    client.put_object(Bucket="ext", Key=key + ".manifest.json", Body=json.dumps(written).encode())
    return written


def test_the_catalogue_orders_by_when_s3_stored_each_backup_and_flags_suspicious_names(s3):
    now = datetime.now(UTC).replace(microsecond=0)
    first = put_backup(s3, now - timedelta(hours=2))
    plant = put_backup(s3, datetime(2099, 12, 31, tzinfo=UTC))
    last = put_backup(s3, now - timedelta(hours=1))
    s3.put_object(Bucket="ext", Key="production/database/not-a-backup.txt", Body=b"?")
    found = catalogue(s3, "ext", "production", ("database",))
    found.check()
    keys = [b.key for b in found.backups]
    assert set(keys) == {first["key"], plant["key"], last["key"]}
    assert keys.index(last["key"]) < keys.index(first["key"])  # stored later, listed first
    by_key = {b.key: b for b in found.backups}
    assert by_key[plant["key"]].problem is Problem.SUSPICIOUS and not by_key[plant["key"]].usable
    assert by_key[last["key"]].usable and by_key[first["key"]].usable
    assert found.others == ["production/database/not-a-backup.txt"]


def test_the_first_manifest_stored_for_a_version_wins(s3):
    genuine = put_backup(s3, datetime.now(UTC) - timedelta(hours=1))
    s3.put_object(Bucket="ext", Key=genuine["key"] + ".manifest.json",
                  Body=json.dumps({**genuine, "encrypted_sha256": "cd" * 32}).encode())
    [backup] = catalogue(s3, "ext", "production", ("database",)).check()
    assert backup.manifest["encrypted_sha256"] == HEX


def test_problems_come_back_as_data(s3):
    now = datetime.now(UTC)
    incomplete = backup_key("production", "database", now - timedelta(hours=3), "zstd")
    s3.put_object(Bucket="ext", Key=incomplete, Body=b"x")
    oversized = put_backup(s3, now - timedelta(hours=2))
    s3.put_object(Bucket="ext", Key=oversized["key"], Body=b"y" * 10)  # a second version: its manifest is too big
    corrupt = put_backup(s3, now - timedelta(hours=1), encrypted_size=99)
    backups = catalogue(s3, "ext", "production", ("database",)).check()
    problems = {(b.key, b.version_id): b.problem for b in backups}
    assert problems[(incomplete, backups[-1].version_id)] is Problem.INCOMPLETE
    assert Problem.CORRUPT in {p for (k, _), p in problems.items() if k == corrupt["key"]}
    assert None in {p for (k, _), p in problems.items() if k == oversized["key"]}


def test_key_ids_name_passphrases_without_revealing_them():
    assert crypto.key_id("correct horse") == crypto.key_id("correct horse")
    assert crypto.key_id("correct horse") != crypto.key_id("correct horse\n")
    assert len(crypto.key_id("x")) == 16
    with pytest.raises(VerificationError, match="mistyped"):
        crypto.pick_passphrase(crypto.key_id("the right one"), ["a wrong one"])
    assert crypto.pick_passphrase(crypto.key_id("old\n"), ["new", "old"]) == "old\n"  # before the one-line rule


# -- the catalogue reads manifests only as far as a reader goes ------------------------------------
def plant_incomplete(client, started: datetime) -> str:
    key = backup_key("production", "database", started, "zstd")
    client.put_object(Bucket="ext", Key=key, Body=b"x")
    return key


def test_listing_reads_no_manifest_and_walking_reads_only_what_it_reaches(s3):
    now = datetime.now(UTC).replace(microsecond=0)
    older = [put_backup(s3, now - timedelta(hours=5, minutes=n)) for n in range(40)]
    genuine = put_backup(s3, now - timedelta(hours=2))
    for n in range(30):  # incomplete plants, newer: known from the listing alone
        plant_incomplete(s3, now - timedelta(hours=1, minutes=n))
    found = catalogue(s3, "ext", "production", ("database",))
    assert found.reads == 0 and len(found.backups) == 71
    newest = next(b for b in found.walk(found.backups) if b.usable)
    assert newest.key == genuine["key"]
    assert found.reads <= 1 + manifest_module.READ_AHEAD < len(older)  # the genuine one's, and a few ahead
    skipped = [b for b in found.backups if b.checked and b.problem is Problem.INCOMPLETE]
    assert len(skipped) == 30


def test_a_walk_with_a_budget_leaves_the_rest_unchecked(s3):
    now = datetime.now(UTC).replace(microsecond=0)
    for n in range(6):
        put_backup(s3, now - timedelta(hours=n + 1))
    incomplete = plant_incomplete(s3, now - timedelta(hours=9))
    found = catalogue(s3, "ext", "production", ("database",))
    walked = list(found.walk(found.backups, budget=2))
    valid = [b for b in walked if b.key != incomplete]
    assert [b.checked for b in valid] == [True, True, False, False, False, False]
    assert not valid[2].usable and valid[2].status == "not checked"
    [planted] = [b for b in walked if b.key == incomplete]
    assert planted.checked and planted.problem is Problem.INCOMPLETE  # known from the listing: costs no read
    assert found.reads == 2


def test_manifests_stored_before_a_version_cannot_be_its_own_and_at_most_a_few_are_read(s3):
    genuine = put_backup(s3, datetime.now(UTC) - timedelta(hours=1))
    for n in range(20):  # a writer floods the manifest's key with versions, all naming the genuine version
        s3.put_object(Bucket="ext", Key=genuine["key"] + ".manifest.json",
                      Body=json.dumps({**genuine, "encrypted_sha256": f"{n:02d}" * 32}).encode())
    found = catalogue(s3, "ext", "production", ("database",))
    [backup] = found.check()
    assert backup.manifest["encrypted_sha256"] == HEX and found.reads == manifest_module.MAX_MANIFESTS_PER_VERSION


def test_an_archived_backup_is_unreadable_without_reading_its_manifest(s3):
    now = datetime.now(UTC).replace(microsecond=0)
    genuine = put_backup(s3, now - timedelta(hours=2))
    key = backup_key("production", "database", now - timedelta(hours=1), "zstd")
    version = s3.put_object(Bucket="ext", Key=key, Body=b"x" * 10, StorageClass="GLACIER")["VersionId"]
    planted = manifest(started=now - timedelta(hours=1), version_id=version)
    s3.put_object(Bucket="ext", Key=key + ".manifest.json", Body=json.dumps(planted).encode())

    found = catalogue(s3, "ext", "production", ("database",))
    newest = next(b for b in found.walk(found.backups) if b.usable)
    assert newest.key == genuine["key"]
    archived = found.backups[0]
    assert (archived.key, archived.problem, archived.manifest) == (key, Problem.UNREADABLE, None)
    assert "stored as GLACIER" in archived.detail and found.reads == 1
    # A listing reads it, to show it is complete but unreadable.
    [listed] = catalogue(s3, "ext", "production", ("database",), key=key).check()
    assert listed.problem is Problem.UNREADABLE and listed.complete
