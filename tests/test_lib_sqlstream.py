"""backupkit.sqlstream in process: what the guard passes on to psql and what it refuses, with
every input also cut in two at every byte offset and fed a byte at a time (a chunk boundary may
fall anywhere in a dump). The restores through it, against a real PostgreSQL, are in
test_restore_database.py and test_hostile_bucket.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from backupkit import sqlstream
from backupkit.sqlstream import REFUSAL, SEAL, Refused, SqlGuard
from dev.harness import REPO

CHECK = "\n" + sqlstream._ENCODING_CHECK
PRELUDE = b"SET client_encoding = 'UTF8';\n"
TRAILER = b"--\n-- PostgreSQL database dump complete\n--\n\n"


def guarded(dump: bytes, cuts: list[int] | None = None, **options) -> tuple[bytes, list[tuple[str, int]]]:
    """What psql would read, and the COPY blocks seen; the dump fed in pieces cut at `cuts`."""
    out: list[bytes] = []
    copies: list[tuple[str, int]] = []
    guard = SqlGuard(out.append, on_copy=lambda table, rows: copies.append((table, rows)), **options)
    at = 0
    for cut in [*(cuts or []), len(dump)]:
        guard.feed(dump[at:cut])
        at = cut
    guard.finish()
    return b"".join(out), copies


def outcome(dump: bytes, cuts: list[int] | None = None, **options):
    try:
        return guarded(dump, cuts, **options)
    except Refused as exc:
        return "refused", str(exc)


def every_cut(dump: bytes, **options):
    """The same outcome whole, cut in two anywhere, and a byte at a time."""
    whole = outcome(dump, **options)
    for cut in range(1, len(dump)):
        assert outcome(dump, [cut], **options) == whole, f"cut at {cut}: {dump[:cut][-40:]!r} | {dump[cut:][:40]!r}"
    assert outcome(dump, list(range(1, len(dump))), **options) == whole, "a byte at a time"
    return whole


def sent(dump: bytes, **options) -> bytes:
    """What psql would read, without the guard's own prelude and checks."""
    out, _ = every_cut(dump, **options)
    assert isinstance(out, bytes), out
    assert out.startswith(PRELUDE)
    return out[len(PRELUDE):].replace(CHECK.encode(), b"")


def refused(dump: bytes, what: str) -> None:
    result = every_cut(dump)
    assert result[0] == "refused", result
    assert what in result[1], result[1]


