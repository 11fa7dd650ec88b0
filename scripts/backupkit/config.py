"""Configuration: environment variables and flags turned into validated values.

Every script reads the environment; a flag overrides its variable (docs/contract.md, "What the
scripts promise").
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar
from urllib.parse import urlsplit

from .errors import UsageError
from .output import shown

T = TypeVar("T")

ENVIRONMENT_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
DURATION_RE = re.compile(r"^\s*([0-9]+)\s*([smhdw])\s*$")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
MAX_DURATION = timedelta(days=3660)  # ten years: longer than any backup is kept

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
    "BACKUP_HEARTBEAT_URL",
)
# Never handed to a child either: inside GitHub Actions these let any process that reads them mint
# an OIDC token or talk to the runner's services as this job.
CHILD_ENV_PREFIXES = ("ACTIONS_",)
CHILD_ENV_DROPPED = ("GITHUB_TOKEN",)
# For tests and drills: pretend "now" is this ISO-8601 UTC instant.
NOW_VAR = "EXTERNAL_BACKUPS_NOW"


def is_http_url(value: str, *, check_port: bool = False) -> bool:
    """An http(s) URL with a host (and, with `check_port`, a port that is a number)."""
    try:
        parts = urlsplit(value)
        if check_port:
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        return parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        return False


def environment_name(value: str | None) -> str:
    if not value:
        raise UsageError("no environment given: set BACKUP_ENVIRONMENT or pass --environment")
    if not ENVIRONMENT_RE.fullmatch(value):  # not match(): `$` also matches before a final newline
        raise UsageError(
            f"invalid environment name '{shown(value)}': use 1-63 lowercase letters, digits and '-', "
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
        raise UsageError(f"invalid {what} name '{shown(value)}': {problem}")
    return value


def parse_duration(value: str) -> timedelta:
    """'30m', '2h', '1d', '1w', '90s' → timedelta."""
    match = DURATION_RE.match(value or "")
    if not match or int(match.group(1)) == 0:
        raise UsageError(f"invalid duration '{shown(value)}': use a positive number and a unit, e.g. 30m, 2h, 1d")
    seconds = int(match.group(1)) * DURATION_UNITS[match.group(2)]
    if seconds > MAX_DURATION.total_seconds():
        raise UsageError(f"invalid duration '{shown(value)}': at most {MAX_DURATION.days} days")
    return timedelta(seconds=seconds)


def argument_type(parse: Callable[[str], T]) -> Callable[[str], T]:
    """`parse` as an argparse `type=`: the UsageError it raises is argparse's usage error (exit 2)."""

    def convert(value: str) -> T:
        try:
            return parse(value)
        except UsageError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


duration_arg = argument_type(parse_duration)


def format_age(delta: timedelta) -> str:
    seconds = max(int(delta.total_seconds()), 0)
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
            raise UsageError(f"invalid {NOW_VAR} '{shown(override)}': use ISO 8601, e.g. 2026-11-29T10:00:00Z") from None
    return datetime.now(UTC)


def passphrase(value: str, variable: str = KEY_VAR) -> str:
    """One passphrase, by the rule every reader and writer shares (decrypt.py and the runbook too):
    a trailing line break, as secret stores and `echo` add, is not part of it; a line break
    anywhere else is refused, because `openssl -pass` reads only the first line. Bytes that are not
    UTF-8 (Python holds them as lone surrogates) are refused too: key_id and openssl need the
    passphrase's bytes, and no message may show any of them."""
    value = value.rstrip("\r\n")
    if "\n" in value or "\r" in value:
        raise UsageError(f"{variable} contains a line break: openssl would use only its first line; "
                         "store the passphrase on one line")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"{variable} is not valid UTF-8 text: store the passphrase as UTF-8 "
                             "(the backups' key_id is derived from its UTF-8 bytes)") from None
    return value


def passphrases() -> list[str]:
    """The current passphrase first, then previous ones (key rotation)."""
    current = passphrase(os.environ.get(KEY_VAR, ""))
    if not current:
        raise UsageError(f"no encryption passphrase: set {KEY_VAR} (never pass it on a command line)")
    previous = [passphrase(p, PREVIOUS_KEY_VAR) for p in os.environ.get(PREVIOUS_KEY_VAR, "").split(",")]
    return [current] + [p for p in previous if p]


def child_env(**extra: str) -> dict[str, str]:
    """A copy of our environment without any secret, plus the given variables.

    Each child gets only the secret it needs: pg_dump/psql the database password, openssl none
    (it reads the passphrase from a file descriptor). No child gets the runner's ACTIONS_*
    variables: a psql fed a planted dump must not be able to mint this job's OIDC token.
    """
    env = {k: v for k, v in os.environ.items()
           if k not in SECRET_VARS and k not in CHILD_ENV_DROPPED and not k.startswith(CHILD_ENV_PREFIXES)}
    env.update(extra)
    return env
