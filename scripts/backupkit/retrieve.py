"""Finding, downloading and checking backups: which backup to use, and "latest" meaning the
newest that verifies (incomplete and failing backups are skipped, with the reason said)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from .crypto import pick_passphrase
from .errors import BackupError, VerificationError
from .manifest import MANIFEST_SUFFIX, Backup, catalogue, find_backup, parse_manifest
from .pipeline import Tally, copy
from .progress import Progress, log
from .s3 import read_body

T = TypeVar("T")


def candidates(client: Any, bucket: str, environment: str, kind: str, *, latest: bool,
               key: str | None = None, version_id: str | None = None) -> list[Backup]:
    """Backups to try, in order: every version newest first for --latest, else the one named."""
    backups = catalogue(client, bucket, environment, (kind,))
    if latest:
        if not backups:
            raise BackupError(f"no {kind} backup found in s3://{bucket}/{environment}/{kind}/: check --environment and --bucket")
        return backups
    if not key:
        raise BackupError("say which backup: --latest or --key KEY")
    if not key.startswith(f"{environment}/"):
        key = f"{environment}/{kind}/{key}"  # a bare file name is accepted too
    return [find_backup(backups, key, version_id)]


def first_good(backups: list[Backup], attempt: Callable[[Backup], T], *, latest: bool) -> tuple[Backup, T, list[str]]:
    """Run `attempt` on each backup until one passes. With `latest`, incomplete backups and those
    failing verification are skipped (said on stderr); otherwise the first failure is final."""
    skipped: list[str] = []
    for backup in backups:
        if not backup.complete:
            reason = f"skipped {backup.label()}: {backup.manifest_problem}"
            if not latest:
                raise VerificationError(f"{backup.label()} is incomplete: {backup.manifest_problem}")
            log(reason)
            skipped.append(reason)
            continue
        try:
            return backup, attempt(backup), skipped
        except VerificationError as exc:
            if not latest:
                raise
            reason = f"skipped {backup.label()}: {exc}"
            log(reason)
            skipped.append(reason)
    # The newest one's reason in the error line itself: often the only one anybody reads.
    newest = skipped[0].removeprefix("skipped ") if skipped else "nothing to try"
    raise BackupError(f"no backup verifies ({len(skipped)} tried; the others' reasons are above): {newest}")


def check_against_manifest(tally: Tally, manifest: dict[str, Any], what: str) -> None:
    if tally.size != manifest["encrypted_size"]:
        raise VerificationError(
            f"{what} is {tally.size} bytes, the manifest says {manifest['encrypted_size']}: truncated or corrupted")
    if tally.hexdigest() != manifest["encrypted_sha256"]:
        raise VerificationError(f"{what} does not match the manifest's SHA-256: corrupted")


def check_plaintext(plaintext: Tally, manifest: dict[str, Any], what: str) -> None:
    if plaintext.size != manifest["plaintext_size"]:
        raise VerificationError(
            f"the decrypted {what} is {plaintext.size} bytes, the manifest says {manifest['plaintext_size']}: corrupted")
    if plaintext.hexdigest() != manifest["plaintext_sha256"]:
        raise VerificationError(f"the decrypted {what} does not match the manifest's plaintext SHA-256: corrupted")


def download(client: Any, bucket: str, backup: Backup, path: str) -> None:
    """Stream one backup version to `path` (0600) and check it against its manifest."""
    extra = {"VersionId": backup.version_id} if backup.version_id else {}

    def save(body: Any) -> Tally:
        tally = Tally()  # from scratch on every attempt
        progress = Progress(f"downloaded {backup.key}", total_bytes=backup.size)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            copy(body, out.write, tally, progress.update)
        progress.done()
        return tally

    tally = read_body(f"download s3://{bucket}/{backup.key}",
                      lambda: client.get_object(Bucket=bucket, Key=backup.key, **extra), save)
    if backup.manifest is not None:
        check_against_manifest(tally, backup.manifest, "the downloaded object")


def local_manifest(path: str, passphrases: list[str]) -> tuple[dict[str, Any] | None, list[str]]:
    """For a local backup file: its FILE.manifest.json (when present) after checking the file
    against it, and the passphrases to try (only the one whose key_id it names)."""
    if not os.path.exists(path + MANIFEST_SUFFIX):
        return None, passphrases
    with open(path + MANIFEST_SUFFIX, "rb") as handle:
        manifest = parse_manifest(handle.read())
    check_against_manifest(Tally.of_file(path), manifest, path)
    return manifest, [pick_passphrase(manifest["key_id"], passphrases)]
