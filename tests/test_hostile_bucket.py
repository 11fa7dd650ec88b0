"""The bucket is hostile: each test plays an attacker who holds what the hourly backup job holds
(s3:PutObject on the external bucket and the passphrase) or only write access to the app's
bucket, against the real PostgreSQL and the local S3 endpoint, and checks that no restore, check
or listing can be turned against the people restoring.

Planted dumps are consistent (size, SHA-256, trailer and manifest all match): the worst case.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
import zipfile
import zlib
from pathlib import Path
from urllib.parse import quote

import pytest

from backupkit import crypto
from backupkit.compression import ZSTD_MAGIC
from backupkit.manifest import build_manifest
from dev.harness import REPO, table_fingerprint
from tests.backup_factory import (
    ENVIRONMENT,
    at,
    backup_key,
    database_backup,
    openssl_encrypt,
    put_with_manifest,
    sha256,
    upload_archive,
    upload_dump,
    zip_of,
)
from tests.conftest import (
    APP_PASSWORD,
    APP_ROLE,
    PASSPHRASE,
    Runner,
    error_lines,
    one_error,
    public_tables,
    role_untouched,
)
from tests.files_helpers import Obj, fill, heads, new_bucket, put_raw, snapshot
from tests.procwatch import SpyBin

RUNBOOK = (REPO / "runbook.md").read_text()
TRAILER = b"--\n-- PostgreSQL database dump complete\n--\n"


# -- building plants ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def genuine_dump(pg, sample_db) -> bytes:
    """What the backup job dumps (the installed pg_dump writes \\restrict framing)."""
    return subprocess.run([str(pg.bin / "pg_dump"), "--format=plain", "--clean", "--if-exists", "--no-owner",
                           "--no-privileges", f"--dbname={pg.url(sample_db, password=False)}"],
                          env=pg.env(), capture_output=True, check=True).stdout


def framing_key(dump: bytes) -> bytes:
    return re.search(rb"(?m)^\\restrict ([0-9A-Za-z]+)$", dump).group(1)


def without_framing(dump: bytes) -> bytes:
    """The same dump as a pg_dump older than 15.14 writes it."""
    return re.sub(rb"(?m)^\\(un)?restrict [0-9A-Za-z]+\n", b"", dump)


def plant(dump: bytes, command: bytes, where: str, *, reuse_framing: bool = False) -> bytes:
    """`dump` with `command` planted at its start, after 1 MiB, or after its trailer; with
    `reuse_framing`, the plant first unrestricts with the dump's own framing key."""
    if reuse_framing:
        command = b"\\unrestrict " + framing_key(dump) + b"\n" + command + b"\n\\restrict " + framing_key(dump)
    command += b"\n"
    if where == "start":
        if reuse_framing:  # right after pg_dump's own \restrict line
            at = dump.index(b"\n", dump.index(b"\\restrict ")) + 1
            return dump[:at] + command + dump[at:]
        return command + dump
    if where == "middle":
        at = dump.index(b"\nCREATE TABLE") + 1
        return dump[:at] + b"-- padding\n" * (1024 * 1024 // 11) + command + dump[at:]
    at = dump.index(TRAILER) + len(TRAILER)
    return dump[:at] + command + dump[at:]


COMMANDS = {
    "shell": b"\\! touch {marker}",
    "output-pipe": b"\\o |touch {marker}\nSELECT 1;",
    "copy-program": b"\\copy (SELECT 1) TO PROGRAM 'touch {marker}'",
    "query-pipe": b"SELECT 1 \\g |touch {marker}",
}


def command(name: str, marker: Path) -> bytes:
    return COMMANDS[name].replace(b"{marker}", str(marker).encode())


def refused(done, marker: Path, pg, scratch_db: str) -> None:
    assert done.returncode == 1, done.stderr
    assert not marker.exists(), "the planted command ran"
    assert public_tables(pg, scratch_db) == "0", "the planted dump was committed"


# -- 1. planted psql commands never run ---------------------------------------------------------
@pytest.mark.parametrize(("name", "where", "framing"), [
    *[(name, "start", False) for name in COMMANDS],
    ("shell", "middle", False),
    ("shell", "end", False),
    ("shell", "start", True),
    ("output-pipe", "end", True),
])
def test_planted_commands_never_run_in_a_restore(run, pg, scratch_db, s3server, bucket, genuine_dump, tmp_path,
                                                 name, where, framing):
    marker = tmp_path / "pwned"
    upload_dump(s3server.client(), bucket, at(0), plant(genuine_dump, command(name, marker), where, reuse_framing=framing),
                PASSPHRASE)
    done = run("restore_database.py", "--latest", "--target-database-url", pg.url(scratch_db))
    refused(done, marker, pg, scratch_db)
    assert "psql commands" in error_lines(done.stderr)[0]


def test_planted_commands_never_run_in_the_daily_drill(run, pg, scratch_db, s3server, bucket, genuine_dump, tmp_path):
    marker = tmp_path / "pwned"
    genuine = database_backup(run, pg=pg, started_at=at(2))
    client = s3server.client()
    upload_dump(client, bucket, at(1), plant(genuine_dump, command("output-pipe", marker), "middle"), PASSPHRASE)
    upload_dump(client, bucket, at(0), plant(genuine_dump, command("shell", marker), "start", reuse_framing=True), PASSPHRASE)
    # --since (every backup of the window): both plants fail, nothing ran, nothing committed.
    done = run("verify_backup.py", "--kind", "database", "--since", "1d", "--restore-into", pg.url(scratch_db), "--json")
    assert done.returncode == 1 and not marker.exists()
    report = json.loads(done.stdout)
    assert [r["ok"] for r in report["results"]] == [False, False, True]
    # --latest (the drill): the plants are skipped, the genuine backup restores.
    pg.drop_database(scratch_db)
    pg.create_database(scratch_db)
    done = run("verify_backup.py", "--kind", "database", "--latest", "--restore-into", pg.url(scratch_db), "--json")
    assert done.returncode == 0, done.stderr
    assert not marker.exists()
    report = json.loads(done.stdout)
    assert report["results"][0]["key"] == genuine["key"]
    assert [s["problem"] for s in report["skipped"]] == ["bad content", "bad content"]


def test_planted_sql_gets_no_server_commands_from_a_restore_as_the_apps_own_role(run, pg, app_db, s3server, bucket,
                                                                                 genuine_dump):
    """Restricted psql stops backslash commands; SQL that runs commands on the server (COPY … TO
    PROGRAM, with a superuser's rights) is refused by the guard, and a superuser target is refused
    before anything is downloaded unless the operator says --allow-superuser."""
    name, as_owner = app_db
    drop = Path(tempfile.mkdtemp(prefix="restore-drop-"))
    drop.chmod(0o777)  # writable by the server's OS user: the command would succeed if it ran
    marker = drop / "pwned"
    planted = after_header(genuine_dump, f"COPY (SELECT 1) TO PROGRAM 'touch {marker}';\n".encode())
    manifest = upload_dump(s3server.client(), bucket, at(0), planted, PASSPHRASE)
    try:
        done = run("restore_database.py", "--key", manifest["key"], "--target-database-url", as_owner, env=NO_OVERRIDE)
        assert done.returncode == 1 and not marker.exists()
        one_error(done, "COPY to or from somewhere other than psql's input", "not made by the backup job")
        assert "superuser" not in done.stderr.split("error:")[0]  # no warning: the right role
        assert public_tables(pg, name) == "0"

        done = run("restore_database.py", "--key", manifest["key"], "--target-database-url", pg.url(name), env=NO_OVERRIDE)
        assert done.returncode == 1 and not marker.exists()
        one_error(done, "'postgres' is a superuser", "COPY … TO PROGRAM", "--allow-superuser")
        assert "restoring" not in done.stderr  # refused before anything was downloaded

        done = run("restore_database.py", "--key", manifest["key"], "--target-database-url", pg.url(name),
                   "--allow-superuser", env=NO_OVERRIDE)
        assert "warning: the target's role 'postgres' is a superuser" in done.stderr
        assert done.returncode == 1 and not marker.exists()
        assert public_tables(pg, name) == "0"
    finally:
        shutil.rmtree(drop)


def runbook_restore_command() -> str:
    """The runbook's manual restore, exactly as printed there (the guard found where it is)."""
    block = RUNBOOK[RUNBOOK.index("TABLES=$(psql"):]
    return block[: block.index("\n```")].replace("scripts/backupkit/sqlstream.py", str(REPO / "scripts/backupkit/sqlstream.py"))


@pytest.mark.parametrize(("name", "where", "framing"), [
    ("shell", "start", True), ("copy-program", "middle", False), ("shell", "end", False), ("query-pipe", "end", True),
])
def test_planted_commands_never_run_in_the_runbooks_manual_restore(pg, scratch_db, genuine_dump, tmp_path, name, where, framing):
    marker = tmp_path / "pwned"
    (tmp_path / "database-backup.sql").write_bytes(plant(genuine_dump, command(name, marker), where, reuse_framing=framing))
    done = subprocess.run(["bash", "-c", runbook_restore_command()], cwd=tmp_path, capture_output=True, text=True,
                          env={**pg.env(), "TARGET_DATABASE_URL": pg.url(scratch_db, password=False)})
    assert "sqlstream.py: refused: the dump holds psql commands" in done.stderr, done.stderr
    assert "restore committed" not in done.stdout
    assert not marker.exists() and public_tables(pg, scratch_db) == "0"


def runbook_restore(pg, tmp_path, dump: bytes, url: str, password: str) -> subprocess.CompletedProcess:
    (tmp_path / "database-backup.sql").write_bytes(dump)
    return subprocess.run(["bash", "-c", "set -o pipefail\n" + runbook_restore_command()], cwd=tmp_path, capture_output=True,
                          text=True, env={**pg.env(), "PGPASSWORD": password, "TARGET_DATABASE_URL": url})


def test_the_runbooks_manual_restore_refuses_a_planted_commit_and_a_function_that_alters_the_role(pg, app_db, genuine_dump,
                                                                                               tmp_path):
    name, _ = app_db
    url = f"postgresql://{APP_ROLE}@127.0.0.1:{pg.port}/{name}"
    done = runbook_restore(pg, tmp_path, after_header(genuine_dump, PLANTED_COMMIT), url, APP_PASSWORD)
    assert "sqlstream.py: refused: the dump holds transaction control (COMMIT)" in done.stderr, done.stderr
    assert done.returncode != 0 and "restore committed" not in done.stdout
    role_untouched(pg, name)
    assert public_tables(pg, name) == "0"

    done = runbook_restore(pg, tmp_path, HEADER + EVIL + CALLERS["default"] + TRAILER, url, APP_PASSWORD)
    assert "sqlstream seal: the restore changed shared catalogs" in done.stderr, done.stderr
    assert done.returncode != 0 and "restore committed" not in done.stdout
    role_untouched(pg, name)
    assert public_tables(pg, name) == "0"

    pg.psql("CREATE TABLE kept (id int)", name)  # the target is not empty: nothing is restored over it
    done = runbook_restore(pg, tmp_path, genuine_dump, url, APP_PASSWORD)
    assert done.returncode == 0 and "not restored: the target database already has 1 tables" in done.stdout
    assert public_tables(pg, name) == "1"


@pytest.mark.parametrize("framed", [True, False], ids=["pg_dump-framing", "older-pg_dump"])
def test_genuine_dumps_with_and_without_framing_still_restore(run, pg, sample_db, scratch_db, s3server, bucket, genuine_dump,
                                                              tmp_path, framed):
    dump = genuine_dump if framed else without_framing(genuine_dump)
    assert (b"\\restrict " in dump) == framed
    upload_dump(s3server.client(), bucket, at(0), dump, PASSPHRASE)
    run("restore_database.py", "--latest", "--target-database-url", pg.url(scratch_db), check=True)
    for table in ("applications", "admin_user"):
        assert table_fingerprint(pg, scratch_db, table) == table_fingerprint(pg, sample_db, table)
    # And by the runbook's manual command.
    pg.drop_database(scratch_db)
    pg.create_database(scratch_db)
    (tmp_path / "database-backup.sql").write_bytes(dump)
    done = subprocess.run(["bash", "-c", runbook_restore_command()], cwd=tmp_path, capture_output=True, text=True,
                          env={**pg.env(), "TARGET_DATABASE_URL": pg.url(scratch_db, password=False)})
    assert done.returncode == 0 and "restore committed" in done.stdout, done.stderr
    assert table_fingerprint(pg, scratch_db, "applications") == table_fingerprint(pg, sample_db, "applications")


def test_a_psql_too_old_to_restrict_is_refused_before_anything_is_read(run, pg, scratch_db, tmp_path):
    old = tmp_path / "psql"
    old.write_text(f'#!/bin/sh\n[ "$1" = --version ] && {{ echo "psql (PostgreSQL) 15.13"; exit 0; }}\nexec {pg.bin / "psql"} "$@"\n')
    old.chmod(0o755)
    done = run("restore_database.py", "--latest", "--target-database-url", pg.url(scratch_db), "--psql", str(old))
    assert done.returncode == 1
    [line] = error_lines(done.stderr)
    assert "too old to restore safely" in line and "15.14" in line and "--psql" in line


def test_restoring_children_get_no_actions_variables(run, pg, sample_db, scratch_db, tmp_path):
    """Inside Actions these let a process mint the job's OIDC token."""
    spy = SpyBin(tmp_path / "spy", {"psql": str(pg.bin / "psql"), "openssl": shutil.which("openssl")})
    database_backup(run, pg=pg)
    actions = {"ACTIONS_ID_TOKEN_REQUEST_URL": "http://127.0.0.1:9/token", "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "oidc-secret-1",
               "ACTIONS_RUNTIME_TOKEN": "runtime-secret-2", "GITHUB_TOKEN": "gh-secret-3"}
    spied = Runner({**run.env, **actions, "PSQL": spy.path("psql"), "PATH": f"{spy.dir}:{run.env['PATH']}"})
    spied("restore_database.py", "--latest", "--target-database-url", pg.url(scratch_db), check=True)
    records = spy.records()
    assert {r.program for r in records} >= {"psql", "openssl"}
    for record in records:
        assert not [k for k in record.env if k.startswith("ACTIONS_") or k == "GITHUB_TOKEN"], (record.program, sorted(record.env))


# -- 1b. a restore changes nothing but its target -----------------------------------------------------
NO_OVERRIDE = {"BACKUP_ALLOW_SUPERUSER": None}  # restored as the app's own role, as the README asks
HEADER = b"SET statement_timeout = 0;\nSET client_encoding = 'UTF8';\nSET standard_conforming_strings = on;\n"
PLANTED_COMMIT = (b"COMMIT;\nALTER ROLE CURRENT_USER SET search_path = zz;\nALTER ROLE CURRENT_USER PASSWORD 'planted-pw-1';\n"
                  b"CREATE TABLE public.planted (id int);\nBEGIN;\n")


def after_header(dump: bytes, sql: bytes) -> bytes:
    """`sql` planted where pg_dump's header of SETs ends, before its first DROP or CREATE."""
    at = re.search(rb"\n(?:DROP|CREATE) ", dump).start() + 1
    return dump[:at] + sql + dump[at:]


def test_a_planted_commit_restores_nothing_and_leaves_the_role_untouched(run, pg, app_db, s3server, bucket, genuine_dump):
    """The dump's own COMMIT would end psql's --single-transaction: ALTER ROLE then outlives the
    restore (and the database), whatever happens to the rest."""
    name, url = app_db
    manifest = upload_dump(s3server.client(), bucket, at(1), after_header(genuine_dump, PLANTED_COMMIT), PASSPHRASE)
    done = run("restore_database.py", "--key", manifest["key"], "--target-database-url", url, env=NO_OVERRIDE)
    assert done.returncode == 1
    one_error(done, "transaction control (COMMIT)", "never writes", "not made by the backup job")
    role_untouched(pg, name)
    assert public_tables(pg, name) == "0"
    done = run("verify_backup.py", "--kind", "database", "--key", manifest["key"])  # verify reads it the same way
    assert done.returncode == 1 and "transaction control (COMMIT)" in done.stdout


def test_latest_skips_a_planted_commit_for_the_older_genuine_backup(run, pg, sample_db, app_db, s3server, bucket, genuine_dump):
    name, url = app_db
    genuine = database_backup(run, pg=pg, started_at=at(2))
    planted = upload_dump(s3server.client(), bucket, at(1), after_header(genuine_dump, PLANTED_COMMIT), PASSPHRASE)
    done = run("restore_database.py", "--latest", "--target-database-url", url, "--json", env=NO_OVERRIDE)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["key"] == genuine["key"]
    [skip] = result["skipped"]
    assert skip["key"] == planted["key"] and "transaction control (COMMIT)" in skip["reason"]
    assert "the target is as it was before" in skip["reason"]
    role_untouched(pg, name)
    for table in ("applications", "admin_user"):
        assert table_fingerprint(pg, name, table) == table_fingerprint(pg, sample_db, table)
    assert pg.psql("SELECT count(*) FROM pg_tables WHERE tablename = 'planted'", name) == "0"


def test_latest_stops_when_a_failed_candidate_changed_the_target(run, pg, app_db, s3server, bucket):
    """nextval() is not rolled back: a planted dump that moves the target's own sequence and then
    fails (here at the seal, after psql ran all of it) has changed the target. --latest must not
    restore the older backup over it and call that a success."""
    name, url = app_db
    pg.psql("CREATE SEQUENCE public.app_counter; ALTER SEQUENCE public.app_counter OWNER TO app_owner", name)
    database_backup(run, pg=pg, started_at=at(2))
    bump = HEADER + EVIL + (
        b"CREATE FUNCTION public.bump() RETURNS bigint LANGUAGE sql AS $$ SELECT nextval('public.app_counter') $$;\n"
        b"CREATE TABLE public.bumped (id int, n bigint DEFAULT public.bump(), e int DEFAULT public.evil());\n"
        b"COPY public.bumped (id) FROM stdin;\n1\n\\.\n") + TRAILER
    upload_dump(s3server.client(), bucket, at(1), bump, PASSPHRASE)
    done = run("restore_database.py", "--latest", "--target-database-url", url, env=NO_OVERRIDE)
    assert done.returncode == 1
    one_error(done, "shared catalogs", "changed while it ran", "no other backup is restored over it")
    assert "restored" not in done.stdout
    assert pg.psql("SELECT is_called FROM public.app_counter", name) == "t"  # the plant's nextval, not undone
    assert public_tables(pg, name) == "0"  # the older backup was not restored over it
    role_untouched(pg, name)


# An index's function must be IMMUTABLE, and those may not ALTER ROLE, but may call one that may.
EVIL = (b"CREATE FUNCTION public.evil() RETURNS integer LANGUAGE plpgsql AS $$ BEGIN\n"
        b"EXECUTE 'ALTER ROLE CURRENT_USER SET search_path = zz';\n"
        b"EXECUTE 'ALTER ROLE CURRENT_USER PASSWORD ''planted-pw-2''';\nRETURN 1; END $$;\n"
        b"CREATE FUNCTION public.evil(a integer) RETURNS integer LANGUAGE plpgsql IMMUTABLE AS $$ BEGIN\n"
        b"RETURN a + public.evil(); END $$;\n")
CALLERS = {
    "default": b"CREATE TABLE public.t (a integer, b integer DEFAULT public.evil());\nCOPY public.t (a) FROM stdin;\n1\n\\.\n",
    "index": b"CREATE TABLE public.t (a integer);\nCOPY public.t (a) FROM stdin;\n1\n\\.\nCREATE INDEX t_evil ON public.t (public.evil(a));\n",
    "check": b"CREATE TABLE public.t (a integer);\nCOPY public.t (a) FROM stdin;\n1\n\\.\n"
             b"ALTER TABLE public.t ADD CONSTRAINT t_evil CHECK (public.evil(a) IS NOT NULL);\n",
}


@pytest.mark.parametrize("caller", CALLERS)
def test_a_function_of_the_dump_that_alters_the_role_is_rolled_back_by_the_seal(run, pg, app_db, s3server, bucket, caller):
    """No statement of this dump is one pg_dump would not write; the ALTER ROLE is inside a function
    it defines, called by a default, an index or a check. The seal before the commit sees the
    transaction's own change to pg_db_role_setting and pg_authid, and rolls it all back."""
    name, url = app_db
    manifest = upload_dump(s3server.client(), bucket, at(1), HEADER + EVIL + CALLERS[caller] + TRAILER, PASSPHRASE)
    done = run("restore_database.py", "--key", manifest["key"], "--target-database-url", url, env=NO_OVERRIDE)
    assert done.returncode == 1
    one_error(done, "rolled back", "shared catalogs", "pg_db_role_setting", "not made by the backup job")
    role_untouched(pg, name)
    assert public_tables(pg, name) == "0"


def test_a_deferrable_constraint_trigger_is_refused(run, pg, app_db, s3server, bucket):
    """Its function runs at the COMMIT, after the seal, and can defer itself again from inside
    (SET CONSTRAINTS): no check before the commit sees what it does, so the restore refuses it."""
    name, url = app_db
    later = (b"CREATE FUNCTION public.evil_later() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN\n"
             b"PERFORM public.evil(); RETURN NULL; END $$;\nCREATE TABLE public.t (a integer);\n"
             b"CREATE CONSTRAINT TRIGGER t_evil AFTER INSERT ON public.t DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
             b"EXECUTE FUNCTION public.evil_later();\nCOPY public.t (a) FROM stdin;\n1\n\\.\n")
    manifest = upload_dump(s3server.client(), bucket, at(1), HEADER + EVIL + later + TRAILER, PASSPHRASE)
    done = run("restore_database.py", "--key", manifest["key"], "--target-database-url", url, env=NO_OVERRIDE)
    assert done.returncode == 1
    one_error(done, "a deferrable constraint trigger", "after the restore's last check")
    role_untouched(pg, name)
    assert public_tables(pg, name) == "0"


# -- 1c. a compressed plant is read only as far as its manifest promised -------------------------
@pytest.fixture(scope="module")
def zstd_bomb() -> bytes:
    """16 GiB of zeros as zstd frames: 16 copies of a frame of 1 GiB (never in memory here)."""
    frame = subprocess.run("head -c 1073741824 /dev/zero | zstd -q -c -1", shell=True, capture_output=True, check=True).stdout
    return frame * 16


def upload_compressed(client, bucket: str, started_at, compressed: bytes, promised: bytes) -> dict:
    """A .sql.zst.encrypted plant whose manifest is consistent with its ciphertext and its
    compressed stream, and promises `promised` as the SQL."""
    body = openssl_encrypt(compressed, PASSPHRASE)
    key = backup_key(ENVIRONMENT, "database", started_at, "zstd")
    manifest = build_manifest(
        kind="database", environment=ENVIRONMENT, key=key, version_id=None, started_at=started_at, completed_at=started_at,
        key_id=crypto.key_id(PASSPHRASE), encrypted_size=len(body), encrypted_sha256=sha256(body),
        plaintext_size=len(promised), plaintext_sha256=sha256(promised), source={"database": "app", "server_version": "?", "pg_dump_version": "?"},
        compression={"compression": "zstd", "compressed_size": len(compressed), "compressed_sha256": sha256(compressed)})
    return put_with_manifest(client, bucket, key, body, manifest)


@pytest.mark.parametrize("script", ["verify_backup.py", "restore_database.py"])
def test_a_zstd_bomb_promising_64_bytes_is_refused_at_once(run, pg, scratch_db, s3server, bucket, zstd_bomb, script):
    manifest = upload_compressed(s3server.client(), bucket, at(1), zstd_bomb, b"-- " + b"x" * 60 + b"\n")
    assert manifest["plaintext_size"] == 64
    args = ["--kind", "database"] if script == "verify_backup.py" else ["--target-database-url", pg.url(scratch_db)]
    began = time.monotonic()
    done, memory = run.measured(script, *args, "--key", manifest["key"], interval=0.02, timeout=120)
    elapsed = time.monotonic() - began
    assert done.returncode == 1
    assert "goes on past the 64 bytes its manifest promised" in done.stdout + done.stderr
    print(f"{script}: refused in {elapsed:.1f} s (the whole run), peak {memory.peak_tree_kib // 1024} MiB")
    assert elapsed < 15, elapsed  # a whole run, Python and the download included; the SQL stops at its first read
    assert memory.peak_tree_kib < 200 * 1024, memory.peak_tree_kib
    assert public_tables(pg, scratch_db) == "0"


# -- 1d. and by time ------------------------------------------------------------------------------
SLEEPER = HEADER + (b"CREATE FUNCTION public.nap() RETURNS integer LANGUAGE sql AS $$ SELECT 1 FROM pg_sleep(120) $$;\n"
                    b"CREATE TABLE public.t (a integer, b integer DEFAULT public.nap());\n"
                    b"COPY public.t (a) FROM stdin;\n1\n\\.\n") + TRAILER


def test_a_plant_that_sleeps_is_stopped_by_the_statement_timeout_and_latest_goes_on(run, pg, sample_db, app_db, s3server,
                                                                                   bucket):
    """A 1 KB plant held restore and drill for as long as it liked, and --latest never reached the
    genuine backup; now no statement outlasts --statement-timeout."""
    name, url = app_db
    genuine = database_backup(run, pg=pg, started_at=at(2))
    upload_dump(s3server.client(), bucket, at(1), SLEEPER, PASSPHRASE)
    began = time.monotonic()
    done = run("restore_database.py", "--latest", "--target-database-url", url, "--statement-timeout", "2s", "--json",
               env=NO_OVERRIDE)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - began < 60
    result = json.loads(done.stdout)
    assert result["key"] == genuine["key"]
    assert "statement timeout" in result["skipped"][0]["reason"] and "--statement-timeout" in result["skipped"][0]["reason"]
    assert table_fingerprint(pg, name, "applications") == table_fingerprint(pg, sample_db, "applications")


def test_the_restore_deadline_stops_a_plant_that_sleeps(run, pg, app_db, s3server, bucket):
    name, url = app_db
    manifest = upload_dump(s3server.client(), bucket, at(1), SLEEPER, PASSPHRASE)
    began = time.monotonic()
    done = run("restore_database.py", "--key", manifest["key"], "--target-database-url", url, "--timeout", "3s",
               env={**NO_OVERRIDE, "BACKUP_STATEMENT_TIMEOUT": "1h"})
    assert done.returncode == 1
    one_error(done, "did not finish within 0m 3s", "--timeout", "nothing is committed")
    assert time.monotonic() - began < 60
    assert public_tables(pg, name) == "0"


# -- 2. "latest" and freshness follow S3's clock, not a name a writer chose -------------------------
def test_a_future_dated_plant_is_never_latest_nor_fresh(run, pg, sample_db, s3server, bucket, genuine_dump, tmp_path):
    from datetime import UTC, datetime, timedelta

    genuine = database_backup(run, pg=pg, started_at=at(3))
    client = s3server.client()
    planted = upload_dump(client, bucket, datetime(2099, 12, 31, 23, 59, 59, tzinfo=UTC), genuine_dump, PASSPHRASE)

    # Three hours after the genuine backup, the plant "from 2099" does not keep the alarm quiet.
    later = (datetime.now(UTC) + timedelta(hours=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    done = run("list_backups.py", "--kind", "database", "--max-age", "2h", "--json", env={"EXTERNAL_BACKUPS_NOW": later})
    assert done.returncode == 1
    assert f"the newest usable backup, {genuine['key']}" in error_lines(done.stderr)[0]
    listed = {b["key"]: b for b in json.loads(done.stdout)}
    assert listed[planted["key"]]["status"] == "suspicious" and "future" in listed[planted["key"]]["problem"]
    assert "warning: suspicious backup" in done.stderr

    out = tmp_path / "latest.sql.encrypted"
    done = run("fetch_backup.py", "--kind", "database", "--latest", "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["key"] == genuine["key"]
    assert [s["problem"] for s in result["skipped"]] == ["suspicious"]


def test_plants_with_a_bad_or_unknown_key_id_are_never_downloaded(run, pg, sample_db, s3server, bucket, genuine_dump, tmp_path):
    from tests.faultproxy import FaultProxy

    genuine = database_backup(run, pg=pg, started_at=at(1))
    client = s3server.client()
    bad = upload_dump(client, bucket, at(0.5), genuine_dump, PASSPHRASE, overrides={"key_id": ""})
    unknown = upload_dump(client, bucket, at(0.2), genuine_dump, "a-passphrase-the-restorer-never-had")
    with FaultProxy(s3server.endpoint) as proxy:
        done = run("verify_backup.py", "--kind", "database", "--latest", "--json", env={"AWS_ENDPOINT_URL": proxy.endpoint})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["results"][0]["key"] == genuine["key"]
    downloads = [path for op, path in proxy.paths if op == "GetObject" and ".manifest.json" not in path]
    assert len(downloads) == 1 and genuine["key"].rsplit("/", 1)[1] in downloads[0]
    assert {s["key"]: s["problem"] for s in report["skipped"]} == {unknown["key"]: "unknown passphrase", bad["key"]: "bad manifest"}


# -- 3. manifests are read only up to a small bound ---------------------------------------------
def test_oversized_manifests_are_refused_without_memory_growth(run, pg, sample_db, s3server, bucket, genuine_dump):
    database_backup(run, pg=pg, started_at=at(1))

    def peak() -> int:
        done, memory = run.measured("list_backups.py", "--kind", "database", "--json", "--no-retention", interval=0.02, timeout=120)
        assert done.returncode == 0, done.stderr
        return memory.peak_process_kib, json.loads(done.stdout)

    before, _ = peak()
    client = s3server.client()
    body = openssl_encrypt(genuine_dump, PASSPHRASE)
    for n in range(4):
        key = backup_key(ENVIRONMENT, "database", at(0.1 * (n + 1)))
        client.put_object(Bucket=bucket, Key=key, Body=body)
        huge = json.dumps({"key": key, "padding": "x" * (40 * 1024 * 1024)}).encode()  # its only manifest
        client.put_object(Bucket=bucket, Key=key + ".manifest.json", Body=huge)
    after, listed = peak()
    problems = [b["problem"] for b in listed if b["status"] == "bad manifest"]
    assert len(problems) == 4 and all("over the 256 KiB" in p for p in problems), listed
    assert after - before < 20 * 1024, f"peak grew from {before} KiB to {after} KiB"


# -- 4. nothing from a bucket reaches the output raw -----------------------------------------------
# (moto's server cannot store a key holding "\n"; S3 can: "\r" and U+2028 stand in, as line breaks.)
INJECTIONS = ["\r::add-mask::PASSWORD", "\u2028::stop-commands::pwn", "::error::forged", "##[error]legacy", "[click](http://evil.example)",
              "\x1b]0;title\x07\x1b[2J"]


def workflow_commands(text: str) -> list[str]:
    """Lines the Actions runner would act on (it splits at \\r as well as \\n)."""
    return [line.strip() for line in re.split(r"[\r\n]", text) if line.lstrip().startswith("::") or "##[" in line]


def test_injected_strings_never_reach_output_raw(run, s3server, bucket, tmp_path):
    client = s3server.client()
    source = new_bucket(s3server)
    names = {f"docs/{i}{text}.txt": Obj(b"x", "text/plain") for i, text in enumerate(INJECTIONS)}
    names["[click](http://evil.example)\r.txt"] = Obj(b"z")  # listed first: the one the error line names
    fill(client, source, names)
    client.put_object(Bucket=source, Key="cold/archive.bin", Body=b"y", StorageClass="GLACIER")
    for text in INJECTIONS[:1] + INJECTIONS[2:5]:  # objects in the external bucket's folders that are not backups
        # (moto cannot list versions of keys holding characters XML 1.0 forbids; S3 can.)
        client.put_object(Bucket=bucket, Key=f"{ENVIRONMENT}/files/{text}.zip.encrypted", Body=b"AES")
    summary = tmp_path / "summary.md"
    actions = {"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary)}
    outputs = []
    done = run("backup_files.py", "--source-bucket", source, env=actions)
    assert done.returncode == 0, done.stderr
    outputs.append(done.stdout + done.stderr)
    for args in (["list_backups.py", "--kind", "files"], ["verify_backup.py", "--kind", "files", "--latest"]):
        done = run(*args, env=actions)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout + done.stderr)
    target = new_bucket(s3server, "restored")
    done = run("restore_files.py", "--latest", "--target-bucket", target, "--skip-unsafe-names", "--dry-run", env=actions)
    outputs.append(done.stdout + done.stderr)
    done = run("restore_files.py", "--latest", "--target-bucket", target, env=actions)
    assert done.returncode == 1  # the names are unsafe as keys: nothing uploaded
    outputs.append(done.stdout + done.stderr)
    for output in outputs:
        assert [c for c in workflow_commands(output) if not c.startswith(("::warning::", "::error title="))] == []
        assert "\x1b" not in output and "\r" not in output
    text = summary.read_text()
    assert "click" in text  # the names are in the summary ...
    outside_code = re.sub(r"(`+)(.+?)\1", "", text)
    assert "click" not in outside_code and "evil.example" not in outside_code  # ... only inside code spans
    assert "\x1b" not in text and "\r" not in text


def test_an_injection_in_a_server_message_is_escaped_in_the_error_line(run, pg, scratch_db, s3server, bucket, tmp_path):
    """psql quotes the failing SQL in its error: a planted dump chooses that text."""
    summary = tmp_path / "summary.md"
    dump = b'CREATE TABLE t (id int);\nCOMMENT ON TABLE "\r::stop-commands::pwn\n::error::forged" IS \'x\';\n' + TRAILER
    upload_dump(s3server.client(), bucket, at(0), dump, PASSPHRASE)
    done = run("restore_database.py", "--latest", "--target-database-url", pg.url(scratch_db),
               env={"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary)})
    assert done.returncode == 1
    assert "stop-commands" in done.stderr  # the message is there, escaped
    assert [c for c in workflow_commands(done.stderr) if not c.startswith("::error title=")] == []
    assert "\r" not in done.stderr
    assert public_tables(pg, scratch_db) == "0"


# -- 5. hostile archives upload nothing --------------------------------------------------------
ATTRS = json.dumps({"ContentType": "text/plain", "Metadata": {}}).encode()


def aliased_zip(copies: int) -> bytes:
    """One 250 KiB member, and a central directory of `copies` entries with their own names, all
    pointing at its bytes (a ZIP bomb for an uploader that trusts the directory)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        info = zipfile.ZipInfo("a.bin", (2026, 11, 29, 10, 0, 0))
        info.comment = ATTRS
        archive.writestr(info, os.urandom(250 * 1024))
    data = buffer.getvalue()
    end = data.rindex(b"PK\x05\x06")
    central_at = struct.unpack_from("<L", data, end + 16)[0]
    entry = data[central_at:end]
    name_length = struct.unpack_from("<H", entry, 28)[0]
    entries = b"".join(entry[:28] + struct.pack("<H", 9) + entry[30:46] + f"a{i:04d}.bin".encode() + entry[46 + name_length:]
                       for i in range(copies))
    record = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, copies, copies, len(entries), central_at, 0)
    return data[:central_at] + entries + record


@pytest.mark.parametrize("case", ["aliased", "duplicate", "bad-metadata"])
def test_hostile_archives_upload_nothing(run, s3server, bucket, case):
    client = s3server.client()
    if case == "aliased":
        archive, count = aliased_zip(200), 200
    elif case == "duplicate":
        archive, count = zip_of([("a.txt", b"first", ATTRS), ("b.txt", b"b", ATTRS), ("a.txt", b"second", ATTRS)]), 3
    else:  # member 30 of 41 has a ContentType that is not a string
        members = [(f"m{i:02d}", b"data", ATTRS) for i in range(41)]
        members[29] = ("m29", b"data", json.dumps({"ContentType": 42, "Metadata": {}}).encode())
        archive, count = zip_of(members), 41
    upload_archive(client, bucket, at(0), archive, PASSPHRASE, count)
    target = new_bucket(s3server, "restored")
    done = run("restore_files.py", "--latest", "--target-bucket", target)
    assert done.returncode == 1, done.stderr
    assert snapshot(client, target) == {}
    verify = run("verify_backup.py", "--kind", "files", "--latest")
    assert verify.returncode == 1  # verify refuses exactly what restore refuses


def test_unsafe_member_names_stop_the_restore_or_are_skipped_and_listed(run, s3server, bucket):
    client = s3server.client()
    members = [("ok/one.txt", b"1", ATTRS), ("../../etc/cron.d/x", b"2", ATTRS), ("/absolute", b"3", ATTRS),
               ("ctl\x1b[31mred", b"4", ATTRS), ("ok/two.txt", b"5", ATTRS)]
    upload_archive(client, bucket, at(0), zip_of(members), PASSPHRASE, len(members))
    target = new_bucket(s3server, "restored")
    done = run("restore_files.py", "--latest", "--target-bucket", target)
    assert done.returncode == 1
    [line] = error_lines(done.stderr)
    assert "3 members have names that are unsafe" in line and "--skip-unsafe-names" in line and "\x1b" not in line
    assert snapshot(client, target) == {}
    done = run("restore_files.py", "--latest", "--target-bucket", target, "--skip-unsafe-names", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert sorted(snapshot(client, target)) == ["ok/one.txt", "ok/two.txt"]
    assert [u["name"] for u in result["not_restored_unsafe_names"]] == ["../../etc/cron.d/x", "/absolute", "ctl\x1b[31mred"]


# -- 6. one object in the app's bucket cannot break every files backup ----------------------------
def test_an_archived_object_is_skipped_named_and_reported_by_the_check(run, s3server, bucket):
    client = s3server.client()
    source = new_bucket(s3server)
    fill(client, source, {"a.txt": Obj(b"a", "text/plain"), "b\r::warning::x.txt": Obj(b"b")})
    client.put_object(Bucket=source, Key="cold/old-invoice.pdf", Body=b"%PDF", StorageClass="GLACIER")
    done = run("backup_files.py", "--source-bucket", source, "--json")
    assert done.returncode == 0, done.stderr
    manifest = json.loads(done.stdout)
    assert manifest["source"]["skipped"] == ["cold/old-invoice.pdf"] and manifest["source"]["skipped_count"] == 1
    assert manifest["source"]["object_count"] == 2
    assert "cold/old-invoice.pdf is not in this backup: in an archived storage class (GLACIER)" in done.stderr
    assert "Traceback" not in done.stderr
    done = run("verify_backup.py", "--kind", "files", "--latest", env={"GITHUB_ACTIONS": "true"})
    assert done.returncode == 0, done.stderr
    assert "1 objects of the source were skipped" in done.stdout
    assert "::warning::the files backup" in done.stderr


CJK_NAME = "李小龍的文件名" * 17  # 119 characters: 1,071 once percent-encoded


def awkward_uploads() -> dict[str, dict]:
    """What an app's users can store with an ordinary upload (PutObject parameters by key), each
    at or past a bound a naive encoder sets: all of it is within what S3 accepts and returns."""
    encoded_title = "=?UTF-8?B?" + base64.b64encode(("李" * 500).encode()).decode() + "?="  # 1,500 bytes decoded
    return {
        "uploads/long-disposition.pdf": {"ContentType": "application/pdf",
                                         "ContentDisposition": f"attachment; filename*=UTF-8''{quote(CJK_NAME)}"},
        "uploads/long-metadata-name.bin": {"Metadata": {"x-original-" + "n" * 190: "v", "short": "s"}},
        "uploads/metadata-at-2kb.bin": {"Metadata": {"a" * 1000: "b" * 1048}},  # S3's 2 KB, exactly
        "uploads/tab-in-value.txt": {"ContentType": "text/plain", "Metadata": {"note": "before\tafter", "bell": "ding\x07"}},
        "uploads/rfc2047.txt": {"Metadata": {"title": encoded_title}},  # how S3 returns non-ASCII metadata
        "uploads/long-type.bin": {"ContentType": "application/vnd.example+" + "x" * 2000, "CacheControl": "max-age=" + "9" * 1500,
                                  "ContentLanguage": "zh-Hant-TW", "ContentEncoding": "identity"},
        "report.pdf": {"ContentType": "application/pdf"},
        "report.pdf\0.exe": {"ContentType": "application/x-msdownload"},  # S3-compatible stores accept a NUL
    }


def test_awkward_uploads_back_up_verify_and_restore_identical(run, s3server, bucket):
    """Issue 21, item 1: one such upload used to make every files backup unrestorable (the
    reader refused the comment the writer wrote), and a NUL key came back cut to another
    object's name. Every object but the NUL key restores byte- and metadata-identical; the NUL
    key is skipped, named and counted, never truncated."""
    client = s3server.client()
    source = new_bucket(s3server)
    uploads = awkward_uploads()
    for key, parameters in uploads.items():
        client.put_object(Bucket=source, Key=key, Body=f"body of {key}".encode(), **parameters)
    # Another SDK sends UTF-8 in headers where botocore refuses to (metadata) or would not be asked.
    put_raw(s3server.endpoint, source, "uploads/李.pdf", b"%PDF", {
        "Content-Type": b"application/pdf", "Content-Disposition": 'attachment; filename="李小龍.pdf"'.encode(),
        "x-amz-meta-uploaded-by": "Zoë 李".encode()})
    nul_key = "report.pdf\0.exe"

    done = run("backup_files.py", "--source-bucket", source, "--json")
    assert done.returncode == 0, done.stderr
    manifest = json.loads(done.stdout)
    assert manifest["source"]["skipped"] == [nul_key] and manifest["source"]["skipped_count"] == 1
    assert manifest["source"]["object_count"] == len(uploads)  # all the others, and the raw one
    assert "report.pdf\\x00.exe is not in this backup: its key holds a NUL byte" in done.stderr
    assert "Traceback" not in done.stderr

    done = run("verify_backup.py", "--kind", "files", "--latest")
    assert done.returncode == 0, done.stderr
    assert "1 objects of the source were skipped" in done.stdout

    target = new_bucket(s3server, "restored")
    done = run("restore_files.py", "--latest", "--target-bucket", target, "--json")
    assert done.returncode == 0, done.stderr
    expected = heads(client, source)
    del expected[nul_key]
    assert heads(client, target) == expected
    assert client.head_object(Bucket=target, Key="uploads/李.pdf")["Metadata"] == {"uploaded-by": "Zoë 李".encode().decode("latin-1")}

    # A second run finds every object identical: the comparison reads the attributes as S3 returns them.
    done = run("restore_files.py", "--latest", "--target-bucket", target, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["identical"], result["uploaded"]) == (len(expected), 0)


def test_a_file_mimicking_a_zip_descriptor_cannot_make_the_backup_unrestorable(run, s3server, bucket):
    """Anybody who can upload to the app can store a file whose bytes hold a ZIP data descriptor
    (signature, CRC, its own length so far): a checker that found a member's end by scanning
    would cut the member there and refuse the whole backup, every day. Ours reads each member
    by the size the backup wrote for it: the backup verifies and restores byte for byte."""
    client = s3server.client()
    source = new_bucket(s3server)
    prefix = b"%PDF-1.7 uploaded by a user "
    planted = {f"uploads/{i}.pdf": Obj(prefix + sig + struct.pack(layout, crc, len(prefix), len(prefix)) + b"%%EOF",
                                       "application/pdf")
               for i, (sig, layout, crc) in enumerate((sig, layout, crc) for sig in (b"PK\x07\x08", b"\x08\x07KP")
                                                      for layout in ("<LLL", "<LQQ") for crc in (0, zlib.crc32(prefix)))}
    fill(client, source, {**planted, "after.txt": Obj(b"the next member", "text/plain")})
    done = run("backup_files.py", "--source-bucket", source)
    assert done.returncode == 0, done.stderr
    done = run("verify_backup.py", "--kind", "files", "--latest")
    assert done.returncode == 0, done.stderr
    target = new_bucket(s3server, "restored")
    done = run("restore_files.py", "--latest", "--target-bucket", target)
    assert done.returncode == 0, done.stderr
    assert snapshot(client, target) == snapshot(client, source)


# -- 7. database passwords with # / ? never leak -----------------------------------------------
WEIRD_PASSWORD = "p#a/s?s@w:o%rd"


@pytest.fixture(scope="module")
def weird_role(pg, sample_db):
    pg.psql(f"DROP ROLE IF EXISTS weird; CREATE ROLE weird LOGIN SUPERUSER PASSWORD '{WEIRD_PASSWORD}'")
    return "weird"


def test_passwords_with_special_characters_never_appear_in_argv_or_output(run, pg, sample_db, weird_role, tmp_path):
    from urllib.parse import quote

    raw = f"postgresql://weird:{WEIRD_PASSWORD}@127.0.0.1:{pg.port}/{sample_db}"
    summary = tmp_path / "summary.md"
    actions = {"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary)}
    for secret_bit in ("p#a", "s?s"):
        assert secret_bit in raw
    done = run("backup_database.py", env={"DATABASE_URL": raw, **actions})
    assert done.returncode == 2
    assert "percent-encode" in error_lines(done.stderr)[0]
    output = done.stdout + done.stderr + summary.read_text()
    for part in ("p#a", "s?s", "w:o%rd", WEIRD_PASSWORD):
        assert part not in output, output
    done = run("backup_database.py", "--database-url", raw)
    assert done.returncode == 2 and "p#a" not in done.stderr

    spy = SpyBin(tmp_path / "spy", {"pg_dump": str(pg.bin / "pg_dump"), "psql": str(pg.bin / "psql")})
    encoded = f"postgresql://weird:{quote(WEIRD_PASSWORD, safe='')}@127.0.0.1:{pg.port}/{sample_db}"
    spied = Runner({**run.env, "PG_DUMP": spy.path("pg_dump"), "PATH": f"{spy.dir}:{run.env['PATH']}"})
    done = spied("backup_database.py", env={"DATABASE_URL": encoded})
    assert done.returncode == 0, done.stderr
    for record in spy.records():
        assert WEIRD_PASSWORD not in "\0".join(record.argv) and quote(WEIRD_PASSWORD, safe="") not in "\0".join(record.argv)
        if "--version" not in record.argv:
            assert record.env.get("PGPASSWORD") == WEIRD_PASSWORD
    assert WEIRD_PASSWORD not in done.stdout + done.stderr


# -- 9. a backup of one kind in the other's folder ------------------------------------------------
def test_kind_mismatches_are_clear_errors(run, pg, sample_db, s3server, bucket, genuine_dump):
    client = s3server.client()
    files = upload_archive(client, bucket, at(1), zip_of([("a", b"a", ATTRS)]), PASSPHRASE, 1)
    body = client.get_object(Bucket=bucket, Key=files["key"])["Body"].read()
    zip_as_dump = put_with_manifest(client, bucket, f"{ENVIRONMENT}/database/{files['key'].split('/')[-1]}", body, files)
    dump = upload_dump(client, bucket, at(0.5), genuine_dump, PASSPHRASE)
    body = client.get_object(Bucket=bucket, Key=dump["key"])["Body"].read()
    dump_as_files = put_with_manifest(client, bucket, f"{ENVIRONMENT}/files/{at(0.2).strftime('%Y-%m-%d--%H-%M-%S')}.zip.encrypted",
                                      body, {**dump, "kind": "files"})
    listing = run("list_backups.py", "--json", check=True)
    status = {b["key"]: (b["status"], b["problem"]) for b in json.loads(listing.stdout)}
    assert status[zip_as_dump["key"]][0] == "bad manifest"
    assert status[dump_as_files["key"]][0] == "bad manifest"
    for kind, key in (("database", zip_as_dump["key"]), ("files", dump_as_files["key"])):
        done = run("verify_backup.py", "--kind", kind, "--key", key)
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert "FAILED" in done.stdout and "manifest" in done.stdout
    done = run("verify_backup.py", "--kind", "database", "--key", files["key"])
    assert done.returncode == 2 and "is not a database backup" in error_lines(done.stderr)[0]


# -- 10. a compressed plant cannot take memory or hide why it fails ---------------------------------
@pytest.mark.parametrize("stream", [
    pytest.param(ZSTD_MAGIC + bytes([0x00, 0xA8]) + bytes(4 << 20), id="frame-asking-for-a-2-GiB-window"),
    pytest.param(ZSTD_MAGIC + bytes(range(256)) * (16 << 10), id="garbage-after-the-magic"),
])
def test_a_compressed_plant_that_does_not_decompress(run, pg, scratch_db, tmp_path, stream):
    """A writer with the passphrase plants a `.sql.zst.encrypted` whose zstd stream asks for a
    2 GiB window, or is garbage: 4 MiB of it, so openssl is still writing when zstd gives up.
    decrypt.py and the restore name the decompression (not a wrong passphrase), leave no output
    and commit nothing, and the window is never allocated."""
    planted = tmp_path / "2026-01-01--00-00-00.sql.zst.encrypted"
    planted.write_bytes(openssl_encrypt(stream, PASSPHRASE))
    out = tmp_path / "out"
    out.mkdir()
    done, memory = run.measured("./decrypt.py", "-i", str(planted), "-o", str(out / "db.sql"), interval=0.02, timeout=60)
    assert done.returncode == 1
    one_error(done, "does not decompress", "zstd")
    assert list(out.iterdir()) == []
    assert memory.peak_tree_kib < 100 * 1024, memory.peak_tree_kib

    done, memory = run.measured("restore_database.py", "--file", str(planted), "--without-manifest",
                                "--target-database-url", pg.url(scratch_db), interval=0.02, timeout=60)
    assert done.returncode == 1
    one_error(done, "decompression failed", "zstd")
    assert public_tables(pg, scratch_db) == "0"
    assert memory.peak_tree_kib < 100 * 1024, memory.peak_tree_kib


# -- 11. bad input ends in one error line, never "unexpected failure" ------------------------------


def test_manifest_json_nested_too_deep_is_a_bad_manifest(run, pg, sample_db, s3server, bucket, genuine_dump):
    genuine = database_backup(run, pg=pg, started_at=at(1))
    key = backup_key(ENVIRONMENT, "database", at(0))
    s3server.client().put_object(Bucket=bucket, Key=key, Body=openssl_encrypt(genuine_dump, PASSPHRASE))
    s3server.client().put_object(Bucket=bucket, Key=key + ".manifest.json", Body=b"[" * 100_000 + b"]" * 100_000)
    done = run("list_backups.py", "--json", "--kind", "database")
    assert done.returncode == 0, done.stderr
    assert {b["key"]: b["status"] for b in json.loads(done.stdout)} == {key: "bad manifest", genuine["key"]: "complete"}


# -- 12. a key alone does not name a backup: a writer can add a version to it at any time ------------
def test_a_planted_newer_version_of_a_key_is_never_used_without_its_version_id(run, pg, sample_db, scratch_db, s3server,
                                                                                bucket, tmp_path):
    """The writer copies a newer genuine backup (it verifies: the worst case) as a new version of an
    older backup's key: `--key OLDER`, the runbook's point-in-time restore, would take it."""
    client = s3server.client()
    older = database_backup(run, pg=pg, started_at=at(2))
    newer = database_backup(run, pg=pg, started_at=at(1))
    body = client.get_object(Bucket=bucket, Key=newer["key"])["Body"].read()
    planted = put_with_manifest(client, bucket, older["key"], body, newer)
    file_name = older["key"].rsplit("/", 1)[1]

    def refused(done) -> None:
        assert done.returncode == 1, done.stdout + done.stderr
        line = one_error(done, "2 versions", "--version-id")
        assert older["version_id"] in line and planted["version_id"] in line and "complete" in line
        assert line.index(planted["version_id"]) < line.index(older["version_id"])  # newest first, with when S3 stored it

    refused(run("restore_database.py", "--key", file_name, "--target-database-url", pg.url(scratch_db)))
    assert public_tables(pg, scratch_db) == "0"
    refused(run("verify_backup.py", "--kind", "database", "--key", older["key"]))
    out = tmp_path / "fetched.encrypted"
    refused(run("fetch_backup.py", "--kind", "database", "--key", older["key"], "--out", str(out)))
    assert list(tmp_path.iterdir()) == []

    # Named with its version, the genuine one restores; the plant is only ever taken on purpose.
    done = run("restore_database.py", "--key", older["key"], "--version-id", older["version_id"],
               "--target-database-url", pg.url(scratch_db), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["version_id"] == older["version_id"]
    done = run("fetch_backup.py", "--kind", "database", "--key", older["key"], "--version-id", planted["version_id"],
               "--out", str(out), "--json")
    assert json.loads(done.stdout)["version_id"] == planted["version_id"]


def test_a_planted_newer_version_of_a_files_backup_is_never_restored_without_its_version_id(run, s3server, bucket):
    client = s3server.client()
    genuine = upload_archive(client, bucket, at(2), zip_of([("a.txt", b"genuine", ATTRS)]), PASSPHRASE, 1)
    other = upload_archive(client, bucket, at(1), zip_of([("a.txt", b"planted", ATTRS)]), PASSPHRASE, 1)
    body = client.get_object(Bucket=bucket, Key=other["key"])["Body"].read()
    planted = put_with_manifest(client, bucket, genuine["key"], body, other)
    target = new_bucket(s3server)
    done = run("restore_files.py", "--key", genuine["key"], "--target-bucket", target)
    assert done.returncode == 1
    line = one_error(done, "2 versions", "--version-id")
    assert genuine["version_id"] in line and planted["version_id"] in line
    assert snapshot(client, target) == {}
    done = run("restore_files.py", "--key", genuine["key"], "--version-id", genuine["version_id"], "--target-bucket", target)
    assert done.returncode == 0, done.stderr
    assert client.get_object(Bucket=target, Key="a.txt")["Body"].read() == b"genuine"


# -- 13. a backup S3 will not hand over (an archived storage class) is skipped, never a dead end ---------
def plant_archived(client, bucket: str, started_at, dump: bytes, storage_class: str = "GLACIER") -> dict:
    """A consistent planted dump (valid manifest, right size and hashes) stored in an archived class."""
    from backupkit import crypto
    from backupkit.manifest import build_manifest, write_manifest
    from tests.backup_factory import sha256

    body = openssl_encrypt(dump, PASSPHRASE)
    key = backup_key(ENVIRONMENT, "database", started_at)
    version = client.put_object(Bucket=bucket, Key=key, Body=body, StorageClass=storage_class,
                                ChecksumAlgorithm="CRC32")["VersionId"]
    manifest = build_manifest(kind="database", environment=ENVIRONMENT, key=key, version_id=version, started_at=started_at,
                              completed_at=started_at, key_id=crypto.key_id(PASSPHRASE), encrypted_size=len(body),
                              encrypted_sha256=sha256(body), plaintext_size=len(dump), plaintext_sha256=sha256(dump),
                              source={"database": "app", "server_version": "?", "pg_dump_version": "?"})
    write_manifest(client, bucket, manifest)
    return manifest


def test_an_archived_newest_plant_is_skipped_by_every_reader(run, pg, sample_db, scratch_db, s3server, bucket, genuine_dump,
                                                              tmp_path):
    from tests.faultproxy import FaultProxy

    genuine = database_backup(run, pg=pg, started_at=at(2))
    client = s3server.client()
    planted = plant_archived(client, bucket, at(1), genuine_dump)
    file_name = planted["key"].rsplit("/", 1)[1]

    listed = {b["key"]: b for b in json.loads(run("list_backups.py", "--kind", "database", "--json", check=True).stdout)}
    assert listed[planted["key"]]["status"] == "unreadable" and "GLACIER" in listed[planted["key"]]["problem"]
    assert listed[planted["key"]]["complete"] and listed[genuine["key"]]["status"] == "complete"

    # --latest: skipped as data, before any GET of it (its manifest included), and the older one used.
    with FaultProxy(s3server.endpoint) as proxy:
        done = run("verify_backup.py", "--kind", "database", "--latest", "--json", env={"AWS_ENDPOINT_URL": proxy.endpoint})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["results"][0]["key"] == genuine["key"]
    assert [(s["key"], s["problem"]) for s in report["skipped"]] == [(planted["key"], "unreadable")]
    assert "GLACIER" in report["skipped"][0]["reason"]
    assert not [path for op, path in proxy.paths if op == "GetObject" and file_name in path]

    done = run("fetch_backup.py", "--kind", "database", "--latest", "--out", str(tmp_path / "latest.encrypted"), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["key"] == genuine["key"]

    done = run("restore_database.py", "--latest", "--target-database-url", pg.url(scratch_db), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["key"] == genuine["key"]
    assert table_fingerprint(pg, scratch_db, "applications") == table_fingerprint(pg, sample_db, "applications")

    # The daily drill: the same, restored into its scratch database.
    pg.drop_database(scratch_db)
    pg.create_database(scratch_db)
    done = run("verify_backup.py", "--kind", "database", "--latest", "--restore-into", pg.url(scratch_db))
    assert done.returncode == 0, done.stderr
    assert f"SKIPPED {planted['key']}" in done.stdout and f"OK      {genuine['key']}" in done.stdout

    # --since verifies every backup of the window: the genuine one OK, the plant FAILED as unreadable
    # (a backup that cannot be read back fails the check), and nothing stops at the plant.
    done = run("verify_backup.py", "--kind", "database", "--since", "1d")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    lines = done.stdout.splitlines()
    assert f"OK      {genuine['key']}" in "\n".join(lines)
    assert any(line.startswith(f"FAILED  {planted['key']}") and "GLACIER" in line for line in lines)

    # Named on purpose, it is tried, and S3's refusal is explained with what to do.
    done = run("verify_backup.py", "--kind", "database", "--key", planted["key"])
    assert done.returncode == 1
    assert "InvalidObjectState" in done.stdout and "restore it from the archive first" in done.stdout


# -- 14. planted objects cost a listing entry each, never a download, a line, or a HEAD -------------
def plant_flood(client, bucket: str, incomplete: int, bad_pairs: int, newest: float = 0.01) -> None:
    """`incomplete` backup objects without a manifest and `bad_pairs` objects with a manifest that
    is not valid, named one second apart up to `newest` hours ago (plausible names: not suspicious),
    stored after everything before: newer than any genuine backup, so --latest meets them first."""
    from concurrent.futures import ThreadPoolExecutor
    from datetime import timedelta

    start = at(newest) - timedelta(seconds=incomplete + bad_pairs)

    def put(i: int) -> None:
        key = backup_key(ENVIRONMENT, "database", start + timedelta(seconds=i))
        client.put_object(Bucket=bucket, Key=key, Body=b"Salted__planted!")
        if i >= incomplete:
            client.put_object(Bucket=bucket, Key=key + ".manifest.json", Body=b'{"planted": true}')

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(put, range(incomplete + bad_pairs)))


def test_a_flood_of_plants_is_summarised_not_listed_line_by_line(run, pg, sample_db, s3server, bucket, tmp_path):
    genuine = database_backup(run, pg=pg, started_at=at(1))
    plant_flood(s3server.client(), bucket, incomplete=30, bad_pairs=12)

    done = run("verify_backup.py", "--kind", "database", "--latest")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len([line for line in lines if line.startswith("SKIPPED")]) == 11, lines  # 10 named, then counted
    assert "SKIPPED 32 more: " in done.stdout and "incomplete" in lines[10] and "bad manifest" in lines[10]
    assert lines[-1].startswith(f"OK      {genuine['key']}")
    assert len([line for line in done.stderr.splitlines() if line.startswith("skipped ")]) == 11

    done = run("fetch_backup.py", "--kind", "database", "--latest", "--out", str(tmp_path / "latest"), "--json", check=True)
    result = json.loads(done.stdout)
    assert result["key"] == genuine["key"] and len(result["skipped"]) == 10 and result["skipped_count"] == 42

    # The listing shows every usable backup and the newest 5 of each problem, and counts the rest.
    listing = run("list_backups.py", "--kind", "database", check=True).stdout
    rows = [line for line in listing.splitlines() if line.startswith("20")]
    assert len(rows) == 11 and genuine["key"] in rows[-1]
    assert "note: 32 more versions not shown (25 incomplete, 7 bad manifest): of each problem the newest 5 are above" in listing
    assert len(json.loads(run("list_backups.py", "--kind", "database", "--json", "--all", check=True).stdout)) == 43


@pytest.mark.slow
def test_twenty_thousand_planted_objects_leave_listings_and_latest_bounded(run, pg, sample_db, s3server, bucket, tmp_path):
    """20,000 planted objects, all stored after the one genuine backup: 15,000 backups without a
    manifest and 2,500 with a manifest that is not valid. Listing them is the floor: moto copies
    every version of the bucket for each page of 1,000, so its own listing takes tens of seconds
    here (an AWS listing is ~0.1-0.3 s a page). What the scripts add on top must stay small: no
    download, no HEAD and no line per plant, one manifest GET per planted manifest at most.

    Measured with this flood on the shared 2-core development machine (moto in the test process;
    a script that lists nothing peaks at 52 MiB; times vary with the load, so the bounds below are
    relative to one listing measured in the same run):
                              before (one listing: 42 s)        after (one listing: 48 s)
      list_backups            104 s, 115 MiB, 35,002 lines      55 s, 73 MiB, 24 lines
      list_backups --max-age   56 s, 104 MiB, 35,003 lines      50 s, 72 MiB, 25 lines
      verify --latest          53 s,  94 MiB, 34,982 lines      54 s, 73 MiB, 24 lines
      fetch --latest           74 s,  86 MiB, 17,492 lines      56 s, 72 MiB, 13 lines
    Before, every version was HEADed and every manifest read; after, a script costs one listing
    plus one GET per planted manifest newer than the answer (2,500 here) and a HEAD per row shown.
    """
    import time

    from tests.conftest import versions

    genuine = database_backup(run, pg=pg, started_at=at(0.5))
    client = s3server.client()
    plant_flood(client, bucket, incomplete=15_000, bad_pairs=2_500)
    began = time.monotonic()
    # and the genuine backup's manifest and profile
    assert len(versions(client, bucket, f"{ENVIRONMENT}/database/")) == 20_003
    floor = time.monotonic() - began  # moto's own cost of one full listing

    figures = {}

    def measured(name: str, *args: str):
        began = time.monotonic()
        done, memory = run.measured(*args, interval=0.05, timeout=900)
        figures[name] = (time.monotonic() - began, memory.peak_process_kib / 1024)
        print(f"{name}: {figures[name][0]:.1f} s, peak {figures[name][1]:.0f} MiB (one listing: {floor:.1f} s)")
        assert len(done.stdout) + len(done.stderr) < 20_000, done.stdout + done.stderr  # no line per plant
        return done

    done = measured("list_backups", "list_backups.py", "--kind", "database")
    assert done.returncode == 0, done.stderr
    assert "note: 17,490 more versions not shown (14,995 incomplete, 2,495 bad manifest)" in done.stdout
    done = measured("list_backups --max-age", "list_backups.py", "--kind", "database", "--max-age", "2h", "--no-retention")
    assert done.returncode == 0 and f"fresh: database: newest usable backup {genuine['key']}" in done.stderr
    done = measured("verify --latest", "verify_backup.py", "--kind", "database", "--latest", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    # (the plants stored in the genuine backup's second, with older names, sort after it)
    assert report["results"][0]["key"] == genuine["key"] and 17_000 < report["skipped_count"] <= 17_500
    done = measured("fetch --latest", "fetch_backup.py", "--kind", "database", "--latest", "--out", str(tmp_path / "b"))
    assert done.returncode == 0, done.stderr

    for name, (seconds, mib) in figures.items():
        assert mib < 100, f"{name}: peak {mib:.0f} MiB"
        assert seconds < 2 * floor + 60, f"{name}: {seconds:.0f} s against {floor:.0f} s for one listing"