# -- what a genuine dump holds passes unchanged ---------------------------------------------------
GENUINE = b"""--
-- PostgreSQL database dump
--

SET statement_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET default_tablespace = '';
DROP TABLE IF EXISTS "v1.2"."new
line";
CREATE SCHEMA "v1.2";
COMMENT ON SCHEMA "v1.2" IS 'schema; COMMIT; BEGIN; -- not a comment /* nor this';
CREATE FUNCTION public.f(a integer) RETURNS integer
    LANGUAGE plpgsql
    AS $$ BEGIN
COMMIT;
ALTER ROLE CURRENT_USER SET search_path = zz;
RETURN a; END $$;
CREATE FUNCTION public.g(a integer) RETURNS integer
    LANGUAGE sql
    BEGIN ATOMIC
 SELECT
         CASE
             WHEN (a > 0) THEN (a + 1)
             ELSE 0
         END AS "case";
 SELECT a AS a;
END;
CREATE PROCEDURE public.p()
    LANGUAGE sql
    BEGIN ATOMIC
 INSERT INTO public.t (a)
   VALUES (1);
END;
CREATE TABLE public.t (
    id integer NOT NULL,
    arr integer[],
    b bit(4) DEFAULT '0101'::"bit",
    c text DEFAULT $_$COMMIT;$_$,
    CONSTRAINT t_check CHECK ((arr[1] IS NOT NULL)) /* a comment /* nested */ still ; COMMIT; */
);
-- COMMIT; in a line comment
CREATE VIEW public.v AS
 SELECT t.id, 'COMMIT;'::text AS c, t.arr::integer[] AS a
   FROM public.t;
CREATE RULE r AS
    ON INSERT TO public.t DO ( INSERT INTO public.t (id)
  VALUES (2);
 INSERT INTO public.t (id)
  VALUES (3);
);
SELECT pg_catalog.lo_create('16510');
COPY public.t (id, arr, b, c) FROM stdin;
1	{1,2}	0101	COMMIT;
2	\\N	0101	line one\\nCOMMIT;\\n\\\\.\\nBEGIN;
3	\\N	0101	\\.x
\\.
COPY "v1.2"."new
line" (id) FROM stdin;
\\.
SELECT pg_catalog.setval('"v1.2"."seq''s"', 2, true);
BEGIN;
SELECT pg_catalog.lo_open('16510', 131072);
SELECT pg_catalog.lowrite(0, '\\x68656c6c6f');
SELECT pg_catalog.lo_close(0);
COMMIT;
ALTER TABLE ONLY public.t
    ADD CONSTRAINT t_pkey PRIMARY KEY (id);
CREATE INDEX t_lower_idx ON public.t USING btree (lower(c));
CREATE CONSTRAINT TRIGGER t_check AFTER INSERT ON public.t NOT DEFERRABLE INITIALLY IMMEDIATE FOR EACH ROW EXECUTE FUNCTION public.f();
GRANT SELECT ON TABLE public.t TO PUBLIC;
REFRESH MATERIALIZED VIEW public.mv;
""" + TRAILER


def test_a_genuine_dump_passes_whole_wherever_its_chunks_end():
    assert sent(GENUINE) == GENUINE.replace(b"'\\x68656c6c6f'", b"E'\\\\x68656c6c6f'").replace(
        b"BEGIN;\nSELECT pg_catalog.lo_open", b"\nSELECT pg_catalog.lo_open").replace(
        b"lo_close(0);\nCOMMIT;", b"lo_close(0);\n")
    _, copies = guarded(GENUINE)
    assert copies == [("public.t", 3), ('"v1.2"."new\nline"', 0)]


def test_pg_dumps_framing_lines_are_dropped_and_psql_restricted_with_our_key():
    framed = b"--\n-- head\n--\n\n\\restrict AbC123\n\nSET lock_timeout = 0;\n" + TRAILER + b"\\unrestrict AbC123\n\n"
    out, _ = every_cut(framed, restrict_key="Ours99")
    assert out.startswith(b"\\restrict Ours99\n" + PRELUDE)
    assert b"AbC123" not in out and out.count(b"\\") == 1
    assert b"SET lock_timeout = 0;" in out


def test_the_seal_and_the_statement_timeout_are_ours():
    out, _ = guarded(b"SET statement_timeout = 0;\n" + TRAILER, statement_timeout_ms=5000, seal=True)
    assert out.startswith(b"SET client_encoding = 'UTF8';\nSET statement_timeout = '5000ms';\n")
    assert b"SET statement_timeout = 0;\nSET statement_timeout = '5000ms';" in out
    assert out.endswith(SEAL.encode())
    assert "pg_stat_xact_all_tables" in SEAL and "1260" in SEAL and "2964" in SEAL  # pg_authid, pg_db_role_setting


def test_large_objects_are_written_inside_psqls_single_transaction():
    """pg_dump wraps large objects' data in BEGIN; … COMMIT;, which ended psql's --single-transaction."""
    blob = (b"BEGIN;\n\nSELECT pg_catalog.lo_open('16510', 131072);\nSELECT pg_catalog.lowrite(0, '\\x6869');\n"
            b"SELECT pg_catalog.lo_close(0);\n\nCOMMIT;\n\n")
    out = sent(blob + TRAILER)
    assert b"BEGIN" not in out and b"COMMIT" not in out.replace(b"dump complete", b"")
    assert b"lo_open" in out and b"E'\\\\x6869'" in out


