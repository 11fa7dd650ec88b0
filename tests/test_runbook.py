"""Every ```bash block of runbook.md, run in order in one shell against a real PostgreSQL and an
S3 server that enforces IAM, as an operator would paste them during an incident: the read-only
identity for the external bucket, another for the app's files, the app's own role (not a
superuser) for every restore and an admin role only to create the databases."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from dev.harness import REPO, create_sample_database, table_fingerprint
from tests.conftest import APP_PASSWORD, APP_ROLE, PASSPHRASE, app_role, base_env
from tests.docblocks import bash_blocks
from tests.iam_helpers import IamS3Server

SET_BY_TEST = "the test sets these variables itself"
REAL_AWS = "needs real AWS"
LOSS_WALK = "the loss alarm walk"  # section 4's "When the loss alarm fires": its own walk, after a loss
# The one line of the runbook an operator edits (2.3: the time to go back to); the walk sets it
# between its two backups, so the chosen backup is not the newest.
EXAMPLE_WHEN = "WHEN=2026-11-29T09:00:00Z"
EXTERNAL = "runbook-external-backups"
APP_FILES = "runbook-app-files"
RESTORED_FILES = "runbook-restored-files"  # the runbook creates it


def variables_set_by(body: str) -> set[str]:
    return set(re.findall(r"export (\w+)=", body)) | set(re.findall(r"read -rsp '[^']*' (\w+)", body))


def test_runbook_blocks_are_marked_only_as_allowed():
    found = bash_blocks(REPO / "runbook.md")
    assert len(found) > 15
    assert all(m in (SET_BY_TEST, None) or m.startswith((REAL_AWS, LOSS_WALK)) for m, _ in found)
    assert sum(1 for m, _ in found if m and m.startswith(LOSS_WALK)) >= 4
    assert sum(1 for m, _ in found if m == SET_BY_TEST) == 1
    for _, body in found:
        assert "pass:" not in body and "PGPASSWORD=" not in body and " -p " not in body.replace("read -rsp", "")
    assert sum(body.count(EXAMPLE_WHEN) for _, body in found) == 1


@pytest.fixture(scope="session")
def bare_python(tmp_path_factory):
    """A python3 with nothing but the standard library, as on a fresh machine: the runbook's
    first block installs requirements.txt into the checkout's .venv, and the scripts find it."""
    bare = tmp_path_factory.mktemp("bare-python")
    subprocess.run([sys.executable, "-m", "venv", str(bare)], check=True)
    lacking = subprocess.run([str(bare / "bin" / "python3"), "-c", "import boto3"], capture_output=True)
    assert lacking.returncode != 0, "the bare python must not have boto3"
    return bare / "bin"


@pytest.fixture(scope="module")
def iam_server():
    server = IamS3Server().start()
    yield server
    server.stop()


