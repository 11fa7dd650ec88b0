#!/usr/bin/env python3
"""Verify backups: download, check against the manifest, decrypt without writing plaintext to
disk, check the content; optionally restore a database backup into a scratch database."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from backupkit import cli, config, crypto, s3
from backupkit.config import duration_arg, format_age
from backupkit.errors import BackupError, UsageError, VerificationError
from backupkit.manifest import KINDS, Backup, catalogue, iso
from backupkit.postgres import client_binary, client_version, row_counts, user_tables
from backupkit.progress import human_bytes, log
from backupkit.restore import restore_stream
from backupkit.retrieve import candidates, download, first_good
from backupkit.verify import verify_file

DESCRIPTION = """\
Verify backups the way a restore would read them, without writing any plaintext to disk:
  1. download the object (ciphertext only, to a private temporary directory),
  2. check its size and SHA-256 against the manifest,
  3. pick the passphrase by the manifest's key_id and decrypt (AES Crypt: HMAC checked),
  4. check the plaintext's size and SHA-256 against the manifest,
  5. check the content: a dump ends with pg_dump's completion trailer; a ZIP's central
     directory parses, every member's CRC matches and the member count is the manifest's
     object_count.
One line per backup, OK or FAILED with the reason; exit 1 if any failed.

Which backups:
  --latest          the newest backup that verifies; newer ones that do not are listed as
                    SKIPPED with the reason (exit 0 as long as one verifies)
  --key K           one backup (every failure counts); --version-id V picks one version
  --since DURATION  every backup, every version, started within DURATION (e.g. 1d): the
                    daily check; exit 1 if any of them fails or there is none

--restore-into URL (database backups) also restores each verified dump into that scratch
database with psql --single-transaction (committed only when everything verified) and
reports its tables and row counts. The database must start empty.
"""

EPILOG = """\
environment:
  EXTERNAL_BACKUP_ENCRYPTION_KEY[_PREVIOUS]  passphrases; the manifest's key_id picks the right one
  BACKUP_BUCKET, BACKUP_ENVIRONMENT, AWS_*   the external bucket (read-only access is enough)
  PSQL                                       psql for --restore-into

examples:
  scripts/verify_backup.py --environment production --kind database --latest
  scripts/verify_backup.py --environment production --kind files --since 1d
  scripts/verify_backup.py --environment production --kind database --latest \\
      --restore-into postgresql://postgres:postgres@localhost:5432/drill
