"""The databases the benchmarks dump.

`pgbench`: pgbench's tables plus jsonb/bytea rows, the dataset of the earlier figures. Its
filler compresses about 50-fold, which would flatter compression, so the compression figures use
`realistic`: an application-like database generated with a fixed seed (names, e-mail and postal
addresses, phone numbers, free English text, JSON answers, timestamps, UUIDs, and some binary
evidence that does not compress), whose plain dump compresses about as real ones do.
"""

from __future__ import annotations

import subprocess

from dev.harness import PostgresCluster

from .common import MIB

BLOB_ROW_BYTES = 32 * 1024  # one bench_blobs payload; 64 KiB of hex in the dump

BLOBS_SQL = """
CREATE TABLE bench_blobs (id bigserial PRIMARY KEY, doc jsonb NOT NULL, payload bytea NOT NULL);
INSERT INTO bench_blobs (doc, payload)
SELECT jsonb_build_object('n', i, 'name', 'object-' || i, 'tags', jsonb_build_array('a', 'ß', i % 7), 'at', now()),
       decode(repeat(md5(i::text), {repeat}), 'hex')
FROM generate_series(1, {rows}) AS i;
ANALYZE;
"""


def pgbench(pg: PostgresCluster, database: str, scale: int, blob_mib: int) -> None:
    pg.create_database(database)
    subprocess.run([str(pg.bin / "pgbench"), "-i", "-q", "-s", str(scale), "-h", "127.0.0.1", "-p", str(pg.port),
                    "-U", pg.user, database], env=pg.env(), check=True, capture_output=True)
    pg.psql(BLOBS_SQL.format(repeat=BLOB_ROW_BYTES // 16, rows=blob_mib * MIB // BLOB_ROW_BYTES), database)


# Vocabularies for the generator: common words, not a corpus, drawn at random; real text repeats
# more (and compresses better) than this does.
WORDS = """the of and to a in is that for it as was with be by on not he this are or his from at which but have an they
you were her she there been one all we their has would when if so no will more can out said what up its about into them than
some could only other time new these two may first then do any like my now over such our man me even most made after also did
many before must through back years where much your way well down should because each just those people how too little state
good very make world still own see men work long get here between both life being under never day same another know while
last might us great old year off come since against go came right used take three states himself few house use during
without again place american around however home small found thought went say part once general high upon school every
don't does got united left number course war until always away something fact though water less public put think almost
hand enough far took head yet government system better set told nothing night end why called didn't eyes find going look
asked later knew point next program city business give group toward young days let room president side social given
present several order national possible rather second face per among form important often things looked early white case
john become large big need four within felt along children saw best church ever least power development light thing
family seemed interest want members mind country area others done turned although open god service certain kind problem
began different door thus help sense means whole matter perhaps itself york times law human line above name example action
company hands local show whether five history gave today either act feet across taken past quite anything seen having death
week experience field certificate application evidence decision panel statutory declaration medical report gender recognition
applicant name change deed poll passport birth registered address previous surname marriage civil partnership spouse consent
""".split()
FIRST_NAMES = """Olivia Amelia Isla Ava Mia Ivy Lily Isabella Rosie Sophia Grace Willow Freya Florence Emily Ella Poppy Evie Elsie
Charlotte Evelyn Sienna Daisy Sofia Alice Noah Muhammad George Oliver Leo Arthur Oscar Theodore Freddie Theo Archie Jack Alfie
Henry Charlie Finley Lucas Jacob Tommy Isaac Thomas Edward Ethan James Alexander Harry William Joshua Mohammed Ali Priya Aisha
Zainab Fatima Chloe Hannah Jessica Megan Bethany Lauren Zoë José Ólafur Siobhán Niamh Aoife Ciarán Eoin Dafydd Rhys Seren""".split()
LAST_NAMES = """Smith Jones Taylor Brown Williams Wilson Johnson Davies Patel Robinson Wright Thompson Evans Walker White Roberts
Green Hall Thomas Clarke Jackson Wood Harris Edwards Turner Martin Cooper Hill Ward Hughes Moore Clark King Harrison Lewis Baker
Lee Allen Morris Khan Scott Watson Davis Parker James Bennett Young Phillips Richardson Mitchell Bailey Carter Cook Singh Shaw
Bell Collins Morgan Kelly Begum Miller Cox Marshall Simpson Anderson Ellis Adams Wilkinson Ward Ahmed Ali Hussain O'Brien
Murphy Kaur Chen Nowak Kowalski Novak""".split()
STREETS = """High Street|Station Road|Main Street|Park Road|Church Road|Church Street|London Road|Victoria Road|Green Lane|Manor Road|
Church Lane|Park Avenue|The Avenue|The Crescent|Queens Road|New Road|Grange Road|Kings Road|Kingsway|Windsor Road|Highfield Road|
Mill Lane|Alexander Road|York Road|St. John's Road|Main Road|Broadway|King Street|The Green|Springfield Road|George Street|
Park Lane|Victoria Street|Albert Road|Queensway|New Street|Queen Street|West Street|North Street|Manchester Road|The Grove|
Richmond Road|Grove Road|South Street|School Lane|The Drive|North Road|Stanley Road|Chester Road|Mill Road""".replace("\n", "").split("|")
CITIES = """London Birmingham Manchester Leeds Glasgow Sheffield Bradford Liverpool Edinburgh Bristol Cardiff Leicester Coventry
Nottingham Newcastle Belfast Brighton Hull Plymouth Stoke Wolverhampton Derby Swansea Southampton Salford Aberdeen Westminster
Portsmouth York Peterborough Dundee Lancaster Oxford Newport Preston Cambridge Norwich Chester Exeter Gloucester""".split()
DOMAINS = "gmail.com outlook.com hotmail.co.uk yahoo.co.uk btinternet.com icloud.com sky.com live.co.uk example.org nhs.net".split()
STATUSES = ["draft", "submitted", "in review", "awaiting evidence", "granted", "refused", "withdrawn"]


def _array(values: list[str]) -> str:
    return "ARRAY[" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + "]::text[]"


def _pick(column: str, inner: str = "") -> str:
    """A random element of one of the vocabulary's arrays (a column of the row being built).
    Inside an aggregate, `inner` names the inner query's variable: an aggregate whose arguments
    name only outer columns would belong to the outer query."""
    return f"({column})[1 + floor(random() * array_length({column}, 1))::int{f' + 0 * {inner}' if inner else ''}]"


REALISTIC_SQL = """
SET max_parallel_workers_per_gather = 0;  -- one backend: random() follows the seed in order
SELECT setseed(0.2026);
CREATE TABLE vocab AS SELECT {words} AS words, {first} AS first_names, {last} AS last_names, {streets} AS streets,
    {cities} AS cities, {domains} AS domains, {statuses} AS statuses;
CREATE TABLE customers (
    id uuid PRIMARY KEY,
    full_name text NOT NULL,
    email text NOT NULL,
    phone text,
    address text NOT NULL,
    postcode text NOT NULL,
    date_of_birth date,
    created_at timestamptz NOT NULL,
    preferences jsonb NOT NULL
);
INSERT INTO customers
SELECT md5('customer' || i)::uuid, f || ' ' || l,
       lower(f) || '.' || lower(replace(l, '''', '')) || (i % 1000) || '@' || {domain},
       '07' || lpad((floor(random() * 1e9))::bigint::text, 9, '0'),
       (1 + floor(random() * 240))::int || ' ' || {street} || E'\\n' || {city},
       upper(substr(md5(i::text), 1, 2)) || (1 + i % 20) || ' ' || (i % 10) || upper(substr(md5(i::text), 3, 2)),
       date '1940-01-01' + floor(random() * 25000)::int,
       timestamptz '2019-01-01 00:00:00+00' + random() * interval '2500 days',
       jsonb_build_object('language', CASE WHEN random() < 0.9 THEN 'en' ELSE 'cy' END, 'contact', {contact},
                          'newsletter', random() < 0.3, 'accessibility', CASE WHEN random() < 0.1 THEN 'large print' END)
FROM (SELECT i, {first_name} AS f, {last_name} AS l, v.* FROM generate_series(1, {customers}) AS i, vocab v) AS g;
CREATE TABLE applications (
    id bigserial PRIMARY KEY,
    customer_id uuid NOT NULL REFERENCES customers,
    reference text NOT NULL,
    status text NOT NULL,
    statement text NOT NULL,
    answers jsonb NOT NULL,
    submitted_at timestamptz NOT NULL,
    decided_at timestamptz,
    evidence bytea
);
INSERT INTO applications (customer_id, reference, status, statement, answers, submitted_at, decided_at, evidence)
SELECT md5('customer' || (1 + i % {customers}))::uuid,
       'GRC-' || to_char(2019 + i % 7, 'FM0000') || '-' || lpad(i::text, 7, '0'),
       {status},
       (SELECT string_agg({inner_word}, ' ') FROM generate_series(1, 25 + (i::bigint * 7919) % 90) AS w WHERE w > 0 AND i > 0) || '.',
       jsonb_build_object('previous_names', jsonb_build_array({first_name}, {first_name}), 'lived_in_acquired_gender_since',
                          (date '2000-01-01' + floor(random() * 8000)::int)::text, 'married', random() < 0.4,
                          'overseas_certificate', random() < 0.05, 'declaration_accepted', true,
                          'notes', (SELECT string_agg({inner_word}, ' ') FROM generate_series(1, 5 + i % 12) AS w WHERE w > 0 AND i > 0)),
       t, CASE WHEN random() < 0.7 THEN t + random() * interval '120 days' END,
       CASE WHEN i % 50 = 0 THEN (SELECT string_agg(sha512((i * 100 + k)::text::bytea), ''::bytea)
                                  FROM generate_series(1, {evidence_blocks}) AS k) END
FROM (SELECT i, timestamptz '2019-01-01 00:00:00+00' + random() * interval '2500 days' AS t, v.*
      FROM generate_series(1, {applications}) AS i, vocab v) AS g;
CREATE TABLE audit_log (
    id bigserial PRIMARY KEY,
    application_id bigint NOT NULL,
    actor text NOT NULL,
    action text NOT NULL,
    detail jsonb,
    at timestamptz NOT NULL,
    ip inet
);
INSERT INTO audit_log (application_id, actor, action, detail, at, ip)
SELECT 1 + i % {applications}, 'caseworker-' || (1 + floor(random() * 80))::int,
       (ARRAY['viewed', 'updated status', 'requested evidence', 'added note', 'exported', 'sent letter'])[1 + floor(random() * 6)::int],
       jsonb_build_object('from', {status}, 'to', {status}, 'session', md5(i::text || 'session')),
       timestamptz '2019-01-01 00:00:00+00' + random() * interval '2500 days',
       ('10.' || (i % 256) || '.' || floor(random() * 256)::int || '.' || floor(random() * 256)::int)::inet
FROM generate_series(1, {audit}) AS i, vocab v;
DROP TABLE vocab;
ANALYZE;
"""


def realistic(pg: PostgresCluster, database: str, plain_mib: int) -> None:
    """About `plain_mib` MiB of plain dump (the applications table is most of it)."""
    unit = max(plain_mib / 640, 0.01)
    sql = REALISTIC_SQL.format(
        words=_array(WORDS), first=_array(FIRST_NAMES), last=_array(LAST_NAMES), streets=_array(STREETS),
        cities=_array(CITIES), domains=_array(DOMAINS), statuses=_array(STATUSES),
        **{name: _pick(column) for name, column in (("word", "words"), ("first_name", "first_names"), ("last_name", "last_names"),
                                                    ("street", "streets"), ("city", "cities"), ("domain", "domains"),
                                                    ("status", "statuses"))},
        inner_word=_pick("words", "w"),
        contact="(ARRAY['email', 'post', 'phone'])[1 + floor(random() * 3)::int]",
        customers=int(300_000 * unit), applications=int(600_000 * unit), audit=int(1_000_000 * unit), evidence_blocks=64,
    )
    pg.create_database(database)
    pg.psql(sql, database)
