"""Backup keys, manifests and the catalogue of backups in the external bucket.

A backup is complete only when its manifest exists (written after the object completed). The
catalogue lists every version of every backup (paginated, one small record each), orders them by
when S3 stored them, and pairs each with its manifest through the manifest's `version_id` only
when a reader gets to it: planted objects cost a listing entry each, never a download.

Everything in the bucket may have been written by a less-trusted writer (the backup jobs hold
s3:PutObject): a manifest is read only up to MAX_MANIFEST_BYTES and used only if every field is
valid and agrees with where it was found; a backup whose name's time is in the future or far from
its LastModified is SUSPICIOUS and never "latest"; ages come from the server's clock.
"""

from __future__ import annotations

import bisect
import functools
import json
import re
import sys
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from . import __version__, formats
from .config import ENVIRONMENT_RE, utcnow
from .errors import BackupError, Problem, VerificationError
from .output import shown
from .s3 import error_code, read_body, s3_errors
from .threads import DaemonPool

KINDS = formats.kinds()  # ("database", "files")
MANIFEST_SUFFIX = ".manifest.json"
TIMESTAMP_FORMAT = "%Y-%m-%d--%H-%M-%S"


def key_re() -> re.Pattern[str]:
    """A backup's key: ENVIRONMENT/KIND/YYYY-MM-DD--HH-MM-SS (ASCII digits only) and a registered
    format's suffix."""
    return _key_re(formats.kinds(), formats.suffixes())


@functools.lru_cache(maxsize=8)
def _key_re(kinds: tuple[str, ...], suffixes: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(
        r"^(?P<env>[a-z0-9][a-z0-9-]{0,62})/(?P<kind>" + "|".join(map(re.escape, kinds)) + ")/"
        r"(?P<ts>[0-9]{4}-[0-9]{2}-[0-9]{2}--[0-9]{2}-[0-9]{2}-[0-9]{2})(?P<suffix>" + "|".join(map(re.escape, suffixes)) + ")$"
    )


def match_key(key: str) -> re.Match[str] | None:
    return key_re().fullmatch(key)


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
_ISO = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
_MAX_SIZE = 2**53
_MAX_TEXT = 1024

# A backup's profile (profile.py writes and reads it) is named and checked by its manifest.
PROFILE_SUFFIX = ".profile.encrypted"
PROFILE_FIELDS = {"key": str, "version_id": (str, type(None)), "size": int, "sha256": str, "entries": int}

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


def backup_key(environment: str, kind: str, started_at: datetime, compression: str | None = None) -> str:
    """ENVIRONMENT/KIND/YYYY-MM-DD--HH-MM-SS and the suffix of the format (None: uncompressed)."""
    stamp = started_at.astimezone(UTC).strftime(TIMESTAMP_FORMAT)
    fmt = formats.find(kind, compression) if compression is not None else formats.uncompressed(kind)
    if fmt is None:
        raise KeyError((kind, compression))
    return f"{environment}/{kind}/{stamp}{fmt.suffix}"


def compression_of(manifest: dict[str, Any]) -> str:
    """The compression a (validated) manifest names; without the field (files), the kind's none."""
    return manifest.get("compression", formats.uncompressed(manifest["kind"]).compression.name)


def manifest_key(key: str) -> str:
    return key + MANIFEST_SUFFIX


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def key_time(key: str) -> datetime | None:
    match = match_key(key)
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
    profile: dict[str, Any] | None = None,
    encryption: str | None = None,
) -> dict[str, Any]:
    """A manifest; `compression` is {"compression": "zstd", "compressed_size": …, "compressed_sha256": …}
    for a compressed database backup (plaintext_* then describe the SQL, end to end); `encryption`
    the name of the one it was written in (None: the kind's default format's)."""
    manifest = {
        "manifest_version": 1,
        "kind": kind,
        "environment": environment,
        "key": key,
        "version_id": version_id,
        "started_at": iso(started_at),
        "completed_at": iso(completed_at),
        "encryption": encryption or formats.default(kind).encryption.name,
        **(compression or ({"compression": formats.uncompressed(kind).compression.name} if kind == "database" else {})),
        "key_id": key_id,
        "encrypted_size": encrypted_size,
        "encrypted_sha256": encrypted_sha256,
        "plaintext_size": plaintext_size,
        "plaintext_sha256": plaintext_sha256,
        "source": source,
        "tool_version": __version__,
        **({"profile": profile} if profile is not None else {}),  # the loss tripwire's (profile.py)
    }
    validate_manifest(manifest)
    return manifest


