#!/usr/bin/env python3
"""The loss tripwire: compare the newest backup's profile with the window's, and hold the last
good backup when data was lost."""

from __future__ import annotations

import os
from concurrent.futures import Future
from datetime import timedelta
from typing import Any

from backupkit import cli, config, s3, store
from backupkit.config import argument_type, duration_arg, format_age
from backupkit.errors import BackupError, UsageError
from backupkit.manifest import KINDS, Backup, iso, manifest_key
from backupkit.output import log, md_code, shown
from backupkit.profile import profile_key, read_profile
from backupkit.retrieve import BucketReader, private_directory
from backupkit.threads import DaemonPool
from backupkit.tripwire import (
    Comparison,
    PrefixCounts,
    Rules,
    compare_files,
    compare_tables,
    described,
    merge_changes,
    patterns,
    percent,
    sparkline,
)

DESCRIPTION = """\
Compare the newest usable backup of one kind with the usable backups of a window before it
(default 7 days), through their profiles (what each backup holds, recorded when it was made and
encrypted with its passphrase); the backups themselves are never downloaded.

database: per table, the rows now against the most rows the window saw. A table that holds more
  than --max-drop (10%) fewer rows than that maximum, and at least --min-rows (10) fewer, is a
  loss; so is a table that held rows and is gone. One rule for the sudden delete and the slow
  leak (3% an hour for five hours is 14%).
files: per top-level prefix, objects and bytes against the window's maximum (the same rule);
  every object whose size or CRC-32 changed under the same key since the previous backup is a
  loss too (uploads never change), unless under an --allow-change prefix.

Exit 0 with a per-table / per-prefix summary; exit 1 with one error line naming the table or
prefix and both counts (every crossing is listed on stdout); exit 2 on a usage error. The first
backup alone is no loss. Backups made before profiles existed have none: they are skipped with a
note.

--hold places an S3 Object Lock legal hold on the newest backup that still held what was lost
(its object version, its manifest's and its profile's), so that the lifecycle cannot remove it
until a person releases the hold; it prints what it held. It needs the holder policy
(setup_bucket.py --print-policies: read, and s3:PutObjectLegalHold). --release KEY --version-id V
releases the three holds of that backup once its data is safe (the holder policy too); or, one
version at a time:
  aws s3api put-object-legal-hold --bucket B --key KEY --version-id V --legal-hold Status=OFF
A writer can lie in a profile: the tripwire is for accidents, not attacks.
"""

EPILOG = """\
environment:
  EXTERNAL_BACKUP_ENCRYPTION_KEY[_PREVIOUS]  passphrases; each manifest's key_id picks the right one
  BACKUP_BUCKET, BACKUP_ENVIRONMENT, AWS_*   the external bucket (read-only access; --hold: the holder)
  BACKUP_ALLOW_DROP                          --allow-drop patterns, comma-separated
  BACKUP_ALLOW_CHANGE                        --allow-change prefixes, comma-separated

examples:
  scripts/compare_backups.py --environment production --kind database
  scripts/compare_backups.py --environment production --kind database --window 2d --max-drop 5% --allow-drop 'public.sessions'
  scripts/compare_backups.py --environment production --kind files --allow-change avatars/ --hold
"""

PROFILE_READERS = 8  # profiles downloaded and decrypted at once (each a GET and an openssl)
SHOWN_ROWS = 200  # tables or prefixes shown one by one; crossings always are


def build_parser() -> cli.ArgumentParser:
    p = cli.parser("compare_backups.py", DESCRIPTION, EPILOG)
    cli.add_target_args(p)
    p.add_argument("--kind", choices=KINDS, required=True, help="database or files")
    p.add_argument("--window", type=duration_arg, default=timedelta(days=7), metavar="DURATION",
                   help="compare with the backups started within this much before now (default 7d)")
    p.add_argument("--max-drop", type=percent_arg, default=0.10, metavar="PERCENT",
                   help="a loss is more than this drop from the window's maximum (default 10%%)")
    p.add_argument("--min-rows", type=count_arg, default=10, metavar="N",
                   help="and at least this many rows or objects (default 10)")
    p.add_argument("--allow-drop", action="append", metavar="PATTERN",
                   help="tables that churn by design (sessions, queues): a glob on schema.table or table; repeatable "
                        "(env BACKUP_ALLOW_DROP, comma-separated)")
    p.add_argument("--allow-change", action="append", metavar="PREFIX",
                   help="key prefixes whose objects are rewritten on purpose; repeatable (env BACKUP_ALLOW_CHANGE)")
    p.add_argument("--hold", action="store_true",
                   help="on a loss, place a legal hold on the newest backup before it (needs the holder policy)")
    p.add_argument("--release", metavar="KEY",
                   help="instead of comparing: release the legal holds of backup KEY (its object, manifest and profile; "
                        "the holder policy)")
    p.add_argument("--version-id", metavar="V", help="with --release: the backup's version (needed when its key has several)")
    cli.add_heartbeat_arg(p)
    cli.add_output_args(p)
    return p


