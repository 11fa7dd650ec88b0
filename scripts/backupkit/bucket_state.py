"""The external bucket's wanted state and the IAM policies around it, as plain data.

`wanted_state()` is what `setup_bucket.py --apply` writes and `--check` compares with, property by
property; `read_state()` reads the same properties back; `compare()` (pure) says which differ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .errors import BackupError, UsageError
from .output import shown
from .s3 import error_code, explain

MODES = ("COMPLIANCE", "GOVERNANCE")
DEFAULT_RETENTION_DAYS = 35
DEFAULT_EXPIRE_DAYS = 40
# A failed multipart upload is not a backup; a write-only writer cannot abort it itself.
ABORT_INCOMPLETE_UPLOADS_DAYS = 7
# Versions become noncurrent only when a delete marker (the expiry) covers them: delete soon after.
NONCURRENT_DAYS = 1

# Property names, in the order --apply writes them (versioning before Object Lock).
PROPERTIES = ("versioning", "object_lock", "lifecycle", "public_access_block", "encryption", "policy")


@dataclass(frozen=True)
class BucketSettings:
    bucket: str
    retention_days: int = DEFAULT_RETENTION_DAYS
    expire_days: int = DEFAULT_EXPIRE_DAYS
    mode: str = "COMPLIANCE"
    # Leave out the TLS-only bucket policy: for an S3-compatible endpoint served over plain HTTP
    # (tests, the demo), where that policy would refuse every object request.
    allow_plain_http: bool = False

    def validate(self) -> BucketSettings:
        if self.retention_days < 1:
            raise UsageError(f"--retention-days {self.retention_days}: must be at least 1 day")
        if self.expire_days <= self.retention_days:
            raise UsageError(
                f"--expire-days {self.expire_days} must be greater than --retention-days {self.retention_days}: "
                "a lifecycle expiry at or before the end of the lock would hide still-locked backups behind "
                "delete markers (readers no longer see them, yet nobody can delete them)"
            )
        if self.mode not in MODES:
            raise UsageError(f"--mode {self.mode}: use one of {', '.join(MODES)}")
        return self


# -- IAM policies -----------------------------------------------------------------------------

def _policy(*statements: dict[str, Any]) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": list(statements)}


def bucket_arn(bucket: str) -> str:
    return f"arn:aws:s3:::{bucket}"


def writable(bucket: str, environment: str | None = None) -> str:
    """Where a writer may write: the whole bucket, or one environment's folder."""
    return f"{bucket_arn(bucket)}/{environment}/*" if environment else f"{bucket_arn(bucket)}/*"


def write_only(bucket: str, environment: str | None = None) -> dict[str, Any]:
    """What the backup scripts need, and nothing else: they cannot read, list, delete or shorten
    a lock. With `environment`, only under that environment's folder: one writer per environment,
    so the staging job cannot plant objects among production's backups."""
    return _policy({"Sid": "WriteBackups", "Effect": "Allow", "Action": ["s3:PutObject"],
                    "Resource": [writable(bucket, environment)]})


def write_only_recommended(bucket: str, environment: str | None = None) -> dict[str, Any]:
    """write_only plus aborting one's own failed multipart uploads (touches unfinished uploads only)."""
    return _policy({"Sid": "WriteBackups", "Effect": "Allow", "Action": ["s3:PutObject", "s3:AbortMultipartUpload"],
                    "Resource": [writable(bucket, environment)]})


READ_BUCKET_ACTIONS = [
    "s3:ListBucket",  # list_objects_v2, and HeadBucket
    "s3:ListBucketVersions",  # list_backups, restore, fetch, verify: every version
    "s3:GetBucketLocation",
    "s3:GetBucketVersioning",  # setup_bucket.py --check
    "s3:GetBucketObjectLockConfiguration",
    "s3:GetLifecycleConfiguration",
    "s3:GetBucketPublicAccessBlock",
    "s3:GetEncryptionConfiguration",
    "s3:GetBucketPolicy",
]
READ_OBJECT_ACTIONS = [
    "s3:GetObject",
    "s3:GetObjectVersion",  # GET with a version id: every read names the version it verified
    "s3:GetObjectRetention",  # list_backups' retain-until column
]


