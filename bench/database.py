"""The database part: our backup (compressed and not) against the one-line pipes it replaces
(with and without zstd), the three-step approach and the floor (pg_dump alone); zstd levels; and
our restore against `psql -f` of the plain dump."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from dev.harness import REPO, PostgresCluster

from .common import BIN, PASSPHRASE, PY, Contender, MotoProcess

OPENSSL_ENC = "openssl enc -aes-256-cbc -pbkdf2 -md sha256 -iter 10000 -pass env:BENCH_KEY"


def pg_dump_cmd(pg: PostgresCluster, database: str) -> str:
    return (f"{pg.bin / 'pg_dump'} --format=plain --clean --if-exists --no-owner --no-privileges "
            f"-h 127.0.0.1 -p {pg.port} -U {pg.user} -d {database}")


def dump_size(pg: PostgresCluster, database: str) -> int:
    return int(subprocess.run(["sh", "-c", f"{pg_dump_cmd(pg, database)} | wc -c"], env={**os.environ, "PGPASSWORD": pg.password},
                              capture_output=True, text=True, check=True).stdout)


def stored_bytes(moto: MotoProcess, bucket: str):
    """A function: the bytes stored under a prefix of the bench bucket, manifests left out (the
    bucket is emptied after every run, so that is what one run stored)."""
    client = moto.client()

    def measure(prefix: str) -> int:
        return sum(o["Size"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                   for o in page.get("Contents", []) if not o["Key"].endswith(".manifest.json"))

    return measure


def ours(pg: PostgresCluster, moto: MotoProcess, bucket: str, database: str, *args: str, environment: str = "bench",
         script: Path | None = None):
    """A contender command running scripts/backup_database.py (or `script`) with `args`, storing
    under `environment`/."""
    base = {**os.environ, **moto.env(), "PYTHONDONTWRITEBYTECODE": "1"}

    def command(rep: int):
        env = {**base, "EXTERNAL_BACKUP_ENCRYPTION_KEY": PASSPHRASE, "DATABASE_URL": pg.url(database)}
        return [PY, str(script or REPO / "scripts" / "backup_database.py"), "--environment", environment, "--bucket", bucket,
                "--pg-dump", str(pg.bin / "pg_dump"), *args], env, []

    return command


def backup_contenders(pg: PostgresCluster, moto: MotoProcess, bucket: str, work: Path, database: str, *,
                      three_step: bool = True, compare: Path | None = None) -> list[Contender]:
    """Ours (default: zstd) first, then ours uncompressed, the pipes, three-step, the floor."""
    shell_env = {**os.environ, **moto.env(), "PYTHONDONTWRITEBYTECODE": "1", "PGPASSWORD": pg.password, "BENCH_KEY": PASSPHRASE}
    dump = pg_dump_cmd(pg, database)
    aws = f"{BIN / 'aws'} --endpoint-url {moto.endpoint} --only-show-errors s3 cp"

    def three(rep):
        plain, enc = work / "dump.sql", work / "dump.sql.enc"
        script = (f"set -e; {dump} -f {plain}; {OPENSSL_ENC} -in {plain} -out {enc}; "
                  f"{aws} {enc} s3://{bucket}/three-step/{rep}.sql.encrypted")
        return ["bash", "-c", script], shell_env, [plain]

    def pipe(zstd: bool):
        def command(rep):
            squeeze = "zstd -1 -q -c | " if zstd else ""
            script = f"{dump} | {squeeze}{OPENSSL_ENC} | {aws} - s3://{bucket}/pipe-{'zstd' if zstd else 'plain'}/{rep}.encrypted"
            return ["sh", "-c", script], shell_env, []
        return command

    def floor(rep):
        return ["sh", "-c", f"{dump} > /dev/null"], shell_env, []

    contenders = [
        Contender("ours: backup_database.py (zstd, default level)", "pg_dump → zstd → openssl → streamed multipart; completes only if all exited 0",
                  ours(pg, moto, bucket, database, environment="ours-zstd"), "ours-zstd/"),
        Contender("ours: --compression none", "pg_dump → openssl → streamed multipart (the original format)",
                  ours(pg, moto, bucket, database, "--compression", "none", environment="ours-none"), "ours-none/"),
    ]
    if compare:
        contenders.append(Contender(f"ours at {compare}", "the same script from another checkout (--compare-scripts)",
                                    ours(pg, moto, bucket, database, environment="ours-before",
                                         script=compare / "scripts" / "backup_database.py"), "ours-before/"))
    if three_step:
        contenders.append(Contender("three-step: pg_dump -f, openssl, aws s3 cp", "writes the plaintext dump (and the ciphertext) to disk", three))
    contenders += [
        Contender("pipe + zstd: pg_dump | zstd -1 | openssl | aws s3 cp -", "UNSAFE: completes the object even when pg_dump fails",
                  pipe(True), "pipe-zstd/"),
        Contender("pipe: pg_dump | openssl | aws s3 cp -", "UNSAFE: completes the object even when pg_dump fails", pipe(False),
                  "pipe-plain/"),
        Contender("floor: pg_dump > /dev/null", "no compression, no encryption, no upload", floor),
    ]
    return contenders


def level_contenders(pg: PostgresCluster, moto: MotoProcess, bucket: str, database: str, levels: list[int]) -> list[Contender]:
    return [Contender(f"ours: zstd -{level}", "--compression-level",
                      ours(pg, moto, bucket, database, "--compression-level", str(level), environment=f"level-{level}"), f"level-{level}/")
            for level in levels]


BUCKET_RESTORE = "ours: restore_database.py --key, from the bucket (zstd)"


def restore_contenders(pg: PostgresCluster, moto: MotoProcess, bucket: str, work: Path, database: str,
                       compare: Path | None = None) -> list[Contender]:
    """Each restores the same dump into a fresh database: ours from our encrypted backups (with
    their manifests) on local disk, compressed and not, and straight from the bucket (streamed);
    psql from the plain SQL file on disk."""
    client = moto.client()
    env = {**os.environ, **moto.env(), "PYTHONDONTWRITEBYTECODE": "1", "EXTERNAL_BACKUP_ENCRYPTION_KEY": PASSPHRASE,
           "BACKUP_ALLOW_SUPERUSER": "1"}  # the throwaway cluster's role is its superuser
    files, keys = {}, {}
    for compression in ("zstd", "none"):
        done = subprocess.run([PY, "scripts/backup_database.py", "--environment", "restore-src", "--bucket", bucket, "--json",
                               "--compression", compression, "--pg-dump", str(pg.bin / "pg_dump")],
                              env={**env, "DATABASE_URL": pg.url(database)}, cwd=REPO, capture_output=True, text=True, check=True)
        key = keys[compression] = json.loads(done.stdout)["key"]
        files[compression] = work / key.rsplit("/", 1)[1]
        client.download_file(bucket, key, str(files[compression]))
        client.download_file(bucket, key + ".manifest.json", f"{files[compression]}.manifest.json")
    plain = work / "plain.sql"
    subprocess.run(["openssl", "enc", "-d", *OPENSSL_ENC.split()[2:], "-in", str(files["none"]), "-out", str(plain)],
                   env={**os.environ, "BENCH_KEY": PASSPHRASE}, check=True)
    # The backups stay in the bucket for the restore from it; run.py empties it afterwards.

    def from_bucket(key: str, name: str):
        def command(rep):
            target = f"restore_{name}_{rep}"
            pg.create_database(target)
            return [PY, str(REPO / "scripts" / "restore_database.py"), "--environment", "restore-src", "--bucket", bucket,
                    "--key", key, "--target-database-url", pg.url(target), "--psql", str(pg.bin / "psql")], env, []
        return command

    def ours_from(path: Path, name: str, script: Path | None = None):
        def command(rep):
            target = f"restore_{name}_{rep}"
            pg.create_database(target)
            return [PY, str(script or REPO / "scripts" / "restore_database.py"), "--file", str(path), "--target-database-url",
                    pg.url(target), "--psql", str(pg.bin / "psql")], env, []
        return command

    def psql_file(rep):
        target = f"restore_psql_{rep}"
        pg.create_database(target)
        return [str(pg.bin / "psql"), "-X", "-q", "-o", "/dev/null", "-v", "ON_ERROR_STOP=1", "--single-transaction",
                "-h", "127.0.0.1", "-p", str(pg.port), "-U", pg.user, "-d", target, "-f", str(plain)], \
            {**os.environ, "PGPASSWORD": pg.password}, []

    contenders = [
        Contender("ours: restore_database.py --file (zstd)", "checks manifest, openssl -d → zstd -d → restricted psql, holds back the tail",
                  ours_from(files["zstd"], "ours")),
        Contender("ours: restore_database.py --file (uncompressed)", "the same without zstd", ours_from(files["none"], "plain")),
        Contender(BUCKET_RESTORE, "streamed: GET → SHA-256 → openssl -d → zstd -d → restricted psql, all at once; "
                  "COMMIT after every check", from_bucket(keys["zstd"], "bucket")),
    ]
    if compare:
        contenders.append(Contender(f"ours at {compare} (uncompressed)", "the same script from another checkout",
                                    ours_from(files["none"], "compare", compare / "scripts" / "restore_database.py")))
    contenders.append(Contender("psql -f plain.sql", "plaintext dump on disk, no verification", psql_file))
    return contenders


def drop_restore_targets(pg: PostgresCluster, reps: int) -> None:
    for rep in range(reps + 1):
        for name in ("ours", "plain", "compare", "bucket", "psql"):
            pg.drop_database(f"restore_{name}_{rep}")
