"""Backups made the way the original system made them, restored with this toolkit (docs/migration.md).

The original system is the public repository ukgov-equality-hub/gender-recognition-certificate-service:

- database, `.github/workflows/_backup-database-to-external-s3-shared.yml` (hourly caller
  `backup-database-to-external-s3.yml`): `cf conduit SERVICE -- pg_dump -f 'database-backup.sql'`
  (conduit hands pg_dump the connection in PGHOST/PGPORT/PGUSER/PGPASSWORD/PGDATABASE), then
  `openssl enc -aes-256-cbc -pbkdf2 -in … -out … -pass pass:<secret pasted unquoted into the script>`,
  then `aws s3 cp` to `<cf space>/database/$(date +"%Y-%m-%d--%H-%M-%S").sql.encrypted`. No manifest.
- files, `admin/jobs/__init__.py` (`backup_files`, `zip_encrypt_and_save_to_external_aws`), started
  daily by `backup-files-to-external-s3.yml` with a curl to the admin app: every object of the app
  bucket (list_objects_v2, all pages), in chunks of up to 100,000,000 bytes of objects (a larger
  object alone in its chunk), each chunk a ZIP made by aiozipstream 0.4 (`ZipStream(files, chunksize=32768)`: stored members named by the
  object key, no comments, no extra fields, data descriptors, ZIP32 only), encrypted in memory with
  `pyAesCrypt.encryptStream(fin, fout, key, 64 * 1024)` and streamed up with smart_open to
  `<space>/files/<YYYY-MM-DD--HH-MM-SS>--part-<N>.zip.encrypted`. No manifest, no ContentType.

Everything below re-creates those commands and formats from those facts with the real pg_dump,
openssl, AWS CLI and pyAesCrypt; then restores with our scripts the way docs/migration.md says. The
command strings are the documentation's (test_the_doc_shows_the_commands_these_tests_run).
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

import pyAesCrypt
import pytest

from dev.harness import REPO, create_sample_database, table_fingerprint
from tests.conftest import base_env, error_lines, public_tables
from tests.files_helpers import new_bucket, snapshot

# Not conftest's PASSPHRASE: the original workflow puts the passphrase on openssl's command line,
# and other tests watch command lines for theirs.
ORIGINAL_PASSPHRASE = "Original-grc-Passphrase-7e1d"
NEW_PASSPHRASE = "New-toolkit-Passphrase-3b9f"
SPACE = "production"  # the original's cf space = our environment folder
TABLES = ("applications", "admin_user")
DOC = REPO / "docs" / "migration.md"
ORIGINAL_CHUNK_BYTES = 100 * 1000 * 1000  # admin/jobs/__init__.py: maximum_filesize_per_chunk
TEST_CHUNK_BYTES = 64 * 1024  # the same rule, scaled down so a small bucket makes several parts

# -- the commands docs/migration.md gives (run through bash, as an operator pastes them) --------
LIST_DATABASE = 'scripts/list_backups.py --environment "$BACKUP_ENVIRONMENT" --kind database'
LIST_VERSIONS = ('aws s3api list-object-versions --bucket "$BACKUP_BUCKET" --prefix "$BACKUP_ENVIRONMENT/" '
                 "--query 'Versions[].[LastModified,VersionId,Size,Key]' --output text")
FETCH_VERSION = 'aws s3api get-object --bucket "$BACKUP_BUCKET" --key "$KEY" --version-id "$VERSION" original.sql.encrypted'
FETCH_DATABASE = 'aws s3 cp "s3://$BACKUP_BUCKET/$KEY" original.sql.encrypted'
RESTORE_DATABASE = ('scripts/restore_database.py --file original.sql.encrypted --without-manifest '
                    '--target-database-url "$TARGET_DATABASE_URL"')
DECRYPT_DATABASE = "./decrypt.py --filein original.sql.encrypted --fileout database-backup.sql"
OPENSSL_DECRYPT = ("openssl enc -d -aes-256-cbc -pbkdf2 -in original.sql.encrypted -out database-backup.sql "
                   "-pass env:EXTERNAL_BACKUP_ENCRYPTION_KEY")
DUMP_ROLES = ("openssl enc -d -aes-256-cbc -pbkdf2 -in original.sql.encrypted -pass env:EXTERNAL_BACKUP_ENCRYPTION_KEY "
              "| grep -E '^(ALTER .* OWNER TO|GRANT .* TO) ' | grep -oE 'TO [^;]+' | sort -u")
CREATE_ROLE = 'psql "$TARGET_DATABASE_URL" -c "CREATE ROLE $ROLE NOLOGIN"'
LIST_FILES = 'aws s3 ls "s3://$BACKUP_BUCKET/$BACKUP_ENVIRONMENT/files/"'
FETCH_FILES = ('aws s3 cp "s3://$BACKUP_BUCKET/$BACKUP_ENVIRONMENT/files/" . --recursive '
               '--exclude "*" --include "$STAMP--part-*.zip.encrypted"')
RESTORE_FILES = ('for part in "$STAMP"--part-*.zip.encrypted; do scripts/restore_files.py --file "$part" '
                 '--target-bucket "$TARGET_BUCKET"; done')
DECRYPT_FILES = './decrypt.py --filein "$STAMP--part-1.zip.encrypted" --fileout part-1.zip'
PYAESCRYPT_DECRYPT = 'pyAesCrypt -d -o part-1.zip -p "$EXTERNAL_BACKUP_ENCRYPTION_KEY" "$STAMP--part-1.zip.encrypted"'
RESTORE_ZIP = 'scripts/restore_files.py --file part-1.zip --target-bucket "$TARGET_BUCKET"'
DOC_COMMANDS = (LIST_DATABASE, LIST_VERSIONS, FETCH_VERSION, FETCH_DATABASE, RESTORE_DATABASE, DECRYPT_DATABASE,
                OPENSSL_DECRYPT, DUMP_ROLES, CREATE_ROLE, LIST_FILES, FETCH_FILES, RESTORE_FILES, DECRYPT_FILES,
                PYAESCRYPT_DECRYPT, RESTORE_ZIP)


def shell(command: str, cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    """`command` as GitHub Actions runs a `run:` step (and as an operator pastes it)."""
    done = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", command], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(f"{command}\nexited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def tool_path(pg) -> str:
    """The venv's python3/aws/pyAesCrypt first (the scripts' `#!/usr/bin/env python3`), then psql/pg_dump."""
    return os.pathsep.join([str(Path(sys.executable).parent), str(pg.bin), os.environ.get("PATH", "/usr/bin:/bin")])


# -- the original database backup ---------------------------------------------------------------
def original_database_backup(pg, database: str, bucket: str, s3server, workdir: Path,
                             secret: str = ORIGINAL_PASSPHRASE) -> tuple[str, bytes]:
    """The original workflow's steps in a fresh directory; returns (key, the plaintext dump)."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**base_env(), **s3server.env(), "PATH": tool_path(pg), "TZ": "UTC",  # hosted runners run in UTC
           # what `cf conduit SERVICE --` puts in pg_dump's environment
           "PGHOST": "127.0.0.1", "PGPORT": str(pg.port), "PGUSER": pg.user, "PGPASSWORD": pg.password,
           "PGDATABASE": database}
    shell("pg_dump -f 'database-backup.sql'", workdir, env)
    # `${{ secrets.external_backup_encryption_key }}` is pasted into the script unquoted.
    shell(f"openssl enc -aes-256-cbc -pbkdf2 -in 'database-backup.sql' -out 'database-backup.sql.encrypted' "
          f"-pass pass:{secret}", workdir, env)
    before = set(keys(s3server, bucket, f"{SPACE}/database/"))
    shell('DATE_AND_TIME=$(date +"%Y-%m-%d--%H-%M-%S")\n'
          f"aws s3 cp 'database-backup.sql.encrypted' \"s3://{bucket}/{SPACE}/database/${{DATE_AND_TIME}}.sql.encrypted\"",
          workdir, env)
    plaintext = (workdir / "database-backup.sql").read_bytes()
    shell("rm database-backup.sql\nrm database-backup.sql.encrypted", workdir, env)
    (key,) = set(keys(s3server, bucket, f"{SPACE}/database/")) - before
    return key, plaintext