def files_writer_policy(bucket: str) -> dict:
    """The app's account's identity for restored files: create, list, read and write one bucket."""
    return {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow",
        "Action": ["s3:CreateBucket", "s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload"],
        "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}


@pytest.fixture
def incident(pg, iam_server, tmp_path, bare_python):
    """Backups exist in the external bucket (two of the database, the newest after a change); the
    app's database and files are gone. The checkout is a bare clone: only what git tracks, no
    .venv, and python3 has no packages. The operator holds the read-only keys (section 1), a
    profile for the app's files, the app role's password and, for psql to find, the admin's."""
    work = tmp_path / "checkout"
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in listed + ["runbook.md", "scripts/restore_files.py", "scripts/backup_files.py"]:
        if (REPO / name).is_file():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, work / name)
    printed = subprocess.run([sys.executable, "scripts/setup_bucket.py", "--bucket", EXTERNAL, "--print-policies"],
                             cwd=work, env=base_env(), capture_output=True, text=True, check=True)
    reader = iam_server.user(f"reader-{os.getpid()}", json.loads(printed.stdout)["read_only"])
    files_writer = iam_server.user(f"files-writer-{os.getpid()}", files_writer_policy(RESTORED_FILES))
    admin = iam_server.admin
    env = {
        **base_env(), **admin.env(),
        "BACKUP_BUCKET": EXTERNAL, "BACKUP_ENVIRONMENT": "production", "BACKUP_ALLOW_PLAIN_HTTP": "1",
        "EXTERNAL_BACKUP_ENCRYPTION_KEY": PASSPHRASE, "PGPASSWORD": pg.password,
        "PATH": f"{pg.bin}:{base_env()['PATH']}",
        "REPLACE": "yes",  # the walk restores every section into one target: 2.4's by hand over 2.1's, as 2.2 does
    }
    env.pop("PYTHONPATH", None)

    def setup(*argv: str) -> dict:
        done = subprocess.run([sys.executable, *argv, "--json"], cwd=work, env=env, check=True, capture_output=True, text=True)
        return json.loads(done.stdout)

    setup("scripts/setup_bucket.py", "--bucket", EXTERNAL, "--apply")
    source = create_sample_database(pg, "runbook_app", rows=300)
    older = setup("scripts/backup_database.py", "--database-url", source)
    pg.psql("INSERT INTO admin_user (email) VALUES ('second-admin@example.org')", "runbook_app")
    started = datetime.fromisoformat(older["started_at"])
    while datetime.now(started.tzinfo) < started + timedelta(seconds=1):  # the newer one starts in a later second
        time.sleep(0.05)
    setup("scripts/backup_database.py", "--database-url", source)
    client = admin.client()
    client.create_bucket(Bucket=APP_FILES)
    client.put_object(Bucket=APP_FILES, Key="invoices/2026/0001.pdf", Body=b"%PDF-1.7 invoice", ContentType="application/pdf")
    client.put_object(Bucket=APP_FILES, Key="avatars/zoë.png", Body=b"\x89PNG avatar", ContentType="image/png",
                      Metadata={"owner": "42"})
    has_files = (work / "scripts/backup_files.py").exists()
    if has_files:
        setup("scripts/backup_files.py", "--source-bucket", APP_FILES)
    for name in ("runbook_target", "runbook_drill"):  # the runbook creates them
        pg.drop_database(name)
    app_role(pg)  # the app's own role: logs in, neither a superuser nor allowed to create databases
    pgpass = tmp_path / "admin.pgpass"  # what psql asks an operator for, at a terminal
    pgpass.write_text(f"127.0.0.1:{pg.port}:*:{pg.user}:{pg.password}\n")
    pgpass.chmod(0o600)
    profiles = tmp_path / "aws-credentials"
    profiles.write_text("".join(f"[{name}]\naws_access_key_id = {user.access_key_id}\n"
                                f"aws_secret_access_key = {user.secret_access_key}\n\n"
                                for name, user in (("external-backups-readonly", reader), ("app-files-writer", files_writer))))
    env.update({
        **reader.env(),  # section 1 with the read-only keys, not a profile: section 3 must unset them to switch
        "AWS_SHARED_CREDENTIALS_FILE": str(profiles), "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "PATH": f"{bare_python}:{pg.bin}:/usr/local/bin:/usr/bin:/bin",
        "APP_ROLE": APP_ROLE,
        "PGPASSWORD": APP_PASSWORD, "PGPASSFILE": str(pgpass),
        "TARGET_DATABASE_URL": f"postgresql://{APP_ROLE}@127.0.0.1:{pg.port}/runbook_target",
        "SCRATCH_DATABASE_URL": f"postgresql://{APP_ROLE}@127.0.0.1:{pg.port}/runbook_drill",
        "ADMIN_DATABASE_URL": pg.url("postgres", password=False),
        "TARGET_BUCKET": RESTORED_FILES,
        "APP_DATABASE_URL": f"postgresql://{APP_ROLE}@127.0.0.1:{pg.port}/runbook_app",  # the loss walk's (not used here)
        "HELD_DATABASE_URL": f"postgresql://{APP_ROLE}@127.0.0.1:{pg.port}/runbook_loss_held",
    })
    yield work, env, has_files, older, {"reader": reader, "files_writer": files_writer}
    for name in ("runbook_app", "runbook_target", "runbook_drill"):
        pg.drop_database(name)


