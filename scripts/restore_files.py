#!/usr/bin/env python3
"""Restore a files backup: download, check, decrypt (HMAC checked) to a private temp file that has
no name, then re-upload each member with its ContentType and metadata, skipping objects already
identical."""

from __future__ import annotations

import os
import time
from typing import Any

from backupkit import cli, config, s3, store
from backupkit.attributes import allow_non_ascii_metadata
from backupkit.errors import UsageError
from backupkit.files_restore import CHANGED, IDENTICAL, NEW, WORKERS, Restore, check_target
from backupkit.output import md_code, shown
from backupkit.progress import human_bytes
from backupkit.retrieve import BucketReader, Retrieved, local_format, open_local

DESCRIPTION = """\
Restore a files backup into TARGET_BUCKET: the backup is decrypted as it downloads into a
private temporary file that has no name (0600, in a 0700 directory: nothing is left on disk
even when the process is killed), and only when the download matched its manifest (size,
SHA-256, checked at its end), the decryption ended cleanly (AES Crypt's HMAC is checked at the
very end) and the plaintext SHA-256 matches the manifest is anything uploaded. Each member goes back under TARGET_PREFIX + its
original key, with its ContentType, serving headers and user metadata as S3 returned them.
Objects already identical in the target (same size, bytes (ETag/MD5), content type and
metadata) are skipped.

Before the first upload the whole archive is checked as verify_backup.py checks it: the central
directory against the local headers (no entry may alias another's bytes), every CRC, unique
names, every member's content type and metadata, the member count against the manifest. A
member whose name is unsafe as an object key (a '..' segment, a leading '/', control characters,
not UTF-8) stops the restore before anything is uploaded, unless --skip-unsafe-names, which
leaves those out and lists them.

--latest takes the newest backup that verifies, naming the newer ones it skipped and why.
--only GLOB restores the keys that match (fnmatch, on the original key; quote it).
--dry-run prints what would be uploaded (new / changed / identical) and uploads nothing, and
counts the objects under TARGET_PREFIX (matching --only) that are not in the backup: a restore
leaves those as they are, it never deletes.
Temporary files are removed on every exit, Ctrl-C and SIGTERM included.

Interrupted (Ctrl-C, SIGTERM, a failed upload): the objects uploaded so far are in the target,
complete (each is one PutObject), the others are not; it says how many. Run the same command
again to finish: objects already identical in the target are skipped.
"""

EPILOG = """\
environment:
  EXTERNAL_BACKUP_ENCRYPTION_KEY[_PREVIOUS]  passphrases; the manifest's key_id picks the right one
  BACKUP_BUCKET, BACKUP_ENVIRONMENT          the external bucket (read-only access is enough)
  AWS_* (AWS_PROFILE, keys, AWS_REGION, AWS_ENDPOINT_URL)
                                             boto3's standard chain, used for BOTH the external
                                             bucket and the target bucket: the identity needs read
                                             on the first and s3:PutObject (+ GetObject for the
                                             identical check) on the second. When no one identity
                                             has both, fetch_backup.py the backup with one and
                                             restore it with --file using the other.
  TMPDIR                                     where the decrypted archive is kept while restoring
                                             (needs room for the whole backup)

examples:
  scripts/restore_files.py --environment production --latest --target-bucket acme-app-uploads --dry-run
  scripts/restore_files.py --environment production --key 2026-11-29--03-00-00.zip.encrypted \\
      --target-bucket acme-app-uploads --only 'avatars/*'
  scripts/restore_files.py --file backup.zip.encrypted --target-bucket acme-app-restored
"""



def build_parser() -> cli.ArgumentParser:
    p = cli.parser("restore_files.py", DESCRIPTION, EPILOG)
    cli.add_target_args(p)
    which = cli.add_backup_choice(p)
    which.add_argument("--file", help="a local backup: encrypted (its FILE.manifest.json is used when present) or an already decrypted ZIP")
    p.add_argument("--target-bucket", default=os.environ.get("TARGET_BUCKET"),
                   help="the bucket to restore into (env TARGET_BUCKET)")
    p.add_argument("--target-prefix", default=os.environ.get("TARGET_PREFIX", ""),
                   help="put before every restored key (env TARGET_PREFIX; default: none, keys as they were)")
    p.add_argument("--only", metavar="GLOB", help="restore only the original keys matching this fnmatch pattern, e.g. 'avatars/*'")
    p.add_argument("--dry-run", action="store_true", help="print what would be uploaded; upload nothing")
    p.add_argument("--skip-unsafe-names", action="store_true",
                   help="leave out (and list) members whose names are unsafe as object keys, instead of stopping")
    cli.add_output_args(p)
    return p


