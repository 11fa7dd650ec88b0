#!/usr/bin/env python3
"""A guard on the SQL of a plain pg_dump on its way to psql: a streaming lexer that reads the dump
as psql and the server will (quotes, dollar quotes, comments, COPY data, psql's backslash lines and
variables) and lets through only the statements a plain dump of one database writes.

Standard library only, so that it also runs on its own in the runbook's manual restore:
`python3 sqlstream.py database-backup.sql | psql -X -v ON_ERROR_STOP=1 …`. There it opens the
transaction itself and sends `COMMIT;` only after the whole dump passed: psql whose input ends
any other way (the filter refused, or was killed) reaches EOF inside the transaction, and
PostgreSQL rolls it back (`psql --single-transaction` would commit what it had read).
"""

from __future__ import annotations

import argparse
import re
import secrets
import sys
from collections.abc import Callable
from typing import Any

# A statement is held until its end is seen (whole statements are classified and rewritten):
# no statement pg_dump writes comes near this; COPY data streams through and is not held.
MAX_STATEMENT = 64 * 1024 * 1024
TRAILER = b"-- PostgreSQL database dump complete"
TRAILER_WINDOW = 1024  # pg_dump 15.14+ writes `\unrestrict KEY` after the trailer

# Where psql and the server can read the same bytes differently, the guard refuses instead of
# guessing. The reasons below are said in the error (never a dump's bytes).
PSQL_COMMANDS = "psql commands (\\! would run a shell command here)"


class Refused(ValueError):
    """The dump holds something a plain pg_dump of one database never writes (or, `never`
    false, something it may write but that a restore cannot check)."""

    def __init__(self, what: str, *, never: bool = True):
        super().__init__(f"the dump holds {what}, which a plain pg_dump of one database never writes" if never
                         else f"the dump holds {what}")
        self.what = what
        self.never = never


# -- lexical classes --------------------------------------------------------------------------
# In plain SQL text (outside quotes and comments), the bytes that need a decision. The fast form
# skips words; the other one stops at every word, for the statement's head and the places where
# psql counts words (CREATE FUNCTION … BEGIN … END).
_BAD = rb"\x00-\x08\x0b\x0e-\x1f\x7f-\xff"
_FAST = re.compile(rb"--|/\*|['\"$\\;:()" + _BAD + rb"]")
_WORDS = re.compile(rb"--|/\*|['\"$\\;:()" + _BAD + rb"]|[A-Za-z_][A-Za-z0-9_$]*|[0-9][A-Za-z0-9_$]*")
_WORD_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_$.")
_VARIABLE_NEXT = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_'\"{") | frozenset(range(0x80, 0x100))
_IDENTIFIER = re.compile(rb"[A-Za-z_][A-Za-z0-9_$]*\Z")
_DOLLAR = re.compile(rb"\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$")
_DOLLAR_OPEN = re.compile(rb"\$(?:[A-Za-z_][A-Za-z0-9_]*)?\Z")
_NEWLINE = re.compile(rb"[\r\n]")
_COMMENT_EDGE = re.compile(rb"/\*|\*/")
_E_STRING_STOP = re.compile(rb"[\\']")
_BLANKS = re.compile(rb"(?:[ \t\n\r\f]+|--[^\r\n]*)*")
_FRAME = re.compile(rb"\\(un)?restrict ([0-9A-Za-z]+)\r?\n?\Z")
# GRANT … ON object TO role (a dump made without --no-privileges) stays in the database; GRANT
# role TO role, and grants on databases, tablespaces and parameters, do not.
_GRANT_WORDS = re.compile(rb'([A-Za-z_][A-Za-z0-9_$]*)|"(?:[^"]|"")*"|(--|/\*|[\'$])|[^A-Za-z_"]')
# A deferrable constraint trigger's function runs at the COMMIT, after the seal; it can defer
# itself again whatever the seal does first (SET CONSTRAINTS from inside a trigger function).
_DEFERRABLE = re.compile(rb"(?<!NOT )\bDEFERRABLE\b|\bINITIALLY\s+DEFERRED\b", re.I)
_SHARED_LABEL = re.compile(rb"\bON\s+(?:ROLE|DATABASE|TABLESPACE|SUBSCRIPTION)\b", re.I)
_BAD_BYTES = frozenset(range(0x00, 0x09)) | {0x0B} | frozenset(range(0x0E, 0x20)) | frozenset(range(0x7F, 0x100))

# Lexical states.
INITIAL, LINE_COMMENT, COMMENT, STRING, E_STRING, N_STRING, BIT_STRING, IDENT, DOLLAR, AFTER_STRING = range(10)

