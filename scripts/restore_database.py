#!/usr/bin/env python3
"""Restore a database backup: download, check, `openssl -d` straight into psql in one transaction."""

from __future__ import annotations

import os
import shutil
import tempfile

from backupkit import cli, config, crypto, s3
from backupkit.errors import BackupError, UsageError, VerificationError
from backupkit.manifest import Backup
from backupkit.postgres import client_binary, client_version, user_tables
from backupkit.progress import human_bytes, log
from backupkit.restore import Restored, restore_stream
from backupkit.retrieve import candidates, download, first_good, local_manifest

DESCRIPTION = """\
Restore a database backup into TARGET with
  openssl enc -d -aes-256-cbc -pbkdf2 | psql -v ON_ERROR_STOP=1 --single-transaction
Nothing plaintext touches the disk, and nothing is committed unless the whole backup verified:
the download's size and SHA-256 match the manifest, openssl exited 0, the plaintext SHA-256
matches, and pg_dump's completion trailer is there. Until then the end of the dump is held back
from psql; on any failure psql is killed and its transaction rolls back.

--latest takes the newest backup that verifies, naming the newer ones it skipped and why.
A target that already has tables is refused unless --replace (the dump drops and recreates
every table it holds: use it over a database the app has already started).
"""

EPILOG = """\
environment:
  EXTERNAL_BACKUP_ENCRYPTION_KEY[_PREVIOUS]  passphrases; the manifest's key_id picks the right one
  TARGET_DATABASE_URL                        postgresql://USER:PASSWORD@HOST:PORT/DB
  BACKUP_BUCKET, BACKUP_ENVIRONMENT, AWS_*   the external bucket (read-only access is enough)

examples:
  scripts/restore_database.py --environment production --latest --target-database-url "$TARGET_DATABASE_URL"
  scripts/restore_database.py --environment production --key 2026-11-29--10-00-00.sql.encrypted --replace
  scripts/fetch_backup.py --environment production --kind database --latest --out backup.sql.encrypted
  scripts/restore_database.py --file backup.sql.encrypted --target-database-url "$TARGET_DATABASE_URL"
"""


def build_parser() -> cli.ArgumentParser:
    p = cli.parser("restore_database.py", DESCRIPTION, EPILOG)
    cli.add_target_args(p)
    which = cli.add_backup_choice(p)
    which.add_argument("--file", help="a local encrypted backup with FILE.manifest.json beside it (fetch_backup.py saves both)")
    p.add_argument("--without-manifest", action="store_true",
                   help="with --file: restore a file that has no manifest. openssl has no integrity check, so "
                        "corruption inside the file cannot be detected (a cut-off dump still is)")
    p.add_argument("--target-database-url", default=os.environ.get("TARGET_DATABASE_URL"),
                   help="the database to restore into (env TARGET_DATABASE_URL)")
    p.add_argument("--replace", action="store_true", help="restore over a database that already has tables")
    p.add_argument("--psql", default=os.environ.get("PSQL"), help="psql binary, at least as new as the pg_dump that made the backup (env PSQL)")
    cli.add_output_args(p)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.version_id and not args.key:
        raise UsageError("--version-id needs --key")
    target = config.database_target(args.target_database_url, "TARGET_DATABASE_URL")
    if not args.target_database_url:
        raise UsageError("no target database: set TARGET_DATABASE_URL or pass --target-database-url")
    passphrases = config.passphrases()
    psql = client_binary("psql", explicit=args.psql)
    if args.file:
        if not os.path.isfile(args.file):
            raise UsageError(f"--file {args.file}: no such file")
        if os.path.getsize(args.file) == 0:
            raise UsageError(f"--file {args.file} is empty: not a backup")
        with open(args.file, "rb") as handle:
            if crypto.detect_format(handle.read(8)) != crypto.OPENSSL_FORMAT:
                raise UsageError(f"{args.file} is not an encrypted database backup (no 'Salted__' header)")
        if not os.path.exists(args.file + ".manifest.json") and not args.without_manifest:
            raise UsageError(
                f"{args.file} has no {os.path.basename(args.file)}.manifest.json beside it: without the manifest, "
                "corruption inside the file cannot be detected. Fetch it with fetch_backup.py (it saves the "
                "manifest), or pass --without-manifest to restore it anyway"
            )
    elif args.without_manifest:
        raise UsageError("--without-manifest goes with --file")
    else:
        environment = config.environment_name(args.environment)
        bucket = config.bucket_name(args.bucket)
    client_version(psql)

    tables = user_tables(target, psql)
    if tables and not args.replace:
        raise BackupError(
            f"the target database {target.database!r} already has {len(tables)} tables "
            f"({', '.join(tables[:5])}{', …' if len(tables) > 5 else ''}): pass --replace to restore over them"
        )

    if args.file:
        backup, restored = restore_file(args.file, passphrases, target, psql)
        source = args.file
        skipped: list[str] = []
    else:
        client = s3.external_client()
        options = candidates(client, bucket, environment, "database", latest=args.latest,
                             key=args.key, version_id=args.version_id)
        workdir = tempfile.mkdtemp(prefix="restore-database-")  # 0700; ciphertext only
        try:
            def attempt(backup: Backup) -> Restored:
                passphrase = crypto.pick_passphrase(backup.manifest["key_id"], passphrases)
                path = os.path.join(workdir, "backup.sql.encrypted")
                download(client, bucket, backup, path)
                log(f"restoring {backup.label()} into {target.database!r}")
                return restore_stream(path, passphrase, target, psql, backup.manifest)

            backup, restored, skipped = first_good(options, attempt, latest=args.latest)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        source = f"s3://{bucket}/{backup.label()}"

    tables_after = user_tables(target, psql)
    result = {
        "restored": source,
        "key": getattr(backup, "key", None),
        "version_id": getattr(backup, "version_id", None),
        "target_database": target.database,
        "tables": len(tables_after),
        "plaintext_size": restored.plaintext_size,
        "seconds": round(restored.seconds, 1),
        "skipped": skipped,
    }
    cli.step_summary(f"### Database restore\n\nRestored `{source}` into `{target.database}`: "
                     f"{len(tables_after)} tables, {human_bytes(restored.plaintext_size)} of SQL.")
    cli.print_result(result, args.json,
                     f"restored {source} into database {target.database!r}: {len(tables_after)} tables, "
                     f"{human_bytes(restored.plaintext_size)} of SQL in {restored.seconds:.1f} s")
    return 0


def restore_file(path: str, passphrases: list[str], target: config.DatabaseTarget, psql: str) -> tuple[None, Restored]:
    """A local file: checked against FILE.manifest.json when there is one; otherwise
    (--without-manifest) each passphrase is tried in turn (a failed attempt rolls back)."""
    manifest, passphrases = local_manifest(path, passphrases)
    problem: VerificationError | None = None
    for passphrase in passphrases:
        try:
            log(f"restoring {path} into {target.database!r}")
            return None, restore_stream(path, passphrase, target, psql, manifest)
        except VerificationError as exc:
            problem = exc
    raise problem or VerificationError("no passphrase to try")


if __name__ == "__main__":
    cli.run(main)