# -- psql's variables ----------------------------------------------------------------------------
@pytest.mark.parametrize(("sql", "expected"), [
    (b'CHECK ((arr[:"DBNAME"] IS NOT NULL))', b'CHECK ((arr[: "DBNAME"] IS NOT NULL))'),
    (b"SELECT arr[1:2], arr[:n], x :'USER', :{?HOST}", b"SELECT arr[1: 2], arr[: n], x : 'USER', : {?HOST}"),
    (b"SELECT a::int, b:::c, f(x := 1), 'a:b', \"c:d\", $$:e$$", b"SELECT a::int, b::: c, f(x := 1), 'a:b', \"c:d\", $$:e$$"),
])
def test_psql_variables_cannot_change_the_sql(sql, expected):
    assert sent(b"CREATE TABLE t (a int, " + sql + b");\n") == b"CREATE TABLE t (a int, " + expected + b");\n"


def test_backslashes_in_standard_strings_mean_the_same_whatever_standard_conforming_strings_says():
    dump = b"COMMENT ON COLUMN t.x IS 'C:\\';\nCOMMENT ON TABLE t IS 'it''s \\d';\nCOMMENT ON TABLE u IS E'a\\'b';\n"
    assert sent(dump) == (b"COMMENT ON COLUMN t.x IS E'C:\\\\';\nCOMMENT ON TABLE t IS E'it''s \\\\d';\n"
                          b"COMMENT ON TABLE u IS E'a\\'b';\n")