def for_upload(upload: Any, plaintext: Any, *, kind: str, environment: str, started_at: datetime, key_id: str,
               source: dict[str, Any], compression: dict[str, Any] | None = None,
               profile: dict[str, Any] | None = None, encryption: str | None = None) -> dict[str, Any]:
    """The manifest of a completed StreamingUpload (its key, version, size and SHA-256) whose
    plaintext went through the Tally `plaintext`, completed now."""
    return build_manifest(kind=kind, environment=environment, key=upload.key, version_id=upload.version_id,
                          started_at=started_at, completed_at=utcnow(), key_id=key_id, encrypted_size=upload.size,
                          encrypted_sha256=upload.sha256.hexdigest(), plaintext_size=plaintext.size,
                          plaintext_sha256=plaintext.hexdigest(), source=source, compression=compression,
                          profile=profile, encryption=encryption)


def _text(value: Any, limit: int = _MAX_TEXT) -> bool:
    return isinstance(value, str) and len(value) <= limit


def valid_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _MAX_SIZE


def profile_key(backup_key: str) -> str:
    return backup_key + PROFILE_SUFFIX


def profile_problem(manifest: dict[str, Any]) -> str | None:
    """What is wrong with a manifest's optional `profile` field (None: absent or well formed).
    decrypt.py holds the same rule (tests/test_decrypt_parity.py)."""
    if "profile" not in manifest:
        return None
    profile = manifest["profile"]
    if not isinstance(profile, dict) or set(profile) != set(PROFILE_FIELDS):
        return "has an invalid 'profile'"
    if profile["key"] != profile_key(manifest["key"]):
        return "names a profile that is not its backup's"
    if not (profile["version_id"] is None or (isinstance(profile["version_id"], str) and len(profile["version_id"]) <= 1024)):
        return "has an invalid profile 'version_id'"
    if not (valid_size(profile["size"]) and valid_size(profile["entries"])):
        return "has an invalid profile 'size' or 'entries'"
    if not (isinstance(profile["sha256"], str) and _HEX64.fullmatch(profile["sha256"])):
        return "has an invalid profile 'sha256'"
    return None


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
    match = match_key(manifest["key"]) if _text(manifest["key"]) else None
    if not match or key_time(manifest["key"]) is None:
        raise bad("names an object that is not a backup key")
    if (match.group("env"), match.group("kind")) != (manifest["environment"], manifest["kind"]):
        raise bad(f"says {manifest['kind']} backup of {manifest['environment']} but names {shown(manifest['key'])}")
    if manifest["encryption"] not in [e.name for e in formats.encryptions(manifest["kind"])]:
        raise bad(f"says encryption '{shown(manifest['encryption'][:64])}', which is not how {manifest['kind']} backups are made")
    compression = manifest.get("compression", formats.uncompressed(manifest["kind"]).compression.name)
    fmt = formats.find(manifest["kind"], compression, manifest["encryption"]) if isinstance(compression, str) else None
    if fmt is None:
        raise bad("has an invalid 'compression'")
    if fmt.suffix != match.group("suffix"):
        raise bad(f"says compression {compression}, which does not fit the name {shown(manifest['key'])}")
    fields = fmt.compression.manifest_fields  # the compressed stream's size and SHA-256
    if fields and not all(valid_size(manifest.get(name)) if name.endswith("_size") else
                          isinstance(manifest.get(name), str) and _HEX64.fullmatch(manifest[name]) for name in fields):
        raise bad(f"lacks a valid {' or '.join(repr(name) for name in fields)}")
    if not _KEY_ID.fullmatch(manifest["key_id"]):
        raise bad("has an invalid 'key_id' (16 hexadecimal digits)")
    for name in ("encrypted_sha256", "plaintext_sha256"):
        if not _HEX64.fullmatch(manifest[name]):
            raise bad(f"has an invalid {name!r}")
    for name in ("encrypted_size", "plaintext_size"):
        if not valid_size(manifest[name]):
            raise bad(f"has an invalid {name!r}")
    for name in ("started_at", "completed_at"):
        if not _ISO.fullmatch(manifest[name]):
            raise bad(f"has an invalid {name!r}")
    if manifest["started_at"] != iso(key_time(manifest["key"])) or manifest["completed_at"] < manifest["started_at"]:
        raise bad("has times that do not fit its name")
    if not _text(manifest["tool_version"], 64):
        raise bad("has an invalid 'tool_version'")
    _validate_source(manifest["kind"], manifest["source"], bad)
    if (problem := profile_problem(manifest)) is not None:
        raise bad(problem)
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
        if wanted is int and not valid_size(value):
            raise bad(f"lacks a valid source {name!r}")
        if wanted is list and not (isinstance(value, list) and len(value) <= 10 * MAX_SKIPPED_LISTED
                                   and all(_text(item) for item in value)):
            raise bad(f"lacks a valid source {name!r}")
    if kind == "files" and "skipped_count" in source and not valid_size(source["skipped_count"]):
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


