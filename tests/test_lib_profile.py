"""The profile's pieces on their own: rows counted from a real pg_dump however its chunks fall,
the COPY line's table name, and the files comparison's merge of two key-ordered streams."""

from __future__ import annotations

import random
import subprocess

import pytest

from backupkit.errors import BackupError, UsageError
from backupkit.profile import DumpRows, copy_table
from backupkit.tripwire import Rules, merge, merge_changes, percent, sparkline


@pytest.fixture(scope="module")
def dump(pg):
    """A plain dump of tables whose data holds what could confuse a counter: `\\.` and `COPY`
    at the start of a value, newlines and backslashes in values, an empty table, quoted names."""
    name = "profile_counts"
    pg.create_database(name)
    pg.psql("""
CREATE TABLE plain (id int, t text);
INSERT INTO plain SELECT i, repeat('x', i % 300) FROM generate_series(1, 5000) AS i;
CREATE TABLE tricky (t text);
INSERT INTO tricky VALUES (E'\\\\.'), (E'COPY public.plain (id) FROM stdin;'), (E'a\\nb\\\\.\\n\\\\.'), (''), (NULL);
CREATE TABLE "Quoted ""Name"" (x)" (id int);
INSERT INTO "Quoted ""Name"" (x)" SELECT generate_series(1, 7);
CREATE TABLE empty_table (id int);
CREATE FUNCTION f() RETURNS text LANGUAGE sql AS $$
COPY public.fake (id) FROM stdin;
SELECT 'x'
$$;
""", name)
    out = subprocess.run([str(pg.bin / "pg_dump"), "--format=plain", f"--dbname={pg.url(name)}"], capture_output=True, check=True).stdout
    pg.drop_database(name)
    return out


def test_rows_are_counted_exactly_however_the_dump_is_chunked(dump):
    wanted = {"public.plain": 5000, "public.tricky": 5, 'public."Quoted ""Name"" (x)"': 7, "public.empty_table": 0}
    sizes = [1, 2, 3, 5, 64 * 1024, 256 * 1024]
    for seed in range(30):
        chance = random.Random(seed)
        rows, i = DumpRows(), 0
        while i < len(dump):
            step = chance.choice(sizes) if seed % 2 else chance.randint(1, 4096)
            rows.feed(memoryview(dump[i:i + step]))
            i += step
        assert {e["table"]: e["rows"] for e in rows.entries()} == wanted, seed
    whole = DumpRows()
    whole.feed(dump)
    data_bytes = {e["table"]: e["bytes"] for e in whole.entries()}
    assert data_bytes["public.empty_table"] == 0 and data_bytes["public.plain"] > 5000 * 4


@pytest.mark.parametrize(("line", "table"), [
    (b"COPY public.orders (id, name) FROM stdin;", "public.orders"),
    (b'COPY "S"."T ( x" ("a b") FROM stdin;', '"S"."T ( x"'),
    (b"COPY public.no_columns  FROM stdin;", "public.no_columns"),
    (b"COPY public.t (id) FROM stdin", None),
    (b"COPY public.t (id) TO stdout;", None),
    (b'COPY public."unterminated (id) FROM stdin;', None),
])
def test_copy_table(line, table):
    assert copy_table(line) == table


def entries(keys: list[str], changed: str = "") -> list[dict]:
    return [{"key": k, "size": 10, "crc32": "ffffffff" if k == changed else "00000000"} for k in keys]


def test_the_merge_pairs_keys_of_two_ordered_streams():
    before = entries(["a", "b", "c", "e"])
    now = entries(["a", "c", "d", "e"], changed="e")
    pairs = [(b and b["key"], n and n["key"]) for b, n in merge(iter(before), iter(now))]
    assert pairs == [("a", "a"), ("b", None), ("c", "c"), (None, "d"), ("e", "e")]
    found = merge_changes(iter(before), iter(now), Rules())
    assert (found.disappeared, found.appeared, found.changed_count) == (1, 1, 1)
    assert merge_changes(iter(before), iter(now), Rules(allow_change=("e",))).changed_count == 0


def test_the_merge_streams_a_million_keys_and_refuses_disorder():
    count = 1_000_000

    def stream(skip: int):
        return ({"key": f"k/{i:08}", "size": i, "crc32": "0"} for i in range(count) if i % skip)

    found = merge_changes(stream(1000), stream(999), Rules())
    assert found.disappeared + found.appeared > 0 and found.changed_count == 0
    with pytest.raises(BackupError, match="out of order"):
        list(merge(iter(entries(["b", "a"])), iter([])))


def test_percent_and_sparkline():
    assert percent("10%") == 0.10 and percent("2.5") == 0.025
    for bad in ("0%", "100", "x", "-5%"):
        with pytest.raises(UsageError):
            percent(bad)
    assert sparkline([0, 5, 10]) == "▁▅█" and sparkline([3, None, 3]) == "▁ ▁"
