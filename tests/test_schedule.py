"""The schedules and the freshness thresholds, read from the workflow files, against GitHub's
scheduler as it is documented: scheduled runs start late (hours at busy times), some are dropped,
and the top of the hour is the worst time. Simulated minute by minute over weeks: one dropped run
plus an hour of delay raises no alarm; backups that stop raise one within a few hours.

The freshness check (`list_backups.py --max-age`) measures a backup's age from its start (the
time in its key) and counts only complete backups (with a manifest). So while the next backup
runs the age keeps growing; the largest age a healthy schedule shows is the gap between two
backups' starts plus the second one's duration.
"""

from __future__ import annotations

import bisect
import functools
import random
import re
from dataclasses import dataclass

import pytest
import yaml

from dev.harness import REPO

WORKFLOWS = REPO / ".github" / "workflows"
HOUR, DAY = 60, 24 * 60  # the simulation counts minutes
# Checkout, Python, apt: between a job's start and its script's start (the backup's timestamp).
SETUP = 3
DELAY = HOUR  # "an hour of delay": the documented busy-time lateness the thresholds must absorb
WARM_UP, WINDOW = 4 * DAY, 21 * DAY  # history before the first check that counts; checks after it


@functools.cache
def load(name: str) -> dict:
    doc = yaml.safe_load((WORKFLOWS / name).read_text())
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the key `on` as True
    return doc


def cron(caller: str) -> tuple[int, int | None]:
    """(minute, hour or None for hourly) of the caller's one schedule."""
    (entry,) = load(caller)["on"]["schedule"]
    fields = entry["cron"].split()
    assert len(fields) == 5 and fields[2:] == ["*", "*", "*"], f"{caller}: the simulation reads 'M H * * *' only"
    assert fields[0].isdigit() and (fields[1] == "*" or fields[1].isdigit()), entry["cron"]
    return int(fields[0]), None if fields[1] == "*" else int(fields[1])


def timeout(reusable: str) -> int:
    (job,) = load(reusable)["jobs"].values()
    return job["timeout-minutes"]


def minutes(duration: str) -> int:
    """A duration as list_backups.py --max-age reads it (one number, one unit)."""
    match = re.fullmatch(r"(\d+)([smhdw])", duration)
    assert match, f"{duration!r} is not a --max-age duration (30m, 4h, 2d)"
    return int(match.group(1)) * {"s": 1 / 60, "m": 1, "h": HOUR, "d": DAY, "w": 7 * DAY}[match.group(2)]


def max_age(kind: str) -> int:
    """The threshold the hourly check uses: the caller's `with:` if it sets one, else the default."""
    name = f"{kind}-max-age"
    default = load("_check-freshness.yml")["on"]["workflow_call"]["inputs"][name]["default"]
    given = {job.get("with", {}).get(name, default) for job in load("check-freshness.yml")["jobs"].values()}
    (value,) = given
    return minutes(value)


@dataclass(frozen=True)
class Kind:
    name: str
    caller: str
    reusable: str
    typical: int  # minutes a run usually takes

    @property
    def period(self) -> int:
        return HOUR if cron(self.caller)[1] is None else DAY

    @property
    def longest(self) -> int:
        return timeout(self.reusable)

    @property
    def threshold(self) -> int:
        return max_age(self.name)


DATABASE = Kind("database", "backup-database.yml", "_backup-database.yml", typical=5)
FILES = Kind("files", "backup-files.yml", "_backup-files.yml", typical=40)
KINDS = (DATABASE, FILES)


def scheduled(caller: str, end: int) -> list[int]:
    """Every time the caller's cron fires in [0, end)."""
    minute, hour = cron(caller)
    if hour is None:
        return list(range(minute, end, HOUR))
    return list(range(hour * HOUR + minute, end, DAY))


@dataclass(frozen=True)
class Backup:
    started: int  # the script's start: the time in the backup's key
    complete: int  # its manifest is written: from now on the check sees it


def run_backups(kind: Kind, *, delay, duration, dropped=lambda index, at: False) -> list[Backup]:
    made = []
    for index, at in enumerate(scheduled(kind.caller, WARM_UP + WINDOW)):
        if dropped(index, at):
            continue
        started = at + delay(index) + SETUP
        made.append(Backup(started, started + duration(index)))
    return made


def checks(*, delay=lambda index: 0, dropped=lambda index: False) -> list[int]:
    times = scheduled("check-freshness.yml", WARM_UP + WINDOW)
    return sorted(at + delay(i) for i, at in enumerate(times) if at >= WARM_UP and not dropped(i))


def alarms(kind: Kind, backups: list[Backup], check_times: list[int]) -> list[tuple[int, int | None]]:
    """(check time, age) for every check that would fail: the newest backup complete at that time
    is older than the threshold, or there is none."""
    by_completion = sorted(backups, key=lambda b: b.complete)
    completions = [b.complete for b in by_completion]
    newest_started, newest = [], None  # newest start among the first n completed
    for b in by_completion:
        newest = b.started if newest is None else max(newest, b.started)
        newest_started.append(newest)
    threshold, found = kind.threshold, []
    for at in check_times:
        seen = bisect.bisect_right(completions, at)
        age = at - newest_started[seen - 1] if seen else None
        if age is None or age > threshold:
            found.append((at, age))
    return found


def hm(total: int) -> str:
    return f"{total // 60}h{total % 60:02d}"


# --- The schedules themselves -----------------------------------------------------------------