percent_arg = argument_type(percent)


def count_arg(value: str) -> int:
    import argparse

    if not value.strip().isdigit():
        raise argparse.ArgumentTypeError(f"invalid --min-rows '{shown(value)}': a whole number, e.g. 10")
    return int(value)


def usable_in_window(reader: BucketReader, window: timedelta, notes: list[str]) -> list[Backup]:
    """The usable backups started within the window, oldest first (the retrieval gate's answer)."""
    now = config.utcnow()
    checked = reader.since(window, now)
    usable = [b for b in checked if b.usable]
    if len(checked) > len(usable):
        notes.append(f"{len(checked) - len(usable)} backups in the window are not usable (list_backups.py says why) "
                     "and were left out")
    if not usable:
        raise BackupError(f"no usable {reader.kind} backup started within the last {format_age(window)} in "
                          f"s3://{reader.bucket}/{reader.environment}/{reader.kind}/: nothing to compare (check the "
                          "scheduled backups, and list_backups.py)")
    return list(reversed(usable))


class Profiles:
    """Reads the profiles the manifests name: checked against the manifest, then decrypted."""

    def __init__(self, reader: BucketReader, directory: str):
        self.reader, self.directory = reader, directory

    def read(self, backup: Backup, consume: Any) -> Any:
        manifest = backup.manifest
        return read_profile(self.reader.client, self.reader.bucket, manifest, self.reader.secret_for(manifest),
                            self.directory, consume)


def table_rows(entries: Any) -> dict[str, int]:
    return {entry["table"]: entry["rows"] for entry in entries}


def read_each(profiles: Profiles, backups: list[Backup], consume: Any, notes: list[str]) -> list[tuple[Backup, Any]]:
    """Each backup's profile through `consume`, in parallel, oldest first; a backup without one,
    or whose profile cannot be read, is left out with a note, unless it is the newest."""
    pool = DaemonPool(max_workers=PROFILE_READERS, thread_name_prefix="profiles")
    futures: list[tuple[Backup, Future[Any] | None]] = [
        (b, pool.submit(profiles.read, b, consume) if "profile" in b.manifest else None) for b in backups]
    found: list[tuple[Backup, Any]] = []
    without = 0
    try:
        for i, (backup, future) in enumerate(futures):
            newest = i == len(futures) - 1
            if future is None:
                without += 1
                continue
            try:
                found.append((backup, future.result()))
            except BackupError as exc:
                if newest:
                    raise BackupError(f"the profile of the newest backup {described(backup)} cannot be used: {exc}") from None
                notes.append(f"the profile of {described(backup)} cannot be used ({exc}): left out")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    if without:
        notes.append(f"{without} backups in the window have no profile (made before profiles existed): left out")
    return found


def compare_database(profiles: Profiles, backups: list[Backup], rules: Rules, window_said: str,
                     notes: list[str]) -> Comparison:
    found = read_each(profiles, backups, table_rows, notes) if "profile" in backups[-1].manifest else []
    return compare_tables(found, rules, window_said)


def compare_files_backups(profiles: Profiles, backups: list[Backup], rules: Rules, window_said: str,
                          notes: list[str]) -> Comparison:
    if "profile" not in backups[-1].manifest:
        return compare_files([], None, rules, window_said)
    profiled = [b for b in backups if "profile" in b.manifest]
    if len(profiled) < len(backups):
        notes.append(f"{len(backups) - len(profiled)} backups in the window have no profile (made before profiles "
                     "existed): left out")
    older = read_each(profiles, profiled[:-2], lambda entries: PrefixCounts().consume(entries), notes) if len(profiled) > 2 else []
    if len(profiled) == 1:
        counts = profiles.read(profiled[-1], lambda entries: PrefixCounts().consume(entries))
        return compare_files([(profiled[-1], counts)], None, rules, window_said)
    previous, newest = profiled[-2], profiled[-1]
    # Both profiles stream at once, merged by key: memory does not grow with the objects.
    changes = profiles.read(previous, lambda before: profiles.read(newest, lambda now: merge_changes(before, now, rules)))
    return compare_files([*older, (previous, changes.previous), (newest, changes.newest)], changes, rules, window_said)


