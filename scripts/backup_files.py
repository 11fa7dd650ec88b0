#!/usr/bin/env python3
"""Back up the app's bucket: list → objects streamed into one ZIP → AES Crypt → streamed upload → manifest."""

from __future__ import annotations

import os
import time

from backupkit import cli, config, crypto, s3, store
from backupkit.archive_write import ArchiveWriter, EncryptingSink, archive_objects
from backupkit.laststep import LastStep
from backupkit.manifest import MAX_SKIPPED_LISTED, backup_key, for_upload
from backupkit.objects import PREFETCH_WORKERS, list_objects
from backupkit.output import log, md_code, shown
from backupkit.profile import ArchiveEntries, profile_key
from backupkit.progress import Progress, human_bytes
from backupkit.upload import StreamingUpload

DESCRIPTION = """\
Copy every object of the app's bucket (under --source-prefix) into one ZIP (member = object key,
stored, ZIP64 where needed, date = LastModified, comment = JSON of ContentType, serving headers
and metadata as S3 returns them), encrypt it with AES Crypt v2 (pyAesCrypt) and stream it to
s3://BUCKET/ENVIRONMENT/files/YYYY-MM-DD--HH-MM-SS.zip.encrypted, then write its manifest.

Nothing touches the disk. Memory does not grow with the objects' sizes (140 MiB for 2 GiB
measured); it grows with their number only by the listing and the ZIP directory, up to about a
kilobyte per object. Objects that cannot be kept are skipped, named (on stderr, and the first
100 in the manifest with the total count), never truncated, and the backup of everything else
still completes with exit status 0: objects deleted between the listing and their download;
objects in an archived storage class (GLACIER, DEEP_ARCHIVE, Intelligent-Tiering's archive
tiers: restore them in S3 to include them); objects GetObject refuses (encrypted with a
customer-provided key, SSE-C; a KMS key or bucket policy this job may not use); keys a ZIP
member name cannot carry (a NUL byte); attributes S3 itself would refuse (from a store that is
not S3). The daily check (verify_backup.py) reports a backup with skipped objects. When GetObject
refuses objects and none can be archived, the job has lost its access (not one object's
problem): like any other error (credentials, the bucket, the endpoint, a download cut short)
that aborts the upload, writes no manifest and exits 1. The writer needs only s3:PutObject on
the external bucket, and list/get on the source bucket.
"""

EPILOG = """\
environment:
  EXTERNAL_BACKUP_ENCRYPTION_KEY  the passphrase (required; never put it on a command line)
  SOURCE_BUCKET, SOURCE_PREFIX    the app's bucket and an optional key prefix
  SOURCE_AWS_PROFILE, or SOURCE_AWS_ACCESS_KEY_ID / SOURCE_AWS_SECRET_ACCESS_KEY /
  SOURCE_AWS_SESSION_TOKEN / SOURCE_AWS_ENDPOINT_URL / SOURCE_AWS_REGION
                                  the app bucket's credentials, when they differ from the
                                  external bucket's (default: the same AWS_* chain)
  BACKUP_BUCKET, BACKUP_ENVIRONMENT, AWS_* (credentials, region, AWS_ENDPOINT_URL)

example:
  export EXTERNAL_BACKUP_ENCRYPTION_KEY=… SOURCE_AWS_PROFILE=app
  scripts/backup_files.py --environment production --source-bucket acme-app-uploads --bucket acme-external-backups
"""


def build_parser() -> cli.ArgumentParser:
    p = cli.parser("backup_files.py", DESCRIPTION, EPILOG)
    cli.add_target_args(p)
    p.add_argument("--source-bucket", default=os.environ.get("SOURCE_BUCKET"),
                   help="the app's bucket to back up (env SOURCE_BUCKET)")
    p.add_argument("--source-prefix", default=os.environ.get("SOURCE_PREFIX", ""),
                   help="back up only keys starting with this (env SOURCE_PREFIX; default: everything)")
    p.add_argument("--source-profile", default=None,
                   help="AWS profile for the source bucket (env SOURCE_AWS_PROFILE)")
    cli.add_heartbeat_arg(p)
    cli.add_output_args(p)
    return p


