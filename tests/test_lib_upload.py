"""The streaming uploader against the S3 server over HTTP."""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import Future

import boto3
import pytest
from botocore.stub import Stubber

from backupkit.errors import BackupError
from backupkit.upload import INITIAL_PART_SIZE, PARTS_PER_STEP, StreamingUpload, part_size


def test_part_sizes_reach_5_tib_in_10000_parts():
    sizes = [part_size(n) for n in range(1, 10_001)]
    assert sizes[0] == 6 * 1024 * 1024
    assert sum(sizes) >= 5 * 1024**4
    assert max(sizes) <= 5 * 1024**3
    assert part_size(PARTS_PER_STEP) == INITIAL_PART_SIZE and part_size(PARTS_PER_STEP + 1) == 2 * INITIAL_PART_SIZE


def operations(client) -> list[str]:
    """The S3 operations `client` calls from now on, in order."""
    called: list[str] = []
    client.meta.events.register("before-call.s3.*", lambda model, **_: called.append(model.name))
    return called


@pytest.mark.parametrize("size", [0, 1, 1024 * 1024, 2 * 1024 * 1024 + 17])
def test_small_outputs_use_one_put_object(s3server, bucket, size):
    client = s3server.client()
    called = operations(client)
    data = os.urandom(size)
    upload = StreamingUpload(client, bucket, "k", initial_part_size=2 * 1024 * 1024 + 18)
    for i in range(0, size, 100_000):
        upload.write(data[i:i + 100_000])
    version = upload.complete()
    assert version
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == data
    assert upload.sha256.hexdigest() == hashlib.sha256(data).hexdigest() and upload.size == size
    assert called[:1] == ["PutObject"] and "CreateMultipartUpload" not in called


def test_multipart_upload_round_trips_bytes(s3server, bucket):
    client = s3server.client()
    data = os.urandom(5 * 1024 * 1024 * 3 + 12345)
    with StreamingUpload(client, bucket, "big", initial_part_size=5 * 1024 * 1024) as upload:
        view = memoryview(data)
        for i in range(0, len(data), 777_777):
            upload.write(view[i:i + 777_777])
        upload.complete()
    assert client.get_object(Bucket=bucket, Key="big")["Body"].read() == data


def test_abort_leaves_no_object_and_no_upload(s3server, bucket):
    client = s3server.client()
    with pytest.raises(RuntimeError), StreamingUpload(client, bucket, "k", initial_part_size=5 * 1024 * 1024) as upload:
        upload.write(os.urandom(11 * 1024 * 1024))
        raise RuntimeError("the dump failed")
    assert upload.state == "aborted"
    assert "Contents" not in client.list_objects_v2(Bucket=bucket)
    assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_denied_abort_is_a_warning(capsys):
    client = boto3.client("s3", region_name="us-east-1", aws_access_key_id="a", aws_secret_access_key="b")
    with Stubber(client) as stub:
        stub.add_response("create_multipart_upload", {"UploadId": "u1"})
        stub.add_client_error("upload_part", "AccessDenied", http_status_code=403)
        stub.add_client_error("abort_multipart_upload", "AccessDenied", http_status_code=403)
        upload = StreamingUpload(client, "bkt", "k", initial_part_size=1024, max_in_flight=1)
        with pytest.raises(BackupError, match="AccessDenied"):
            for _ in range(10):
                upload.write(b"x" * 1024)
            upload.complete()
        upload.abort()
    err = capsys.readouterr().err
    assert "warning: could not abort" in err and "lifecycle" in err


def test_missing_bucket_is_a_clear_error(s3server):
    upload = StreamingUpload(s3server.client(), "no-such-bucket-xyz", "k")
    upload.write(b"data")
    with pytest.raises(BackupError, match="does not exist"):
        upload.complete()


def test_a_client_still_being_made_is_waited_for(s3server, bucket):
    # store.external_store_soon: the backup's pipeline starts while boto3 is being imported.
    client = s3server.client()
    future: Future = Future()
    threading.Timer(0.3, future.set_result, [client]).start()
    data = os.urandom(11 * 1024 * 1024 + 5)
    with StreamingUpload(future, bucket, "later", initial_part_size=5 * 1024 * 1024) as upload:
        upload.write(data)
        upload.complete()
    assert client.get_object(Bucket=bucket, Key="later")["Body"].read() == data


def test_a_client_that_could_not_be_made_fails_the_upload_with_its_reason(s3server, bucket):
    future: Future = Future()
    future.set_exception(BackupError("could not create the S3 client: The config profile (nope) could not be found"))
    with pytest.raises(BackupError, match="config profile"), \
            StreamingUpload(future, bucket, "never", initial_part_size=5 * 1024 * 1024) as upload:
        upload.write(os.urandom(6 * 1024 * 1024))
    assert upload.state == "aborted"
    assert s3server.client().list_object_versions(Bucket=bucket).get("Versions", []) == []
