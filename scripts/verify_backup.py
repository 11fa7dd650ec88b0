#!/usr/bin/env python3
"""Verify backups: download (streamed, checked against the manifest at its end), decrypt
without writing anything to disk, check the content; optionally restore a database backup into a scratch database."""

from __future__ import annotations

import os
from typing import Any

from backupkit import cli, config, formats, store
from backupkit.config import duration_arg, format_age
from backupkit.dump_restore import RestoreOptions, add_restore_args, check_restore_target, restore_dump, restore_options
from backupkit.errors import BackupError, Problem, UsageError, VerificationError
from backupkit.manifest import KINDS, Backup, compression_of, iso
from backupkit.output import log, md_code, shown
from backupkit.pgurl import DatabaseTarget
from backupkit.postgres import client_binary, database_target, row_counts
from backupkit.progress import human_bytes
from backupkit.retrieve import BucketReader, Fetched, Skips
from backupkit.verify import verify_fetched

DESCRIPTION = """\
Verify backups the way a restore would read them, without writing any plaintext to disk:
  1. download the object, decrypted as it downloads (nothing written, ciphertext included),
  2. check its size and SHA-256 against the manifest at its end,
  3. pick the passphrase by the manifest's key_id and decrypt (AES Crypt: HMAC checked),
  4. check the plaintext's size and SHA-256 against the manifest,
  5. check the content: a dump ends with pg_dump's completion trailer; a ZIP's central
     directory parses, every member's CRC matches and the member count is the manifest's
     object_count.
One line per backup, OK or FAILED with the reason; exit 1 if any failed.

Which backups:
  --latest          the newest backup that verifies; newer ones that do not (or that S3
                    will not hand over: an archived storage class) are listed as SKIPPED with
                    the reason, the first 10 by name, the rest counted (exit 0 as long as one
                    verifies)
  --key K           one backup (every failure counts); --version-id V picks one version, and
                    is needed when the key has more than one (a writer can add one any time)
  --since DURATION  every backup, every version, started within DURATION (e.g. 1d): the
                    daily check; exit 1 if any of them fails (an unreadable one too) or there
                    is none

A dump's content is also read as psql would read it: one that holds what a plain pg_dump of one
database never writes (psql commands, COMMIT, ALTER ROLE, COPY … PROGRAM, …) fails. Never more
than the manifest promised is read: a compressed plant cannot expand without end.

--restore-into URL (database backups) also restores each verified dump into that scratch
database, as restore_database.py does (the guard, the seal, the timeouts; a role that is not a
superuser, unless --allow-superuser), committed only when everything verified, and reports its
tables and exact row counts. The database must start empty. When --latest's candidate fails
after psql started, an older one is tried only if the scratch database is as it was.
"""

EPILOG = """\
environment:
  EXTERNAL_BACKUP_ENCRYPTION_KEY[_PREVIOUS]  passphrases; the manifest's key_id picks the right one
  BACKUP_BUCKET, BACKUP_ENVIRONMENT, AWS_*   the external bucket (read-only access is enough)
  PSQL                                       psql for --restore-into
  BACKUP_RESTORE_TIMEOUT, BACKUP_STATEMENT_TIMEOUT, BACKUP_ALLOW_SUPERUSER=1
                                             --timeout, --statement-timeout, --allow-superuser (--restore-into)

examples:
  scripts/verify_backup.py --environment production --kind database --latest
  scripts/verify_backup.py --environment production --kind files --since 1d
  read -rsp 'drill password: ' PGPASSWORD && export PGPASSWORD   # not in the URL: argv is visible
  scripts/verify_backup.py --environment production --kind database --latest \\
      --restore-into postgresql://drill_owner@localhost:5432/drill
"""

# Results shown one by one (lines, summary rows); more are counted: a flood of planted objects
# in the window must not make thousands of lines.
SHOWN_RESULTS = 100


