"""Faults, as they happen at 3 a.m.: a flaky or vanished S3 endpoint, a dying pg_dump, a missing
openssl, a cancelled job, corrupt or wrongly-keyed backups, a restore that fails half-way, bad
input. Every run either succeeds with byte-identical data or exits non-zero with one `error:` line,
no completed object, no manifest, nothing committed and no process left behind.

S3 faults come from tests/faultproxy.py (a seeded proxy in front of moto, via AWS_ENDPOINT_URL).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from backupkit.compression import ZSTD_MAGIC
from dev.harness import table_fingerprint
from tests.backup_factory import at, database_backup, iso
from tests.conftest import PASSPHRASE, Runner, base_env, one_error, public_tables, versions
from tests.faultproxy import FaultProxy
from tests.procwatch import ProcWatch

BIG_DB = "bigdata"
MARKER = "plaintext-marker-7f3a9c"
BOUND = 120  # seconds: any failure must end within this


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def big_db(pg):
    """A database whose dump (~60 MB, ~46 MB compressed: its payload is base64 of hash output)
    spans several upload parts (6 MiB), compressed or not; each row carries MARKER."""
    pg.create_database(BIG_DB)
    pg.psql(
        "CREATE TABLE big (id int PRIMARY KEY, payload text NOT NULL);"
        f"INSERT INTO big SELECT i, '{MARKER} ' || encode(sha512(i::text::bytea) || sha512((-i)::text::bytea) "
        "|| sha512((i * 7)::text::bytea), 'base64') FROM generate_series(1, 220000) AS i;",
        BIG_DB,
    )
    return BIG_DB


@pytest.fixture
def proxy(s3server):
    with FaultProxy(s3server.endpoint, seed=20261129) as p:
        yield p


@pytest.fixture
def via(proxy):
    """Environment that sends the scripts' S3 traffic through the proxy."""
    return {"AWS_ENDPOINT_URL": proxy.endpoint}


@pytest.fixture
def target(pg):
    """A restore target that already holds data (a `keep_me` table): a failed restore with
    --replace must leave it exactly as it was."""
    name = f"target_{os.getpid()}_{time.monotonic_ns()}"
    pg.create_database(name)
    pg.psql("CREATE TABLE keep_me (id int PRIMARY KEY, note text); INSERT INTO keep_me VALUES (1, 'before the restore');", name)
    yield name
    pg.drop_database(name)


def unchanged(pg, database: str) -> None:
    """The target is as the `target` fixture left it: keep_me intact, nothing from the backup."""
    tables = pg.psql("SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables WHERE schemaname = 'public'", database)
    assert tables == "keep_me"
    assert pg.psql("SELECT note FROM keep_me", database) == "before the restore"


def nothing_stored(s3server, bucket: str) -> None:
    """No object version at all: no completed backup, no manifest."""
    assert [v["Key"] for v in versions(s3server.client(), bucket)] == []


def no_uploads_left(s3server, bucket: str) -> None:
    assert s3server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def timed(run, *args, **kwargs):
    began = time.monotonic()
    done = run(*args, timeout=BOUND + 60, **kwargs)
    return done, time.monotonic() - began


def test_readme_states_the_retry_policy():
    from backupkit import s3

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert s3.MAX_ATTEMPTS == 5
    assert "standard retry mode, 5 attempts per request" in readme
    assert "BACKUP_S3_READ_TIMEOUT" in readme


# -- transient S3 faults: the backup completes and restores byte-identical ------------------------
def test_backup_and_restore_survive_transient_s3_faults(run, pg, big_db, proxy, via, s3server, bucket, scratch_db):
    proxy.add("CreateMultipartUpload", fault="500", limit=1)
    proxy.add("UploadPart", fault="503", after=1, limit=1)  # at least one, whatever the threads' order
    proxy.add("UploadPart", fault="503", rate=0.2, per_request=2)
    proxy.add("UploadPart", fault="reset", after=2, limit=2, per_request=1)
    proxy.add("UploadPart", fault="stall", after=4, limit=1, per_request=1, seconds=20)
    proxy.add("CompleteMultipartUpload", fault="503", limit=1)
    proxy.add("PutObject", fault="500", limit=1)  # the manifest
    manifest = database_backup(run, pg=pg, sample_db=big_db, **via, BACKUP_S3_READ_TIMEOUT="2")

    injected = proxy.faults()
    assert injected["503"] >= 2 and injected["500"] == 2 and injected["reset"] == 2 and injected["stall"] == 1, injected
    assert proxy.count("UploadPart", "forwarded 200") >= 5  # several parts: a real multipart upload
    stored = s3server.client().get_object(Bucket=bucket, Key=manifest["key"], VersionId=manifest["version_id"])["Body"].read()
    assert len(stored) == manifest["encrypted_size"] > 5 * 8 * 1024 * 1024 - 8 * 1024 * 1024
    assert hashlib.sha256(stored).hexdigest() == manifest["encrypted_sha256"]
    assert len(versions(s3server.client(), bucket)) == 3  # the backup, its profile and its manifest, once each

    proxy.clear()
    proxy.add("ListObjectVersions", fault="500", limit=1)
    proxy.add("GetObject", fault="503", rate=0.5, per_request=1)
    proxy.add("GetObject", fault="reset", limit=1)
    run("restore_database.py", "--latest", "--target-database-url", pg.url(scratch_db), env=via, check=True)
    assert proxy.faults()["503"] >= 1
    assert table_fingerprint(pg, scratch_db, "big") == table_fingerprint(pg, big_db, "big")


