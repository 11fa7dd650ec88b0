"""THE REPLACED APPROACH, kept only as a benchmark contender: the files backup as it was before
scripts/backup_files.py. The whole ZIP is built in one BytesIO, encrypted with pyAesCrypt into a
second BytesIO, and sent with one put_object, so memory grows with the bucket (about 2-3x its size).

Usage (passphrase from EXTERNAL_BACKUP_ENCRYPTION_KEY, S3 from AWS_*):
    python bench/inmemory_files_backup.py --source-bucket S [--source-prefix P] --bucket B --key K
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import zipfile

import boto3
import pyAesCrypt


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source-bucket", required=True)
    p.add_argument("--source-prefix", default="")
    p.add_argument("--bucket", required=True)
    p.add_argument("--key", required=True)
    args = p.parse_args(argv)
    s3 = boto3.client("s3")

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=args.source_bucket, Prefix=args.source_prefix):
            for obj in page.get("Contents", []):
                body = s3.get_object(Bucket=args.source_bucket, Key=obj["Key"])["Body"].read()
                zf.writestr(obj["Key"], body)
    archive.seek(0)
    encrypted = io.BytesIO()
    pyAesCrypt.encryptStream(archive, encrypted, os.environ["EXTERNAL_BACKUP_ENCRYPTION_KEY"], 64 * 1024)
    s3.put_object(Bucket=args.bucket, Key=args.key, Body=encrypted.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