def check_against_manifest(tally: Any, manifest: dict[str, Any], what: str) -> None:
    if tally.size != manifest["encrypted_size"]:
        raise VerificationError(
            f"{what} is {tally.size} bytes, the manifest says {manifest['encrypted_size']}: truncated or corrupted",
            Problem.CORRUPT)
    if tally.hexdigest() != manifest["encrypted_sha256"]:
        raise VerificationError(f"{what} does not match the manifest's SHA-256: corrupted", Problem.CORRUPT)


def check_plaintext(plaintext: Any, manifest: dict[str, Any] | None, what: str) -> None:
    """The decrypted (and decompressed) bytes against the manifest, end to end."""
    if manifest is None:
        return
    if plaintext.size != manifest["plaintext_size"]:
        raise VerificationError(
            f"the decrypted {what} is {plaintext.size} bytes, the manifest says {manifest['plaintext_size']}: corrupted",
            Problem.CORRUPT)
    if plaintext.hexdigest() != manifest["plaintext_sha256"]:
        raise VerificationError(f"the decrypted {what} does not match the manifest's plaintext SHA-256: corrupted",
                                Problem.CORRUPT)


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


# Storage classes whose objects GetObject refuses until they are restored from the archive.
ARCHIVED_STORAGE_CLASSES = frozenset({"GLACIER", "DEEP_ARCHIVE"})
# A manifest is written after its backup version was stored, so one stored before it cannot name
# it; LastModified has whole seconds, and this much leeway covers clocks that disagree.
STORED_LEEWAY = timedelta(minutes=1)
# Manifest versions read for one backup version at most (stored after it, oldest first): the
# genuine one is the first, written right after the upload; a writer cannot make a reader read
# more than this for any one backup.
MAX_MANIFESTS_PER_VERSION = 8
# Manifests read ahead of the reader's walk, in parallel (the S3 client's connection pool).
READ_AHEAD = 32
READERS = 16


@dataclass(slots=True)
class Backup:
    """One version of one backup object, with its manifest once checked, when it is complete and valid."""

    key: str
    kind: str
    version_id: str | None
    last_modified: datetime  # when S3 stored it: the server's clock, not the writer's
    size: int
    manifest: dict[str, Any] | None = None
    problem: Problem | None = None  # why it cannot be used; None: usable (once checked)
    detail: str | None = None  # the problem, said for the operator
    retain_until: datetime | None = None
    storage_class: str | None = None  # as the listing said (None: not said, i.e. STANDARD)
    checked: bool = False  # its manifest and problem are known (Catalogue.walk)
    manifest_version_id: str | None = None  # the version of KEY.manifest.json that is its manifest

    @property
    def complete(self) -> bool:
        return self.manifest is not None

    @property
    def usable(self) -> bool:
        """Checked, complete, valid and not suspicious: may be "latest" and counts as fresh."""
        return self.checked and self.problem is None

    @property
    def archived(self) -> bool:
        return self.storage_class in ARCHIVED_STORAGE_CLASSES

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
        if not self.checked:
            return "not checked"
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


