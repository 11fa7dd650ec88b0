"""restore_files.py: only a backup that decrypted and verified is uploaded, faithfully, and only what differs."""

from __future__ import annotations

import json
import os
import signal
import time
import zipfile
from pathlib import Path

import pytest

from tests.conftest import OLD_PASSPHRASE, PASSPHRASE, error_lines
from tests.files_helpers import MIB, Obj, download, expected_snapshot, fill, new_bucket, snapshot

SAMPLE = {
    "docs/a.txt": Obj(b"alpha\n", "text/plain", {"author": "ann"}),
    "docs/b.txt": Obj(b"bravo\n", "text/plain"),
    "img/c.png": Obj(os.urandom(5000), "image/png", {"w": "10", "h": "20"}),
    "img/d é.png": Obj(os.urandom(100), "image/png"),
    "zero": Obj(b""),
}


@pytest.fixture
def backed_up(run, s3server, bucket):
    """A source bucket with SAMPLE, backed up once; returns (source bucket, manifest)."""
    source = new_bucket(s3server)
    fill(s3server.client(), source, SAMPLE)
    done = run("backup_files.py", "--source-bucket", source, "--json", check=True)
    return source, json.loads(done.stdout)


def restore(run, *args: str, **kwargs):
    done = run("restore_files.py", "--json", *args, **kwargs)
    return (json.loads(done.stdout) if done.returncode == 0 else None), done


def test_restore_into_another_bucket_and_prefix(run, s3server, backed_up):
    client = s3server.client()
    target = new_bucket(s3server, "restored")
    result, done = restore(run, "--key", os.path.basename(backed_up[1]["key"]), "--target-bucket", target,
                           "--target-prefix", "restored/")
    assert done.returncode == 0, done.stderr
    assert (result["new"], result["uploaded"]) == (5, 5)
    assert snapshot(client, target) == expected_snapshot(SAMPLE, "restored/")


def test_identical_objects_are_skipped_and_changed_ones_replaced(run, s3server, backed_up):
    client = s3server.client()
    target = new_bucket(s3server, "restored")
    restore(run, "--latest", "--target-bucket", target, check=True)
    client.put_object(Bucket=target, Key="docs/a.txt", Body=b"edited by someone\n", ContentType="text/plain",
                      Metadata={"author": "ann"})
    client.put_object(Bucket=target, Key="docs/b.txt", Body=b"bravo\n", ContentType="text/html")  # same bytes, other type
    client.delete_object(Bucket=target, Key="zero")
    result, done = restore(run, "--latest", "--target-bucket", target)
    assert done.returncode == 0, done.stderr
    assert (result["new"], result["changed"], result["identical"], result["uploaded"]) == (1, 2, 2, 3)
    assert snapshot(client, target) == expected_snapshot(SAMPLE)


def test_identical_multipart_object_is_recognised(run, s3server, bucket):
    client = s3server.client()
    source = new_bucket(s3server)
    body = os.urandom(12 * MIB)
    fill(client, source, {"big": Obj(body, "application/x-big")})
    run("backup_files.py", "--source-bucket", source, check=True)
    target = new_bucket(s3server, "restored")
    # What an app's multipart uploader leaves: an ETag of MD5s of 5 MiB parts.
    upload = client.create_multipart_upload(Bucket=target, Key="big", ContentType="application/x-big")
    parts = []
    for number, start in enumerate(range(0, len(body), 5 * MIB), 1):
        answer = client.upload_part(Bucket=target, Key="big", UploadId=upload["UploadId"], PartNumber=number,
                                    Body=body[start:start + 5 * MIB])
        parts.append({"PartNumber": number, "ETag": answer["ETag"]})
    client.complete_multipart_upload(Bucket=target, Key="big", UploadId=upload["UploadId"], MultipartUpload={"Parts": parts})
    result, done = restore(run, "--latest", "--target-bucket", target)
    assert done.returncode == 0, done.stderr
    assert (result["identical"], result["uploaded"]) == (1, 0)


def test_dry_run_plans_and_uploads_nothing(run, s3server, backed_up):
    client = s3server.client()
    target = new_bucket(s3server, "restored")
    client.put_object(Bucket=target, Key="docs/a.txt", Body=b"alpha\n", ContentType="text/plain", Metadata={"author": "ann"})
    client.put_object(Bucket=target, Key="docs/b.txt", Body=b"old")
    before = snapshot(client, target)
    result, done = restore(run, "--latest", "--target-bucket", target, "--dry-run")
    assert done.returncode == 0, done.stderr
    plan = {item["key"]: item["action"] for item in result["plan"]}
    assert plan == {"docs/a.txt": "identical", "docs/b.txt": "changed", "img/c.png": "new", "img/d é.png": "new", "zero": "new"}
    assert result["uploaded"] == 0
    assert snapshot(client, target) == before
    human = run("restore_files.py", "--latest", "--target-bucket", target, "--dry-run", check=True).stdout
    assert "new       img/c.png" in human and "uploaded nothing" in human


