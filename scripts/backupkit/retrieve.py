"""The one way a backup is read back: every script that fetches, verifies or restores goes
through here, so it is hardened once.

`BucketReader` lists the candidates (ordered and aged by S3's LastModified, never by a name a
writer chose), and `open()`s one: the manifest's encryption picks the passphrase named by the
manifest's key_id (`Encryption.pick_secret`; an unknown one is refused before anything is downloaded), downloads into a private temporary
directory with the manifest's size as a ceiling, checks size and SHA-256, and only then hands a
`Fetched` file to the caller's `work` (fetch_backup.py); or, with `stream=True` (every reader that
decrypts: restores and verify), hands `work` the download as it arrives, which the reader checks
at its end, before anything is committed or uploaded. `first_good()` runs that over the candidates: with
`--latest` a backup that fails or cannot be read is skipped (the reason comes back as data, a
`Skip`; a flood of them is counted, not said line by line), and manifests are read only as far as
it goes; otherwise the first failure is final. `--key` names one version: a key with several is
refused without `--version-id`. `open_local()` does the same for a file on disk (`--file`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

import botocore.exceptions

from . import formats
from .crypto import Encryption, start_key_ids
from .errors import BackupError, Problem, UsageError, VerificationError
from .manifest import (
    MANIFEST_SUFFIX,
    MAX_MANIFEST_BYTES,
    Backup,
    Catalogue,
    catalogue,
    check_against_manifest,
    compression_of,
    iso,
    match_key,
    parse_manifest,
)
from .output import log, shown
from .progress import Progress, human_bytes
from .s3 import ResumableBody, error_code
from .streams import CHUNK, Tally

T = TypeVar("T")


@dataclass(frozen=True)
class Skip:
    """A backup `--latest` passed over, and why."""

    backup: Backup
    problem: Problem
    reason: str

    def line(self) -> str:
        return f"{self.backup.label()}: {self.reason}"

    def to_json(self) -> dict[str, Any]:
        return {"key": self.backup.key, "version_id": self.backup.version_id, "problem": self.problem.value,
                "reason": self.reason}


SKIPS_NAMED = 10  # skips said one by one; after these, counted per problem


class Skips:
    """The backups `--latest` passed over: the first SKIPS_NAMED kept whole (iterating gives
    those), every one counted per problem, so a flood of planted objects costs a count each."""

    def __init__(self) -> None:
        self.named: list[Skip] = []
        self.counts: Counter[Problem] = Counter()
        self.unnamed: Counter[Problem] = Counter()

    def add(self, skip: Skip) -> bool:
        """Count `skip`; True when it is one of those named."""
        self.counts[skip.problem] += 1
        if len(self.named) < SKIPS_NAMED:
            self.named.append(skip)
            return True
        self.unnamed[skip.problem] += 1
        return False

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __iter__(self) -> Iterator[Skip]:
        return iter(self.named)

    def __bool__(self) -> bool:
        return bool(self.counts)

    def more(self) -> str:
        """'N more: 19,990 incomplete, 5 bad manifest' for those not named; '' when none."""
        if not self.unnamed:
            return ""
        return f"{sum(self.unnamed.values()):,} more: {per_problem(self.unnamed)}"


def per_problem(counts: Counter[Problem]) -> str:
    return ", ".join(f"{n:,} {problem.value}" for problem, n in counts.most_common())


class CheckedBody:
    """A backup version's bytes as they download: never more than the listing's size, hashed on
    the way, and `check()`ed against the manifest (size, SHA-256) once they ended. `abandon()`
    (from any thread) makes it end early: then it never checks out."""

    def __init__(self, body: ResumableBody, backup: Backup):
        self._body = body
        self._backup = backup
        self.tally = Tally()
        self._front = b""
        self._abandoned = False
        self.checked = False

    def first_bytes(self, size: int) -> bytes:
        """The first `size` bytes (fewer if the object is shorter), read again by the next reads.
        (Not `peek`: readers such as pyAesCrypt take an object with `peek` for a buffered file.)"""
        while len(self._front) < size and (more := self._take(size - len(self._front))):
            self._front += more
        return self._front[:size]

    def _take(self, size: int) -> bytes:
        chunk = self._body.read(size)
        self.tally.update(chunk)
        if self.tally.size > self._backup.size:
            raise VerificationError(f"the download is longer than the {self._backup.size} bytes listed: corrupted",
                                    Problem.CORRUPT)
        return chunk

    def read(self, size: int = CHUNK) -> bytes:
        if self._front:
            cut = size if 0 < size < len(self._front) else len(self._front)
            data, self._front = self._front[:cut], self._front[cut:]
            return data
        if self._abandoned:
            return b""
        return self._take(size if size > 0 else CHUNK)

    read1 = read

    def drain(self) -> None:
        """Read (and hash) the rest, for check(): a reader that stopped early still learns whether the
        download was whole."""
        while self.read(CHUNK):
            pass

    def finish(self) -> None:
        """drain() then check(): whether the reader read it all or stopped early."""
        self.drain()
        self.check()

    def abandon(self) -> None:
        self._abandoned = True

    def check(self) -> None:
        if self._abandoned:
            raise VerificationError("the download was stopped before its end", Problem.CORRUPT)
        check_against_manifest(self.tally, self._backup.manifest, "the downloaded object")
        self.checked = True

    def close(self) -> None:
        self._body.close()


@dataclass
class Fetched:
    """A backup that passed every check made before decryption: a file on disk (`path`), or a
    download under way (`body`, with `path` empty), checked at its end by its reader."""

    kind: str  # "database" or "files"
    path: str
    secret: str  # what `encryption` decrypts with, as its pick_secret chose it ("" when nothing is decrypted)
    encryption: Encryption  # the backup's (formats.py), or a kind's plain one (formats.plain) for a local plaintext
    compression: str | None  # a Compression's name; None: unknown (a dump without manifest), told by its bytes
    manifest: dict[str, Any] | None  # None: a local file without one (nothing to check against)
    label: str  # for messages: the S3 key and version, or the file's path
    backup: Backup | None = None  # None for a local file
    body: CheckedBody | None = None  # streamed from the bucket (BucketReader.open(stream=True))


@dataclass
class Retrieved(Generic[T]):
    fetched: Fetched
    result: T
    skipped: Skips = field(default_factory=Skips)


@contextmanager
def private_directory(near: str | None = None, prefix: str = "backup-") -> Iterator[str]:
    """A 0700 temporary directory (in TMPDIR, or hidden beside `near`), removed on any exit."""
    path = tempfile.mkdtemp(prefix=f".{prefix}", dir=near) if near else tempfile.mkdtemp(prefix=prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _room_for(directory: str, size: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < size:
        raise BackupError(f"not enough free space in {shown(directory)} for the {human_bytes(size)} download "
                          f"({human_bytes(free)} free): set TMPDIR to a bigger disk")


# GetObject's answers for an object S3 holds but will not hand over: an archived storage class
# (also Intelligent-Tiering's archive tiers, which the listing does not show), a customer-provided
# key (SSE-C, which this tool never uses), a KMS key this identity may not use.
UNREADABLE_CODES = ("InvalidObjectState", "InvalidRequest", "AccessDenied")
VERSIONS_NAMED = 5  # versions listed in the error when --key names a key with several


def unreadable(code: str, backup: Backup) -> VerificationError:
    if code == "InvalidObjectState":
        where = f"stored as {shown(backup.storage_class)}" if backup.storage_class else "in an archive tier"
        why = f"it is {where}: restore it from the archive first (aws s3api restore-object), or use another backup"
    elif code == "InvalidRequest":
        why = "it was stored with a customer-provided encryption key (SSE-C), which this tool never uses: not a backup it made"
    else:
        why = ("though its manifest was readable: encrypted with a KMS key this identity may not use, or denied "
               "to it by a policy")
    return VerificationError(f"S3 refuses to read it ({code}): {why}", Problem.UNREADABLE)


class BucketReader:
    """The backups of one kind of one environment in the external bucket."""

    def __init__(self, client: Any, bucket: str, environment: str, kind: str, passphrases: list[str] | None):
        """`passphrases` None: only fetch (the ciphertext is checked, nothing is decrypted)."""
        if passphrases:
            start_key_ids(passphrases)
        self.client = client
        self.bucket = bucket
        self.environment = environment
        self.kind = kind
        self.passphrases = passphrases
        self._catalogue: Catalogue | None = None

    def catalogue(self) -> Catalogue:
        """Every version of this kind's backups, listed once, checked only as they are used."""
        if self._catalogue is None:
            self._catalogue = catalogue(self.client, self.bucket, self.environment, (self.kind,))
        return self._catalogue

    def candidates(self, *, latest: bool, key: str | None = None, version_id: str | None = None) -> list[Backup]:
        """Backups to try, in order: for --latest every version, newest first (checked as
        `first_good` reaches them); else the one named, checked."""
        if latest:
            backups = self.catalogue().backups
            if not backups:
                raise BackupError(f"no {self.kind} backup found in s3://{self.bucket}/{self.environment}/{self.kind}/: "
                                  "check --environment and --bucket (list_backups.py shows what exists)")
            return backups
        if not key:
            raise UsageError("say which backup: --latest or --key KEY")
        if "/" not in key:
            key = f"{self.environment}/{self.kind}/{key}"  # a bare file name is accepted too
        match = match_key(key)
        if not match or (match.group("env"), match.group("kind")) != (self.environment, self.kind):
            raise UsageError(f"--key '{shown(key)}' is not a {self.kind} backup of {self.environment}: use a key "
                             f"(or file name) as list_backups.py --kind {self.kind} shows it")
        # Only this key's versions (and its manifest's) are listed: no planted object elsewhere costs anything.
        self._catalogue = catalogue(self.client, self.bucket, self.environment, (self.kind,), key=key)
        return [self.named(key, version_id)]

    def named(self, key: str, version_id: str | None) -> Backup:
        """The version named. Without a version id the key must have only one: a writer can add a
        version to any key at any time, so the newest is not necessarily the backup meant."""
        found = self.catalogue()
        versions = found.versions_of(key)
        if version_id is not None:
            chosen = next((b for b in versions if b.version_id == version_id), None)
            if chosen is None:
                raise BackupError(f"no backup {shown(key)} version {shown(version_id)} in the bucket"
                                  + (f": {self.versions_said(versions)}" if versions else
                                     ": run list_backups.py to see what exists"))
        elif not versions:
            raise BackupError(f"no backup {shown(key)} in the bucket: run list_backups.py to see what exists")
        elif len(versions) > 1:
            raise BackupError(f"{shown(key)} has {len(versions)} versions, and a writer can add one at any time: "
                              f"pick one with --version-id. {self.versions_said(versions)}")
        else:
            chosen = versions[0]
        found.check([chosen])
        return chosen

    def versions_said(self, versions: list[Backup]) -> str:
        named = self.catalogue().check(versions[:VERSIONS_NAMED])
        said = "; ".join(f"{shown(b.version_id or 'null')} stored {iso(b.last_modified)} ({b.status})" for b in named)
        more = f"; and {len(versions) - len(named)} older" if len(versions) > len(named) else ""
        return f"Its versions, newest first: {said}{more} (list_backups.py --kind {self.kind} lists them)"

    def since(self, window: timedelta, now: datetime) -> list[Backup]:
        """Every version started within `window` before `now`, newest first, checked (archived
        ones are not read: they are unreadable whatever their manifest says)."""
        backups = [b for b in self.catalogue().backups if now - b.taken_at <= window]
        return self.catalogue().check(backups, read_archived=False)

    def body(self, backup: Backup) -> ResumableBody:
        """One backup version's bytes as a stream that resumes where a broken connection left off
        (s3.ResumableBody: a ranged GET on the same version, If-Match on its ETag)."""
        extra = {"VersionId": backup.version_id} if backup.version_id else {}

        def get(**more: str) -> Any:
            try:
                return self.client.get_object(Bucket=self.bucket, Key=backup.key, **extra, **more)
            except botocore.exceptions.ClientError as exc:
                if error_code(exc) in UNREADABLE_CODES or (error_code(exc) or "").startswith("KMS."):
                    raise unreadable(error_code(exc) or "", backup) from None
                raise

        return ResumableBody(f"download s3://{self.bucket}/{shown(backup.key)}", get)

    def download_checked(self, backup: Backup, path: str) -> None:
        """Stream one backup version to `path` (0600), never more than the listing's size, and check it
        against its manifest (size and SHA-256)."""
        _room_for(os.path.dirname(path), backup.size)
        body = CheckedBody(self.body(backup), backup)
        progress = Progress(f"downloaded {shown(backup.key)}", total_bytes=backup.size)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := body.read(CHUNK):
                    out.write(chunk)
                    progress.update(len(chunk))
        finally:
            body.close()
        progress.done()
        body.check()

    def secret_for(self, manifest: dict[str, Any]) -> str:
        """The secret a backup (or its profile) is decrypted with: its encryption's rule picks it
        from the passphrases given, by the manifest's key_id."""
        encryption = formats.encryption_named(manifest["encryption"])
        return encryption.pick_secret(manifest["key_id"], self.passphrases or [])

    def _streamed(self, backup: Backup, secret: str, work: Callable[[Fetched], T]) -> Retrieved[T]:
        """`work` on the backup as it downloads (`Fetched.body`): its reader checks the body against
        the manifest once it ended (CheckedBody.check), before anything is committed."""
        manifest = backup.manifest
        body = CheckedBody(self.body(backup), backup)
        try:
            detected = formats.detect_encryption(body.first_bytes(formats.MAGIC_READ))
            found = detected.name if detected else None
            if found != manifest["encryption"]:
                body.finish()  # a corrupted download is named as such, as when it was downloaded first
                raise VerificationError(f"the object is not in its manifest's format {manifest['encryption']} "
                                        f"(it looks like {found or 'neither format'})", Problem.BAD_CONTENT)
            fetched = Fetched(self.kind, "", secret, formats.encryption_named(found), compression_of(manifest),
                              manifest, f"s3://{self.bucket}/{backup.label()}", backup, body=body)
            result = work(fetched)
            if not body.checked:
                raise AssertionError(f"{fetched.label}: its reader never checked the download against the manifest")
            return Retrieved(fetched, result)
        finally:
            body.abandon()  # a reader thread still draining it stops
            body.close()

    def open(self, backup: Backup, work: Callable[[Fetched], T], *, near: str | None = None,
             explicit: bool = False, stream: bool = False) -> Retrieved[T]:
        """Check `backup`, download it into a private directory (beside `near` when given), check
        it against its manifest, and run `work(fetched)`; the directory is removed afterwards.
        With `stream` (the readers that decrypt: dump_reader.DumpReader, archive_read.read_archive),
        the ciphertext is not written to disk: `work` reads it as it downloads, and its reader checks
        size and SHA-256 at the end.
        Raises VerificationError (with its Problem) when the backup is not fit to use."""
        if not backup.checked:
            self.catalogue().check([backup], read_archived=explicit)
        if backup.problem in (Problem.SUSPICIOUS, Problem.UNREADABLE) and explicit:
            # Named on purpose: an archived backup may have been restored from the archive since.
            log(f"warning: {backup.label()}: {backup.detail}; used because it was named with --key")
        elif backup.problem is not None:
            raise VerificationError(backup.detail or backup.problem.value, backup.problem)
        manifest = backup.manifest
        secret = "" if self.passphrases is None else self.secret_for(manifest)  # before any download
        if stream:
            return self._streamed(backup, secret, work)
        with private_directory(near) as workdir:
            path = os.path.join(workdir, "backup.encrypted")
            self.download_checked(backup, path)
            with open(path, "rb") as handle:
                detected = formats.detect_encryption(handle.read(formats.MAGIC_READ))
            found = detected.name if detected else None
            if found != manifest["encryption"]:
                raise VerificationError(f"the object is not in its manifest's format {manifest['encryption']} "
                                        f"(it looks like {found or 'neither format'})", Problem.BAD_CONTENT)
            fetched = Fetched(self.kind, path, secret, formats.encryption_named(found), compression_of(manifest),
                              manifest, f"s3://{self.bucket}/{backup.label()}", backup)
            return Retrieved(fetched, work(fetched))

    def first_good(self, backups: list[Backup], work: Callable[[Fetched], T], *, latest: bool,
                   near: str | None = None, stream: bool = False) -> Retrieved[T]:
        """`work` on the first backup that passes. With `latest`, backups that are not usable or
        fail are skipped (the first SKIPS_NAMED said on stderr, the rest counted), reading each
        one's manifest only when it is reached; otherwise the one named must pass."""
        skipped = Skips()
        for backup in self.catalogue().walk(backups) if latest else backups:
            try:
                retrieved = self.open(backup, work, near=near, explicit=not latest, stream=stream)
            except VerificationError as exc:
                if not latest:
                    raise VerificationError(f"{backup.label()}: {exc}", exc.problem) from None
                skip = Skip(backup, exc.problem, str(exc))
                if skipped.add(skip) and len(backups) > 1:
                    log(f"skipped {skip.line()}")
                continue
            if skipped.more():
                log(f"skipped {skipped.more()}")
            retrieved.skipped = skipped
            return retrieved
        raise BackupError(nothing_verifies(skipped))