def keys(s3server, bucket: str, prefix: str = "") -> list[str]:
    out = []
    for page in s3server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return out


# -- the original files backup ------------------------------------------------------------------
def aiozipstream_zip(members: Iterable[tuple[str, Iterable[bytes]]],
                     clock: Callable[[], time.struct_time] = time.localtime) -> bytes:
    """A ZIP laid out byte for byte as aiozipstream 0.4's `ZipStream(...).stream()` lays it out
    (checked against the library itself: test_zip_writer_matches_aiozipstream_0_4):

    - every member stored, general purpose flag 0x08 (sizes in a data descriptor), plus 0x800 when
      the name is not ASCII; version 20; DOS date and time of the moment the member is written
      (local time), not the object's; local header with CRC and sizes 0, no extra field;
    - after the data, a data descriptor whose signature is written byte-reversed (08 07 4b 50),
      then CRC-32, compressed and uncompressed size, 32 bits each (no ZIP64 at all);
    - central directory entries with "version made by" bytes 03 14 (system and version swapped),
      no extra field, no comment, attributes 0; end record with no archive comment.
    """
    out = bytearray()
    central = bytearray()
    count = 0
    for name, chunks in members:
        now = clock()
        dos_date = ((now.tm_year - 1980) << 9 | now.tm_mon << 5 | now.tm_mday) & 0xFFFF
        dos_time = (now.tm_hour << 11 | now.tm_min << 5 | now.tm_sec // 2) & 0xFFFF
        flags = 0x08
        try:
            raw_name = name.encode("ascii")
        except UnicodeError:
            raw_name = name.encode("utf-8")
            flags |= 0x800
        offset = len(out)
        out += struct.pack("<4sHHHHHLLLHH", b"PK\x03\x04", 20, flags, 0, dos_time, dos_date, 0, 0, 0, len(raw_name), 0)
        out += raw_name
        crc = size = 0
        for chunk in chunks:
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
            out += chunk
        out += b"\x08\x07\x4b\x50" + struct.pack("<LLL", crc, size, size)
        central += struct.pack("<4sBBHHHHHLLLHHHHHLL", b"PK\x01\x02", 3, 20, 20, flags, 0, dos_time, dos_date,
                               crc, size, size, len(raw_name), 0, 0, 0, 0, 0, offset)
        central += raw_name
        count += 1
    end = struct.pack("<4sHHHHLLH", b"PK\x05\x06", 0, 0, count, count, len(central), len(out), 0)
    return bytes(out + central + end)


def original_files_backup(client, source_bucket: str, bucket: str, chunk_bytes: int = ORIGINAL_CHUNK_BYTES,
                          secret: str = ORIGINAL_PASSPHRASE) -> list[tuple[str, bytes]]:
    """The admin app's /jobs/backup-files; returns [(key, the ZIP before encryption)] per part."""
    started = datetime.now(UTC)  # datetime.now() in the app's container, which ran in UTC
    listed = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=source_bucket):
        listed += page.get("Contents", [])

    def download(key: str) -> Iterable[bytes]:  # the whole object, in one piece, when the ZIP reaches it
        yield client.get_object(Bucket=source_bucket, Key=key)["Body"].read()

    parts: list[list[tuple[str, Iterable[bytes]]]] = [[]]
    in_part = 0
    for item in listed:
        # A part is closed before the object that would take it past the limit; an object larger
        # than the limit therefore sits alone in its part.
        if in_part + item["Size"] > chunk_bytes and parts[-1]:
            parts.append([])
            in_part = 0
        parts[-1].append((item["Key"], download(item["Key"])))
        in_part += item["Size"]

    written = []
    for number, members in enumerate((p for p in parts if p), start=1):
        plain = aiozipstream_zip(members)
        encrypted = io.BytesIO()
        pyAesCrypt.encryptStream(io.BytesIO(plain), encrypted, secret, 64 * 1024)
        key = f"{SPACE}/files/{started.strftime('%Y-%m-%d--%H-%M-%S')}--part-{number}.zip.encrypted"
        # smart_open's writer: one multipart upload (parts of 50 MiB; one part at these sizes).
        upload = client.create_multipart_upload(Bucket=bucket, Key=key)
        etag = client.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1,
                                  Body=encrypted.getvalue())["ETag"]
        client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"],
                                         MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag}]})
        written.append((key, plain))
    return written


