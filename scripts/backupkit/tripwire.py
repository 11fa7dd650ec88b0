"""The loss tripwire: each backup's profile (profile.py) against those of a window before it.

Database: per table, the rows now against the most rows the window saw; a table that dropped by
more than `max_drop` of that maximum and by at least `min_rows` rows, or that held rows and
vanished, is a crossing. One rule catches the sudden drop and the slow leak. Files: per
top-level prefix, objects and bytes against the window's maximum (the same thresholds; bytes only
for a prefix that held at least `min_rows` objects), and every object whose size or CRC-32
changed under the same key since the previous backup (uploads never change), found by merging
the two key-ordered profiles as they stream. Backups without a profile (older ones) are skipped
with a note. The comparison reads profiles only, never the backups.
"""

from __future__ import annotations

import fnmatch
import heapq
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import BackupError, UsageError
from .manifest import Backup, iso
from .output import shown

# The most top-level prefixes counted one by one; beyond, the rest are counted together.
MAX_PREFIXES = 10_000
OTHER_PREFIXES = "(other prefixes)"
CHANGED_LISTED = 100  # changed objects named one by one (the rest counted)
SPARK = "▁▂▃▄▅▆▇█"


@dataclass(frozen=True)
class Rules:
    max_drop: float = 0.10  # a fraction of the window's maximum
    min_rows: int = 10
    allow_drop: tuple[str, ...] = ()
    allow_change: tuple[str, ...] = ()

    def drop_allowed(self, table: str) -> bool:
        bare = table.split(".", 1)[1] if "." in table else table
        return any(fnmatch.fnmatchcase(table, p) or fnmatch.fnmatchcase(bare, p) for p in self.allow_drop)

    def change_allowed(self, key: str) -> bool:
        return any(key.startswith(prefix) for prefix in self.allow_change)


def percent(value: str) -> float:
    """'10%' or '10' → 0.10 (a usage error otherwise)."""
    text = value.strip().removesuffix("%")
    try:
        number = float(text)
    except ValueError:
        number = -1
    if not 0 < number < 100:
        raise UsageError(f"invalid --max-drop '{shown(value)}': a percentage between 0 and 100, e.g. 10%")
    return number / 100


def patterns(flags: list[str] | None, variable: str | None) -> tuple[str, ...]:
    found = [*(flags or []), *((variable or "").split(","))]
    return tuple(p.strip() for p in found if p.strip())


@dataclass
class Crossing:
    """One table or prefix that lost more than the rules allow, or one object changed in place."""

    what: str  # "table", "prefix", "object"
    name: str
    now: int
    before: int  # the window's maximum (or the previous backup's, for an object)
    unit: str  # "rows", "objects", "bytes"
    since: Backup  # the backup that held `before`: the one to hold
    detail: str

    def line(self) -> str:
        return self.detail

    def to_json(self) -> dict[str, Any]:
        return {"what": self.what, "name": self.name, "now": self.now, "before": self.before, "unit": self.unit,
                "held_in": {"key": self.since.key, "version_id": self.since.version_id}, "detail": self.detail}


@dataclass
class Row:
    """One table's or prefix's line of the summary."""

    name: str
    series: list[int | None]  # oldest → newest over the profiled backups of the window (None: absent)
    previous: int | None
    now: int | None
    most: int
    status: str  # ok, new, vanished, ALARM, allowed

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "now": self.now, "previous": self.previous, "window_max": self.most,
                "status": self.status, "series": self.series}


@dataclass
class Comparison:
    kind: str
    newest: Backup | None
    previous: Backup | None
    profiled: list[Backup]  # oldest → newest, those with a readable profile
    rows: list[Row] = field(default_factory=list)
    crossings: list[Crossing] = field(default_factory=list)
    changed: int = 0  # objects changed in place (files), allowed ones included
    disappeared: int = 0  # objects gone since the previous backup (files)
    appeared: int = 0
    notes: list[str] = field(default_factory=list)

    def hold_targets(self) -> list[Backup]:
        """The backups to hold: for each crossing, the newest backup that held what was lost."""
        seen: dict[tuple[str, str | None], Backup] = {}
        for crossing in self.crossings:
            seen.setdefault((crossing.since.key, crossing.since.version_id), crossing.since)
        return list(seen.values())


def drop_of(now: int, most: int) -> float:
    return (most - now) / most if most else 0.0


def sparkline(series: list[int | None]) -> str:
    values = [v for v in series if v is not None]
    if not values:
        return ""
    low, high = min(values), max(values)
    span = high - low
    return "".join(" " if v is None else SPARK[0 if not span else round((v - low) / span * (len(SPARK) - 1))]
                   for v in series)


