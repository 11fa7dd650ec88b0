"""Backup keys, manifests and the catalogue of backups in the external bucket.

A backup is complete only when its manifest exists (written after the object completed). The
catalogue lists every version of every backup (paginated), pairs each with its manifest through
the manifest's `version_id`, and orders them by when S3 stored them.

Everything in the bucket may have been written by a less-trusted writer (the backup jobs hold
s3:PutObject): a manifest is read only up to MAX_MANIFEST_BYTES and used only if every field is
valid and agrees with where it was found; a backup whose name's time is in the future or far from
its LastModified is SUSPICIOUS and never "latest"; ages come from the server's clock.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from . import __version__
from .config import ENVIRONMENT_RE, utcnow
from .crypto import AESCRYPT_FORMAT, OPENSSL_FORMAT
from .errors import BackupError, Problem, VerificationError
from .output import shown
from .s3 import error_code, read_body, s3_errors

KINDS = ("database", "files")
ENCRYPTION = {"database": OPENSSL_FORMAT, "files": AESCRYPT_FORMAT}
COMPRESSIONS = ("zstd", "none")  # database backups only; files are stored in the ZIP
SUFFIXES = {("database", "none"): ".sql.encrypted", ("database", "zstd"): ".sql.zst.encrypted",
            ("files", "none"): ".zip.encrypted"}
MANIFEST_SUFFIX = ".manifest.json"
TIMESTAMP_FORMAT = "%Y-%m-%d--%H-%M-%S"
KEY_RE = re.compile(
    r"^(?P<env>[a-z0-9][a-z0-9-]{0,62})/(?P<kind>database|files)/"
    r"(?P<ts>\d{4}-\d\d-\d\d--\d\d-\d\d-\d\d)(?P<suffix>\.sql\.encrypted|\.sql\.zst\.encrypted|\.zip\.encrypted)$"
)
# A genuine manifest is under 1 KiB, or a few tens of KiB for a files backup naming skipped
# objects (at most MAX_SKIPPED_LISTED of them): anything bigger is not read at all.
MAX_MANIFEST_BYTES = 256 * 1024
MAX_SKIPPED_LISTED = 100
# A backup's name carries its start time, chosen by the writer. S3's LastModified is when the
# object completed. Genuine backups start at most a job's length before they complete, and the
# writer's clock may be a little ahead of S3's.
CLOCK_SKEW = timedelta(minutes=5)
LONGEST_RUN = timedelta(hours=48)

_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
_MAX_SIZE = 2**53
_MAX_TEXT = 1024

MANIFEST_FIELDS: dict[str, type] = {
    "manifest_version": int,
    "kind": str,
    "environment": str,
    "key": str,
    "started_at": str,
    "completed_at": str,
    "encryption": str,
    "key_id": str,
    "encrypted_size": int,
    "encrypted_sha256": str,
    "plaintext_size": int,
    "plaintext_sha256": str,
    "source": dict,
    "tool_version": str,
}
SOURCE_FIELDS: dict[str, dict[str, type]] = {
    "database": {"database": str, "server_version": str, "pg_dump_version": str},
    "files": {"bucket": str, "prefix": str, "object_count": int, "total_bytes": int, "skipped": list},
}


def backup_key(environment: str, kind: str, started_at: datetime, compression: str = "none") -> str:
    stamp = started_at.astimezone(UTC).strftime(TIMESTAMP_FORMAT)
    return f"{environment}/{kind}/{stamp}{SUFFIXES[(kind, compression)]}"


def manifest_key(key: str) -> str:
    return key + MANIFEST_SUFFIX


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def key_time(key: str) -> datetime | None:
    match = KEY_RE.fullmatch(key)
    if not match:
        return None
    try:
        return datetime.strptime(match.group("ts"), TIMESTAMP_FORMAT).replace(tzinfo=UTC)
    except ValueError:  # e.g. month 13: not a name this tool writes
        return None


def build_manifest(
    *,
    kind: str,
    environment: str,
    key: str,
    version_id: str | None,
    started_at: datetime,
    completed_at: datetime,
    key_id: str,
    encrypted_size: int,
    encrypted_sha256: str,
    plaintext_size: int,
    plaintext_sha256: str,
    source: dict[str, Any],
    compression: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A manifest; `compression` is {"compression": "zstd", "compressed_size": …, "compressed_sha256": …}
    for a compressed database backup (plaintext_* then describe the SQL, end to end)."""
    manifest = {
        "manifest_version": 1,
        "kind": kind,
        "environment": environment,
        "key": key,
        "version_id": version_id,
        "started_at": iso(started_at),
        "completed_at": iso(completed_at),
        "encryption": ENCRYPTION[kind],
        **(compression or ({"compression": "none"} if kind == "database" else {})),
        "key_id": key_id,
        "encrypted_size": encrypted_size,
        "encrypted_sha256": encrypted_sha256,
        "plaintext_size": plaintext_size,
        "plaintext_sha256": plaintext_sha256,
        "source": source,
        "tool_version": __version__,
    }
    validate_manifest(manifest)
    return manifest