def app_objects() -> dict[str, bytes]:
    """Keys as the app names them (grc/upload create_aws_file_name, grc/utils/application_files)."""
    objects = {}
    for n in range(1, 7):
        ref = f"ABCD-{n:04d}"
        objects[f"{ref}__identity__passport_{uuid.uuid4().hex}.jpg"] = os.urandom(9000 + 1000 * n)
        objects[f"{ref}__name-change__deed_poll_{uuid.uuid4().hex}.pdf"] = b"%PDF-1.4\n" + os.urandom(4000 * n)
        objects[f"{ref}.pdf"] = b"%PDF-1.4 application " + ref.encode()
    objects["ABCD-0001__identity__scan_original.png"] = os.urandom(200_000)  # larger than a (scaled) part
    objects["ABCD-0002__medical__empty_letter.pdf"] = b""
    objects["ABCD-0003__overseas__Zoë_résumé.pdf"] = b"%PDF non-ASCII key: not made by the app, kept by the ZIP"
    return objects


def fill_the_app_way(client, bucket: str, objects: dict[str, bytes]) -> None:
    # AwsS3Client.upload_fileobj: s3.upload_fileobj(file, bucket, key), no ExtraArgs, so no
    # ContentType (S3 stores binary/octet-stream) and no user metadata.
    for key, body in objects.items():
        client.upload_fileobj(io.BytesIO(body), bucket, key)


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture
def operator(tmp_path, pg, s3server, bucket):
    """A working directory with the toolkit's scripts and the operator's environment."""
    work = tmp_path / "operator"
    work.mkdir()
    (work / "scripts").symlink_to(REPO / "scripts")
    (work / "decrypt.py").symlink_to(REPO / "decrypt.py")
    env = {**base_env(), **s3server.env(), "PATH": tool_path(pg), "BACKUP_BUCKET": bucket,
           "BACKUP_ENVIRONMENT": SPACE, "EXTERNAL_BACKUP_ENCRYPTION_KEY": ORIGINAL_PASSPHRASE,
           "PSQL": str(pg.bin / "psql"), "PGPASSWORD": pg.password,  # URLs below without the password, as in the runbook
           "BACKUP_ALLOW_SUPERUSER": "1"}  # the test cluster's role is its superuser
    return work, env


