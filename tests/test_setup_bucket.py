"""setup_bucket.py, and the backup scripts under the IAM policies it prints, on a moto server that
enforces IAM (tests/iam_helpers.py): every script runs with an IAM user's keys holding exactly one
printed policy.

What moto does and does not enforce (tested in moto 5.0 to 5.2):
- identity policies: enforced per request, but under the name of the API operation (botocore's),
  not the IAM action AWS checks: PUT ?object-lock is checked as s3:PutObjectLockConfiguration where
  AWS checks s3:PutBucketObjectLockConfiguration. iam_helpers.as_moto_checks_it adds those names
  beside the IAM actions that grant them, so the printed policies are tested for what they allow
  and deny, under AWS's names.
- bucket policies: evaluated for object requests only, and moto ignores `Bool` conditions: the
  deny-insecure-transport policy refuses every object request, even over TLS. AWS refuses only
  plain HTTP, which is also all our local endpoint speaks; so the backup tests set the bucket up
  with --allow-plain-http (no TLS policy), and one test shows the policy in force.
- Object Lock: default retention applied to new objects, deletes of locked versions refused
  (COMPLIANCE even with BypassGovernanceRetention); lifecycle rules are stored, never run.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from backupkit import bucket_state
from backupkit.errors import BackupError
from dev.harness import table_fingerprint
from tests.conftest import PASSPHRASE, Runner, base_env, error_lines
from tests.iam_helpers import IamS3Server, User, error_code

SCRIPT = "setup_bucket.py"


@pytest.fixture(scope="module")
def iam_server():
    server = IamS3Server().start()
    yield server
    server.stop()


def printed_policies(bucket: str) -> dict:
    done = Runner(base_env())(SCRIPT, "--bucket", bucket, "--print-policies", check=True)
    return json.loads(done.stdout)


@dataclass
class Setup:
    """A bucket name and one IAM user per printed policy, each with a Runner using its keys."""

    bucket: str
    operator: User  # the `administer` policy: what --apply needs
    writer: User  # write_only: s3:PutObject, nothing else
    reader: User  # read_only
    admin: User  # "*": stands in for the account owner changing things by hand
    extra_env: dict

    def runner(self, user: User) -> Runner:
        return Runner({**base_env(), **user.env(), "BACKUP_BUCKET": self.bucket, "BACKUP_ENVIRONMENT": "production",
                       "EXTERNAL_BACKUP_ENCRYPTION_KEY": PASSPHRASE, "BACKUP_ALLOW_SUPERUSER": "1", **self.extra_env})


def make_setup(server: IamS3Server, extra_env: dict | None = None) -> Setup:
    suffix = uuid.uuid4().hex[:12]
    bucket = f"ext-backups-{suffix}"
    policies = printed_policies(bucket)
    return Setup(
        bucket=bucket,
        operator=server.user(f"operator-{suffix}", policies["administer"]),
        writer=server.user(f"writer-{suffix}", policies["write_only"]),
        reader=server.user(f"reader-{suffix}", policies["read_only"]),
        admin=server.admin,
        extra_env=extra_env or {},
    )


@pytest.fixture
def setup(iam_server):
    """The endpoint is plain HTTP: every run says so (BACKUP_ALLOW_PLAIN_HTTP), as a drill would."""
    return make_setup(iam_server, {"BACKUP_ALLOW_PLAIN_HTTP": "1"})


# -- pure data ------------------------------------------------------------------------------------

def test_write_only_policy_is_exactly_put_object():
    assert bucket_state.write_only("b-1") == {"Version": "2012-10-17", "Statement": [
        {"Sid": "WriteBackups", "Effect": "Allow", "Action": ["s3:PutObject"], "Resource": ["arn:aws:s3:::b-1/*"]}]}
    recommended = bucket_state.write_only_recommended("b-1")["Statement"]
    assert [s["Action"] for s in recommended] == [["s3:PutObject", "s3:AbortMultipartUpload"]]


def test_read_only_policy_reads_and_never_writes():
    actions = {a for s in bucket_state.read_only("b-1")["Statement"] for a in s["Action"]}
    assert {"s3:ListBucket", "s3:ListBucketVersions", "s3:GetObject", "s3:GetObjectVersion", "s3:GetObjectRetention",
            "s3:GetBucketVersioning", "s3:GetBucketObjectLockConfiguration", "s3:GetLifecycleConfiguration",
            "s3:GetBucketPublicAccessBlock", "s3:GetEncryptionConfiguration", "s3:GetBucketPolicy"} <= actions
    assert all(a.startswith(("s3:Get", "s3:List")) for a in actions)


def test_compare_names_each_drifted_property():
    settings = bucket_state.BucketSettings("b-1")
    wanted = bucket_state.wanted_state(settings)
    assert all(f.ok for f in bucket_state.compare(wanted, wanted))
    found = {**wanted, "versioning": {"Status": "Suspended"}, "encryption": None, "policy": "AccessDenied"}
    failed = {f.name: f for f in bucket_state.compare(wanted, found) if not f.ok}
    assert set(failed) == {"versioning", "default encryption", "bucket policy"}
    assert failed["bucket policy"].found == "unreadable (AccessDenied)"
    assert bucket_state.changes(list(failed.values())) == ["versioning", "encryption", "policy"]


def test_policies_of_any_valid_shape_are_read_and_an_unreadable_one_is_not_rewritten():
    """IAM allows one statement object instead of a list; a policy that could not be read is not
    guessed at (--apply --allow-plain-http would have to rewrite it)."""
    plain = bucket_state.wanted_state(bucket_state.BucketSettings("b-1", allow_plain_http=True))
    [tls_only] = bucket_state.deny_insecure_transport("b-1")["Statement"]
    owners = {"Sid": "Owner", "Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::1:root"}, "Action": "s3:GetObject",
              "Resource": "arn:aws:s3:::b-1/*"}
    for policy, has_tls_only in (({"Statement": tls_only}, True), ({"Statement": owners}, False), ({"Statement": "?"}, False)):
        [finding] = [f for f in bucket_state.compare(plain, {**plain, "policy": policy}) if f.prop == "policy"]
        assert finding.ok is not has_tls_only
    assert bucket_state.without_tls_only({"Version": "2012-10-17", "Statement": tls_only}) is None
    assert bucket_state.without_tls_only({"Statement": [tls_only, owners]})["Statement"] == [owners]
    with pytest.raises(BackupError, match="could not be read"):
        bucket_state.without_tls_only("AccessDenied")


# -- usage errors (exit 2, before any request) ------------------------------------------------------

@pytest.mark.parametrize(("args", "message"), [
    (["--bucket", "Bad_Bucket", "--check"], "invalid bucket name 'Bad_Bucket'"),
    (["--bucket", "ab", "--apply"], "invalid bucket name 'ab'"),
    (["--bucket", "ok-bucket", "--apply", "--retention-days", "40"], "hide still-locked backups behind delete markers"),
    (["--bucket", "ok-bucket", "--apply", "--retention-days", "35", "--expire-days", "30"], "must be greater than --retention-days"),
    (["--bucket", "ok-bucket", "--check", "--retention-days", "0"], "must be at least 1 day"),
    (["--bucket", "ok-bucket", "--check", "--dry-run"], "--dry-run goes with --apply"),
    (["--bucket", "ok-bucket"], "one of the arguments --apply --check --print-policies is required"),
    (["--bucket", "ok-bucket", "--check", "--mode", "LOOSE"], "invalid choice"),
])
def test_usage_errors_exit_2(args, message):
    done = Runner(base_env())(SCRIPT, *args)
    assert done.returncode == 2, done.stderr
    assert message in error_lines(done.stderr)[0]
    assert done.stdout == ""


# -- --apply and --check ------------------------------------------------------------------------

def test_apply_creates_then_changes_nothing_and_check_passes(setup):
    operator = setup.runner(setup.operator)
    dry = operator(SCRIPT, "--apply", "--dry-run", check=True)
    assert "would change" in dry.stdout and "create s3://" in dry.stdout
    assert error_code(setup.admin.client().get_bucket_versioning, Bucket=setup.bucket) == "NoSuchBucket"

    first = operator(SCRIPT, "--apply", "--json", check=True)
    result = json.loads(first.stdout)
    assert result["created"] is True
    assert result["changes"] == [line.strip() for line in dry.stdout.splitlines()[1:]]  # as the dry run said
    assert len(result["changes"]) == 8

    second = operator(SCRIPT, "--apply", check=True)
    assert second.stdout.strip() == f"no changes: s3://{setup.bucket} is already in the wanted state"
    assert json.loads(operator(SCRIPT, "--apply", "--dry-run", "--json", check=True).stdout)["changes"] == []

    check = setup.runner(setup.reader)(SCRIPT, "--check", check=True)
    lines = check.stdout.splitlines()
    assert len(lines) == 10 and all(line.startswith("PASS") for line in lines), check.stdout
    assert "PASS  object lock: enabled, COMPLIANCE 35 days" in lines
    assert "PASS  bucket policy: no statement refusing plain HTTP (--allow-plain-http)" in lines

    client = setup.admin.client()
    lock = client.get_object_lock_configuration(Bucket=setup.bucket)["ObjectLockConfiguration"]
    assert lock["ObjectLockEnabled"] == "Enabled"
    assert {k: lock["Rule"]["DefaultRetention"][k] for k in ("Mode", "Days")} == {"Mode": "COMPLIANCE", "Days": 35}
    rules = {r["ID"]: r for r in client.get_bucket_lifecycle_configuration(Bucket=setup.bucket)["Rules"]}
    assert rules["expire-current-versions"]["Expiration"] == {"Days": 40}
    assert rules["delete-noncurrent-versions"]["NoncurrentVersionExpiration"]["NoncurrentDays"] == 1
    assert rules["remove-expired-delete-markers"]["Expiration"] == {"ExpiredObjectDeleteMarker": True}
    assert rules["abort-incomplete-multipart-uploads"]["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 7}
    assert all(client.get_public_access_block(Bucket=setup.bucket)["PublicAccessBlockConfiguration"].values())
    encryption = client.get_bucket_encryption(Bucket=setup.bucket)["ServerSideEncryptionConfiguration"]
    assert encryption["Rules"][0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    assert error_code(client.get_bucket_policy, Bucket=setup.bucket) == "NoSuchBucketPolicy"


def test_check_fails_naming_the_property_changed_by_hand(setup):
    setup.runner(setup.operator)(SCRIPT, "--apply", check=True)
    reader = setup.runner(setup.reader)
    client = setup.admin.client()

    client.put_bucket_lifecycle_configuration(Bucket=setup.bucket, LifecycleConfiguration={"Rules": [
        {"ID": "expire-current-versions", "Status": "Enabled", "Filter": {"Prefix": ""}, "Expiration": {"Days": 5}}]})
    done = reader(SCRIPT, "--check")
    assert done.returncode == 1
    assert 'FAIL  lifecycle expire-current-versions: wanted {"Expiration":{"Days":40},"Status":"Enabled"}; ' \
           'found {"Expiration":{"Days":5},"Status":"Enabled"}' in done.stdout
    assert "FAIL  lifecycle delete-noncurrent-versions" in done.stdout
    assert "PASS  object lock" in done.stdout
    assert "lifecycle expire-current-versions" in error_lines(done.stderr)[0]
    assert "setup_bucket.py --bucket" in error_lines(done.stderr)[0]

    setup.runner(setup.operator)(SCRIPT, "--apply", check=True)
    client.put_object_lock_configuration(Bucket=setup.bucket, ObjectLockConfiguration={
        "ObjectLockEnabled": "Enabled", "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 10}}})
    done = reader(SCRIPT, "--check", "--json")
    assert done.returncode == 1
    failed = [p for p in json.loads(done.stdout)["properties"] if not p["ok"]]
    assert failed == [{"property": "object lock", "ok": False, "wanted": "enabled, COMPLIANCE 35 days",
                       "found": "enabled, GOVERNANCE 10 days"}]

    fixed = setup.runner(setup.operator)(SCRIPT, "--apply", check=True)
    assert "set object lock: enabled, GOVERNANCE 10 days → enabled, COMPLIANCE 35 days" in fixed.stdout
    reader(SCRIPT, "--check", check=True)


def test_check_of_a_missing_bucket_fails(setup):
    done = setup.runner(setup.reader)(SCRIPT, "--check")
    assert done.returncode == 1
    assert "does not exist" in error_lines(done.stderr)[0]


def test_check_other_settings(setup):
    """--retention-days/--expire-days/--mode are part of the wanted state for both commands."""
    operator = setup.runner(setup.operator)
    operator(SCRIPT, "--apply", "--retention-days", "7", "--expire-days", "10", "--mode", "GOVERNANCE", check=True)
    setup.runner(setup.reader)(SCRIPT, "--check", "--retention-days", "7", "--expire-days", "10", "--mode", "GOVERNANCE", check=True)
    assert setup.runner(setup.reader)(SCRIPT, "--check").returncode == 1


def test_existing_bucket_without_object_lock(setup):
    client = setup.admin.client()
    client.create_bucket(Bucket=setup.bucket)  # no Object Lock, no versioning, empty
    setup.runner(setup.operator)(SCRIPT, "--apply", check=True)
    setup.runner(setup.reader)(SCRIPT, "--check", check=True)

    other = f"{setup.bucket}-full"
    client.create_bucket(Bucket=other)
    client.put_object(Bucket=other, Key="something", Body=b"x")
    done = setup.runner(setup.admin)(SCRIPT, "--bucket", other, "--apply")
    assert done.returncode == 1
    message = error_lines(done.stderr)[0]
    assert f"could not turn on Object Lock for the existing bucket s3://{other}" in message
    assert "create a new bucket" in message


def test_operator_policy_is_enough_and_reader_cannot_apply(setup):
    done = setup.runner(setup.reader)(SCRIPT, "--apply")
    assert done.returncode == 1
    assert "AccessDenied" in error_lines(done.stderr)[0] or "access denied" in error_lines(done.stderr)[0]
    assert error_code(setup.admin.client().get_bucket_versioning, Bucket=setup.bucket) == "NoSuchBucket"


# -- the backup scripts under the printed policies ---------------------------------------------------

@pytest.fixture(scope="module")
def backed_up(iam_server, pg, sample_db):
    """A bucket set up by --apply and one database backup made with the write-only keys."""
    setup = make_setup(iam_server, {"PG_DUMP": str(pg.bin / "pg_dump"), "PSQL": str(pg.bin / "psql")})
    setup.runner(setup.operator)(SCRIPT, "--apply", "--allow-plain-http", check=True)
    done = setup.runner(setup.writer)("backup_database.py", "--json", env={"DATABASE_URL": pg.url(sample_db)}, check=True)
    return setup, json.loads(done.stdout)


def test_writer_backs_up_and_can_do_nothing_else(backed_up):
    setup, manifest = backed_up
    key, version = manifest["key"], manifest["version_id"]
    assert version
    writer = setup.writer.client()
    denied = {
        "list": error_code(writer.list_objects_v2, Bucket=setup.bucket),
        "list versions": error_code(writer.list_object_versions, Bucket=setup.bucket),
        "get": error_code(writer.get_object, Bucket=setup.bucket, Key=key),
        "get version": error_code(writer.get_object, Bucket=setup.bucket, Key=key, VersionId=version),
        "delete": error_code(writer.delete_object, Bucket=setup.bucket, Key=key),
        "delete version": error_code(writer.delete_object, Bucket=setup.bucket, Key=key, VersionId=version),
        "lifecycle": error_code(writer.put_bucket_lifecycle_configuration, Bucket=setup.bucket,
                                LifecycleConfiguration={"Rules": [{"ID": "x", "Status": "Enabled", "Filter": {},
                                                                   "Expiration": {"Days": 1}}]}),
    }
    assert denied == dict.fromkeys(denied, "AccessDenied")
    # Nothing was deleted or hidden: the object's only version is still there.
    versions = setup.admin.client().list_object_versions(Bucket=setup.bucket, Prefix=key)
    assert [v["VersionId"] for v in versions.get("Versions", []) if v["Key"] == key] == [version]
    assert not versions.get("DeleteMarkers")


def test_reader_lists_restores_and_checks_but_cannot_write(backed_up, pg, sample_db, scratch_db):
    setup, manifest = backed_up
    reader = setup.runner(setup.reader)
    listed = json.loads(reader("list_backups.py", "--json", check=True).stdout)
    assert [(b["key"], b["version_id"], b["complete"]) for b in listed] == [(manifest["key"], manifest["version_id"], True)]

    reader("restore_database.py", "--latest", env={"TARGET_DATABASE_URL": pg.url(scratch_db)}, check=True)
    for table in ("applications", "admin_user"):
        assert table_fingerprint(pg, scratch_db, table) == table_fingerprint(pg, sample_db, table)

    checked = reader(SCRIPT, "--check", "--allow-plain-http", check=True)
    assert "PASS  bucket policy: no statement refusing plain HTTP" in checked.stdout
    refused = reader(SCRIPT, "--check")  # a plain-HTTP endpoint without the flag: said before anything
    assert refused.returncode == 2 and "plain HTTP" in error_lines(refused.stderr)[0]

    client = setup.reader.client()
    assert error_code(client.put_object, Bucket=setup.bucket, Key="production/database/x", Body=b"x",
                      ChecksumAlgorithm="CRC32") == "AccessDenied"
    assert error_code(client.delete_object, Bucket=setup.bucket, Key=manifest["key"]) == "AccessDenied"
    assert error_code(client.delete_object, Bucket=setup.bucket, Key=manifest["key"],
                      VersionId=manifest["version_id"]) == "AccessDenied"


def test_compliance_locked_backup_cannot_be_deleted_by_anyone(backed_up):
    setup, manifest = backed_up
    key, version = manifest["key"], manifest["version_id"]
    admin = setup.admin.client()  # allowed every action by IAM: only the lock stands in the way
    head = admin.head_object(Bucket=setup.bucket, Key=key, VersionId=version)  # moto lacks GetObjectRetention
    assert head["ObjectLockMode"] == "COMPLIANCE"
    expected = datetime.now(UTC) + timedelta(days=35)
    assert abs(head["ObjectLockRetainUntilDate"] - expected) < timedelta(hours=1)

    assert error_code(admin.delete_object, Bucket=setup.bucket, Key=key, VersionId=version) == "AccessDenied"
    assert error_code(admin.delete_object, Bucket=setup.bucket, Key=key, VersionId=version,
                      BypassGovernanceRetention=True) == "AccessDenied"
    assert admin.get_object(Bucket=setup.bucket, Key=key, VersionId=version)["ContentLength"] == manifest["encrypted_size"]

    listed = json.loads(setup.runner(setup.reader)("list_backups.py", "--json", check=True).stdout)
    backup = next(b for b in listed if b["version_id"] == version)
    retain_until = datetime.fromisoformat(backup["retain_until"].replace("Z", "+00:00"))
    assert abs(retain_until - expected) < timedelta(hours=1)
    table = setup.runner(setup.reader)("list_backups.py", check=True).stdout
    assert retain_until.strftime("%Y-%m-%dT%H:%M") in table


def test_plain_http_is_refused_before_anything_changes_and_allowed_it_removes_the_tls_policy(setup, pg, sample_db):
    """A bucket set up for TLS (by --apply against https, or by hand) refuses every plain-HTTP
    request, as AWS does (moto refuses even TLS: it ignores the condition). Against a plain-HTTP
    endpoint, --apply without --allow-plain-http changes nothing and says why; with it, --apply
    removes the TLS-only statement and keeps the owner's others; a 403 names both checks."""
    operator = setup.runner(setup.operator)
    operator(SCRIPT, "--apply", check=True)
    admin = setup.admin.client()
    other = {"Sid": "OwnersOwn", "Effect": "Deny", "Principal": "*", "Action": "s3:PutBucketAcl",
             "Resource": f"arn:aws:s3:::{setup.bucket}"}
    tls_only = bucket_state.deny_insecure_transport(setup.bucket)
    bucket_state.write_property(admin, setup.bucket, "policy", {**tls_only, "Statement": [*tls_only["Statement"], other]})
    assert error_code(admin.put_object, Bucket=setup.bucket, Key="production/database/x", Body=b"x",
                      ChecksumAlgorithm="CRC32") in ("403", "AccessDenied")

    writer = setup.runner(setup.writer)
    done = writer("backup_database.py", env={"DATABASE_URL": pg.url(sample_db), "PG_DUMP": str(pg.bin / "pg_dump")})
    assert done.returncode == 1
    line = error_lines(done.stderr)[0]
    assert "denied by a bucket policy or missing s3:PutObject" in line and "--check" in line and "--print-policies" in line

    refused = operator(SCRIPT, "--apply", env={"BACKUP_ALLOW_PLAIN_HTTP": None})
    assert refused.returncode == 2 and "--allow-plain-http" in error_lines(refused.stderr)[0]
    assert len(json.loads(admin.get_bucket_policy(Bucket=setup.bucket)["Policy"])["Statement"]) == 2  # unchanged
    check = setup.runner(setup.reader)(SCRIPT, "--check")
    assert check.returncode == 1 and "FAIL  bucket policy" in check.stdout and "does not block a restore" in check.stderr

    fixed = operator(SCRIPT, "--apply", check=True)
    assert "set bucket policy: a statement refusing every plain-HTTP request" in fixed.stdout
    assert json.loads(admin.get_bucket_policy(Bucket=setup.bucket)["Policy"])["Statement"] == [other]
    writer("backup_database.py", env={"DATABASE_URL": pg.url(sample_db), "PG_DUMP": str(pg.bin / "pg_dump")}, check=True)
    assert operator(SCRIPT, "--apply", check=True).stdout.startswith("no changes")


