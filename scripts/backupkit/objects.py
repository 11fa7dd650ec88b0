"""Reading the app's (source) bucket for the files backup: the listing, and objects fetched in
listing order by a small prefetch pool whose memory is bounded whatever the objects' sizes.

Objects up to WHOLE_OBJECT_LIMIT are fetched ahead, whole, by PREFETCH_WORKERS threads while at
most PREFETCH_BYTES of them wait to be written; a larger object is streamed in CHUNK pieces
when its turn comes. What GetObject answers about one object is that object's: one that vanished
after the listing (NoSuchKey), one in an archived storage class (GLACIER, DEEP_ARCHIVE,
Intelligent-Tiering's archive tiers: InvalidObjectState until it is restored) and one GetObject
refuses (SSE-C, a KMS key or a policy this job may not use) is reported as skipped. Any other
error (credentials, the bucket, the endpoint, a body cut short) ends the run.
"""
from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .output import shown
from .s3 import error_code, explain, s3_errors
from .streams import CHUNK
from .threads import DaemonPool

PREFETCH_WORKERS = 8  # GETs in flight: hides per-request latency for buckets of small files
PREFETCH_BYTES = 16 * 1024 * 1024  # bytes fetched ahead and not yet written, at most
WHOLE_OBJECT_LIMIT = 4 * 1024 * 1024  # larger objects are streamed in turn, never held whole
PREFETCH_AHEAD = 256  # objects queued ahead (their futures), however small
VANISHED = ("NoSuchKey", "NoSuchVersion", "404")
ARCHIVED = ("InvalidObjectState",)


@dataclass(frozen=True, slots=True)
class SourceObject:
    key: str
    size: int
    last_modified: datetime
    storage_class: str = "STANDARD"


@dataclass
class Listing:
    objects: list[SourceObject]
    total_bytes: int


def list_objects(client: Any, bucket: str, prefix: str = "") -> Listing:
    """Every object under prefix, following pagination (1,000 keys a page)."""
    objects: list[SourceObject] = []
    total = 0
    with s3_errors(f"list the source bucket s3://{bucket}/{prefix}"):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                objects.append(SourceObject(item["Key"], item["Size"], item["LastModified"], item.get("StorageClass", "STANDARD")))
                total += item["Size"]
    return Listing(objects, total)


@dataclass
class FetchedObject:
    """One object ready to be written: its bytes whole (`data`) or as a response to stream."""

    source: SourceObject
    head: dict[str, Any] = field(default_factory=dict)
    data: bytes | None = None
    skipped: str | None = None  # why it is not in the backup
    refused: bool = False  # skipped because GetObject refused it (see refusal)

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else int(self.head["ContentLength"])

    def chunks(self) -> Iterator[bytes]:
        if self.data is not None:
            if self.data:
                yield self.data
            return
        body = self.head["Body"]
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def discard(self) -> None:
        """Leave the object out after all: a streamed body is closed unread."""
        if self.data is None and "Body" in self.head:
            self.head["Body"].close()


def refusal(code: str | None) -> str | None:
    """Why a GetObject error code refuses one object, not the job (None: it does not): an object
    encrypted with a customer-provided key (SSE-C: 400 InvalidRequest, the request must carry that
    key), a KMS key this identity may not use (403 AccessDenied, or a KMS.* code), a bucket policy
    denying some keys (AccessDenied). Credentials, the bucket and the endpoint are the job's."""
    if code == "InvalidRequest":
        return ("GetObject refused it (InvalidRequest, S3's answer for an object encrypted with a customer-provided "
                "key, SSE-C, which this job does not have)")
    if code == "AccessDenied":
        return ("GetObject is denied for it (AccessDenied: a bucket policy, or a KMS key this job may not use); "
                "grant the job access to include it")
    if code and code.startswith("KMS."):
        return f"its KMS key cannot be used ({shown(code[:64])}); grant the job kms:Decrypt on it to include it"
    return None


def _get(client: Any, bucket: str, obj: SourceObject, whole: bool) -> FetchedObject:
    try:
        response = client.get_object(Bucket=bucket, Key=obj.key)
    except Exception as exc:
        if error_code(exc) in VANISHED:
            return FetchedObject(obj, skipped="deleted after the listing")
        if error_code(exc) in ARCHIVED:
            return FetchedObject(obj, skipped=f"in an archived storage class ({obj.storage_class}): restore it in S3 first")
        refused = refusal(error_code(exc))
        if refused is not None:
            return FetchedObject(obj, skipped=refused, refused=True)
        raise explain(exc, f"download s3://{bucket}/{shown(obj.key)}") from exc
    fetched = FetchedObject(obj, head=response)
    # Whole only within what the listing said (and the prefetch budget reserved): an object that
    # grew since it was listed is streamed when its turn comes.
    if whole and response["ContentLength"] <= min(WHOLE_OBJECT_LIMIT, obj.size):
        try:
            fetched.data = response["Body"].read()
        except Exception as exc:
            raise explain(exc, f"download s3://{bucket}/{shown(obj.key)}") from exc
        finally:
            response["Body"].close()
    return fetched


def fetch_in_order(client: Any, bucket: str, objects: Iterable[SourceObject], *,
                   workers: int = PREFETCH_WORKERS, budget: int = PREFETCH_BYTES,
                   skip: Callable[[SourceObject], str | None] = lambda obj: None) -> Iterator[FetchedObject]:
    """The objects, fetched, in the order given. Memory: at most `budget` bytes of small objects
    fetched ahead, plus one CHUNK of the large object being streamed."""
    pool = DaemonPool(max_workers=workers, thread_name_prefix="fetch")  # a stuck GET never holds up the exit
    window: collections.deque[tuple[SourceObject, Future | None]] = collections.deque()
    pending = iter(objects)
    nxt: SourceObject | None = next(pending, None)
    reserved = 0
    try:
        while window or nxt is not None:
            # Queue fetches ahead while the byte budget allows (the head is always allowed).
            while nxt is not None and len(window) < PREFETCH_AHEAD:
                if nxt.size <= WHOLE_OBJECT_LIMIT and skip(nxt) is None:
                    if window and reserved + nxt.size > budget:
                        break
                    reserved += nxt.size
                    window.append((nxt, pool.submit(_get, client, bucket, nxt, True)))
                else:
                    window.append((nxt, None))  # streamed when its turn comes, or never fetched (skip)
                nxt = next(pending, None)
            obj, future = window.popleft()
            if future is None:
                why = skip(obj)  # an object `skip` gives a reason for comes in its turn, skipped
                yield FetchedObject(obj, skipped=why) if why is not None else _get(client, bucket, obj, whole=False)
            else:
                fetched = future.result()
                reserved -= obj.size
                yield fetched
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


