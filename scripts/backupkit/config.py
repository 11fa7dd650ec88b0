"""Configuration: environment variables and flags turned into validated values.

Every script reads the environment; a flag overrides its variable (docs/contract.md, "What the
scripts promise").
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import unquote, urlsplit

from .errors import UsageError
from .output import shown

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


def duration_arg(value: str) -> timedelta:
    """argparse `type=` wrapper: a bad duration is a usage error (exit 2)."""
    try:
        return parse_duration(value)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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


# Secrets given on a command line (e.g. --database-url): redacted from output like those in the
# environment.
_flag_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    if value:
        _flag_secrets.add(value)


def flag_secrets() -> set[str]:
    return set(_flag_secrets)


# What libpq takes in a URL's query (PostgreSQL 18): anything else is refused without being shown,
# as it may be a piece of a password whose '&' was not encoded (libpq's own error would echo it).
LIBPQ_PARAMETERS = frozenset("""
    host hostaddr port dbname user password passfile require_auth channel_binding connect_timeout
    client_encoding options application_name fallback_application_name keepalives keepalives_idle
    keepalives_interval keepalives_count tcp_user_timeout replication gssencmode sslmode sslnegotiation
    requiressl sslcompression sslcert sslkey sslkeylogfile sslpassword sslcertmode sslrootcert sslcrl
    sslcrldir sslsni requirepeer ssl_min_protocol_version ssl_max_protocol_version min_protocol_version
    max_protocol_version krbsrvname gsslib gssdelegation service target_session_attrs load_balance_hosts
    oauth_issuer oauth_client_id oauth_client_secret oauth_scope scram_client_key scram_server_key
