"""PostgreSQL connection URLs read as libpq reads them, and `DatabaseTarget`, a connection whose
password goes only into the child's PGPASSWORD, never on a command line."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import unquote

from .config import child_env
from .errors import UsageError
from .output import shown

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


def parse_target(url: str | None, what: str = "DATABASE_URL") -> DatabaseTarget:
    """Split a postgres:// URL into a password-free URL and the password (its secrets are not
    registered for redaction: postgres.database_target does that first). Several hosts
    (postgresql://u@h1:5432,h2:5433/db) are passed on as they are, libpq tries them in turn."""
    if not url:
        database = os.environ.get("PGDATABASE") or os.environ.get("PGUSER") or os.environ.get("USER", "")
        return DatabaseTarget(None, None, database)
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
