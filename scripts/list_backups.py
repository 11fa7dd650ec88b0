#!/usr/bin/env python3
"""List every backup version of an environment, newest first; alarm when the newest is too old."""

from __future__ import annotations

from backupkit import cli, config, s3
from backupkit.config import duration_arg, format_age
from backupkit.errors import BackupError
from backupkit.manifest import KINDS, Backup, catalogue, iso
from backupkit.progress import human_bytes, log

DESCRIPTION = """\
List every version of every backup of ENVIRONMENT (all pages, all versions: two backups in the
same second are both shown), newest first, with its time, size, whether it is complete (has a
manifest) and until when Object Lock retains it.

With --max-age, exit 1 when the newest complete backup of each listed kind is older than that
(or there is none): the dead-man switch for the scheduled backups.
"""

EPILOG = """\
examples:
  scripts/list_backups.py --environment production
  scripts/list_backups.py --environment production --kind database --max-age 2h
  scripts/list_backups.py --environment production --json | jq '.[0]'
"""


def build_parser() -> cli.ArgumentParser:
    p = cli.parser("list_backups.py", DESCRIPTION, EPILOG)
    cli.add_target_args(p)
    p.add_argument("--kind", choices=[*KINDS, "all"], default="all", help="which backups (default: all)")
    p.add_argument("--max-age", type=duration_arg, metavar="DURATION",
                   help="fail when the newest complete backup is older, e.g. 30m, 2h, 1d")
    p.add_argument("--no-retention", action="store_true", help="skip reading each version's retain-until date (faster)")
    cli.add_output_args(p)
    return p


def table(backups: list[Backup]) -> str:
    rows = [("STARTED (UTC)", "KIND", "SIZE", "STATUS", "RETAIN UNTIL", "VERSION", "KEY")]
    for b in backups:
        rows.append((
            iso(b.started_at), b.kind, human_bytes(b.size), "complete" if b.complete else "INCOMPLETE",
            iso(b.retain_until) if b.retain_until else "-", b.version_id or "-", b.key,
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    environment = config.environment_name(args.environment)
    bucket = config.bucket_name(args.bucket)
    kinds = KINDS if args.kind == "all" else (args.kind,)
    now = config.utcnow()
    backups = catalogue(s3.external_client(), bucket, environment, kinds, with_retention=not args.no_retention)

    if args.json:
        cli.print_result([b.to_json() for b in backups], True, "")
    elif backups:
        print(table(backups))
    else:
        print(f"no backups under s3://{bucket}/{environment}/")

    if args.max_age is None:
        return 0
    stale, fresh = [], []
    for kind in kinds:
        newest = next((b for b in backups if b.kind == kind and b.complete), None)
        if newest is None:
            stale.append(f"{kind}: no complete backup in s3://{bucket}/{environment}/{kind}/")
            continue
        age = now - newest.started_at
        if age > args.max_age:
            stale.append(f"{kind}: the newest complete backup, {newest.key}, is {format_age(age)} old "
                         f"(allowed: {format_age(args.max_age)})")
        else:
            fresh.append(f"{kind}: newest complete backup {newest.key} is {format_age(age)} old")
    if stale:
        raise BackupError(f"stale backups in {environment}: " + "; ".join(stale)
                          + ". Check the scheduled backup workflow's latest runs and logs.")
    log(f"fresh (max age {format_age(args.max_age)}): " + "; ".join(fresh))
    return 0


if __name__ == "__main__":
    cli.run(main)
