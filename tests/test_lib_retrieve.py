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


class Cutting:
    """An S3 client whose GetObject answers honour Range, and whose bodies break off after
    `cut_after` bytes (botocore's error for a body cut short) while `cuts` lasts."""

    def __init__(self, data: bytes, cut_after: int, cuts: int):
        self.data = data
        self.cut_after = cut_after
        self.cuts = cuts
        self.requests: list[dict[str, object]] = []

    def get_object(self, **request: object) -> dict[str, object]:
        self.requests.append(request)
        start = int(str(request.get("Range", "bytes=0-"))[6:-1])
        client = self

        class Body:
            def __init__(self) -> None:
                self.at = start
                self.sent = 0

            def read(self, size: int = -1) -> bytes:
                if client.cuts and self.sent >= client.cut_after:
                    client.cuts -= 1
                    raise botocore.exceptions.IncompleteReadError(actual_bytes=self.sent, expected_bytes=len(client.data))
                size = min(size if size > 0 else len(client.data), 1000)
                chunk = client.data[self.at:self.at + size]
                self.at += len(chunk)
                self.sent += len(chunk)
                return chunk

            def close(self) -> None:
                pass

        return {"Body": Body(), "ETag": '"etag-1"'}


def test_a_body_that_breaks_off_resumes_where_it_stopped(monkeypatch, capsys):
    """Each break is followed by a ranged GET from the first byte not yet received, on the same
    version and ETag: the reader gets every byte once, in order."""
    monkeypatch.setattr("time.sleep", lambda _: None)
    data = bytes(range(256)) * 40
    client = Cutting(data, cut_after=3000, cuts=3)
    body = BucketReader(client, "ext", "production", "database", None).body(backup())
    received = b"".join(iter(lambda: body.read(1000), b""))
    assert received == data
    assert [r.get("Range") for r in client.requests] == [None, "bytes=3000-", "bytes=6000-", "bytes=9000-"]
    assert all(r["VersionId"] == "v1" for r in client.requests)
    assert [r.get("IfMatch") for r in client.requests] == [None, '"etag-1"', '"etag-1"', '"etag-1"']
    assert capsys.readouterr().err.count("resuming from byte") == 3


def test_a_body_that_keeps_breaking_off_without_progress_fails(monkeypatch):
    monkeypatch.setattr("time.sleep", lambda _: None)
    client = Cutting(b"x" * 5000, cut_after=0, cuts=100)
    body = BucketReader(client, "ext", "production", "database", None).body(backup())
    with pytest.raises(BackupError, match="broke off 5 times"):
        body.read(1000)
    assert len(client.requests) == 5