# -- what a plain dump never holds ---------------------------------------------------------------
@pytest.mark.parametrize(("sql", "what"), [
    (b"COMMIT;", "transaction control (COMMIT)"),
    (b"END;", "transaction control (END)"),
    (b"ROLLBACK;", "transaction control (ROLLBACK)"),
    (b"abort;", "transaction control (ABORT)"),
    (b"START TRANSACTION;", "transaction control (START)"),
    (b"SAVEPOINT a;", "transaction control (SAVEPOINT)"),
    (b"RELEASE a;", "transaction control (RELEASE)"),
    (b"PREPARE TRANSACTION 'x';", "transaction control (PREPARE)"),
    (b"COMMIT PREPARED 'x';", "transaction control (COMMIT)"),
    (b"BEGIN;\nCREATE TABLE t (a int);", "transaction control (BEGIN)"),
    (b"ALTER ROLE CURRENT_USER SET search_path = zz;", "role or session-authorization change (ALTER ROLE)"),
    (b"ALTER USER app PASSWORD 'x';", "role or session-authorization change (ALTER USER)"),
    (b"CREATE ROLE x SUPERUSER;", "role or session-authorization change (CREATE ROLE)"),
    (b"DROP GROUP x;", "role or session-authorization change (DROP GROUP)"),
    (b"GRANT pg_execute_server_program TO app;", "role or session-authorization change (GRANT of a role)"),
    (b"REVOKE admin FROM app;", "role or session-authorization change (REVOKE of a role)"),
    (b"SET ROLE admin;", "role or session-authorization change (SET ROLE)"),
    (b"SET SESSION AUTHORIZATION admin;", "role or session-authorization change (SET SESSION AUTHORIZATION)"),
    (b"RESET ROLE;", "role or session-authorization change (RESET ROLE)"),
    (b"REASSIGN OWNED BY a TO b;", "role or session-authorization change (REASSIGN OWNED)"),
    (b"ALTER SYSTEM SET archive_command = 'x';", "server configuration change (ALTER SYSTEM)"),
    (b"CREATE DATABASE x;", "database or tablespace command (CREATE DATABASE)"),
    (b"ALTER DATABASE app SET search_path = zz;", "database or tablespace command (ALTER DATABASE)"),
    (b"DROP TABLESPACE t;", "database or tablespace command (DROP TABLESPACE)"),
    (b"GRANT CREATE ON DATABASE app TO PUBLIC;", "database or tablespace command (GRANT … ON DATABASE)"),
    (b"COMMENT ON ROLE app IS 'x';", "role or session-authorization change (COMMENT ON ROLE)"),
    (b"CREATE SUBSCRIPTION s CONNECTION 'host=x' PUBLICATION p;", "a subscription (CREATE SUBSCRIPTION)"),
    (b"COPY t FROM '/etc/passwd';", "COPY to or from somewhere other than psql's input"),
    (b"COPY (SELECT 1) TO PROGRAM 'touch x';", "COPY to or from somewhere other than psql's input"),
    (b"COPY t TO STDOUT;", "COPY to or from somewhere other than psql's input"),
    (b"DO $$ BEGIN END $$;", "code pg_dump never runs (DO)"),
    (b"CALL p();", "code pg_dump never runs (CALL)"),
    (b"LOAD 'x';", "code pg_dump never runs (LOAD)"),
    (b"SELECT pg_sleep(1000);", "a SELECT other than the pg_catalog functions pg_dump calls"),
    (b"SELECT pg_catalog.set_config('role', 'admin', false);", "a SELECT other than"),
    (b"SELECT pg_catalog.setval('s', (SELECT evil()), true);", "a SELECT other than"),
    (b"SELECT lo_export(16510, '/tmp/x');", "a SELECT other than"),
    (b"SET work_mem = '1GB';", "SET of something pg_dump never sets (work_mem)"),
    (b"SET client_encoding = 'SJIS';", "a client_encoding psql cannot read safely"),
    (b"TRUNCATE t;", "a statement pg_dump never writes (TRUNCATE T)"),
    (b"INSERT INTO t VALUES (1);", "a statement pg_dump never writes (INSERT INTO T)"),
    (b"CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC COMMIT; END;", "inside a function body (COMMIT)"),
    (b"CREATE CONSTRAINT TRIGGER t AFTER INSERT ON t DEFERRABLE INITIALLY IMMEDIATE FOR EACH ROW EXECUTE FUNCTION f();",
     "a deferrable constraint trigger"),
    (b"CREATE OR REPLACE CONSTRAINT TRIGGER t AFTER INSERT ON t INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION f();",
     "a deferrable constraint trigger"),
    (b"\\! touch x", "psql commands"),
    (b"SELECT 1 \\g |touch x", "psql commands"),
    (b"CREATE TABLE a (x int)\\; COMMIT;", "psql commands"),
    (b"\\unrestrict AbC", "psql commands"),
    (b"CREATE TABLE a (x int); -- \\\nCOMMIT;", "transaction control (COMMIT)"),
    (b"CREATE TABLE a (x int); -- \rCOMMIT;", "transaction control (COMMIT)"),
    (b"CREATE TABLE a (x int);/* /* */ */COMMIT;", "transaction control (COMMIT)"),
    (b"COMMENT ON TABLE a IS 'x'\n'; COMMIT; --';", "a string literal continued on another line"),
    (b"COMMENT ON TABLE a IS E'x'\n'\\''; COMMIT; --';", "a string literal continued on another line"),
    (b"COMMENT ON TABLE a IS 1e'x';", "a number run into a name"),
    (b"CREATE TABLE a (x int DEFAULT 1$b$);", "a '$' right after a number"),
    (b"COMMENT ON TABLE a IS ab'x';", "a quote right after a name or number"),
    (b"CREATE TABLE \xc3\xa9 (a int);", "a non-ASCII byte outside quotes"),
    (b"CREATE TABLE a (x int);\0", "a NUL byte"),
    (b"COPY t (a) FROM stdin; SELECT 1;\n1\n\\.", "something after COPY"),
    (b"COPY t (a) FROM stdin;\n1\n2\n", "COPY data that never ends"),
    (b"CREATE TABLE a (x int)", "a statement that never ends"),
    (b"COMMENT ON TABLE a IS 'x;", "a statement that never ends"),
    # psql counts BEGIN in CREATE FUNCTION and sends nothing until its END: COMMIT would reach the
    # server inside one string with CREATE FUNCTION, and the COPY's data would not be where it seems.
    (b"CREATE FUNCTION begin() RETURNS int LANGUAGE sql AS 'select 1'; COMMIT;", "transaction control (COMMIT)"),
    (b"CREATE FUNCTION begin() RETURNS int LANGUAGE sql AS 'select 1'; COPY t (a) FROM stdin;\n\\.\nEND;",
     "a COPY that psql would not send on its own"),
])
def test_what_pg_dump_never_writes_is_refused(sql, what):
    refused(b"SET lock_timeout = 0;\n" + sql + b"\n" + TRAILER, what)