@pytest.mark.parametrize("caller", ["backup-database.yml", "backup-files.yml", "check-freshness.yml", "check-backups.yml"])
def test_no_schedule_near_the_top_of_the_hour(caller):
    """GitHub queues and drops the most runs at the start of the hour."""
    minute, _ = cron(caller)
    assert 5 < minute < 55, f"{caller} runs at :{minute:02d}"


def test_the_freshness_check_runs_when_an_on_time_database_backup_has_finished():
    backup_minute, check_minute = cron("backup-database.yml")[0], cron("check-freshness.yml")[0]
    assert cron("check-freshness.yml")[1] is None, "hourly"
    assert (check_minute - backup_minute) % 60 >= SETUP + DATABASE.typical + 15


def test_the_deep_check_runs_after_the_files_backups_window():
    """The drill should see the night's files backup: the deep check starts after the files
    backup's latest possible end (its start plus its timeout) plus room for the scheduler's delay."""
    files_minute, files_hour = cron("backup-files.yml")
    check_minute, check_hour = cron("check-backups.yml")
    assert files_hour is not None and check_hour is not None, "both daily"
    window_end = files_hour * HOUR + files_minute + FILES.longest
    assert check_hour * HOUR + check_minute >= window_end + DELAY, \
        f"deep check at {hm(check_hour * HOUR + check_minute)}, files window ends {hm(window_end)}"
    assert check_hour * HOUR + check_minute < DAY, "and on the same day, before the next files backup"


def test_thresholds_are_read_from_the_workflows():
    assert DATABASE.period == HOUR and FILES.period == DAY
    assert DATABASE.threshold > 2 * DATABASE.period and FILES.threshold > 2 * FILES.period


# --- No false alarm ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
@pytest.mark.parametrize("seed", range(5))
def test_no_alarm_when_runs_are_up_to_an_hour_late(kind, seed):
    rng = random.Random(seed)
    delays = [rng.randint(0, DELAY) for _ in range(10_000)]
    backups = run_backups(kind, delay=lambda i: delays[i], duration=lambda i: rng.randint(kind.typical, kind.longest))
    check_times = checks(delay=lambda i: rng.randint(0, DELAY))
    assert alarms(kind, backups, check_times) == []


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_no_alarm_for_one_dropped_run_plus_an_hour_of_delay(kind):
    """The worst case, at every position in a day: the run before the dropped one on time, every
    run after it an hour late (a busy stretch: were only the next run late, the one after would
    close the gap on time) and the first of them as long as its timeout allows; the checks on
    time (a late check only samples a different moment of the same ages)."""
    runs_per_day = DAY // kind.period
    first = len(scheduled(kind.caller, WARM_UP + DAY))  # a run inside the counted window
    for dropped_index in range(first, first + runs_per_day):
        backups = run_backups(
            kind,
            delay=lambda i, d=dropped_index: DELAY if i > d else 0,
            duration=lambda i, d=dropped_index: kind.longest if i == d + 1 else kind.typical,
            dropped=lambda i, at, d=dropped_index: i == d,
        )
        found = alarms(kind, backups, checks())
        assert found == [], f"{kind.name}: dropped run #{dropped_index}: alarm at age {hm(found[0][1])} > {hm(kind.threshold)}"


@pytest.mark.parametrize("seed", range(5))
def test_no_database_alarm_on_a_busy_day_when_runs_are_up_to_two_hours_late(seed):
    """No dropped run, but GitHub hours behind: up to 2 h late, every run."""
    rng = random.Random(seed)
    delays = [rng.randint(0, 2 * HOUR) for _ in range(10_000)]
    backups = run_backups(DATABASE, delay=lambda i: delays[i], duration=lambda i: DATABASE.typical)
    assert alarms(DATABASE, backups, checks(delay=lambda i: rng.randint(0, DELAY))) == []


def test_the_worst_healthy_age_leaves_a_margin():
    """One dropped run plus an hour of delay, the next run as long as its timeout: the age the
    check sees just before that run completes, against the threshold."""
    for kind in KINDS:
        worst = 2 * kind.period + DELAY + kind.longest
        assert worst < kind.threshold, f"{kind.name}: worst healthy age {hm(worst)} >= threshold {hm(kind.threshold)}"


# --- Alarm when backups stop ----------------------------------------------------------------

# Within how many hours of the last backup's start an alarm must come once backups stop: the
# threshold, plus one check interval, plus an hour of delay of that check.
ALARM_WITHIN = {"database": 6 * HOUR, "files": 58 * HOUR}


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
@pytest.mark.parametrize("seed", range(5))
def test_an_alarm_within_hours_when_backups_stop(kind, seed):
    rng = random.Random(seed)
    stop = WARM_UP + rng.randint(2 * DAY, WINDOW - 4 * DAY)
    delays = [rng.randint(0, DELAY) for _ in range(10_000)]
    backups = run_backups(kind, delay=lambda i: delays[i], duration=lambda i: kind.typical, dropped=lambda i, at: at >= stop)
    last = max(b.started for b in backups)
    found = alarms(kind, backups, checks(delay=lambda i: rng.randint(0, DELAY)))
    assert found, "no alarm at all"
    first_alarm = found[0][0]
    assert first_alarm > last + kind.threshold - 1, "no alarm while the backups were healthy"
    assert first_alarm - last <= ALARM_WITHIN[kind.name], \
        f"{kind.name}: alarm {hm(first_alarm - last)} after the last backup started (allowed {hm(ALARM_WITHIN[kind.name])})"


def test_the_alarm_bounds_follow_from_the_thresholds():
    for kind in KINDS:
        assert ALARM_WITHIN[kind.name] == kind.threshold + HOUR + DELAY
    assert ALARM_WITHIN["database"] <= 6 * HOUR, "a stopped database backup is noticed within a few hours"
