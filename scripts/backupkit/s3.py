"""S3 clients (beneath store.py for the external bucket; the app's buckets for the files backup
and its restore), and error translation.

The external bucket uses boto3's own credential chain and endpoint variables (AWS_PROFILE,
AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3, …). The source bucket may have its own SOURCE_AWS_*
credentials. Retries: botocore's standard mode, MAX_ATTEMPTS attempts per request.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import botocore.exceptions

if TYPE_CHECKING:
    from botocore.config import Config

from .config import is_http_url
from .errors import BackupError, UsageError

T = TypeVar("T")
# A response body that breaks off after its headers arrived: botocore's retries have ended by
# then, so reading a body is retried here (the whole GET again).
BODY_ERRORS = (
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.ReadTimeoutError,
)

MAX_ATTEMPTS = 5  # botocore standard retry mode: 1 try + 4 retries with backoff, per request
MAX_RESUMES = 100  # resumptions of one body in all (ResumableBody), however much each brought
# Seconds; overridable (BACKUP_S3_CONNECT_TIMEOUT / BACKUP_S3_READ_TIMEOUT) for slow links and
# for tests that make an endpoint stall.
CONNECT_TIMEOUT = 10
READ_TIMEOUT = 60


def _seconds(variable: str, default: float) -> float:
    value = os.environ.get(variable)
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0
    if not seconds > 0:
        raise UsageError(f"invalid {variable} {value!r}: use a positive number of seconds")
    return seconds


def _config(max_pool_connections: int = 16) -> Config:
    from botocore.config import Config  # here, with boto3: see store.external_store_soon

    return Config(
        retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
        connect_timeout=_seconds("BACKUP_S3_CONNECT_TIMEOUT", CONNECT_TIMEOUT),
        read_timeout=_seconds("BACKUP_S3_READ_TIMEOUT", READ_TIMEOUT),
        max_pool_connections=max_pool_connections,
        # Object Lock buckets reject writes without a checksum: always send one.
        request_checksum_calculation="when_supported",
    )


ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "SOURCE_AWS_ENDPOINT_URL")


def check_endpoints() -> None:
    """An endpoint variable that is set must be an http(s) URL with a host: botocore would fail
    later with a bare ValueError."""
    for variable in ENDPOINT_VARIABLES:
        value = os.environ.get(variable)
        if not value:
            continue
        if not is_http_url(value, check_port=True):
            raise UsageError(f"{variable} is not an endpoint URL: expected e.g. https://s3.eu-central-1.amazonaws.com "
                             "or http://127.0.0.1:9000")


def client(max_pool_connections: int = 16, region: str | None = None):  # noqa: ANN201 (boto3 client type)
    """A client from boto3's own credential chain and endpoint variables: the external store's
    (store.py), and the restore's target bucket's (the same identity writes it back)."""
    import boto3

    check_endpoints()
    warn_of_ignored_profile()
    with s3_errors("create the S3 client"):
        session = boto3.session.Session(region_name=region)
        _sessions.setdefault("external bucket", session)
        return session.client("s3", config=_config(max_pool_connections))


# The sessions this run made clients from, to name the identity an access error came from.
_sessions: dict[str, Any] = {}
_warned: list[str] = []


def warn_of_ignored_profile() -> None:
    """boto3 takes AWS_ACCESS_KEY_ID before AWS_PROFILE: an operator who switched to a profile
    with the keys of an earlier step still set would silently act as the keys' identity."""
    profile, key = os.environ.get("AWS_PROFILE"), os.environ.get("AWS_ACCESS_KEY_ID")
    if profile and key and not _warned:
        _warned.append(profile)
        print(f"warning: AWS_PROFILE is set ({profile}) but so is AWS_ACCESS_KEY_ID: boto3 uses the keys (access key id "
              f"{key}), not the profile. To use the profile: unset AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY "
              "AWS_SESSION_TOKEN; to use the keys, unset AWS_PROFILE", file=sys.stderr, flush=True)


_METHODS = {"env": "AWS_ACCESS_KEY_ID", "explicit": "SOURCE_AWS_ACCESS_KEY_ID", "shared-credentials-file": "profile {profile}",
            "config-file": "profile {profile}", "assume-role": "the role of profile {profile}", "sso": "the SSO login of profile {profile}",
            "iam-role": "the instance's role", "container-role": "the container's role",
            "assume-role-with-web-identity": "a web identity (OIDC) role"}


