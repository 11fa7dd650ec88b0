"""Every ```bash block of runbook.md, run in order in one shell against a real PostgreSQL and the
S3 server, as an operator would paste them during an incident."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from dev.harness import REPO, create_sample_database, table_fingerprint
from tests.conftest import PASSPHRASE, base_env
from tests.docblocks import bash_blocks

SET_BY_TEST = "the test sets these variables itself"
REAL_AWS = "needs real AWS"


def variables_set_by(body: str) -> set[str]:
    return set(re.findall(r"export (\w+)=", body)) | set(re.findall(r"read -rsp '[^']*' (\w+)", body))


def test_runbook_blocks_are_marked_only_as_allowed():
    found = bash_blocks(REPO / "runbook.md")
    assert len(found) > 15
    assert all(m in (SET_BY_TEST, None) or m.startswith(REAL_AWS) for m, _ in found)
    assert sum(1 for m, _ in found if m == SET_BY_TEST) == 1
    for _, body in found:
        assert "pass:" not in body and "PGPASSWORD=" not in body and " -p " not in body.replace("read -rsp", "")


@pytest.fixture(scope="session")
def bare_python(tmp_path_factory):
    """A python3 with nothing but the standard library, as on a fresh machine: the runbook's
    first block installs requirements.txt into the checkout's .venv, and the scripts find it."""
    bare = tmp_path_factory.mktemp("bare-python")
    subprocess.run([sys.executable, "-m", "venv", str(bare)], check=True)
    lacking = subprocess.run([str(bare / "bin" / "python3"), "-c", "import boto3"], capture_output=True)
    assert lacking.returncode != 0, "the bare python must not have boto3"
    return bare / "bin"


@pytest.fixture
def incident(pg, s3server, tmp_path, bare_python):
    """Backups exist in the external bucket; the app's database and files are gone. The checkout is
    a bare clone: only what git tracks, no .venv, and python3 has no packages."""
    work = tmp_path / "checkout"
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in listed + ["runbook.md", "scripts/restore_files.py", "scripts/backup_files.py"]:
        if (REPO / name).is_file():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, work / name)
    bucket = "runbook-external-backups"
    env = {
        **base_env(), **s3server.env(),
        "BACKUP_BUCKET": bucket, "BACKUP_ENVIRONMENT": "production", "BACKUP_ALLOW_PLAIN_HTTP": "1",
        "EXTERNAL_BACKUP_ENCRYPTION_KEY": PASSPHRASE, "PGPASSWORD": pg.password,
        "PATH": f"{pg.bin}:{base_env()['PATH']}",
        "BACKUP_ALLOW_SUPERUSER": "1",  # the test cluster's role is its superuser; the runbook asks for the app's own
        "REPLACE": "yes",  # the walk restores every section into one target: 2.4's by hand over 2.1's, as 2.2 does
    }
    runbook_path = f"{bare_python}:{pg.bin}:/usr/local/bin:/usr/bin:/bin"
    env.pop("PYTHONPATH", None)
    script = [sys.executable]
    subprocess.run([*script, "scripts/setup_bucket.py", "--bucket", bucket, "--apply"], cwd=work, env=env, check=True,
                   capture_output=True)
    source = create_sample_database(pg, "runbook_app", rows=300)
    subprocess.run([*script, "scripts/backup_database.py", "--database-url", source], cwd=work, env=env, check=True,
                   capture_output=True)
    app_files = s3server.create_bucket("runbook-app-files", object_lock=False)
    client = s3server.client()
    client.put_object(Bucket=app_files, Key="invoices/2026/0001.pdf", Body=b"%PDF-1.7 invoice", ContentType="application/pdf")
    client.put_object(Bucket=app_files, Key="avatars/zoë.png", Body=b"\x89PNG avatar", ContentType="image/png",
                      Metadata={"owner": "42"})
    has_files = (work / "scripts/backup_files.py").exists()
    if has_files:
        subprocess.run([*script, "scripts/backup_files.py", "--source-bucket", app_files], cwd=work, env=env, check=True,
                       capture_output=True)
    for name in ("runbook_target", "runbook_drill"):  # the runbook creates them
        pg.drop_database(name)
    s3server.create_bucket("runbook-restored-files", object_lock=False)
    env.update({
        "PATH": runbook_path,
        "TARGET_DATABASE_URL": pg.url("runbook_target", password=False),  # the password is in PGPASSWORD
        "SCRATCH_DATABASE_URL": pg.url("runbook_drill", password=False),
        "TARGET_BUCKET": "runbook-restored-files",
    })
    yield work, env, has_files
    for name in ("runbook_app", "runbook_target", "runbook_drill"):
        pg.drop_database(name)


def test_runbook_restores_database_and_files(incident, pg, s3server):
    work, env, has_files = incident
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
        if not has_files and ("restore_files.py" in body or "--kind files" in body):
            pytest.fail("scripts/backup_files.py and restore_files.py are needed by the runbook")
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
    restored = s3server.client().list_objects_v2(Bucket="runbook-restored-files").get("Contents", [])
    assert {o["Key"] for o in restored} == {"invoices/2026/0001.pdf", "avatars/zoë.png"}
    assert not list(work.glob("*.sql")) and not list(work.glob("files*.zip*"))
    assert (work / ".venv" / "bin" / "python").exists()  # made by the runbook's first block, and used by the scripts
    assert PASSPHRASE not in done.stdout + done.stderr and pg.password not in done.stdout + done.stderr
