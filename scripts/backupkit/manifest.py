"""Backup keys, manifests and the catalogue of backups in the external bucket.

A backup is complete only when its manifest exists (written after the object completed). The
catalogue lists every version of every backup (paginated), pairs each with its manifest through
the manifest's `version_id`, and sorts newest first.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from . import __version__
from .errors import BackupError, VerificationError
from .s3 import error_code, read_body, s3_errors

KINDS = ("database", "files")
SUFFIX = {"database": ".sql.encrypted", "files": ".zip.encrypted"}
MANIFEST_SUFFIX = ".manifest.json"
TIMESTAMP_FORMAT = "%Y-%m-%d--%H-%M-%S"
KEY_RE = re.compile(
    r"^(?P<env>[a-z0-9][a-z0-9-]{0,62})/(?P<kind>database|files)/"
    r"(?P<ts>\d{4}-\d\d-\d\d--\d\d-\d\d-\d\d)(?P<suffix>\.sql\.encrypted|\.zip\.encrypted)$"
)
MANIFEST_FIELDS = {
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


def backup_key(environment: str, kind: str, started_at: datetime) -> str:
    return f"{environment}/{kind}/{started_at.astimezone(UTC).strftime(TIMESTAMP_FORMAT)}{SUFFIX[kind]}"


def manifest_key(key: str) -> str:
    return key + MANIFEST_SUFFIX


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def key_time(key: str) -> datetime | None:
    match = KEY_RE.fullmatch(key)
    if not match:
        return None
    return datetime.strptime(match.group("ts"), TIMESTAMP_FORMAT).replace(tzinfo=UTC)


def build_manifest(
    *,
    kind: str,
    environment: str,
    key: str,
    version_id: str | None,
    started_at: datetime,
    completed_at: datetime,
    encryption: str,
    key_id: str,
    encrypted_size: int,
    encrypted_sha256: str,
    plaintext_size: int,
    plaintext_sha256: str,
    source: dict[str, Any],
) -> dict[str, Any]:
    manifest = {
        "manifest_version": 1,
        "kind": kind,
        "environment": environment,
        "key": key,
        "version_id": version_id,
        "started_at": iso(started_at),
        "completed_at": iso(completed_at),
        "encryption": encryption,
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


def validate_manifest(manifest: Any, key: str | None = None) -> dict[str, Any]:
    """Raise VerificationError unless `manifest` has every field with the right type."""
    where = f"manifest of {key}" if key else "manifest"
    if not isinstance(manifest, dict):
        raise VerificationError(f"{where} is not a JSON object")
    for name, kind in MANIFEST_FIELDS.items():
        if not isinstance(manifest.get(name), kind) or isinstance(manifest.get(name), bool):
            raise VerificationError(f"{where} lacks a valid {name!r}")
    if "version_id" not in manifest or not isinstance(manifest["version_id"], (str, type(None))):
        raise VerificationError(f"{where} lacks a valid 'version_id'")
    if manifest["manifest_version"] != 1:
        raise VerificationError(f"{where} has manifest_version {manifest['manifest_version']}; this tool reads 1")
    if manifest["kind"] not in KINDS:
        raise VerificationError(f"{where} has unknown kind {manifest['kind']!r}")
    if key is not None and manifest["key"] != key:
        raise VerificationError(f"{where} names another object ({manifest['key']})")
    for name in ("encrypted_sha256", "plaintext_sha256"):
        if not re.fullmatch(r"[0-9a-f]{64}", manifest[name]):
            raise VerificationError(f"{where} has an invalid {name!r}")
    return manifest


def write_manifest(client: Any, bucket: str, manifest: dict[str, Any]) -> str | None:
    body = (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode()
    key = manifest_key(manifest["key"])
    with s3_errors(f"write the manifest s3://{bucket}/{key} (the backup object exists but counts as incomplete)"):
        response = client.put_object(
            Bucket=bucket, Key=key, Body=body, ContentType="application/json", ChecksumAlgorithm="CRC32"
        )
    return response.get("VersionId")


def parse_manifest(body: bytes, key: str | None = None) -> dict[str, Any]:
    try:
        manifest = json.loads(body)
    except ValueError:
        raise VerificationError(f"manifest of {key or 'the backup'} is not valid JSON") from None
    return validate_manifest(manifest, key)


def read_manifest(client: Any, bucket: str, key: str, version_id: str | None = None) -> dict[str, Any]:
    extra = {"VersionId": version_id} if version_id else {}
    body = read_body(f"read the manifest s3://{bucket}/{manifest_key(key)}",
                     lambda: client.get_object(Bucket=bucket, Key=manifest_key(key), **extra), lambda b: b.read())
    return parse_manifest(body, key)


@dataclass
class Backup:
    """One version of one backup object, with its manifest when it is complete."""

    key: str
    kind: str
    version_id: str | None
    last_modified: datetime
    size: int
    manifest: dict[str, Any] | None = None
    manifest_problem: str | None = None
    retain_until: datetime | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.manifest is not None

    @property
    def started_at(self) -> datetime:
        return key_time(self.key) or self.last_modified

    def label(self) -> str:
        return f"{self.key} (version {self.version_id})" if self.version_id else self.key

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "kind": self.kind,
            "version_id": self.version_id,
            "started_at": iso(self.started_at),
            "last_modified": iso(self.last_modified),
            "size": self.size,
            "complete": self.complete,
            "problem": self.manifest_problem,
            "retain_until": iso(self.retain_until) if self.retain_until else None,
            "manifest": self.manifest,
        }


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


def catalogue(
    client: Any,
    bucket: str,
    environment: str,
    kinds: tuple[str, ...] = KINDS,
    *,
    with_retention: bool = False,
) -> list[Backup]:
    """Every version of every backup of `kinds`, newest first, with manifests attached."""
    backups: list[Backup] = []
    manifest_versions: list[tuple[str, str | None, str]] = []
    for kind in kinds:
        for version in _versions(client, bucket, f"{environment}/{kind}/"):
            key = version["Key"]
            vid = version.get("VersionId")
            vid = None if vid in (None, "null") else vid
            if key.endswith(MANIFEST_SUFFIX):
                manifest_versions.append((key[: -len(MANIFEST_SUFFIX)], vid, kind))
            elif KEY_RE.fullmatch(key):
                backups.append(Backup(key, kind, vid, version["LastModified"], version["Size"]))

    def fetch(item: tuple[str, str | None, str]) -> tuple[str, dict[str, Any] | None, str | None]:
        key, vid, _ = item
        try:
            return key, read_manifest(client, bucket, key, vid), None
        except BackupError as exc:
            return key, None, str(exc)

    by_version: dict[tuple[str, str | None], dict[str, Any]] = {}
    problems: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=16) as pool:
        for key, manifest, problem in pool.map(fetch, manifest_versions):
            if manifest is not None:
                by_version[(key, manifest.get("version_id"))] = manifest
            elif problem:
                problems[key] = problem
    for backup in backups:
        backup.manifest = by_version.get((backup.key, backup.version_id))
        if backup.manifest is None and backup.version_id is None:
            backup.manifest = next((m for (k, _), m in by_version.items() if k == backup.key), None)
        if backup.manifest is None:
            backup.manifest_problem = problems.get(backup.key, "no manifest: the backup did not complete")

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

    backups.sort(key=lambda b: (b.started_at, b.last_modified), reverse=True)
    return backups


def find_backup(backups: list[Backup], key: str, version_id: str | None = None) -> Backup:
    """The named backup; without a version id, the newest version of that key."""
    for backup in backups:
        if backup.key == key and (version_id is None or backup.version_id == version_id):
            return backup
    what = f"{key} version {version_id}" if version_id else key
    raise BackupError(f"no backup {what} in the bucket: run list_backups.py to see what exists")
