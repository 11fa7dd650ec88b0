"""backup_files.py: the source bucket, streamed into one encrypted ZIP, exactly and in bounded memory."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import time
import zipfile
from datetime import UTC, datetime

import pyAesCrypt
import pytest

from backupkit import archive_write as archive_module
from backupkit.archive_write import ArchiveWriter, EncryptingSink, archive_objects
from backupkit.attributes import decode_attributes
from backupkit.crypto import AESCRYPT_BUFFER, FullReader
from backupkit.objects import SourceObject
from tests.backup_factory import files_backup as backup
from tests.conftest import PASSPHRASE, error_lines, versions
from tests.faultproxy import FaultProxy
from tests.files_helpers import (
    MIB,
    Obj,
    awkward_objects,
    decrypt_bytes,
    download,
    expected_snapshot,
    fill,
    lower,
    manifests,
    new_bucket,
    snapshot,
)


def test_round_trip_of_awkward_content(run, s3server, bucket, tmp_path):
    client = s3server.client()
    source = new_bucket(s3server)
    objects = awkward_objects(small=1010, large_mib=13)  # past one listing page (1000 keys); several parts
    fill(client, source, objects)

    done = run("backup_files.py", "--source-bucket", source, "--json", check=True)
    manifest = json.loads(done.stdout)
    assert manifest["kind"] == "files" and manifest["encryption"] == "aescrypt-v2"
    assert manifest["source"] == {"bucket": source, "prefix": "", "object_count": len(objects),
                                  "total_bytes": sum(len(o.body) for o in objects.values()), "skipped": [],
                                  "skipped_count": 0}
    assert manifests(client, bucket) == [manifest]
    assert PASSPHRASE not in done.stdout + done.stderr
    assert f"of {len(objects)} objects" in done.stderr  # progress counts objects against the listing

    # The stock pyAesCrypt CLI decrypts it, and stock unzip accepts the archive.
    encrypted = download(client, bucket, manifest["key"], tmp_path / "files.zip.encrypted")
    assert encrypted.stat().st_size == manifest["encrypted_size"]
    subprocess.run([str(run.cwd / ".venv/bin/pyAesCrypt"), "-d", "-p", PASSPHRASE, str(encrypted),
                    "-o", str(tmp_path / "files.zip")], check=True, capture_output=True)
    plain = tmp_path / "files.zip"
    assert plain.stat().st_size == manifest["plaintext_size"]
    unzip = subprocess.run(["unzip", "-t", "-q", str(plain)], capture_output=True, text=True)
    assert unzip.returncode == 0, unzip.stdout + unzip.stderr
    with zipfile.ZipFile(plain) as archive:
        assert archive.testzip() is None
        infos = archive.infolist()
        assert sorted(i.filename for i in infos) == sorted(objects)
        for info in infos:
            assert info.compress_type == zipfile.ZIP_STORED
            attributes = decode_attributes(info.comment)
            assert attributes["ContentType"] == (objects[info.filename].content_type or "binary/octet-stream")
            assert attributes["Metadata"] == lower(objects[info.filename].metadata)
            assert archive.read(info) == objects[info.filename].body
            assert info.date_time[0] == datetime.now(UTC).year

    # And the restore brings back every byte, content type and metadata value.
    target = new_bucket(s3server, "restored")
    run("restore_files.py", "--latest", "--target-bucket", target, check=True)
    assert snapshot(client, target) == expected_snapshot(objects)


def test_prefix_limits_the_backup(run, s3server, bucket):
    client = s3server.client()
    source = new_bucket(s3server)
    fill(client, source, {"keep/a": Obj(b"a"), "keep/b/c": Obj(b"bc"), "other/x": Obj(b"x")})
    manifest = backup(run, source, "--source-prefix", "keep/")
    assert manifest["source"]["object_count"] == 2 and manifest["source"]["prefix"] == "keep/"
    body = client.get_object(Bucket=bucket, Key=manifest["key"])["Body"].read()
    with zipfile.ZipFile(io.BytesIO(decrypt_bytes(body, PASSPHRASE))) as archive:
        assert archive.namelist() == ["keep/a", "keep/b/c"]


def test_empty_source_gives_a_valid_empty_archive(run, s3server, bucket):
    client = s3server.client()
    source = new_bucket(s3server)
    manifest = backup(run, source)
    assert manifest["source"]["object_count"] == 0
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    body = client.get_object(Bucket=bucket, Key=manifest["key"])["Body"].read()
    with zipfile.ZipFile(io.BytesIO(decrypt_bytes(body, PASSPHRASE))) as archive:
        assert archive.namelist() == []


# -- the archive's mechanics, without S3 ---------------------------------------------------------
class ChoppyReader:
    """A pipe-like reader: returns fewer bytes than asked, at random."""

    def __init__(self, data: bytes):
        self._data = io.BytesIO(data)
        self._random = random.Random(7)

    def read(self, size: int = -1) -> bytes:
        return self._data.read(min(size, self._random.randint(1, 50_000)) if size and size > 0 else -1)


def test_short_reads_do_not_truncate_the_archive():
    data = os.urandom(5 * MIB + 123)
    encrypted = io.BytesIO()
    pyAesCrypt.encryptStream(FullReader(ChoppyReader(data)), encrypted, PASSPHRASE, AESCRYPT_BUFFER)
    assert decrypt_bytes(encrypted.getvalue(), PASSPHRASE) == data

    # The trap FullReader closes: without it the archive is silently cut, with a valid HMAC.
    truncated = io.BytesIO()
    pyAesCrypt.encryptStream(ChoppyReader(data), truncated, PASSPHRASE, AESCRYPT_BUFFER)
    assert len(decrypt_bytes(truncated.getvalue(), PASSPHRASE)) < len(data)


def write_archive(entries, passphrase: str = PASSPHRASE) -> bytes:
    out = io.BytesIO()
    with EncryptingSink(passphrase, out.write) as sink:
        writer = ArchiveWriter(sink)
        for name, body in entries:
            writer.add(name, len(body), datetime(2020, 5, 17, 10, 11, 12, tzinfo=UTC), b'{"Metadata":{}}', [body])
        writer.close()
        sink.close()
    return out.getvalue()


def test_more_than_65535_members_use_zip64(tmp_path):
    count = 70_000
    encrypted = write_archive((f"m/{i:06d}", b"%d" % i) for i in range(count))
    plain = tmp_path / "many.zip"
    plain.write_bytes(decrypt_bytes(encrypted, PASSPHRASE))
    with zipfile.ZipFile(plain) as archive:
        infos = archive.infolist()
        assert len(infos) == count
        assert archive.read(infos[-1]) == b"%d" % (count - 1)
        assert archive.testzip() is None
    unzip = subprocess.run(["unzip", "-t", "-q", str(plain)], capture_output=True, text=True)
    assert unzip.returncode == 0, unzip.stdout[-2000:] + unzip.stderr
    assert "70000 files" in subprocess.run(["unzip", "-l", str(plain)], capture_output=True, text=True).stdout


def test_zip64_members_and_old_dates(tmp_path, monkeypatch):
    monkeypatch.setattr(archive_module, "ZIP64_FROM", 0)  # every member as if it were > 1 GiB
    out = io.BytesIO()
    with EncryptingSink(PASSPHRASE, out.write) as sink:
        writer = ArchiveWriter(sink)
        writer.add("old.txt", 3, datetime(1970, 1, 1, tzinfo=UTC), b"", [b"old"])
        writer.add("big.bin", 2 * MIB, datetime(2026, 1, 2, 3, 4, 6, tzinfo=UTC), b"", [b"x" * MIB, b"y" * MIB])
        writer.close()
        sink.close()
    plain = tmp_path / "zip64.zip"
    plain.write_bytes(decrypt_bytes(out.getvalue(), PASSPHRASE))
    assert sink.plaintext.size == plain.stat().st_size
    with zipfile.ZipFile(plain) as archive:
        old, big = archive.infolist()
        assert old.date_time == (1980, 1, 1, 0, 0, 0)  # clamped: ZIP cannot say 1970
        assert big.date_time == (2026, 1, 2, 3, 4, 6)
        assert archive.read(big) == b"x" * MIB + b"y" * MIB
    assert subprocess.run(["unzip", "-t", "-q", str(plain)], capture_output=True).returncode == 0


def test_encryption_failure_reaches_the_writer():
    def broken_upload(data: bytes) -> None:
        raise RuntimeError("the upload broke")

    from backupkit.errors import BackupError

    with pytest.raises(BackupError, match="upload broke"), EncryptingSink(PASSPHRASE, broken_upload) as sink:
        for _ in range(64):
            sink.write(b"z" * MIB)
        sink.close()


# -- objects that vanish, sources that fail ------------------------------------------------------
def test_vanished_object_is_skipped_and_named(s3server):
    client = s3server.client()
    source = new_bucket(s3server)
    fill(client, source, {"here/1": Obj(b"one"), "here/2": Obj(b"two" * 2 * MIB)})
    now = datetime.now(UTC)
    listing = [SourceObject("here/1", 3, now), SourceObject("gone/small", 10, now),
               SourceObject("gone/large", 50 * MIB, now), SourceObject("here/2", 6 * MIB, now)]
    out = io.BytesIO()
    with EncryptingSink(PASSPHRASE, out.write) as sink:
        writer = ArchiveWriter(sink)
        result = archive_objects(client, source, listing, writer)
        writer.close()
        sink.close()
    assert result.skipped == [("gone/small", "deleted after the listing"), ("gone/large", "deleted after the listing")]
    assert (result.object_count, result.total_bytes) == (2, 3 + 6 * MIB)
    with zipfile.ZipFile(io.BytesIO(decrypt_bytes(out.getvalue(), PASSPHRASE))) as archive:
        assert archive.namelist() == ["here/1", "here/2"]


def test_vanished_object_is_named_in_the_manifest(run, s3server, bucket, monkeypatch):
    """backup_files.main in-process, its listing extended with a key that does not exist."""
    import backup_files

    client = s3server.client()
    source = new_bucket(s3server)
    fill(client, source, {"a": Obj(b"a"), "b": Obj(b"b")})
    real = backup_files.list_objects

    def listing_then_deletion(*args, **kwargs):
        listing = real(*args, **kwargs)
        listing.objects.insert(1, SourceObject("deleted-after-listing", 5, datetime.now(UTC)))
        return listing

    monkeypatch.setattr(backup_files, "list_objects", listing_then_deletion)
    for name, value in run.env.items():
        monkeypatch.setenv(name, value)
    assert backup_files.main(["--source-bucket", source, "--json"]) == 0
    (manifest,) = manifests(client, bucket)
    assert manifest["source"]["skipped"] == ["deleted-after-listing"]
    assert (manifest["source"]["skipped_count"], manifest["source"]["object_count"]) == (1, 2)


def test_source_gone_mid_run_fails_without_completing(run, s3server, bucket):
    client = s3server.client()
    source = new_bucket(s3server)
    fill(client, source, {f"obj/{i:03d}": Obj(os.urandom(2 * MIB)) for i in range(40)})
    with FaultProxy(s3server.endpoint) as proxy:
        proc = run.popen("backup_files.py", "--source-bucket", source, env={"SOURCE_AWS_ENDPOINT_URL": proxy.endpoint})
        deadline = time.monotonic() + 60
        while proxy.count("GetObject") < 5 and proc.poll() is None and time.monotonic() < deadline:  # ≥ 10 MiB in
            time.sleep(0.01)
        proxy.go_down()
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    assert len(error_lines(stderr)) == 1 and "s3://" + source in stderr, stderr
    assert versions(client, bucket) == []  # nothing completed, no manifest
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []  # aborted


def test_unreachable_source_fails(run, s3server, bucket):
    from dev.harness import free_port

    done = run("backup_files.py", "--source-bucket", "some-bucket",
               env={"SOURCE_AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}, timeout=120)
    assert done.returncode == 1
    assert "cannot reach the S3 endpoint" in done.stderr
    assert versions(s3server.client(), bucket) == []


def test_wrong_source_credentials_fail_without_leaking_them(run, s3server, bucket):
    secret = "source-Secret-Key-0042"
    source = new_bucket(s3server)
    done = run("backup_files.py", "--source-bucket", source,
               env={"SOURCE_AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "SOURCE_AWS_SECRET_ACCESS_KEY": secret,
                    "SOURCE_AWS_ENDPOINT_URL": s3server.endpoint})
    # moto accepts any credentials: the run succeeds, and the secret is nowhere in the output.
    assert secret not in done.stdout + done.stderr
    for manifest in manifests(s3server.client(), bucket):
        assert secret not in json.dumps(manifest)


# -- memory -------------------------------------------------------------------------------------
def add_objects(client, bucket: str, start: int, large: int, small: int) -> None:
    """`large` objects of 100 MiB (streamed) and `small` of 1 MiB (prefetched)."""
    block = os.urandom(MIB)
    objects = {f"large/{start + i:04d}.bin": Obj(block * 100) for i in range(large)}
    objects.update({f"small/{start + i:05d}.bin": Obj(block[i % 1000:] + block[: i % 1000]) for i in range(small)})
    fill(client, bucket, objects, workers=8)


@pytest.mark.slow
def test_memory_stays_bounded_and_flat(run, s3server, bucket, capsys):
    client = s3server.client()
    source = new_bucket(s3server)
    figures = []
    add_objects(client, source, 0, large=3, small=212)  # 512 MiB
    for label in ("0.5 GiB", "1 GiB"):
        began = time.monotonic()
        done, memory = run.measured("backup_files.py", "--source-bucket", source, "--json", interval=0.02, timeout=900)
        assert done.returncode == 0, done.stderr
        size = json.loads(done.stdout)["source"]["total_bytes"]
        figures.append((label, size, memory.peak_process_kib * 1024, time.monotonic() - began))
        if label == "0.5 GiB":
            add_objects(client, source, 1000, large=3, small=212)  # another 512 MiB
    with capsys.disabled():
        for label, size, rss, seconds in figures:
            print(f"\nbackup_files.py {label}: {size / MIB:.0f} MiB, peak RSS {rss / MIB:.1f} MiB, "
                  f"{seconds:.1f} s, {size / MIB / seconds:.1f} MiB/s")
    (_, small_size, small_rss, _), (_, big_size, big_rss, _) = figures
    assert big_size >= 1024 * MIB
    assert big_rss < 200 * MIB
    # Doubling the data adds no buffers: what differs is allocator noise (glibc arenas of the
    # fetch and upload threads), measured at 5-16 MiB, far from the 512 MiB added.
    assert big_rss < small_rss + 32 * MIB


@pytest.mark.slow
@pytest.mark.huge
@pytest.mark.timeout(2400)  # 12.3 min on an idle 2-core machine, nearly all of it moto's
def test_zip64_archive_of_more_than_65535_objects(run, s3server, bucket, tmp_path):
    client = s3server.client()
    source = new_bucket(s3server)
    count = 65_600
    fill(client, source, {f"k/{i // 1000:02d}/{i:06d}": Obj(b"%d" % i) for i in range(count)}, workers=8)
    began = time.monotonic()
    manifest = backup(run, source, timeout=1800)  # 65,600 GETs from moto: minutes, more on a busy machine
    print(f"backup_files.py of {count} objects: {time.monotonic() - began:.0f} s")
    assert manifest["source"]["object_count"] == count
    plain = tmp_path / "many.zip"
    plain.write_bytes(decrypt_bytes(client.get_object(Bucket=bucket, Key=manifest["key"])["Body"].read(), PASSPHRASE))
    with zipfile.ZipFile(plain) as archive:
        names = archive.namelist()
        assert len(names) == count and names[-1] == f"k/65/{count - 1:06d}"
        assert archive.read(names[-1]) == b"%d" % (count - 1)
    unzip = subprocess.run(["unzip", "-t", "-q", str(plain)], capture_output=True, text=True)
    assert unzip.returncode == 0, unzip.stdout[-2000:] + unzip.stderr


def test_objects_that_grew_after_the_listing_are_streamed_not_prefetched_whole():
    """The app lists 300 empty objects, then makes each 4 MiB before the backup reads them: held
    whole ahead of their turn they would take 1.2 GiB. Only what the listing budgeted is read
    whole; the rest is streamed in turn."""
    from backupkit.objects import fetch_in_order

    grown = 4 * MIB

    class Body:
        def __init__(self) -> None:
            self.read_whole = False

        def read(self) -> bytes:
            self.read_whole = True
            return b"x" * grown

        def iter_chunks(self, size: int):
            yield b"x" * grown

        def close(self) -> None:
            pass

    bodies: list[Body] = []

    class GrowingBucket:
        def get_object(self, Bucket: str, Key: str) -> dict:  # boto3's parameter names
            bodies.append(Body())
            return {"ContentLength": grown, "Body": bodies[-1]}

    listed = [SourceObject(f"k{i}", 0, datetime.now(UTC)) for i in range(300)]
    sizes = [sum(len(chunk) for chunk in fetched.chunks()) for fetched in fetch_in_order(GrowingBucket(), "app", listed)]
    assert sizes == [grown] * 300  # every byte still archived
    assert not any(body.read_whole for body in bodies)


# -- objects GetObject refuses ------------------------------------------------------------------
@pytest.mark.parametrize("fault, why", [("400-sse-c", "customer-provided key, SSE-C"), ("403-denied", "AccessDenied")])
def test_objects_getobject_refuses_are_skipped_named_and_reported(run, s3server, bucket, fault, why):
    """Issue 21, item 2: one object under SSE-C or a KMS key the job may not use used to abort
    every files backup (with a stray ZipFile.__del__ traceback). It is skipped and named like an
    archived object, the rest is backed up, and the daily check reports it."""
    client = s3server.client()
    source = new_bucket(s3server)
    objects = {"a.txt": Obj(b"a", "text/plain"), "locked/small.bin": Obj(b"s" * 100),
               "locked/large.bin": Obj(os.urandom(6 * MIB)), "z.txt": Obj(b"z", "text/plain")}  # large: streamed in turn
    fill(client, source, objects)
    with FaultProxy(s3server.endpoint) as proxy:
        proxy.add("GetObject", fault=fault, path="/locked/")
        done = run("backup_files.py", "--source-bucket", source, "--json", env={"SOURCE_AWS_ENDPOINT_URL": proxy.endpoint})
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr
    manifest = json.loads(done.stdout)
    assert manifest["source"]["skipped"] == ["locked/large.bin", "locked/small.bin"]  # listing order
    assert (manifest["source"]["skipped_count"], manifest["source"]["object_count"]) == (2, 2)
    for key in ("locked/small.bin", "locked/large.bin"):
        assert f"warning: s3://{source}/{key} is not in this backup: " in done.stderr and why in done.stderr

    done = run("verify_backup.py", "--kind", "files", "--latest", env={"GITHUB_ACTIONS": "true"})
    assert done.returncode == 0, done.stderr
    assert "2 objects of the source were skipped" in done.stdout and "::warning::the files backup" in done.stderr
    target = new_bucket(s3server, "restored")
    run("restore_files.py", "--latest", "--target-bucket", target, check=True)
    assert sorted(snapshot(client, target)) == ["a.txt", "z.txt"]


def test_a_backup_where_getobject_refuses_every_object_fails(run, s3server, bucket):
    """Refusals of every object are the job's access (a policy or key taken away), not one
    object's: the backup must not complete and look healthy."""
    client = s3server.client()
    source = new_bucket(s3server)
    fill(client, source, {f"k/{i}": Obj(b"x") for i in range(5)})
    with FaultProxy(s3server.endpoint) as proxy:
        proxy.add("GetObject", fault="403-denied")
        done = run("backup_files.py", "--source-bucket", source, env={"SOURCE_AWS_ENDPOINT_URL": proxy.endpoint})
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
    [line] = error_lines(done.stderr)
    assert "refused 5 objects" in line and "not one object's" in line, line
    assert versions(client, bucket) == []
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