@pytest.fixture
def original_dump(pg, sample_db, bucket, s3server, tmp_path):
    key, plaintext = original_database_backup(pg, sample_db, bucket, s3server, tmp_path / "runner")
    return key, plaintext


@pytest.fixture
def original_files(s3server, bucket):
    client = s3server.client()
    source = new_bucket(s3server, "grc-app-files")
    fill_the_app_way(client, source, app_objects())
    parts = original_files_backup(client, source, bucket, chunk_bytes=TEST_CHUNK_BYTES)
    stamp = parts[0][0].split("/")[-1].split("--part-")[0]
    return source, parts, stamp


def assert_same_tables(pg, source: str | dict, target: str) -> None:
    for table in TABLES:
        want = source[table] if isinstance(source, dict) else table_fingerprint(pg, source, table)
        assert table_fingerprint(pg, target, table) == want, table


# -- the ZIP format -----------------------------------------------------------------------------
# SHA-256 of what aiozipstream 0.4 (the wheel on PyPI) streamed for these members, with
# time.localtime() fixed at 2022-09-26 13:45:36 and each stream yielding its body once.
AIOZIPSTREAM_SAMPLE_SHA256 = "93de8a346924332b10347559637bb3b326aa082e77cfe1cf35cdb8684907842a"


def test_zip_writer_matches_aiozipstream_0_4():
    import hashlib

    members = [
        ("ABC123__identity__1_passport.jpg", bytes(range(256)) * 5),
        ("ABC123__identity__1_passport_original.png", b"\x89PNG\r\n\x1a\n" + b"x" * 1000),
        ("ABC123__name-change__2_Zoë résumé.pdf", b"%PDF-1.4\n" + b"\x00\xff" * 300),
        ("ABC123__empty__1_empty.txt", b""),
    ]
    fixed = time.struct_time((2022, 9, 26, 13, 45, 36, 0, 269, 0))
    data = aiozipstream_zip(((name, iter([body])) for name, body in members), clock=lambda: fixed)
    assert len(data) == 3565
    assert hashlib.sha256(data).hexdigest() == AIOZIPSTREAM_SAMPLE_SHA256


