"""Backup keys and times are ASCII digits only, in the library and in decrypt.py alike: Python's
`\\d` also matches Arabic-Indic, Devanagari or full-width digits (and int() and strptime() read
them), so a key a writer spells with them must not pass for a backup."""

from __future__ import annotations

import json

import boto3
import pytest
from moto import mock_aws

from backupkit.config import parse_duration
from backupkit.errors import BackupError, UsageError
from backupkit.manifest import catalogue, key_time, match_key
from backupkit.manifest import parse_manifest as library_parse_manifest
from backupkit.retrieve import BucketReader
from tests.test_decrypt import load_standalone
from tests.test_decrypt_parity import DATABASE

standalone = load_standalone()
KEY = "production/database/2026-11-29--10-00-00.sql.encrypted"
DIGITS = {
    "arabic-indic": "٠١٢٣٤٥٦٧٨٩",
    "extended-arabic-indic": "۰۱۲۳۴۵۶۷۸۹",
    "devanagari": "०१२३४५६७८९",
    "full-width": "０１２３４５６７８９",
}


def spelled(text: str, digits: str, only: int | None = None) -> str:
    """`text` with its ASCII digits (or only the `only`th of them) written in `digits`."""
    out, seen = [], 0
    for ch in text:
        if ch.isascii() and ch.isdigit():
            out.append(digits[int(ch)] if only is None or seen == only else ch)
            seen += 1
        else:
            out.append(ch)
    return "".join(out)


def odd_keys() -> list[str]:
    return [spelled(KEY, digits, only) for digits in DIGITS.values() for only in (None, 0, 13)]


def test_the_ascii_key_is_a_backup_key_on_both_sides():
    assert match_key(KEY) and standalone.KEY_RE.fullmatch(KEY)
    assert key_time(KEY) == standalone.key_time(KEY) is not None


@pytest.mark.parametrize("key", odd_keys())
def test_a_key_in_other_digits_is_not_a_backup_key_on_either_side(key):
    assert key != KEY
    assert match_key(key) is None and standalone.KEY_RE.fullmatch(key) is None
    assert key_time(key) is None and standalone.key_time(key) is None


@pytest.mark.parametrize("field", ["key", "started_at", "completed_at"])
@pytest.mark.parametrize("digits", list(DIGITS))
def test_a_manifest_in_other_digits_is_refused_on_both_sides(field, digits):
    body = json.dumps({**DATABASE, field: spelled(DATABASE[field], DIGITS[digits], 0)}).encode()
    with pytest.raises(BackupError):
        library_parse_manifest(body, kind="database")
    with pytest.raises(standalone.Failure):
        standalone.parse_manifest(body, "M")
    library_parse_manifest(json.dumps(DATABASE).encode(), kind="database")  # the ASCII one passes both
    standalone.parse_manifest(json.dumps(DATABASE).encode(), "M")


def test_a_listed_key_in_other_digits_is_not_a_backup_and_cannot_be_named():
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="ext")
        client.put_object(Bucket="ext", Key=KEY, Body=b"Salted__")
        for key in odd_keys():
            client.put_object(Bucket="ext", Key=key, Body=b"Salted__")
            client.put_object(Bucket="ext", Key=key + ".manifest.json", Body=b"{}")
        found = catalogue(client, "ext", "production", ("database",))
        assert [b.key for b in found.backups] == [KEY]
        assert found.others_count == 2 * len(odd_keys())
        for key in odd_keys():
            with pytest.raises(UsageError, match="is not a database backup of production"):
                BucketReader(client, "ext", "production", "database", None).candidates(latest=False, key=key)


@pytest.mark.parametrize("value", [spelled("30m", d) for d in DIGITS.values()] + [spelled("12h", DIGITS["arabic-indic"], 1)])
def test_a_duration_in_other_digits_is_a_usage_error(value):
    assert parse_duration("30m").total_seconds() == 1800
    with pytest.raises(UsageError, match="invalid duration"):
        parse_duration(value)