def identities() -> str:
    """'access key id AKIA… (from AWS_ACCESS_KEY_ID)' for each session used, or '' (not a secret:
    it names who asked, so an operator sees which credentials S3 refused)."""
    said = []
    for what, session in list(_sessions.items()):
        credentials = None
        with contextlib.suppress(Exception):  # naming them is a courtesy; the error is what matters
            credentials = session.get_credentials()
        if credentials is None or not credentials.access_key:
            continue
        source = _METHODS.get(credentials.method, credentials.method or "boto3's chain").format(profile=session.profile_name)
        said.append(f"access key id {credentials.access_key} (from {source}{f', for the {what}' if len(_sessions) > 1 else ''})")
    return "; ".join(said)


def source_client(profile: str | None = None, max_pool_connections: int = 16):  # noqa: ANN201
    """Client for the app's bucket: SOURCE_AWS_PROFILE / --source-profile, SOURCE_AWS_* keys,
    or, when neither is set, the same credentials as the external bucket."""
    check_endpoints()
    import boto3

    profile = profile or os.environ.get("SOURCE_AWS_PROFILE")
    region = os.environ.get("SOURCE_AWS_REGION")
    endpoint = os.environ.get("SOURCE_AWS_ENDPOINT_URL")
    with s3_errors("create the source S3 client"):
        if profile:
            session = boto3.session.Session(profile_name=profile, region_name=region)
        elif os.environ.get("SOURCE_AWS_ACCESS_KEY_ID"):
            session = boto3.session.Session(
                aws_access_key_id=os.environ["SOURCE_AWS_ACCESS_KEY_ID"],
                aws_secret_access_key=os.environ.get("SOURCE_AWS_SECRET_ACCESS_KEY"),
                aws_session_token=os.environ.get("SOURCE_AWS_SESSION_TOKEN") or None,
                region_name=region,
            )
        else:
            warn_of_ignored_profile()
            session = boto3.session.Session(region_name=region)
        _sessions.setdefault("source bucket", session)
        return session.client("s3", endpoint_url=endpoint or None, config=_config(max_pool_connections))


# A bucket of another account answers AccessDenied, not NoSuchBucket: a mistyped name looks like
# a permission problem.
BUCKET_NAME_HINT = "and that the bucket name is right (a bucket of another account answers AccessDenied too)"
_HINTS = {
    "NoSuchBucket": "the bucket does not exist: check BACKUP_BUCKET / --bucket and the region",
    "AccessDenied": f"access denied: check the credentials and that their IAM policy allows this, {BUCKET_NAME_HINT}",
    "AllAccessDisabled": "access denied: check the credentials and that their IAM policy allows this",
    "InvalidAccessKeyId": "the AWS access key is not valid: check the credentials",
    "SignatureDoesNotMatch": "the AWS secret key does not match the access key: check the credentials",
    "ExpiredToken": "the AWS credentials have expired: renew them",
    "InvalidToken": "the AWS session token is not valid: renew the credentials",
    "NoSuchKey": "no such object",
    "NoSuchVersion": "no such object version",
}


# Answers that mean "these credentials may not": the error names them.
CREDENTIAL_ERRORS = ("AccessDenied", "403", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                     "ExpiredToken", "InvalidToken")

# Actions (as `explain` is told them) that write the external bucket.
WRITES = ("upload", "start the multipart upload", "complete the multipart upload", "write the manifest")


