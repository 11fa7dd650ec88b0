#!/usr/bin/env python3
"""Restore a database backup: streamed from the bucket through `openssl -d` into psql in one
transaction, committed only once the download and the SQL checked out at its end."""

from __future__ import annotations

import os

from backupkit import cli, config, store
from backupkit.crypto import start_key_ids
from backupkit.dump_restore import Restored, add_restore_args, check_restore_target, restore_dump, restore_options
from backupkit.errors import BackupError, UsageError
from backupkit.output import md_code, shown
from backupkit.pgurl import DatabaseTarget
from backupkit.postgres import client_binary, database_target, user_tables
from backupkit.progress import human_bytes
from backupkit.retrieve import BucketReader, Fetched, Retrieved, local_format, open_local

DESCRIPTION = """\
Restore a database backup into TARGET with
  openssl enc -d -aes-256-cbc -pbkdf2 [| zstd -d] | psql -v ON_ERROR_STOP=1
in one transaction (its BEGIN and COMMIT sent by this script, never by the end of psql's input).
The backup streams from the bucket into psql as it downloads (a connection that breaks off
resumes where it stopped). Nothing plaintext touches the disk, and nothing is committed unless
the whole backup verified at its end: the download's size and SHA-256 match the manifest,
openssl (and zstd) exited 0, the SQL's SHA-256 matches, and pg_dump's completion trailer is
there. Until then the end of the dump is held back from psql, and so is the COMMIT; on any
failure psql is killed and its transaction rolls back (if this script is killed outright, psql
reads the end of its input without a COMMIT, and its transaction rolls back too).

psql runs restricted (its \\restrict, with a key of ours) from its first input byte, and the SQL
passes a guard on its way: only the statements a plain pg_dump of one database writes reach psql.
A backup holding psql commands (\\! runs a shell command), transaction control (a COMMIT of its
own would end the single transaction), role or session changes (ALTER ROLE, SET ROLE), ALTER
SYSTEM, database or tablespace commands, COPY to or from a file or a program, DO, or a SELECT of
anything but what pg_dump calls is refused and rolled back, and the error names what it held.
psql's own variables (:DBNAME, :"USER", …) cannot change what the dump means. Before the commit, a
check rolls the restore back if it changed roles, role or database settings or other shared
catalogs (a function of the dump, called from a default or an index, could). The psql must be
recent enough to be restricted: 13.22, 14.19, 15.14, 16.10, 17.6 or newer.

The target's role must not be a superuser, nor able to act as one (a member of a superuser role,
of pg_execute_server_program, pg_read_server_files or pg_write_server_files, or CREATEROLE): the
backup's SQL runs with its rights on the database server, where a superuser's COPY … TO PROGRAM
runs commands. --allow-superuser accepts it.

Never more than the manifest promised is read (a compressed plant cannot expand without end), no
statement runs longer than --statement-timeout (default 1h), and one backup's restore is stopped
after --timeout (default 24h); both roll back.

--latest takes the newest backup that verifies, naming the newer ones it skipped and why. When
one fails after psql started, it goes on only if the target is as it was before (its objects,
their storage, the role's settings and memberships); otherwise it stops and says so.
A target that already has tables is refused unless --replace (the dump drops and recreates
every table it holds: use it over a database the app has already started).
"""

