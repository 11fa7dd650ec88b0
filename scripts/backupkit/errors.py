"""The exceptions a script turns into `error: …` lines and exit codes, and why a backup was not used.

Messages are written for the operator: what went wrong and what to do next. They never hold a
secret; `cli.run` additionally redacts every known secret before printing anything.
"""

from __future__ import annotations

import enum


class BackupError(Exception):
    """An operational failure: exit status 1."""


class UsageError(BackupError):
    """Bad flags, variables or input: exit status 2."""


class Problem(enum.Enum):
    """Why a backup cannot be used: data for the readers (skip reasons, listings, reports)."""

    INCOMPLETE = "incomplete"  # no manifest: the backup run did not finish
    BAD_MANIFEST = "bad manifest"  # unreadable, oversized, or not matching where it was found
    SUSPICIOUS = "suspicious"  # its name's time is in the future or far from when S3 stored it
    UNKNOWN_PASSPHRASE = "unknown passphrase"  # noqa: S105 - a reason, not a secret: made with another passphrase
    CORRUPT = "corrupt"  # size or SHA-256 differ from the manifest
    UNDECRYPTABLE = "undecryptable"  # decryption failed (HMAC, padding, stream)
    BAD_CONTENT = "bad content"  # no dump trailer, damaged ZIP, not the kind it claims to be
    UNREADABLE = "unreadable"  # S3 refuses GetObject: an archived storage class, SSE-C, a KMS key we may not use


class VerificationError(BackupError):
    """A backup failed a check (size, hash, HMAC, trailer, passphrase): the backup's fault, so
    `--latest` goes on to an older one."""

    def __init__(self, message: str, problem: Problem = Problem.BAD_CONTENT):
        super().__init__(message)
        self.problem = problem