def test_runbook_restores_database_and_files(incident, pg, iam_server):
    work, env, has_files, older, users = incident
    assert "BACKUP_ALLOW_SUPERUSER" not in env
    found = bash_blocks(work / "runbook.md")
    script = ["set -euo pipefail"]
    skipped = []
    for number, (marker, body) in enumerate(found, 1):
        if marker == SET_BY_TEST:
            missing = variables_set_by(body) - set(env) - {"AWS_PROFILE"}
            assert not missing, f"the runbook introduces variables the test does not set: {missing}"
            continue
        if marker and marker.startswith(REAL_AWS):
            skipped.append(number)
            continue
        if marker and marker.startswith(LOSS_WALK):
            continue  # test_runbook_loss_alarm_walk
        if not has_files and ("restore_files.py" in body or "--kind files" in body):
            pytest.fail("scripts/backup_files.py and restore_files.py are needed by the runbook")
        body = body.replace(EXAMPLE_WHEN, f"WHEN={older['started_at']}")  # the operator's edit
        script.append(f"echo '=== runbook block {number}' >&2\n{body}")
    done = subprocess.run(["bash", "-c", "\n".join(script)], cwd=work, env=env, capture_output=True, text=True,
                          timeout=900, stdin=subprocess.DEVNULL, start_new_session=True)
    last_block = [line for line in done.stderr.splitlines() if line.startswith("=== runbook block")][-1:]
    assert done.returncode == 0, f"failed in {last_block}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    print(f"\nran {len(found) - len(skipped) - 1} runbook blocks; skipped {len(skipped)} needing real AWS: {skipped}")

    for table in ("applications", "admin_user"):
        assert table_fingerprint(pg, "runbook_target", table) == table_fingerprint(pg, "runbook_app", table)
    assert "psql: restore committed" in done.stdout and "plaintext copies removed" in done.stdout
    assert "PASS" in done.stdout and "FAIL" not in done.stdout.replace("FAILED", "")
    assert not list(work.glob("*.sql")) and not list(work.glob("files*.zip*"))
    assert (work / ".venv" / "bin" / "python").exists()  # made by the runbook's first block, and used by the scripts
    secrets = (PASSPHRASE, pg.password, APP_PASSWORD, users["reader"].secret_access_key, users["files_writer"].secret_access_key)
    assert not [s for s in secrets if s in done.stdout + done.stderr]

    # The databases were created by the admin role, owned by the app's, and every restore ran as
    # the app's role, which is not a superuser (nothing was allowed past the refusal).
    owners = pg.psql("SELECT string_agg(pg_get_userbyid(datdba), ',' ORDER BY datname) FROM pg_database "
                     "WHERE datname IN ('runbook_target', 'runbook_drill')")
    assert owners == f"{APP_ROLE},{APP_ROLE}"
    assert re.search(rf"^ {APP_ROLE} +\| f +\| {APP_ROLE}$", done.stdout, re.M), done.stdout
    assert "superuser" not in done.stderr and "permission denied" not in done.stderr
    assert pg.psql("SELECT string_agg(DISTINCT tableowner, ',') FROM pg_tables WHERE schemaname = 'public'",
                   "runbook_target") == APP_ROLE

    # 2.3 chose the backup WHEN names, the older one, not the newest.
    chosen = f"{older['key']} version {older['version_id']}"
    assert f"chosen: {chosen}" in done.stdout
    assert f"restored s3://{EXTERNAL}/{older['key']} (version {older['version_id']})" in done.stdout
    assert done.stdout.count(f"(version {older['version_id']})") == 1, "only 2.3 restores the older backup"

    # Section 3 created the target bucket and restored into it as the app's files identity: the
    # read-only keys of section 1 may not write there, so the switch (keys unset first) took.
    assert f"created s3://{RESTORED_FILES}" in done.stdout
    assert "warning: AWS_PROFILE" not in done.stderr
    restored = iam_server.admin.client().list_objects_v2(Bucket=RESTORED_FILES).get("Contents", [])
    assert {o["Key"] for o in restored} == {"invoices/2026/0001.pdf", "avatars/zoë.png"}
    denied = subprocess.run([sys.executable, "-c", "import boto3, sys; boto3.client('s3').put_object("
                             f"Bucket='{RESTORED_FILES}', Key='x', Body=b'x')"],
                            env={**base_env(), **users["reader"].env()}, capture_output=True, text=True)
    assert denied.returncode != 0 and "AccessDenied" in denied.stderr


INVOICES = 500


