"""The external store: where backups are written and read back. Scripts ask this module for it
(`external_store()`, or `external_store_soon()` to make it while other work starts); nothing else
makes the external bucket's client, so another S3-compatible target, or a second store, is a
change here.

What the library asks of a store is the S3 API subset it calls: put_object, get_object (with
Range and VersionId), head_object, the list_object_versions and list_objects_v2 paginators,
create/upload_part/complete/abort_multipart_upload (upload.py), and for setup_bucket.py the
bucket's versioning, Object Lock, encryption, lifecycle, policy and public-access settings;
for compare_backups.py --hold / --release, put_object_legal_hold. Its
errors are botocore's, which s3.explain turns into operator messages.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from . import s3
from .threads import in_background


def external_store(max_pool_connections: int = 16, region: str | None = None) -> Any:
    """The external bucket's client: boto3's own credential chain and endpoint variables
    (AWS_PROFILE, AWS_ENDPOINT_URL, …), botocore's standard retries (s3.MAX_ATTEMPTS)."""
    return s3.client(max_pool_connections, region)


def external_store_soon() -> Future:
    """external_store() made in a thread, so that a backup starts its dump meanwhile: importing
    boto3 and loading the S3 model take 0.25-0.5 s of one core, which the one-line pipe spends
    while its pg_dump already runs. pg_dump then starts 0.24 s after launch instead of 0.49 s: a
    gain where a core is spare; on a machine already busy it only moves that CPU (bench/RESULTS.md,
    summary). The endpoint variables are checked here, now. A daemon thread: a run stopped
    meanwhile does not wait for it at exit."""
    s3.check_endpoints()
    return in_background(external_store, name="s3-client")
