#!/usr/bin/env python3
"""Set up the external bucket (--apply), audit it (--check), or print its IAM policies."""

from __future__ import annotations

import os
from typing import Any

from backupkit import bucket_state, cli, config, store
from backupkit.bucket_state import BucketSettings
from backupkit.errors import BackupError, UsageError
from backupkit.output import log, md_code

DESCRIPTION = f"""\
--apply creates the external bucket, or brings an existing one to the wanted state; a second run
changes nothing. --check audits it: one PASS/FAIL line per property, exit 1 on any drift (the
read-only policy is enough). --print-policies prints the IAM policies as JSON.

The wanted state:
  versioning on; Object Lock with default retention MODE (COMPLIANCE) for --retention-days (35);
  lifecycle: current versions expire after --expire-days (40), noncurrent versions are deleted
  {bucket_state.NONCURRENT_DAYS} day after, expired delete markers are removed, incomplete multipart uploads are
  aborted after {bucket_state.ABORT_INCOMPLETE_UPLOADS_DAYS} days; all public access blocked; default encryption
  (SSE-S3, AES256); a bucket policy denying any request not made over TLS.

Policies: write_only (s3:PutObject only: what the backup scripts need), write_only_recommended
(also s3:AbortMultipartUpload, so a failed backup cleans up after itself), read_only (list,
restore, fetch, verify and --check), administer (what --apply needs).

With --environment E, --print-policies prints writers that may write only
under E/ (arn:aws:s3:::BUCKET/E/*): give each environment's backup jobs their own writer, so a
staging job (or whoever steals its credentials) cannot plant objects among production's backups.
Without it, the writers may write anywhere in the bucket. (BACKUP_ENVIRONMENT is not read here:
whoever administers the bucket names the environment of each writer explicitly.)
"""

EPILOG = """\
examples:
  scripts/setup_bucket.py --bucket acme-external-backups --region eu-central-1 --apply --dry-run
  scripts/setup_bucket.py --bucket acme-external-backups --region eu-central-1 --apply
  scripts/setup_bucket.py --bucket acme-external-backups --check
  scripts/setup_bucket.py --bucket acme-external-backups --print-policies | jq .read_only
  scripts/setup_bucket.py --bucket acme-external-backups --environment production --print-policies | jq .write_only
"""


def build_parser() -> cli.ArgumentParser:
    p = cli.parser("setup_bucket.py", DESCRIPTION, EPILOG)
    p.add_argument("--bucket", default=os.environ.get("BACKUP_BUCKET"),
                   help="the external backup bucket (env BACKUP_BUCKET)")
    p.add_argument("--region", help="where to create the bucket (default: AWS_REGION / the profile's region)")
    p.add_argument("--environment", help="with --print-policies: the writers may write only under this environment's "
                                         "folder, e.g. production")
    p.add_argument("--retention-days", type=int, default=bucket_state.DEFAULT_RETENTION_DAYS,
                   help="Object Lock default retention in days (default: %(default)s)")
    p.add_argument("--expire-days", type=int, default=bucket_state.DEFAULT_EXPIRE_DAYS,
                   help="lifecycle expiry of current versions in days; must exceed --retention-days (default: %(default)s)")
    p.add_argument("--mode", choices=bucket_state.MODES, default="COMPLIANCE",
                   help="Object Lock mode: COMPLIANCE (nobody, not even the root user, can delete early) or "
                        "GOVERNANCE (users with s3:BypassGovernanceRetention can) (default: %(default)s)")
    p.add_argument("--allow-plain-http", action="store_true", default=os.environ.get("BACKUP_ALLOW_PLAIN_HTTP") == "1",
                   help="leave out (and do not check) the bucket policy denying non-TLS requests: only for a local "
                        "S3-compatible endpoint served over plain HTTP, such as the tests' and the demo's "
                        "(env BACKUP_ALLOW_PLAIN_HTTP=1)")
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("--apply", action="store_true", help="create or fix the bucket")
    action.add_argument("--check", action="store_true", help="audit the bucket; exit 1 on any drift")
    action.add_argument("--print-policies", action="store_true", help="print the IAM policies as JSON")
    p.add_argument("--dry-run", action="store_true", help="with --apply: print what would change, change nothing")
    cli.add_heartbeat_arg(p)
    cli.add_output_args(p)
    return p


