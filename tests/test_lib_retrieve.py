"""backupkit.retrieve, in process: what GetObject's refusals become (S3 answers that moto over
plain HTTP cannot produce: SSE-C needs TLS, KMS keys and Intelligent-Tiering's archive tiers are
not simulated), and how skips are summarised. The scripts' own tests (test_hostile_bucket.py)
show the same against the HTTP endpoint with a GLACIER plant."""

from __future__ import annotations

from datetime import UTC, datetime

import botocore.exceptions
import pytest

from backupkit.errors import BackupError, Problem, VerificationError
from backupkit.manifest import Backup
from backupkit.retrieve import SKIPS_NAMED, BucketReader, Skip, Skips, nothing_verifies


class Refusing:
    """An S3 client whose GetObject answers one error code."""

    def __init__(self, code: str):
        self.code = code
        self.calls = 0

    def get_object(self, **_: object) -> None:
        self.calls += 1
        raise botocore.exceptions.ClientError({"Error": {"Code": self.code, "Message": "refused"}}, "GetObject")


def backup(storage_class: str | None = None) -> Backup:
    return Backup("production/database/2026-11-29--10-00-00.sql.zst.encrypted", "database", "v1",
                  datetime(2026, 11, 29, 10, 1, tzinfo=UTC), 10, storage_class=storage_class)


@pytest.mark.parametrize(("code", "says"), [
    ("InvalidObjectState", "restore it from the archive first"),
    ("InvalidRequest", "SSE-C"),
    ("AccessDenied", "KMS key"),
    ("KMS.DisabledException", "KMS key"),
])
def test_what_get_object_refuses_is_unreadable_with_the_reason(tmp_path, code, says):
    client = Refusing(code)
    with pytest.raises(VerificationError, match=says) as raised:
        BucketReader(client, "ext", "production", "database", None).download_checked(backup("GLACIER"), str(tmp_path / "b"))
    assert raised.value.problem is Problem.UNREADABLE and code in str(raised.value)
    assert client.calls == 1  # refused for good: not retried


def test_other_errors_stay_errors_not_skips(tmp_path):
    with pytest.raises(BackupError) as raised:
        BucketReader(Refusing("NoSuchBucket"), "ext", "production", "database", None).download_checked(backup(), str(tmp_path / "b"))
    assert not isinstance(raised.value, VerificationError)


def test_skips_are_named_then_counted():
    skips = Skips()
    for n in range(SKIPS_NAMED + 25):
        assert skips.add(Skip(backup(), Problem.INCOMPLETE if n % 5 else Problem.BAD_MANIFEST, "why")) == (n < SKIPS_NAMED)
    assert len(list(skips)) == SKIPS_NAMED and skips.total == SKIPS_NAMED + 25
    assert skips.more() == "25 more: 20 incomplete, 5 bad manifest"
    line = nothing_verifies(skips)
    assert line.startswith(f"none of the {SKIPS_NAMED + 25} backups can be used (the first {SKIPS_NAMED} are named above; "
                           "all of them: 28 incomplete, 7 bad manifest); the newest: ")
    few = Skips()
    few.add(Skip(backup(), Problem.CORRUPT, "why"))
    assert few.more() == "" and nothing_verifies(few).startswith("the only backup found cannot be used")