def hold(client: Any, bucket: str, backup: Backup, status: str = "ON") -> list[dict[str, Any]]:
    """A legal hold on the backup's object version, its manifest's and its profile's (status
    "OFF": released)."""
    manifest = backup.manifest or {}
    targets = [("backup", backup.key, backup.version_id)]
    if backup.manifest is not None:
        targets.append(("manifest", manifest_key(backup.key), backup.manifest_version_id))
    if "profile" in manifest:
        targets.append(("profile", profile_key(backup.key), manifest["profile"]["version_id"]))
    held = []
    for what, key, version_id in targets:
        extra = {"VersionId": version_id} if version_id else {}
        with s3.s3_errors(f"{'place' if status == 'ON' else 'release'} a legal hold on s3://{bucket}/{shown(key)} (the "
                          "holder policy allows s3:PutObjectLegalHold: setup_bucket.py --print-policies)"):
            client.put_object_legal_hold(Bucket=bucket, Key=key, LegalHold={"Status": status}, **extra)
        held.append({"what": what, "key": key, "version_id": version_id})
    return held


def release(reader: BucketReader, key: str, version_id: str | None, as_json: bool) -> int:
    """Release the holds --hold placed on one backup."""
    (backup,) = reader.candidates(latest=False, key=key, version_id=version_id)
    released = hold(reader.client, reader.bucket, backup, "OFF")
    lines = [f"RELEASED: {item['what']} s3://{reader.bucket}/{shown(item['key'])}" + (f" version {shown(item['version_id'])}"
                                                                       if item["version_id"] else "") for item in released]
    cli.print_result({"released": released}, as_json, "\n".join(lines))
    return 0


def change(now: int | None, before: int | None) -> str:
    if now is None or before is None:
        return "-"
    if before == 0:
        return f"+{now:,}" if now else "0"
    return f"{(now - before) / before:+.0%}"


