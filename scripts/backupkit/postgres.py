"""PostgreSQL client programs: versions, small queries through psql, the dump's trailer."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

from .config import child_env
from .errors import BackupError
from .output import shown
from .pgurl import DatabaseTarget, parse_target, url_secrets
from .redaction import register_secret

TRAILER = b"-- PostgreSQL database dump complete"
# pg_dump 15.14+/16.10+/17.6+ write `\unrestrict KEY` after the trailer: look near the end.
TRAILER_WINDOW = 1024


def database_target(url: str | None, what: str = "DATABASE_URL") -> DatabaseTarget:
    """The database a URL names (pgurl.parse_target), its password registered for redaction
    first, whatever is wrong with the rest. None: libpq's PG* variables."""
    for secret in url_secrets(url) if url else []:
        register_secret(secret)
    return parse_target(url, what)


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


_USER_TABLES = """
SELECT pg_catalog.json_build_array(n.nspname, c.relname)::text
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
ORDER BY n.nspname, c.relname"""


def user_tables(target: DatabaseTarget, psql: str = "psql", *, restore_target: bool = False) -> list[str]:
    """Schema-qualified names of the tables outside the system schemas."""
    out = query(target, _USER_TABLES, psql, restore_target=restore_target)
    return [f"{schema}.{table}" for schema, table in (json.loads(line) for line in out.splitlines() if line)]


_ROLE = """
SELECT pg_catalog.json_build_array(current_user, pg_catalog.current_setting('is_superuser'),
    (SELECT r.rolcreaterole FROM pg_catalog.pg_roles r WHERE r.rolname = current_user),
    (SELECT pg_catalog.string_agg(r.rolname, ', ' ORDER BY r.rolname) FROM pg_catalog.pg_roles r
     WHERE (r.rolsuper OR r.rolname IN ('pg_execute_server_program', 'pg_read_server_files', 'pg_write_server_files'))
       AND r.rolname <> current_user AND pg_catalog.pg_has_role(current_user, r.oid, 'MEMBER')))::text"""


def risky_role(target: DatabaseTarget, psql: str = "psql") -> tuple[str, str]:
    """The target's role, and what makes it dangerous to restore as ('' when nothing): a
    superuser; a member of a superuser role or of the roles that run programs or read and write
    files on the server (SQL can SET ROLE to them); or CREATEROLE (it can grant itself those)."""
    user, superuser, createrole, members = json.loads(query(target, _ROLE, psql))
    if superuser == "on":
        return user, "a superuser"
    if members:
        return user, f"a member of {members}"
    return user, "allowed to create roles and grant them (CREATEROLE)" if createrole else ""


