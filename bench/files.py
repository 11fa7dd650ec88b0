"""The files part: our files backup against the in-memory approach it replaces and against
`aws s3 sync` + `zip -0` + the pyAesCrypt CLI, on source buckets of random objects."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .common import BIN, MIB, PASSPHRASE, PY, Contender, MotoProcess


def fill_bucket(client, bucket: str, total_mib: int, count: int) -> None:
    client.create_bucket(Bucket=bucket)
    per = total_mib * MIB // count
    kinds = [("pdf", "application/pdf"), ("png", "image/png"), ("csv", "text/csv"), ("json", "application/json")]

    def put(i: int) -> None:
        ext, ctype = kinds[i % len(kinds)]
        size = per + (i % 7 - 3) * 1024 if per > 8192 else per  # not all the same size
        client.put_object(Bucket=bucket, Key=f"uploads/{i % 50:02d}/document-{i:06d}.{ext}", Body=os.urandom(size),
                          ContentType=ctype, Metadata={"uploaded-by": f"user-{i % 13}"})

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, range(count)))


def files_contenders(moto: MotoProcess, source: str, bucket: str, work: Path, ours_script: Path | None) -> list[Contender]:
    base = {**os.environ, **moto.env(), "PYTHONDONTWRITEBYTECODE": "1"}
    aws = f"{BIN / 'aws'} --endpoint-url {moto.endpoint} --only-show-errors s3"

    def ours(rep):
        env = {**base, "EXTERNAL_BACKUP_ENCRYPTION_KEY": PASSPHRASE}
        return [PY, str(ours_script), "--environment", "bench", "--source-bucket", source, "--bucket", bucket], env, []

    def in_memory(rep):
        env = {**base, "EXTERNAL_BACKUP_ENCRYPTION_KEY": PASSPHRASE}
        return [PY, "bench/inmemory_files_backup.py", "--source-bucket", source, "--bucket", bucket,
                "--key", f"inmemory/{rep}.zip.encrypted"], env, []

    def sync_zip(rep):
        tree, archive = work / "sync", work / "files.zip"
        # The stock pyAesCrypt CLI only takes its password on argv (-p): acceptable in this bench
        # with a throwaway passphrase, never in production.
        script = (f"set -e; rm -rf {tree} {archive}*; {aws} sync s3://{source} {tree}; cd {tree}; zip -0 -r -q {archive} .; "
                  f'{BIN / "pyAesCrypt"} -e {archive} -p "$BENCH_KEY" -o {archive}.aes; '
                  f"{aws} cp {archive}.aes s3://{bucket}/sync-zip/{rep}.zip.encrypted")
        return ["bash", "-c", script], {**base, "BENCH_KEY": PASSPHRASE}, [tree, archive]

    contenders = []
    if ours_script:
        contenders.append(Contender("ours: backup_files.py", "list → ZIP → AES Crypt → streamed multipart", ours))
    contenders += [
        Contender("in-memory (replaced): ZIP+encrypt in BytesIO", "bench/inmemory_files_backup.py; memory grows with the bucket", in_memory),
        Contender("aws s3 sync + zip -0 + pyAesCrypt CLI + cp", "bucket, ZIP and ciphertext on disk; password on argv", sync_zip),
    ]
    return contenders


MANUAL_RESTORE = "manual: aws s3 cp + pyAesCrypt -d + unzip + aws s3 cp --recursive"


def restore_contenders(moto: MotoProcess, source: str, bucket: str, work: Path) -> list[Contender]:
    """Our files restore of one backup of `source` into an empty bucket each run, against the
    manual path (the runbook's, by hand) and `aws s3 sync` of the source into an empty bucket
    (the floor: no decryption, no checks)."""
    import json
    import subprocess
    import uuid

    from dev.harness import REPO

    base = {**os.environ, **moto.env(), "PYTHONDONTWRITEBYTECODE": "1", "EXTERNAL_BACKUP_ENCRYPTION_KEY": PASSPHRASE,
            "TMPDIR": str(work)}
    done = subprocess.run([PY, "scripts/backup_files.py", "--environment", "restore-src", "--source-bucket", source, "--bucket", bucket,
                           "--json"], env=base, cwd=REPO, capture_output=True, text=True, check=True)
    key = json.loads(done.stdout)["key"]
    client = moto.client()
    aws = f"{BIN / 'aws'} --endpoint-url {moto.endpoint} --only-show-errors s3"

    def target() -> str:
        name = f"restored-{uuid.uuid4().hex[:8]}"
        client.create_bucket(Bucket=name)
        return name

    def ours(rep):
        return [PY, "scripts/restore_files.py", "--environment", "restore-src", "--bucket", bucket, "--key", key,
                "--target-bucket", target()], base, []

    # The manual path downloads with one GET: the aws CLI's default ranged GETs (8 MiB each) cost
    # moto a copy of the whole object per range (moto/s3/responses.py slices the full value), 29 s
    # for 512 MiB on this machine, a cost S3 does not have; one GET from moto takes about 1 s.
    config = work / "aws-config"
    config.write_text("[default]\ns3 =\n  multipart_threshold = 64GB\n")

    def manual(rep):
        # The runbook's path by hand: download, decrypt (the stock pyAesCrypt CLI: password on
        # argv, acceptable only in this bench), unzip, upload the tree (aws guesses each content
        # type from the name, as the app's uploads were typed).
        tree, archive = work / "manual", work / "manual.zip"
        script = (f"set -e; rm -rf {tree} {archive}*; {aws} cp s3://{bucket}/{key} {archive}.aes; "
                  f'{BIN / "pyAesCrypt"} -d {archive}.aes -p "$BENCH_KEY" -o {archive}; '
                  f"unzip -q {archive} -d {tree}; {aws} cp --recursive {tree} s3://{target()}")
        return ["bash", "-c", script], {**base, "BENCH_KEY": PASSPHRASE, "AWS_CONFIG_FILE": str(config)}, [tree, archive]

    def sync(rep):
        return [str(BIN / "aws"), "--endpoint-url", moto.endpoint, "--only-show-errors", "s3", "sync", f"s3://{source}",
                f"s3://{target()}"], base, []

    return [
        Contender("ours: restore_files.py --key", "download → AES Crypt (HMAC) → ZIP checks → re-upload with metadata", ours),
        Contender(MANUAL_RESTORE, "backup, ZIP and tree on disk; no checks against the manifest", manual),
        Contender("floor: aws s3 sync bucket to bucket", "no backup at all: a copy of the live bucket", sync),
    ]
