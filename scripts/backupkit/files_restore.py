"""Restoring a files backup's members into a bucket (restore_files.py is its front): which
members to restore (`items_of`), whether the target already holds each one identically (its
ETag, guessed part sizes and all: `classify`), the uploads, the write check of the target, and
`Restore`, the work run on a checked, fetched backup.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from . import s3, signals
from .archive_read import ArchiveContents, FileSection, plaintext_file, read_archive, unsafe_name
from .attributes import put_parameters
from .errors import BackupError
from .output import log, shown
from .progress import Progress
from .retrieve import Fetched, private_directory
from .streams import CHUNK
from .threads import DaemonPool, in_background

WORKERS = 8  # uploads (and HEADs) in flight
NEW, CHANGED, IDENTICAL = "new", "changed", "identical"


@dataclass
class Item:
    name: str  # the original key (the member's name)
    key: str  # where it goes in the target
    size: int
    offset: int
    attributes: dict[str, Any]
    action: str = NEW


def items_of(contents: ArchiveContents, prefix: str, only: str | None, skip_unsafe: bool) -> tuple[list[Item], list[dict[str, str]]]:
    """What to restore, and the members left out for their unsafe names (only with skip_unsafe;
    otherwise any unsafe name stops the restore here, before the first upload)."""
    items, unsafe = [], []
    for member in contents.members:
        if only and not fnmatch.fnmatchcase(member.name, only):
            continue
        reason = unsafe_name(member)
        if reason is None and len((prefix + member.name).encode()) > 1024:
            reason = "with --target-prefix its key is longer than S3's 1024-byte limit"
        if reason is not None:
            unsafe.append({"name": member.name, "reason": reason})
            continue
        items.append(Item(member.name, prefix + member.name, member.size, member.offset, member.attributes))
    if unsafe and not skip_unsafe:
        first = unsafe[0]
        raise BackupError(
            f"{len(unsafe)} members have names that are unsafe as object keys (first: '{shown(first['name'])}': "
            f"{first['reason']}); nothing was uploaded. Pass --skip-unsafe-names to restore the others (those are "
            "listed), and restore these by hand from the decrypted ZIP if they are genuine")
    return items, unsafe


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


def same_bytes(plaintext: int, item: Item, etag: str) -> bool:
    hashers = [PartHasher(p) for p in part_sizes(item.size, etag)]
    with FileSection(plaintext, item.offset, item.size) as section:
        while hashers and (chunk := section.read(CHUNK)):
            for hasher in hashers:
                hasher.update(chunk)
    return any(hasher.etag() == etag for hasher in hashers)


# A listing of the target is read beside the download, so that keys it does not hold need no
# HEAD; it stops (and every key is HEADed, as without it) past this many keys.
LISTING_CEILING = 200_000


def keys_in_target(client: Any, bucket: str, prefix: str, object_count: Any) -> frozenset[str] | None:
    """The keys under `prefix` in the target, listed page by page: a member whose key is not
    among them is NEW without a HEAD (2,048 HEADs cost a few seconds; a page of 1,000 keys is one
    request). None when there are more keys than twice the backup's `object_count` (its
    manifest's; at least 1,000, at most LISTING_CEILING) or this identity may not list: then
    `classify` HEADs every key."""
    ceiling = (min(LISTING_CEILING, max(1000, 2 * object_count)) if isinstance(object_count, int)
               else LISTING_CEILING // 10)
    keys: set[str] = set()
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys.update(listed["Key"] for listed in page.get("Contents", []))
            if len(keys) > ceiling:
                return None
    except Exception:  # noqa: BLE001 - AccessDenied or any failure: classify HEADs every key instead
        return None
    return frozenset(keys)


def classify(client: Any, bucket: str, plaintext: int, item: Item, listed: frozenset[str] | None = None) -> str:
    """NEW, CHANGED or IDENTICAL: by the target's listing when it does not hold the key, by a HEAD
    (size, metadata, attributes) and the ETag of the member's bytes otherwise."""
    if listed is not None and item.key not in listed:
        return NEW
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
    return IDENTICAL if same_bytes(plaintext, item, head.get("ETag", "").strip('"')) else CHANGED