def nothing_verifies(skipped: Skips) -> str:
    """The error line when no candidate passed: the newest one's reason in the line itself (often
    the only line anybody reads), and what to do when none was made with the passphrases given."""
    if not skipped:
        return "no backup to try"
    newest = skipped.named[0].line()
    if skipped.total == 1:
        return f"the only backup found cannot be used: {newest}"
    if set(skipped.counts) == {Problem.UNKNOWN_PASSPHRASE}:
        return (f"none of the {skipped.total:,} backups was made with the passphrase(s) given: mistyped, or an older "
                f"passphrase missing from EXTERNAL_BACKUP_ENCRYPTION_KEY_PREVIOUS? The newest: {newest}")
    if skipped.unnamed:
        return (f"none of the {skipped.total:,} backups can be used (the first {len(skipped.named)} are named above; "
                f"all of them: {per_problem(skipped.counts)}); the newest: {newest}")
    return f"none of the {skipped.total} backups can be used (each one's reason is above); the newest: {newest}"


def local_format(path: str, kind: str, *, plain: bool = False) -> Encryption:
    """The encryption of a local backup file, refusing what is not a `kind` backup; with `plain`,
    the kind's plaintext (formats.plain: an already decrypted archive) is accepted too."""
    if not os.path.isfile(path):
        raise UsageError(f"--file {shown(path)}: no such file")
    if os.path.getsize(path) == 0:
        raise UsageError(f"--file {shown(path)} is empty: not a backup")
    with open(path, "rb") as handle:
        head = handle.read(formats.MAGIC_READ)
    found = formats.detect_encryption(head)
    if found is not None and found.name in [e.name for e in formats.encryptions(kind)]:
        return found
    plaintext = formats.plain(kind) if plain else None
    if plaintext is not None and head.startswith(plaintext.encryption.magic):
        return plaintext.encryption
    lacks = ", ".join(e.looks_like for e in formats.encryptions(kind))
    raise UsageError(f"{shown(path)} is not an encrypted {kind} backup ({lacks})"
                     + (f" nor {plaintext.encryption.looks_like}" if plaintext is not None else ""))


