"""The exceptions a script turns into `error: …` lines and exit codes.

Messages are written for the operator: what went wrong and what to do next. They never hold a
secret; `cli.run` additionally redacts every known secret before printing anything.
"""


class BackupError(Exception):
    """An operational failure: exit status 1."""


class UsageError(BackupError):
    """Bad flags, variables or input: exit status 2."""


class VerificationError(BackupError):
    """A backup failed a check (size, hash, HMAC, trailer, passphrase): the backup's fault."""