def upload(client: Any, bucket: str, plaintext: int, item: Item) -> None:
    extra = put_parameters(item.attributes)  # needs allow_non_ascii_metadata(client)
    with FileSection(plaintext, item.offset, item.size) as body, s3.s3_errors(f"upload s3://{bucket}/{item.key}"):
        # One PutObject up to S3's 5 GiB limit, so the ETag is the MD5 and a rerun can tell
        # identical objects; larger members go up in parts.
        if item.size <= 5 * 1024**3:
            client.put_object(Bucket=bucket, Key=item.key, Body=body, ContentLength=item.size, **extra)
        else:
            from boto3.s3.transfer import TransferConfig

            client.upload_fileobj(body, bucket, item.key, ExtraArgs=extra,
                                  Config=TransferConfig(multipart_threshold=64 * 1024**2, multipart_chunksize=64 * 1024**2,
                                                        max_concurrency=2))


def check_target(client: Any, bucket: str, prefix: str, dry_run: bool) -> None:
    """Before anything is downloaded: the target bucket exists and, unless --dry-run, this
    identity may write there (a multipart upload started and aborted leaves no object)."""
    try:
        client.head_bucket(Bucket=bucket)
    except Exception as exc:
        code = s3.error_code(exc)
        if code in ("404", "NoSuchBucket"):
            raise BackupError(f"the target bucket {bucket} does not exist: create it first, or check --target-bucket") from None
        if code not in ("403", "AccessDenied"):  # allowed to write without HeadBucket: the probe tells
            raise s3.explain(exc, f"check the target bucket {bucket}") from exc
    if dry_run:
        return
    probe = f"{prefix}.restore-files-write-check"
    try:
        upload_id = client.create_multipart_upload(Bucket=bucket, Key=probe)["UploadId"]
    except Exception as exc:
        if s3.error_code(exc) in ("403", "AccessDenied"):
            raise BackupError(
                f"cannot write to s3://{bucket}/{shown(prefix)}: denied by a bucket policy or missing s3:PutObject for "
                "these credentials. The read-only identity cannot restore files: fetch the backup with it "
                "(fetch_backup.py), then run restore_files.py --file with the app's own credentials") from None
        raise s3.explain(exc, f"check that s3://{bucket} can be written") from exc
    try:
        client.abort_multipart_upload(Bucket=bucket, Key=probe, UploadId=upload_id)
    except Exception:  # noqa: BLE001 - an unfinished upload is not an object; the bucket's lifecycle may clear it
        log(f"warning: could not abort the write check's empty multipart upload of s3://{bucket}/{shown(probe)}")


def not_in_backup(client: Any, bucket: str, prefix: str, only: str | None, names: set[str],
                  page_size: int = 1000) -> int | None:
    """How many objects under `prefix` in the target (whose original keys match `only`) are not
    among the backup's `names`: a restore leaves them as they are. Page by page, in bounded
    memory; None when this identity may not list the target."""
    count = 0
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size})
    try:
        for page in pages:
            for listed in page.get("Contents", []):
                name = listed["Key"][len(prefix):]
                if name not in names and (not only or fnmatch.fnmatchcase(name, only)):
                    count += 1
    except Exception as exc:
        if s3.error_code(exc) in ("AccessDenied", "403"):
            log(f"warning: cannot list s3://{bucket}/{shown(prefix)} (AccessDenied): the objects there that are not "
                "in the backup are not counted")
            return None
        raise s3.explain(exc, f"list s3://{bucket}/{shown(prefix)}") from exc
    return count