# -- what pg_dump writes ----------------------------------------------------------------------
_OR_REPLACE = ("OR", "REPLACE")
_CREATE = {
    ("SCHEMA",), ("TABLE",), ("UNLOGGED", "TABLE"), ("FOREIGN", "TABLE"), ("VIEW",), ("RECURSIVE", "VIEW"),
    ("MATERIALIZED", "VIEW"), ("INDEX",), ("UNIQUE", "INDEX"), ("SEQUENCE",), ("TYPE",), ("DOMAIN",), ("FUNCTION",),
    ("PROCEDURE",), ("AGGREGATE",), ("OPERATOR",), ("CAST",), ("COLLATION",), ("CONVERSION",), ("DEFAULT", "CONVERSION"),
    ("TEXT", "SEARCH"), ("TRIGGER",), ("CONSTRAINT", "TRIGGER"), ("EVENT", "TRIGGER"), ("RULE",), ("POLICY",),
    ("PUBLICATION",), ("STATISTICS",), ("EXTENSION",), ("SERVER",), ("USER", "MAPPING"), ("FOREIGN", "DATA", "WRAPPER"),
    ("LANGUAGE",), ("PROCEDURAL", "LANGUAGE"), ("TRUSTED", "LANGUAGE"), ("TRUSTED", "PROCEDURAL", "LANGUAGE"),
    ("TRANSFORM",), ("ACCESS", "METHOD"),
}
_ALTER = {
    ("TABLE",), ("FOREIGN", "TABLE"), ("INDEX",), ("SEQUENCE",), ("VIEW",), ("MATERIALIZED", "VIEW"), ("TYPE",),
    ("DOMAIN",), ("FUNCTION",), ("PROCEDURE",), ("ROUTINE",), ("AGGREGATE",), ("OPERATOR",), ("TEXT", "SEARCH"),
    ("PUBLICATION",), ("STATISTICS",), ("EXTENSION",), ("SCHEMA",), ("SERVER",), ("USER", "MAPPING"),
    ("FOREIGN", "DATA", "WRAPPER"), ("EVENT", "TRIGGER"), ("COLLATION",), ("CONVERSION",), ("TRIGGER",), ("POLICY",),
    ("RULE",), ("LANGUAGE",), ("PROCEDURAL", "LANGUAGE"), ("LARGE", "OBJECT"), ("DEFAULT", "PRIVILEGES"),
}
_DROP = (_CREATE - {("UNLOGGED", "TABLE"), ("UNIQUE", "INDEX"), ("RECURSIVE", "VIEW"), ("DEFAULT", "CONVERSION"),
                    ("TRUSTED", "LANGUAGE"), ("TRUSTED", "PROCEDURAL", "LANGUAGE")}) | {("ROUTINE",)}