def apply(client: Any, settings: BucketSettings, region: str | None, dry_run: bool) -> dict[str, Any]:
    bucket = settings.bucket
    wanted = bucket_state.wanted_state(settings)
    done: list[str] = []
    created = not bucket_state.bucket_exists(client, bucket)
    if created:
        done.append(f"create s3://{bucket} in {region or 'us-east-1'} with Object Lock enabled")
    if created and dry_run:
        found = bucket_state.NEW_BUCKET_STATE
    else:
        if created:
            log(f"creating s3://{bucket} in {region or 'us-east-1'} with Object Lock enabled")
            bucket_state.create_bucket(client, bucket, region)
        found = bucket_state.read_state(client, bucket)
    findings = bucket_state.compare(wanted, found)
    for prop in bucket_state.changes(findings):
        for finding in findings:
            if finding.prop == prop and not finding.ok:
                done.append(f"set {finding.name}: {finding.found} → {finding.wanted}")
        if not dry_run:
            log(f"setting {prop.replace('_', ' ')}")
            value = wanted[prop]
            if prop == "policy" and value is None:  # --allow-plain-http: drop what refuses plain HTTP
                value = bucket_state.without_tls_only(found["policy"])
            bucket_state.write_property(client, bucket, prop, value)

    if done and not dry_run:
        # Read back what S3 now holds: a store that accepted a setting but ignores it must not pass.
        still = [f for f in bucket_state.compare(wanted, bucket_state.read_state(client, bucket)) if not f.ok]
        if still:
            raise BackupError(f"s3://{bucket} still differs after --apply: "
                              + "; ".join(f"{f.name}: wanted {f.wanted}, found {f.found}" for f in still))
    return {"bucket": bucket, "dry_run": dry_run, "created": created and not dry_run, "changes": done}


def check(client: Any, settings: BucketSettings) -> tuple[bool, list[bucket_state.Finding]]:
    if not bucket_state.bucket_exists(client, settings.bucket):
        return False, []
    findings = bucket_state.compare(bucket_state.wanted_state(settings), bucket_state.read_state(client, settings.bucket))
    return True, findings


def main(argv: list[str]) -> int:
    args = cli.parse_args(build_parser(), argv)
    cli.start(args)
    bucket = config.bucket_name(args.bucket)
    settings = BucketSettings(bucket, args.retention_days, args.expire_days, args.mode,
                              args.allow_plain_http).validate()
    if args.dry_run and not args.apply:
        raise UsageError("--dry-run goes with --apply")
    if args.environment and not args.print_policies:
        raise UsageError("--environment goes with --print-policies (the bucket itself is shared by every environment)")

    if args.print_policies:
        environment = config.environment_name(args.environment) if args.environment else None
        if environment:
            log(f"the writers' policies allow writing under s3://{bucket}/{environment}/ only")
        cli.print_result(bucket_state.policies(bucket, environment), True, "")
        return 0

    client = store.external_store(region=args.region)
    region = args.region or client.meta.region_name
    if (client.meta.endpoint_url or "").startswith("http://") and not settings.allow_plain_http:
        raise UsageError(
            f"the S3 endpoint {client.meta.endpoint_url} is plain HTTP: the bucket policy this tool sets refuses every "
            "request that is not TLS, so every backup would fail with 403. For a local S3-compatible store (drills, "
            "tests) pass --allow-plain-http (or BACKUP_ALLOW_PLAIN_HTTP=1); for AWS, use its https:// endpoint")

    if args.apply:
        result = apply(client, settings, region, args.dry_run)
        if not result["changes"]:
            human = f"no changes: s3://{bucket} is already in the wanted state"
        else:
            verb = "would change" if args.dry_run else "changed"
            human = f"{verb} s3://{bucket}:\n" + "\n".join(f"  {line}" for line in result["changes"])
        cli.print_result(result, args.json, human)
        return 0

    exists, findings = check(client, settings)
    if not exists:
        raise BackupError(f"s3://{bucket} does not exist: create it with setup_bucket.py --bucket {bucket} --apply")
    failed = [f for f in findings if not f.ok]
    cli.print_result({"bucket": bucket, "ok": not failed, "properties": [f.to_json() for f in findings]},
                     args.json, "\n".join(f.line() for f in findings))
    if failed:
        cli.step_summary(f"### External bucket check: {bucket}\n\n"
                         + "\n".join(f"- FAIL {md_code(f.name)}: wanted {md_code(f.wanted)}; found {md_code(f.found)}" for f in failed))
        raise BackupError(f"s3://{bucket} drifted from the wanted state ({', '.join(f.name for f in failed)}): "
                          f"whoever administers the backup account fixes it with setup_bucket.py --bucket {bucket} --apply "
                          "(read-only credentials cannot). This does not block a restore: the backups stored stay readable")
    return 0


if __name__ == "__main__":
    cli.run(main)
