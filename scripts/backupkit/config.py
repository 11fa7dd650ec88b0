"""Configuration: environment variables and flags turned into validated values.

Every script reads the environment; a flag overrides its variable (see SPEC, "Configuration").
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from .errors import UsageError

ENVIRONMENT_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
DURATION_RE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

KEY_VAR = "EXTERNAL_BACKUP_ENCRYPTION_KEY"
PREVIOUS_KEY_VAR = "EXTERNAL_BACKUP_ENCRYPTION_KEY_PREVIOUS"
# Variables holding secrets: stripped from every child's environment unless it needs one.
SECRET_VARS = (
    KEY_VAR,
    PREVIOUS_KEY_VAR,
    "DATABASE_URL",
    "TARGET_DATABASE_URL",
    "PGPASSWORD",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "SOURCE_AWS_SECRET_ACCESS_KEY",
    "SOURCE_AWS_SESSION_TOKEN",
)
# For tests and drills: pretend "now" is this ISO-8601 UTC instant.
NOW_VAR = "EXTERNAL_BACKUPS_NOW"


def environment_name(value: str | None) -> str:
    if not value:
        raise UsageError("no environment given: set BACKUP_ENVIRONMENT or pass --environment")
    if not ENVIRONMENT_RE.fullmatch(value):  # not match(): `$` also matches before a final newline
        raise UsageError(
            f"invalid environment name {value!r}: use 1-63 lowercase letters, digits and '-', "
            "starting with a letter or digit (e.g. production)"
        )
    return value


def bucket_name(value: str | None, what: str = "bucket", hint: str = "set BACKUP_BUCKET or pass --bucket") -> str:
    if not value:
        raise UsageError(f"no {what} given: {hint}")
    problem = None
    if not BUCKET_RE.fullmatch(value):
        problem = "use 3-63 lowercase letters, digits, '.' and '-', starting and ending with a letter or digit"
    elif ".." in value or ".-" in value or "-." in value:
        problem = "dots may not be next to each other or to a hyphen"
    else:
        try:
            ipaddress.ip_address(value)
            problem = "a bucket name may not look like an IP address"
        except ValueError:
            pass
    if problem:
        raise UsageError(f"invalid {what} name {value!r}: {problem}")
    return value


def parse_duration(value: str) -> timedelta:
    """'30m', '2h', '1d', '1w', '90s' → timedelta."""
    match = DURATION_RE.match(value or "")
    if not match or int(match.group(1)) == 0:
        raise UsageError(f"invalid duration {value!r}: use a positive number and a unit, e.g. 30m, 2h, 1d")
    return timedelta(seconds=int(match.group(1)) * DURATION_UNITS[match.group(2)])


def duration_arg(value: str) -> timedelta:
    """argparse `type=` wrapper: a bad duration is a usage error (exit 2)."""
    try:
        return parse_duration(value)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def format_age(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {rest % 60}s"


def utcnow() -> datetime:
    override = os.environ.get(NOW_VAR)
    if override:
        try:
            return datetime.fromisoformat(override.replace("Z", "+00:00")).astimezone(UTC)
        except ValueError:
            raise UsageError(f"invalid {NOW_VAR} {override!r}: use ISO 8601, e.g. 2026-11-29T10:00:00Z") from None
    return datetime.now(UTC)


def passphrases(required: bool = True) -> list[str]:
    """The current passphrase first, then previous ones (key rotation)."""
    current = os.environ.get(KEY_VAR, "")
    previous = [p for p in os.environ.get(PREVIOUS_KEY_VAR, "").split(",") if p]
    if required and not current:
        raise UsageError(f"no encryption passphrase: set {KEY_VAR} (never pass it on a command line)")
    return ([current] if current else []) + previous


def child_env(**extra: str) -> dict[str, str]:
    """A copy of our environment without any secret, plus the given variables.

    Each child gets only the secret it needs: pg_dump/psql the database password, openssl none
    (it reads the passphrase from a file descriptor).
    """
    env = {k: v for k, v in os.environ.items() if k not in SECRET_VARS}
    env.update(extra)
    return env


@dataclass(frozen=True)
class DatabaseTarget:
    """A libpq connection without its password: `dbname` goes on a command line, the password
    only into the child's PGPASSWORD."""

    dbname: str | None  # a URL without password, or None to use the PG* variables
    password: str | None
    database: str  # the database's name, for messages and manifests

    def env(self) -> dict[str, str]:
        password = self.password if self.password is not None else os.environ.get("PGPASSWORD")
        return child_env(PGPASSWORD=password) if password is not None else child_env()

    def args(self) -> list[str]:
        return [f"--dbname={self.dbname}"] if self.dbname else []

    def describe(self) -> str:
        return self.dbname or f"database {self.database!r} (from PG* variables)"


def database_target(url: str | None, what: str = "DATABASE_URL") -> DatabaseTarget:
    """Split a postgres:// URL into a password-free URL and the password."""
    if not url:
        database = os.environ.get("PGDATABASE") or os.environ.get("PGUSER") or os.environ.get("USER", "")
        return DatabaseTarget(None, None, database)
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql") or not (parts.netloc or parts.path or parts.query):
        raise UsageError(
            f"{what} is not a PostgreSQL URL: expected postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
        )
    password = unquote(parts.password) if parts.password is not None else None
    query = parse_qsl(parts.query, keep_blank_values=True)
    for name, value in query:
        if name == "password":
            password = value
    query = [(k, v) for k, v in query if k != "password"]
    netloc = parts.netloc.rpartition("@")[2]
    if parts.username is not None:
        netloc = f"{parts.username}@{netloc}"
    clean = urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), ""))
    database = unquote(parts.path.lstrip("/")) or unquote(parts.username or "") or os.environ.get("PGDATABASE", "")
    return DatabaseTarget(clean, password, database)