class ManifestVersion(NamedTuple):
    """One listed version of a KEY.manifest.json (a tuple: a flood of them stays small)."""

    version_id: str | None
    last_modified: datetime
    size: int
    storage_class: str | None
    order: int  # position in the listing: within one second, S3 lists a key's versions newest first


class Listed(NamedTuple):
    key: str
    version_id: str | None
    last_modified: datetime
    size: int
    storage_class: str | None


def _storage_class(listed: dict[str, Any]) -> str | None:
    value = listed.get("StorageClass")
    return sys.intern(value) if isinstance(value, str) and len(value) < 64 else None  # one copy each, not one per version


def list_versions(client: Any, bucket: str, prefix: str) -> Iterator[Listed]:
    """Every object version under prefix (delete markers excluded), page by page, as compact
    tuples; falls back to plain listing where versions cannot be listed."""
    yielded = False
    with s3_errors(f"list s3://{bucket}/{shown(prefix)}"):
        try:
            for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
                for v in page.get("Versions", []):
                    vid = v.get("VersionId")
                    yielded = True
                    yield Listed(v["Key"], None if vid in (None, "null") else vid, v["LastModified"], v["Size"],
                                 _storage_class(v))
            return
        except Exception as exc:
            if yielded or error_code(exc) not in ("NotImplemented", "MethodNotAllowed"):
                raise
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                yield Listed(o["Key"], None, o["LastModified"], o["Size"], _storage_class(o))


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


def unreadable_detail(storage_class: str) -> str:
    return (f"stored as {shown(storage_class)}: S3 refuses to read it until it is restored from the archive "
            "(aws s3api restore-object); never taken as the latest")


ManifestRead = tuple[dict[str, Any] | None, str | None]  # (the manifest, or why it could not be used)


