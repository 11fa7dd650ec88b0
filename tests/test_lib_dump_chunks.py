"""backupkit.dump_reader's held-back tail and the guard it feeds, in process (no PostgreSQL): a dump
read back in chunks that end anywhere (a `\\restrict` line cut in two, CRLF or LF, pg_dump's
completion trailer cut across the held-back boundary, a dump shorter than what is held back)
reaches psql as the same bytes, and is refused for the same reason, as when it is read whole.
What psql then does with it is in test_restore_database.py and test_hostile_bucket.py."""

from __future__ import annotations

import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from backupkit.dump_reader import HOLD_BACK, Tail, hold_back
from backupkit.postgres import TRAILER_WINDOW, has_trailer
from backupkit.sqlstream import Refused, SqlGuard

TRAILER = b"--\n-- PostgreSQL database dump complete\n--\n\n"
BODY = b"""SET statement_timeout = 0;
SET client_encoding = 'UTF8';
SELECT pg_catalog.set_config('search_path', '', false);
CREATE TABLE public.t (
    id integer NOT NULL,
    c text DEFAULT $_$COMMIT;$_$
);
COPY public.t (id, c) FROM stdin;
1\tline one\\nCOMMIT;\\n\\\\.
2\t\\\\restrict x
\\.
ALTER TABLE ONLY public.t
    ADD CONSTRAINT t_pkey PRIMARY KEY (id);
"""
# A dump as pg_dump 15.14+ writes it: framed by \restrict and \unrestrict with its own key.
GENUINE = (b"--\n-- PostgreSQL database dump\n--\n\n\\restrict AbC123xyz\n\n" + BODY
           + b"-- " + b"x" * 900 + b"\n" + TRAILER + b"\\unrestrict AbC123xyz\n\n")
# CRLF: psql and the guard read statements and framing lines the same either way; COPY data
# they do not (the guard refuses a COPY line ended by CR, pg_dump writes LF on every platform).
CRLF = GENUINE[:GENUINE.index(b"COPY")].replace(b"\n", b"\r\n") + GENUINE[GENUINE.index(b"ALTER TABLE"):].replace(b"\n", b"\r\n")
CRLF_COPY = GENUINE.replace(b"\n", b"\r\n")
SHORT = b"\\restrict Ab1\n\nSET lock_timeout = 0;\n" + TRAILER + b"\\unrestrict Ab1\n"
PLANTED = GENUINE.replace(b"ALTER TABLE ONLY", b"\\! touch /tmp/pwned\nALTER TABLE ONLY")
SECOND_RESTRICT = GENUINE.replace(b"ALTER TABLE ONLY", b"\\restrict Other1\nALTER TABLE ONLY")
COMMITS = GENUINE.replace(b"ALTER TABLE ONLY", b"COMMIT;\nALTER TABLE ONLY")


class Pieces:
    """The dump as a stream whose reads end at `cuts`, whatever size is asked (a pipe's reads)."""

    def __init__(self, data: bytes, cuts: list[int]):
        ends = sorted({c for c in cuts if 0 < c < len(data)} | {len(data)})
        starts = [0, *ends[:-1]]
        self._pieces = [data[a:b] for a, b in zip(starts, ends)]

    def read(self, size: int) -> bytes:
        return self._pieces.pop(0) if self._pieces else b""


def guard() -> tuple[SqlGuard, list[bytes]]:
    out: list[bytes] = []
    return SqlGuard(out.append, restrict_key="Ours99", seal=True, begin=True, statement_timeout_ms=1000), out


def whole(dump: bytes):
    """The guard's output for the dump fed in one piece, or the refusal."""
    g, out = guard()
    try:
        g.feed(dump)
        g.finish()
    except Refused as exc:
        return "refused", str(exc)
    return b"".join(out)


def held_back(dump: bytes, cuts: list[int], keep: int):
    """As the restore does it: hold_back() in chunks ending at `cuts`, then the held tail
    released and the guard finished. Returns (psql's input or the refusal, the held tail)."""
    g, out = guard()
    held, broken, refused = hold_back(Pieces(dump, cuts), g, threading.Event(), keep)
    assert broken == (refused is not None)
    # Held: the dump's last bytes, at least `keep` of them (all of a shorter dump), and exactly
    # what did not reach the guard.
    assert dump.endswith(held) and len(held) >= min(keep, len(dump))
    if refused is not None:
        return ("refused", str(refused)), held
    try:
        g.feed(held)
        g.finish()
    except Refused as exc:
        return ("refused", str(exc)), held
    return b"".join(out), held


