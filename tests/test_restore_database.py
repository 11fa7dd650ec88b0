"""restore_database.py: real backups restored into real databases; nothing committed unless verified."""

from __future__ import annotations

import json
import subprocess

import pytest

from dev.harness import table_fingerprint
from tests.backup_factory import at, database_backup, iso, upload_dump
from tests.conftest import PASSPHRASE, error_lines, one_error, public_tables

TABLES = ("applications", "admin_user")


def assert_same(pg, a, b):
    for table in TABLES:
        assert table_fingerprint(pg, a, table) == table_fingerprint(pg, b, table)


@pytest.fixture
def backed_up(run, pg, sample_db):
    return json.loads(run("backup_database.py", "--database-url", pg.url(sample_db), "--json", check=True).stdout)


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_latest_round_trip_restores_every_row(run, pg, sample_db, scratch_db, compression):
    backed_up = json.loads(run("backup_database.py", "--database-url", pg.url(sample_db), "--compression", compression, "--json",
                               check=True).stdout)
    assert backed_up.get("compression") == compression
    assert (backed_up["plaintext_size"] > 2 * backed_up["encrypted_size"]) == (compression == "zstd")
    done = run("restore_database.py", "--latest", "--target-database-url", pg.url(scratch_db), "--json", check=True)
    result = json.loads(done.stdout)
    assert result["key"] == backed_up["key"] and result["version_id"] == backed_up["version_id"]
    assert result["tables"] == 2 and result["skipped"] == []
    assert_same(pg, sample_db, scratch_db)


def test_pgbench_database_round_trip(run, pg, scratch_db, s3server, bucket):
    source = "pgbench_src"
    pg.create_database(source)
    try:
        subprocess.run([str(pg.bin / "pgbench"), "-i", "-s", "2", "-q", pg.url(source)], check=True, capture_output=True)
        run("backup_database.py", "--database-url", pg.url(source), check=True)
        run("restore_database.py", "--latest", "--target-database-url", pg.url(scratch_db), check=True)
        for table in ("pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history"):
            assert table_fingerprint(pg, scratch_db, table) == table_fingerprint(pg, source, table)
    finally:
        pg.drop_database(source)


def test_target_with_tables_is_refused_without_replace(run, pg, sample_db, backed_up, scratch_db):
    """The app already started on the new database and created its default admin row."""
    pg.psql("CREATE TABLE admin_user (id serial PRIMARY KEY, email text UNIQUE NOT NULL, "
            "created_at timestamptz NOT NULL DEFAULT now()); INSERT INTO admin_user (email) VALUES ('fresh@app')", scratch_db)
    done = run("restore_database.py", "--latest", "--target-database-url", pg.url(scratch_db))
    assert done.returncode == 1
    assert "--replace" in error_lines(done.stderr)[0] and "public.admin_user" in done.stderr
    assert pg.psql("SELECT email FROM admin_user", scratch_db) == "fresh@app"

    run("restore_database.py", "--latest", "--target-database-url", pg.url(scratch_db), "--replace", check=True)
    assert_same(pg, sample_db, scratch_db)
    assert pg.psql("SELECT count(*) FROM admin_user WHERE email = 'fresh@app'", scratch_db) == "0"


def test_key_and_version_id_select_one_backup(run, pg, sample_db, scratch_db, s3server, bucket):
    same_second = {"EXTERNAL_BACKUPS_NOW": iso(at(1))}
    first = json.loads(run("backup_database.py", "--database-url", pg.url(sample_db), "--json", env=same_second, check=True).stdout)
    pg.psql("INSERT INTO admin_user (email) VALUES ('second@backup')", sample_db)
    try:
        second = json.loads(run("backup_database.py", "--database-url", pg.url(sample_db), "--json", env=same_second,
                                check=True).stdout)
    finally:
        pg.psql("DELETE FROM admin_user WHERE email = 'second@backup'", sample_db)
    assert first["key"] == second["key"] and first["version_id"] != second["version_id"]

    listing = json.loads(run("list_backups.py", "--kind", "database", "--json", check=True).stdout)
    assert {b["version_id"] for b in listing} == {first["version_id"], second["version_id"]}
    assert all(b["complete"] for b in listing)

    run("restore_database.py", "--key", first["key"], "--version-id", first["version_id"],
        "--target-database-url", pg.url(scratch_db), check=True)
    assert pg.psql("SELECT count(*) FROM admin_user", scratch_db) == "1"
    run("restore_database.py", "--key", second["key"].rsplit("/", 1)[1], "--version-id", second["version_id"],
        "--target-database-url", pg.url(scratch_db), "--replace", check=True)
    assert pg.psql("SELECT count(*) FROM admin_user", scratch_db) == "2"