# -- database: original dumps -------------------------------------------------------------------
def test_original_database_backup_is_listed_fetched_and_restored(original_dump, operator, pg, sample_db, scratch_db):
    key, _ = original_dump
    work, env = operator
    env = {**env, "TARGET_DATABASE_URL": pg.url(scratch_db, password=False)}

    listed = shell(LIST_DATABASE, work, env).stdout
    line = next(row for row in listed.splitlines() if row.endswith(key))
    assert "INCOMPLETE" in line  # no manifest: the toolkit shows it, and never picks it for --latest

    versions = shell(LIST_VERSIONS, work, env).stdout
    (version,) = [row.split("\t")[1] for row in versions.splitlines() if row.endswith("\t" + key)]
    shell(FETCH_VERSION, work, {**env, "KEY": key, "VERSION": version})
    (work / "original.sql.encrypted").unlink()
    shell(FETCH_DATABASE, work, {**env, "KEY": key})

    refused = shell(RESTORE_DATABASE.replace(" --without-manifest", ""), work, env, check=False)
    assert refused.returncode == 2 and "--without-manifest" in refused.stderr

    shell(RESTORE_DATABASE, work, env)
    assert_same_tables(pg, sample_db, scratch_db)


def test_original_dump_decrypts_with_decrypt_py_and_openssl(original_dump, operator, s3server, bucket):
    key, plaintext = original_dump
    work, env = operator
    shell(FETCH_DATABASE, work, {**env, "KEY": key})
    shell(DECRYPT_DATABASE, work, env)
    assert (work / "database-backup.sql").read_bytes() == plaintext
    (work / "database-backup.sql").unlink()
    shell(OPENSSL_DECRYPT, work, env)
    assert (work / "database-backup.sql").read_bytes() == plaintext
    assert b"-- PostgreSQL database dump complete" in plaintext[-600:]


def test_original_passphrase_kept_as_previous_after_a_new_one(original_dump, operator, pg, sample_db, scratch_db):
    """A new passphrase for the toolkit: the original one goes into the _PREVIOUS variable."""
    key, _ = original_dump
    work, env = operator
    env = {**env, "KEY": key, "TARGET_DATABASE_URL": pg.url(scratch_db, password=False), "EXTERNAL_BACKUP_ENCRYPTION_KEY": NEW_PASSPHRASE,
           "EXTERNAL_BACKUP_ENCRYPTION_KEY_PREVIOUS": ORIGINAL_PASSPHRASE}
    shell(FETCH_DATABASE, work, env)
    shell(RESTORE_DATABASE, work, env)
    assert_same_tables(pg, sample_db, scratch_db)