def test_the_tls_policy_is_written_and_read_back_as_wanted(setup):
    """What --apply writes against an https endpoint, through the same functions."""
    setup.runner(setup.operator)(SCRIPT, "--apply", check=True)
    admin = setup.admin.client()
    wanted = bucket_state.wanted_state(bucket_state.BucketSettings(setup.bucket))
    bucket_state.write_property(admin, setup.bucket, "policy", wanted["policy"])
    found = bucket_state.read_state(admin, setup.bucket)
    assert all(f.ok for f in bucket_state.compare(wanted, found))
    plain = bucket_state.wanted_state(bucket_state.BucketSettings(setup.bucket, allow_plain_http=True))
    [policy] = [f for f in bucket_state.compare(plain, found) if f.prop == "policy"]
    assert not policy.ok and bucket_state.without_tls_only(found["policy"]) is None


@pytest.mark.parametrize("policy", ["write_only", "write_only_recommended"])
def test_write_only_multipart_upload_and_abort(iam_server, policy, capsys):
    """The streamed multipart upload needs nothing but s3:PutObject; aborting a failed one needs
    s3:AbortMultipartUpload, and without it the upload is left for the lifecycle rule."""
    from backupkit.upload import MIB, StreamingUpload

    setup = make_setup(iam_server)
    setup.runner(setup.operator)(SCRIPT, "--apply", "--allow-plain-http", check=True)
    writer = iam_server.user(f"{policy.replace('_', '-')}-{setup.bucket[-12:]}", printed_policies(setup.bucket)[policy]).client()

    upload = StreamingUpload(writer, setup.bucket, "production/database/multipart.sql.encrypted", initial_part_size=5 * MIB)
    upload.write(b"x" * (6 * MIB))
    assert upload.complete()
    admin = setup.admin.client()
    assert admin.head_object(Bucket=setup.bucket, Key=upload.key)["ContentLength"] == 6 * MIB

    failed = StreamingUpload(writer, setup.bucket, "production/database/failed.sql.encrypted", initial_part_size=5 * MIB)
    failed.write(b"y" * (5 * MIB))
    failed.abort()
    left = admin.list_multipart_uploads(Bucket=setup.bucket).get("Uploads", [])
    warning = capsys.readouterr().err
    if policy == "write_only":
        assert [u["Key"] for u in left] == [failed.key]
        assert "could not abort the incomplete multipart upload" in warning and "AccessDenied" in warning
        assert "lifecycle rule removes it after 7 days" in warning
    else:
        assert left == [] and warning == ""


