"""Restoring a database dump: `openssl -d` straight into `psql --single-transaction`, with the end
of the dump held back until everything verified (psql commits when its input ends)."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from typing import Any

from . import config, crypto
from .errors import BackupError, VerificationError
from .pipeline import Pipeline, Tally, hold_back
from .postgres import has_trailer
from .retrieve import check_plaintext


@dataclass
class Restored:
    plaintext_size: int
    seconds: float


def restore_stream(path: str, passphrase: str, target: config.DatabaseTarget, psql: str,
                   manifest: dict[str, Any] | None) -> Restored:
    """Decrypt `path` into psql, releasing the held-back end only when everything verified."""
    began = time.monotonic()
    plaintext = Tally()
    with Pipeline() as pipeline:
        fd = crypto.passphrase_pipe(passphrase)
        decrypt = pipeline.start("openssl", [*crypto.openssl_args(fd, decrypt=True), "-in", path],
                                 env=config.child_env(), pass_fds=[fd])
        restore = pipeline.start(
            "psql",
            [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction", *target.args()],
            env=target.env(), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, die_with_parent=True,
        )
        held, broken = hold_back(decrypt.stdout, restore.stdin, plaintext)
        if decrypt.wait() != 0:
            raise VerificationError(f"decryption failed, wrong passphrase or corrupted backup ({decrypt.describe_failure()})")
        if manifest is not None:
            check_plaintext(plaintext, manifest, "dump")
        if not has_trailer(held):
            raise VerificationError("the dump is incomplete: pg_dump's completion trailer is missing")
        if not broken:
            try:
                restore.stdin.write(held)
                restore.stdin.close()
            except BrokenPipeError:
                pass
        if restore.wait() != 0:
            message = restore.describe_failure()
            if "restrict" in message:
                message += (f" — this psql is older than the pg_dump that made the backup "
                            f"({(manifest or {}).get('source', {}).get('pg_dump_version', '?')}): use a newer psql (--psql)")
            raise BackupError(f"the restore failed and was rolled back: {message}")
    return Restored(plaintext.size, time.monotonic() - began)