# -- permanent S3 faults: exit 1, quickly, one error line, nothing completed ----------------------
PERMANENT = [
    pytest.param(["UploadPart"], "503", {}, ("SlowDown",), True, id="upload-part-always-503", marks=pytest.mark.slow),
    pytest.param(["CompleteMultipartUpload"], "500", {}, ("complete the multipart upload", "InternalError"), True,
                 id="complete-always-fails"),
    pytest.param(["UploadPart"], "stall", {"BACKUP_S3_READ_TIMEOUT": "1"}, ("timed out",), True, id="upload-part-stalls",
                 marks=pytest.mark.slow),
    pytest.param(["*"], "403-key", {}, ("access key",), False, id="wrong-credentials"),
    pytest.param(["*"], "403-signature", {}, ("secret key",), False, id="wrong-secret-key"),
]


@pytest.mark.parametrize(("operations", "fault", "env", "words", "abortable"), PERMANENT)
def test_backup_fails_cleanly_on_permanent_s3_fault(run, pg, big_db, proxy, via, s3server, bucket,
                                                     operations, fault, env, words, abortable):
    proxy.add(*operations, fault=fault, seconds=15)
    done, elapsed = timed(run, "backup_database.py", env={"DATABASE_URL": pg.url(big_db), **via, **env})
    assert done.returncode == 1, done.stderr
    assert elapsed < BOUND
    one_error(done, *words)
    nothing_stored(s3server, bucket)
    if abortable:
        no_uploads_left(s3server, bucket)  # the failed upload was aborted, not left for the lifecycle rule


def test_backup_fails_cleanly_when_the_endpoint_goes_away_mid_upload(run, pg, big_db, proxy, via, s3server, bucket):
    proxy.add("UploadPart", fault="down", after=1)
    done, elapsed = timed(run, "backup_database.py", env={"DATABASE_URL": pg.url(big_db), **via})
    assert done.returncode == 1
    assert elapsed < BOUND
    one_error(done, "cannot reach the S3 endpoint", "5 attempts")
    assert "could not abort" in done.stderr  # said, with what happens to the leftover parts
    nothing_stored(s3server, bucket)


def test_backup_into_a_missing_bucket(run, pg, sample_db, s3server):
    done, elapsed = timed(run, "backup_database.py", env={"DATABASE_URL": pg.url(sample_db), "BACKUP_BUCKET": "no-such-bucket-here"})
    assert done.returncode == 1 and elapsed < BOUND
    one_error(done, "does not exist", "no-such-bucket-here")
    assert "no-such-bucket-here" not in [b["Name"] for b in s3server.client().list_buckets()["Buckets"]]


@pytest.mark.parametrize(("script", "operation", "words"), [
    pytest.param("list_backups.py", "ListObjectVersions", ("AccessDenied", "IAM policy"), id="read"),
    pytest.param("backup_database.py", "PutObject", ("AccessDenied", "write_only"), id="write"),
])
def test_access_denied_names_the_credentials_used_and_the_bucket_name(run, pg, sample_db, proxy, via, tmp_path, script, operation, words):
    """A 403 names the access key id S3 refused (not a secret) and where it came from, and says a
    wrong bucket name looks the same (a bucket of another account answers AccessDenied); with an
    AWS_PROFILE that the keys override, it says the profile was ignored."""
    proxy.add(operation, fault="403-denied")
    done = run(script, env={**via, "DATABASE_URL": pg.url(sample_db)})
    assert done.returncode == 1
    line = one_error(done, *words, "bucket name", "access key id testing (from AWS_ACCESS_KEY_ID)")
    assert "AWS_PROFILE" not in line
    config = tmp_path / "aws-config"
    config.write_text("[profile restorer]\nregion = us-east-1\n")
    done = run(script, env={**via, "DATABASE_URL": pg.url(sample_db), "AWS_CONFIG_FILE": str(config), "AWS_PROFILE": "restorer"})
    one_error(done, "access key id testing", "AWS_PROFILE is ignored while AWS_ACCESS_KEY_ID is set: unset the keys")
    assert "warning: AWS_PROFILE is set (restorer) but so is AWS_ACCESS_KEY_ID" in done.stderr


@pytest.mark.parametrize("script, args", [
    pytest.param("list_backups.py", [], id="list_backups"),
    pytest.param("restore_database.py", ["--latest", "--target-database-url", "postgresql://u@127.0.0.1:1/x"], id="restore_database"),
])
def test_readers_fail_cleanly_when_s3_keeps_failing(run, proxy, via, pg, script, args):
    proxy.add("*", fault="500")
    url_env = {"TARGET_DATABASE_URL": None}
    if script == "restore_database.py":
        args = ["--latest", "--target-database-url", pg.url("postgres")]
        url_env = {}
    done, elapsed = timed(run, script, *args, env={**via, **url_env})
    assert done.returncode == 1 and elapsed < BOUND
    one_error(done, "InternalError")


# -- process faults during a backup ---------------------------------------------------------------
def start_backup(run, pg, database: str, env: dict) -> tuple[subprocess.Popen, ProcWatch]:
    proc = run.popen("backup_database.py", env={"DATABASE_URL": pg.url(database), **env})
    return proc, ProcWatch(proc.pid).start()


