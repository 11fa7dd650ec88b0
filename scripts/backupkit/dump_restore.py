"""Restoring a database backup into psql: the SQL that dump_reader.py reads back goes to a
restricted, guarded psql in one transaction, committed only once everything verified.

psql is the dangerous reader. It executes backslash meta-commands as it reads them (`\\!` runs a
shell command), and the SQL it sends runs with the restoring role's rights, long before the end
of the dump could be checked; a backup writer with the passphrase can plant any dump. So the SQL
passes `sqlstream.SqlGuard` on its way: psql is restricted (`\\restrict` with a random key of
ours) from its first byte, and only the statements a plain pg_dump of one database writes reach it
(no COMMIT, no ALTER ROLE, no COPY … PROGRAM, no psql variables); before the commit, a seal checks
that the transaction changed nothing outside the target database, and the role is not a superuser
unless the operator said so.

psql runs the dump in one transaction that we open (`BEGIN;` after the `\\restrict` line) and
commit: the held-back end of the SQL (dump_reader.hold_back: its last HOLD_BACK bytes hold
pg_dump's completion trailer), the seal and our `COMMIT;` reach it only after decryption ended
cleanly, the SQL's size and SHA-256 matched the manifest and the trailer is there; otherwise psql
is killed and rolls back. Not `--single-transaction`, which commits when psql's input ends: if
this process is killed outright, psql reads EOF without a COMMIT, ends its session, and
PostgreSQL rolls the restore back.
A restore that fails once psql started says whether the target is as it was before (then
`--latest` may try an older backup), or stops.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from .config import duration_arg, format_age
from .dump_reader import Bounded, DumpReader, check_dump, hold_back, refusal
from .errors import BackupError, Problem, VerificationError
from .output import log, shown
from .pgurl import DatabaseTarget
from .pipeline import Pipeline
from .postgres import client_version, end_sessions, risky_role, target_state, user_tables
from .retrieve import Fetched
from .sqlstream import SEAL_MARK, Refused, SqlGuard
from .streams import Tally

# psql learned \restrict in these releases (CVE-2025-8714); older ones cannot be restricted.
RESTRICT_SINCE = {13: 22, 14: 19, 15: 14, 16: 10, 17: 6}
# Generous: a restore of hundreds of GB takes hours, and one statement (a COPY, an index) of a
# big table a good part of one; an operator restoring more raises them.
DEFAULT_TIMEOUT = "24h"
DEFAULT_STATEMENT_TIMEOUT = "1h"
ALLOW_SUPERUSER_VAR = "BACKUP_ALLOW_SUPERUSER"


@dataclass(frozen=True)
class RestoreOptions:
    """What the operator allows one restore: how long, per statement and in all, and whether the
    target's role may be a superuser."""

    timeout: timedelta = timedelta(hours=24)
    statement_timeout: timedelta = timedelta(hours=1)
    allow_superuser: bool = False


def add_restore_args(p: argparse.ArgumentParser) -> None:
    """The flags of a restore (restore_database.py, verify_backup.py --restore-into)."""
    p.add_argument("--timeout", type=duration_arg, metavar="DURATION",
                   default=os.environ.get("BACKUP_RESTORE_TIMEOUT") or DEFAULT_TIMEOUT,
                   help=f"give up restoring one backup after DURATION, e.g. 6h, 2d; nothing is committed "
                        f"(env BACKUP_RESTORE_TIMEOUT; default {DEFAULT_TIMEOUT})")
    p.add_argument("--statement-timeout", type=duration_arg, metavar="DURATION",
                   default=os.environ.get("BACKUP_STATEMENT_TIMEOUT") or DEFAULT_STATEMENT_TIMEOUT,
                   help="psql's statement_timeout while restoring: no statement of the backup (a COPY of one "
                        f"table, an index) may take longer (env BACKUP_STATEMENT_TIMEOUT; default {DEFAULT_STATEMENT_TIMEOUT})")
    p.add_argument("--allow-superuser", action="store_true", default=os.environ.get(ALLOW_SUPERUSER_VAR) == "1",
                   help="restore even when the target's role is a superuser, can become one, may run programs or "
                        "read and write files on the database server, or has CREATEROLE: the backup's SQL then runs "
                        "with those rights there, and whoever can write the bucket can plant a backup "
                        "(env BACKUP_ALLOW_SUPERUSER=1)")