class Catalogue:
    """The backups of some kinds of one environment, newest (by LastModified) first, and the
    objects under their folders that are not backups at all.

    Listing keeps one small record per version and reads no manifest: `walk()` reads them as the
    caller goes (newest first, a few ahead, in parallel), so a reader that stops at the first
    usable backup reads only the manifests of the newer ones; `check()` reads those of the
    backups given. Each manifest version is read at most once.
    """

    def __init__(self, client: Any, bucket: str, environment: str):
        self.client, self.bucket, self.environment = client, bucket, environment
        self.backups: list[Backup] = []
        self.others: list[str] = []  # the first few
        self.others_count = 0
        self.reads = 0  # manifest versions read (or under way) so far
        self._listed = 0
        self._manifests: dict[str, list[ManifestVersion]] = {}  # per backup key, in the order S3 stored them
        self._read: dict[tuple[str, str | None], ManifestRead] = {}
        self._pending: dict[tuple[str, str | None], Future[ManifestRead]] = {}
        self._pool: DaemonPool | None = None  # made on the first read; idle threads cost nothing

    # -- listing -------------------------------------------------------------------------------
    def add(self, kind: str, version: Listed) -> None:
        key = version.key
        self._listed += 1
        if key.endswith(PROFILE_SUFFIX) and match_key(key[: -len(PROFILE_SUFFIX)]):
            return  # a backup's profile, read only through its manifest (compare_backups.py)
        backup_part = key[: -len(MANIFEST_SUFFIX)] if key.endswith(MANIFEST_SUFFIX) else key
        match = match_key(backup_part)
        if not match or match.group("kind") != kind or key_time(backup_part) is None:
            self.others_count += 1
            if len(self.others) < 10:
                self.others.append(key)
        elif key.endswith(MANIFEST_SUFFIX):
            versions = self._manifests.setdefault(backup_part, [])
            versions.append(ManifestVersion(version.version_id, version.last_modified, version.size,
                                            version.storage_class, self._listed))
        else:
            self.backups.append(Backup(key, kind, version.version_id, version.last_modified, version.size,
                                       storage_class=version.storage_class))

    def finish(self) -> Catalogue:
        # The first valid manifest S3 stored for a backup version is its own: one written later (by
        # any writer) cannot replace it. Within a second, the later in the listing is the earlier stored.
        for versions in self._manifests.values():
            versions.sort(key=lambda m: (m.last_modified, -m.order))
        self.backups.sort(key=lambda b: (b.last_modified, b.name_time), reverse=True)
        return self

    # -- reading manifests ---------------------------------------------------------------------
    def _wanted(self, backup: Backup) -> list[ManifestVersion]:
        """The manifest versions that may be `backup`'s, in the order S3 stored them."""
        versions = self._manifests.get(backup.key, [])
        since = 0
        if backup.version_id is not None and versions:
            since = bisect.bisect_left(versions, backup.last_modified - STORED_LEEWAY, key=lambda m: m.last_modified)
        return versions[since:since + MAX_MANIFESTS_PER_VERSION]

    def _to_read(self, backup: Backup, read_archived: bool) -> list[tuple[str, ManifestVersion]]:
        if backup.checked or (backup.archived and not read_archived):
            return []
        return [(backup.key, m) for m in self._wanted(backup) if (backup.key, m.version_id) not in self._read]

    def _read_one(self, item: tuple[str, ManifestVersion]) -> ManifestRead:
        key, version = item
        if version.size > MAX_MANIFEST_BYTES:
            return None, f"its manifest is {version.size} bytes, over the {MAX_MANIFEST_BYTES // 1024} KiB a manifest can be: not read"
        if version.size == 0:
            return None, "its manifest is empty"
        if version.storage_class in ARCHIVED_STORAGE_CLASSES:
            return None, f"its manifest is stored as {shown(version.storage_class)}: S3 refuses to read it"
        try:
            return read_manifest(self.client, self.bucket, key, version.version_id, kind=match_key(key).group("kind"),
                                 environment=self.environment), None
        except BackupError as exc:  # invalid, or unreadable even after retries
            return None, str(exc)

    def _submit(self, items: list[tuple[str, ManifestVersion]]) -> None:
        """Start reading `items` (those not read nor under way) on the catalogue's readers."""
        if self._pool is None:
            # Daemon workers: a read stuck after a signal never holds up the end of the run.
            self._pool = DaemonPool(max_workers=READERS, thread_name_prefix="manifests")
        for item in items:
            slot = (item[0], item[1].version_id)
            if slot not in self._read and slot not in self._pending:
                self._pending[slot] = self._pool.submit(self._read_one, item)
                self.reads += 1

    def _harvest(self) -> None:
        """Keep the reads already done, so that `_pending` counts only those in flight."""
        for slot in [slot for slot, future in self._pending.items() if future.done()]:
            self._read[slot] = self._pending.pop(slot).result()

    def _collect(self, backup: Backup) -> None:
        """Wait for the reads of `backup`'s manifest versions."""
        for version in self._wanted(backup):
            slot = (backup.key, version.version_id)
            if slot in self._pending:
                self._read[slot] = self._pending.pop(slot).result()

    def _decide(self, backup: Backup, read_archived: bool) -> None:
        """Set `backup`'s manifest and problem from what was read (nothing is read here)."""
        backup.checked = True
        wanted = self._wanted(backup)
        if not wanted:
            backup.problem, backup.detail = Problem.INCOMPLETE, "no manifest: the backup did not complete"
            return
        if backup.archived and not read_archived:
            backup.problem, backup.detail = Problem.UNREADABLE, unreadable_detail(backup.storage_class or "")
            return
        answers = [self._read[(backup.key, m.version_id)] for m in wanted]
        valid = [(m, v) for (m, _), v in zip(answers, wanted, strict=True) if m is not None]
        mine = [(m, v) for m, v in valid if m["version_id"] == backup.version_id]
        if backup.version_id is None and not mine:
            mine = valid  # an unversioned listing: the key's manifest
        problems = [p for _, p in answers if p]
        if mine:
            backup.manifest, backup.manifest_version_id = mine[0][0], mine[0][1].version_id
        elif problems:
            backup.problem, backup.detail = Problem.BAD_MANIFEST, problems[0]
            return
        else:
            backup.problem, backup.detail = Problem.INCOMPLETE, "no manifest: the backup did not complete"
            return
        if backup.size != backup.manifest["encrypted_size"]:
            backup.problem, backup.detail = Problem.CORRUPT, (
                f"S3 holds {backup.size} bytes, the manifest says {backup.manifest['encrypted_size']}: truncated or corrupted")
        elif backup.archived:
            backup.problem, backup.detail = Problem.UNREADABLE, unreadable_detail(backup.storage_class or "")
        elif (reason := suspicion(backup)) is not None:
            backup.problem, backup.detail = Problem.SUSPICIOUS, reason

    def walk(self, backups: list[Backup], *, read_archived: bool = False, budget: int | None = None) -> Iterator[Backup]:
        """`backups` in their order, each checked as it is reached: its manifest versions are read
        then, and those of the next backups are read meanwhile (READ_AHEAD in flight, in
        parallel). A backup in an archived storage class is not usable whatever its manifest says:
        its manifest is read only with `read_archived` (for a listing's status). Once `budget`
        manifests were read, backups that would need more come back unchecked."""
        horizon = 0
        for i, backup in enumerate(backups):
            if not backup.checked:
                needed = self._to_read(backup, read_archived)
                if needed:
                    if budget is not None and self.reads >= budget and any(
                            (key, m.version_id) not in self._pending for key, m in needed):
                        yield backup
                        continue
                    self._submit(needed)
                    self._harvest()
                    horizon = max(horizon, i + 1)
                    while len(self._pending) < READ_AHEAD and horizon < len(backups) and (budget is None or self.reads < budget):
                        self._submit(self._to_read(backups[horizon], read_archived))
                        horizon += 1
                    self._collect(backup)
                self._decide(backup, read_archived)
            yield backup

    def check(self, backups: list[Backup] | None = None, *, read_archived: bool = True) -> list[Backup]:
        """Check every backup given (default: all), reading their manifests in parallel."""
        backups = self.backups if backups is None else backups
        for _ in self.walk(backups, read_archived=read_archived):
            pass
        return backups

    def versions_of(self, key: str) -> list[Backup]:
        return [b for b in self.backups if b.key == key]