def run_pool(items: list[Item], work: Any) -> None:
    """Run `work(item)` for every item, WORKERS at a time; the first error stops the rest."""
    pool = DaemonPool(max_workers=WORKERS, thread_name_prefix="restore")
    try:
        for future in [pool.submit(work, item) for item in items]:
            future.result()
    finally:
        # Uploads under way finish, so the count an interrupted or failed restore reports is
        # final; the ones not started are cancelled. After a signal they are waited for a few
        # seconds only: those still running then are counted as such.
        pool.shutdown(wait=True, cancel_futures=True, timeout=signals.in_flight_wait())


@dataclass
class Restore:
    """One files restore into one target: plan (HEAD each key), then upload what differs."""

    client: Any
    bucket: str
    prefix: str
    only: str | None
    dry_run: bool
    skip_unsafe: bool
    todo: int = 0
    uploads: Progress | None = None  # counts the objects uploaded (under its lock: 8 threads upload)
    in_flight: int = 0  # uploads started and not ended
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, fetched: Fetched) -> dict[str, Any]:
        # 0700: the decrypted archive lives here, in a file that has no name
        with private_directory(prefix="restore-files-") as workdir, plaintext_file(fetched, workdir) as plaintext:
            plain = not fetched.encryption.encrypts
            expected = (fetched.manifest or {}).get("source", {}).get("object_count")
            # listed while the backup downloads; not for --only, which may pick a few keys of many
            listing = None if self.only else in_background(
                keys_in_target, self.client, self.bucket, self.prefix, expected, name="list-target")
            total = (fetched.manifest or {}).get("plaintext_size") or os.path.getsize(fetched.path)
            progress = Progress("checked" if plain else "decrypted", total_bytes=total)
            log(f"{'checking' if plain else 'decrypting'} {fetched.label}")
            contents = read_archive(fetched, keep=None if plain else plaintext, progress=progress.update)
            progress.done()
            items, unsafe = items_of(contents, self.prefix, self.only, self.skip_unsafe)
            for left_out in unsafe:
                log(f"warning: not restored: '{shown(left_out['name'])}': {left_out['reason']}")
            log(f"comparing {len(items)} members of {fetched.label} with s3://{self.bucket}/{shown(self.prefix)}")
            listed = listing.result() if listing is not None else None
            run_pool(items, lambda item: setattr(item, "action", classify(self.client, self.bucket, plaintext, item, listed)))
            todo = [item for item in items if item.action != IDENTICAL]
            self.todo = len(todo)
            extra = None
            if self.dry_run:
                names = {m.name for m in contents.members}
                extra = (sum(key[len(self.prefix):] not in names for key in listed) if listed is not None
                         else not_in_backup(self.client, self.bucket, self.prefix, self.only, names))
            if not self.dry_run and todo:
                uploads = self.uploads = Progress("uploaded", total_bytes=sum(i.size for i in todo), total_objects=len(todo))

                def put(item: Item) -> None:
                    with self._lock:
                        self.in_flight += 1
                    uploaded = False
                    try:
                        upload(self.client, self.bucket, plaintext, item)
                        uploaded = True
                    finally:
                        with self._lock:  # counted in one place at a time, for interrupted()
                            self.in_flight -= 1
                            if uploaded:
                                uploads.update(item.size, 1)

                try:
                    run_pool(todo, put)
                except BackupError as exc:
                    raise BackupError(f"{exc}; {self.interrupted()}") from exc
                uploads.done()
        return {"items": items, "todo": todo, "unsafe": unsafe, "not_in_backup": extra}

    def interrupted(self) -> str:
        if self.dry_run or not self.todo:
            return "nothing was uploaded"
        with self._lock:
            uploaded, running = (self.uploads.objects if self.uploads else 0), self.in_flight
        unsure = f", {running} more were being uploaded when it stopped (each is either complete or absent)" if running else ""
        return (f"{uploaded} of {self.todo} objects were uploaded (each complete){unsure}, the others not; run the same "
                "command again to finish: objects already identical in the target are skipped")
