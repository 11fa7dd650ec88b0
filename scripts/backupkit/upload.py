"""One streaming multipart uploader, used by every backup.

Bytes go in through `write()`; full parts are uploaded by a bounded pool. At most MAX_IN_FLIGHT
part buffers exist at once (the one being filled included), so memory stays at about
MAX_IN_FLIGHT × part size whatever the backup's size. Size and SHA-256 are computed
on the way. Nothing becomes a visible object until `complete()`; `abort()` otherwise.

The part workers are daemon threads: after a signal, an abort waits for the parts under way only
until the run's exit bound (signals.time_left), then leaves them (S3 refuses a part of an aborted
upload), and the abort request itself is abandoned if S3 does not answer by then.

Not s3transfer (boto3's upload_fileobj): it returns nothing, so the VersionId the manifest names
would need a later HEAD, which a writer adding a version meanwhile can race (boto/s3transfer#82,
open since 2017); and its part size is fixed for the whole transfer (TransferConfig's
multipart_chunksize), so a stream of unknown length stops at S3's 10,000 parts (78 GiB at its
8 MiB default) unless every part is large from the first: here the part size grows as it goes.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
import threading
from concurrent.futures import Future
from typing import Any

from . import signals
from .s3 import error_code, explain, s3_errors
from .threads import DaemonPool, in_background

MIB = 1024 * 1024
# 6 MiB, not 8: the same wall time, 6 MiB less peak memory, which keeps the whole tree of a
# compressed backup (the zstd stage added 4 MiB) under 100 MiB (bench/RESULTS.md, compression).
INITIAL_PART_SIZE = 6 * MIB
# The part size doubles every PARTS_PER_STEP parts: 10,000 parts then hold 1000 × 6 MiB ×
# (2^10 - 1) ≈ 5.9 TiB, above S3's 5 TiB object limit, and no part exceeds 3 GiB (limit 5 GiB).
PARTS_PER_STEP = 1000
# 3 part buffers (the one being filled included), so two parts upload while one fills: against 4,
# the same wall time on a 1 GB dump and less memory (bench/RESULTS.md, experiment-3-part-buffers);
# against 2, the same wall time locally, but one upload at a time would cap the throughput to
# a distant S3 at one connection's.
MAX_IN_FLIGHT = 3
MAX_PARTS = 10_000
CONTENT_TYPE = "application/octet-stream"  # every backup is opaque ciphertext


def part_size(part_number: int, initial: int = INITIAL_PART_SIZE) -> int:
    """Size of part `part_number` (1-based)."""
    return initial << min((part_number - 1) // PARTS_PER_STEP, 9)


class StreamingUpload:
    """`write()` bytes, then `complete()` (returns the version id) or `abort()`.

    `client` may be a Future of one (store.external_store_soon): bytes are taken into the first
    part buffers while it is being made. Used as a context manager, an exception inside the
    block aborts the upload.
    """

    def __init__(
        self,
        client: Any,
        bucket: str,
        key: str,
        *,
        initial_part_size: int = INITIAL_PART_SIZE,
        max_in_flight: int = MAX_IN_FLIGHT,
    ):
        self._client_or_future = client
        self.bucket = bucket
        self.key = key
        self._initial = initial_part_size
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._pool = DaemonPool(max_workers=max_in_flight, thread_name_prefix="upload")
        self._futures: list = []
        self._parts: dict[int, dict[str, str]] = {}
        self._error: BaseException | None = None
        self._upload_id: str | None = None
        self._starting: Future | None = None  # CreateMultipartUpload, until it answered
        self._buffer = bytearray()
        self._free: list[bytearray] = []  # part buffers whose upload finished, for reuse
        self._filled = 0
        self._next_part = 1
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.version_id: str | None = None
        # open → completing (the request is sent: the object may exist) → completed; or aborted
        self.state = "open"

    @property
    def _client(self) -> Any:
        if isinstance(self._client_or_future, Future):
            self._client_or_future = self._client_or_future.result()
        return self._client_or_future

    # -- writing ---------------------------------------------------------------------------
    def write(self, data: bytes) -> int:
        if self.state != "open":
            raise ValueError(f"upload is {self.state}")
        self._raise_worker_error()
        self.sha256.update(data)
        self.size += len(data)
        view = memoryview(data)
        while view:
            if not self._buffer:
                # A part buffer holds a slot from allocation until its upload ends, so at most
                # `max_in_flight` buffers exist. Allocated at full size: growing over-allocates.
                self._slots.acquire()
                self._raise_worker_error()
                self._buffer = self._allocate(part_size(self._next_part, self._initial))
            room = len(self._buffer) - self._filled
            take = min(room, len(view))
            self._buffer[self._filled:self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
            if self._filled == len(self._buffer):
                self._submit_part()
        return len(data)

    def _allocate(self, size: int) -> bytearray:
        # Reusing part buffers keeps the heap from fragmenting (malloc would otherwise keep a
        # freed 8 MiB hole per thread arena: ~10 MiB more peak RSS in practice).
        while self._free:
            buffer = self._free.pop()
            if len(buffer) == size:
                return buffer
        return bytearray(size)

    def _take_buffer(self) -> bytearray:
        body, self._buffer = self._buffer, bytearray()
        del body[self._filled:]  # the last part is usually shorter
        self._filled = 0
        return body

    def _submit_part(self) -> None:
        if self._next_part > MAX_PARTS:
            raise explain(RuntimeError("more than 10,000 parts"), f"upload s3://{self.bucket}/{self.key}")
        if self._upload_id is None:
            # In a thread of its own: when a signal stops the wait, abort() still learns the id
            # of an upload that S3 started, and aborts it.
            client = self._client
            self._starting = in_background(lambda: client.create_multipart_upload(
                Bucket=self.bucket, Key=self.key, ContentType=CONTENT_TYPE, ChecksumAlgorithm="CRC32"), name="create-upload")
            with s3_errors(f"start the multipart upload of s3://{self.bucket}/{self.key}"):
                response = self._starting.result()
            self._upload_id = response["UploadId"]
        body = self._take_buffer()
        number = self._next_part
        self._next_part += 1
        try:
            self._futures.append(self._pool.submit(self._upload_part, number, body))
        except BaseException:
            self._slots.release()
            raise
        self._raise_worker_error()

    def _upload_part(self, number: int, body: bytearray) -> None:
        try:
            if self._error is not None:
                return
            response = self._client.upload_part(
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=body,
                ChecksumAlgorithm="CRC32",
            )
            part = {"PartNumber": number, "ETag": response["ETag"]}
            if response.get("ChecksumCRC32"):
                part["ChecksumCRC32"] = response["ChecksumCRC32"]
            self._parts[number] = part
        except BaseException as exc:  # noqa: BLE001 - handed to the writer thread
            if self._error is None:
                self._error = exc
        finally:
            self._free.append(body)
            self._slots.release()

    def _raise_worker_error(self) -> None:
        if self._error is not None:
            raise explain(self._error, f"upload a part of s3://{self.bucket}/{self.key}") from self._error

    def _wait_for_parts(self) -> None:
        for future in self._futures:
            future.result()
        self._futures.clear()

    # -- finishing ---------------------------------------------------------------------------
    def flush(self) -> None:
        """Upload what is buffered and wait for every part: after this, complete() is one request."""
        if self.state != "open":
            raise ValueError(f"upload is {self.state}")
        if self._upload_id is not None:
            if self._filled:
                self._submit_part()
            self._wait_for_parts()
            self._raise_worker_error()

    def complete(self) -> str | None:
        """Make the object visible; returns its version id (None in an unversioned bucket)."""
        self.flush()
        target = f"s3://{self.bucket}/{self.key}"
        client = self._client
        self.state = "completing"
        try:
            if self._upload_id is None:
                # Under one part (empty included): a multipart upload with zero parts is MalformedXML.
                with s3_errors(f"upload {target}"):
                    response = client.put_object(
                        Bucket=self.bucket,
                        Key=self.key,
                        Body=bytes(self._take_buffer()),
                        ContentType=CONTENT_TYPE,
                        ChecksumAlgorithm="CRC32",
                    )
            else:
                parts = [self._parts[n] for n in sorted(self._parts)]
                with s3_errors(f"complete the multipart upload of {target}"):
                    response = client.complete_multipart_upload(
                        Bucket=self.bucket, Key=self.key, UploadId=self._upload_id, MultipartUpload={"Parts": parts}
                    )
        except Exception:
            self.state = "open"  # S3 answered with an error: nothing was completed, abort() cleans up
            raise
        self._pool.shutdown(wait=True)
        self.state = "completed"
        self.version_id = response.get("VersionId")
        return self.version_id

    def abort(self) -> None:
        """Throw away whatever was uploaded. A denied abort is a warning: the bucket's lifecycle
        rule removes incomplete uploads after 7 days."""
        if self.state != "open":
            return
        self.state = "aborted"
        if self._error is None:
            self._error = RuntimeError("aborted")
        self._pool.shutdown(wait=True, cancel_futures=True, timeout=signals.in_flight_wait())
        self._buffer = bytearray()
        if self._upload_id is None and self._starting is not None:
            # Stopped while S3 was starting the upload: S3 refused it, or it is aborted below.
            with contextlib.suppress(Exception):
                self._upload_id = self._starting.result(timeout=signals.in_flight_wait())["UploadId"]
        if self._upload_id is None:
            return
        client, upload_id = self._client, self._upload_id
        request = in_background(lambda: client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=upload_id),
                                name="abort")
        try:
            signals.wait(request)
            return
        except TimeoutError:
            reason = "S3 did not answer in time" if not request.done() else "timed out"
        except Exception as exc:  # noqa: BLE001 - we are already failing; say so and go on
            reason = error_code(exc) or type(exc).__name__
        print(
            f"warning: could not abort the incomplete multipart upload of s3://{self.bucket}/{self.key} "
            f"({reason}); it is not a backup and the bucket's lifecycle rule removes it after 7 days",
            file=sys.stderr,
        )

    def __enter__(self) -> StreamingUpload:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self.state == "open":
            self.abort()