def build_parser() -> cli.ArgumentParser:
    p = cli.parser("verify_backup.py", DESCRIPTION, EPILOG)
    cli.add_target_args(p)
    p.add_argument("--kind", choices=KINDS, required=True, help="database or files")
    which = cli.add_backup_choice(p)
    which.add_argument("--since", type=duration_arg, metavar="DURATION",
                       help="every backup version started within DURATION, e.g. 1d, 6h")
    p.add_argument("--restore-into", metavar="URL",
                   help="also restore each database backup into this empty scratch database, e.g. postgresql://user@host/drill "
                        "(its password in PGPASSWORD, not on the command line; a role that is not a superuser)")
    p.add_argument("--psql", default=os.environ.get("PSQL"), help="psql binary for --restore-into (env PSQL)")
    add_restore_args(p)
    cli.add_heartbeat_arg(p)
    cli.add_output_args(p)
    return p


def check(fetched: Fetched, target: DatabaseTarget | None, psql: str, options: RestoreOptions) -> dict[str, Any]:
    """Verify one fetched backup; with a target, restore it there (the restore verifies too)."""
    manifest = fetched.manifest
    details: dict[str, Any] = {"encrypted_size": manifest["encrypted_size"], "compression": compression_of(manifest)}
    if target is None:
        details.update(verify_fetched(fetched))
        return details
    restored = restore_dump(fetched, target, psql, options)
    counts = row_counts(target, psql)
    details.update(plaintext_size=restored.plaintext_size, trailer=True, restored_into=target.database,
                   tables=len(counts), rows=counts, restore_seconds=round(restored.seconds, 2))
    return details


def describe(backup: Backup, result: dict[str, Any]) -> str:
    if not result["ok"]:
        return f"FAILED  {backup.label()}: {result['reason']}"
    text = f"OK      {backup.label()}: {human_bytes(result['encrypted_size'])} encrypted"
    if backup.kind == "database":
        compression = formats.find("database", result.get("compression"))
        compressed = f", {compression.compression.name}-compressed" if compression and compression.compression.compresses else ""
        text += f"{compressed}, {human_bytes(result['plaintext_size'])} dump, completion trailer present"
    else:
        text += (f", {human_bytes(result['plaintext_size'])} ZIP, {result['members']} members "
                 f"({human_bytes(result['member_bytes'])}), CRCs and central directory match")
        if result.get("skipped_objects"):
            text += f"; {result['skipped_objects']} objects of the source were skipped by the backup (see its manifest)"
    if "restored_into" in result:
        rows = result["rows"]
        text += (f"; restored into '{shown(result['restored_into'])}': {result['tables']} tables, "
                 f"{sum(rows.values())} rows")
        text += "".join(f"\n          {shown(table)}: {count} rows" for table, count in rows.items())
    return text


def outcome(backup: Backup, ok: bool, details: dict[str, Any] | None = None, reason: str | None = None,
            problem: Problem | None = None) -> dict[str, Any]:
    return {"key": backup.key, "version_id": backup.version_id, "kind": backup.kind,
            "started_at": iso(backup.name_time), "last_modified": iso(backup.last_modified), "ok": ok,
            "problem": problem.value if problem else None, "reason": reason, **(details or {})}