def every_cut(dump: bytes, keep: int) -> None:
    expected = whole(dump)
    for cut in range(1, len(dump)):
        got, held = held_back(dump, [cut], keep)
        assert got == expected, f"keep {keep}, cut at {cut}: {dump[:cut][-40:]!r} | {dump[cut:][:40]!r}"
        if keep >= TRAILER_WINDOW:
            assert has_trailer(held) == has_trailer(dump)
    got, _ = held_back(dump, list(range(1, len(dump))), keep)
    assert got == expected, f"keep {keep}: a byte at a time"


def test_what_psql_reads_is_what_the_guard_makes_of_the_whole_dump():
    out = whole(GENUINE)
    assert isinstance(out, bytes)
    assert out.startswith(b"\\restrict Ours99\nBEGIN;\nSET client_encoding = 'UTF8';")
    assert b"AbC123xyz" not in out and b"COMMIT;\n" not in out.replace(b"$_$COMMIT;$_$", b"")
    assert out.count(b"BEGIN;") == 1 and b"pg_stat_xact_all_tables" in out  # the seal; COMMIT is the restore's


def test_a_genuine_dump_lf_or_crlf_reaches_psql_the_same_wherever_its_reads_and_the_held_back_tail_end():
    for dump in (GENUINE, CRLF):
        assert isinstance(whole(dump), bytes)
        for keep in (1, 37, TRAILER_WINDOW):
            every_cut(dump, keep)


def test_a_dump_shorter_than_the_held_back_tail_is_held_whole():
    for dump in (SHORT, SHORT.replace(b"\n", b"\r\n"), GENUINE):
        assert len(dump) < HOLD_BACK
        every_cut(dump, HOLD_BACK)
        g, out = guard()
        held, broken, refused = hold_back(Pieces(dump, [3, 50]), g, threading.Event())
        assert (held, broken, refused) == (dump, False, None)
        assert b"".join(out) == b"\\restrict Ours99\nBEGIN;\nSET client_encoding = 'UTF8';\nSET statement_timeout = '1000ms';\n"


def test_what_is_refused_is_refused_for_the_same_reason_wherever_the_reads_end():
    for dump, what in ((PLANTED, "psql commands"), (SECOND_RESTRICT, "psql commands"), (COMMITS, "transaction control"),
                       (CRLF_COPY, "something after COPY")):
        expected = whole(dump)
        assert expected[0] == "refused" and what in expected[1], expected
        for keep in (1, TRAILER_WINDOW):
            every_cut(dump, keep)


def test_a_stop_reads_no_further():
    stop = threading.Event()
    stop.set()
    g, out = guard()
    assert hold_back(Pieces(GENUINE, [10]), g, stop, 5) == (b"", False, None)


def test_the_verify_tail_keeps_the_last_bytes_wherever_the_writes_end():
    for cut in range(0, len(GENUINE), 7):
        tail = Tail()
        for piece in (GENUINE[:cut], GENUINE[cut:cut + 3], GENUINE[cut + 3:]):
            tail.write(piece)
        assert tail.data == GENUINE[-TRAILER_WINDOW:] and has_trailer(tail.data)
    assert not has_trailer(GENUINE[:-len(TRAILER) - 30])


@settings(max_examples=300, deadline=None)
@given(dump=st.sampled_from([GENUINE, CRLF, CRLF_COPY, SHORT, PLANTED, SECOND_RESTRICT, COMMITS]),
       cuts=st.lists(st.integers(min_value=1, max_value=len(CRLF)), max_size=40),
       keep=st.sampled_from([1, 2, 64, TRAILER_WINDOW, HOLD_BACK]))
def test_any_chunking_gives_the_same_outcome(dump, cuts, keep):
    got, _ = held_back(dump, cuts, keep)
    assert got == whole(dump)