def test_restore_from_local_file_needs_its_manifest(run, pg, sample_db, backed_up, scratch_db, s3server, bucket, tmp_path):
    path = tmp_path / "backup.sql.encrypted"
    path.write_bytes(s3server.client().get_object(Bucket=bucket, Key=backed_up["key"])["Body"].read())
    refused = run("restore_database.py", "--file", str(path), "--target-database-url", pg.url(scratch_db))
    assert refused.returncode == 2 and "--without-manifest" in refused.stderr
    assert public_tables(pg, scratch_db) == "0"

    run("restore_database.py", "--file", str(path), "--without-manifest", "--target-database-url", pg.url(scratch_db), check=True)
    assert_same(pg, sample_db, scratch_db)

    (tmp_path / "backup.sql.encrypted.manifest.json").write_text(json.dumps(backed_up))
    run("restore_database.py", "--file", str(path), "--replace", "--target-database-url", pg.url(scratch_db), check=True)
    assert_same(pg, sample_db, scratch_db)


def test_wrong_passphrase_commits_nothing_and_says_so_once(run, pg, sample_db, backed_up, scratch_db):
    wrong = {"EXTERNAL_BACKUP_ENCRYPTION_KEY": "not-the-passphrase"}
    done = run("restore_database.py", "--latest", "--target-database-url", pg.url(scratch_db), env=wrong)
    assert done.returncode == 1
    [line] = error_lines(done.stderr)
    assert backed_up["key_id"] in line and "mistyped" in line and "the only backup found" in line
    assert "skipped" not in done.stderr and "reasons are above" not in done.stderr  # one backup, one reason, said once
    assert public_tables(pg, scratch_db) == "0"
    # With several, each is skipped on its own line and the error line sums them up.
    database_backup(run, pg=pg, sample_db=sample_db)
    done = run("restore_database.py", "--latest", "--target-database-url", pg.url(scratch_db), env=wrong)
    [line] = error_lines(done.stderr)
    assert "none of the 2 backups was made with the passphrase(s) given: mistyped" in line
    assert done.stderr.count("skipped ") == 2


def test_a_missing_target_database_says_how_to_create_it(run, pg, backed_up):
    done = run("restore_database.py", "--latest", "--target-database-url", pg.url("not_created_yet"))
    assert done.returncode == 1
    line = one_error(done, "not_created_yet", "does not exist", "CREATE DATABASE")
    assert pg.password not in line


def test_replace_over_a_newer_schema_that_depends_on_backed_up_tables_changes_nothing(run, pg, sample_db, backed_up, scratch_db):
    """A newer app added a table with a foreign key to a table the backup drops and recreates."""
    run("restore_database.py", "--latest", "--target-database-url", pg.url(scratch_db), check=True)
    pg.psql("CREATE TABLE audit (id int PRIMARY KEY, admin int REFERENCES admin_user (id)); INSERT INTO audit VALUES (1, 1)",
            scratch_db)
    done = run("restore_database.py", "--latest", "--target-database-url", pg.url(scratch_db), "--replace")
    assert done.returncode == 1
    one_error(done, "rolled back", "depend", "new, empty database")
    assert pg.psql("SELECT count(*) FROM audit", scratch_db) == "1"