def test_apply_creates_the_bucket_in_the_given_region(setup):
    done = setup.runner(setup.operator)(SCRIPT, "--apply", "--region", "eu-central-1", "--allow-plain-http", check=True)
    assert "in eu-central-1 with Object Lock enabled" in done.stdout
    location = setup.admin.client().get_bucket_location(Bucket=setup.bucket)["LocationConstraint"]
    assert location == "eu-central-1"


def test_a_writer_for_one_environment_backs_it_up_and_cannot_write_under_another(iam_server, pg, sample_db):
    """One writer per environment: the staging job's credentials (or whoever stole them) cannot
    plant objects, versions or manifests among production's backups."""
    setup = make_setup(iam_server, {"PG_DUMP": str(pg.bin / "pg_dump"), "PSQL": str(pg.bin / "psql")})
    setup.runner(setup.operator)(SCRIPT, "--apply", "--allow-plain-http", check=True)
    done = Runner(base_env())(SCRIPT, "--bucket", setup.bucket, "--environment", "staging", "--print-policies", check=True)
    scoped = json.loads(done.stdout)
    for name in ("write_only", "write_only_recommended"):
        assert [s["Resource"] for s in scoped[name]["Statement"]] == [[f"arn:aws:s3:::{setup.bucket}/staging/*"]]
    everyone = printed_policies(setup.bucket)
    assert scoped["read_only"] == everyone["read_only"] and scoped["administer"] == everyone["administer"]
    assert everyone["write_only"]["Statement"][0]["Resource"] == [f"arn:aws:s3:::{setup.bucket}/*"]  # as before, without it

    staging = iam_server.user(f"staging-writer-{setup.bucket[-12:]}", scoped["write_only"])
    runner = setup.runner(staging)
    done = runner("backup_database.py", "--json", env={"DATABASE_URL": pg.url(sample_db), "BACKUP_ENVIRONMENT": "staging"})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["key"].startswith("staging/database/")

    done = runner("backup_database.py", env={"DATABASE_URL": pg.url(sample_db), "BACKUP_ENVIRONMENT": "production"})
    assert done.returncode == 1
    assert "AccessDenied" in error_lines(done.stderr)[0]
    client = staging.client()
    production = "production/database/2026-11-29--10-00-00.sql.zst.encrypted"
    assert error_code(client.put_object, Bucket=setup.bucket, Key=production, Body=b"planted", ChecksumAlgorithm="CRC32") == "AccessDenied"
    assert error_code(client.put_object, Bucket=setup.bucket, Key=production + ".manifest.json", Body=b"{}",
                      ChecksumAlgorithm="CRC32") == "AccessDenied"
    assert error_code(client.create_multipart_upload, Bucket=setup.bucket, Key=production) == "AccessDenied"
    listed = setup.admin.client().list_object_versions(Bucket=setup.bucket, Prefix="production/")
    assert not listed.get("Versions") and not listed.get("DeleteMarkers")
    assert error_code(client.put_object, Bucket=setup.bucket, Key="staging/x", Body=b"x", ChecksumAlgorithm="CRC32") is None