def read_local_manifest(path: str, kind: str) -> dict[str, Any] | None:
    """FILE.manifest.json beside a local backup (fetch_backup.py writes it), validated; None when
    there is none."""
    manifest_path = path + MANIFEST_SUFFIX
    if not os.path.exists(manifest_path):
        return None
    with open(manifest_path, "rb", opener=lambda p, f: os.open(p, f | os.O_NONBLOCK)) as handle:  # a FIFO: no waiting
        body = handle.read(MAX_MANIFEST_BYTES + 1)
    return parse_manifest(body, kind=kind)


def open_local(path: str, kind: str, passphrases: list[str], work: Callable[[Fetched], T], *,
               require_manifest: bool, plain: bool = False) -> Retrieved[T]:
    """`work` on a local backup file: checked against FILE.manifest.json when there is one (whose
    key_id then picks the passphrase, by the encryption's rule); without one (allowed unless
    `require_manifest`), each passphrase is tried in turn, as a failed attempt changes nothing.
    With `plain`, the kind's plaintext is accepted too (local_format), and read as it is."""
    encryption = local_format(path, kind, plain=plain)
    start_key_ids(passphrases)
    label = shown(path)
    if not encryption.encrypts:
        fetched = Fetched(kind, path, "", encryption, formats.uncompressed(kind).compression.name, None, label)
        return Retrieved(fetched, work(fetched))
    manifest = read_local_manifest(path, kind)
    if manifest is None and require_manifest:
        raise UsageError(
            f"{label} has no {shown(os.path.basename(path))}{MANIFEST_SUFFIX} beside it: without the manifest, "
            "corruption inside the file cannot be detected. Fetch it with fetch_backup.py (it saves the "
            "manifest), or pass --without-manifest to restore it anyway")
    if manifest is not None:
        check_against_manifest(Tally.of_file(path), manifest, label)
        tries = [encryption.pick_secret(manifest["key_id"], passphrases)]
        compression = compression_of(manifest)
    else:
        tries = passphrases
        # Without a manifest, a dump's compression is told by its first bytes.
        compression = None if len(formats.compressions(kind)) > 1 else formats.uncompressed(kind).compression.name
    problem: VerificationError | None = None
    for secret in tries:
        fetched = Fetched(kind, path, secret, encryption, compression, manifest, label)
        try:
            return Retrieved(fetched, work(fetched))
        except VerificationError as exc:
            # Without a manifest, a wrong passphrase that passes openssl's padding check (1 in
            # 256) yields noise that fails later checks: any of them means "try the next one".
            if manifest is not None:
                raise
            problem = exc
    assert problem is not None
    if len(tries) > 1:
        raise VerificationError(f"none of the {len(tries)} passphrases given decrypts {label} (mistyped?): {problem}",
                                Problem.UNDECRYPTABLE)
    raise problem