"""


def build_parser() -> cli.ArgumentParser:
    p = cli.parser("verify_backup.py", DESCRIPTION, EPILOG)
    cli.add_target_args(p)
    p.add_argument("--kind", choices=KINDS, required=True, help="database or files")
    which = cli.add_backup_choice(p)
    which.add_argument("--since", type=duration_arg, metavar="DURATION",
                       help="every backup version started within DURATION, e.g. 1d, 6h")
    p.add_argument("--restore-into", metavar="URL",
                   help="also restore each database backup into this empty scratch database, e.g. postgresql://u:p@host/drill")
    p.add_argument("--psql", default=os.environ.get("PSQL"), help="psql binary for --restore-into (env PSQL)")
    cli.add_output_args(p)
    return p


class Verifier:
    """Checks one backup at a time in a private temporary directory (ciphertext only)."""

    def __init__(self, client: Any, bucket: str, passphrases: list[str], workdir: str,
                 target: config.DatabaseTarget | None, psql: str):
        self.client = client
        self.bucket = bucket
        self.passphrases = passphrases
        self.workdir = workdir
        self.target = target
        self.psql = psql

    def __call__(self, backup: Backup) -> dict[str, Any]:
        if not backup.complete:
            raise VerificationError(f"incomplete: {backup.manifest_problem}")
        manifest = backup.manifest
        passphrase = crypto.pick_passphrase(manifest["key_id"], self.passphrases)  # refuses an unknown key_id
        path = os.path.join(self.workdir, "backup.encrypted")
        try:
            download(self.client, self.bucket, backup, path)  # size and SHA-256 against the manifest
            details: dict[str, Any] = {"encrypted_size": manifest["encrypted_size"]}
            if self.target is not None:
                log(f"restoring {backup.label()} into {self.target.database!r}")
                restored = restore_stream(path, passphrase, self.target, self.psql, manifest)
                counts = row_counts(self.target, self.psql)
                details.update(plaintext_size=restored.plaintext_size, trailer=True,
                               restored_into=self.target.database, tables=len(counts), rows=counts)
            else:
                details.update(verify_file(path, passphrase, manifest))
        finally:
            if os.path.exists(path):
                os.unlink(path)
        return details


def describe(backup: Backup, result: dict[str, Any]) -> str:
    if not result["ok"]:
        return f"FAILED  {backup.label()}: {result['reason']}"
    text = f"OK      {backup.label()}: {human_bytes(result['encrypted_size'])} encrypted"
    if backup.kind == "database":
        text += f", {human_bytes(result['plaintext_size'])} dump, completion trailer present"
    else:
        text += (f", {human_bytes(result['plaintext_size'])} ZIP, {result['members']} members "
                 f"({human_bytes(result['member_bytes'])}), CRCs and central directory match")
    if "restored_into" in result:
        rows = result["rows"]
        text += (f"; restored into {result['restored_into']!r}: {result['tables']} tables, "
                 f"{sum(rows.values())} rows")
        text += "".join(f"\n          {table}: {count} rows" for table, count in rows.items())
    return text


def outcome(backup: Backup, ok: bool, details: dict[str, Any] | None = None, reason: str | None = None) -> dict[str, Any]:
    return {"key": backup.key, "version_id": backup.version_id, "kind": backup.kind,
            "started_at": iso(backup.started_at), "ok": ok, "reason": reason, **(details or {})}


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.version_id and not args.key:
        raise UsageError("--version-id needs --key")
    if args.restore_into and args.kind != "database":
        raise UsageError("--restore-into restores database backups only (use restore_files.py for files)")
    environment = config.environment_name(args.environment)
    bucket = config.bucket_name(args.bucket)
    passphrases = config.passphrases()
    now = config.utcnow()
    target, psql = None, client_binary("psql", explicit=args.psql)
    if args.restore_into:
        target = config.database_target(args.restore_into, "--restore-into")
        client_version(psql)
        tables = user_tables(target, psql)
        if tables:
            raise BackupError(f"--restore-into {target.database!r} already has {len(tables)} tables: "
                              "give an empty scratch database (this check never restores over data)")

    client = s3.external_client()
    results: list[dict[str, Any]] = []
    skipped: list[str] = []
    workdir = tempfile.mkdtemp(prefix="verify-backup-")  # 0700; ciphertext only
    try:
        verifier = Verifier(client, bucket, passphrases, workdir, target, psql)
        if args.since:
            backups = [b for b in catalogue(client, bucket, environment, (args.kind,)) if now - b.started_at <= args.since]
            if not backups:
                raise BackupError(f"no {args.kind} backup started within the last {format_age(args.since)} in "
                                  f"s3://{bucket}/{environment}/{args.kind}/: check the scheduled backups")
            for backup in backups:
                log(f"verifying {backup.label()}")
                try:
                    results.append(outcome(backup, True, verifier(backup)))
                except UsageError:
                    raise
                except BackupError as exc:
                    results.append(outcome(backup, False, reason=str(exc)))
                if not args.json:
                    print(describe(backup, results[-1]), flush=True)
        else:
            options = candidates(client, bucket, environment, args.kind, latest=args.latest,
                                 key=args.key, version_id=args.version_id)
            try:
                backup, details, skipped = first_good(options, verifier, latest=args.latest)
                results.append(outcome(backup, True, details))
            except VerificationError as exc:  # one named backup that fails
                backup = options[0]
                results.append(outcome(backup, False, reason=str(exc).removeprefix(f"{backup.label()} is ")))
            if not args.json:
                for line in skipped:
                    print("SKIPPED " + line.removeprefix("skipped "))
                print(describe(backup, results[-1]))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    failed = [r for r in results if not r["ok"]]
    if args.json:
        cli.print_result({"ok": not failed, "results": results, "skipped": skipped}, True, "")
    rows = "".join(f"| `{r['key']}` | `{r['version_id']}` | {'OK' if r['ok'] else 'FAILED: ' + r['reason']} |\n" for r in results)
    cli.step_summary(f"### Verify {args.kind} backups: {environment}\n\n| key | version | result |\n|---|---|---|\n{rows}")
    if failed:
        raise BackupError(f"{len(failed)} of {len(results)} {args.kind} backups failed verification "
                          f"(first: {failed[0]['key']}: {failed[0]['reason']}); keep the failing ones out of restores "
                          "and check the backup job's logs")
    return 0


if __name__ == "__main__":
    cli.run(main)