def finish(proc: subprocess.Popen, watch: ProcWatch, timeout: float = BOUND) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=timeout)
    watch.stop()
    time.sleep(0.2)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def assert_no_orphans(watch: ProcWatch) -> None:
    deadline = time.monotonic() + 10
    while watch.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert watch.alive() == []
    assert {s.name for s in watch.seen} >= {"pg_dump", "openssl"}


def test_pg_dump_killed_mid_dump(run, pg, big_db, proxy, via, s3server, bucket, tmp_path):
    # Holding CreateMultipartUpload stalls the pipe, so pg_dump is caught mid-COPY.
    proxy.add("CreateMultipartUpload", fault="delay", seconds=3)
    proc, watch = start_backup(run, pg, big_db, {**via, "TMPDIR": str(tmp_path)})
    assert proxy.seen("CreateMultipartUpload").wait(60)
    dump = watch.wait_for("pg_dump")
    assert dump is not None
    dump.send_signal(signal.SIGKILL)
    done = finish(proc, watch)
    assert done.returncode == 1
    one_error(done, "pg_dump failed", "killed by signal 9")
    nothing_stored(s3server, bucket)
    no_uploads_left(s3server, bucket)
    assert_no_orphans(watch)
    assert list(tmp_path.iterdir()) == []


def test_pg_dump_backend_terminated_mid_dump(run, pg, big_db, proxy, via, s3server, bucket):
    proxy.add("CreateMultipartUpload", fault="delay", seconds=3)
    proc, watch = start_backup(run, pg, big_db, via)
    assert proxy.seen("CreateMultipartUpload").wait(60)
    killed = pg.psql(f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                     f"WHERE application_name = 'pg_dump' AND datname = '{big_db}'")
    assert killed == "1"
    done = finish(proc, watch)
    assert done.returncode == 1
    one_error(done, "pg_dump failed")
    nothing_stored(s3server, bucket)
    assert_no_orphans(watch)


@pytest.mark.parametrize("sig, code, word", [
    pytest.param(signal.SIGTERM, 143, "SIGTERM", id="SIGTERM"),
    pytest.param(signal.SIGINT, 130, "SIGINT", id="SIGINT"),
])
def test_backup_signalled_mid_upload(run, pg, big_db, proxy, via, s3server, bucket, tmp_path, sig, code, word):
    proxy.add("UploadPart", fault="delay", seconds=1)
    proc, watch = start_backup(run, pg, big_db, {**via, "TMPDIR": str(tmp_path)})
    assert proxy.seen("UploadPart").wait(60)
    time.sleep(0.3)
    proc.send_signal(sig)
    done = finish(proc, watch)
    assert done.returncode == code, done.stderr
    one_error(done, word, "nothing was completed")
    nothing_stored(s3server, bucket)
    no_uploads_left(s3server, bucket)
    assert_no_orphans(watch)
    assert list(tmp_path.iterdir()) == []


