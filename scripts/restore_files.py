#!/usr/bin/env python3
"""Restore a files backup: download, check, decrypt (HMAC checked) to a private temp file, then
re-upload each member with its ContentType and metadata, skipping objects already identical."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from backupkit import cli, config, crypto, s3
from backupkit.archive import (
    ZIP_MAGIC,
    FileSection,
    check_archive,
    decrypt_file,
    member_attributes,
    member_range,
)
from backupkit.errors import BackupError, UsageError, VerificationError
from backupkit.manifest import Backup
from backupkit.pipeline import CHUNK
from backupkit.progress import Progress, human_bytes, log
from backupkit.retrieve import candidates, check_plaintext, download, first_good, local_manifest

DESCRIPTION = """\
Restore a files backup into TARGET_BUCKET: the backup is downloaded and checked against its
manifest (size, SHA-256), decrypted into a private temporary file (0600, in a 0700 directory),
and only when the decryption ended cleanly (AES Crypt's HMAC is checked at the very end) and the
plaintext SHA-256 matches the manifest is anything uploaded. Each member goes back under
TARGET_PREFIX + its original key, with its ContentType and user metadata. Objects already
identical in the target (same size, bytes (ETag/MD5), content type and metadata) are skipped.

--latest takes the newest backup that verifies, naming the newer ones it skipped and why.
--only GLOB restores the keys that match (fnmatch, on the original key; quote it).
--dry-run prints what would be uploaded (new / changed / identical) and uploads nothing.
Temporary files are removed on every exit, Ctrl-C and SIGTERM included.
"""

EPILOG = """\
environment:
  EXTERNAL_BACKUP_ENCRYPTION_KEY[_PREVIOUS]  passphrases; the manifest's key_id picks the right one
  BACKUP_BUCKET, BACKUP_ENVIRONMENT          the external bucket (read-only access is enough)
  AWS_* (AWS_PROFILE, keys, AWS_REGION, AWS_ENDPOINT_URL)
                                             boto3's standard chain, used for BOTH the external
                                             bucket and the target bucket: the identity needs read
                                             on the first and s3:PutObject (+ GetObject for the
                                             identical check) on the second. When no one identity
                                             has both, fetch_backup.py the backup with one and
                                             restore it with --file using the other.
  TMPDIR                                     where the decrypted archive is kept while restoring
                                             (needs room for the whole backup)

examples:
  scripts/restore_files.py --environment production --latest --target-bucket acme-app-uploads --dry-run
  scripts/restore_files.py --environment production --key 2026-11-29--03-00-00.zip.encrypted \\
      --target-bucket acme-app-uploads --only 'avatars/*'
  scripts/restore_files.py --file backup.zip.encrypted --target-bucket acme-app-restored
"""

WORKERS = 8  # uploads (and HEADs) in flight
NEW, CHANGED, IDENTICAL = "new", "changed", "identical"


def build_parser() -> cli.ArgumentParser:
    p = cli.parser("restore_files.py", DESCRIPTION, EPILOG)
    cli.add_target_args(p)
    which = cli.add_backup_choice(p)
    which.add_argument("--file", help="a local backup: encrypted (its FILE.manifest.json is used when present) or an already decrypted ZIP")
    p.add_argument("--target-bucket", default=os.environ.get("TARGET_BUCKET"),
                   help="the bucket to restore into (env TARGET_BUCKET)")
    p.add_argument("--target-prefix", default=os.environ.get("TARGET_PREFIX", ""),
                   help="put before every restored key (env TARGET_PREFIX; default: none, keys as they were)")
    p.add_argument("--only", metavar="GLOB", help="restore only the original keys matching this fnmatch pattern, e.g. 'avatars/*'")
    p.add_argument("--dry-run", action="store_true", help="print what would be uploaded; upload nothing")
    cli.add_output_args(p)
    return p


# -- getting a verified plaintext archive --------------------------------------------------------
def open_archive(path: str) -> list[zipfile.ZipInfo]:
    """The members of the ZIP at `path`, each with a readable comment."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise VerificationError(f"the decrypted backup is not a valid ZIP: {exc}") from None
    for info in infos:
        member_attributes(info)
    return infos


def decrypt_verified(encrypted: str, plaintext: str, passphrase: str, manifest: dict | None) -> None:
    total = manifest["plaintext_size"] if manifest else os.path.getsize(encrypted)  # about right without one
    progress = Progress("decrypted", total_bytes=total)
    tally = decrypt_file(encrypted, plaintext, passphrase, lambda n: progress.update(n))
    progress.done()
    if manifest is not None:
        check_plaintext(tally, manifest, "archive")


def from_file(path: str, workdir: str) -> tuple[str, dict | None]:
    """A local backup → (path of a verified plaintext ZIP, its manifest or None)."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head.startswith(ZIP_MAGIC):
        log(f"{path} is a decrypted ZIP: checking every member's CRC")
        check_archive(path)
        return path, None
    if crypto.detect_format(head) != crypto.AESCRYPT_FORMAT:
        raise UsageError(f"{path} is neither an encrypted files backup (AES Crypt) nor a ZIP")
    passphrases = config.passphrases()
    manifest, passphrases = local_manifest(path, passphrases)
    plaintext = os.path.join(workdir, "backup.zip")
    problem: VerificationError | None = None
    for passphrase in passphrases:
        try:
            decrypt_verified(path, plaintext, passphrase, manifest)
            return plaintext, manifest
        except VerificationError as exc:
            problem = exc
    raise problem or VerificationError("no passphrase to try")


def from_bucket(args: Any, workdir: str) -> tuple[str, Backup, list[str]]:
    environment = config.environment_name(args.environment)
    bucket = config.bucket_name(args.bucket)
    passphrases = config.passphrases()
    client = s3.external_client()
    options = candidates(client, bucket, environment, "files", latest=args.latest,
                         key=args.key, version_id=args.version_id)
    encrypted = os.path.join(workdir, "backup.zip.encrypted")
    plaintext = os.path.join(workdir, "backup.zip")

    def attempt(backup: Backup) -> None:
        passphrase = crypto.pick_passphrase(backup.manifest["key_id"], passphrases)
        try:
            download(client, bucket, backup, encrypted)
            log(f"decrypting {backup.label()}")
            decrypt_verified(encrypted, plaintext, passphrase, backup.manifest)
            open_archive(plaintext)
        finally:
            if os.path.exists(encrypted):
                os.unlink(encrypted)

    backup, _, skipped = first_good(options, attempt, latest=args.latest)
    return plaintext, backup, skipped


# -- planning and uploading ---------------------------------------------------------------------
@dataclass
class Item:
    name: str  # the original key (the member's name)
    key: str  # where it goes in the target
    size: int
    offset: int
    attributes: dict[str, Any]
    action: str = NEW


def items_of(path: str, prefix: str, only: str | None) -> list[Item]:
    items = []
    with open(path, "rb") as handle:
        for info in open_archive(path):
            if only and not fnmatch.fnmatchcase(info.filename, only):
                continue
            offset, size = member_range(handle, info)
            items.append(Item(info.filename, prefix + info.filename, size, offset, member_attributes(info)))
    return items


# Part sizes apps' uploaders commonly use (boto3/aws-cli 8 MiB, the AWS SDKs 5 MiB, …): a
# multipart ETag is the MD5 of the parts' MD5s, so it can only be checked by guessing the size.
COMMON_PART_SIZES = [n * 1024 * 1024 for n in (5, 8, 16, 10, 15, 25, 32, 50, 64, 100, 128)]


class PartHasher:
    """The ETag S3 gives bytes uploaded in parts of `part_size` (None: one PutObject, the MD5)."""

    def __init__(self, part_size: int | None):
        self.part_size = part_size
        self._whole = hashlib.md5(usedforsecurity=False)
        self._part = hashlib.md5(usedforsecurity=False)
        self._in_part = 0
        self._parts: list[bytes] = []

    def update(self, chunk: bytes) -> None:
        if not self.part_size:
            self._whole.update(chunk)
            return
        view = memoryview(chunk)
        while view:
            take = view[: self.part_size - self._in_part]
            self._part.update(take)
            self._in_part += len(take)
            view = view[len(take):]
            if self._in_part == self.part_size:
                self._parts.append(self._part.digest())
                self._part, self._in_part = hashlib.md5(usedforsecurity=False), 0

    def etag(self) -> str:
        if not self.part_size:
            return self._whole.hexdigest()
        parts = self._parts + ([self._part.digest()] if self._in_part else [])
        return f"{hashlib.md5(b''.join(parts), usedforsecurity=False).hexdigest()}-{len(parts)}"


def part_sizes(size: int, etag: str) -> list[int | None]:
    """Part sizes that could have produced `etag` for `size` bytes."""
    if "-" not in etag:
        return [None]
    count = int(etag.rsplit("-", 1)[1] or 0)
    if count < 1:
        return []
    mib = 1024 * 1024
    guess = -(-size // count // mib) * mib or mib  # parts of a whole number of MiB, the last shorter
    return [p for p in dict.fromkeys([*COMMON_PART_SIZES, guess, guess + mib]) if -(-size // p) == count] or [guess]


def same_bytes(path: str, item: Item, etag: str) -> bool:
    hashers = [PartHasher(p) for p in part_sizes(item.size, etag)]
    with FileSection(path, item.offset, item.size) as section:
        while hashers and (chunk := section.read(CHUNK)):
            for hasher in hashers:
                hasher.update(chunk)
    return any(hasher.etag() == etag for hasher in hashers)


def classify(client: Any, bucket: str, path: str, item: Item) -> str:
    try:
        head = client.head_object(Bucket=bucket, Key=item.key)
    except Exception as exc:
        if s3.error_code(exc) in ("404", "NoSuchKey", "NotFound"):
            return NEW
        raise s3.explain(exc, f"check s3://{bucket}/{item.key}") from exc
    if head.get("ContentLength") != item.size or head.get("Metadata", {}) != item.attributes["Metadata"]:
        return CHANGED
    for name, value in item.attributes.items():
        if name != "Metadata" and head.get(name) != value:
            return CHANGED
    return IDENTICAL if same_bytes(path, item, head.get("ETag", "").strip('"')) else CHANGED


def upload(client: Any, bucket: str, path: str, item: Item) -> None:
    extra = {k: v for k, v in item.attributes.items() if v or k == "Metadata"}
    with FileSection(path, item.offset, item.size) as body, s3.s3_errors(f"upload s3://{bucket}/{item.key}"):
        # One PutObject up to S3's 5 GiB limit, so the ETag is the MD5 and a rerun can tell
        # identical objects; larger members go up in parts.
        if item.size <= 5 * 1024**3:
            client.put_object(Bucket=bucket, Key=item.key, Body=body, ContentLength=item.size, **extra)
        else:
            from boto3.s3.transfer import TransferConfig

            client.upload_fileobj(body, bucket, item.key, ExtraArgs=extra,
                                  Config=TransferConfig(multipart_threshold=64 * 1024**2, multipart_chunksize=64 * 1024**2,
                                                        max_concurrency=2))


def check_target(client: Any, bucket: str) -> None:
    """Fail early on a missing target bucket (every HEAD would say 404, i.e. "new")."""
    try:
        client.head_bucket(Bucket=bucket)
    except Exception as exc:
        code = s3.error_code(exc)
        if code in ("403", "AccessDenied"):
            return  # allowed to write without being allowed to HeadBucket: the uploads will tell
        if code in ("404", "NoSuchBucket"):
            raise BackupError(f"the target bucket {bucket} does not exist: create it first, or check --target-bucket") from None
        raise s3.explain(exc, f"check the target bucket {bucket}") from exc


def run_pool(items: list[Item], work: Any) -> None:
    """Run `work(item)` for every item, WORKERS at a time; the first error stops the rest."""
    pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="restore")
    try:
        for future in [pool.submit(work, item) for item in items]:
            future.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.version_id and not args.key:
        raise UsageError("--version-id needs --key")
    target_bucket = config.bucket_name(args.target_bucket, "target bucket", "set TARGET_BUCKET or pass --target-bucket")
    prefix = args.target_prefix or ""
    if args.file:
        if not os.path.isfile(args.file):
            raise UsageError(f"--file {args.file}: no such file")
        if os.path.getsize(args.file) == 0:
            raise UsageError(f"--file {args.file} is empty: not a backup")
    else:
        config.environment_name(args.environment)
        config.bucket_name(args.bucket)
        config.passphrases()
    began = time.monotonic()

    workdir = tempfile.mkdtemp(prefix="restore-files-")  # 0700: the decrypted archive lives here
    try:
        skipped: list[str] = []
        backup = None
        if args.file:
            path, _ = from_file(args.file, workdir)
            source = args.file
        else:
            path, backup, skipped = from_bucket(args, workdir)
            source = f"s3://{args.bucket}/{backup.label()}"
        items = items_of(path, prefix, args.only)
        target = s3.external_client(max_pool_connections=WORKERS + 4)
        check_target(target, target_bucket)
        log(f"comparing {len(items)} members of {source} with s3://{target_bucket}/{prefix}")

        def plan(item: Item) -> None:
            item.action = classify(target, target_bucket, path, item)

        run_pool(items, plan)
        todo = [item for item in items if item.action != IDENTICAL]
        counts = {action: sum(1 for i in items if i.action == action) for action in (NEW, CHANGED, IDENTICAL)}
        todo_bytes = sum(item.size for item in todo)
        if not args.dry_run and todo:
            progress = Progress("uploaded", total_bytes=todo_bytes, total_objects=len(todo))

            def put(item: Item) -> None:
                upload(target, target_bucket, path, item)
                progress.update(item.size, 1)

            run_pool(todo, put)
            progress.done()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    seconds = time.monotonic() - began
    where = f"s3://{target_bucket}/{prefix}"
    result = {
        "restored": source,
        "key": backup.key if backup else None,
        "version_id": backup.version_id if backup else None,
        "target": where,
        "dry_run": args.dry_run,
        "only": args.only,
        "members": len(items),
        **counts,
        "uploaded": 0 if args.dry_run else len(todo),
        "uploaded_bytes": 0 if args.dry_run else todo_bytes,
        "seconds": round(seconds, 1),
        "skipped": skipped,
    }
    if args.dry_run:
        result["plan"] = [{"key": i.key, "action": i.action, "size": i.size} for i in items]
    summary = (f"{counts[NEW]} new, {counts[CHANGED]} changed, {counts[IDENTICAL]} identical "
               f"of {len(items)} members{f' matching {args.only!r}' if args.only else ''}")
    if args.dry_run:
        lines = [f"{i.action:9} {i.key} ({human_bytes(i.size)})" for i in items]
        human = "\n".join([*lines, f"dry run: would upload {len(todo)} objects ({human_bytes(todo_bytes)}) from {source} "
                                   f"to {where}: {summary}; uploaded nothing"])
    else:
        human = (f"restored {source} to {where}: uploaded {len(todo)} objects ({human_bytes(todo_bytes)}); "
                 f"{summary}; in {seconds:.1f} s")
        cli.step_summary(f"### Files restore\n\nRestored `{source}` to `{where}`: {summary}.")
    cli.print_result(result, args.json, human)
    return 0


if __name__ == "__main__":
    cli.run(main)