def read_only(bucket: str) -> dict[str, Any]:
    """What list_backups, fetch/verify/restore and setup_bucket.py --check need: read, never write."""
    return _policy(
        {"Sid": "ReadBucket", "Effect": "Allow", "Action": list(READ_BUCKET_ACTIONS), "Resource": [bucket_arn(bucket)]},
        {"Sid": "ReadBackups", "Effect": "Allow", "Action": list(READ_OBJECT_ACTIONS), "Resource": [f"{bucket_arn(bucket)}/*"]},
    )


def holder(bucket: str) -> dict[str, Any]:
    """What compare_backups.py --hold needs: read the backups' versions and profiles, and place (or
    release) legal holds. No PutObject, no delete, no retention change: a hold keeps a version
    longer, never shorter."""
    return _policy(
        {"Sid": "ListBackups", "Effect": "Allow", "Action": ["s3:ListBucket", "s3:ListBucketVersions"],
         "Resource": [bucket_arn(bucket)]},
        {"Sid": "ReadAndHold", "Effect": "Allow", "Resource": [f"{bucket_arn(bucket)}/*"], "Action": [
            "s3:GetObject", "s3:GetObjectVersion", "s3:PutObjectLegalHold", "s3:GetObjectLegalHold"]},
    )


def administer(bucket: str) -> dict[str, Any]:
    """What setup_bucket.py --apply needs (plus everything --check reads). For the account owner's
    one-off setup; no backup job should hold it."""
    return _policy(
        {"Sid": "SetUpBucket", "Effect": "Allow", "Resource": [bucket_arn(bucket)], "Action": [
            "s3:CreateBucket",
            "s3:PutBucketVersioning",
            "s3:PutBucketObjectLockConfiguration",
            "s3:PutLifecycleConfiguration",
            "s3:PutBucketPublicAccessBlock",
            "s3:PutEncryptionConfiguration",
            "s3:PutBucketPolicy",
            *READ_BUCKET_ACTIONS,
        ]},
    )


def policies(bucket: str, environment: str | None = None) -> dict[str, dict[str, Any]]:
    """Every policy; with `environment`, the writers' are that environment's (the readers and
    the administrator stay bucket-wide: the daily checks and restores need no more than read)."""
    return {
        "write_only": write_only(bucket, environment),
        "write_only_recommended": write_only_recommended(bucket, environment),
        "read_only": read_only(bucket),
        "holder": holder(bucket),
        "administer": administer(bucket),
    }


# -- the wanted state -------------------------------------------------------------------------

def deny_insecure_transport(bucket: str) -> dict[str, Any]:
    return _policy({
        "Sid": "DenyInsecureTransport",
        "Effect": "Deny",
        "Principal": "*",
        "Action": "s3:*",
        "Resource": [bucket_arn(bucket), f"{bucket_arn(bucket)}/*"],
        "Condition": {"Bool": {"aws:SecureTransport": "false"}},
    })


def lifecycle_rules(settings: BucketSettings) -> list[dict[str, Any]]:
    everything = {"Prefix": ""}
    return [
        {"ID": "expire-current-versions", "Status": "Enabled", "Filter": everything,
         "Expiration": {"Days": settings.expire_days}},
        {"ID": "delete-noncurrent-versions", "Status": "Enabled", "Filter": everything,
         "NoncurrentVersionExpiration": {"NoncurrentDays": NONCURRENT_DAYS}},
        # AWS refuses ExpiredObjectDeleteMarker in a rule that also has Expiration Days.
        {"ID": "remove-expired-delete-markers", "Status": "Enabled", "Filter": everything,
         "Expiration": {"ExpiredObjectDeleteMarker": True}},
        {"ID": "abort-incomplete-multipart-uploads", "Status": "Enabled", "Filter": everything,
         "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": ABORT_INCOMPLETE_UPLOADS_DAYS}},
    ]