""".split())
# Secrets libpq reads only from the connection string, which pg_dump and psql get on their
# command line (visible to every user of the machine): refused.
ARGV_SECRETS = ("sslpassword", "oauth_client_secret", "scram_client_key", "scram_server_key")
# Every character that ends or splits a part of a URL: percent-encoded in a password, nothing can
# be misread (README, "Database URLs").
ENCODE_HINT = ("percent-encode every special character of the password (each of : / ? # [ ] @ ! $ & ' ( ) * + , ; = % "
               "and space: # as %23, @ as %40, / as %2F, % as %25, …), or leave the password out of the URL and set "
               "PGPASSWORD")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
# One host of a (multi-host) authority: a name, an address or a percent-encoded socket directory,
# or an [IPv6] address; an optional numeric port.
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+(%[0-9A-Za-z%.]+)?\]|[^\[\]:@]*)(:[0-9]+)?")


@dataclass(frozen=True)
class _UrlParts:
    scheme: str
    userinfo: str | None  # as written
    hosts: str  # as written: host[:port][,host[:port]…]
    path: str
    query: list[tuple[str, str, str]]  # (name, value, the piece as written), decoded as libpq does


def _query(query: str) -> list[tuple[str, str, str]]:
    """A URL's query as libpq reads it: '&' between pieces, the first '=' in each, %XX decoded
    ('+' stays '+')."""
    pieces = [piece for piece in query.split("&") if piece]
    return [(unquote(name), unquote(value), piece) for piece in pieces for name, _, value in [piece.partition("=")]]


def _split_url(url: str) -> _UrlParts:
    """A postgres URL's parts, read as libpq reads them (its first '/' or '?' after '://' ends
    the authority; the last '@' before it ends the userinfo), refusing whatever would be read
    otherwise than meant. Messages never show the URL: it may hold a password. ValueError: a
    host or port that is not one."""
    if _CONTROL.search(url):
        raise UsageError(f"a control character in it (a tab or a line break: Python would drop it, changing the URL): {ENCODE_HINT}")
    if "#" in url:
        raise UsageError(f"a '#' in it: {ENCODE_HINT}")
    scheme, _, rest = url.partition("://")
    authority = re.match(r"[^/?]*", rest).group()  # type: ignore[union-attr] - always matches
    path, _, query_text = rest[len(authority):].partition("?")
    query = _query(query_text)
    if "@" in path or any("@" in raw for name, _, raw in query if name != "password"):
        raise UsageError(f"an '@' after the host: {ENCODE_HINT}")
    userinfo, at, hosts = authority.rpartition("@")
    if "[" in userinfo or "]" in userinfo:
        raise UsageError(f"a '[' or ']' in the user name or password: {ENCODE_HINT}")
    if _BAD_PERCENT.search(userinfo):
        raise UsageError(f"a '%' in the user name or password that does not start a %XX code: {ENCODE_HINT}")
    if not all(_HOST.fullmatch(host) for host in hosts.split(",")):
        raise ValueError("not a host[:port] list")
    if any(name not in LIBPQ_PARAMETERS for name, _, _ in query):
        raise UsageError("a query parameter (after '?') that libpq does not take; it is not shown, as it may be part of "
                         f"a password: {ENCODE_HINT} (& as %26, = as %3D)")
    return _UrlParts(scheme, userinfo if at else None, hosts, path, query)


def url_secrets(url: str) -> list[str]:
    """What to hide of a database URL: its password (as written and decoded, from the userinfo or
    `?password=`); when the URL is refused or unreadable, everything that could be part of one
    (all between the user name's ':' and the last '@', all after 'password=', else all of it)."""
    rest = url.partition("://")[2] or url
    found: list[str] = []
    try:
        parts = _split_url(url)
    except (ValueError, UsageError):
        would_be = rest.rpartition("@")[0]
        if ":" in would_be:
            found += [would_be, would_be.partition(":")[2]]
        userinfo = re.match(r"[^/?#]*", rest).group().rpartition("@")[0]  # type: ignore[union-attr] - always matches
        found.append(userinfo.partition(":")[2])
        found.append(rest.partition("password=")[2])
        if not any(found):
            found.append(rest)
    else:
        found.append((parts.userinfo or "").partition(":")[2])
        found += [raw.partition("=")[2] for name, _, raw in parts.query if name == "password" or name in ARGV_SECRETS]
    found += [unquote(s) for s in found]
    return [s for s in dict.fromkeys(found) if s]


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
        return shown(self.dbname) if self.dbname else f"database '{shown(self.database)}' (from PG* variables)"


def database_target(url: str | None, what: str = "DATABASE_URL") -> DatabaseTarget:
    """Split a postgres:// URL into a password-free URL and the password. Several hosts
    (postgresql://u@h1:5432,h2:5433/db) are passed on as they are, libpq tries them in turn."""
    if not url:
        database = os.environ.get("PGDATABASE") or os.environ.get("PGUSER") or os.environ.get("USER", "")
        return DatabaseTarget(None, None, database)
    for secret in url_secrets(url):
        register_secret(secret)
    expected = "expected postgresql://USER@HOST:PORT/DATABASE, with the password in PGPASSWORD"
    try:
        if url.partition("://")[0] not in ("postgres", "postgresql"):
            raise UsageError(f"{what} is not a PostgreSQL URL: {expected}")
        parts = _split_url(url)
    except ValueError:
        raise UsageError(f"{what} is not a valid URL ({expected}): check the host and port") from None
    except UsageError as exc:
        if str(exc).startswith(what):
            raise
        raise UsageError(f"{what} has {exc}") from None
    if not (parts.userinfo or parts.hosts or parts.path or parts.query):
        raise UsageError(f"{what} is not a PostgreSQL URL: {expected}")
    user, colon, written = (parts.userinfo or "").partition(":")
    password = unquote(written) if colon else None
    for name, value, _ in parts.query:
        if name == "password":
            password = value
        if name == "sslpassword":
            raise UsageError(f"{what} has sslpassword: it would be on pg_dump's and psql's command line; use a client "
                             "key without a passphrase, readable only by this user (sslkey=…)")
        if name in ARGV_SECRETS:
            raise UsageError(f"{what} has {name}: it would be on pg_dump's and psql's command line, readable by every "
                             "user of this machine")
    # The query as written, without the password: libpq decodes it itself.
    query = "&".join(raw for name, _, raw in parts.query if name != "password")
    netloc = f"{user}@{parts.hosts}" if parts.userinfo is not None else parts.hosts
    # Not urlunsplit: it drops the '//' of an empty host (postgresql:///db?host=/socket), which libpq needs.
    clean = f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
    database = unquote(parts.path.lstrip("/")) or unquote(user) or os.environ.get("PGDATABASE", "")
    return DatabaseTarget(clean, password, database)