def explain(exc: BaseException, action: str) -> BackupError:
    """A BackupError naming the S3 action, the error code and what to do. Never includes
    credentials (botocore messages do not carry them)."""
    if isinstance(exc, BackupError):
        return exc
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code") or str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?"))
        hint = _HINTS.get(code) or error.get("Message") or "see the S3 error code"
        if code in ("AccessDenied", "403") and action.startswith(WRITES):
            hint = ("denied by a bucket policy or missing s3:PutObject: check the bucket with setup_bucket.py --check "
                    "(a TLS-only policy refuses a plain-HTTP endpoint), and the writer's IAM policy against "
                    f"setup_bucket.py --print-policies (write_only), {BUCKET_NAME_HINT}")
        elif code == "403":
            hint = f"access denied: check the credentials and that their IAM policy allows this, {BUCKET_NAME_HINT}"
        if code in CREDENTIAL_ERRORS and (who := identities()):
            hint += f"; credentials used: {who}"
            if os.environ.get("AWS_PROFILE") and os.environ.get("AWS_ACCESS_KEY_ID"):
                hint += " (AWS_PROFILE is ignored while AWS_ACCESS_KEY_ID is set: unset the keys to use the profile)"
        return BackupError(f"could not {action}: S3 answered {code}: {hint}")
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return BackupError(f"could not {action}: no AWS credentials found (set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
    if isinstance(exc, (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectionClosedError)):
        return BackupError(f"could not {action}: cannot reach the S3 endpoint ({exc.kwargs.get('endpoint_url', '?')}) after {MAX_ATTEMPTS} attempts")
    if isinstance(exc, (botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectTimeoutError)):
        return BackupError(f"could not {action}: the S3 endpoint timed out after {MAX_ATTEMPTS} attempts")
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return BackupError(f"could not {action}: {exc}")
    return BackupError(f"could not {action}: {type(exc).__name__}: {exc}")


def error_code(exc: BaseException) -> str | None:
    if isinstance(exc, botocore.exceptions.ClientError):
        return exc.response.get("Error", {}).get("Code")
    return None


@contextlib.contextmanager
def s3_errors(action: str) -> Iterator[None]:
    """Turn botocore exceptions raised inside into a BackupError saying what failed."""
    try:
        yield
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise explain(exc, action) from exc


def read_body(action: str, get: Callable[[], Any], consume: Callable[[Any], T]) -> T:
    """`consume(get()["Body"])`, with the GET repeated (up to MAX_ATTEMPTS) when the body breaks off."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        with s3_errors(action):
            body = get()["Body"]  # botocore retries the request itself
        try:
            return consume(body)
        except BODY_ERRORS as exc:
            if attempt == MAX_ATTEMPTS:
                raise BackupError(f"could not {action}: the download broke off {MAX_ATTEMPTS} times ({exc})") from exc
            print(f"warning: {action}: the download broke off ({type(exc).__name__}); trying again "
                  f"({attempt + 1}/{MAX_ATTEMPTS})", file=sys.stderr, flush=True)
            time.sleep(min(0.5 * 2 ** (attempt - 1), 8))
    raise AssertionError("unreachable")


class ResumableBody:
    """One object version's body, read front to back as one stream: when the connection breaks
    off after the answer's headers came (botocore's retries have ended by then), the GET is sent
    again for the rest only (Range: bytes=N-, the same VersionId, If-Match on the first answer's
    ETag), so no byte is fetched twice and the reader never sees a seam. Up to MAX_ATTEMPTS GETs
    in a row that bring nothing new (MAX_RESUMES resumptions in all), then a BackupError; each break is warned of on stderr.

    `get(**extra)` sends the GetObject (with the caller's Bucket, Key, VersionId and error
    translation) and returns its answer; `extra` holds Range and IfMatch on a resumption."""

    def __init__(self, action: str, get: Callable[..., Any]):
        self._action = action
        self._get = get
        self._body: Any = None
        self._etag: str | None = None
        self.position = 0  # bytes handed over so far
        self._failures = 0  # GETs in a row that broke off before bringing a byte
        self.resumed = 0

    def _open(self) -> None:
        extra: dict[str, str] = {}
        if self.position:
            extra["Range"] = f"bytes={self.position}-"
            if self._etag:
                extra["IfMatch"] = self._etag
        with s3_errors(self._action):
            answer = self._get(**extra)  # botocore retries the request itself
        if self._etag is None:
            self._etag = answer.get("ETag")
        self._body = answer["Body"]

    def read(self, size: int = -1) -> bytes:
        while True:
            if self._body is None:
                self._open()
            try:
                chunk = self._body.read(size)
            except BODY_ERRORS as exc:
                self._broke_off(exc)
                continue
            if chunk:
                self.position += len(chunk)
                self._failures = 0
            return chunk

    read1 = read

    def _broke_off(self, exc: BaseException) -> None:
        with contextlib.suppress(Exception):
            self._body.close()
        self._body = None
        self._failures += 1
        if self._failures >= MAX_ATTEMPTS:
            raise BackupError(f"could not {self._action}: the download broke off {MAX_ATTEMPTS} times ({exc})") from exc
        if self.resumed >= MAX_RESUMES:
            raise BackupError(f"could not {self._action}: the download broke off {MAX_RESUMES + 1} times in all ({exc})") from exc
        self.resumed += 1
        where = f"resuming from byte {self.position:,}" if self.position else "trying again"
        print(f"warning: {self._action}: the download broke off ({type(exc).__name__}); {where} "
              f"({self._failures + 1}/{MAX_ATTEMPTS})", file=sys.stderr, flush=True)
        time.sleep(min(0.5 * 2 ** (self._failures - 1), 8))

    def close(self) -> None:
        if self._body is not None:
            with contextlib.suppress(Exception):
                self._body.close()
            self._body = None
