"""An S3 object's attributes (content type, serving headers, user metadata) as the files backup
keeps them: one JSON member comment per object, written by the backup, checked against S3's own
limits by every reader, and turned back into PutObject parameters by the restore.

The backup checks each comment with the very function the readers use (`encode_attributes` calls
`decode_attributes`), so it never writes one they refuse; what S3 accepts, the readers accept.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .errors import Problem, VerificationError
from .output import shown

# Headers kept with each object besides its bytes. ContentType and Metadata are what the contract
# asks for; the other standard headers change how browsers serve a file, so they come along.
ATTRIBUTES = ("ContentType", "Metadata", "CacheControl", "ContentDisposition", "ContentEncoding", "ContentLanguage")
HEADERS = ("ContentType", *ATTRIBUTES[2:])
DEFAULT_CONTENT_TYPE = "binary/octet-stream"

# S3's limits, the readers' bounds. User metadata: 2 KB, "the sum of the number of bytes in the
# UTF-8 encoding of each key and value" (S3 decodes RFC 2047 words before it counts); the whole
# PUT request header: 8 KB, which bounds every header value and metadata entry together.
METADATA_LIMIT = 2048
REQUEST_HEADER_LIMIT = 8192
METADATA_PREFIX = "x-amz-meta-"
COMMENT_LIMIT = 0xFFFF  # a ZIP member comment's length field
# A metadata name is an HTTP header name (RFC 9110 token), whatever its length; S3 lower-cases it.
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
# A header value as an HTTP client returns it: one character per byte (ISO-8859-1), any byte but
# the line breaks a header cannot hold. S3 returns bytes its clients sent (UTF-8, in practice).
_HEADER_VALUE = re.compile(r"[^\r\n\u0100-\U0010ffff]*")


class NotArchivable(Exception):
    """An object the files backup cannot keep as it is; the message says why ("its …")."""


def attributes_of(head: dict[str, Any]) -> dict[str, Any]:
    """The attributes kept of a GetObject/HeadObject response (or a dict with those keys)."""
    metadata = head.get("Metadata") or {}
    attributes: dict[str, Any] = {"ContentType": head.get("ContentType") or DEFAULT_CONTENT_TYPE,
                                  "Metadata": dict(metadata) if isinstance(metadata, dict) else metadata}
    for name in ATTRIBUTES[2:]:
        if head.get(name):
            attributes[name] = head[name]
    return attributes


def encode_attributes(head: dict[str, Any]) -> bytes:
    """The member comment (JSON of an object's ContentType, user Metadata and serving headers),
    checked as the readers will check it: NotArchivable when they would refuse it."""
    attributes = attributes_of(head)
    why = attribute_problem(attributes)
    if why is not None:
        raise NotArchivable(f"its {why}: S3 would not store it, so a restore could not put it back")
    try:
        comment = json.dumps(attributes, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()
    except (TypeError, ValueError, UnicodeEncodeError):
        raise NotArchivable("its attributes are not text") from None
    if len(comment) > COMMENT_LIMIT:
        raise NotArchivable(f"its attributes take {len(comment)} bytes as JSON, more than a ZIP comment holds")
    if decode_attributes(comment) != attributes:  # by construction: attribute_problem is the readers' check
        raise NotArchivable("its attributes would not read back as they are")
    return comment


def decode_attributes(comment: bytes, name: str = "member") -> dict[str, Any]:
    """The attributes from a member comment; an empty comment (a ZIP made by another tool)
    gives none. Raises VerificationError for a comment that is not the JSON this tool writes, or
    whose values S3 would not take back as they are."""
    if not comment:
        return {"Metadata": {}}

    def bad(why: str) -> VerificationError:
        return VerificationError(f"the ZIP comment of '{shown(name)}' is not the JSON this tool writes ({why})",
                                 Problem.BAD_CONTENT)

    try:
        attributes = json.loads(comment.decode())
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad("not JSON") from None
    if not isinstance(attributes, dict):
        raise bad("not an object")
    result = {key: attributes[key] for key in ATTRIBUTES if attributes.get(key) is not None}
    result.setdefault("Metadata", {})
    why = attribute_problem(result)
    if why is not None:
        raise bad(why)
    result["Metadata"] = dict(result["Metadata"])
    return result


def attribute_problem(attributes: dict[str, Any]) -> str | None:
    """Why S3 would not store these attributes as they are (None: it would). The bounds are S3's:
    header values as S3 returns them, metadata names of any length within the 2 KB it allows."""
    raw = 0
    for key in HEADERS:
        value = attributes.get(key)
        if value is None:
            continue
        if not _header_value(value):
            return f"{key} is not a header value (a string without line breaks, one character a byte)"
        raw += len(value)
    metadata = attributes.get("Metadata", {})
    if not isinstance(metadata, dict):
        return "Metadata is not a map of names to values"
    counted = 0
    for name, value in metadata.items():
        if not (isinstance(name, str) and _TOKEN.fullmatch(name)):
            return "Metadata holds a name that is not an HTTP header name"
        if not _header_value(value):
            return f"Metadata value of '{shown(name[:64])}' is not a header value"
        counted += len(name) + metadata_value_bytes(value)
        raw += len(METADATA_PREFIX) + len(name) + len(value)
    if counted > METADATA_LIMIT:
        return f"user metadata is {counted} bytes, over S3's {METADATA_LIMIT}"
    if raw > REQUEST_HEADER_LIMIT:
        return f"headers and metadata take {raw} bytes, over S3's {REQUEST_HEADER_LIMIT}-byte request header"
    return None


def _header_value(value: Any) -> bool:
    return isinstance(value, str) and _HEADER_VALUE.fullmatch(value) is not None


def metadata_value_bytes(value: str) -> int:
    """A metadata value's size as S3 counts it: the bytes it stands for. S3 returns a value
    holding non-ASCII characters as RFC 2047 encoded words, longer than what it counted, and
    decodes them again when it stores one. Each encoded word here counts the bytes its payload
    decodes to (whitespace between two words is not text): never more than S3 counts, so never
    stricter than S3, and no decoding that can fail."""
    if "=?" not in value:
        return len(value)
    size, end, after_word = 0, 0, False
    for word in _ENCODED_WORD.finditer(value):
        between = value[end:word.start()]
        if not (after_word and between.strip(" \t") == ""):
            size += len(between)
        kind, payload = word.group(1).upper(), word.group(2)
        if kind == "B":
            size += len(payload.rstrip("=")) * 3 // 4
        else:
            size += len(payload) - 2 * len(_QUOTED_BYTE.findall(payload))
        end, after_word = word.end(), True
    return min(size + len(value) - end, len(value))


_ENCODED_WORD = re.compile(r"=\?[^?\s]*\?([BbQq])\?([^?\s]*)\?=")
_QUOTED_BYTE = re.compile(r"=[0-9A-Fa-f]{2}")


# -- putting them back --------------------------------------------------------------------------
def put_parameters(attributes: dict[str, Any]) -> dict[str, Any]:
    """PutObject parameters that store exactly the attributes a GetObject returned.

    botocore returns header values decoded as ISO-8859-1 (one character a byte) but sends the
    values it is given encoded as UTF-8: a value with non-ASCII characters goes back as the
    string whose UTF-8 is its bytes. (Bytes that are not UTF-8 go back as they read, the one case
    that does not round-trip: no S3 client writes them.)"""
    parameters: dict[str, Any] = {}
    for key, value in attributes.items():
        if key == "Metadata":
            parameters[key] = {name: wire_text(text) for name, text in value.items()}
        elif value:
            parameters[key] = wire_text(value)
    parameters.setdefault("Metadata", {})
    return parameters


def wire_text(value: str) -> str:
    """The string botocore must be given for a header to carry the bytes `value` was read as."""
    if value.isascii():
        return value
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


def allow_non_ascii_metadata(client: Any) -> None:
    """Let `client` send metadata values as put_parameters makes them: botocore refuses non-ASCII
    metadata before the request is built (S3 accepts it, and returns it RFC 2047-encoded)."""
    from botocore.handlers import validate_ascii_metadata

    for operation in ("PutObject", "CreateMultipartUpload"):
        client.meta.events.unregister(f"before-parameter-build.s3.{operation}", validate_ascii_metadata)