def restore_options(args: argparse.Namespace) -> RestoreOptions:
    return RestoreOptions(args.timeout, args.statement_timeout, args.allow_superuser)


def check_restore_psql(version: str, psql: str) -> None:
    """Refuse a psql that cannot run restricted (it would execute a planted dump's commands)."""
    parts = [int(p) for p in re.findall(r"\d+", version)[:2]] + [0]
    major, minor = parts[0], parts[1]
    if major < 13 or (major in RESTRICT_SINCE and minor < RESTRICT_SINCE[major]):
        raise BackupError(
            f"{shown(psql)} is psql {shown(version)}, too old to restore safely: it cannot run restricted (\\restrict), "
            "so a planted backup could run shell commands here. Install a current PostgreSQL client "
            "(13.22, 14.19, 15.14, 16.10, 17.6 or newer; apt.postgresql.org has them) and pass --psql or set PSQL")


def check_restore_target(target: DatabaseTarget, psql: str, options: RestoreOptions) -> list[str]:
    """Before anything is downloaded: psql can restore safely, the target answers, and its role is
    not a superuser (unless allowed); returns the tables it already has."""
    check_restore_psql(client_version(psql)[1], psql)
    tables = user_tables(target, psql, restore_target=True)
    role, powers = risky_role(target, psql)
    if powers:
        why = (f"the target's role '{shown(role)}' is {powers}: the backup's SQL would run with those rights on the "
               "database server (COPY … TO PROGRAM and lo_export run commands and write files there), and whoever "
               "can write the bucket can plant a backup")
        if not options.allow_superuser:
            raise BackupError(f"{why}. Restore as the app's own role (owner of the target database, not a superuser; "
                              "README, Threat model), or pass --allow-superuser (BACKUP_ALLOW_SUPERUSER=1) to accept it")
        log(f"warning: {why}; allowed by --allow-superuser")
    return tables


@dataclass
class Restored:
    plaintext_size: int
    seconds: float


class _Deadline:
    """Kills the restore's processes, psql first (it must never see the end of its input), once
    the operator's time for one backup is up."""

    def __init__(self, seconds: float, stages: Callable[[], list[Any]], abandon: Callable[[], None]):
        self.expired = threading.Event()
        self._stages = stages
        self._abandon = abandon
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def _expire(self) -> None:
        self.expired.set()
        self._abandon()  # the download, when it streams: no reading on to its end
        for stage in self._stages():
            if stage.proc.poll() is None:
                stage.proc.kill()

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()


def _psql_failure(message: str) -> BackupError:
    """What psql's failure means, as the error to raise."""
    if "restricted" in message or "\\unrestrict" in message:
        return VerificationError(
            f"the restore was refused and rolled back: {message} — the dump holds psql commands (\\! would run a shell "
            "command here), which pg_dump never writes: this backup was not made by the backup job; keep it out of "
            "restores and tell the team", Problem.BAD_CONTENT)
    if SEAL_MARK in message or "sqlstream: " in message:
        return VerificationError(
            f"the restore was refused and rolled back: {message} — SQL in the dump (a function it defines, called from a "
            "default, a check, an index or a view) reached outside the target database, which a backup of the app "
            "never does: this backup was not made by the backup job; keep it out of restores and tell the team",
            Problem.BAD_CONTENT)
    if "canceling statement due to statement timeout" in message:
        return VerificationError(
            f"the restore was stopped and rolled back: {message} — one statement took longer than --statement-timeout "
            "(BACKUP_STATEMENT_TIMEOUT): raise it if the backup is genuine and that big", Problem.BAD_CONTENT)
    if "other objects depend on it" in message:
        message += (" — the target holds objects the backup does not (the app's newer tables, say) that depend "
                    "on tables the backup replaces: restore into a new, empty database instead, or drop those "
                    "objects first (runbook, 'Over a database the app has already started')")
    return BackupError(f"the restore failed and was rolled back: {message}")