def described(backup: Backup) -> str:
    version = f" version {shown(backup.version_id)}" if backup.version_id else ""
    return f"{shown(backup.key)}{version} (stored {iso(backup.last_modified)})"


# -- database -----------------------------------------------------------------------------------
def compare_tables(profiles: list[tuple[Backup, dict[str, int]]], rules: Rules, window_said: str) -> Comparison:
    """`profiles`: oldest → newest, each backup's rows per table. The newest is compared with the
    maximum of every table over all of them."""
    backups = [b for b, _ in profiles]
    comparison = Comparison("database", backups[-1] if backups else None, backups[-2] if len(backups) > 1 else None,
                            backups)
    if not profiles:
        return comparison
    newest_rows = profiles[-1][1]
    previous_rows = profiles[-2][1] if len(profiles) > 1 else None
    tables: dict[str, None] = {}
    for _, rows in profiles:
        tables.update(dict.fromkeys(rows))
    for table in tables:
        series = [rows.get(table) for _, rows in profiles]
        most, held_by = -1, backups[-1]
        for backup, value in zip(backups, series, strict=True):
            if value is not None and value >= most:
                most, held_by = value, backup
        now = newest_rows.get(table)
        previous = None if previous_rows is None else previous_rows.get(table)
        lost = most - (now or 0)
        crossed = (now is None and most > 0) or (now is not None and most > 0 and drop_of(now, most) > rules.max_drop
                                                 and lost >= rules.min_rows)
        status = "ok"
        if now is None:
            status = "vanished"
        elif all(v is None for v in series[:-1]) and len(series) > 1:
            status = "new"
        if crossed:
            status = "allowed" if rules.drop_allowed(table) else "ALARM"
        if status == "ALARM":
            if now is None:
                detail = (f"table {shown(table)} is gone from the newest backup: it held {most:,} rows in "
                          f"{described(held_by)}")
            else:
                detail = (f"table {shown(table)} holds {now:,} rows, {drop_of(now, most):.0%} fewer than the {most:,} it "
                          f"held in {described(held_by)} ({lost:,} rows lost within {window_said})")
            comparison.crossings.append(Crossing("table", table, now or 0, most, "rows", held_by, detail))
        comparison.rows.append(Row(table, series, previous, now, max(most, 0), status))
    comparison.crossings.sort(key=lambda c: (-drop_of(c.now, c.before), -(c.before - c.now)))
    return comparison


# -- files --------------------------------------------------------------------------------------
def top_prefix(key: str) -> str:
    head, slash, _ = key.partition("/")
    return head + slash if slash else "(top level)"


class PrefixCounts:
    """Objects and bytes per top-level prefix of one profile (bounded: MAX_PREFIXES)."""

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {}

    def add(self, key: str, size: int) -> None:
        prefix = top_prefix(key)
        slot = self.counts.get(prefix)
        if slot is None:
            if len(self.counts) >= MAX_PREFIXES:
                prefix = OTHER_PREFIXES
            slot = self.counts.setdefault(prefix, [0, 0])
        slot[0] += 1
        slot[1] += size

    def consume(self, entries: Iterator[dict[str, Any]]) -> PrefixCounts:
        for entry in entries:
            self.add(entry["key"], entry["size"])
        return self


class Ordered:
    """A profile's entries, refusing keys out of order (the merge relies on it)."""

    def __init__(self, entries: Iterator[dict[str, Any]]):
        self._entries = entries
        self._last: str | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for entry in self._entries:
            key = entry["key"]
            if self._last is not None and key <= self._last:
                raise BackupError("a files profile lists its keys out of order or twice: not one this tool writes")
            self._last = key
            yield entry


def merge(previous: Iterator[dict[str, Any]], newest: Iterator[dict[str, Any]]) -> Iterator[tuple[dict | None, dict | None]]:
    """(previous entry, newest entry) pairs by key, from two key-ordered streams, in bounded memory."""
    tagged_previous = ((e["key"], 0, e) for e in Ordered(previous))
    tagged_newest = ((e["key"], 1, e) for e in Ordered(newest))
    pending: tuple[str, dict] | None = None
    for key, side, entry in heapq.merge(tagged_previous, tagged_newest, key=lambda t: (t[0], t[1])):
        if pending is not None and pending[0] == key:
            yield pending[1], entry
            pending = None
            continue
        if pending is not None:
            yield pending[1], None
            pending = None
        if side == 0:
            pending = (key, entry)
        else:
            yield None, entry
    if pending is not None:
        yield pending[1], None


