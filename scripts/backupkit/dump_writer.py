"""Writing a database backup, the mirror of dump_reader.py: pg_dump → the format's compression
stage → its encryption stage → the streaming upload → the manifest, written last.

The upload is completed only when every stage exited 0; otherwise it is aborted and no manifest
is written. Nothing plaintext touches the disk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from . import crypto
from .formats import Format
from .laststep import LastStep
from .manifest import for_upload
from .pgurl import DatabaseTarget
from .pipeline import Pipeline
from .profile import DumpRows, ObservedTally, profile_key, send_database_profile
from .progress import Progress
from .streams import Tally, copy
from .upload import StreamingUpload

# pg_dump's flags for every backup (docs/contract.md): plain SQL that drops and recreates what it
# holds, and no owners or grants, so it restores as the app's own role.
PG_DUMP_FLAGS = ("--format=plain", "--clean", "--if-exists", "--no-owner", "--no-privileges")


@dataclass
class DumpWriter:
    """One database backup in `fmt` (at compression `level`), of `database` with `pg_dump`."""

    fmt: Format
    level: int | None
    passphrase: str
    database: DatabaseTarget
    pg_dump: str

    def write(self, client: Any, bucket: str, key: str, *, environment: str, started_at: datetime,
              source: dict[str, Any], on_interrupt: Callable[[Callable[[], str]], None]) -> dict[str, Any]:
        """Dump, compress, encrypt and upload to s3://bucket/key, then write the manifest (whose
        `source` is given); returns the manifest. `client` may be a Future of the S3 client (made
        while the dump starts); `on_interrupt` is given what to say of the run if it is stopped."""
        rows = DumpRows()  # the loss tripwire's profile: rows per table, counted as the SQL goes past
        plaintext, compressed = ObservedTally(rows), Tally()
        progress = Progress("uploaded")
        with StreamingUpload(client, bucket, key) as upload, Pipeline() as pipeline, \
                StreamingUpload(client, bucket, profile_key(key)) as profile_upload:
            last = LastStep(upload, bucket)
            on_interrupt(last.left)
            dump = pipeline.start("pg_dump", [self.pg_dump, *PG_DUMP_FLAGS, *self.database.args()], env=self.database.env())
            ciphertext = self.fmt.start_writing(pipeline, dump.stdout, self.passphrase, self.level, plaintext, compressed)
            copy(ciphertext, upload.write, progress=progress.update)
            pipeline.finish()  # raises unless every stage exited 0
            # The manifest's key_id (0.15 s of PBKDF2), derived while the last parts upload: during
            # the dump every core is busy, and it would delay the dump by as much.
            crypto.start_key_ids([self.passphrase])
            upload.flush()
            profile = send_database_profile(profile_upload, key, rows, self.fmt.encryption, self.passphrase)  # completed after the backup
            key_id = crypto.key_id(self.passphrase)
            progress.done()
            # From here a signal no longer stops the backup half-way: it is completed with its manifest.
            return last.run(client.result() if hasattr(client, "result") else client, lambda: for_upload(
                upload, plaintext, kind=self.fmt.kind, environment=environment, started_at=started_at, key_id=key_id,
                source=source, compression=self.fmt.manifest_compression(compressed), profile=profile.field(),
                encryption=self.fmt.encryption.name,
            ), before_manifest=(profile_upload,))