_SHARED = {"ROLE", "USER", "GROUP", "DATABASE", "TABLESPACE", "SUBSCRIPTION"}
_TRANSACTION = {"BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT", "SAVEPOINT", "RELEASE", "PREPARE"}
_ROLE_HEADS = {"REASSIGN", "RESET"}
# Statements of a BEGIN ATOMIC function body (the server stores them; nothing runs at CREATE).
_BODY_HEADS = {"SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "WITH", "VALUES", "TABLE", "RETURN", "END"}
# Statements that cannot run the dump's own functions, so cannot change the session's encoding.
_INERT = {
    ("SET",), ("SELECT",), ("COMMENT",), ("SECURITY",), ("DROP",), ("CREATE", "SCHEMA"), ("CREATE", "FUNCTION"),
    ("CREATE", "PROCEDURE"), ("CREATE", "OR"), ("CREATE", "SEQUENCE"), ("ALTER", "SEQUENCE"), ("CREATE", "TYPE"),
    ("CREATE", "DOMAIN"), ("CREATE", "VIEW"), ("CREATE", "TRIGGER"), ("CREATE", "POLICY"), ("CREATE", "RULE"),
    ("CREATE", "AGGREGATE"), ("CREATE", "OPERATOR"), ("CREATE", "CAST"), ("CREATE", "TEXT"), ("ALTER", "TEXT"),
    ("CREATE", "STATISTICS"), ("CREATE", "PUBLICATION"), ("ALTER", "PUBLICATION"), ("CREATE", "SERVER"),
    ("CREATE", "USER"), ("CREATE", "FOREIGN"),
}
# The parameters pg_dump sets (pg_backup_archiver.c), and the encodings a server can have: psql
# reads client-only ones (SJIS, BIG5, GBK, …) with ASCII bytes inside characters.
_SET_NAMES = {
    b"statement_timeout", b"lock_timeout", b"idle_in_transaction_session_timeout", b"transaction_timeout",
    b"client_encoding", b"standard_conforming_strings", b"check_function_bodies", b"xmloption", b"client_min_messages",
    b"row_security", b"default_tablespace", b"default_table_access_method", b"search_path", b"default_with_oids",
    b"escape_string_warning",
}
_SERVER_ENCODINGS = {
    "sqlascii", "eucjp", "euccn", "euckr", "euctw", "eucjis2004", "utf8", "unicode", "muleinternal", "latin1", "latin2",
    "latin3", "latin4", "latin5", "latin6", "latin7", "latin8", "latin9", "latin10", "win1256", "win1258", "win866",
    "win874", "koi8r", "win1251", "win1252", "iso88595", "iso88596", "iso88597", "iso88598", "win1250", "win1253",
    "win1254", "win1255", "win1257", "koi8u",
}
_CLIENT_ONLY_ENCODINGS = "SJIS,SHIFT_JIS_2004,BIG5,GBK,UHC,GB18030,JOHAB"

_LIT = rb"(?:'(?:[^']|'')*'|E'(?:[^'\\]|\\.|'')*')"
_ARG = _LIT + rb"(?:::[a-z][a-z0-9_ ]*(?:\[\])?)?|-?[0-9]+|true|false"
_NAME = rb'(?:[A-Za-z_][A-Za-z0-9_$]*|"(?:[^"]|"")+")'
_QUALIFIED = _NAME + rb"(?:\." + _NAME + rb")*"
_SELECTS = [re.compile(p, re.S) for p in (
    rb"SELECT pg_catalog\.set_config\('search_path', " + _LIT + rb", false\);\Z",
    rb"SELECT pg_catalog\.setval\(" + _LIT + rb", -?[0-9]+, (?:true|false)\);\Z",
    rb"SELECT pg_catalog\.lo_create\('[0-9]+'\);\Z",
    rb"SELECT pg_catalog\.lo_unlink\(oid\) FROM pg_catalog\.pg_largeobject_metadata WHERE oid = '[0-9]+';\Z",
    rb"SELECT \* FROM pg_catalog\.pg_restore_(?:relation|attribute)_stats\(\s*(?:" + _ARG + rb")(?:,\s*(?:" + _ARG + rb"))*\s*\);\Z",
)]
_LO_DATA = [re.compile(p, re.S) for p in (
    rb"SELECT pg_catalog\.lo_open\('[0-9]+', 131072\);\Z",
    rb"SELECT pg_catalog\.lowrite\(0, " + _LIT + rb"\);\Z",
    rb"SELECT pg_catalog\.lo_close\(0\);\Z",
)]
_SET_VALUE = rb"(?:'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|[A-Za-z0-9_.+-]+)"
_SET = re.compile(rb"SET ([A-Za-z_]+) (?:=|TO) (" + _SET_VALUE + rb"(?:, ?" + _SET_VALUE + rb")*);\Z", re.S)
_COPY = re.compile(rb"COPY (?:ONLY )?(" + _QUALIFIED + rb")(?: \(" + _NAME + rb"(?:, " + _NAME + rb")*\))? FROM stdin;\Z")

# What goes to psql besides the dump. None of it holds a single ':' or a backslash, so psql sends
# it as it is. The check after a statement that may run the dump's functions: one of them could
# switch the session to an encoding in which psql would read the following bytes differently.
_ENCODING_CHECK = (
    "SELECT CAST(CASE WHEN pg_catalog.int4eq(pg_catalog.strpos(',"
    + _CLIENT_ONLY_ENCODINGS
    + ",', pg_catalog.concat(',', pg_catalog.current_setting('client_encoding'), ',')), 0) THEN '0' ELSE "
    "'sqlstream: the dump switched client_encoding to one psql cannot read safely' END AS pg_catalog.int4);"
)
SEAL_MARK = "sqlstream seal"
# Before the commit: a non-superuser sees the current transaction's own changes to the shared
# catalogs (roles, memberships, role and database settings, databases, tablespaces, shared
# comments and labels, replication origins, subscriptions, parameter grants) in
# pg_stat_xact_all_tables. A dump's function called from a DEFAULT, CHECK, index or view could
# make such a change (ALTER ROLE … SET / PASSWORD) where no statement of the dump shows it. The
# dump's deferred triggers would fire at the COMMIT, after the seal: they fire before it.
SEAL = """SET CONSTRAINTS ALL IMMEDIATE;
SET search_path = pg_catalog, pg_temp;
DO $sqlstream_seal$
DECLARE
  changed pg_catalog.text;
BEGIN
  IF pg_catalog.current_setting('track_counts') OPERATOR(pg_catalog.<>) 'on' THEN
    RAISE EXCEPTION 'sqlstream seal: track_counts is off on this server, so the restore cannot check that it changed nothing outside its database';
  END IF;
  SELECT pg_catalog.string_agg(s.relname::pg_catalog.text, ', ') INTO changed
    FROM pg_catalog.pg_stat_xact_all_tables s
   WHERE s.relid OPERATOR(pg_catalog.=) ANY ('{1260,1261,1262,2964,1213,2396,3592,6000,6100,6243}'::pg_catalog.oid[])
     AND s.n_tup_ins OPERATOR(pg_catalog.+) s.n_tup_upd OPERATOR(pg_catalog.+) s.n_tup_del OPERATOR(pg_catalog.>) 0;
  IF changed IS NOT NULL THEN
    RAISE EXCEPTION 'sqlstream seal: the restore changed shared catalogs (%), outside its database', changed;
  END IF;
END
$sqlstream_seal$;
"""
REFUSAL = "DO $sqlstream_refused$ BEGIN RAISE EXCEPTION 'sqlstream: the dump was refused, nothing is committed'; END $sqlstream_refused$;\n"


def _label(words: list[str], count: int = 2) -> str:
    return " ".join(words[:count]) or "?"


def _starts(words: list[str], prefixes: set[tuple[str, ...]]) -> bool:
    return any(tuple(words[:len(p)]) == p for p in prefixes)


def _granted_on(text: bytes) -> str | None:
    """What a GRANT or REVOKE is on (the word after ON; TABLE when only a name follows), or None
    when it grants a role (no ON before TO or FROM)."""
    words = []
    for found in _GRANT_WORDS.finditer(text[:4096]):
        if found.group(2):
            return None  # a comment or a string: pg_dump writes neither in a GRANT
        if not found.group().isspace():
            words.append(found.group(1).upper() if found.group(1) else b"")
    for at, word in enumerate(words):
        if word in (b"TO", b"FROM"):
            return None
        if word == b"ON":
            following = words[at + 1] if at + 1 < len(words) else b""
            return following.decode() if following in (b"DATABASE", b"TABLESPACE", b"PARAMETER") else "TABLE"
    return None


_WAIT, _GO_ON, _ENDED = range(3)  # what one step of the scan found


class SqlGuard:
    """Feed it the dump in chunks of any size; it writes to `write` what psql should read: the
    dump's statements once each is known to be one pg_dump writes (held until its end is seen),
    COPY data as it comes, and a few statements of its own. Raises Refused at the first thing a
    plain dump never holds; what was written before that ends between two statements, or in
    COPY data.

    `restrict_key` starts psql's input with `\\restrict KEY` (pg_dump's own framing lines are
    dropped); `begin` then opens the transaction (`BEGIN;`), whose COMMIT is the caller's to send;
    `statement_timeout_ms` is set first and after the dump's own `SET statement_timeout`;
    `seal` ends the input with the check of the shared catalogs; `on_copy(table, rows)` hears of
    every COPY block."""

    def __init__(self, write: Callable[[bytes], Any] | None = None, *, restrict_key: str | None = None,
                 statement_timeout_ms: int | None = None, seal: bool = False, begin: bool = False,
                 on_copy: Callable[[str, int], Any] | None = None):
        self._write = write or (lambda data: None)
        self._seal = seal
        self._timeout = f"\nSET statement_timeout = '{statement_timeout_ms}ms';".encode() if statement_timeout_ms else b""
        self._on_copy = on_copy
        self._buf = bytearray()
        self._mode = "sql"  # sql | copy-newline | copy | tail (after pg_dump's \unrestrict)
        self._line_start = True  # the buffer starts a line
        self._dump_key: bytes | None = None
        self._statements = 0
        self._lo = False  # inside pg_dump's BEGIN … COMMIT around large objects' data
        self._p_count = 0  # psql's identifier_count, identifiers[] and begin_depth (psqlscan.l)
        self._p_ids = [""] * 4
        self._p_begin = 0
        self._copy_table = ""
        self._copy_rows = 0
        self._new_statement()
        prelude = f"\\restrict {restrict_key}\n".encode() if restrict_key is not None else b""
        if begin:
            prelude += b"BEGIN;\n"
        self._write(prelude + b"SET client_encoding = 'UTF8';" + self._timeout + b"\n")

    # -- public ------------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        if b"\0" in data:
            raise Refused("a NUL byte")
        if self._mode == "copy" and not self._buf:
            self._copy_data(data, final=False)  # the bulk of a dump: passed on without a copy
        else:
            self._buf += data
        self._run(final=False)

    def finish(self) -> None:
        """The dump ended: it must end between statements; then the seal."""
        self._run(final=True)
        if self._mode != "sql" and self._mode != "tail":
            raise Refused("COPY data that never ends")
        if self._lex not in (INITIAL, LINE_COMMENT) or self._has_tokens or self._p_begin:
            raise Refused("a statement that never ends")
        if self._lo:
            raise Refused("transaction control (BEGIN) that never ends")
        self._compact()
        self._write(bytes(self._buf))
        self._buf.clear()
        if self._seal:
            self._write(b"\n" + SEAL.encode())

    def in_copy(self) -> bool:
        return self._mode == "copy"

    # -- the statement being read ------------------------------------------------------------
    def _new_statement(self, start: int = 0) -> None:
        """The next statement starts at `start` in the buffer (what is before it was written)."""
        self._start = start
        self._scan = start
        self._lex = INITIAL
        self._has_tokens = False
        self._first = start  # where its first token starts
        self._head: list[str] = []
        self._head_open = True
        self._paren = 0
        self._func = False  # CREATE [OR REPLACE] FUNCTION|PROCEDURE
        self._body = 0  # depth inside BEGIN ATOMIC … END
        self._after_begin = False
        self._body_head = False
        self._edits: list[tuple[int, int, bytes]] = []  # (start, end, replacement), in order
        self._quote_end = start  # just after the last dollar quote's end
        self._str_start = start
        self._backslash = False
        self._comment_depth = 0
        self._dollar_end = b""

    def _words_mode(self) -> bool:
        return (self._head_open or self._func or self._p_func()
                or (self._p_count < 4 and (self._p_count == 0 or self._p_ids[0] == "c")))

    def _p_func(self) -> bool:
        ids = self._p_ids
        return ids[0] == "c" and (ids[1] in ("f", "p") or (ids[1] == "o" and ids[2] == "r" and ids[3] in ("f", "p")))

    def _starts_token(self, at: int) -> None:
        if not self._has_tokens:
            self._has_tokens, self._first = True, at

    def _token(self, at: int) -> None:
        """A token that is not a word starts at `at`."""
        self._starts_token(at)
        self._head_open = False
        self._after_begin = False
        if self._body_head:
            self._body_head = False
            if self._buf[at] != 0x28:  # (
                raise Refused("a statement pg_dump never writes inside a function body")

    def _word(self, word: str, at: int) -> None:
        self._starts_token(at)
        upper = word.upper()
        if self._head_open:
            head = self._head
            head.append(upper)
            self._head_open = len(head) < 6
            self._func = head[0] == "CREATE" and (
                (len(head) >= 2 and head[1] in ("FUNCTION", "PROCEDURE"))
                or (len(head) >= 4 and head[1:3] == ["OR", "REPLACE"] and head[3] in ("FUNCTION", "PROCEDURE")))
        elif self._body:
            if self._body_head:
                self._body_head = False
                if upper not in _BODY_HEADS:
                    raise Refused(f"a statement pg_dump never writes inside a function body ({upper[:30]})")
            if upper == "CASE":
                self._body += 1
            elif upper == "END":
                self._body -= 1
        elif self._func and self._paren == 0:
            if self._after_begin and upper == "ATOMIC":
                self._body, self._body_head = 1, True
            self._after_begin = upper == "BEGIN"
        # psql's own count (psqlscan.l, {identifier}): it decides where psql ends a statement.
        lower = word.lower()
        if self._p_count == 0:
            self._p_ids = [""] * 4
        if self._p_count < 4 and lower in ("create", "function", "procedure", "or", "replace"):
            self._p_ids[self._p_count] = lower[0]
        self._p_count += 1
        if self._paren == 0 and self._p_func():
            if lower == "begin" or (lower == "case" and self._p_begin >= 1):
                self._p_begin += 1
            elif lower == "end" and self._p_begin > 0:
                self._p_begin -= 1

    def _word_before(self, at: int) -> bytes:
        """The run of name and number characters just before `at` (not past a dollar quote's end)."""
        buf, start = self._buf, at
        while start > self._quote_end and buf[start - 1] in _WORD_CHARS:
            start -= 1
        return bytes(buf[start:at])

    def _compact(self) -> None:
        """Drop what was written from the buffer: once per chunk, not once per statement (a
        dump of many small statements would move its chunk's bytes again for each of them)."""
        shift = self._start
        if shift:
            del self._buf[:shift]
            self._start = 0
            self._scan -= shift
            self._first = max(self._first - shift, 0)
            self._quote_end = max(self._quote_end - shift, 0)
            self._str_start = max(self._str_start - shift, 0)
            self._edits = [(a - shift, b - shift, r) for a, b, r in self._edits]

    # -- scanning ------------------------------------------------------------------------------
    def _run(self, final: bool) -> None:
        while True:
            if self._mode != "sql":
                self._compact()
            if self._mode == "sql":
                if not self._scan_sql(final):
                    break
            elif self._mode == "copy-newline":
                if not self._buf:
                    break
                if self._buf[0] != 0x0A:
                    raise Refused("something after COPY … FROM stdin; on its line")
                self._write(b"\n")
                del self._buf[:1]
                self._mode, self._line_start = "copy", True
            elif self._mode == "copy":
                if not self._buf:
                    break
                data = bytes(self._buf)
                self._buf.clear()
                self._copy_data(data, final)
                if self._mode == "copy":
                    break
            else:  # tail: after pg_dump's \unrestrict, only blank lines and comments
                rest = _BLANKS.match(self._buf).end()
                if rest < len(self._buf) and not (rest == len(self._buf) - 1 and self._buf[-1] == 0x2D and not final):
                    raise Refused(PSQL_COMMANDS if self._buf[rest] == 0x5C else
                                  "psql commands or SQL after pg_dump's closing \\unrestrict")
                break
        self._compact()
        if len(self._buf) > MAX_STATEMENT:
            raise Refused(f"a statement longer than {MAX_STATEMENT >> 20} MiB")

    def _scan_sql(self, final: bool) -> bool:
        """Scan the statement being read; True when it ended (and was handled), False when more
        input is needed."""
        buf = self._buf
        while True:
            size = len(buf)
            lex = self._lex
            if lex == INITIAL:
                found = (_WORDS if self._words_mode() else _FAST).search(buf, self._scan)
                if found is None:
                    self._scan = size if final else max(self._scan, size - 1)
                    return False
                step = self._initial(found, size, final)
                if step == _ENDED:
                    return True
                if step == _WAIT:
                    return False
            elif lex == LINE_COMMENT:
                found = _NEWLINE.search(buf, self._scan)
                if found is None:
                    self._scan = size
                    return False
                self._lex, self._scan = INITIAL, found.start()
            elif lex == COMMENT:
                found = _COMMENT_EDGE.search(buf, self._scan)
                if found is None:
                    self._scan = max(self._scan, size - 1)
                    return False
                self._scan = found.end()
                if buf[found.start()] == 0x2F:  # /*
                    self._comment_depth += 1
                elif self._comment_depth:
                    self._comment_depth -= 1
                else:
                    self._lex = INITIAL
            elif lex in (STRING, N_STRING, BIT_STRING):
                quote = buf.find(b"'", self._scan)
                stop = size if quote < 0 else quote
                if lex != BIT_STRING and not self._backslash and buf.find(b"\\", self._scan, stop) >= 0:
                    self._backslash = True
                if quote < 0 or (quote + 1 == size and not final):
                    self._scan = stop
                    return False
                if buf[quote + 1:quote + 2] == b"'":
                    if lex == BIT_STRING:
                        raise Refused("a doubled quote in a bit-string or Unicode string")
                    self._scan = quote + 2
                else:
                    self._end_string(quote + 1)
            elif lex == E_STRING:
                found = _E_STRING_STOP.search(buf, self._scan)
                if found is None:
                    self._scan = size
                    return False
                at = found.start()
                if at + 1 == size and not final:
                    self._scan = at
                    return False
                if buf[at] == 0x5C or buf[at + 1:at + 2] == b"'":  # a backslash takes the next byte; '' is a quote
                    self._scan = at + 2
                else:
                    self._end_string(at + 1)
            elif lex == IDENT:
                quote = buf.find(b'"', self._scan)
                if quote < 0 or (quote + 1 == size and not final):
                    self._scan = size if quote < 0 else quote
                    return False
                if buf[quote + 1:quote + 2] == b'"':
                    self._scan = quote + 2
                else:
                    self._lex, self._scan = INITIAL, quote + 1
            elif lex == DOLLAR:
                end = buf.find(self._dollar_end, self._scan)
                if end < 0:
                    self._scan = max(self._scan, size - len(self._dollar_end) + 1)
                    return False
                self._scan = self._quote_end = end + len(self._dollar_end)
                self._lex = INITIAL
            else:  # AFTER_STRING: 'a'<newline>'b' is one string to psql and the server
                stop = _BLANKS.match(buf, self._scan).end()
                if stop + 1 >= size and not final:
                    return False
                if buf[stop:stop + 1] == b"'":
                    raise Refused("a string literal continued on another line")
                self._lex = INITIAL

    def _end_string(self, end: int) -> None:
        if self._backslash:
            if self._lex == N_STRING:
                raise Refused("a backslash in a national-character string")
            if self._lex == STRING:
                # psql and the server read backslashes in '…' by standard_conforming_strings, which
                # the dump's own functions can switch off: E'…' with doubled backslashes means the
                # same whatever it is.
                start = self._str_start
                self._edits.append((start, end, b"E" + bytes(self._buf[start:end]).replace(b"\\", b"\\\\")))
        self._lex, self._scan = AFTER_STRING, end

    def _initial(self, found: re.Match[bytes], size: int, final: bool) -> int:
        """One match in plain SQL text."""
        buf = self._buf
        at, end = found.span()
        char = buf[at]
        if end - at == 2 and char in b"-/" and buf[at + 1] in b"-*":
            if char == 0x2D:
                self._lex = LINE_COMMENT
            else:
                self._lex, self._comment_depth = COMMENT, 0
            self._scan = end
            return _GO_ON
        if char == 0x3B:  # ;
            return self._semicolon(at)
        if char == 0x27:  # '
            self._string(at)
        elif char == 0x22:  # "
            self._token(at)
            self._lex, self._scan = IDENT, end
        elif char == 0x28 or char == 0x29:  # ( )
            self._token(at)
            self._paren = self._paren + 1 if char == 0x28 else max(self._paren - 1, 0)
            self._scan = end
        elif char == 0x3A:  # :
            return self._colon(at, size, final)
        elif char == 0x24:  # $
            return self._dollar(at, final)
        elif char == 0x5C:  # \
            return self._backslash_line(at, size, final)
        elif char in _BAD_BYTES:
            raise Refused("a control character or a non-ASCII byte outside quotes")
        elif end == size and not final:
            self._scan = at  # a word may go on in the next chunk
            return _WAIT
        else:
            self._word_token(bytes(found.group()), at, end)
        return _GO_ON

    def _word_token(self, word: bytes, at: int, end: int) -> None:
        following = self._buf[end:end + 1]
        if word[0] <= 0x39:  # a number
            if not word.isdigit():
                raise Refused("a number run into a name, which psql versions read differently")
            self._token(at)
        elif len(word) == 1 and word in b"eEbBxXnN" and following == b"'":
            pass  # a string's prefix: its quote decides
        elif word in (b"u", b"U") and following == b"&":
            self._starts_token(at)  # U&'…' or U&"…": not a name to psql
        else:
            self._word(word.decode("ascii"), at)
        self._scan = end

    def _string(self, at: int) -> None:
        buf = self._buf
        prefix = self._word_before(at)
        if prefix == b"" and at >= 2 and buf[at - 2:at] in (b"U&", b"u&") and (at < 3 or buf[at - 3] not in _WORD_CHARS):
            lex, start = BIT_STRING, at - 2  # U&'…': quotes as in '…', and backslashes do not end it
        elif prefix == b"":
            lex, start = STRING, at
        elif prefix in (b"e", b"E"):
            lex, start = E_STRING, at - 1
        elif prefix in (b"b", b"B", b"x", b"X"):
            lex, start = BIT_STRING, at - 1
        elif prefix in (b"n", b"N"):
            lex, start = N_STRING, at - 1
        else:
            raise Refused("a quote right after a name or number, which psql versions read differently")
        self._token(start)
        self._lex, self._str_start, self._backslash, self._scan = lex, at, False, at + 1

    def _colon(self, at: int, size: int, final: bool) -> int:
        """psql replaces :name, :'name', :"name" and :{?name} by its variables (DBNAME, USER, …)
        outside quotes; `::` and `:=` are the server's. A space after such a colon means the same
        to the server and nothing to psql."""
        buf = self._buf
        stop = at
        while stop < size and buf[stop] == 0x3A:
            stop += 1
        if stop == size and not final:
            self._scan = at
            return _WAIT  # the next byte decides
        self._token(at)
        if (stop - at) % 2 and stop < size and buf[stop] in _VARIABLE_NEXT:
            self._edits.append((stop, stop, b" "))
        self._scan = stop
        return _GO_ON

    def _dollar(self, at: int, final: bool) -> int:
        buf = self._buf
        before = self._word_before(at)
        if before:
            if not _IDENTIFIER.match(before):
                raise Refused("a '$' right after a number, which psql versions read differently")
            self._scan = at + 1  # part of a name
            return _GO_ON
        tag = _DOLLAR.match(buf, at)
        if tag is None:
            if not final and _DOLLAR_OPEN.match(buf, at):
                self._scan = at
                return _WAIT  # $tag may close in the next chunk
            self._token(at)
            self._scan = at + 1  # $1, or a lone $
            return _GO_ON
        self._token(at)
        self._lex, self._dollar_end, self._scan = DOLLAR, tag.group(), tag.end()
        return _GO_ON

    def _backslash_line(self, at: int, size: int, final: bool) -> int:
        """Only pg_dump's framing lines: `\\restrict KEY` before the first statement, and the
        matching `\\unrestrict KEY` after the completion trailer; they are dropped (psql is
        restricted with our own key)."""
        buf = self._buf
        if self._has_tokens or (buf[at - 1] != 0x0A if at > self._start else not self._line_start):
            raise Refused(PSQL_COMMANDS)
        newline = buf.find(b"\n", at)
        if newline < 0 and not final:
            self._scan = at
            return _WAIT
        line_end = size if newline < 0 else newline + 1
        frame = _FRAME.match(bytes(buf[at:line_end]))
        if frame is None:
            raise Refused(PSQL_COMMANDS)
        key = frame.group(2)
        if frame.group(1) is None and self._dump_key is None and not self._statements:
            self._dump_key = key
        elif frame.group(1) is not None and key == self._dump_key and TRAILER in buf[self._start:at]:
            self._mode = "tail"
        else:
            raise Refused(PSQL_COMMANDS)
        self._write(bytes(buf[self._start:at]))
        self._new_statement(line_end)
        self._line_start = True
        return _ENDED if self._mode == "tail" else _GO_ON

    def _semicolon(self, at: int) -> int:
        self._scan = at + 1
        if self._paren:
            return _GO_ON
        psql_sends = self._p_begin == 0
        if psql_sends:
            self._p_count = 0
        if self._body:
            self._body_head = True
            return _GO_ON
        self._statement(at + 1, psql_sends)
        return _ENDED

    # -- a whole statement ---------------------------------------------------------------------
    def _statement(self, end: int, psql_sends: bool) -> None:
        buf = self._buf
        extra, keep = b"", True
        if self._has_tokens:
            text = bytes(buf[self._first:end])
            if self._lo:
                if text == b"COMMIT;":
                    self._lo, keep = False, False
                elif not any(p.match(text) for p in _LO_DATA):
                    raise Refused("transaction control (BEGIN) around something other than large objects' data")
            else:
                extra, keep = self._check(self._head, text, psql_sends)
        out = bytearray()
        at = self._start
        for start, stop, replacement in self._edits:
            out += buf[at:start]
            out += replacement
            at = stop
        out += buf[at:end if keep else self._first]
        self._write(bytes(out) + extra)
        self._statements += 1
        self._line_start = False
        self._new_statement(end)

    def _check(self, head: list[str], text: bytes, psql_sends: bool) -> tuple[bytes, bool]:
        """Refuse what pg_dump never writes; returns what to send after the statement, and
        whether to send the statement itself."""
        first = head[0] if head else ""
        if first == "COPY":
            copy = _COPY.match(text)
            if copy is None:
                raise Refused("COPY to or from somewhere other than psql's input (a file or a program)")
            if not psql_sends:
                raise Refused("a COPY that psql would not send on its own")
            self._copy_table, self._copy_rows = copy.group(1).decode("utf-8", "replace"), 0
            self._mode = "copy-newline"
            return b"", True
        if first == "SELECT":
            if not any(p.match(text) for p in _SELECTS):
                raise Refused("a SELECT other than the pg_catalog functions pg_dump calls")
            return b"", True
        if first == "SET":
            return self._set(head, text), True
        if text == b"BEGIN;":
            self._lo = True  # pg_dump's own, around large objects' data: psql's single transaction holds it
            return b"", False
        if first in _TRANSACTION:
            raise Refused(f"transaction control ({first})")
        if first in ("GRANT", "REVOKE"):
            on = _granted_on(text)
            if on is None:
                raise Refused(f"a role or session-authorization change ({first} of a role)")
            if on in ("DATABASE", "TABLESPACE", "PARAMETER"):
                raise Refused(f"a database or tablespace command ({first} … ON {on})")
            return b"", True
        if first in _ROLE_HEADS or head[:2] == ["DROP", "OWNED"]:
            raise Refused(f"a role or session-authorization change ({_label(head)})")
        if head[:2] == ["ALTER", "SYSTEM"]:
            raise Refused("a server configuration change (ALTER SYSTEM)")
        if first in ("DO", "CALL", "LOAD"):
            raise Refused(f"code pg_dump never runs ({first})")
        kind = head[2:] if first == "COMMENT" else head[1:]
        if first in ("CREATE", "ALTER", "DROP", "COMMENT") and kind and kind[0] in _SHARED and kind[:2] != ["USER", "MAPPING"]:
            what = ("a role or session-authorization change" if kind[0] in ("ROLE", "USER", "GROUP")
                    else "a subscription" if kind[0] == "SUBSCRIPTION" else "a database or tablespace command")
            raise Refused(f"{what} ({' '.join(head[:2 if first != 'COMMENT' else 3])})")
        allowed = (
            (first == "CREATE" and (_starts(kind, _CREATE) or (kind[:2] == list(_OR_REPLACE) and _starts(kind[2:], _CREATE))))
            or (first == "ALTER" and _starts(kind, _ALTER))
            or (first == "DROP" and _starts(kind, _DROP))
            or (first == "COMMENT" and head[1:2] == ["ON"] and bool(kind))
            or (first == "SECURITY" and kind[:1] == ["LABEL"]
                and not _SHARED_LABEL.search(text[:1024]))
            or head[:3] == ["REFRESH", "MATERIALIZED", "VIEW"]
        )
        if not allowed:
            raise Refused(f"a statement pg_dump never writes ({_label(head, 3)})")
        if "CONSTRAINT" in head[1:4] and "TRIGGER" in head[2:5] and _DEFERRABLE.search(text):
            raise Refused("a deferrable constraint trigger: its function would run at the commit, after the restore's "
                          "last check that nothing outside the database changed, so this restore cannot take it",
                          never=False)
        inert = any(tuple(head[:len(p)]) == p for p in _INERT)
        return (b"" if inert else b"\n" + _ENCODING_CHECK.encode()), True

    def _set(self, head: list[str], text: bytes) -> bytes:
        found = _SET.match(text)
        name = found.group(1).lower() if found else b""
        if name not in _SET_NAMES:
            if "ROLE" in head[1:3] or "SESSION" in head[1:3]:
                raise Refused(f"a role or session-authorization change ({_label(head, 3 if head[1:2] == ['SESSION'] else 2)})")
            shown = name.decode() if name else _label(head[1:], 1).lower()
            raise Refused(f"SET of something pg_dump never sets ({shown[:40]})")
        if name == b"client_encoding":
            value = re.sub(rb"[^a-z0-9]", b"", found.group(2).lower()).decode()
            if value not in _SERVER_ENCODINGS:
                raise Refused("a client_encoding psql cannot read safely")
            return b"\n" + _ENCODING_CHECK.encode()
        if name == b"statement_timeout":
            return self._timeout
        return b""

    # -- COPY … FROM stdin data ----------------------------------------------------------------
    def _copy_data(self, data: bytes, final: bool) -> None:
        """Pass the data on up to psql's end line (`\\.` alone on a line) and count its rows; a
        line cut by the chunk that may still become the end line waits for the next chunk."""
        search = 0
        while True:
            if search == 0 and self._line_start and data.startswith(b"\\."):
                line = 0
            else:
                found = data.find(b"\n\\.", search)
                if found < 0:
                    break
                line = found + 1
            marker = data[line:line + 4]
            if marker.startswith(b"\\.\n") or marker == b"\\.\r\n":
                self._end_copy(data, line, 3 if marker.startswith(b"\\.\n") else 4)
                return
            if not final and line + 4 > len(data) and b"\\.\r\n".startswith(marker):
                self._pass_copy(data[:line], at_line_start=True)
                self._buf += data[line:]
                return
            search = line + 1
        if not final and data.endswith(b"\\") and (data.endswith(b"\n\\") or (len(data) == 1 and self._line_start)):
            self._pass_copy(data[:-1], at_line_start=True)
            self._buf += b"\\"
            return
        self._pass_copy(data, at_line_start=data.endswith(b"\n") if data else self._line_start)

    def _pass_copy(self, data: bytes, *, at_line_start: bool) -> None:
        if data:
            self._copy_rows += data.count(b"\n")
            self._write(data)
        self._line_start = at_line_start

    def _end_copy(self, data: bytes, line: int, length: int) -> None:
        self._pass_copy(data[:line], at_line_start=True)
        self._write(data[line:line + length] + _ENCODING_CHECK.encode() + b"\n")
        if self._on_copy is not None:
            self._on_copy(self._copy_table, self._copy_rows)
        self._mode = "sql"
        self._line_start = True
        self._buf[:0] = data[line + length:]


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sqlstream.py",
        description="Pass a plain pg_dump on to psql only as far as it holds what pg_dump writes: psql restricted with a "
                    "random key, pg_dump's framing lines dropped, psql's variables kept out, statements pg_dump never "
                    "writes (COMMIT, ALTER ROLE, COPY … PROGRAM, …) refused, the completion trailer checked, and a "
                    "check before the commit that nothing outside the database changed. It opens the transaction "
                    "itself (BEGIN) and sends COMMIT only after the whole dump passed: when it refuses, it ends "
                    "psql's input with a statement that fails, and exits 1; if it is stopped or killed, psql's input "
                    "ends without the COMMIT. Either way PostgreSQL rolls everything back. Do not give psql "
                    "--single-transaction: that commits whatever psql read when its input ends.",
        epilog="example: python3 scripts/backupkit/sqlstream.py database-backup.sql | "
               "psql -X -v ON_ERROR_STOP=1 -q -o /dev/null \"$TARGET_DATABASE_URL\"")
    parser.add_argument("dump", nargs="?", help="the plain SQL dump (default: standard input)")
    args = parser.parse_args(argv)
    out = sys.stdout.buffer
    guard = SqlGuard(out.write, restrict_key=secrets.token_hex(32), seal=True, begin=True)
    tail = b""
    try:
        with open(args.dump or sys.stdin.fileno(), "rb", closefd=bool(args.dump)) as source:
            while chunk := source.read(256 * 1024):
                tail = (tail + chunk)[-TRAILER_WINDOW:]
                guard.feed(chunk)
        if TRAILER not in tail:
            raise Refused("no completion trailer (it is cut short), and so nothing")
        guard.finish()
        out.write(b"COMMIT;\n")
        out.flush()
        return 0
    except BrokenPipeError:
        print("sqlstream.py: psql stopped reading (its error is above): nothing was committed", file=sys.stderr)
        return 1
    except BaseException as exc:  # noqa: BLE001 - whatever stops us, psql must not see a clean end of input
        try:
            out.write((b"\n\\.\n" if guard.in_copy() else b"\n") + REFUSAL.encode())
            out.flush()
        except OSError:
            pass
        reason = f"refused: {exc}; do not restore it, and tell the team" if isinstance(exc, Refused) else \
            f"stopped ({type(exc).__name__}: {exc}): nothing was committed"
        print(f"sqlstream.py: {reason}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(_main())
