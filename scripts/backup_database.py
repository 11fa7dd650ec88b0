#!/usr/bin/env python3
"""Back up one PostgreSQL database: pg_dump → openssl enc → streamed upload → manifest."""

from __future__ import annotations

import os
import subprocess
import time

from backupkit import cli, config, crypto, s3
from backupkit.manifest import backup_key, build_manifest, write_manifest
from backupkit.output import log, md_code, shown
from backupkit.pipeline import Pipeline, Tally, copy
from backupkit.postgres import check_dump_client, client_binary
from backupkit.progress import Progress, human_bytes
from backupkit.upload import StreamingUpload

DESCRIPTION = """\
Dump a PostgreSQL database with pg_dump (plain SQL, --clean --if-exists --no-owner
--no-privileges), encrypt it with openssl enc -aes-256-cbc -pbkdf2, and stream it to
s3://BUCKET/ENVIRONMENT/database/YYYY-MM-DD--HH-MM-SS.sql.encrypted, then write its manifest.

Nothing plaintext touches the disk. The upload is completed only when pg_dump and openssl both
exited 0; otherwise it is aborted, no manifest is written and the exit status is 1.
The writer needs only s3:PutObject on the bucket (setup_bucket.py --print-policies).
"""

EPILOG = """\
environment:
  EXTERNAL_BACKUP_ENCRYPTION_KEY  the passphrase (required; never put it on a command line)
  DATABASE_URL                    postgresql://USER:PASSWORD@HOST:PORT/DB (else libpq's PG* variables)
  BACKUP_BUCKET, BACKUP_ENVIRONMENT, AWS_* (credentials, region, AWS_ENDPOINT_URL)
  PG_DUMP                         the pg_dump to use (default: pg_dump on PATH)

example:
  export EXTERNAL_BACKUP_ENCRYPTION_KEY=… DATABASE_URL=postgresql://app:…@db:5432/app
  scripts/backup_database.py --environment production --bucket acme-external-backups
"""


def build_parser() -> cli.ArgumentParser:
    p = cli.parser("backup_database.py", DESCRIPTION, EPILOG)
    cli.add_target_args(p)
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL"),
                   help="source database URL (env DATABASE_URL; the password is passed to pg_dump via PGPASSWORD)")
    p.add_argument("--pg-dump", default=os.environ.get("PG_DUMP"),
                   help="pg_dump binary, at least the server's major version, e.g. /usr/lib/postgresql/16/bin/pg_dump (env PG_DUMP)")
    cli.add_heartbeat_arg(p)
    cli.add_output_args(p)
    return p


def main(argv: list[str]) -> int:
    args = cli.parse_args(build_parser(), argv)
    environment = config.environment_name(args.environment)
    bucket = config.bucket_name(args.bucket)
    passphrase = config.passphrases()[0]
    database = config.database_target(args.database_url)
    pg_dump = args.pg_dump or "pg_dump"
    psql = client_binary("psql", beside=pg_dump)

    client_version, server_version = check_dump_client(pg_dump, database, psql)
    client = s3.external_client()
    started = config.utcnow()
    began = time.monotonic()
    key = backup_key(environment, "database", started)
    log(f"backing up database '{shown(database.database)}' (server {server_version}, pg_dump {client_version}) "
        f"to s3://{bucket}/{key}")

    plaintext = Tally()
    progress = Progress("uploaded")
    with StreamingUpload(client, bucket, key) as upload, Pipeline() as pipeline:
        dump = pipeline.start(
            "pg_dump",
            [pg_dump, "--format=plain", "--clean", "--if-exists", "--no-owner", "--no-privileges", *database.args()],
            env=database.env(),
        )
        encrypt = crypto.start_openssl(pipeline, passphrase, decrypt=False, stdin=subprocess.PIPE)
        pipeline.pump(dump.stdout, encrypt.stdin, plaintext)
        copy(encrypt.stdout, upload.write, progress=progress.update)
        pipeline.finish()  # raises unless pg_dump and openssl both exited 0
        version_id = upload.complete()
    progress.done()

    manifest = build_manifest(
        kind="database",
        environment=environment,
        key=key,
        version_id=version_id,
        started_at=started,
        completed_at=config.utcnow(),
        key_id=crypto.key_id(passphrase),
        encrypted_size=upload.size,
        encrypted_sha256=upload.sha256.hexdigest(),
        plaintext_size=plaintext.size,
        plaintext_sha256=plaintext.hexdigest(),
        source={"database": database.database, "server_version": server_version, "pg_dump_version": client_version},
    )
    write_manifest(client, bucket, manifest)
    seconds = time.monotonic() - began
    cli.step_summary(
        f"### Database backup: {environment}\n\n| key | version | dump | encrypted | time |\n|---|---|---|---|---|\n"
        f"| {md_code(key)} | {md_code(version_id)} | {human_bytes(plaintext.size)} | {human_bytes(upload.size)} | {seconds:.0f} s |"
    )
    cli.print_result(
        manifest,
        args.json,
        f"backed up database '{shown(database.database)}' to s3://{bucket}/{key} (version {version_id}): "
        f"{human_bytes(plaintext.size)} dump, {human_bytes(upload.size)} encrypted, in {seconds:.1f} s",
    )
    return 0


if __name__ == "__main__":
    cli.run(main)