def test_passphrase_as_the_original_shell_line_made_it(pg, sample_db, bucket, s3server, operator, scratch_db, tmp_path):
    """The secret was pasted unquoted into `-pass pass:…`: bash expanded `$name` in it (to nothing),
    so the dumps were encrypted with what bash made of the secret, not with the secret itself."""
    secret = "Grc$backup-Passphrase-2023"
    as_run = "Grc-Passphrase-2023"
    key, _ = original_database_backup(pg, sample_db, bucket, s3server, tmp_path / "runner", secret=secret)
    work, env = operator
    env = {**env, "KEY": key, "TARGET_DATABASE_URL": pg.url(scratch_db, password=False), "EXTERNAL_BACKUP_ENCRYPTION_KEY": secret}
    shell(FETCH_DATABASE, work, env)
    failed = shell(RESTORE_DATABASE, work, env, check=False)
    assert failed.returncode == 1 and "decryption failed" in failed.stderr
    assert public_tables(pg, scratch_db) == "0"
    shell(RESTORE_DATABASE, work, {**env, "EXTERNAL_BACKUP_ENCRYPTION_KEY_PREVIOUS": as_run})
    assert_same_tables(pg, sample_db, scratch_db)


def test_checks_during_the_overlap_count_only_toolkit_backups(original_dump, run, pg, sample_db):
    """Both systems write to the same folder: freshness and --latest see only complete backups;
    verify --since takes every backup in its window and fails on the original ones."""
    key, _ = original_dump
    env = {"EXTERNAL_BACKUP_ENCRYPTION_KEY": ORIGINAL_PASSPHRASE}
    stale = run("list_backups.py", "--kind", "database", "--max-age", "2h", env=env)
    assert stale.returncode == 1 and "no usable backup" in stale.stderr
    ours = json.loads(run("backup_database.py", "--database-url", pg.url(sample_db), "--json", env=env, check=True).stdout)
    run("list_backups.py", "--kind", "database", "--max-age", "2h", env=env, check=True)
    latest = json.loads(run("verify_backup.py", "--kind", "database", "--latest", "--json", env=env, check=True).stdout)
    assert [r["key"] for r in latest["results"]] == [ours["key"]]
    since = run("verify_backup.py", "--kind", "database", "--since", "1d", "--json", env=env)
    assert since.returncode == 1
    results = {r["key"]: r for r in json.loads(since.stdout)["results"]}
    assert results[ours["key"]]["ok"] and not results[key]["ok"] and results[key]["problem"] == "incomplete"


@pytest.fixture
def dump_with_owner_roles(pg, bucket, s3server, tmp_path, scratch_db):
    """An original dump of a database whose tables belong to roles the restoring server lacks
    (pg_dump without --no-owner/--no-privileges writes ALTER … OWNER TO and GRANT … TO)."""
    tag = uuid.uuid4().hex[:8]
    owner, reader = f"grc_owner_{tag}", f"grc_reader_{tag}"
    source = f"grc_src_{tag}"
    pg.psql(f"CREATE ROLE {owner} NOLOGIN; CREATE ROLE {reader} NOLOGIN")
    create_sample_database(pg, source, rows=200)
    pg.psql(f"ALTER TABLE applications OWNER TO {owner}; ALTER TABLE admin_user OWNER TO {owner}; "
            f"GRANT SELECT ON applications TO {reader}", source)
    fingerprints = {table: table_fingerprint(pg, source, table) for table in TABLES}
    key, plaintext = original_database_backup(pg, source, bucket, s3server, tmp_path / "runner")
    assert f"OWNER TO {owner};".encode() in plaintext and f"TO {reader};".encode() in plaintext
    pg.drop_database(source)
    pg.psql(f"DROP ROLE {owner}; DROP ROLE {reader}")  # the new server never had them
    yield key, fingerprints, (owner, reader)
    pg.drop_database(scratch_db)  # it may hold tables owned by them
    pg.psql(f"DROP ROLE IF EXISTS {owner}; DROP ROLE IF EXISTS {reader}")