def test_environment_goes_with_print_policies_only():
    for action in ("--apply", "--check"):
        done = Runner(base_env())(SCRIPT, "--bucket", "ok-bucket", "--environment", "staging", action)
        assert done.returncode == 2 and "--environment goes with --print-policies" in error_lines(done.stderr)[0]
    done = Runner(base_env())(SCRIPT, "--bucket", "ok-bucket", "--environment", "Staging", "--print-policies")
    assert done.returncode == 2 and "invalid environment name" in error_lines(done.stderr)[0]


# -- the holder: compare_backups.py --hold ------------------------------------------------------------

def test_holder_policy_reads_and_holds_and_nothing_else():
    actions = {a for s in bucket_state.holder("b-1")["Statement"] for a in s["Action"]}
    assert actions == {"s3:ListBucket", "s3:ListBucketVersions", "s3:GetObject", "s3:GetObjectVersion",
                       "s3:PutObjectLegalHold", "s3:GetObjectLegalHold"}


def test_holder_holds_the_backup_before_a_loss_and_cannot_write_delete_or_shorten_a_lock(iam_server, pg):
    """Two backups made by the writer, the second after 90% of a table went; the holder's
    comparison holds the first. The holder can read and hold, and nothing else."""
    from dev.harness import create_sample_database

    setup = make_setup(iam_server, {"PG_DUMP": str(pg.bin / "pg_dump"), "PSQL": str(pg.bin / "psql")})
    setup.runner(setup.operator)(SCRIPT, "--apply", "--allow-plain-http", check=True)
    holder = iam_server.user(f"holder-{setup.bucket[-12:]}", printed_policies(setup.bucket)["holder"])
    name = f"held_{uuid.uuid4().hex[:8]}"
    made = []
    for rows, hours_ago in ((200, 2), (20, 1)):
        create_sample_database(pg, name, rows=rows)
        started = (datetime.now(UTC) - timedelta(hours=hours_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")
        done = setup.runner(setup.writer)("backup_database.py", "--json",
                                          env={"DATABASE_URL": pg.url(name), "EXTERNAL_BACKUPS_NOW": started}, check=True)
        made.append(json.loads(done.stdout))
    pg.drop_database(name)
    good, damaged = made

    done = setup.runner(holder)("compare_backups.py", "--kind", "database", "--hold")
    assert done.returncode == 1, done.stderr
    assert "public.applications" in error_lines(done.stderr)[0] and "HELD: profile" in done.stdout
    client = holder.client()
    assert client.get_object_legal_hold(Bucket=setup.bucket, Key=good["key"], VersionId=good["version_id"])["LegalHold"]["Status"] == "ON"
    assert client.get_object_legal_hold(Bucket=setup.bucket, Key=damaged["key"],
                                        VersionId=damaged["version_id"])["LegalHold"].get("Status") != "ON"
    key, version = good["key"], good["version_id"]
    denied = {
        "put": error_code(client.put_object, Bucket=setup.bucket, Key="production/database/x", Body=b"x", ChecksumAlgorithm="CRC32"),
        "delete": error_code(client.delete_object, Bucket=setup.bucket, Key=key),
        "delete version": error_code(client.delete_object, Bucket=setup.bucket, Key=key, VersionId=version),
        "retention": error_code(client.put_object_retention, Bucket=setup.bucket, Key=key, VersionId=version,
                                Retention={"Mode": "GOVERNANCE", "RetainUntilDate": datetime.now(UTC) + timedelta(days=1)},
                                BypassGovernanceRetention=True),
        "lock configuration": error_code(client.put_object_lock_configuration, Bucket=setup.bucket,
                                         ObjectLockConfiguration={"ObjectLockEnabled": "Enabled"}),
        "lifecycle": error_code(client.put_bucket_lifecycle_configuration, Bucket=setup.bucket,
                                LifecycleConfiguration={"Rules": [{"ID": "x", "Status": "Enabled", "Filter": {},
                                                                   "Expiration": {"Days": 1}}]}),
    }
    assert denied == dict.fromkeys(denied, "AccessDenied")
    # Releasing is the holder's too: one request per version held.
    client.put_object_legal_hold(Bucket=setup.bucket, Key=key, VersionId=version, LegalHold={"Status": "OFF"})
    assert client.get_object_legal_hold(Bucket=setup.bucket, Key=key, VersionId=version)["LegalHold"]["Status"] == "OFF"