def main(argv: list[str]) -> int:
    args = cli.parse_args(build_parser(), argv)
    cli.start(args)
    environment = config.environment_name(args.environment)
    bucket = config.bucket_name(args.bucket)
    source_bucket = config.bucket_name(args.source_bucket, "source bucket", "set SOURCE_BUCKET or pass --source-bucket")
    prefix = args.source_prefix or ""
    passphrase = config.passphrases()[0]
    crypto.start_key_ids([passphrase])  # for the manifest, derived while the backup runs

    client = store.external_store()
    source = s3.source_client(args.source_profile, max_pool_connections=PREFETCH_WORKERS + 4)
    started = config.utcnow()
    began = time.monotonic()
    key = backup_key(environment, "files", started)

    listing = list_objects(source, source_bucket, prefix)
    log(f"backing up {len(listing.objects)} objects ({human_bytes(listing.total_bytes)}) of "
        f"s3://{source_bucket}/{shown(prefix)} to s3://{bucket}/{key}")
    progress = Progress("archived", total_bytes=listing.total_bytes, total_objects=len(listing.objects))
    with StreamingUpload(client, bucket, key) as upload, ArchiveEntries(key, passphrase) as entries, \
            StreamingUpload(client, bucket, profile_key(key), max_in_flight=2) as profile_upload:
        last = LastStep(upload, bucket)
        cli.on_interrupt(last.left)
        with EncryptingSink(passphrase, upload.write) as sink:
            writer = ArchiveWriter(sink, observer=entries)  # the loss tripwire's profile: each member's key, size, CRC
            result = archive_objects(source, source_bucket, listing.objects, writer, progress.update)
            writer.close()
            sink.close()  # raises unless the encryption ended cleanly
        upload.flush()
        profile = entries.send(profile_upload)  # completed after the backup
        key_id = crypto.key_id(passphrase)
        progress.done()
        # From here a signal no longer stops the backup half-way: it is completed with its manifest.
        manifest = last.run(client, lambda: for_upload(
            upload, sink.plaintext, kind="files", environment=environment, started_at=started, key_id=key_id,
            source={"bucket": source_bucket, "prefix": prefix, "object_count": result.object_count,
                    "total_bytes": result.total_bytes, "skipped": [left_out for left_out, _ in result.skipped[:MAX_SKIPPED_LISTED]],
                    "skipped_count": len(result.skipped)},
            profile=profile.field(),
        ), before_manifest=(profile_upload,))
    report(manifest, result.skipped, time.monotonic() - began, bucket, args.json)
    return 0


def report(manifest: dict, skipped: list[tuple[str, str]], seconds: float, bucket: str, as_json: bool) -> None:
    source = manifest["source"]
    where = f"s3://{source['bucket']}/{shown(source['prefix'])}"
    for left_out, why in skipped[:MAX_SKIPPED_LISTED]:
        cli.warn(f"s3://{source['bucket']}/{shown(left_out)} is not in this backup: {why}")
    if len(skipped) > MAX_SKIPPED_LISTED:
        cli.warn(f"{len(skipped) - MAX_SKIPPED_LISTED} more objects are not in this backup (not listed)")
    rate = source["total_bytes"] / seconds / 1024 / 1024 if seconds else 0
    cli.step_summary(
        f"### Files backup: {manifest['environment']}\n\n| key | version | objects | bytes | encrypted | skipped | time |\n"
        f"|---|---|---|---|---|---|---|\n| {md_code(manifest['key'])} | {md_code(manifest['version_id'])} | {source['object_count']} | "
        f"{human_bytes(source['total_bytes'])} | {human_bytes(manifest['encrypted_size'])} | {len(skipped)} | {seconds:.0f} s |"
    )
    cli.print_result(
        manifest,
        as_json,
        f"backed up {source['object_count']} objects ({human_bytes(source['total_bytes'])}) of {where} "
        f"to s3://{bucket}/{manifest['key']} (version {manifest['version_id']}): {human_bytes(manifest['encrypted_size'])} "
        f"encrypted, {len(skipped)} skipped, in {seconds:.1f} s ({rate:.1f} MiB/s)",
    )


if __name__ == "__main__":
    cli.run(main)