def for_upload(upload: Any, plaintext: Any, *, kind: str, environment: str, started_at: datetime, key_id: str,
               source: dict[str, Any], compression: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of a completed StreamingUpload (its key, version, size and SHA-256) whose
    plaintext went through the Tally `plaintext`, completed now."""
    return build_manifest(kind=kind, environment=environment, key=upload.key, version_id=upload.version_id,
                          started_at=started_at, completed_at=utcnow(), key_id=key_id, encrypted_size=upload.size,
                          encrypted_sha256=upload.sha256.hexdigest(), plaintext_size=plaintext.size,
                          plaintext_sha256=plaintext.hexdigest(), source=source, compression=compression)


def _text(value: Any, limit: int = _MAX_TEXT) -> bool:
    return isinstance(value, str) and len(value) <= limit


def _size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _MAX_SIZE


def validate_manifest(manifest: Any, *, key: str | None = None, kind: str | None = None,
                      environment: str | None = None) -> dict[str, Any]:
    """Raise VerificationError (BAD_MANIFEST) unless every field of `manifest` is present, well
    formed and bounded, and agrees with the key, kind and environment it was found under."""
    where = f"the manifest of {shown(key)}" if key else "the manifest"

    def bad(what: str) -> VerificationError:
        return VerificationError(f"{where} {what}", Problem.BAD_MANIFEST)

    if not isinstance(manifest, dict):
        raise bad("is not a JSON object")
    for name, wanted in MANIFEST_FIELDS.items():
        value = manifest.get(name)
        if not isinstance(value, wanted) or isinstance(value, bool):
            raise bad(f"lacks a valid {name!r}")
    if manifest["manifest_version"] != 1:
        raise bad(f"has manifest_version {shown(manifest['manifest_version'])}; this tool reads 1")
    if "version_id" not in manifest or not (manifest["version_id"] is None or _text(manifest["version_id"])):
        raise bad("lacks a valid 'version_id'")
    if manifest["kind"] not in KINDS:
        raise bad(f"has an unknown kind '{shown(manifest['kind'][:64])}'")
    if not ENVIRONMENT_RE.fullmatch(manifest["environment"]):
        raise bad("has an invalid 'environment'")
    match = KEY_RE.fullmatch(manifest["key"]) if _text(manifest["key"]) else None
    if not match or key_time(manifest["key"]) is None:
        raise bad("names an object that is not a backup key")
    if (match.group("env"), match.group("kind")) != (manifest["environment"], manifest["kind"]):
        raise bad(f"says {manifest['kind']} backup of {manifest['environment']} but names {shown(manifest['key'])}")
    if manifest["encryption"] != ENCRYPTION[manifest["kind"]]:
        raise bad(f"says encryption '{shown(manifest['encryption'][:64])}', which is not how {manifest['kind']} backups are made")
    compression = manifest.get("compression", "none")
    if compression not in COMPRESSIONS or (manifest["kind"] == "files" and compression != "none"):
        raise bad("has an invalid 'compression'")
    if SUFFIXES[(manifest["kind"], compression)] != match.group("suffix"):
        raise bad(f"says compression {compression}, which does not fit the name {shown(manifest['key'])}")
    if compression == "zstd" and not (_size(manifest.get("compressed_size"))
                                      and isinstance(manifest.get("compressed_sha256"), str)
                                      and _HEX64.fullmatch(manifest["compressed_sha256"])):
        raise bad("lacks a valid 'compressed_size' or 'compressed_sha256'")
    if not _KEY_ID.fullmatch(manifest["key_id"]):
        raise bad("has an invalid 'key_id' (16 hexadecimal digits)")
    for name in ("encrypted_sha256", "plaintext_sha256"):
        if not _HEX64.fullmatch(manifest[name]):
            raise bad(f"has an invalid {name!r}")
    for name in ("encrypted_size", "plaintext_size"):
        if not _size(manifest[name]):
            raise bad(f"has an invalid {name!r}")
    for name in ("started_at", "completed_at"):
        if not _ISO.fullmatch(manifest[name]):
            raise bad(f"has an invalid {name!r}")
    if manifest["started_at"] != iso(key_time(manifest["key"])) or manifest["completed_at"] < manifest["started_at"]:
        raise bad("has times that do not fit its name")
    if not _text(manifest["tool_version"], 64):
        raise bad("has an invalid 'tool_version'")
    _validate_source(manifest["kind"], manifest["source"], bad)
    if key is not None and manifest["key"] != key:
        raise bad(f"names another object ({shown(manifest['key'])})")
    if kind is not None and manifest["kind"] != kind:
        raise bad(f"is for a {manifest['kind']} backup, not {kind}")
    if environment is not None and manifest["environment"] != environment:
        raise bad(f"is for environment {manifest['environment']}, not {environment}")
    return manifest


def _validate_source(kind: str, source: dict[str, Any], bad: Any) -> None:
    for name, wanted in SOURCE_FIELDS[kind].items():
        value = source.get(name)
        if wanted is str and not _text(value):
            raise bad(f"lacks a valid source {name!r}")
        if wanted is int and not _size(value):
            raise bad(f"lacks a valid source {name!r}")
        if wanted is list and not (isinstance(value, list) and len(value) <= 10 * MAX_SKIPPED_LISTED
                                   and all(_text(item) for item in value)):
            raise bad(f"lacks a valid source {name!r}")
    if kind == "files" and "skipped_count" in source and not _size(source["skipped_count"]):
        raise bad("lacks a valid source 'skipped_count'")


def parse_manifest(body: bytes, *, key: str | None = None, kind: str | None = None,
                   environment: str | None = None) -> dict[str, Any]:
    """A manifest from its bytes (at most MAX_MANIFEST_BYTES), validated."""
    where = f"the manifest of {shown(key)}" if key else "the manifest"
    if len(body) > MAX_MANIFEST_BYTES:
        raise VerificationError(f"{where} is over {MAX_MANIFEST_BYTES // 1024} KiB: not one this tool writes",
                                Problem.BAD_MANIFEST)
    try:
        manifest = json.loads(body)
    except (ValueError, RecursionError):
        raise VerificationError(f"{where} is not valid JSON", Problem.BAD_MANIFEST) from None
    return validate_manifest(manifest, key=key, kind=kind, environment=environment)


def write_manifest(client: Any, bucket: str, manifest: dict[str, Any]) -> str | None:
    body = (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode()
    key = manifest_key(manifest["key"])
    with s3_errors(f"write the manifest s3://{bucket}/{key} (the backup object exists but counts as incomplete)"):
        response = client.put_object(
            Bucket=bucket, Key=key, Body=body, ContentType="application/json", ChecksumAlgorithm="CRC32"
        )
    return response.get("VersionId")


def read_manifest(client: Any, bucket: str, key: str, version_id: str | None = None, *,
                  kind: str | None = None, environment: str | None = None) -> dict[str, Any]:
    """The manifest of backup `key`, read only up to MAX_MANIFEST_BYTES (+1, to see it is over)."""
    extra = {"VersionId": version_id} if version_id else {}
    body = read_body(f"read the manifest s3://{bucket}/{shown(manifest_key(key))}",
                     lambda: client.get_object(Bucket=bucket, Key=manifest_key(key), Range=f"bytes=0-{MAX_MANIFEST_BYTES}", **extra),
                     lambda b: b.read(MAX_MANIFEST_BYTES + 1))
    return parse_manifest(body, key=key, kind=kind, environment=environment)


@dataclass
class Backup:
    """One version of one backup object, with its manifest when it is complete and valid."""

    key: str
    kind: str
    version_id: str | None
    last_modified: datetime  # when S3 stored it: the server's clock, not the writer's
    size: int
    manifest: dict[str, Any] | None = None
    problem: Problem | None = None  # why it cannot be used; None: usable
    detail: str | None = None  # the problem, said for the operator
    retain_until: datetime | None = None

    @property
    def complete(self) -> bool:
        return self.manifest is not None

    @property
    def usable(self) -> bool:
        """Complete, valid and not suspicious: may be "latest" and counts as fresh."""
        return self.problem is None

    @property
    def name_time(self) -> datetime:
        """The start time its name claims (the writer's choice)."""
        return key_time(self.key) or self.last_modified

    @property
    def taken_at(self) -> datetime:
        """How old its data is at most: the earlier of its name's time and LastModified, so no
        name can make a backup look newer than when S3 stored it."""
        return min(self.name_time, self.last_modified)

    @property
    def status(self) -> str:
        return "complete" if self.problem is None else self.problem.value

    def label(self) -> str:
        return f"{shown(self.key)} (version {shown(self.version_id)})" if self.version_id else shown(self.key)

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "kind": self.kind,
            "version_id": self.version_id,
            "started_at": iso(self.name_time),
            "last_modified": iso(self.last_modified),
            "size": self.size,
            "complete": self.complete,
            "usable": self.usable,
            "status": self.status,
            "problem": self.detail,
            "retain_until": iso(self.retain_until) if self.retain_until else None,
            "manifest": self.manifest,
        }


@dataclass
class Catalogue:
    """The backups of some kinds of one environment, newest (by LastModified) first, and the
    objects under their folders that are not backups at all."""

    backups: list[Backup]
    others: list[str]


def _versions(client: Any, bucket: str, prefix: str) -> list[dict[str, Any]]:
    """Every object version under prefix (delete markers excluded), following pagination; falls
    back to plain listing where versions cannot be listed."""
    found: list[dict[str, Any]] = []
    with s3_errors(f"list s3://{bucket}/{prefix}"):
        try:
            for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
                found.extend(page.get("Versions", []))
            return found
        except Exception as exc:
            if error_code(exc) not in ("NotImplemented", "MethodNotAllowed"):
                raise
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            found.extend({**o, "VersionId": None} for o in page.get("Contents", []))
    return found


def suspicion(backup: Backup) -> str | None:
    """Why the time in a backup's name cannot be believed, or None."""
    name, stored = backup.name_time, backup.last_modified
    if name > stored + CLOCK_SKEW:
        return (f"its name says it started at {iso(name)}, after S3 stored it ({iso(stored)}): "
                "a name in the future; never taken as the latest")
    if stored - name > LONGEST_RUN:
        return (f"its name says it started at {iso(name)}, {(stored - name).days} days before S3 stored it "
                f"({iso(stored)}): not how a backup run looks; never taken as the latest")
    return None


def catalogue(client: Any, bucket: str, environment: str, kinds: tuple[str, ...] = KINDS, *,
              with_retention: bool = False) -> Catalogue:
    """Every version of every backup of `kinds`, newest first, each with its manifest or a problem."""
    backups: list[Backup] = []
    others: list[str] = []
    manifests: list[tuple[str, str | None, str, int, datetime, int]] = []  # key, version, kind, size, stored, order
    for kind in kinds:
        for version in _versions(client, bucket, f"{environment}/{kind}/"):
            key = version["Key"]
            vid = version.get("VersionId")
            vid = None if vid in (None, "null") else vid
            backup_part = key[: -len(MANIFEST_SUFFIX)] if key.endswith(MANIFEST_SUFFIX) else key
            match = KEY_RE.fullmatch(backup_part)
            if not match or match.group("kind") != kind or key_time(backup_part) is None:
                others.append(key)
            elif key.endswith(MANIFEST_SUFFIX):
                manifests.append((backup_part, vid, kind, version["Size"], version["LastModified"], len(manifests)))
            else:
                backups.append(Backup(key, kind, vid, version["LastModified"], version["Size"]))

    def fetch(item: tuple[str, str | None, str, int, datetime, int]) -> tuple[dict[str, Any] | None, str | None]:
        key, vid, kind, size, _, _ = item
        if size > MAX_MANIFEST_BYTES:
            return None, f"its manifest is {size} bytes, over the {MAX_MANIFEST_BYTES // 1024} KiB a manifest can be: not read"
        if size == 0:
            return None, "its manifest is empty"
        try:
            return read_manifest(client, bucket, key, vid, kind=kind, environment=environment), None
        except BackupError as exc:  # invalid, or unreadable even after retries
            return None, str(exc)

    # The first valid manifest S3 stored for a backup version is its own: one written later (by
    # any writer) cannot replace it. LastModified has whole seconds; within one, S3 lists the
    # versions of a key newest first, so the later in the listing is the earlier stored.
    manifests.sort(key=lambda m: (m[4], -m[5]))
    by_version: dict[tuple[str, str | None], dict[str, Any]] = {}
    problems: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=16) as pool:
        for (key, *_), (manifest, problem) in zip(manifests, pool.map(fetch, manifests)):
            if manifest is not None:
                by_version.setdefault((key, manifest["version_id"]), manifest)
            elif problem:
                problems.setdefault(key, problem)
    for backup in backups:
        backup.manifest = by_version.get((backup.key, backup.version_id))
        if backup.manifest is None and backup.version_id is None:
            backup.manifest = next((m for (k, _), m in by_version.items() if k == backup.key), None)
        if backup.manifest is None:
            if backup.key in problems:
                backup.problem, backup.detail = Problem.BAD_MANIFEST, problems[backup.key]
            else:
                backup.problem, backup.detail = Problem.INCOMPLETE, "no manifest: the backup did not complete"
        elif backup.size != backup.manifest["encrypted_size"]:
            backup.problem, backup.detail = Problem.CORRUPT, (
                f"S3 holds {backup.size} bytes, the manifest says {backup.manifest['encrypted_size']}: truncated or corrupted")
        elif (reason := suspicion(backup)) is not None:
            backup.problem, backup.detail = Problem.SUSPICIOUS, reason

    if with_retention:
        def retention(backup: Backup) -> None:
            # HEAD carries the lock's retain-until date (for callers allowed s3:GetObjectRetention);
            # unlike GetObjectRetention it exists on every S3-compatible store (moto answers 500).
            try:
                extra = {"VersionId": backup.version_id} if backup.version_id else {}
                answer = client.head_object(Bucket=bucket, Key=backup.key, **extra)
                backup.retain_until = answer.get("ObjectLockRetainUntilDate")
            except Exception:  # noqa: BLE001 - no lock on this object, or not allowed: unknown
                backup.retain_until = None

        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(retention, backups))

    backups.sort(key=lambda b: (b.last_modified, b.name_time), reverse=True)
    return Catalogue(backups, others)


def find_backup(backups: list[Backup], key: str, version_id: str | None = None) -> Backup:
    """The named backup; without a version id, the newest version of that key."""
    for backup in backups:
        if backup.key == key and (version_id is None or backup.version_id == version_id):
            return backup
    what = f"{shown(key)} version {shown(version_id)}" if version_id else shown(key)
    raise BackupError(f"no backup {what} in the bucket: run list_backups.py to see what exists")
