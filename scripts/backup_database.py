#!/usr/bin/env python3
"""Back up one PostgreSQL database: pg_dump → zstd → openssl enc → streamed upload → manifest."""

from __future__ import annotations

import os
import subprocess
import time

from backupkit import cli, config, crypto, s3
from backupkit.compression import DEFAULT_LEVEL, LEVELS, check_zstd, start_zstd
from backupkit.errors import UsageError
from backupkit.laststep import LastStep
from backupkit.manifest import COMPRESSIONS, backup_key, for_upload
from backupkit.output import log, md_code, shown
from backupkit.pipeline import Pipeline
from backupkit.postgres import check_dump_client, client_binary
from backupkit.profile import DumpRows, ObservedTally, profile_key, send_database_profile
from backupkit.progress import Progress, human_bytes
from backupkit.streams import Tally, copy
from backupkit.upload import StreamingUpload

DESCRIPTION = f"""\
Dump a PostgreSQL database with pg_dump (plain SQL, --clean --if-exists --no-owner
--no-privileges), compress it with zstd, encrypt it with openssl enc -aes-256-cbc -pbkdf2, and
stream it to s3://BUCKET/ENVIRONMENT/database/YYYY-MM-DD--HH-MM-SS.sql.zst.encrypted, then write
its manifest (with the SQL's and the compressed stream's sizes and SHA-256).

--compression none leaves zstd out and writes YYYY-MM-DD--HH-MM-SS.sql.encrypted, byte-compatible
with the original system's restore (openssl enc -d … -out database-backup.sql). The default level,
{DEFAULT_LEVEL}, gave the fastest backup on an application-like dump (bench/RESULTS.md); higher levels
store fewer bytes and take longer.

Nothing plaintext touches the disk. The upload is completed only when pg_dump, zstd and openssl
all exited 0; otherwise it is aborted, no manifest is written and the exit status is 1.
Stopped by Ctrl-C or SIGTERM, it ends within 10 s and says what it left: nothing, or, when the
signal came while the upload was being completed, the backup it completed with its manifest.
The writer needs only s3:PutObject on the bucket (setup_bucket.py --print-policies).
"""

EPILOG = """\
environment:
  EXTERNAL_BACKUP_ENCRYPTION_KEY  the passphrase (required; never put it on a command line)
  DATABASE_URL                    postgresql://USER@HOST:PORT/DB (several hosts: HOST1:PORT1,HOST2:PORT2),
                                  else libpq's PG* variables
  PGPASSWORD                      the database's password (a password inside the URL works too,
                                  with : / ? # [ ] @ ! $ & ' ( ) * + , ; = % and space percent-encoded)
  BACKUP_BUCKET, BACKUP_ENVIRONMENT, AWS_* (credentials, region, AWS_ENDPOINT_URL)
  PG_DUMP                         the pg_dump to use (default: pg_dump on PATH)
  BACKUP_COMPRESSION, BACKUP_COMPRESSION_LEVEL   as --compression, --compression-level
  ZSTD                            the zstd to use (default: zstd on PATH; apt-get install zstd)

example:
  export EXTERNAL_BACKUP_ENCRYPTION_KEY=… DATABASE_URL=postgresql://app@db:5432/app PGPASSWORD=…
  scripts/backup_database.py --environment production --bucket acme-external-backups
"""


def build_parser() -> cli.ArgumentParser:
    p = cli.parser("backup_database.py", DESCRIPTION, EPILOG)
    cli.add_target_args(p)
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL"),
                   help="source database URL (env DATABASE_URL); its password in PGPASSWORD, not on the command line")
    p.add_argument("--pg-dump", default=os.environ.get("PG_DUMP"),
                   help="pg_dump binary, at least the server's major version, e.g. /usr/lib/postgresql/16/bin/pg_dump (env PG_DUMP)")
    p.add_argument("--compression", default=os.environ.get("BACKUP_COMPRESSION") or "zstd", metavar="zstd|none",
                   help="zstd (default) or none, the original format (env BACKUP_COMPRESSION)")
    p.add_argument("--compression-level", default=os.environ.get("BACKUP_COMPRESSION_LEVEL") or str(DEFAULT_LEVEL), metavar="N",
                   help=f"zstd level {LEVELS.start}-{LEVELS.stop - 1} (default {DEFAULT_LEVEL}; env BACKUP_COMPRESSION_LEVEL)")
    cli.add_heartbeat_arg(p)
    cli.add_output_args(p)
    return p


