#!/usr/bin/env python3
"""Fetch one backup, still encrypted, checked against its manifest; the manifest goes beside it."""

from __future__ import annotations

import json
import os
import tempfile

from backupkit import cli, config, store
from backupkit.errors import UsageError
from backupkit.manifest import KINDS, MANIFEST_SUFFIX, compression_of
from backupkit.output import shown
from backupkit.progress import human_bytes
from backupkit.retrieve import BucketReader, Fetched

DESCRIPTION = """\
Download one backup (still encrypted) to FILE and check its size and SHA-256 against its manifest;
the manifest is written beside it as FILE.manifest.json. decrypt.py then picks the passphrase by the
manifest's key_id and checks both hashes on its own:

  scripts/fetch_backup.py --environment production --kind database --latest --out backup.sql.encrypted
  ./decrypt.py --filein backup.sql.encrypted --fileout database-backup.sql

The download goes to a temporary name beside FILE (mode 0600) and is renamed only once it
verified, so FILE is never a partial backup. An existing FILE is replaced.
--latest takes the newest complete backup whose download verifies, naming the newer ones it
skipped and why (the first 10; the others are counted per reason). --key takes one backup: when
its key has more than one version (a writer can add one at any time), --version-id says which,
and without it the error lists them.
"""

EPILOG = """\
environment:
  BACKUP_BUCKET, BACKUP_ENVIRONMENT, AWS_*   the external bucket (read-only access is enough)

examples:
  scripts/fetch_backup.py --environment production --kind files --latest --out files.zip.encrypted
  scripts/fetch_backup.py --environment production --kind database \\
      --key 2026-11-29--10-00-00.sql.encrypted --version-id 3HL4kqtJ... --out backup.sql.encrypted
"""


def build_parser() -> cli.ArgumentParser:
    p = cli.parser("fetch_backup.py", DESCRIPTION, EPILOG)
    cli.add_target_args(p)
    p.add_argument("--kind", choices=KINDS, required=True, help="database or files")
    cli.add_backup_choice(p, "the newest complete backup whose download verifies")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the encrypted backup")
    cli.add_output_args(p)
    return p


def write_private(path: str, data: bytes) -> None:
    """Write `path` atomically, mode 0600."""
    fd, temp = tempfile.mkstemp(prefix=".fetch-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


def output_path(value: str) -> str:
    out = os.path.abspath(value)
    if os.path.isdir(out):
        raise UsageError(f"--out {shown(value)} is a directory: give a file name, e.g. {shown(os.path.join(value, 'backup.encrypted'))}")
    directory = os.path.dirname(out)
    if not os.path.isdir(directory):
        raise UsageError(f"--out {shown(value)}: the directory {shown(directory)} does not exist")
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise UsageError(f"--out {shown(value)}: cannot write in {shown(directory)} ({exc.strerror})") from None
    return out


def main(argv: list[str]) -> int:
    args = cli.parse_args(build_parser(), argv)
    cli.start(args)
    if args.version_id and not args.key:
        raise UsageError("--version-id needs --key")
    environment = config.environment_name(args.environment)
    bucket = config.bucket_name(args.bucket)
    out = output_path(args.out)

    # No passphrase here: fetching checks the ciphertext; decrypt.py picks the passphrase later.
    reader = BucketReader(store.external_store(), bucket, environment, args.kind, passphrases=None)
    options = reader.candidates(latest=args.latest, key=args.key, version_id=args.version_id)

    def keep(fetched: Fetched) -> None:
        write_private(out + MANIFEST_SUFFIX, (json.dumps(fetched.manifest, indent=2) + "\n").encode())
        os.replace(fetched.path, out)

    retrieved = reader.first_good(options, keep, latest=args.latest, near=os.path.dirname(out))
    backup, manifest = retrieved.fetched.backup, retrieved.fetched.manifest
    result = {"key": backup.key, "version_id": backup.version_id, "file": out, "manifest_file": out + MANIFEST_SUFFIX,
              "size": manifest["encrypted_size"], "encrypted_sha256": manifest["encrypted_sha256"],
              "key_id": manifest["key_id"], "compression": compression_of(manifest),
              "skipped": [s.to_json() for s in retrieved.skipped], "skipped_count": retrieved.skipped.total}
    cli.print_result(result, args.json,
                     f"fetched s3://{bucket}/{backup.label()} to {shown(args.out)} ({human_bytes(manifest['encrypted_size'])}, "
                     f"SHA-256 checked against its manifest, written beside it as {shown(args.out)}{MANIFEST_SUFFIX}; "
                     f"encrypted with the passphrase whose key_id is {manifest['key_id']})")
    return 0


if __name__ == "__main__":
    cli.run(main)
