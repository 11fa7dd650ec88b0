"""PostgreSQL client programs: versions, small queries through psql, the dump's trailer."""

from __future__ import annotations

import os
import re
import subprocess

from .config import DatabaseTarget, child_env
from .errors import BackupError
from .output import log, shown

TRAILER = b"-- PostgreSQL database dump complete"
# pg_dump 15.14+/16.10+/17.6+ write `\unrestrict KEY` after the trailer: look near the end.
TRAILER_WINDOW = 1024


def has_trailer(tail: bytes) -> bool:
    return TRAILER in tail[-TRAILER_WINDOW:]


def client_binary(name: str, explicit: str | None = None, beside: str | None = None) -> str:
    """`explicit`, else the program next to `beside` (same client version), else PATH."""
    if explicit:
        return explicit
    if beside and os.sep in beside:
        candidate = os.path.join(os.path.dirname(beside), name)
        if os.access(candidate, os.X_OK):
            return candidate
    return name


def client_version(binary: str) -> tuple[int, str]:
    """(major, 'x.y') of a client program, from `--version`."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True, timeout=30,
                             env=child_env(), stdin=subprocess.DEVNULL).stdout
    except FileNotFoundError:
        raise BackupError(f"{binary}: command not found: install the PostgreSQL client (e.g. postgresql-client-15)") from None
    except subprocess.CalledProcessError as exc:
        raise BackupError(f"{binary} --version failed: {exc.stderr.strip()}") from None
    match = re.search(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?", out)
    if not match:
        raise BackupError(f"cannot read the version of {binary} from {out.strip()!r}")
    return int(match.group(1)), ".".join(g for g in match.groups() if g)


def query(target: DatabaseTarget, sql: str, psql: str = "psql", timeout: float = 60, *, restore_target: bool = False) -> str:
    """Run one SQL statement through psql; its unaligned, tuples-only output. For a
    `restore_target`, a database that does not exist gets the command that creates it."""
    argv = [psql, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", *target.args(), "-c", sql]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=target.env(), timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise BackupError(f"{psql}: command not found: install the PostgreSQL client") from None
    except subprocess.TimeoutExpired:
        raise BackupError(f"the database did not answer within {timeout:.0f} s ({target.describe()})") from None
    if done.returncode != 0:
        detail = " ".join(done.stderr.split()) or f"psql exit status {done.returncode}"
        hint = ""
        if restore_target and re.search(r'database "[^"]*" does not exist', detail):
            hint = (f"; create it first, e.g. psql -X \"${{TARGET_DATABASE_URL%/*}}/postgres\" -c 'CREATE DATABASE "
                    f"{shown(target.database)}' (or with your platform's tools)")
        raise BackupError(f"cannot query the database {target.describe()}: {shown(detail)}{hint}")
    return done.stdout.strip()


def server_version(target: DatabaseTarget, psql: str = "psql") -> tuple[int, str]:
    """(major, full version string) of the server, e.g. (15, '15.18')."""
    num, text = query(target, "SELECT current_setting('server_version_num'), current_setting('server_version')", psql).split("|")
    return int(num) // 10000, text.split()[0]


def check_dump_client(pg_dump: str, target: DatabaseTarget, psql: str) -> tuple[str, str]:
    """Fail unless pg_dump's major version is at least the server's; returns both versions."""
    client_major, client_text = client_version(pg_dump)
    server_major, server_text = server_version(target, psql)
    if client_major < server_major:
        raise BackupError(
            f"pg_dump {client_text} cannot dump a PostgreSQL {server_text} server: install "
            f"postgresql-client-{server_major} and pass --pg-dump /usr/lib/postgresql/{server_major}/bin/pg_dump "
            "(or set PG_DUMP)"
        )
    return client_text, server_text


def user_tables(target: DatabaseTarget, psql: str = "psql", *, restore_target: bool = False) -> list[str]:
    """Schema-qualified names of the tables outside the system schemas."""
    out = query(
        target,
        "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
        "AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%' ORDER BY 1",
        psql,
        restore_target=restore_target,
    )
    return [line for line in out.splitlines() if line]


def warn_if_superuser(target: DatabaseTarget, psql: str = "psql") -> None:
    """A restore runs the backup's SQL with the restoring role's rights. psql is restricted (no
    backslash commands), but a superuser's SQL can still run commands on the database server
    (COPY … TO PROGRAM) and read its files: a backup planted by whoever can write the bucket
    would get them. Said once, before anything is downloaded."""
    user, superuser = query(target, "SELECT current_user, current_setting('is_superuser')", psql).split("|")
    if superuser == "on":
        log(f"warning: the target's role '{shown(user)}' is a superuser: the backup's SQL runs with a superuser's rights on "
            "the database server (COPY ... TO PROGRAM runs commands there). Restore as the app's own role, owner of the "
            "target database and not a superuser (README, Threat model)")


def row_counts(target: DatabaseTarget, psql: str = "psql") -> dict[str, int]:
    """Exact row count of every user table (for reports after a restore)."""
    tables = user_tables(target, psql)
    if not tables:
        return {}
    parts = [f"SELECT {_literal(t)}, count(*) FROM {_ident(t)}" for t in tables]  # noqa: S608 - quoted names
    out = query(target, " UNION ALL ".join(parts), psql, timeout=3600)
    counts = {}
    for line in out.splitlines():
        name, _, count = line.rpartition("|")
        counts[name] = int(count)
    return counts


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ident(qualified: str) -> str:
    schema, _, name = qualified.partition(".")
    return ".".join('"' + part.replace('"', '""') + '"' for part in (schema, name))