def compression_settings(name: str, level: str) -> tuple[str, int | None]:
    if name not in COMPRESSIONS:
        raise UsageError(f"--compression / BACKUP_COMPRESSION '{shown(name)}': use zstd or none")
    if name == "none":
        return name, None
    if not level.strip().isdigit() or int(level) not in LEVELS:
        raise UsageError(f"--compression-level / BACKUP_COMPRESSION_LEVEL '{shown(level)}': use {LEVELS.start} to {LEVELS.stop - 1}")
    return name, int(level)


def main(argv: list[str]) -> int:
    args = cli.parse_args(build_parser(), argv)
    environment = config.environment_name(args.environment)
    bucket = config.bucket_name(args.bucket)
    compression, level = compression_settings(args.compression, args.compression_level)
    passphrase = config.passphrases()[0]
    database = config.database_target(args.database_url)
    pg_dump = args.pg_dump or "pg_dump"
    psql = client_binary("psql", beside=pg_dump)
    if level is not None:
        check_zstd()
    client = s3.external_client_soon()  # made while the checks run and the dump starts

    client_version, server_version = check_dump_client(pg_dump, database, psql)
    started = config.utcnow()
    began = time.monotonic()
    key = backup_key(environment, "database", started, compression)
    log(f"backing up database '{shown(database.database)}' (server {server_version}, pg_dump {client_version}"
        f"{f', zstd -{level}' if level else ''}) to s3://{bucket}/{key}")

    rows = DumpRows()  # the loss tripwire's profile: rows per table, counted as the SQL goes past
    plaintext, compressed = ObservedTally(rows), Tally()
    progress = Progress("uploaded")
    with StreamingUpload(client, bucket, key) as upload, Pipeline() as pipeline, \
            StreamingUpload(client, bucket, profile_key(key)) as profile_upload:
        last = LastStep(upload, bucket)
        cli.on_interrupt(last.left)
        dump = pipeline.start(
            "pg_dump",
            [pg_dump, "--format=plain", "--clean", "--if-exists", "--no-owner", "--no-privileges", *database.args()],
            env=database.env(),
        )
        encrypt = crypto.start_openssl(pipeline, passphrase, decrypt=False, stdin=subprocess.PIPE)
        if level is None:
            pipeline.pump(dump.stdout, encrypt.stdin, plaintext)
        else:
            squeeze = start_zstd(pipeline, level=level)
            pipeline.pump(dump.stdout, squeeze.stdin, plaintext)
            pipeline.pump(squeeze.stdout, encrypt.stdin, compressed)
        copy(encrypt.stdout, upload.write, progress=progress.update)
        pipeline.finish()  # raises unless every stage exited 0
        # The manifest's key_id (0.15 s of PBKDF2), derived while the last parts upload: during
        # the dump every core is busy, and it would delay the dump by as much.
        crypto.start_key_ids([passphrase])
        upload.flush()
        profile = send_database_profile(profile_upload, key, rows, passphrase)  # completed after the backup
        key_id = crypto.key_id(passphrase)
        progress.done()
        # From here a signal no longer stops the backup half-way: it is completed with its manifest.
        manifest = last.run(client.result(), lambda: for_upload(
            upload, plaintext, kind="database", environment=environment, started_at=started, key_id=key_id,
            source={"database": database.database, "server_version": server_version, "pg_dump_version": client_version},
            compression=None if level is None else {"compression": "zstd", "compressed_size": compressed.size,
                                                    "compressed_sha256": compressed.hexdigest()},
            profile=profile.field(),
        ), before_manifest=(profile_upload,))
    report(manifest, args.json, time.monotonic() - began, bucket)
    return 0


def report(manifest: dict, as_json: bool, seconds: float, bucket: str) -> None:
    sql, stored = manifest["plaintext_size"], manifest["encrypted_size"]
    ratio = f" ({sql / stored:.1f}× smaller)" if manifest.get("compression") == "zstd" and stored else ""
    cli.step_summary(
        f"### Database backup: {manifest['environment']}\n\n| key | version | dump | stored | time |\n|---|---|---|---|---|\n"
        f"| {md_code(manifest['key'])} | {md_code(manifest['version_id'])} | {human_bytes(sql)} | {human_bytes(stored)}{ratio} | {seconds:.0f} s |"
    )
    cli.print_result(
        manifest,
        as_json,
        f"backed up database '{shown(manifest['source']['database'])}' to s3://{bucket}/{manifest['key']} (version "
        f"{manifest['version_id']}): {human_bytes(sql)} dump, {human_bytes(stored)} stored{ratio}, in {seconds:.1f} s",
    )


if __name__ == "__main__":
    cli.run(main)