def number(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def text_report(comparison: Comparison, notes: list[str], held: list[dict[str, Any]], window_said: str, bucket: str) -> str:
    kind = comparison.kind
    if comparison.newest is None:
        return "\n".join([f"nothing to compare: the newest usable {kind} backup has no profile "
                          "(made before profiles existed); the next backup will have one", *notes])
    lines = [f"newest:   {described(comparison.newest)}",
             f"previous: {described(comparison.previous) if comparison.previous else '-'}",
             f"window:   {len(comparison.profiled)} profiled backups within {window_said}"]
    name = "TABLE" if kind == "database" else "PREFIX"
    unit = "ROWS" if kind == "database" else "OBJECTS"
    rows = sorted(comparison.rows, key=lambda r: (r.status not in ("ALARM", "vanished"), r.name))
    width = min(max([len(shown(r.name)) for r in rows[:SHOWN_ROWS]] + [len(name)]), 60)
    lines.append(f"{name:<{width}}  {'PREVIOUS':>12}  {unit + ' NOW':>12}  {'WINDOW MAX':>12}  {'SINCE PREV':>10}  "
                 f"{'VS MAX':>7}  TREND  STATUS")
    for r in rows[:SHOWN_ROWS]:
        lines.append(f"{shown(r.name):<{width}}  {number(r.previous):>12}  {number(r.now):>12}  {number(r.most):>12}  "
                     f"{change(r.now, r.previous):>10}  {change(r.now if r.now is not None else 0, r.most):>7}  "
                     f"{sparkline(r.series)}  {r.status}")
    if len(rows) > SHOWN_ROWS:
        lines.append(f"… and {len(rows) - SHOWN_ROWS} more (--json lists every one)")
    if kind == "files" and comparison.previous is not None:
        lines.append(f"since the previous backup: {comparison.appeared:,} objects new, {comparison.disappeared:,} gone, "
                     f"{comparison.changed:,} changed in place")
    for crossing in comparison.crossings:
        lines.append(f"LOSS: {crossing.line()}")
    for item in held:
        version = f" version {shown(item['version_id'])}" if item["version_id"] else ""
        lines.append(f"HELD: {item['what']} s3://{bucket}/{shown(item['key'])}{version}")
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def summary(comparison: Comparison, environment: str, notes: list[str], held: list[dict[str, Any]]) -> str:
    kind = comparison.kind
    head = f"### Loss tripwire ({kind}): {environment}\n\n"
    if comparison.newest is None:
        return head + "The newest usable backup has no profile (made before profiles existed): nothing to compare.\n"
    verdict = (f"**{len(comparison.crossings)} loss(es)**" if comparison.crossings else "no loss") + \
        f" in {md_code(comparison.newest.key)} against {len(comparison.profiled)} profiled backups\n\n"
    what = "table" if kind == "database" else "prefix"
    table = f"| {what} | previous | now | window max | trend (oldest → newest) | status |\n|---|---:|---:|---:|---|---|\n"
    rows = sorted(comparison.rows, key=lambda r: (r.status not in ("ALARM", "vanished"), r.name))
    for r in rows[:SHOWN_ROWS]:
        table += (f"| {md_code(r.name)} | {number(r.previous)} | {number(r.now)} | {number(r.most)} | "
                  f"{md_code(sparkline(r.series)) if r.series else ''} | {r.status} |\n")
    if len(rows) > SHOWN_ROWS:
        table += f"| … {len(rows) - SHOWN_ROWS} more | | | | | |\n"
    extra = "".join(f"- loss: {md_code(c.line(), already_shown=True)}\n" for c in comparison.crossings[:20])
    extra += "".join(f"- held: {item['what']} {md_code(item['key'])} version {md_code(item['version_id'])}\n" for item in held)
    extra += "".join(f"- note: {md_code(n, already_shown=True)}\n" for n in notes)
    return head + verdict + table + ("\n" + extra if extra else "")


def to_json(comparison: Comparison, notes: list[str], held: list[dict[str, Any]]) -> dict[str, Any]:
    def backup(b: Backup | None) -> dict[str, Any] | None:
        return None if b is None else {"key": b.key, "version_id": b.version_id, "last_modified": iso(b.last_modified)}

    return {"kind": comparison.kind, "ok": not comparison.crossings, "newest": backup(comparison.newest),
            "previous": backup(comparison.previous), "profiled": [backup(b) for b in comparison.profiled],
            "rows": [r.to_json() for r in comparison.rows], "crossings": [c.to_json() for c in comparison.crossings],
            "changed": comparison.changed, "disappeared": comparison.disappeared, "appeared": comparison.appeared,
            "held": held, "notes": notes}


def main(argv: list[str]) -> int:
    args = cli.parse_args(build_parser(), argv)
    environment = config.environment_name(args.environment)
    bucket = config.bucket_name(args.bucket)
    rules = Rules(args.max_drop, args.min_rows, patterns(args.allow_drop, os.environ.get("BACKUP_ALLOW_DROP")),
                  patterns(args.allow_change, os.environ.get("BACKUP_ALLOW_CHANGE")))
    if args.version_id and not args.release:
        raise UsageError("--version-id goes with --release")
    if args.release:
        return release(BucketReader(store.external_store(), bucket, environment, args.kind, None), args.release,
                       args.version_id, args.json)
    passphrases = config.passphrases()
    client = store.external_store()
    reader = BucketReader(client, bucket, environment, args.kind, passphrases)
    window_said = format_age(args.window)
    notes: list[str] = []
    backups = usable_in_window(reader, args.window, notes)
    with private_directory(prefix="profiles-") as directory:
        profiles = Profiles(reader, directory)
        compare = compare_database if args.kind == "database" else compare_files_backups
        comparison = compare(profiles, backups, rules, window_said, notes)
    held: list[dict[str, Any]] = []
    if comparison.crossings and args.hold:
        for backup in comparison.hold_targets():
            held += hold(client, bucket, backup)
    notes += comparison.notes
    cli.step_summary(summary(comparison, environment, notes, held))
    cli.print_result(to_json(comparison, notes, held), args.json, text_report(comparison, notes, held, window_said, bucket))
    if comparison.crossings:
        first = comparison.crossings[0]
        more = f"; {len(comparison.crossings)} losses in all, listed above" if len(comparison.crossings) > 1 else ""
        kept = ("; that backup is now under a legal hold" if held else
                "; --hold keeps that backup past its expiry")
        raise BackupError(f"data loss? {first.line()}{more}{kept} (runbook: When the loss alarm fires)")
    if comparison.newest is not None and comparison.previous is None:
        log("note: the first profiled backup alone is not compared with anything")
    return 0


if __name__ == "__main__":
    cli.run(main)
