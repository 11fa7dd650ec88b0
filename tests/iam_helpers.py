"""A moto server that enforces IAM, and IAM users holding the policies setup_bucket.py prints.

moto authenticates and authorizes every request once its first INITIAL_NO_AUTH_ACTION_COUNT
requests are spent. We spend exactly those on creating an `admin` user (create_user,
put_user_policy, create_access_key) with the fixed test credentials; from then on only IAM users'
keys are accepted, and each request is checked against the user's identity policies.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import boto3
import botocore.exceptions

from dev.harness import free_port

ROOT_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-key"}
REGION = "us-east-1"
BOOTSTRAP_CALLS = 3  # create_user, put_user_policy, create_access_key for `admin`
ADMIN_POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}

# moto authorizes each S3 request under the name of its API operation (botocore's), not the IAM
# action AWS checks for it: PUT ?object-lock is checked as s3:PutObjectLockConfiguration, where
# AWS checks s3:PutBucketObjectLockConfiguration. So that a printed policy is tested for what it
# grants on AWS, each IAM action it names also grants the operations AWS authorizes with it
# (AWS's "Actions, resources, and condition keys for Amazon S3"); an action not named grants none.
OPERATIONS_OF_ACTION = {
    "s3:PutBucketObjectLockConfiguration": ["s3:PutObjectLockConfiguration"],
    "s3:GetBucketObjectLockConfiguration": ["s3:GetObjectLockConfiguration"],
    "s3:PutEncryptionConfiguration": ["s3:PutBucketEncryption", "s3:DeleteBucketEncryption"],
    "s3:GetEncryptionConfiguration": ["s3:GetBucketEncryption"],
    "s3:PutBucketPublicAccessBlock": ["s3:PutPublicAccessBlock", "s3:DeletePublicAccessBlock"],
    "s3:GetBucketPublicAccessBlock": ["s3:GetPublicAccessBlock"],
    "s3:PutLifecycleConfiguration": ["s3:PutBucketLifecycleConfiguration", "s3:PutBucketLifecycle",
                                     "s3:DeleteBucketLifecycle"],
    "s3:GetLifecycleConfiguration": ["s3:GetBucketLifecycleConfiguration", "s3:GetBucketLifecycle"],
    "s3:ListBucket": ["s3:ListObjects", "s3:ListObjectsV2", "s3:HeadBucket"],
    "s3:ListBucketVersions": ["s3:ListObjectVersions"],
    "s3:ListBucketMultipartUploads": ["s3:ListMultipartUploads"],
    "s3:ListMultipartUploadParts": ["s3:ListParts"],
    "s3:GetObject": ["s3:HeadObject", "s3:GetObjectAttributes"],
    "s3:GetObjectVersion": ["s3:GetObject", "s3:HeadObject"],
    "s3:PutObject": ["s3:CreateMultipartUpload", "s3:UploadPart", "s3:CompleteMultipartUpload",
                     "s3:CopyObject", "s3:UploadPartCopy"],
    "s3:DeleteObject": ["s3:DeleteObjects"],
}


def as_moto_checks_it(policy: dict) -> dict:
    """`policy` with the operation names moto checks added beside each IAM action that grants them
    (OPERATIONS_OF_ACTION); Deny statements widen the same way, so a denial stays a denial."""
    statements = []
    for statement in policy["Statement"]:
        named = statement["Action"]
        named = [named] if isinstance(named, str) else list(named)
        widened = named + [op for action in named for op in OPERATIONS_OF_ACTION.get(action, []) if op not in named]
        statements.append({**statement, "Action": widened})
    return {**policy, "Statement": statements}


@dataclass(frozen=True)
class User:
    name: str
    access_key_id: str
    secret_access_key: str
    endpoint: str

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
        }

    def client(self, service: str = "s3"):
        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=self.access_key_id, aws_secret_access_key=self.secret_access_key)


class IamS3Server:
    """`moto_server` as a subprocess (its IAM enforcement is process-wide, so it cannot share the
    in-process server the other tests use)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen | None = None
        self.admin: User | None = None

    def start(self) -> IamS3Server:
        binary = Path(sys.executable).parent / "moto_server"
        if not binary.exists():
            binary = Path(shutil.which("moto_server") or "moto_server")
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(BOOTSTRAP_CALLS)}
        self._process = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(self.port)], env=env,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:  # a TCP connect, not a request: requests would spend the unauthenticated budget
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self._process.poll() is not None:
                    self.stop()
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        try:
            root = boto3.client("iam", endpoint_url=self.endpoint, region_name=REGION,
                                aws_access_key_id=ROOT_KEYS["AWS_ACCESS_KEY_ID"],
                                aws_secret_access_key=ROOT_KEYS["AWS_SECRET_ACCESS_KEY"])
            self.admin = self._create_user(root, "admin", ADMIN_POLICY)
            self._assert_enforced()
        except BaseException:
            self.stop()
            raise
        return self

    def _assert_enforced(self) -> None:
        """The budget is spent: the root test keys no longer work, the admin's do."""
        root = boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=ROOT_KEYS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=ROOT_KEYS["AWS_SECRET_ACCESS_KEY"])
        try:
            root.list_buckets()
        except botocore.exceptions.ClientError as exc:
            assert exc.response["Error"]["Code"] == "InvalidAccessKeyId", exc.response
        else:
            raise AssertionError("moto_server is not enforcing IAM")
        self.admin.client().list_buckets()

    def _create_user(self, iam, name: str, policy: dict) -> User:
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName=f"{name}-policy",
                            PolicyDocument=json.dumps(as_moto_checks_it(policy)))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return User(name, key["AccessKeyId"], key["SecretAccessKey"], self.endpoint)

    def user(self, name: str, policy: dict) -> User:
        """A new IAM user holding exactly `policy` (created with the admin's keys)."""
        return self._create_user(self.admin.client("iam"), name, policy)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


def error_code(call, *args, **kwargs) -> str | None:
    """The S3 error code `call` fails with, or None when it succeeds."""
    try:
        call(*args, **kwargs)
    except botocore.exceptions.ClientError as exc:
        return exc.response["Error"]["Code"]
    return None
