#!/usr/bin/env python3
"""List every backup version of an environment, newest first; alarm when the newest is too old."""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from backupkit import bucket_state, cli, config, s3, store
from backupkit.config import duration_arg, format_age
from backupkit.errors import BackupError, Problem, UsageError
from backupkit.manifest import KINDS, Backup, Catalogue, catalogue, iso, read_retention
from backupkit.output import log, shown
from backupkit.progress import human_bytes

SHOWN_PER_PROBLEM = 5  # versions shown per problem (the newest); the others are counted
MAX_LISTING_READS = 5000  # manifests a listing reads, newest first: 200 days of hourly backups

DESCRIPTION = f"""\
List every version of every backup of ENVIRONMENT (all pages, all versions: two backups in the
same second are both shown), newest first by when S3 stored it, with the time its name says it
started, its size, its status and until when Object Lock retains it.

STATUS: complete; incomplete (no manifest: the run did not finish); bad manifest; corrupt (its
size differs from its manifest); unreadable (stored in an archived storage class such as GLACIER:
S3 refuses to read it until it is restored); suspicious (its name's time is in the future, or
days before S3 stored it: not how a backup run looks; never used as "latest", never counted as
fresh). Each problem is explained under the table.

Planted objects cannot make the listing long or slow: every usable backup is shown, but of each
problem only the newest {SHOWN_PER_PROBLEM} versions, the others counted under the table; a listing reads at most
{MAX_LISTING_READS:,} manifests, newest first, and counts the older versions it did not check. --all shows and
reads every one. RETAIN UNTIL is read (one HEAD each) for the versions shown; a "-" there is
explained once under the table.

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
    p.add_argument("--all", action="store_true",
                   help="show every version, however many share a problem, and read every manifest (slow when "
                        "someone planted thousands of objects)")
    cli.add_heartbeat_arg(p)
    cli.add_output_args(p)
    return p


@dataclass
class Selection:
    """What the table shows: every usable backup, the newest few of each problem; the rest counted."""

    shown: list[Backup] = field(default_factory=list)
    hidden: Counter[Problem] = field(default_factory=Counter)
    unchecked: int = 0  # over MAX_LISTING_READS: not checked at all


def select(found: Catalogue, everything: bool) -> Selection:
    selection = Selection()
    per_problem: Counter[Problem] = Counter()
    for backup in found.walk(found.backups, read_archived=True, budget=None if everything else MAX_LISTING_READS):
        if not backup.checked:
            selection.unchecked += 1
        elif everything or backup.problem is None or per_problem[backup.problem] < SHOWN_PER_PROBLEM:
            selection.shown.append(backup)
            if backup.problem is not None:
                per_problem[backup.problem] += 1
        else:
            selection.hidden[backup.problem] += 1
    return selection


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


def notes(selection: Selection, retention: str | None) -> list[str]:
    """The lines under the table: what was left out, and why RETAIN UNTIL may say '-'."""
    lines = []
    if selection.hidden:
        counts = ", ".join(f"{n:,} {problem.value}" for problem, n in selection.hidden.most_common())
        lines.append(f"note: {sum(selection.hidden.values()):,} more versions not shown ({counts}): of each problem "
                     f"the newest {SHOWN_PER_PROBLEM} are above; --all lists every one")
    if selection.unchecked:
        lines.append(f"note: {selection.unchecked:,} older versions not checked: a listing reads at most "
                     f"{MAX_LISTING_READS:,} manifests, newest first; --all reads every one")
    if retention:
        lines.append(retention)
    return lines


def retention_note(client: Any, bucket: str, backups: list[Backup], failed: int | None) -> str | None:
    """Once, why some versions show RETAIN UNTIL '-' (None: all have a date). `failed` is how
    many HEADs were refused; None: --no-retention."""
    missing = sum(1 for b in backups if b.retain_until is None)
    if not missing:
        return None
    what = f'note: RETAIN UNTIL "-" for {missing:,} of the {len(backups):,} versions shown'
    if failed is None:
        return f"{what}: not read (--no-retention)"
    why = bucket_state.why_no_retain_until(client, bucket)
    refused = f"; S3 refused the HEAD of {failed:,} of them" if failed else ""
    return f"{what}: {why}{refused}"


def max_ages(values: list[tuple[str | None, timedelta]] | None, kinds: tuple[str, ...]) -> dict[str, timedelta]:
    limits: dict[str, timedelta] = {}
    for kind, age in values or []:
        for k in ([kind] if kind else kinds):
            limits[k] = age
    unknown = set(limits) - set(kinds)
    if unknown:
        raise UsageError(f"--max-age names {', '.join(sorted(unknown))}, which --kind leaves out")
    return limits


def newest_usable(found: Catalogue, kind: str) -> Backup | None:
    """Newest first, reading manifests only until one is usable."""
    return next((b for b in found.walk([b for b in found.backups if b.kind == kind]) if b.usable), None)


def freshness(found: Catalogue, limits: dict[str, timedelta], now: datetime, where: str) -> tuple[list[str], list[str]]:
    """(stale, fresh) lines: per kind, the newest usable backup against its limit."""
    stale, fresh = [], []
    for kind, limit in limits.items():
        newest = newest_usable(found, kind)
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
    cli.start(args)
    environment = config.environment_name(args.environment)
    bucket = config.bucket_name(args.bucket)
    kinds = KINDS if args.kind == "all" else (args.kind,)
    limits = max_ages(args.max_age, kinds)
    now = config.utcnow()
    client = store.external_store()
    found = catalogue(client, bucket, environment, kinds)

    if not found.backups and not found.others_count:
        others = [e for e in environments(client, bucket) if e != environment]
        hint = f" (the bucket has: {', '.join(shown(e) for e in others[:20])})" if others else ""
        raise BackupError(f"no backups under s3://{bucket}/{environment}/: check --environment and --bucket{hint}")
    selection = select(found, args.all)
    backups = selection.shown
    failed = None if args.no_retention else read_retention(client, bucket, backups)
    under = notes(selection, retention_note(client, bucket, backups, failed))
    if args.json:
        cli.print_result([b.to_json() for b in backups], True, "")
        for line in under:
            log(line)
    else:
        cli.print_result(None, False, "\n".join([table(backups) if backups else f"no backups under s3://{bucket}/{environment}/",
                                                 *under]))
    if found.others_count:
        log(f"note: {found.others_count} other objects under s3://{bucket}/{environment}/ are not backups and were "
            f"ignored (first: {shown(found.others[0])})")
    for backup in backups:
        if backup.problem is Problem.SUSPICIOUS:
            cli.warn(f"suspicious backup {backup.label()}: {backup.detail}. Check who can write the bucket.")
    if selection.hidden[Problem.SUSPICIOUS]:
        cli.warn(f"{selection.hidden[Problem.SUSPICIOUS]:,} more suspicious backups, not shown (--all lists them). "
                 "Check who can write the bucket.")

    if not limits:
        return 0
    stale, fresh = freshness(found, limits, now, f"s3://{bucket}/{environment}/")
    if stale:
        raise BackupError(f"stale backups in {environment}: " + "; ".join(stale)
                          + ". Check the scheduled backup workflow's latest runs and logs.")
    log("fresh: " + "; ".join(fresh))
    return 0


if __name__ == "__main__":
    cli.run(main)