def test_what_was_written_before_a_refusal_ends_between_statements():
    out: list[bytes] = []
    guard = SqlGuard(out.append)
    guard.feed(b"CREATE TABLE a (x int);\nCREATE TABLE b (y int);\nCOM")
    with pytest.raises(Refused, match=r"transaction control \(COMMIT\)"):
        guard.feed(b"MIT;\nCREATE TABLE c (z int);\n")
    written = b"".join(out)
    assert written.endswith(b"CREATE TABLE b (y int);" + CHECK.encode()) and b"COMMIT" not in written


def test_data_and_bodies_holding_the_words_restore_exactly():
    """The words the guard refuses, inside what psql does not read as statements."""
    for inside in (b"COMMIT;", b"ALTER ROLE x PASSWORD 'y';", b"\\! touch x", b"COPY t TO PROGRAM 'x';"):
        dump = (b"CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $body$\n" + inside + b"\n$body$;\n"
                b"COMMENT ON TABLE t IS $$" + inside + b"$$;\n"
                b"COPY t (a) FROM stdin;\n" + inside.replace(b"\\", b"\\\\") + b"\n\\.\n")
        assert sent(dump) == dump


# -- the filter of the runbook's manual restore ----------------------------------------------------
def filter_run(dump: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts/backupkit/sqlstream.py")], input=dump, capture_output=True)


def test_the_standalone_filter_restricts_psql_and_commits_only_after_the_seal():
    """The filter opens the transaction itself and commits it last: psql is not given
    --single-transaction (which commits what it read when its input ends, however it ends)."""
    done = filter_run(GENUINE)
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.split(b"\n", 2)[:2]
    assert first.startswith(b"\\restrict ") and second == b"BEGIN;"
    assert done.stdout.endswith(SEAL.encode() + b"COMMIT;\n")


@pytest.mark.parametrize("dump", [b"CREATE TABLE a (x int);\nCOMMIT;\n" + TRAILER, b"CREATE TABLE a (x int);\n",
                                  b"COPY t (a) FROM stdin;\n1\0\n\\.\n" + TRAILER])
def test_the_standalone_filter_ends_a_refused_dump_with_a_failing_statement(dump):
    """psql --single-transaction commits what it read when its input ends cleanly: the filter's
    last words make it fail instead (after ending COPY data, when in it)."""
    done = filter_run(dump)
    assert done.returncode == 1
    assert done.stdout.endswith(REFUSAL.encode())
    assert b"COMMIT" not in done.stdout
    assert done.stderr.decode().startswith("sqlstream.py: refused: the dump holds ")


def test_a_refusal_inside_copy_data_is_known():
    """The filter ends COPY data (`\\.`) before its failing statement, or psql would take it as a row."""
    guard = SqlGuard()
    guard.feed(b"COPY t (a) FROM stdin;\n1\n")
    assert guard.in_copy()
    with pytest.raises(Refused, match="NUL"):
        guard.feed(b"2\0\n")