def main(argv: list[str]) -> int:
    args = cli.parse_args(build_parser(), argv)
    cli.start(args)
    if args.version_id and not args.key:
        raise UsageError("--version-id needs --key")
    target_bucket = config.bucket_name(args.target_bucket, "target bucket", "set TARGET_BUCKET or pass --target-bucket")
    prefix = args.target_prefix or ""
    if args.file:
        encryption = local_format(args.file, "files", plain=True)
        passphrases = config.passphrases() if encryption.encrypts else []
    else:
        environment = config.environment_name(args.environment)
        bucket = config.bucket_name(args.bucket)
        passphrases = config.passphrases()
    began = time.monotonic()
    target = s3.client(max_pool_connections=WORKERS + 4)  # the app's bucket, with the same identity
    allow_non_ascii_metadata(target)  # metadata goes back as S3 returned it (put_parameters)
    check_target(target, target_bucket, prefix, args.dry_run)
    restore = Restore(target, target_bucket, prefix, args.only, args.dry_run, args.skip_unsafe_names)
    cli.on_interrupt(restore.interrupted)
    if args.file:
        retrieved = open_local(args.file, "files", passphrases, restore, require_manifest=False, plain=True)
    else:
        reader = BucketReader(store.external_store(), bucket, environment, "files", passphrases)
        options = reader.candidates(latest=args.latest, key=args.key, version_id=args.version_id)
        retrieved = reader.first_good(options, restore, latest=args.latest, stream=True)
    report(args, retrieved, f"s3://{target_bucket}/{prefix}", time.monotonic() - began)
    return 0


def report(args: Any, retrieved: Retrieved[dict[str, Any]], where: str, seconds: float) -> None:
    fetched, items, todo = retrieved.fetched, retrieved.result["items"], retrieved.result["todo"]
    counts = {action: sum(1 for i in items if i.action == action) for action in (NEW, CHANGED, IDENTICAL)}
    todo_bytes = sum(item.size for item in todo)
    result = {
        "restored": fetched.label,
        "key": fetched.backup.key if fetched.backup else None,
        "version_id": fetched.backup.version_id if fetched.backup else None,
        "target": where,
        "dry_run": args.dry_run,
        "only": args.only,
        "members": len(items),
        **counts,
        "uploaded": 0 if args.dry_run else len(todo),
        "uploaded_bytes": 0 if args.dry_run else todo_bytes,
        "not_restored_unsafe_names": retrieved.result["unsafe"],
        "seconds": round(seconds, 1),
        "skipped": [s.to_json() for s in retrieved.skipped],
    }
    if args.dry_run:
        result["plan"] = [{"key": i.key, "action": i.action, "size": i.size} for i in items]
        result["target_objects_not_in_backup"] = retrieved.result["not_in_backup"]
    only = f" matching '{shown(args.only)}'" if args.only else ""
    summary = (f"{counts[NEW]} new, {counts[CHANGED]} changed, {counts[IDENTICAL]} identical "
               f"of {len(items)} members{only}")
    if retrieved.result["unsafe"]:
        summary += f"; {len(retrieved.result['unsafe'])} left out for unsafe names"
    if args.dry_run:
        lines = [f"{i.action:9} {shown(i.key)} ({human_bytes(i.size)})" for i in items]
        extra = retrieved.result["not_in_backup"]
        extra_line = (f"{extra} objects under {shown(where)}{only} are not in this backup: a restore leaves them as "
                      "they are (it never deletes)" if extra is not None else
                      f"objects under {shown(where)} that are not in this backup: not counted (cannot list the target)")
        human = "\n".join([*lines, f"dry run: would upload {len(todo)} objects ({human_bytes(todo_bytes)}) from {fetched.label} "
                                   f"to {shown(where)}: {summary}; uploaded nothing", extra_line])
    else:
        human = (f"restored {fetched.label} to {shown(where)}: uploaded {len(todo)} objects ({human_bytes(todo_bytes)}); "
                 f"{summary}; in {seconds:.1f} s")
        cli.step_summary(f"### Files restore\n\nRestored {md_code(fetched.label, already_shown=True)} to {md_code(where)}: {summary}.")
    cli.print_result(result, args.json, human)


if __name__ == "__main__":
    cli.run(main)