@pytest.mark.parametrize("fault", ["403-key", "500", "cut"])
def test_a_job_wide_error_on_one_object_still_fails_with_one_error_line(run, s3server, bucket, fault):
    """Credentials refused, a server failing, or a body that breaks off after part of it went
    into the archive (6 MiB: streamed into its member) is not that object's problem: the run
    fails, aborts its upload, and says so in one line (no traceback after it)."""
    client = s3server.client()
    source = new_bucket(s3server)
    fill(client, source, {"a": Obj(b"a"), "b/broken": Obj(os.urandom(6 * MIB)), "c": Obj(b"c")})
    with FaultProxy(s3server.endpoint) as proxy:
        proxy.add("GetObject", fault=fault, path="/b/broken")
        done = run("backup_files.py", "--source-bucket", source, env={"SOURCE_AWS_ENDPOINT_URL": proxy.endpoint})
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
    [line] = error_lines(done.stderr)
    assert "b/broken" in line
    assert versions(client, bucket) == []


def test_refusals_are_told_from_job_wide_errors():
    from backupkit.objects import refusal

    assert "SSE-C" in refusal("InvalidRequest")
    assert "AccessDenied" in refusal("AccessDenied")
    assert "KMS.DisabledException" in refusal("KMS.DisabledException")
    for job_wide in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "NoSuchBucket", "InternalError", None):
        assert refusal(job_wide) is None


def test_metadata_s3_did_not_return_is_said(capsys):
    """S3 leaves out metadata entries with unprintable characters and counts them in
    x-amz-missing-meta: the backup cannot hold them, and says so rather than claim a faithful copy."""
    class Body:
        def read(self) -> bytes:
            return b"x"

        def close(self) -> None:
            pass

    class Bucket:
        def get_object(self, Bucket: str, Key: str) -> dict:  # boto3's parameter names
            return {"ContentLength": 1, "Body": Body(), "Metadata": {"kept": "v"}, "MissingMeta": 2}

    writer = ArchiveWriter(io.BytesIO())
    result = archive_objects(Bucket(), "app", [SourceObject("doc.pdf", 1, datetime.now(UTC))], writer)
    assert result.object_count == 1
    assert "s3://app/doc.pdf: S3 did not return 2 of its metadata entries" in capsys.readouterr().err