def test_dry_run_counts_objects_in_the_target_that_are_not_in_the_backup(run, s3server, backed_up):
    """The restore never deletes: a dry run says how many objects under the target prefix (and
    --only) it would leave as they are."""
    client = s3server.client()
    target = new_bucket(s3server, "restored")
    fill(client, target, {**{f"img/extra-{i}.png": Obj(b"x") for i in range(3)}, "docs/a.txt": Obj(b"in the backup"),
                          "docs/new.txt": Obj(b"n"), "restored/docs/a.txt": Obj(b"a"), "restored/other": Obj(b"o")})
    result, done = restore(run, "--latest", "--target-bucket", target, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert result["target_objects_not_in_backup"] == 3 + 1 + 2
    result, _ = restore(run, "--latest", "--target-bucket", target, "--dry-run", "--target-prefix", "restored/")
    assert result["target_objects_not_in_backup"] == 1  # restored/docs/a.txt is docs/a.txt, in the backup
    human = run("restore_files.py", "--latest", "--target-bucket", target, "--dry-run", "--only", "img/*", check=True).stdout
    assert human.splitlines()[-1] == (f"3 objects under s3://{target}/ matching 'img/*' are not in this backup: "
                                      "a restore leaves them as they are (it never deletes)")
    assert snapshot(client, target)["docs/a.txt"][1] == len(b"in the backup")  # a dry run: nothing changed


def test_objects_not_in_the_backup_are_counted_page_by_page(s3server):
    from backupkit.files_restore import not_in_backup

    client = s3server.client()
    target = new_bucket(s3server, "restored")
    fill(client, target, {f"p/{i:02d}": Obj(b"x") for i in range(25)})
    in_backup = {f"{i:02d}" for i in range(0, 25, 3)}
    assert not_in_backup(client, target, "p/", None, in_backup, page_size=4) == 25 - len(in_backup)
    assert not_in_backup(client, target, "p/", "1*", in_backup, page_size=4) == 7  # 10..19, less 12, 15, 18


def test_a_target_flooded_with_keys_is_not_held_in_memory(s3server):
    """The app chooses what its bucket holds: a target with more keys than twice the backup's
    object count (at least 1,000) is not kept as a listing; every member is HEADed instead."""
    from backupkit.files_restore import keys_in_target

    client = s3server.client()
    target = new_bucket(s3server, "restored")
    fill(client, target, {f"p/{i:04d}": Obj(b"") for i in range(1001)} | {"elsewhere": Obj(b"")})
    assert keys_in_target(client, target, "p/", 10) is None  # ceiling 1,000: the listing stops
    listed = keys_in_target(client, target, "p/", 501)  # ceiling 1,002
    assert listed is not None and len(listed) == 1001 and "elsewhere" not in listed
    assert keys_in_target(client, target, "p/", "501") == listed  # not a count: a tenth of the ceiling


def test_only_restores_matching_keys(run, s3server, backed_up):
    client = s3server.client()
    target = new_bucket(s3server, "restored")
    result, done = restore(run, "--latest", "--target-bucket", target, "--only", "img/*")
    assert done.returncode == 0, done.stderr
    assert result["members"] == 2
    assert sorted(snapshot(client, target)) == ["img/c.png", "img/d é.png"]


def test_wrong_passphrase_uploads_nothing(run, s3server, backed_up):
    client = s3server.client()
    target = new_bucket(s3server, "restored")
    _, done = restore(run, "--latest", "--target-bucket", target, env={"EXTERNAL_BACKUP_ENCRYPTION_KEY": "not-the-passphrase"})
    assert done.returncode == 1
    assert "key_id" in done.stderr and len(error_lines(done.stderr)) == 1
    assert snapshot(client, target) == {}


def test_previous_passphrase_is_picked_by_key_id(run, s3server, backed_up):
    target = new_bucket(s3server, "restored")
    _, done = restore(run, "--latest", "--target-bucket", target,
                      env={"EXTERNAL_BACKUP_ENCRYPTION_KEY": OLD_PASSPHRASE, "EXTERNAL_BACKUP_ENCRYPTION_KEY_PREVIOUS": PASSPHRASE})
    assert done.returncode == 0, done.stderr
    assert len(snapshot(s3server.client(), target)) == 5


@pytest.mark.parametrize("with_manifest", [False, True])
def test_flipped_byte_uploads_nothing(run, s3server, bucket, backed_up, tmp_path, with_manifest):
    client = s3server.client()
    manifest = backed_up[1]
    path = download(client, bucket, manifest["key"], tmp_path / "files.zip.encrypted")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    if with_manifest:
        (tmp_path / "files.zip.encrypted.manifest.json").write_text(json.dumps(manifest))
    target = new_bucket(s3server, "restored")
    _, done = restore(run, "--file", str(path), "--target-bucket", target, env={"TMPDIR": str(tmp_path)})
    assert done.returncode == 1
    assert ("SHA-256" if with_manifest else "HMAC") in done.stderr
    assert snapshot(client, target) == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["files.zip.encrypted"] + (["files.zip.encrypted.manifest.json"] if with_manifest else []))