# What a restore could change in its target, digested: every user object's catalog row (a
# committed change to one gives it a new xmin), the tables' storage and size, sequences (nextval
# is not rolled back), large objects, and the role's own settings, memberships and database. Equal before and after a failed restore:
# nothing of it was committed. Locks held by a restore still dying make it wait, not read early.
_STATE = """
SET lock_timeout = '20s';
SELECT pg_catalog.md5(pg_catalog.concat_ws('|',
  (SELECT pg_catalog.string_agg(pg_catalog.concat(c.oid, ':', c.xmin, ':', c.relfilenode, ':',
          CASE WHEN c.relkind IN ('r', 'm', 't') THEN pg_catalog.pg_relation_size(c.oid) END), ',' ORDER BY c.oid)
     FROM pg_catalog.pg_class c WHERE c.oid >= 16384 AND c.relpersistence <> 't'),
  (SELECT pg_catalog.string_agg(pg_catalog.concat(a.attrelid, ':', a.attnum, ':', a.xmin), ',' ORDER BY a.attrelid, a.attnum)
     FROM pg_catalog.pg_attribute a WHERE a.attrelid >= 16384),
  (SELECT pg_catalog.string_agg(pg_catalog.concat(x.oid, ':', x.xmin), ',' ORDER BY x.oid) FROM (
     SELECT oid, xmin FROM pg_catalog.pg_namespace UNION ALL SELECT oid, xmin FROM pg_catalog.pg_proc
     UNION ALL SELECT oid, xmin FROM pg_catalog.pg_type UNION ALL SELECT oid, xmin FROM pg_catalog.pg_constraint
     UNION ALL SELECT oid, xmin FROM pg_catalog.pg_trigger UNION ALL SELECT oid, xmin FROM pg_catalog.pg_rewrite
     UNION ALL SELECT oid, xmin FROM pg_catalog.pg_attrdef UNION ALL SELECT oid, xmin FROM pg_catalog.pg_extension
     UNION ALL SELECT oid, xmin FROM pg_catalog.pg_policy UNION ALL SELECT oid, xmin FROM pg_catalog.pg_largeobject_metadata
     UNION ALL SELECT oid, xmin FROM pg_catalog.pg_event_trigger UNION ALL SELECT oid, xmin FROM pg_catalog.pg_publication
     UNION ALL SELECT oid, xmin FROM pg_catalog.pg_foreign_server) x WHERE x.oid >= 16384),
  (SELECT pg_catalog.string_agg(pg_catalog.concat(d.objoid, ':', d.classoid, ':', d.objsubid, ':', d.xmin), ','
          ORDER BY d.objoid, d.classoid, d.objsubid) FROM pg_catalog.pg_description d WHERE d.objoid >= 16384),
  (SELECT pg_catalog.string_agg(pg_catalog.concat(q.schemaname, '.', q.sequencename, ':', q.last_value), ','
          ORDER BY q.schemaname, q.sequencename) FROM pg_catalog.pg_sequences q),
  (SELECT pg_catalog.concat(r.oid, r.rolsuper, r.rolinherit, r.rolcreaterole, r.rolcreatedb, r.rolcanlogin,
          r.rolreplication, r.rolbypassrls, r.rolconnlimit, r.rolvaliduntil, r.rolconfig)
     FROM pg_catalog.pg_roles r WHERE r.rolname = current_user),
  (SELECT pg_catalog.string_agg(pg_catalog.concat(m.roleid, ':', m.member, ':', m.xmin), ',' ORDER BY m.roleid, m.member)
     FROM pg_catalog.pg_auth_members m),
  (SELECT pg_catalog.string_agg(pg_catalog.concat(s.setdatabase, ':', s.setrole, ':', s.setconfig), ','
          ORDER BY s.setdatabase, s.setrole) FROM pg_catalog.pg_db_role_setting s),
  (SELECT pg_catalog.concat(d.oid, ':', d.xmin) FROM pg_catalog.pg_database d WHERE d.datname = pg_catalog.current_database())
))"""


def target_state(target: DatabaseTarget, psql: str = "psql") -> str:
    """A digest of what a restore could change in its target (see _STATE)."""
    return query(target, _STATE, psql, timeout=120)


def end_sessions(target: DatabaseTarget, psql: str, application_name: str, wait: float = 15) -> None:
    """End the server sessions of a killed psql (named by its application_name): the server goes
    on with a statement until it notices its client is gone, holding the restore's locks."""
    name = _literal(application_name)
    deadline = time.monotonic() + wait
    while query(target, f"SELECT count(pg_catalog.pg_terminate_backend(pid)) FROM pg_catalog.pg_stat_activity "  # noqa: S608 - a literal of ours
                        f"WHERE application_name = {name} AND pid <> pg_catalog.pg_backend_pid()", psql) != "0":
        if time.monotonic() > deadline:
            return  # target_state's lock_timeout then says whether it can look
        time.sleep(0.2)


# Exact counts of every user table, by name whatever the name holds ('v1.2', a newline): counted
# by the server through query_to_xml, read-only and with row security off, so that no function
# of the restored database runs (a policy's, say) while it is counted.
_ROW_COUNTS = """
BEGIN READ ONLY;
SET LOCAL row_security = off;
SELECT pg_catalog.json_build_array(n.nspname, c.relname,
    (pg_catalog.xpath('/row/n/text()', pg_catalog.query_to_xml(
        pg_catalog.format('SELECT count(*) AS n FROM %I.%I', n.nspname, c.relname), false, true, '')))[1]::text)::text
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
ORDER BY n.nspname, c.relname;
COMMIT;"""


def row_counts(target: DatabaseTarget, psql: str = "psql") -> dict[str, int]:
    """Exact row count of every user table (for reports after a restore)."""
    out = query(target, _ROW_COUNTS, psql, timeout=3600)
    return {f"{schema}.{table}": int(count) for schema, table, count in (json.loads(line) for line in out.splitlines() if line)}


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
