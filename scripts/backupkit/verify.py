"""Verifying a fetched backup without writing any plaintext to disk: a dump's SHA-256 and
completion trailer, or a ZIP's directory, CRCs, names, attributes and member count."""

from __future__ import annotations

from typing import Any

from .archive_read import read_archive
from .dump_reader import verify_dump
from .retrieve import Fetched


def verify_fetched(fetched: Fetched) -> dict[str, Any]:
    """What was checked, for the report; raises VerificationError on the first problem."""
    if fetched.kind == "database":
        return verify_dump(fetched)
    contents = read_archive(fetched)
    source = (fetched.manifest or {}).get("source", {})
    return {"plaintext_size": contents.plaintext_size, "members": len(contents.members),
            "member_bytes": contents.total_bytes,
            "skipped_objects": source.get("skipped_count", len(source.get("skipped", [])))}