def test_original_dump_with_owner_roles_restores_once_the_roles_exist(dump_with_owner_roles, operator, pg, scratch_db):
    key, fingerprints, roles = dump_with_owner_roles
    work, env = operator
    env = {**env, "KEY": key, "TARGET_DATABASE_URL": pg.url(scratch_db, password=False)}
    shell(FETCH_DATABASE, work, env)
    failed = shell(RESTORE_DATABASE, work, env, check=False)
    assert failed.returncode == 1 and f'role "{roles[0]}" does not exist' in failed.stderr
    assert public_tables(pg, scratch_db) == "0"  # rolled back

    named = shell(DUMP_ROLES, work, env).stdout.split()
    assert sorted(n for n in named if n != "TO") == sorted(roles)
    for role in roles:
        shell(CREATE_ROLE, work, {**env, "ROLE": role})
    shell(RESTORE_DATABASE, work, env)
    assert_same_tables(pg, fingerprints, scratch_db)


@pytest.fixture
def app_started_on_target(original_dump, operator, pg, scratch_db):
    """The target already has the app's tables (restored once, then the app wrote a row)."""
    key, _ = original_dump
    work, env = operator
    env = {**env, "KEY": key, "TARGET_DATABASE_URL": pg.url(scratch_db, password=False)}
    shell(FETCH_DATABASE, work, env)
    shell(RESTORE_DATABASE, work, env)
    pg.psql("INSERT INTO admin_user (email) VALUES ('written-after@app')", scratch_db)
    before = {table: table_fingerprint(pg, scratch_db, table) for table in TABLES}
    return work, env, before


def test_original_dump_over_existing_tables_fails_and_changes_nothing(app_started_on_target, pg, scratch_db):
    work, env, before = app_started_on_target
    failed = shell(RESTORE_DATABASE + " --replace", work, env, check=False)
    assert failed.returncode == 1 and "already exists" in failed.stderr
    assert len(error_lines(failed.stderr)) == 1
    assert_same_tables(pg, before, scratch_db)


def test_original_files_backup_is_listed_fetched_and_restored(original_files, operator, s3server):
    source, parts, stamp = original_files
    assert len(parts) >= 3  # several parts, one of them a lone object larger than the limit
    work, env = operator
    target = new_bucket(s3server, "grc-restored")
    env = {**env, "STAMP": stamp, "TARGET_BUCKET": target}

    listed = shell(LIST_FILES, work, env).stdout
    assert all(key.split("/")[-1] in listed for key, _ in parts)
    shell(FETCH_FILES, work, env)
    assert sorted(p.name for p in work.glob("*.zip.encrypted")) == sorted(key.split("/")[-1] for key, _ in parts)
    shell(RESTORE_FILES, work, env)

    client = s3server.client()
    restored, original = snapshot(client, target), snapshot(client, source)
    assert restored == original  # every key, its bytes, ContentType (binary/octet-stream) and metadata
    assert {content_type for _, _, content_type, _ in original.values()} == {"binary/octet-stream"}


def test_original_files_part_decrypts_with_decrypt_py_and_pyaescrypt(original_files, operator, s3server):
    source, parts, stamp = original_files
    work, env = operator
    target = new_bucket(s3server, "grc-restored")
    env = {**env, "STAMP": stamp, "TARGET_BUCKET": target}
    shell(FETCH_FILES, work, env)
    first_zip = parts[0][1]
    shell(DECRYPT_FILES, work, env)
    assert (work / "part-1.zip").read_bytes() == first_zip
    (work / "part-1.zip").unlink()
    shell(PYAESCRYPT_DECRYPT, work, env)
    assert (work / "part-1.zip").read_bytes() == first_zip

    shell(RESTORE_ZIP, work, env)  # an already decrypted part restores too
    client = s3server.client()
    restored = snapshot(client, target)
    original = snapshot(client, source)
    assert restored and restored == {key: original[key] for key in restored}


def test_the_doc_shows_the_commands_these_tests_run():
    text = DOC.read_text()
    missing = [command for command in DOC_COMMANDS if command not in text]
    assert not missing, f"docs/migration.md lacks: {missing}"