@dataclass
class FilesChanges:
    """What the merge of the previous and the newest profile found."""

    previous: PrefixCounts = field(default_factory=PrefixCounts)
    newest: PrefixCounts = field(default_factory=PrefixCounts)
    changed: list[tuple[dict, dict]] = field(default_factory=list)  # the first CHANGED_LISTED not allowed
    changed_count: int = 0
    changed_allowed: int = 0
    disappeared: int = 0
    appeared: int = 0
    disappeared_keys: list[str] = field(default_factory=list)


def merge_changes(previous: Iterator[dict[str, Any]], newest: Iterator[dict[str, Any]], rules: Rules) -> FilesChanges:
    found = FilesChanges()
    for before, now in merge(previous, newest):
        if before is not None:
            found.previous.add(before["key"], before["size"])
        if now is not None:
            found.newest.add(now["key"], now["size"])
        if before is None:
            found.appeared += 1
        elif now is None:
            found.disappeared += 1
            if len(found.disappeared_keys) < 10:
                found.disappeared_keys.append(before["key"])
        elif (before["size"], before["crc32"]) != (now["size"], now["crc32"]):
            if rules.change_allowed(now["key"]):
                found.changed_allowed += 1
                continue
            found.changed_count += 1
            if len(found.changed) < CHANGED_LISTED:
                found.changed.append((before, now))
    return found


def compare_files(counts: list[tuple[Backup, PrefixCounts]], changes: FilesChanges | None, rules: Rules,
                  window_said: str) -> Comparison:
    """`counts`: oldest → newest, each profiled backup's per-prefix counts (the newest's from the
    merge); `changes`: the merge of the previous and the newest profile (None: no previous)."""
    backups = [b for b, _ in counts]
    comparison = Comparison("files", backups[-1] if backups else None, backups[-2] if len(backups) > 1 else None,
                            backups)
    if not counts:
        return comparison
    newest = counts[-1][1].counts
    previous = counts[-2][1].counts if len(counts) > 1 else None
    prefixes: dict[str, None] = {}
    for _, c in counts:
        prefixes.update(dict.fromkeys(c.counts))
    for prefix in prefixes:
        series = [c.counts.get(prefix, [None, None])[0] for _, c in counts]
        byte_series = [c.counts.get(prefix, [None, None])[1] for _, c in counts]
        now = newest.get(prefix, [0, 0])
        status = "ok" if prefix in newest else "vanished"
        row_most = 0
        for unit, values, current in (("objects", series, now[0]), ("bytes", byte_series, now[1])):
            most, held_by = -1, backups[-1]
            for backup, value in zip(backups, values, strict=True):
                if value is not None and value >= most:
                    most, held_by = value, backup
            if unit == "objects":
                row_most = most
            lost = most - current
            crossed = most > 0 and drop_of(current, most) > rules.max_drop and (
                lost >= rules.min_rows if unit == "objects" else row_most >= rules.min_rows)
            if crossed and not any(c.name == prefix for c in comparison.crossings):
                status = "ALARM"
                detail = (f"prefix {shown(prefix)} holds {current:,} {unit}, {drop_of(current, most):.0%} fewer than the "
                          f"{most:,} it held in {described(held_by)} ({lost:,} {unit} lost within {window_said})")
                comparison.crossings.append(Crossing("prefix", prefix, current, most, unit, held_by, detail))
        comparison.rows.append(Row(prefix, series, None if previous is None else previous.get(prefix, [None])[0],
                                   now[0] if prefix in newest else None, max(row_most, 0), status))
    comparison.crossings.sort(key=lambda c: (-drop_of(c.now, c.before), -(c.before - c.now)))
    if changes is not None and comparison.previous is not None:
        comparison.changed, comparison.disappeared, comparison.appeared = (
            changes.changed_count + changes.changed_allowed, changes.disappeared, changes.appeared)
        changed_crossings = []
        for before, now in changes.changed:
            detail = (f"object {shown(now['key'])} changed in place since the previous backup: {before['size']:,} bytes "
                      f"CRC-32 {shown(before['crc32'])} in {described(comparison.previous)}, now {now['size']:,} bytes "
                      f"CRC-32 {shown(now['crc32'])} (uploads never change; --allow-change PREFIX if these do)")
            changed_crossings.append(Crossing("object", now["key"], now["size"], before["size"], "bytes",
                                              comparison.previous, detail))
        if changes.changed_count > len(changes.changed):
            comparison.notes.append(f"{changes.changed_count - len(changes.changed):,} more objects changed in place (not listed)")
        if changes.changed_allowed:
            comparison.notes.append(f"{changes.changed_allowed:,} objects changed under an --allow-change prefix (allowed)")
        comparison.crossings = changed_crossings + comparison.crossings
    return comparison
