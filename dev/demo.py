"""`make demo`: the main job end to end on throwaway local services.

A PostgreSQL cluster and a local S3 endpoint (moto) are started in temp dirs; a sample app
database is backed up, listed, verified and restored into a fresh database, and the two are compared.
Everything is removed afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from dev.harness import REPO, PostgresCluster, S3Server, create_sample_database, table_fingerprint

BUCKET = "demo-external-backups"
ENVIRONMENT = "demo"


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def script(env: dict[str, str], name: str, *args: str) -> str:
    command = [sys.executable, str(REPO / "scripts" / name), *args]
    print("$ scripts/" + " ".join([name, *args]), flush=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    for line in done.stderr.splitlines():
        print(f"  | {line}")
    if done.returncode != 0:
        raise SystemExit(f"demo failed: {name} exited {done.returncode}")
    print(done.stdout.rstrip())
    return done.stdout


def main() -> int:
    began = time.monotonic()
    step("starting a throwaway PostgreSQL and a local S3 endpoint")
    pg = PostgresCluster().start()
    s3 = S3Server().start()
    try:
        print(f"PostgreSQL ({pg.bin}) on 127.0.0.1:{pg.port}, S3 (moto) at {s3.endpoint}")
        create_sample_database(pg, "app", rows=5000)
        print("sample database 'app': applications (jsonb, bytea, timestamps, unicode) and admin_user")
        env = {
            **os.environ,
            **s3.env(),
            "BACKUP_BUCKET": BUCKET,
            "BACKUP_ENVIRONMENT": ENVIRONMENT,
            "EXTERNAL_BACKUP_ENCRYPTION_KEY": "demo passphrase, not for real use",
            "DATABASE_URL": pg.url("app"),
            "PG_DUMP": str(pg.bin / "pg_dump"),
            "PSQL": str(pg.bin / "psql"),
            "BACKUP_PROGRESS_INTERVAL": "1",
            "BACKUP_ALLOW_SUPERUSER": "1",  # the throwaway cluster's only role is its superuser
        }

        step("set up the external bucket (Object Lock, lifecycle, encryption; no TLS policy: moto speaks plain HTTP)")
        script(env, "setup_bucket.py", "--apply", "--allow-plain-http")

        step("backup: pg_dump → openssl → S3")
        script(env, "backup_database.py")

        step("list the backups")
        script(env, "list_backups.py", "--max-age", "1h", "--kind", "database")

        step("verify the newest backup: download, check against its manifest, decrypt (no plaintext on disk), trailer")
        script(env, "verify_backup.py", "--kind", "database", "--latest")

        step("restore the newest backup into a fresh database")
        env["TARGET_DATABASE_URL"] = pg.create_database("app_restored")
        script(env, "restore_database.py", "--latest")

        step("compare")
        ok = True
        for table in ("applications", "admin_user"):
            before = table_fingerprint(pg, "app", table)
            after = table_fingerprint(pg, "app_restored", table)
            same = before == after
            ok &= same
            print(f"{table}: {before.split(':')[0]} rows, {'identical' if same else 'DIFFERENT'}")
        ok &= files_demo(s3, env)
        step(f"{'OK' if ok else 'FAILED'}: demo finished in {time.monotonic() - began:.1f} s; cleaning up")
        return 0 if ok else 1
    finally:
        s3.stop()
        pg.stop()


def files_demo(s3: S3Server, env: dict[str, str]) -> bool:
    """Back up a small sample bucket, restore it into another bucket, compare."""
    step("files: back up a sample bucket, restore it into another, compare")
    client = s3.client()
    for name in ("demo-app-files", "demo-app-restored"):
        client.create_bucket(Bucket=name)
    sample = {f"uploads/{i:03d}/Zoë's file {i}.txt": f"file {i}\n".encode() * (i + 1) for i in range(50)}
    sample["avatars/empty.png"] = b""
    for key, body in sample.items():
        client.put_object(Bucket="demo-app-files", Key=key, Body=body, ContentType="text/plain", Metadata={"n": str(len(body))})
    script(env, "backup_files.py", "--source-bucket", "demo-app-files")
    script(env, "restore_files.py", "--latest", "--target-bucket", "demo-app-restored")
    same = all(
        client.get_object(Bucket="demo-app-restored", Key=key)["Body"].read() == body
        and client.head_object(Bucket="demo-app-restored", Key=key)["Metadata"] == {"n": str(len(body))}
        for key, body in sample.items()
    )
    print(f"files: {len(sample)} objects, {'identical' if same else 'DIFFERENT'}")
    return same


if __name__ == "__main__":
    sys.exit(main())
