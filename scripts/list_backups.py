#!/usr/bin/env python3
"""List every backup version of an environment, newest first; alarm when the newest is too old."""

from __future__ import annotations

import argparse
from datetime import datetime, timedelta
from typing import Any

from backupkit import cli, config, s3
from backupkit.config import duration_arg, format_age
from backupkit.errors import BackupError, Problem, UsageError
from backupkit.manifest import KINDS, Backup, catalogue, iso
from backupkit.output import log, shown
from backupkit.progress import human_bytes

DESCRIPTION = """\
List every version of every backup of ENVIRONMENT (all pages, all versions: two backups in the
same second are both shown), newest first by when S3 stored it, with the time its name says it
started, its size, its status and until when Object Lock retains it.

STATUS: complete; incomplete (no manifest: the run did not finish); bad manifest; corrupt (its
size differs from its manifest); suspicious (its name's time is in the future, or days before S3
stored it: not how a backup run looks; never used as "latest", never counted as fresh). Each
problem is explained under the table.

With --max-age, exit 1 when the newest usable backup of each listed kind is older than that (or
there is none): the freshness alarm for the scheduled backups. Age is measured from the earlier
of the name's time and S3's LastModified, so no name a writer chooses makes a backup look newer.
"""

EPILOG = """\
examples:
  scripts/list_backups.py --environment production
  scripts/list_backups.py --environment production --kind database --max-age 2h
  scripts/list_backups.py --environment production --max-age database=3h --max-age files=32h
  scripts/list_backups.py --environment production --json | jq '.[0]'
"""


def max_age_arg(value: str) -> tuple[str | None, timedelta]:
    """`2h` (every listed kind) or `database=3h`."""
    kind, sep, duration = value.rpartition("=")
    if sep and kind not in KINDS:
        raise argparse.ArgumentTypeError(f"unknown kind '{shown(kind)}' in '{shown(value)}': use database=DURATION or files=DURATION")
    return (kind or None), duration_arg(duration)


def build_parser() -> cli.ArgumentParser:
    p = cli.parser("list_backups.py", DESCRIPTION, EPILOG)
    cli.add_target_args(p)
    p.add_argument("--kind", choices=[*KINDS, "all"], default="all", help="which backups (default: all)")
    p.add_argument("--max-age", type=max_age_arg, action="append", metavar="[KIND=]DURATION",
                   help="fail when the newest usable backup is older, e.g. 2h, or per kind: database=3h "
                        "(repeat the flag for each kind)")
    p.add_argument("--no-retention", action="store_true", help="skip reading each version's retain-until date (faster)")
    cli.add_heartbeat_arg(p)
    cli.add_output_args(p)
    return p


def table(backups: list[Backup]) -> str:
    rows = [("STARTED (UTC)", "STORED (UTC)", "KIND", "SIZE", "STATUS", "RETAIN UNTIL", "VERSION", "KEY")]
    for b in backups:
        rows.append((
            iso(b.name_time), iso(b.last_modified), b.kind, human_bytes(b.size), b.status.upper() if b.problem else b.status,
            iso(b.retain_until) if b.retain_until else "-", shown(b.version_id or "-"), shown(b.key),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    lines += [f"note: {b.label()}: {b.detail}" for b in backups if b.problem]
    return "\n".join(lines)


def max_ages(values: list[tuple[str | None, timedelta]] | None, kinds: tuple[str, ...]) -> dict[str, timedelta]:
    limits: dict[str, timedelta] = {}
    for kind, age in values or []:
        for k in ([kind] if kind else kinds):
            limits[k] = age
    unknown = set(limits) - set(kinds)
    if unknown:
        raise UsageError(f"--max-age names {', '.join(sorted(unknown))}, which --kind leaves out")
    return limits


def freshness(backups: list[Backup], limits: dict[str, timedelta], now: datetime, where: str) -> tuple[list[str], list[str]]:
    """(stale, fresh) lines: per kind, the newest usable backup against its limit."""
    stale, fresh = [], []
    for kind, limit in limits.items():
        newest = next((b for b in backups if b.kind == kind and b.usable), None)
        if newest is None:
            stale.append(f"{kind}: no usable backup in {where}{kind}/")
            continue
        age = now - newest.taken_at
        if age > limit:
            stale.append(f"{kind}: the newest usable backup, {newest.label()}, is {format_age(age)} old "
                         f"(allowed: {format_age(limit)})")
        else:
            fresh.append(f"{kind}: newest usable backup {newest.label()} is {format_age(age)} old "
                         f"(max age {format_age(limit)})")
    return stale, fresh


def environments(client: Any, bucket: str) -> list[str]:
    """The top-level folders of the bucket (for a mistyped --environment)."""
    with s3.s3_errors(f"list s3://{bucket}/"):
        answer = client.list_objects_v2(Bucket=bucket, Delimiter="/", MaxKeys=100)
    return [p["Prefix"].rstrip("/") for p in answer.get("CommonPrefixes", [])]


def main(argv: list[str]) -> int:
    args = cli.parse_args(build_parser(), argv)
    environment = config.environment_name(args.environment)
    bucket = config.bucket_name(args.bucket)
    kinds = KINDS if args.kind == "all" else (args.kind,)
    limits = max_ages(args.max_age, kinds)
    now = config.utcnow()
    client = s3.external_client()
    found = catalogue(client, bucket, environment, kinds, with_retention=not args.no_retention)
    backups = found.backups

    if not backups and not found.others:
        others = [e for e in environments(client, bucket) if e != environment]
        hint = f" (the bucket has: {', '.join(shown(e) for e in others[:20])})" if others else ""
        raise BackupError(f"no backups under s3://{bucket}/{environment}/: check --environment and --bucket{hint}")
    if args.json:
        cli.print_result([b.to_json() for b in backups], True, "")
    else:
        cli.print_result(None, False, table(backups) if backups else f"no backups under s3://{bucket}/{environment}/")
    if found.others:
        log(f"note: {len(found.others)} other objects under s3://{bucket}/{environment}/ are not backups and were "
            f"ignored (first: {shown(found.others[0])})")
    for backup in backups:
        if backup.problem is Problem.SUSPICIOUS:
            cli.warn(f"suspicious backup {backup.label()}: {backup.detail}. Check who can write the bucket.")

    if not limits:
        return 0
    stale, fresh = freshness(backups, limits, now, f"s3://{bucket}/{environment}/")
    if stale:
        raise BackupError(f"stale backups in {environment}: " + "; ".join(stale)
                          + ". Check the scheduled backup workflow's latest runs and logs.")
    log("fresh: " + "; ".join(fresh))
    return 0


if __name__ == "__main__":
    cli.run(main)