def test_truncated_local_file_commits_nothing(run, pg, backed_up, scratch_db, s3server, bucket, tmp_path):
    """A dump cut short decrypts partially: psql must never see its end of input."""
    body = s3server.client().get_object(Bucket=bucket, Key=backed_up["key"])["Body"].read()
    path = tmp_path / "cut.sql.encrypted"
    path.write_bytes(body[: len(body) // 2])
    done = run("restore_database.py", "--file", str(path), "--without-manifest", "--target-database-url", pg.url(scratch_db))
    assert done.returncode == 1 and len(error_lines(done.stderr)) == 1
    assert public_tables(pg, scratch_db) == "0"


def test_dump_without_trailer_commits_nothing(run, pg, sample_db, scratch_db, tmp_path):
    """Encrypted cleanly but cut at a statement boundary: only the missing trailer tells."""
    dump = subprocess.run([str(pg.bin / "pg_dump"), "--clean", "--if-exists", "--no-owner", "--no-privileges",
                           pg.url(sample_db)], check=True, capture_output=True).stdout
    cut = dump[: dump.index(b"-- PostgreSQL database dump complete")]
    plain = tmp_path / "cut.sql"
    plain.write_bytes(cut)
    encrypted = tmp_path / "cut.sql.encrypted"
    subprocess.run(["openssl", "enc", "-aes-256-cbc", "-pbkdf2", "-in", str(plain), "-out", str(encrypted),
                    "-pass", "env:KEY"], check=True, env={"KEY": PASSPHRASE, "PATH": "/usr/bin:/bin"})
    done = run("restore_database.py", "--file", str(encrypted), "--without-manifest", "--target-database-url", pg.url(scratch_db))
    assert done.returncode == 1
    assert "trailer is missing" in done.stderr
    assert public_tables(pg, scratch_db) == "0"


def test_no_backup_at_all_is_a_clear_error(run, pg, scratch_db):
    done = run("restore_database.py", "--latest", "--target-database-url", pg.url(scratch_db))
    assert done.returncode == 1 and "no database backup found" in done.stderr


def test_latest_takes_the_older_good_backup(run, pg, sample_db, scratch_db, s3server, bucket):
    client = s3server.client()
    older = database_backup(run, pg=pg, started_at=at(2))
    newer = upload_dump(client, bucket, at(1), b"-- not a whole dump\nSELECT 1;\n", PASSPHRASE)
    done = run("restore_database.py", "--latest", "--target-database-url", pg.url(scratch_db), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["key"] == older["key"]
    [skipped] = result["skipped"]
    assert skipped["key"] == newer["key"] and "trailer" in skipped["reason"] and skipped["problem"] == "bad content"
    assert pg.psql("SELECT count(*) FROM applications", scratch_db) == "1500"


# -- what genuine dumps hold restores exactly, through the guard -----------------------------------
TRICKY = r"""
CREATE SCHEMA "v1.2";
CREATE TABLE notes (id int PRIMARY KEY, body text, arr int[], "DBNAME" int,
    CONSTRAINT slice CHECK (arr[: "DBNAME"] IS NOT NULL), CONSTRAINT digits CHECK (body ~ '^[^\d]|\d'));
INSERT INTO notes VALUES
    (1, E'COMMIT;\nBEGIN;\nALTER ROLE app_owner PASSWORD ''x'';\n\\.\n\\! touch /tmp/x\nEND;', '{1,2,3}', 2),
    (2, 'C:\', '{4}', 1),
    (3, E'-- PostgreSQL database dump complete\n\\unrestrict x', '{5,6}', 1);
COMMENT ON TABLE notes IS 'it''s C:\ ; COMMIT;';
CREATE FUNCTION plain_body(a int) RETURNS int LANGUAGE plpgsql AS $body$
BEGIN
COMMIT;
RETURN a; END
$body$;
CREATE FUNCTION atomic_body(a int) RETURNS int LANGUAGE sql
BEGIN ATOMIC
  SELECT CASE WHEN a > 0 THEN a + 1 ELSE 0 END;
END;
CREATE VIEW committed AS SELECT id, 'COMMIT;'::text AS word, arr[1:2] AS two FROM notes;
CREATE TABLE "v1.2".items (id int GENERATED ALWAYS AS IDENTITY, note text);
INSERT INTO "v1.2".items (note) VALUES ('a'), ('COMMIT;'), (NULL);
CREATE TABLE "new
line" (id int);
INSERT INTO "new
line" VALUES (1), (2);
SELECT lo_from_bytea(0, '\x00c3a9'::bytea);
"""
DEFINITIONS = r"""
SELECT string_agg(conname || ' ' || pg_get_constraintdef(oid), ' | ' ORDER BY conname) FROM pg_constraint
 WHERE conrelid = 'notes'::regclass;
SELECT string_agg(proname || ' ' || pg_get_functiondef(oid), ' | ' ORDER BY proname) FROM pg_proc
 WHERE proname IN ('plain_body', 'atomic_body');
SELECT pg_get_viewdef('committed'::regclass);
SELECT obj_description('notes'::regclass);
SELECT string_agg(encode(lo_get(oid), 'hex'), ',') FROM pg_largeobject_metadata;
SELECT md5(string_agg(n::text, ',' ORDER BY id)) FROM notes n;
SELECT md5(string_agg(i::text, ',' ORDER BY id)) FROM "v1.2".items i;
SELECT count(*) FROM "new
line";
"""


@pytest.fixture
def tricky_db(pg):
    """A database whose data, comments and function bodies hold what the guard refuses as
    statements, psql's variable names after a colon, a schema with a dot, a table name with a
    newline and a large object."""
    name = "tricky_src"
    pg.create_database(name)
    pg.psql(TRICKY, name)
    yield name
    pg.drop_database(name)


def test_a_genuine_dump_holding_commit_lines_and_psql_variables_restores_exactly(run, pg, tricky_db, app_db):
    """`arr[:"DBNAME"]` was restored as `arr["the target's name"]` (psql's variable), and large
    objects' data came with pg_dump's own BEGIN/COMMIT, which ended the single transaction."""
    name, url = app_db
    database_backup(run, pg=pg, sample_db=tricky_db)
    done = run("restore_database.py", "--latest", "--target-database-url", url, env={"BACKUP_ALLOW_SUPERUSER": None})
    assert done.returncode == 0, done.stderr
    assert pg.psql(DEFINITIONS, name) == pg.psql(DEFINITIONS, tricky_db)
    assert 'CHECK ((arr[:"DBNAME"] IS NOT NULL))' in pg.psql(DEFINITIONS, name)


def test_large_objects_do_not_end_the_single_transaction(run, pg, scratch_db, s3server, bucket):
    """pg_dump writes large objects' data between BEGIN; and COMMIT;, which ended psql's single
    transaction: a restore that failed after them kept all that came before."""
    source = "blobs_src"
    pg.create_database(source)
    try:
        pg.psql("CREATE TABLE kept (id int); INSERT INTO kept VALUES (1); SELECT lo_from_bytea(0, 'blob')", source)
        dump = subprocess.run([str(pg.bin / "pg_dump"), "--clean", "--if-exists", "--no-owner", "--no-privileges",
                               f"--dbname={pg.url(source, password=False)}"], env=pg.env(), capture_output=True, check=True).stdout
    finally:
        pg.drop_database(source)
    blob_end = b"SELECT pg_catalog.lo_close(0);\n\nCOMMIT;\n"
    after = dump.index(blob_end) + len(blob_end)
    failing = dump[:after] + b"CREATE TABLE public.kept (id int);\n" + dump[after:]  # already exists: psql stops
    upload_dump(s3server.client(), bucket, at(1), failing, PASSPHRASE)
    done = run("restore_database.py", "--latest", "--target-database-url", pg.url(scratch_db))
    assert done.returncode == 1
    one_error(done, "rolled back", "already exists")
    assert public_tables(pg, scratch_db) == "0"
    assert pg.psql("SELECT count(*) FROM pg_largeobject_metadata", scratch_db) == "0"


@pytest.mark.parametrize(("power", "undo", "said"), [
    ("GRANT pg_execute_server_program TO app_owner", "REVOKE pg_execute_server_program FROM app_owner",
     "a member of pg_execute_server_program"),
    ("GRANT postgres TO app_owner", "REVOKE postgres FROM app_owner", "a member of postgres"),  # SET ROLE postgres
    ("ALTER ROLE app_owner CREATEROLE", "ALTER ROLE app_owner NOCREATEROLE", "allowed to create roles"),  # and grant them
])
def test_a_role_that_can_act_as_a_superuser_is_refused_like_one(run, pg, app_db, backed_up, power, undo, said):
    name, url = app_db
    pg.psql(power)
    try:
        done = run("restore_database.py", "--latest", "--target-database-url", url, env={"BACKUP_ALLOW_SUPERUSER": None})
        assert done.returncode == 1
        one_error(done, f"'app_owner' is {said}", "--allow-superuser")
        assert public_tables(pg, name) == "0"
    finally:
        pg.psql(undo)