def catalogue(client: Any, bucket: str, environment: str, kinds: tuple[str, ...] = KINDS, *,
              key: str | None = None) -> Catalogue:
    """Every version of every backup of `kinds` (or of the one backup `key`), newest first, none
    checked yet (Catalogue.walk, Catalogue.check)."""
    found = Catalogue(client, bucket, environment)
    for kind in kinds:
        for version in list_versions(client, bucket, key or f"{environment}/{kind}/"):
            found.add(kind, version)
    return found.finish()


def read_retention(client: Any, bucket: str, backups: list[Backup]) -> int:
    """Each backup's retain-until date, from HEAD (for callers allowed s3:GetObjectRetention;
    unlike GetObjectRetention it exists on every S3-compatible store, where moto answers 500).
    Returns how many HEADs failed."""
    def head(backup: Backup) -> bool:
        try:
            extra = {"VersionId": backup.version_id} if backup.version_id else {}
            backup.retain_until = client.head_object(Bucket=bucket, Key=backup.key, **extra).get("ObjectLockRetainUntilDate")
            return True
        except Exception:  # noqa: BLE001 - not allowed, or refused (SSE-C): unknown, said under the table
            backup.retain_until = None
            return False

    if not backups:
        return 0
    pool = DaemonPool(max_workers=READERS, thread_name_prefix="retention")
    try:
        return sum(1 for future in [pool.submit(head, b) for b in backups] if not future.result())
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
