"""Building backups for the verify/fetch/rotation tests: real ones through backup_database.py,
damaged ones by hand (stock `openssl enc`, zipfile in streaming mode + pyAesCrypt), each with a
manifest that matches what was uploaded, as a backup job (or an attacker with s3:PutObject) would."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import zipfile
from datetime import UTC, datetime, timedelta

import pyAesCrypt

from backupkit import crypto
from backupkit.manifest import backup_key, build_manifest, key_time, manifest_key, write_manifest

ENVIRONMENT = "production"


def at(hours_ago: float = 0, now: datetime | None = None) -> datetime:
    moment = (now or datetime.now(UTC)) - timedelta(hours=hours_ago)
    return moment.replace(microsecond=0)


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def database_backup(run, started_at: datetime | None = None, passphrase: str | None = None, sample_db: str = "app",
                    pg=None, compression: str | None = None, **env: str) -> dict:
    """Run backup_database.py (as the hourly job does), with more variables in `env`; returns its
    manifest."""
    env = {"DATABASE_URL": pg.url(sample_db), **({"BACKUP_COMPRESSION": compression} if compression else {}), **env}
    if started_at is not None:
        env["EXTERNAL_BACKUPS_NOW"] = iso(started_at)
    if passphrase is not None:
        env["EXTERNAL_BACKUP_ENCRYPTION_KEY"] = passphrase
    done = run("backup_database.py", "--json", env=env, check=True)
    return json.loads(done.stdout)


def files_backup(run, source: str, *args: str, check: bool = True, timeout: float = 300):
    """Run backup_files.py (as the daily job does) on the app bucket `source`; returns its manifest
    (or the finished process, when it failed and `check` is false)."""
    done = run("backup_files.py", "--source-bucket", source, "--json", *args, check=check, timeout=timeout)
    return json.loads(done.stdout) if done.returncode == 0 else done


def read_object(client, bucket: str, key: str, version_id: str | None = None) -> bytes:
    extra = {"VersionId": version_id} if version_id else {}
    return client.get_object(Bucket=bucket, Key=key, **extra)["Body"].read()


def put_with_manifest(client, bucket: str, key: str, body: bytes, manifest: dict) -> dict:
    """Upload `body` at `key` (a new version when the key exists) and a manifest for that version
    made of `manifest` with key and version_id re-pointed; returns the manifest written."""
    version_id = client.put_object(Bucket=bucket, Key=key, Body=body, ChecksumAlgorithm="CRC32").get("VersionId")
    started = iso(key_time(key))  # a writer making a manifest for this name gives it this name's time
    written = {**manifest, "key": key, "version_id": version_id, "started_at": started,
               "completed_at": max(started, manifest["completed_at"])}
    if "profile" in written and written["profile"]["key"] != key + ".profile.encrypted":
        del written["profile"]  # a manifest moved to another key: its backup's profile is not there
    write_manifest(client, bucket, written)
    return written


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def openssl_encrypt(plaintext: bytes, passphrase: str) -> bytes:
    """The stock command line, as an operator would type it."""
    done = subprocess.run(
        ["openssl", "enc", "-aes-256-cbc", "-pbkdf2", "-pass", "env:BACKUP_TEST_PASS"],
        input=plaintext, capture_output=True, check=True, env={**os.environ, "BACKUP_TEST_PASS": passphrase},
    )
    return done.stdout


def upload_dump(client, bucket: str, started_at: datetime, plaintext: bytes, passphrase: str,
                overrides: dict | None = None) -> dict:
    """Encrypt a (possibly damaged or planted) dump with stock openssl and upload it with a matching
    manifest (with `overrides` applied after it was built, for invalid ones)."""
    body = openssl_encrypt(plaintext, passphrase)
    key = backup_key(ENVIRONMENT, "database", started_at)
    manifest = build_manifest(
        kind="database", environment=ENVIRONMENT, key=key, version_id=None, started_at=started_at,
        completed_at=started_at, key_id=crypto.key_id(passphrase),
        encrypted_size=len(body), encrypted_sha256=sha256(body), plaintext_size=len(plaintext),
        plaintext_sha256=sha256(plaintext), source={"database": "app", "server_version": "?", "pg_dump_version": "?"},
    )
    return put_with_manifest(client, bucket, key, body, {**manifest, **(overrides or {})})


class Unseekable:
    """A write-only stream without tell/seek: zipfile then writes data descriptors, as the files
    backup does when it streams."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def write(self, data: bytes) -> int:
        self.buffer += data
        return len(data)

    def flush(self) -> None:
        pass


def zip_of(members: list[tuple[str, bytes, bytes]]) -> bytes:
    """A ZIP as the files backup writes it (stored, streamed); members are (name, data, comment)."""
    out = Unseekable()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data, comment in members:
            info = zipfile.ZipInfo(name, (2026, 11, 29, 10, 0, 0))
            info.comment = comment
            with archive.open(info, "w", force_zip64=True) as member:
                member.write(data)
    return bytes(out.buffer)


def streamed_zip(objects: dict[str, bytes]) -> bytes:
    """`zip_of` the objects, each with the attributes of a plain object as its comment."""
    attributes = json.dumps({"ContentType": "application/octet-stream", "Metadata": {}}).encode()
    return zip_of([(name, data, attributes) for name, data in objects.items()])


def aescrypt(plaintext: bytes, passphrase: str) -> bytes:
    out = io.BytesIO()
    pyAesCrypt.encryptStream(io.BytesIO(plaintext), out, passphrase, crypto.AESCRYPT_BUFFER)
    return out.getvalue()


def upload_archive(client, bucket: str, started_at: datetime, archive: bytes, passphrase: str, object_count: int,
                   key_id_of: str | None = None) -> dict:
    """An encrypted ZIP files backup with a manifest matching its bytes (object_count as given)."""
    body = aescrypt(archive, passphrase)
    key = backup_key(ENVIRONMENT, "files", started_at)
    manifest = build_manifest(
        kind="files", environment=ENVIRONMENT, key=key, version_id=None, started_at=started_at,
        completed_at=started_at, key_id=crypto.key_id(key_id_of or passphrase),
        encrypted_size=len(body), encrypted_sha256=sha256(body), plaintext_size=len(archive),
        plaintext_sha256=sha256(archive),
        source={"bucket": "app-uploads", "prefix": "", "object_count": object_count,
                "total_bytes": 0, "skipped": []},
    )
    return put_with_manifest(client, bucket, key, body, manifest)


def flip_byte(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def manifest_versions(client, bucket: str, key: str) -> list[dict]:
    answer = client.list_object_versions(Bucket=bucket, Prefix=manifest_key(key))
    return answer.get("Versions", [])