# -- openssl missing ------------------------------------------------------------------------------
@pytest.fixture
def no_openssl_path(tmp_path):
    """A PATH with neither openssl nor the PostgreSQL clients (those come by absolute path)."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    return str(empty)


def test_backup_without_openssl(run, pg, sample_db, s3server, bucket, no_openssl_path):
    proc, watch = start_backup(run, pg, sample_db, {"PATH": no_openssl_path, "BACKUP_COMPRESSION": "none"})
    done = finish(proc, watch)
    assert done.returncode == 1
    one_error(done, "openssl", "not found")
    nothing_stored(s3server, bucket)
    deadline = time.monotonic() + 10
    while watch.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert watch.alive() == []


def test_s3_client_failing_after_the_dump_started_stops_every_stage(run, pg, big_db, s3server, bucket, tmp_path):
    """The S3 client is made while the dump already runs (store.external_store_soon): when it cannot
    be made, that is the one error, and pg_dump, zstd and openssl are stopped, not left behind."""
    config = tmp_path / "aws-config"
    config.write_text("")
    proc, watch = start_backup(run, pg, big_db, {"AWS_CONFIG_FILE": str(config), "AWS_PROFILE": "no-such-profile"})
    done = finish(proc, watch)
    assert done.returncode == 1
    one_error(done, "could not create the S3 client", "no-such-profile")
    nothing_stored(s3server, bucket)
    assert_no_orphans(watch)


def test_zstd_missing_is_one_clear_error_naming_the_package(run, pg, sample_db, scratch_db, s3server, bucket, tmp_path):
    """Backing up compressed, restoring or decrypting a compressed backup without the zstd command:
    one error line that names the package; nothing stored, nothing committed, no output left."""
    missing = {"ZSTD": "/nonexistent/zstd"}
    done = run("backup_database.py", env={"DATABASE_URL": pg.url(sample_db), **missing})
    assert done.returncode == 1
    one_error(done, "zstd", "not found", "apt-get install zstd", "--compression none")
    nothing_stored(s3server, bucket)

    manifest = database_backup(run, pg=pg, sample_db=sample_db)
    done = run("restore_database.py", "--latest", "--target-database-url", pg.url(scratch_db), env=missing)
    assert done.returncode == 1
    one_error(done, "zstd", "not found", "apt-get install zstd")
    assert public_tables(pg, scratch_db) == "0"

    encrypted = download(s3server, bucket, manifest, tmp_path / "backup.sql.zst.encrypted", with_manifest=True)
    openssl_only = tmp_path / "openssl-only"
    openssl_only.mkdir()
    (openssl_only / "openssl").symlink_to(shutil.which("openssl"))
    done = run("./decrypt.py", "-i", str(encrypted), "-o", str(tmp_path / "out.sql"), env={"PATH": str(openssl_only)})
    assert done.returncode == 1
    one_error(done, "zstd", "not found", "apt-get install zstd")
    assert not (tmp_path / "out.sql").exists()


def test_zstd_dying_mid_stream_fails_the_backup_and_the_restore_promptly(run, pg, big_db, scratch_db, s3server, bucket, tmp_path):
    """A zstd that stops after 64 KiB (killed, out of memory): the stages before it must not stay
    blocked on a full pipe; the run ends within BOUND with zstd named as the cause."""
    dying = tmp_path / "zstd"
    dying.write_text('#!/bin/sh\nhead -c 65536 >/dev/null\necho "zstd: simulated crash" >&2\nexit 3\n')
    dying.chmod(0o755)
    done = run("backup_database.py", env={"DATABASE_URL": pg.url(big_db), "ZSTD": str(dying)}, timeout=BOUND)
    assert done.returncode == 1
    one_error(done, "zstd", "simulated crash")
    nothing_stored(s3server, bucket)

    manifest = database_backup(run, pg=pg, sample_db=big_db)
    done = run("restore_database.py", "--latest", "--target-database-url", pg.url(scratch_db), env={"ZSTD": str(dying)},
               timeout=BOUND)
    assert done.returncode == 1
    one_error(done, "zstd", "simulated crash")
    assert public_tables(pg, scratch_db) == "0"

    encrypted = download(s3server, bucket, manifest, tmp_path / "backup.sql.zst.encrypted", with_manifest=True)
    done = run("./decrypt.py", "-i", str(encrypted), "-o", str(tmp_path / "out.sql"), env={"ZSTD": str(dying)}, timeout=BOUND)
    assert done.returncode == 1
    one_error(done, "zstd", "simulated crash")
    assert not (tmp_path / "out.sql").exists()


def test_restore_and_decrypt_without_openssl(run, pg, sample_db, scratch_db, s3server, bucket, no_openssl_path, tmp_path):
    manifest = database_backup(run, pg=pg, sample_db=sample_db)
    done = run("restore_database.py", "--latest", "--target-database-url", pg.url(scratch_db), env={"PATH": no_openssl_path})
    assert done.returncode == 1
    one_error(done, "openssl", "not found")
    assert public_tables(pg, scratch_db) == "0"

    encrypted = download(s3server, bucket, manifest, tmp_path / "backup.sql.encrypted")
    done = run("./decrypt.py", "-i", str(encrypted), "-o", str(tmp_path / "out.sql"), env={"PATH": no_openssl_path})
    assert done.returncode == 1
    one_error(done, "openssl", "not found")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backup.sql.encrypted", "empty-bin"]


def download(s3server, bucket: str, manifest: dict, path: Path, with_manifest: bool = False) -> Path:
    body = s3server.client().get_object(Bucket=bucket, Key=manifest["key"], VersionId=manifest["version_id"])["Body"].read()
    path.write_bytes(body)
    if with_manifest:
        Path(f"{path}.manifest.json").write_text(json.dumps(manifest))
    return path


# -- restore faults: corrupt, truncated, wrongly keyed → nothing committed ------------------------
OPENSSL = ["openssl", "enc", "-aes-256-cbc", "-pbkdf2", "-md", "sha256", "-iter", "10000", "-pass", "env:P"]


def openssl(data: bytes, passphrase: str, decrypt: bool = False) -> bytes:
    argv = [*OPENSSL[:2], "-d", *OPENSSL[2:]] if decrypt else OPENSSL
    return subprocess.run(argv, input=data, capture_output=True, check=True, env={**os.environ, "P": passphrase}).stdout


def flip_middle_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x40]) + data[middle + 1:]


def zstd(data: bytes, decompress: bool = False) -> bytes:
    return subprocess.run(["zstd", "-d" if decompress else "-1", "-q", "-c"], input=data, capture_output=True, check=True).stdout


def cut_at_statement_boundary(data: bytes, passphrase: str) -> bytes:
    """A valid encryption of the dump (compressed again if it was) cut right after a complete COPY
    block: psql alone would commit it happily, only the missing trailer tells."""
    plaintext = openssl(data, passphrase, decrypt=True)
    compressed = plaintext.startswith(ZSTD_MAGIC)
    sql = zstd(plaintext, decompress=True) if compressed else plaintext
    end = sql.rindex(b"\n\\.\n") + 4
    assert b"database dump complete" not in sql[:end]
    return openssl(zstd(sql[:end]) if compressed else sql[:end], passphrase)


BROKEN_FILES = [
    # (id, make(data) -> bytes, manifest beside the file? (None: untouched, "match": hashes of the
    #  broken bytes, as if the manifest had been written for them), passphrase, words)
    # (compressed, zstd's own checksum or decoder refuses it first; plain, the SHA-256 of the SQL)
    pytest.param(flip_middle_byte, "match", PASSPHRASE, ("corrupted",), id="corrupt-byte-manifest-agrees-on-ciphertext"),
    pytest.param(flip_middle_byte, "original", PASSPHRASE, ("SHA-256", "corrupted"), id="corrupt-byte-with-manifest"),
    pytest.param(lambda d: d[: len(d) // 2 // 16 * 16], None, PASSPHRASE, (), id="truncated-no-manifest"),
    pytest.param(lambda d: d[: len(d) - 1000], "original", PASSPHRASE, ("truncated",), id="truncated-with-manifest"),
    pytest.param(lambda d: cut_at_statement_boundary(d, PASSPHRASE), None, PASSPHRASE, ("trailer",),
                 id="cut-at-statement-boundary-reencrypted"),
    pytest.param(lambda d: d, None, "the-wrong-passphrase-123", ("wrong passphrase",), id="wrong-passphrase-no-manifest"),
    pytest.param(lambda d: d, "original", "the-wrong-passphrase-123", ("key_id",), id="wrong-passphrase-with-manifest"),
]


@pytest.fixture(scope="module", params=["zstd", "none"])
def sample_backup(s3server, pg, sample_db, tmp_path_factory, request):
    """One backup of the sample database, compressed or not, as a local file and its manifest
    (made once: restoring with --file needs no bucket)."""
    bucket = s3server.create_bucket(f"ext-backups-files-{os.getpid()}-{request.param}")
    env = {**base_env(), **s3server.env(), "BACKUP_BUCKET": bucket, "BACKUP_ENVIRONMENT": "production",
           "EXTERNAL_BACKUP_ENCRYPTION_KEY": PASSPHRASE, "PG_DUMP": str(pg.bin / "pg_dump"), "BACKUP_COMPRESSION": request.param}
    manifest = database_backup(Runner(env), pg=pg, sample_db=sample_db)
    return download(s3server, bucket, manifest, tmp_path_factory.mktemp("sample-backup") / "backup.sql.encrypted"), manifest


@pytest.mark.parametrize(("make", "manifest_mode", "passphrase", "words"), BROKEN_FILES)
def test_restore_of_a_broken_file_commits_nothing(run, pg, sample_backup, target, tmp_path, make, manifest_mode, passphrase, words):
    original, manifest = sample_backup
    broken = make(original.read_bytes())
    path = tmp_path / "backup.sql.encrypted"
    path.write_bytes(broken)
    if manifest_mode == "match":
        manifest = {**manifest, "encrypted_size": len(broken), "encrypted_sha256": hashlib.sha256(broken).hexdigest()}
    if manifest_mode:
        Path(f"{path}.manifest.json").write_text(json.dumps(manifest))
    without = [] if manifest_mode else ["--without-manifest"]
    done = run("restore_database.py", "--file", str(path), *without, "--replace", "--target-database-url", pg.url(target),
               env={"EXTERNAL_BACKUP_ENCRYPTION_KEY": passphrase})
    assert done.returncode == 1, done.stderr
    one_error(done, *words)
    unchanged(pg, target)


def put_damaged_version(client, bucket: str, good: dict, damage) -> str:
    """A new version of a genuine backup's key holding its bytes passed through `damage`, and a
    manifest for that version that is the genuine one's (so only the bytes disagree); its id."""
    body = client.get_object(Bucket=bucket, Key=good["key"], VersionId=good["version_id"])["Body"].read()
    bad_version = client.put_object(Bucket=bucket, Key=good["key"], Body=damage(body))["VersionId"]
    client.put_object(Bucket=bucket, Key=good["key"] + ".manifest.json", Body=json.dumps({**good, "version_id": bad_version}).encode())
    return bad_version


