#!/usr/bin/env python3
"""Back up one PostgreSQL database: pg_dump → zstd → openssl enc → streamed upload → manifest."""

from __future__ import annotations

import os
import time

from backupkit import cli, config, formats, store
from backupkit.compression import DEFAULT_LEVEL, LEVELS
from backupkit.dump_writer import DumpWriter
from backupkit.errors import UsageError
from backupkit.manifest import backup_key
from backupkit.output import log, md_code, shown
from backupkit.postgres import check_dump_client, client_binary, database_target
from backupkit.progress import human_bytes

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
    names = [c.name for c in formats.compressions("database")]
    plain = formats.uncompressed("database").compression.name
    choices = " or ".join([f"{names[0]} (default)", *(n for n in names[1:] if n != plain), f"{plain}, the original format"])
    p.add_argument("--compression", default=os.environ.get("BACKUP_COMPRESSION") or names[0], metavar="|".join(names),
                   help=f"{choices} (env BACKUP_COMPRESSION)")
    p.add_argument("--compression-level", default=os.environ.get("BACKUP_COMPRESSION_LEVEL") or str(DEFAULT_LEVEL), metavar="N",
                   help=f"zstd level {LEVELS.start}-{LEVELS.stop - 1} (default {DEFAULT_LEVEL}; env BACKUP_COMPRESSION_LEVEL)")
    cli.add_heartbeat_arg(p)
    cli.add_output_args(p)
    return p


def compression_settings(name: str, level: str) -> tuple[formats.Format, int | None]:
    fmt = formats.find("database", name)
    if fmt is None:
        names = [c.name for c in formats.compressions("database")]
        raise UsageError(f"--compression / BACKUP_COMPRESSION '{shown(name)}': use {', '.join(names[:-1])} or {names[-1]}")
    levels = fmt.compression.levels
    if not fmt.compression.compresses or levels is None:
        return fmt, None
    if not level.strip().isdigit() or int(level) not in levels:
        raise UsageError(f"--compression-level / BACKUP_COMPRESSION_LEVEL '{shown(level)}': use {levels.start} to {levels.stop - 1}")
    return fmt, int(level)


def main(argv: list[str]) -> int:
    args = cli.parse_args(build_parser(), argv)
    cli.start(args)
    environment = config.environment_name(args.environment)
    bucket = config.bucket_name(args.bucket)
    fmt, level = compression_settings(args.compression, args.compression_level)
    passphrase = config.passphrases()[0]
    database = database_target(args.database_url)
    pg_dump = args.pg_dump or "pg_dump"
    psql = client_binary("psql", beside=pg_dump)
    fmt.compression.check()
    client = store.external_store_soon()  # made while the checks run and the dump starts

    client_version, server_version = check_dump_client(pg_dump, database, psql)
    started = config.utcnow()
    began = time.monotonic()
    key = backup_key(environment, "database", started, fmt.compression.name)
    log(f"backing up database '{shown(database.database)}' (server {server_version}, pg_dump {client_version}"
        f"{f', {fmt.compression.describe(level)}' if level else ''}) to s3://{bucket}/{key}")

    writer = DumpWriter(fmt, level, passphrase, database, pg_dump)
    manifest = writer.write(client, bucket, key, environment=environment, started_at=started, on_interrupt=cli.on_interrupt,
                            source={"database": database.database, "server_version": server_version,
                                    "pg_dump_version": client_version})
    report(manifest, args.json, time.monotonic() - began, bucket)
    return 0


def report(manifest: dict, as_json: bool, seconds: float, bucket: str) -> None:
    sql, stored = manifest["plaintext_size"], manifest["encrypted_size"]
    compresses = formats.find("database", manifest.get("compression")).compression.compresses
    ratio = f" ({sql / stored:.1f}× smaller)" if compresses and stored else ""
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