EPILOG = """\
environment:
  EXTERNAL_BACKUP_ENCRYPTION_KEY[_PREVIOUS]  passphrases; the manifest's key_id picks the right one
  TARGET_DATABASE_URL                        postgresql://USER@HOST:PORT/DB (several hosts:
                                             HOST1:PORT1,HOST2:PORT2)
  PGPASSWORD                                 the target's password: never put it on a command line
  BACKUP_BUCKET, BACKUP_ENVIRONMENT, AWS_*   the external bucket (read-only access is enough)
  BACKUP_RESTORE_TIMEOUT, BACKUP_STATEMENT_TIMEOUT, BACKUP_ALLOW_SUPERUSER=1
                                             --timeout, --statement-timeout, --allow-superuser

examples:
  scripts/restore_database.py --environment production --latest --target-database-url "$TARGET_DATABASE_URL"
  scripts/restore_database.py --environment production --key 2026-11-29--10-00-00.sql.encrypted \\
      --version-id 3HL4kqtJ... --replace
      (--version-id: needed when the key has several versions; list_backups.py shows them)
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
                   help="the database to restore into (env TARGET_DATABASE_URL); its password in PGPASSWORD, "
                        "not on the command line")
    p.add_argument("--replace", action="store_true", help="restore over a database that already has tables")
    p.add_argument("--psql", default=os.environ.get("PSQL"), help="psql binary, at least as new as the pg_dump that made the backup (env PSQL)")
    add_restore_args(p)
    cli.add_output_args(p)
    return p


def main(argv: list[str]) -> int:
    args = cli.parse_args(build_parser(), argv)
    cli.start(args)
    if args.version_id and not args.key:
        raise UsageError("--version-id needs --key")
    if args.without_manifest and not args.file:
        raise UsageError("--without-manifest goes with --file")
    target = database_target(args.target_database_url, "TARGET_DATABASE_URL")
    if not args.target_database_url:
        raise UsageError("no target database: set TARGET_DATABASE_URL or pass --target-database-url")
    passphrases = config.passphrases()
    start_key_ids(passphrases)  # PBKDF2, in a thread: ready by the time the manifest names one
    psql = client_binary("psql", explicit=args.psql)
    if args.file:
        local_format(args.file, "database")
    else:
        environment = config.environment_name(args.environment)
        bucket = config.bucket_name(args.bucket)
        client = store.external_store_soon()  # made while psql checks the target
    options = restore_options(args)
    tables = check_restore_target(target, psql, options)
    if tables and not args.replace:
        raise BackupError(
            f"the target database '{shown(target.database)}' already has {len(tables)} tables "
            f"({', '.join(shown(t) for t in tables[:5])}{', …' if len(tables) > 5 else ''}): pass --replace to restore over them"
        )

    committing: list[str] = []  # the backup whose end psql was given: from then on it may commit
    committed: list[str] = []  # the backup whose restore psql committed: what a signal after it must not deny

    def left() -> str:
        if committed:
            return f"{committed[0]} had been restored into database '{shown(target.database)}' (committed)"
        if committing:
            return (f"the restore of {committing[-1]} was committing when it was stopped: psql was killed, so nothing is "
                    f"committed unless the commit had already happened; look at database '{shown(target.database)}' "
                    "before running it again")
        return ""

    cli.on_interrupt(left)

    def restore(fetched: Fetched) -> Restored:
        restored = restore_dump(fetched, target=target, psql=psql, options=options,
                                on_commit=lambda: committing.append(fetched.label))
        committed.append(fetched.label)
        return restored

    if args.file:
        retrieved = open_local(args.file, "database", passphrases, restore, require_manifest=not args.without_manifest)
    else:
        reader = BucketReader(client.result(), bucket, environment, "database", passphrases)
        candidates = reader.candidates(latest=args.latest, key=args.key, version_id=args.version_id)
        retrieved = reader.first_good(candidates, restore, latest=args.latest, stream=True)
    report(retrieved, target, psql, args.json)
    return 0


def report(retrieved: Retrieved[Restored], target: DatabaseTarget, psql: str, as_json: bool) -> None:
    fetched, restored = retrieved.fetched, retrieved.result
    tables_after = user_tables(target, psql)
    result = {
        "restored": fetched.label,
        "key": fetched.backup.key if fetched.backup else None,
        "version_id": fetched.backup.version_id if fetched.backup else None,
        "target_database": target.database,
        "tables": len(tables_after),
        "plaintext_size": restored.plaintext_size,
        "seconds": round(restored.seconds, 1),
        "skipped": [s.to_json() for s in retrieved.skipped],
    }
    cli.step_summary(f"### Database restore\n\nRestored {md_code(fetched.label, already_shown=True)} into {md_code(target.database)}: "
                     f"{len(tables_after)} tables, {human_bytes(restored.plaintext_size)} of SQL.")
    cli.print_result(result, as_json,
                     f"restored {fetched.label} into database '{shown(target.database)}': {len(tables_after)} tables, "
                     f"{human_bytes(restored.plaintext_size)} of SQL in {restored.seconds:.1f} s")


if __name__ == "__main__":
    cli.run(main)