def test_runbook_loss_alarm_walk(pg, iam_server, tmp_path):
    """Section 4, "When the loss alarm fires", run as an operator would after the hourly check's
    alarm: a housekeeping job deleted 90% of public.invoices between two backups, the check (as the
    holder) held the backup before it. The walk reads the comparison, restores the held backup
    beside production, copies the missing rows back into production and releases the hold."""
    bucket = f"runbook-loss-{os.getpid()}"
    printed = json.loads(subprocess.run([sys.executable, "scripts/setup_bucket.py", "--bucket", bucket, "--print-policies"],
                                        cwd=REPO, env=base_env(), capture_output=True, text=True, check=True).stdout)
    reader = iam_server.user(f"loss-reader-{os.getpid()}", printed["read_only"])
    holder = iam_server.user(f"loss-holder-{os.getpid()}", printed["holder"])
    admin = iam_server.admin
    app_role(pg)
    production, held_db = "runbook_loss_app", "runbook_loss_held"
    for name in (production, held_db):
        pg.drop_database(name)
    pg.psql(f'CREATE DATABASE "{production}" OWNER {APP_ROLE}')
    pg.psql(f"SET ROLE {APP_ROLE}; CREATE TABLE invoices (id int PRIMARY KEY, customer text, amount numeric); "
            f"INSERT INTO invoices SELECT i, 'Zoë ' || i, i * 1.25 FROM generate_series(1, {INVOICES}) AS i", production)
    before = table_fingerprint(pg, production, "invoices")
    env = {**base_env(), **admin.env(), "BACKUP_BUCKET": bucket, "BACKUP_ENVIRONMENT": "production",
           "BACKUP_ALLOW_PLAIN_HTTP": "1", "EXTERNAL_BACKUP_ENCRYPTION_KEY": PASSPHRASE, "PGPASSWORD": pg.password}

    def script(*argv: str, user=None, check=True, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *argv], cwd=REPO, env={**env, **(user.env() if user else {}), **extra},
                              check=check, capture_output=True, text=True)

    script("scripts/setup_bucket.py", "--bucket", bucket, "--apply")
    for hours_ago in (2, 1):  # the hourly backups, before and after the housekeeping job's mistake
        started = (datetime.now().astimezone() - timedelta(hours=hours_ago)).strftime("%Y-%m-%dT%H:%M:%S%z")
        script("scripts/backup_database.py", "--database-url", pg.url(production), EXTERNAL_BACKUPS_NOW=started)
        pg.psql("DELETE FROM invoices WHERE id % 10 <> 0", production)
    alarm = script("scripts/compare_backups.py", "--kind", "database", "--hold", user=holder, check=False)
    assert alarm.returncode == 1 and "public.invoices holds 50 rows" in alarm.stderr, alarm.stderr

    profiles = tmp_path / "aws-credentials"
    profiles.write_text("".join(f"[{name}]\naws_access_key_id = {user.access_key_id}\n"
                                f"aws_secret_access_key = {user.secret_access_key}\n\n"
                                for name, user in (("external-backups-readonly", reader), ("external-backups-holder", holder))))
    pgpass = tmp_path / "admin.pgpass"
    pgpass.write_text(f"127.0.0.1:{pg.port}:*:{pg.user}:{pg.password}\n")
    pgpass.chmod(0o600)
    walk_env = {
        **base_env(), "BACKUP_BUCKET": bucket, "BACKUP_ENVIRONMENT": "production", "EXTERNAL_BACKUP_ENCRYPTION_KEY": PASSPHRASE,
        # After section 3: the read-only identity by its profile, no keys in the environment.
        "AWS_PROFILE": "external-backups-readonly", "AWS_SHARED_CREDENTIALS_FILE": str(profiles),
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"), "AWS_ENDPOINT_URL": iam_server.endpoint, "AWS_REGION": "us-east-1",
        "PATH": f"{Path(sys.executable).parent}:{pg.bin}:/usr/local/bin:/usr/bin:/bin",
        "APP_ROLE": APP_ROLE, "PGPASSWORD": APP_PASSWORD, "PGPASSFILE": str(pgpass),
        "ADMIN_DATABASE_URL": pg.url("postgres", password=False),
        "APP_DATABASE_URL": f"postgresql://{APP_ROLE}@127.0.0.1:{pg.port}/{production}",
        "HELD_DATABASE_URL": f"postgresql://{APP_ROLE}@127.0.0.1:{pg.port}/{held_db}",
    }
    walk_env.pop("PYTHONPATH", None)
    blocks = [body for marker, body in bash_blocks(REPO / "runbook.md") if marker and marker.startswith(LOSS_WALK)]
    work = tmp_path / "work"
    work.mkdir()
    (work / "scripts").symlink_to(REPO / "scripts")
    try:
        done = subprocess.run(["bash", "-c", "\n".join(["set -euo pipefail", *blocks])], cwd=work, env=walk_env,
                              capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        assert "LOSS: table public.invoices holds 50 rows" in done.stdout
        assert "missing_from_production" in done.stdout and "450" in done.stdout and "INSERT 0 450" in done.stdout
        assert table_fingerprint(pg, production, "invoices") == before  # the lost rows are back, nothing else changed
        assert done.stdout.count("RELEASED: ") == 3
        assert alarm.stdout.count("HELD: ") == 3
        client = holder.client()
        for line in done.stdout.splitlines():
            if line.startswith("RELEASED: "):
                key, _, version = line.partition(f"s3://{bucket}/")[2].partition(" version ")
                assert client.get_object_legal_hold(Bucket=bucket, Key=key, VersionId=version)["LegalHold"]["Status"] == "OFF"
        assert not list(work.glob("held-rows.csv")) and not list(work.glob("loss.json"))
        assert pg.psql(f"SELECT count(*) FROM pg_database WHERE datname = '{held_db}'") == "0"
        assert PASSPHRASE not in done.stdout + done.stderr and APP_PASSWORD not in done.stdout + done.stderr
    finally:
        for name in (production, held_db):
            pg.drop_database(name)