def test_restore_of_a_corrupt_version_in_the_bucket(run, pg, sample_db, s3server, bucket, target):
    """A newer version whose bytes do not match its manifest: --key refuses it, --latest skips it."""
    good = database_backup(run, pg=pg, sample_db=sample_db)
    bad_version = put_damaged_version(s3server.client(), bucket, good, flip_middle_byte)

    done = run("restore_database.py", "--key", good["key"], "--version-id", bad_version, "--replace",
               "--target-database-url", pg.url(target))
    assert done.returncode == 1
    one_error(done, "SHA-256")
    unchanged(pg, target)

    done = run("restore_database.py", "--latest", "--replace", "--target-database-url", pg.url(target), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["version_id"] == good["version_id"]
    assert any(s["version_id"] == bad_version and s["problem"] == "corrupt" for s in result["skipped"])
    assert table_fingerprint(pg, target, "applications") == table_fingerprint(pg, sample_db, "applications")


@pytest.mark.parametrize("where", [16, 0.5, -1], ids=["first-block", "middle", "last-byte"])
def test_restore_streamed_from_the_bucket_commits_nothing_with_a_corrupt_byte_anywhere(run, pg, sample_db, s3server,
                                                                                       bucket, target, where):
    """The backup streams into psql as it downloads, so its ciphertext's SHA-256 is known only at
    its end: one flipped byte early (zstd fails at once), in the middle, or in openssl's last block
    (its padding) fails the restore, named as a corrupted download, and nothing is committed."""
    good = database_backup(run, pg=pg, sample_db=sample_db)

    def flip(data: bytes) -> bytes:
        at = int(len(data) * where) if isinstance(where, float) else where % len(data)
        return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]

    bad_version = put_damaged_version(s3server.client(), bucket, good, flip)
    done = run("restore_database.py", "--key", good["key"], "--version-id", bad_version, "--replace",
               "--target-database-url", pg.url(target))
    assert done.returncode == 1
    one_error(done, "the downloaded object does not match the manifest's SHA-256")
    unchanged(pg, target)


def files_backup_of(run, s3server, objects: dict) -> tuple[str, dict]:
    from tests.files_helpers import fill, new_bucket

    source = new_bucket(s3server)
    fill(s3server.client(), source, objects)
    return source, json.loads(run("backup_files.py", "--source-bucket", source, "--json", check=True).stdout)