def test_file_encrypted_with_manifest_or_plain_zip(run, s3server, bucket, backed_up, tmp_path):
    client = s3server.client()
    manifest = backed_up[1]
    path = download(client, bucket, manifest["key"], tmp_path / "files.zip.encrypted")
    (tmp_path / "files.zip.encrypted.manifest.json").write_text(json.dumps(manifest))
    target = new_bucket(s3server, "restored")
    restore(run, "--file", str(path), "--target-bucket", target, check=True)
    assert snapshot(client, target) == expected_snapshot(SAMPLE)

    # An already decrypted ZIP (made with the stock CLI) restores too, without a passphrase.
    import subprocess

    subprocess.run([str(run.cwd / ".venv/bin/pyAesCrypt"), "-d", "-p", PASSPHRASE, str(path), "-o", str(tmp_path / "plain.zip")],
                   check=True, capture_output=True)
    other = new_bucket(s3server, "restored")
    restore(run, "--file", str(tmp_path / "plain.zip"), "--target-bucket", other, check=True,
            env={"EXTERNAL_BACKUP_ENCRYPTION_KEY": None})
    assert snapshot(client, other) == expected_snapshot(SAMPLE)

    # A damaged plain ZIP is refused before anything is uploaded.
    data = bytearray((tmp_path / "plain.zip").read_bytes())
    with zipfile.ZipFile(tmp_path / "plain.zip") as archive:
        info = archive.getinfo("img/c.png")
    data[info.header_offset + 200] ^= 0xFF
    (tmp_path / "bad.zip").write_bytes(bytes(data))
    third = new_bucket(s3server, "restored")
    _, done = restore(run, "--file", str(tmp_path / "bad.zip"), "--target-bucket", third)
    assert done.returncode == 1 and "CRC" in done.stderr
    assert snapshot(client, third) == {}


def test_latest_skips_an_incomplete_newer_backup(run, s3server, bucket, backed_up):
    client = s3server.client()
    client.put_object(Bucket=bucket, Key="production/files/2099-01-01--00-00-00.zip.encrypted", Body=b"AES\x02 broken")
    target = new_bucket(s3server, "restored")
    result, done = restore(run, "--latest", "--target-bucket", target)
    assert done.returncode == 0, done.stderr
    assert result["key"] == backed_up[1]["key"]
    assert "2099-01-01--00-00-00" in result["skipped"][0]["key"] and "no manifest" in result["skipped"][0]["reason"]


def plaintext_being_written(pid: int, directory: Path) -> list[tuple[str, int]]:
    """The files in the restore's own temporary directory under `directory` (where the decrypted
    archive goes; the download has its own) that process `pid` holds open, named or not, and
    their sizes."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
            if target.startswith(str(directory)) and "/restore-files-" in target:
                found.append((target, fd.stat().st_size))
        except OSError:
            continue
    return found


def wait_for_decryption(proc, tmp: Path, at_least: int = MIB) -> list[tuple[str, int]]:
    """Wait until the restore has written `at_least` bytes of the decrypted archive."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        held = plaintext_being_written(proc.pid, tmp)
        if any(size >= at_least for _, size in held):
            return held
        time.sleep(0.005)
    raise AssertionError("the restore never reached decryption")


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_remove_temporary_files(run, s3server, bucket, tmp_path, sig, code):
    client = s3server.client()
    source = new_bucket(s3server)
    fill(client, source, {"large": Obj(os.urandom(150 * MIB))})
    run("backup_files.py", "--source-bucket", source, check=True)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    target = new_bucket(s3server, "restored")
    proc = run.popen("restore_files.py", "--latest", "--target-bucket", target, env={"TMPDIR": str(tmp)})
    wait_for_decryption(proc, tmp)
    for directory in tmp.iterdir():
        assert directory.stat().st_mode & 0o777 == 0o700
        for child in directory.iterdir():
            assert child.stat().st_mode & 0o777 == 0o600
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert list(tmp.iterdir()) == []
    assert snapshot(client, target) == {}