def main(argv: list[str]) -> int:
    args = cli.parse_args(build_parser(), argv)
    cli.start(args)
    if args.version_id and not args.key:
        raise UsageError("--version-id needs --key")
    if args.restore_into and args.kind != "database":
        raise UsageError("--restore-into restores database backups only (use restore_files.py for files)")
    environment = config.environment_name(args.environment)
    bucket = config.bucket_name(args.bucket)
    passphrases = config.passphrases()
    now = config.utcnow()
    target, psql = None, client_binary("psql", explicit=args.psql)
    limits = restore_options(args)
    if args.restore_into:
        target = database_target(args.restore_into, "--restore-into")
        tables = check_restore_target(target, psql, limits)
        if tables:
            raise BackupError(f"--restore-into '{shown(target.database)}' already has {len(tables)} tables: "
                              "give an empty scratch database (this check never restores over data)")

    reader = BucketReader(store.external_store(), bucket, environment, args.kind, passphrases)
    results: list[dict[str, Any]] = []
    skipped = Skips()

    def work(fetched: Fetched) -> dict[str, Any]:
        return check(fetched, target, psql, limits)

    if args.since:
        backups = reader.since(args.since, now)
        if not backups:
            raise BackupError(f"no {args.kind} backup started within the last {format_age(args.since)} in "
                              f"s3://{bucket}/{environment}/{args.kind}/: check the scheduled backups")
        for backup in backups:
            log(f"verifying {backup.label()}")
            try:
                results.append(outcome(backup, True, reader.open(backup, work, stream=True).result))
            except VerificationError as exc:
                results.append(outcome(backup, False, reason=str(exc), problem=exc.problem))
            if not args.json and len(results) <= SHOWN_RESULTS:
                cli.print_result(None, False, describe(backup, results[-1]))
        if not args.json and len(results) > SHOWN_RESULTS:
            cli.print_result(None, False, f"… and {counted(results[SHOWN_RESULTS:])} (--json lists every one)")
    else:
        options = reader.candidates(latest=args.latest, key=args.key, version_id=args.version_id)
        try:
            retrieved = reader.first_good(options, work, latest=args.latest, stream=True)
            backup = retrieved.fetched.backup
            skipped = retrieved.skipped
            results.append(outcome(backup, True, retrieved.result))
        except VerificationError as exc:  # the one named backup fails
            backup = options[0]
            results.append(outcome(backup, False, reason=str(exc).removeprefix(f"{backup.label()}: "), problem=exc.problem))
        if not args.json:
            lines = [f"SKIPPED {s.line()}" for s in skipped] + ([f"SKIPPED {skipped.more()}"] if skipped.more() else [])
            lines.append(describe(backup, results[-1]))
            cli.print_result(None, False, "\n".join(lines))

    report(args, environment, results, skipped)
    return 0


def restore_timing(result: dict[str, Any]) -> str:
    """The drill's recovery time, for the step summary: a team sees it grow before an outage does."""
    seconds = max(result["restore_seconds"], 0.001)
    return (f"Restore of {md_code(result['key'])} into {md_code(result['restored_into'])}: {seconds:.1f} s wall, "
            f"{human_bytes(result['plaintext_size'])} of SQL at {human_bytes(result['plaintext_size'] / seconds)}/s, "
            f"{human_bytes(result['encrypted_size'])} downloaded at {human_bytes(result['encrypted_size'] / seconds)}/s "
            "(streamed: download, decryption and psql at once).")


def counted(results: list[dict[str, Any]]) -> str:
    failed = sum(1 for r in results if not r["ok"])
    return f"{len(results)} more: {len(results) - failed} OK, {failed} FAILED"


def report(args: Any, environment: str, results: list[dict[str, Any]], skipped: Skips) -> None:
    failed = [r for r in results if not r["ok"]]
    if args.json:
        cli.print_result({"ok": not failed, "results": results, "skipped": [s.to_json() for s in skipped],
                          "skipped_count": skipped.total}, True, "")
    rows = "".join(f"| {md_code(r['key'])} | {md_code(r['version_id'])} | "
                   f"{'OK' if r['ok'] else 'FAILED: ' + md_code(r['reason'])} |\n" for r in results[:SHOWN_RESULTS])
    if len(results) > SHOWN_RESULTS:  # a flood of planted objects must not outgrow the summary (1 MiB)
        rows += f"| … | | {counted(results[SHOWN_RESULTS:])} |\n"
    timings = "".join(f"\n{restore_timing(r)}\n" for r in results[:SHOWN_RESULTS] if r["ok"] and "restore_seconds" in r)
    cli.step_summary(f"### Verify {args.kind} backups: {environment}\n\n| key | version | result |\n|---|---|---|\n{rows}"
                     f"{timings}")
    for r in results:
        if r["ok"] and r.get("skipped_objects"):
            cli.warn(f"the files backup {shown(r['key'])} left out {r['skipped_objects']} objects of the source bucket "
                     "(archived storage classes, or deleted during the run): its manifest names them")
    if failed:
        first = failed[0]
        raise BackupError(f"{len(failed)} of {len(results)} {args.kind} backups failed verification "
                          f"(first: {shown(first['key'])}: {first['reason']}); keep the failing ones out of restores "
                          "and check the backup job's logs")


if __name__ == "__main__":
    cli.run(main)