FILES = {f"docs/{i:03d}.bin": os.urandom(20_000 + i) for i in range(40)}


@pytest.mark.parametrize("where", [16, 0.5, -1], ids=["first-block", "middle", "last-byte"])
def test_files_restore_streamed_uploads_nothing_with_a_corrupt_byte_anywhere(run, s3server, bucket, where):
    """The files backup decrypts as it downloads too: one flipped byte in its header, in the
    middle or in the last byte (the HMAC) fails the restore, named as a corrupted download, before
    the first upload."""
    from tests.files_helpers import Obj, new_bucket

    _, good = files_backup_of(run, s3server, {k: Obj(v) for k, v in FILES.items()})

    def flip(data: bytes) -> bytes:
        at = int(len(data) * where) if isinstance(where, float) else where % len(data)
        return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]

    bad_version = put_damaged_version(s3server.client(), bucket, good, flip)
    target = new_bucket(s3server, "restored")
    done = run("restore_files.py", "--key", good["key"].rsplit("/", 1)[1], "--version-id", bad_version, "--target-bucket", target)
    assert done.returncode == 1
    one_error(done, "the downloaded object does not match the manifest's SHA-256")
    assert s3server.client().list_objects_v2(Bucket=target).get("KeyCount") == 0


def test_files_restore_resumes_a_download_that_broke_off(run, s3server, bucket, proxy, via, tmp_path):
    """A files backup's GET cut half-way resumes from the byte it reached (never from the start),
    and every object is restored byte for byte; nothing is left in TMPDIR but the plaintext's
    nameless file, gone with the process."""
    from tests.files_helpers import Obj, expected_snapshot, new_bucket, snapshot

    objects = {k: Obj(v) for k, v in FILES.items()}
    files_backup_of(run, s3server, objects)
    target = new_bucket(s3server, "restored")
    proxy.add("GetObject", fault="cut", after=1, limit=1)  # the manifest reads fine; the backup's GET is cut once
    done = run("restore_files.py", "--latest", "--target-bucket", target, env={**via, "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("resuming from byte") == 1, done.stderr
    ((path, byte_range, etag),) = [r for r in proxy.ranges if ".manifest.json" not in r[0]]
    assert "versionId=" in path and re.fullmatch(r"bytes=[1-9]\d*-", byte_range) and etag, proxy.ranges
    assert snapshot(s3server.client(), target) == expected_snapshot(objects)
    assert list(tmp_path.iterdir()) == []


# -- restore failing or killed half-way through psql ----------------------------------------------
GATE_LOCK = 4242


def install_gate(pg, database: str, action: str) -> None:
    """An event trigger in the target that acts when the restore reaches its first ADD CONSTRAINT:
    by then psql has created every table and loaded every row inside its transaction."""
    pg.psql(
        "CREATE FUNCTION halfway_gate() RETURNS event_trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"IF current_query() ILIKE '%ADD CONSTRAINT%' THEN {action} END IF; END $$;"
        "CREATE EVENT TRIGGER halfway_gate ON ddl_command_end EXECUTE FUNCTION halfway_gate();",
        database,
    )


def test_restore_failing_half_way_through_psql_leaves_the_target_as_it_was(run, pg, sample_db, target):
    database_backup(run, pg=pg, sample_db=sample_db)
    install_gate(pg, target, "RAISE EXCEPTION 'injected conflict half-way through the restore';")
    done = run("restore_database.py", "--latest", "--replace", "--target-database-url", pg.url(target))
    assert done.returncode == 1
    one_error(done, "rolled back", "injected conflict")
    unchanged(pg, target)


class HeldLock:
    """An advisory lock (they are per database) held by a separate session until release()."""

    def __init__(self, pg, database: str, key: int):
        self.pg = pg
        self.proc = subprocess.Popen(
            [str(pg.bin / "psql"), "-X", "-q", "-h", "127.0.0.1", "-p", str(pg.port), "-U", pg.user, "-d", database],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env={**pg.env(), "PGAPPNAME": "gate-holder"},
        )
        self.proc.stdin.write(f"SELECT pg_advisory_lock({key});\n")
        self.proc.stdin.flush()
        wait_until(lambda: pg.psql(f"SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = {key} AND granted") == "1",
                   what="the advisory lock")

    def release(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("\\q\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def wait_until(condition, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("victim", ["SIGKILL psql", "SIGKILL restore", "SIGTERM restore", "SIGINT restore"])
def test_restore_killed_half_way_commits_nothing(run, pg, sample_db, target, tmp_path, victim):
    """psql killed, or the restore stopped by a signal, while psql is half-way: nothing committed.
    The restore itself SIGKILLed: all or nothing. psql is no longer killed with it (no
    PR_SET_PDEATHSIG): it reads on once its statement returns. Before the restore sent its COMMIT
    (which it does once the whole backup verified, the seal before it) psql reads EOF without one
    and rolls back; here the dump is small and all verified while psql waits at the gate, so it
    mostly commits the whole backup. A kill while psql still reads the stream is
    test_restore_killed.py's."""
    database_backup(run, pg=pg, sample_db=sample_db)
    install_gate(pg, target, f"PERFORM pg_advisory_xact_lock({GATE_LOCK});")
    gate = HeldLock(pg, target, GATE_LOCK)
    try:
        proc = run.popen("restore_database.py", "--latest", "--replace", "--target-database-url", pg.url(target),
                         env={"TMPDIR": str(tmp_path)})
        watch = ProcWatch(proc.pid).start()
        wait_until(lambda: proc.poll() is not None or pg.psql(
            f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{target}' AND wait_event = 'advisory'") == "1",
            what="psql blocked half-way")
        assert proc.poll() is None, proc.stderr.read()
        restore_psql = next(p for p in psutil.Process(proc.pid).children(recursive=True)
                            if p.name() == "psql" and "-c" not in p.cmdline())
        {
            "SIGKILL psql": restore_psql.kill,
            "SIGKILL restore": proc.kill,
            "SIGTERM restore": proc.terminate,
            "SIGINT restore": lambda: proc.send_signal(signal.SIGINT),
        }[victim]()
        if victim == "SIGKILL restore":
            gate.release()  # psql's statement goes on, then psql reads on to our COMMIT or to EOF
            restore_psql.wait(timeout=30)
        stdout, stderr = proc.communicate(timeout=BOUND)
        watch.stop()
    finally:
        gate.release()
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    if victim == "SIGKILL psql":
        assert proc.returncode == 1
        one_error(done, "rolled back", "psql failed", "signal 9")
    elif victim == "SIGKILL restore":
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == {"SIGTERM restore": 143, "SIGINT restore": 130}[victim]
        one_error(done, victim.split()[0])
        assert list(tmp_path.iterdir()) == []  # the download directory went with it
    wait_until(lambda: pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{target}' "
                               "AND application_name <> 'gate-holder' AND pid <> pg_backend_pid()") == "0",
               what="the restore's backend to end")
    if victim == "SIGKILL restore" and public_tables(pg, target) != "1":
        assert public_tables(pg, target) == str(int(public_tables(pg, sample_db)) + 1)  # the whole backup, and keep_me
        assert table_fingerprint(pg, target, "applications") == table_fingerprint(pg, sample_db, "applications")
        assert pg.psql("SELECT note FROM keep_me", target) == "before the restore"
    else:
        unchanged(pg, target)
    assert watch.alive() == []


# -- concurrency -----------------------------------------------------------------------------------
def test_two_backups_in_the_same_second_both_survive(run, pg, sample_db, s3server, bucket, scratch_db):
    moment = at(1)
    env = {"DATABASE_URL": pg.url(sample_db), "EXTERNAL_BACKUPS_NOW": iso(moment)}
    procs = [run.popen("backup_database.py", "--json", env=env) for _ in range(2)]
    results = [p.communicate(timeout=BOUND) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    manifests = [json.loads(out) for out, _ in results]
    assert manifests[0]["key"] == manifests[1]["key"] == f"production/database/{moment:%Y-%m-%d--%H-%M-%S}.sql.zst.encrypted"
    assert manifests[0]["version_id"] != manifests[1]["version_id"]

    listed = json.loads(run("list_backups.py", "--json", check=True).stdout)
    assert sorted(b["version_id"] for b in listed if b["complete"]) == sorted(m["version_id"] for m in manifests)

    second = pg.create_database(f"{scratch_db}_b")
    try:
        for manifest, database in zip(manifests, [scratch_db, f"{scratch_db}_b"]):
            run("restore_database.py", "--key", manifest["key"], "--version-id", manifest["version_id"],
                "--target-database-url", pg.url(database), check=True)
            assert table_fingerprint(pg, database, "applications") == table_fingerprint(pg, sample_db, "applications")
    finally:
        del second
        pg.drop_database(f"{scratch_db}_b")


# -- decrypt.py faults ----------------------------------------------------------------------------
@pytest.mark.parametrize("passphrase_source", ["env", "flag"])
def test_decrypt_wrong_passphrase_or_truncated_leaves_nothing(run, tmp_path, passphrase_source):
    good = openssl(b"SELECT 1;\n" * 1000, PASSPHRASE)
    for name, data, passphrase in [("wrong-key", good, "not-the-passphrase"), ("truncated", good[: len(good) // 2 // 16 * 16 + 16 * 3], PASSPHRASE),
                                   ("cut-mid-block", good[:-5], PASSPHRASE)]:
        path = tmp_path / f"{name}.sql.encrypted"
        path.write_bytes(data)
        args = ["--password", passphrase] if passphrase_source == "flag" else []
        env = {"EXTERNAL_BACKUP_ENCRYPTION_KEY": None if passphrase_source == "flag" else passphrase}
        done = run("./decrypt.py", "-i", str(path), "-o", str(tmp_path / "out.sql"), *args, env=env, input="")
        assert done.returncode == 1, (name, done.stderr)
        one_error(done, "cannot decrypt")
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".encrypted")) == [], name


def test_manifest_write_failing_leaves_an_incomplete_backup_that_readers_skip(run, pg, sample_db, proxy, via, s3server, bucket, scratch_db):
    first, then = at(2), at(1)
    earlier = database_backup(run, pg=pg, sample_db=sample_db, EXTERNAL_BACKUPS_NOW=iso(first))
    proxy.add("PutObject", fault="500", after=2)  # the object and its profile go up, its manifest never does
    done, elapsed = timed(run, "backup_database.py", env={"DATABASE_URL": pg.url(sample_db), "EXTERNAL_BACKUPS_NOW": iso(then), **via})
    assert done.returncode == 1 and elapsed < BOUND
    one_error(done, "manifest", "incomplete")
    listed = json.loads(run("list_backups.py", "--json", check=True).stdout)
    assert [(b["key"].rsplit("/", 1)[1], b["complete"]) for b in listed] == [
        (f"{then:%Y-%m-%d--%H-%M-%S}.sql.zst.encrypted", False), (f"{first:%Y-%m-%d--%H-%M-%S}.sql.zst.encrypted", True)]
    done = run("restore_database.py", "--latest", "--json", "--target-database-url", pg.url(scratch_db), check=True)
    assert json.loads(done.stdout)["version_id"] == earlier["version_id"]
    assert [s["key"] for s in json.loads(done.stdout)["skipped"]] == [f"production/database/{then:%Y-%m-%d--%H-%M-%S}.sql.zst.encrypted"]


@pytest.mark.parametrize("fault", ["cut", pytest.param("stall-body", marks=pytest.mark.slow)])
def test_restore_survives_downloads_breaking_off(run, pg, big_db, proxy, via, s3server, bucket, target, tmp_path, fault):
    """A body cut short or stalled after its headers came (botocore does not retry those): the
    manifest's GET and the backup's GET are each hit once; both are fetched again."""
    database_backup(run, pg=pg, sample_db=big_db)
    proxy.add("GetObject", fault=fault, per_request=1, seconds=10)
    done, elapsed = timed(run, "restore_database.py", "--latest", "--replace", "--target-database-url", pg.url(target),
                          env={**via, "TMPDIR": str(tmp_path), "BACKUP_S3_READ_TIMEOUT": "2"})
    assert done.returncode == 0, done.stderr
    assert proxy.faults()[fault] == 2
    assert done.stderr.count("broke off") == 2
    # The backup streams into psql as it downloads: its GET resumes where it broke off, on the same
    # version, never from the start (the bytes psql already has are not sent twice).
    assert done.stderr.count("resuming from byte") == 1, done.stderr
    ((path, byte_range, etag),) = [r for r in proxy.ranges if ".manifest.json" not in r[0]]  # a manifest's GET: bytes=0-LIMIT
    assert "versionId=" in path and re.fullmatch(r"bytes=[1-9]\d*-", byte_range) and etag, proxy.ranges
    assert table_fingerprint(pg, target, "big") == table_fingerprint(pg, big_db, "big")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # ~10 s of back-off
def test_restore_fails_cleanly_when_downloads_keep_breaking_off(run, pg, sample_db, proxy, via, target, tmp_path):
    database_backup(run, pg=pg, sample_db=sample_db)
    proxy.add("GetObject", fault="cut", after=1)  # the manifest reads fine, the backup never does
    done, elapsed = timed(run, "restore_database.py", "--latest", "--replace", "--target-database-url", pg.url(target),
                          env={**via, "TMPDIR": str(tmp_path)})
    assert done.returncode == 1 and elapsed < BOUND
    one_error(done, "broke off 5 times")
    unchanged(pg, target)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGKILL, -9)])
def test_decrypt_stopped_mid_way_leaves_nothing(run, tmp_path, sig, code):
    """The partial plaintext (a file with no name in OUT's directory) never shows, not even after
    SIGKILL; openssl goes too (after SIGKILL, it dies on its own at its first write)."""
    slow = tmp_path / "bin"
    slow.mkdir()
    real = shutil.which("openssl")
    # One process that takes its time, then becomes openssl (a shell would leave `sleep` behind).
    (slow / "openssl").write_text(f"#!/usr/bin/python3\nimport os, sys, time\ntime.sleep(20)\nos.execv({real!r}, [{real!r}, *sys.argv[1:]])\n")
    (slow / "openssl").chmod(0o755)
    encrypted = tmp_path / "backup.sql.encrypted"
    encrypted.write_bytes(openssl(b"SELECT 1;\n" * 1000, PASSPHRASE))
    out = tmp_path / "out"
    out.mkdir()
    proc = run.popen("./decrypt.py", "-i", str(encrypted), "-o", str(out / "db.sql"),
                     env={"PATH": f"{slow}:{os.environ['PATH']}"})
    watch = ProcWatch(proc.pid).start()
    wait_until(lambda: any("openssl" in " ".join(s.cmdline) for s in watch.seen), what="decryption under way")
    assert list(out.iterdir()) == []  # nothing to see while it runs
    proc.send_signal(sig)
    done = finish(proc, watch, timeout=30)
    assert done.returncode == code, done.stderr
    assert list(out.iterdir()) == []
    if sig == signal.SIGKILL:
        for left in watch.alive():
            os.kill(int(left.split()[0]), signal.SIGKILL)
        return
    one_error(done)
    deadline = time.monotonic() + 10
    while watch.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert watch.alive() == []


def test_list_backups_survives_transient_faults(run, pg, sample_db, proxy, via):
    """A listing or manifest read failing once must not make a complete backup look incomplete
    (that would trip the --max-age alarm, or send a restore to an older backup)."""
    database_backup(run, pg=pg, sample_db=sample_db)
    proxy.add("ListObjectVersions", fault="503", limit=1)
    proxy.add("GetObject", fault="cut", limit=1)
    proxy.add("HeadObject", fault="500", limit=1)  # the retain-until date
    done = run("list_backups.py", "--json", "--kind", "database", "--max-age", "1h", env=via)
    assert done.returncode == 0, done.stderr
    assert [b["complete"] for b in json.loads(done.stdout)] == [True]
    assert proxy.faults() == {"503": 1, "cut": 1, "500": 1}
