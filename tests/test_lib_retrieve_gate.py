"""backupkit.retrieve's decisions on crafted listings, in process against moto's S3 (mock_aws):
which backup --latest takes and what it skips (in order, with the reason as data), which one
--key names (a bare file name, another environment's key, a key with several versions and
--version-id), and that a named backup's failure is final. test_lib_retrieve.py covers
GetObject's refusals and how skips are counted; the scripts' own tests go through HTTP."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta

import boto3
import pytest
from moto import mock_aws

from backupkit import crypto
from backupkit.errors import BackupError, Problem, UsageError, VerificationError
from backupkit.manifest import backup_key
from backupkit.retrieve import BucketReader
from tests.test_lib_manifest import manifest

PASSPHRASE = "the gate's passphrase"
BODY = b"Salted__" + b"\x01" * 24  # openssl's format, as far as the gate looks


@pytest.fixture
def s3():
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="ext", ObjectLockEnabledForBucket=True)
        yield client


def put(client, started: datetime, body: bytes = BODY, *, key: str | None = None, **changes) -> dict:
    """One backup version and its manifest (valid unless `changes` say otherwise)."""
    key = key or backup_key("production", "database", started, "zstd")
    version = client.put_object(Bucket="ext", Key=key, Body=body)["VersionId"]
    written = manifest(started=started, **{"key": key, "version_id": version, "encrypted_size": len(body),
                                           "encrypted_sha256": hashlib.sha256(body).hexdigest(),
                                           "key_id": crypto.key_id(PASSPHRASE), **changes})
    client.put_object(Bucket="ext", Key=key + ".manifest.json", Body=json.dumps(written).encode())
    return written


def reader(client, environment: str = "production") -> BucketReader:
    return BucketReader(client, "ext", environment, "database", [PASSPHRASE])


def opened(gate: BucketReader, backups, *, latest: bool):
    """first_good() with a `work` that only records what it was handed."""
    return gate.first_good(backups, lambda fetched: fetched.backup.version_id, latest=latest)


def test_latest_takes_the_newest_usable_and_says_what_it_skipped_in_order(s3):
    """(All stored within a second here: S3's dates tie and the names order them; the order by
    LastModified itself is test_lib_manifest.py's.)"""
    now = datetime.now(UTC).replace(microsecond=0)
    good = put(s3, now - timedelta(hours=4))
    put(s3, now - timedelta(hours=3), encrypted_sha256="cd" * 32)  # corrupt: its download does not match
    put(s3, now - timedelta(hours=2), key_id=crypto.key_id("another passphrase"))  # made with another one
    incomplete = backup_key("production", "database", now - timedelta(hours=1), "zstd")
    s3.put_object(Bucket="ext", Key=incomplete, Body=BODY)  # no manifest
    gate = reader(s3)
    retrieved = opened(gate, gate.candidates(latest=True), latest=True)
    assert retrieved.result == good["version_id"]
    assert [s.problem for s in retrieved.skipped] == [Problem.INCOMPLETE, Problem.UNKNOWN_PASSPHRASE, Problem.CORRUPT]
    assert retrieved.skipped.named[0].backup.key == incomplete


def test_latest_with_nothing_usable_fails_naming_the_newest_reason(s3):
    now = datetime.now(UTC).replace(microsecond=0)
    put(s3, now - timedelta(hours=2), encrypted_sha256="cd" * 32)
    put(s3, now - timedelta(hours=1), encrypted_sha256="ef" * 32)
    gate = reader(s3)
    with pytest.raises(BackupError, match=r"none of the 2 backups can be used .*the newest: ") as raised:
        opened(gate, gate.candidates(latest=True), latest=True)
    assert not isinstance(raised.value, VerificationError)


def test_latest_in_an_empty_folder_says_where_it_looked(s3):
    with pytest.raises(BackupError, match="no database backup found in s3://ext/production/database/"):
        reader(s3).candidates(latest=True)


def test_a_named_backup_that_fails_is_final_even_with_a_good_one_beside_it(s3):
    now = datetime.now(UTC).replace(microsecond=0)
    put(s3, now - timedelta(hours=2))
    corrupt = put(s3, now - timedelta(hours=1), encrypted_sha256="cd" * 32)
    gate = reader(s3)
    with pytest.raises(VerificationError) as raised:
        opened(gate, gate.candidates(latest=False, key=corrupt["key"]), latest=False)
    assert raised.value.problem is Problem.CORRUPT and str(raised.value).startswith(corrupt["key"])


def test_a_key_is_taken_whole_or_as_a_bare_file_name_and_only_from_its_own_folder(s3):
    started = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    written = put(s3, started)
    name = written["key"].rsplit("/", 1)[1]
    for given in (written["key"], name):
        [chosen] = reader(s3).candidates(latest=False, key=given)
        assert (chosen.key, chosen.version_id) == (written["key"], written["version_id"])
    for wrong in (f"staging/database/{name}", f"production/files/{name}", "production/database/latest.sql.encrypted"):
        with pytest.raises(UsageError, match="is not a database backup of production"):
            reader(s3).candidates(latest=False, key=wrong)
    with pytest.raises(UsageError, match="--latest or --key"):
        reader(s3).candidates(latest=False)


def test_a_key_with_several_versions_needs_a_version_id(s3):
    started = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    first = put(s3, started)
    second = put(s3, started, body=BODY + b"second")
    with pytest.raises(BackupError, match="has 2 versions, and a writer can add one at any time: pick one with --version-id") as raised:
        reader(s3).candidates(latest=False, key=first["key"])
    assert first["version_id"] in str(raised.value) and second["version_id"] in str(raised.value)
    for wanted in (first, second):
        gate = reader(s3)
        [chosen] = gate.candidates(latest=False, key=first["key"], version_id=wanted["version_id"])
        assert opened(gate, [chosen], latest=False).result == wanted["version_id"]
    with pytest.raises(BackupError, match="version no-such-version in the bucket: Its versions, newest first"):
        reader(s3).candidates(latest=False, key=first["key"], version_id="no-such-version")
    with pytest.raises(BackupError, match="no backup .* in the bucket: run list_backups.py"):
        reader(s3).candidates(latest=False, key=backup_key("production", "database", started - timedelta(days=1), "zstd"))