def restore_dump(fetched: Fetched, target: DatabaseTarget, psql: str, options: RestoreOptions | None = None,
                 on_commit: Callable[[], None] | None = None) -> Restored:
    """Decrypt into a restricted, guarded psql in one transaction, releasing the held-back end
    only when everything verified; on any failure psql is killed and nothing is committed. A
    failure once psql started is final (BackupError) unless the target is as it was before.
    `on_commit()` is called when psql is given the end of its input, from which it commits."""
    options = options or RestoreOptions()
    log(f"restoring {fetched.label} into '{shown(target.database)}'")
    began = time.monotonic()
    before = target_state(target, psql)
    session = f"backupkit-restore-{secrets.token_hex(8)}"
    try:
        return _restore(fetched, target, psql, options, session, began, on_commit or (lambda: None))
    except (BackupError, Refused) as exc:
        error = refusal(exc) if isinstance(exc, Refused) else exc
        raise _after_failure(error, fetched, target, psql, session, before) from None


def _restore(fetched: Fetched, target: DatabaseTarget, psql: str, options: RestoreOptions, session: str,
             began: float, on_commit: Callable[[], None]) -> Restored:
    plaintext = Tally()
    with Pipeline() as pipeline:
        reader = DumpReader(pipeline, fetched)
        restore = pipeline.start(
            "psql",
            [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", *target.args()],
            env={**target.env(), "PGAPPNAME": session}, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
        )
        guard = SqlGuard(restore.stdin.write, restrict_key=secrets.token_hex(32), seal=True, begin=True,
                         statement_timeout_ms=int(options.statement_timeout.total_seconds() * 1000))
        with _Deadline(options.timeout.total_seconds(), lambda: [restore, *pipeline.stages], reader.abandon) as deadline:
            try:
                held, broken, refused = hold_back(Bounded(reader.stdout, plaintext, fetched), guard, deadline.expired)
                if not deadline.expired.is_set():
                    reader.finish()
                    check_dump(plaintext, held, fetched)
                    if refused is not None:
                        raise refused
                    if not broken:
                        try:
                            guard.feed(held)
                            guard.finish()
                            on_commit()
                            restore.stdin.write(b"COMMIT;\n")
                            restore.stdin.close()
                        except BrokenPipeError:
                            pass
            except BackupError:
                if not deadline.expired.is_set():
                    raise  # else: a stage the deadline killed says so, the deadline is why
            code = restore.wait()
        if code != 0 and deadline.expired.is_set():  # psql's exit status 0: it committed in time
            raise VerificationError(f"the restore did not finish within {format_age(options.timeout)} and was stopped; "
                                    "nothing is committed: raise --timeout (BACKUP_RESTORE_TIMEOUT) if the backup is "
                                    "that big", Problem.BAD_CONTENT)
        if code != 0:
            raise _psql_failure(restore.describe_failure())
    return Restored(plaintext.size, time.monotonic() - began)


def _after_failure(error: BackupError, fetched: Fetched, target: DatabaseTarget, psql: str, session: str,
                   before: str) -> BackupError:
    """A restore failed once psql had started: the target must be as it was for an older backup
    to be tried on it (`--latest` goes on after a VerificationError only)."""
    try:
        end_sessions(target, psql, session)
        after = target_state(target, psql)
    except BackupError as exc:
        return BackupError(f"{fetched.label}: {error} — and whether the target '{shown(target.database)}' is as it was "
                           f"cannot be checked ({exc}): no other backup is restored over it; look at it, or restore into "
                           "a new, empty database")
    if after != before:
        return BackupError(f"{fetched.label}: {error} — and the target '{shown(target.database)}' changed while it ran "
                           "(its objects, their storage or the role's settings are not as before): no other backup is "
                           "restored over it; look at it, or restore into a new, empty database")
    if isinstance(error, VerificationError):
        return VerificationError(f"{error} (the target is as it was before)", error.problem)
    return error
