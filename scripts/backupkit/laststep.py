"""The last step of a backup: complete the upload, then write its manifest, with signals held.

Until the completion request is sent, a signal aborts the upload and nothing is left. From then
on the step runs to its end (a few milliseconds), so a signal never leaves a completed object
without its manifest; the run then stops with the signal's exit status and a line naming the
backup it completed. If S3 does not answer within signals.LAST_STEP_GRACE seconds of the signal,
the step is abandoned and the line says what may be left.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import signals
from .errors import BackupError
from .manifest import write_manifest
from .upload import StreamingUpload


class LastStep:
    """`run()` completes `upload` and writes the manifest; `left()` says what the run has left
    in the bucket so far (for cli.on_interrupt)."""

    def __init__(self, upload: StreamingUpload, bucket: str):
        self.upload = upload
        self.bucket = bucket
        self.manifest_written = False

    def run(self, client: Any, manifest_for: Callable[[], dict[str, Any]],
            before_manifest: tuple[StreamingUpload, ...] = ()) -> dict[str, Any]:
        """The manifest written. `manifest_for()` builds it from the completed upload; call with
        every part uploaded (upload.flush()) so that this step is two requests (and one more
        per upload of `before_manifest`, completed after the backup: its profile)."""
        with signals.held():
            signals.finish(self.upload.complete)
            for extra in before_manifest:
                try:
                    signals.finish(extra.complete)
                except BackupError as exc:
                    raise BackupError(f"{exc} (the backup object exists but counts as incomplete: no manifest)") from exc
            manifest = manifest_for()
            signals.finish(write_manifest, client, self.bucket, manifest)
            self.manifest_written = True
        return manifest

    def left(self) -> str:
        where = f"s3://{self.bucket}/{self.upload.key}"
        version = f" (version {self.upload.version_id})" if self.upload.version_id else ""
        if self.upload.state == "completed" and self.manifest_written:
            return f"the backup {where}{version} had been completed with its manifest: it is a complete backup"
        if self.upload.state == "completed":
            return (f"{where}{version} had been completed but its manifest was not written: an incomplete backup, "
                    "which readers skip (list_backups.py shows it); the next run makes a complete one")
        if self.upload.state == "completing":
            return (f"S3 had not answered the completion of {where} within {signals.LAST_STEP_GRACE:.0f} s: that object "
                    "may exist without its manifest, an incomplete backup, which readers skip; the next run makes "
                    "a complete one")
        return ""