def wanted_state(settings: BucketSettings) -> dict[str, Any]:
    """Each property as the payload its S3 `put_…` call takes."""
    return {
        "versioning": {"Status": "Enabled"},
        "object_lock": {"ObjectLockEnabled": "Enabled",
                        "Rule": {"DefaultRetention": {"Mode": settings.mode, "Days": settings.retention_days}}},
        "lifecycle": {"Rules": lifecycle_rules(settings)},
        "public_access_block": {"BlockPublicAcls": True, "IgnorePublicAcls": True,
                                "BlockPublicPolicy": True, "RestrictPublicBuckets": True},
        # SSE-S3, not KMS: a KMS key would also need kms:GenerateDataKey in the write-only policy.
        "encryption": {"Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]},
        "policy": None if settings.allow_plain_http else deny_insecure_transport(settings.bucket),
    }


# -- comparing (pure) -------------------------------------------------------------------------

@dataclass(frozen=True)
class Finding:
    """One line of --check: a property (or one lifecycle rule), wanted and found, as text."""

    name: str
    prop: str  # which entry of the state --apply rewrites when this fails
    wanted: str
    found: str

    @property
    def ok(self) -> bool:
        return self.wanted == self.found

    def line(self) -> str:
        if self.ok:
            return f"PASS  {self.name}: {self.found}"
        return f"FAIL  {self.name}: wanted {self.wanted}; found {self.found}"

    def to_json(self) -> dict[str, Any]:
        return {"property": self.name, "ok": self.ok, "wanted": self.wanted, "found": self.found}


NOT_SET = "not set"


def _compact(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _describe_lock(value: dict[str, Any] | None) -> str:
    if not value or value.get("ObjectLockEnabled") != "Enabled":
        return "Object Lock not enabled"
    retention = (value.get("Rule") or {}).get("DefaultRetention") or {}
    if not retention:
        return "enabled, no default retention"
    if retention.get("Years"):
        return f"enabled, {retention.get('Mode')} {retention['Years']} years"
    return f"enabled, {retention.get('Mode')} {retention.get('Days')} days"


def _canonical_rule(rule: dict[str, Any]) -> dict[str, Any]:
    """A lifecycle rule without the spellings S3 varies: Filter {} / {"Prefix": ""} / Prefix ""."""
    rule = {k: v for k, v in rule.items() if v not in (None, {}, [])}
    prefix = rule.pop("Prefix", None)
    filt = rule.pop("Filter", None) or ({"Prefix": prefix} if prefix else {})
    if filt and filt != {"Prefix": ""}:
        rule["Filter"] = filt
    rule.pop("ID", None)
    return rule


def _describe_public_access(value: dict[str, Any] | None) -> str:
    if not value:
        return NOT_SET
    return ", ".join(f"{k}={str(bool(value.get(k))).lower()}"
                     for k in ("BlockPublicAcls", "IgnorePublicAcls", "BlockPublicPolicy", "RestrictPublicBuckets"))


def _describe_encryption(value: dict[str, Any] | None) -> str:
    rules = (value or {}).get("Rules") or []
    algorithms = [r.get("ApplyServerSideEncryptionByDefault", {}).get("SSEAlgorithm") for r in rules]
    return ", ".join(a for a in algorithms if a) or NOT_SET


def _describe_policy(value: dict[str, Any] | None) -> str:
    return _compact(value) if value else NOT_SET


def compare(wanted: dict[str, Any], found: dict[str, Any]) -> list[Finding]:
    """Property by property; `found` holds None for what is not set, or a str saying why it
    could not be read. A property wanted as None is not managed (the policy, with allow_plain_http)."""
    findings: list[Finding] = []

    def unreadable(prop: str, name: str, wanted_text: str) -> bool:
        if isinstance(found.get(prop), str):
            findings.append(Finding(name, prop, wanted_text, f"unreadable ({found[prop]})"))
            return True
        return False

    versioning = wanted["versioning"]["Status"]
    if not unreadable("versioning", "versioning", versioning):
        findings.append(Finding("versioning", "versioning", versioning,
                                (found.get("versioning") or {}).get("Status") or "never enabled"))

    lock = _describe_lock(wanted["object_lock"])
    if not unreadable("object_lock", "object lock", lock):
        findings.append(Finding("object lock", "object_lock", lock, _describe_lock(found.get("object_lock"))))

    wanted_rules = wanted["lifecycle"]["Rules"]
    if not unreadable("lifecycle", "lifecycle", f"{len(wanted_rules)} rules"):
        found_rules = {r.get("ID"): r for r in (found.get("lifecycle") or {}).get("Rules", [])}
        for rule in wanted_rules:
            have = found_rules.pop(rule["ID"], None)
            findings.append(Finding(f"lifecycle {rule['ID']}", "lifecycle", _compact(_canonical_rule(rule)),
                                    _compact(_canonical_rule(have)) if have else NOT_SET))
        # Another rule could expire backups early or hide them: only ours belong here.
        findings.append(Finding("lifecycle other rules", "lifecycle", "none",
                                ", ".join(sorted(str(k) for k in found_rules)) or "none"))

    for prop, name, describe in (("public_access_block", "public access block", _describe_public_access),
                                 ("encryption", "default encryption", _describe_encryption),
                                 ("policy", "bucket policy", _describe_policy)):
        if wanted[prop] is None:  # the policy, with allow_plain_http: it must not refuse plain HTTP
            if not unreadable(prop, name, NO_TLS_ONLY):
                has = any(_tls_only(s) for s in _statements(found.get(prop)))
                findings.append(Finding(name, prop, NO_TLS_ONLY, TLS_ONLY_FOUND if has else NO_TLS_ONLY))
            continue
        text = describe(wanted[prop])
        if not unreadable(prop, name, text):
            findings.append(Finding(name, prop, text, describe(found.get(prop))))
    return findings


NO_TLS_ONLY = "no statement refusing plain HTTP (--allow-plain-http)"
TLS_ONLY_FOUND = "a statement refusing every plain-HTTP request (aws:SecureTransport false)"


def _tls_only(statement: Any) -> bool:
    return isinstance(statement, dict) and statement.get("Effect") == "Deny" and "aws:SecureTransport" in json.dumps(statement.get("Condition", {}))


def _statements(policy: Any) -> list[Any]:
    """A policy's statements: IAM allows one statement object as well as a list of them."""
    statements = policy.get("Statement", []) if isinstance(policy, dict) else []
    if isinstance(statements, dict):
        return [statements]
    return statements if isinstance(statements, list) else []


def without_tls_only(policy: Any) -> dict[str, Any] | None:
    """`policy` without its TLS-only statements (None when nothing is left): what --apply
    --allow-plain-http writes, keeping any statement of the bucket's owner."""
    if policy is not None and not isinstance(policy, dict):
        raise BackupError(f"cannot change the bucket policy: it could not be read ({shown(str(policy))}); "
                          "run with credentials that may read it (s3:GetBucketPolicy)")
    rest = [s for s in _statements(policy) if not _tls_only(s)]
    return {**policy, "Statement": rest} if rest else None


def changes(findings: list[Finding]) -> list[str]:
    """The properties --apply has to write, in PROPERTIES order."""
    failing = {f.prop for f in findings if not f.ok}
    return [p for p in PROPERTIES if p in failing]


# -- reading and writing the bucket -----------------------------------------------------------

# The error codes S3 answers when a property was never set.
_NOT_SET_CODES = {
    "NoSuchLifecycleConfiguration",
    "NoSuchPublicAccessBlockConfiguration",
    "ServerSideEncryptionConfigurationNotFoundError",
    "NoSuchBucketPolicy",
    "ObjectLockConfigurationNotFoundError",
}

_READERS = {
    "versioning": lambda c, b: {k: v for k, v in c.get_bucket_versioning(Bucket=b).items() if k == "Status"},
    "object_lock": lambda c, b: c.get_object_lock_configuration(Bucket=b)["ObjectLockConfiguration"],
    "lifecycle": lambda c, b: {"Rules": c.get_bucket_lifecycle_configuration(Bucket=b)["Rules"]},
    "public_access_block": lambda c, b: c.get_public_access_block(Bucket=b)["PublicAccessBlockConfiguration"],
    "encryption": lambda c, b: c.get_bucket_encryption(Bucket=b)["ServerSideEncryptionConfiguration"],
    "policy": lambda c, b: json.loads(c.get_bucket_policy(Bucket=b)["Policy"]),
}

_WRITERS = {
    "versioning": lambda c, b, v: c.put_bucket_versioning(Bucket=b, VersioningConfiguration=v),
    "object_lock": lambda c, b, v: c.put_object_lock_configuration(Bucket=b, ObjectLockConfiguration=v),
    "lifecycle": lambda c, b, v: c.put_bucket_lifecycle_configuration(Bucket=b, LifecycleConfiguration=v),
    "public_access_block": lambda c, b, v: c.put_public_access_block(Bucket=b, PublicAccessBlockConfiguration=v),
    "encryption": lambda c, b, v: c.put_bucket_encryption(Bucket=b, ServerSideEncryptionConfiguration=v),
    "policy": lambda c, b, v: c.put_bucket_policy(Bucket=b, Policy=json.dumps(v)) if v else c.delete_bucket_policy(Bucket=b),
}


def bucket_exists(client: Any, bucket: str) -> bool:
    """Through GetBucketVersioning, which the read-only policy allows (HeadBucket needs ListBucket
    on AWS but a made-up s3:HeadBucket action on moto)."""
    try:
        client.get_bucket_versioning(Bucket=bucket)
        return True
    except Exception as exc:
        if error_code(exc) in ("NoSuchBucket", "404"):
            return False
        raise explain(exc, f"read s3://{bucket}") from exc


def read_state(client: Any, bucket: str) -> dict[str, Any]:
    """Every property: its value, None when not set, or a str saying why it could not be read."""
    state: dict[str, Any] = {}
    for prop in PROPERTIES:
        try:
            state[prop] = _READERS[prop](client, bucket)
        except Exception as exc:  # noqa: BLE001 - reported per property, so one denial hides nothing else
            code = error_code(exc)
            state[prop] = None if code in _NOT_SET_CODES else (code or f"{type(exc).__name__}: {exc}")
    return state


# What a bucket created with ObjectLockEnabledForBucket holds before any other setting.
NEW_BUCKET_STATE: dict[str, Any] = {**dict.fromkeys(PROPERTIES), "versioning": {"Status": "Enabled"},
                                    "object_lock": {"ObjectLockEnabled": "Enabled"}}


def create_bucket(client: Any, bucket: str, region: str | None) -> None:
    extra: dict[str, Any] = {}
    if region and region != "us-east-1":
        extra["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True, **extra)
    except Exception as exc:
        if error_code(exc) == "BucketAlreadyExists":
            raise BackupError(f"the bucket name {bucket!r} is taken by another AWS account: choose another name") from exc
        raise explain(exc, f"create the bucket s3://{bucket}") from exc


def write_property(client: Any, bucket: str, prop: str, value: Any) -> None:
    try:
        _WRITERS[prop](client, bucket, value)
    except Exception as exc:
        if prop == "object_lock":
            raise BackupError(
                f"could not turn on Object Lock for the existing bucket s3://{bucket} "
                f"(S3 answered {error_code(exc) or type(exc).__name__}: {_message(exc)}). "
                "Buckets created without Object Lock cannot always get it later (older S3 APIs, S3-compatible "
                "stores, or a bucket that already holds objects): create a new bucket with setup_bucket.py --apply "
                "--bucket NEW-NAME and point BACKUP_BUCKET at it"
            ) from exc
        raise explain(exc, f"set the {prop.replace('_', ' ')} of s3://{bucket}") from exc


def why_no_retain_until(client: Any, bucket: str) -> str:
    """Why S3 gave no retain-until date for some versions, as far as the bucket's Object Lock
    configuration tells (said once under a listing, not per version)."""
    unknown = ("S3 returned no lock date: no lock was applied (e.g. an endpoint without Object Lock), or this "
               "identity may not read retention (s3:GetObjectRetention)")
    try:
        config = _READERS["object_lock"](client, bucket)
    except Exception as exc:  # noqa: BLE001 - not allowed to read it, or not implemented: say both causes
        if error_code(exc) == "ObjectLockConfigurationNotFoundError":
            return "the bucket has no Object Lock, so nothing in it is locked (setup_bucket.py --check says what to fix)"
        return unknown
    described = _describe_lock(config)
    if described == "Object Lock not enabled":
        return "the bucket has no Object Lock, so nothing in it is locked (setup_bucket.py --check says what to fix)"
    if described == "enabled, no default retention":
        return ("the bucket's Object Lock has no default retention, so only versions written with a lock of their own "
                "are locked (setup_bucket.py --check says what to fix)")
    return (f"the bucket locks new versions ({described}), but S3 returned no lock date for these: written before "
            "that rule, or by an endpoint that ignores Object Lock, or this identity may not read retention "
            "(s3:GetObjectRetention)")


def _message(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return response.get("Error", {}).get("Message") or str(exc)