def test_sigkill_mid_decryption_leaves_no_plaintext(run, s3server, bucket, tmp_path):
    """Nothing can clean up after SIGKILL: the decrypted archive lives in a file that has no name,
    so it goes with the process (the encrypted download may stay; it is ciphertext)."""
    client = s3server.client()
    source = new_bucket(s3server)
    marker = f"plaintext-marker-{os.getpid()}-{time.monotonic_ns()}".encode()
    fill(client, source, {"large": Obj(marker + os.urandom(64 * MIB) + marker)})
    run("backup_files.py", "--source-bucket", source, check=True)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    target = new_bucket(s3server, "restored")
    proc = run.popen("restore_files.py", "--latest", "--target-bucket", target, env={"TMPDIR": str(tmp)})
    held = wait_for_decryption(proc, tmp)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    left = [path for path in tmp.rglob("*") if path.is_file()]
    assert not [path for path in left if marker in path.read_bytes()], left
    assert not [path for path in left if "restore-files-" in str(path)], left
    assert all(name.endswith(" (deleted)") for name, _ in held), held  # it never had a name
    assert snapshot(client, target) == {}


def test_missing_target_bucket_fails_early(run, backed_up):
    _, done = restore(run, "--latest", "--target-bucket", "no-such-target-bucket", "--dry-run")
    assert done.returncode == 1 and "does not exist" in done.stderr


# -- recognising identical objects: the ETags S3 gives single and multipart uploads ----------------
def test_part_hasher_computes_the_etags_s3_gives():
    import hashlib

    from backupkit.files_restore import PartHasher, part_sizes

    data = os.urandom(12 * MIB + 5)
    whole = PartHasher(None)
    whole.update(data)
    assert whole.etag() == hashlib.md5(data, usedforsecurity=False).hexdigest()
    parts = [data[i:i + 5 * MIB] for i in range(0, len(data), 5 * MIB)]
    expected = hashlib.md5(b"".join(hashlib.md5(p, usedforsecurity=False).digest() for p in parts), usedforsecurity=False).hexdigest()
    chunked = PartHasher(5 * MIB)
    for i in range(0, len(data), 777_777):  # chunks that straddle part boundaries
        chunked.update(data[i:i + 777_777])
    assert chunked.etag() == f"{expected}-3"
    assert 5 * MIB in part_sizes(len(data), f"{expected}-3")
    assert part_sizes(len(data), "abc") == [None]


def test_an_interrupted_restore_says_how_many_objects_are_in_and_a_rerun_finishes(run, s3server, bucket):
    count = 300  # enough that the restore is still uploading when interrupted after 40
    client = s3server.client()
    source = new_bucket(s3server)
    fill(client, source, {f"docs/{i:04d}.bin": Obj(os.urandom(64 * 1024), "application/pdf") for i in range(count)})
    run("backup_files.py", "--source-bucket", source, check=True)
    target = new_bucket(s3server, "restored")
    proc = run.popen("restore_files.py", "--latest", "--target-bucket", target)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if client.list_objects_v2(Bucket=target, MaxKeys=50).get("KeyCount", 0) >= 40:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    [line] = error_lines(stderr)
    uploaded = int(line.split(f" of {count} objects were uploaded")[0].rsplit(" ", 1)[1])
    assert 40 <= uploaded < count and "run the same command again" in line
    in_target = sum(page.get("KeyCount", 0) for page in client.get_paginator("list_objects_v2").paginate(Bucket=target))
    assert in_target >= uploaded  # each counted object is complete (one PutObject); one more may have finished
    result, done = restore(run, "--latest", "--target-bucket", target)
    assert done.returncode == 0, done.stderr
    assert result["identical"] == in_target and result["uploaded"] == count - in_target
    assert len(snapshot(client, target)) == count


@pytest.mark.parametrize("listing", ["allowed", "denied"])
def test_a_listing_of_the_target_spares_the_heads_of_keys_it_does_not_hold(run, s3server, backed_up, listing):
    """The target is listed while the backup downloads: into an empty target no key is HEADed;
    where the listing is refused, every key is HEADed instead, with the same result. A rerun
    HEADs the keys the target now holds (to tell identical from changed)."""
    from tests.faultproxy import FaultProxy

    target = new_bucket(s3server, "restored")
    with FaultProxy(s3server.endpoint, seed=1) as proxy:
        if listing == "denied":
            proxy.add("ListObjects", fault="403-denied")
        via = {"AWS_ENDPOINT_URL": proxy.endpoint}
        result, done = restore(run, "--latest", "--target-bucket", target, env=via)
        assert done.returncode == 0, done.stderr
        assert (result["new"], result["uploaded"]) == (5, 5)
        assert proxy.count("HeadObject") == (0 if listing == "allowed" else 5)
        result, done = restore(run, "--latest", "--target-bucket", target, env=via)
        assert done.returncode == 0, done.stderr
        assert (result["identical"], result["uploaded"]) == (5, 0)
        assert proxy.count("HeadObject") == (5 if listing == "allowed" else 10)
    assert snapshot(s3server.client(), target) == expected_snapshot(SAMPLE)
