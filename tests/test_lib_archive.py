"""The files backup's archive in process: whatever the backup writes, its readers accept. Property
tests generate keys, user metadata, serving headers and content types anywhere within S3's limits
(and as S3, or a store that keeps raw bytes, returns them) and send them through the writer, the
ZIP checker and the reader; junk the writer is handed is refused by the writer, never by a reader."""

from __future__ import annotations

import base64
import gc
import os
import string
import sys
import tempfile
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backupkit import archive_read, archive_write, attributes, formats
from backupkit.attributes import (
    METADATA_LIMIT,
    REQUEST_HEADER_LIMIT,
    NotArchivable,
    attribute_problem,
    attributes_of,
    decode_attributes,
    encode_attributes,
    metadata_value_bytes,
    put_parameters,
    wire_text,
)
from backupkit.errors import VerificationError
from backupkit.retrieve import Fetched

WHEN = datetime(2026, 11, 29, 10, 0, 0, tzinfo=UTC)
TOKEN = string.ascii_letters + string.digits + "!#$%&'*+.^_`|~-"  # what an HTTP header name is made of
HEADERS = ("ContentType", "CacheControl", "ContentDisposition", "ContentEncoding", "ContentLanguage")
PREFIX = len("x-amz-meta-")
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Unseekable:
    def __init__(self) -> None:
        self.buf = bytearray()

    def write(self, data: bytes) -> int:
        self.buf += data
        return len(data)

    def flush(self) -> None:
        pass


# -- what S3 returns ----------------------------------------------------------------------------
def returned(raw: bytes) -> str:
    """A header value as botocore returns it: the bytes S3 stored, one character each."""
    return raw.decode("latin-1")


def header_bytes(max_size: int) -> st.SearchStrategy[bytes]:
    """Bytes a client can send in a header: UTF-8 from an SDK, or any bytes but line breaks."""
    return st.one_of(st.text(max_size=max_size // 4).map(str.encode), st.binary(max_size=max_size)).map(
        lambda raw: raw.replace(b"\r", b"").replace(b"\n", b""))


@st.composite
def metadata_within_s3_limits(draw: st.DrawFn) -> tuple[dict[str, str], int]:
    """User metadata as S3 returns it, up to its 2 KB counted as S3 counts (names and values in
    UTF-8, RFC 2047 words decoded); and the bytes it takes in the request header."""
    counted, raw = 0, 0
    metadata: dict[str, str] = {}
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.text(TOKEN, min_size=1, max_size=max(1, min(METADATA_LIMIT - counted, 300)))).lower()
        room = METADATA_LIMIT - counted - len(name)
        if room < 0 or name in metadata:
            break
        kind = draw(st.sampled_from(["ascii", "rfc2047", "bytes"]))
        if kind == "ascii":  # what S3 returns for an ASCII value
            value = draw(st.text(string.printable.replace("\r", "").replace("\n", ""), max_size=room))
            size = len(value)
        elif kind == "rfc2047":  # what S3 returns for a value with non-ASCII characters
            text = draw(st.text(st.characters(blacklist_categories=("Cs",)), max_size=room // 4))
            value = f"=?UTF-8?B?{base64.b64encode(text.encode()).decode()}?="
            size = len(text.encode())
        else:  # what a store that keeps raw bytes (moto) returns
            stored = draw(header_bytes(room))
            value, size = returned(stored), len(stored)
        if raw + PREFIX + len(name) + len(value) > REQUEST_HEADER_LIMIT:
            break
        metadata[name] = value
        counted += len(name) + size
        raw += PREFIX + len(name) + len(value)
    left = METADATA_LIMIT - counted
    if draw(st.booleans()) and "pad" not in metadata and left >= 3 and raw + PREFIX + left <= REQUEST_HEADER_LIMIT:
        metadata["pad"] = "p" * (left - 3)  # exactly at S3's 2 KB
        raw += PREFIX + left
    return metadata, raw


@st.composite
def heads_within_s3_limits(draw: st.DrawFn) -> dict:
    """A GetObject response: user metadata within 2 KB, every header value and metadata entry
    within S3's 8 KB request header together (Content-Disposition over 1 KiB and more)."""
    metadata, raw = draw(metadata_within_s3_limits())
    head: dict = {"Metadata": metadata}
    default = len("binary/octet-stream")  # what S3 answers for an object stored without a content type
    for name in draw(st.permutations(HEADERS)):
        if draw(st.booleans()):
            value = returned(draw(header_bytes(min(REQUEST_HEADER_LIMIT - default - raw, 4096))))
            head[name] = value
            raw += len(value)
    if draw(st.booleans()) and "ContentDisposition" not in head:
        room = REQUEST_HEADER_LIMIT - raw - (0 if head.get("ContentType") else default)
        head["ContentDisposition"] = "d" * room  # exactly at the 8 KB
    return head


def s3_keys() -> st.SearchStrategy[str]:
    """Keys S3 takes: any Unicode, at most 1,024 bytes of UTF-8; some with a NUL, as
    S3-compatible stores accept."""
    text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=1024).map(
        lambda key: key.encode()[:1024].decode("utf-8", "ignore") or "k")
    return st.one_of(text, text.map(lambda key: key[:1000] + "\0.exe"), st.text("ab/", min_size=1000, max_size=1024))


def expected_attributes(head: dict) -> dict:
    """What a restore must put back, said independently of the writer."""
    expected = {"ContentType": head.get("ContentType") or "binary/octet-stream", "Metadata": head["Metadata"]}
    expected.update({name: head[name] for name in HEADERS[1:] if head.get(name)})
    return expected


def read_back(zip_bytes: bytes) -> archive_read.ArchiveContents:
    """The readers' check (verify_backup.py, restore_files.py) of a plain ZIP."""
    with tempfile.NamedTemporaryFile(suffix=".zip") as handle:
        handle.write(zip_bytes)
        handle.flush()
        return archive_read.read_archive(Fetched("files", handle.name, "", formats.plain("files").encryption, None, None, "test.zip"))


# -- the properties -----------------------------------------------------------------------------
@PROPERTY
@given(objects=st.lists(st.tuples(s3_keys(), heads_within_s3_limits(), st.binary(max_size=64)), max_size=4,
                        unique_by=lambda o: o[0]))
def test_whatever_s3_returns_is_archived_and_reads_back_identical(objects):
    writer = archive_write.ArchiveWriter(Unseekable())
    out = writer._gate.sink
    kept = []
    for key, head, body in objects:
        comment = attributes.encode_attributes(head)  # never refused: the head is within S3's limits
        if "\0" in key:  # a ZIP name cannot carry it: refused, never cut short
            with pytest.raises(NotArchivable, match="NUL"):
                writer.add(key, len(body), WHEN, comment, [body])
            continue
        writer.add(key, len(body), WHEN, comment, [body])
        kept.append((key, expected_attributes(head), body))
    writer.close()
    contents = read_back(bytes(out.buf))
    assert [(m.name, m.attributes) for m in contents.members] == [(key, attributes) for key, attributes, _ in kept]
    assert [bytes(out.buf[m.offset:m.offset + m.size]) for m in contents.members] == [body for _, _, body in kept]


anything = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=50),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                        max_leaves=6)


@PROPERTY
@given(head=st.fixed_dictionaries({}, optional={
    "ContentType": st.one_of(st.text(), st.text(min_size=8000, max_size=9000), anything),
    "ContentDisposition": st.one_of(st.text(), st.text("\u674e", min_size=2000, max_size=3000), anything),
    "CacheControl": st.text(string.printable),
    "Metadata": st.one_of(st.dictionaries(st.text(max_size=200), st.text(max_size=3000), max_size=4),
                          st.dictionaries(st.text(TOKEN, min_size=1), anything, max_size=2)),
}))
def test_the_writer_refuses_what_a_reader_would_refuse(head):
    """Handed anything at all, the writer either writes a comment the reader decodes to the very
    attributes it was given, or refuses the object: a reader never meets a comment it refuses."""
    try:
        comment = encode_attributes(head)
    except NotArchivable as refused:
        assert str(refused).startswith("its ")
        return
    assert decode_attributes(comment) == attributes_of(head)
    assert attribute_problem(attributes_of(head)) is None


@PROPERTY
@given(text=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n")))
def test_restored_headers_carry_the_bytes_they_were_read_as(text):
    """botocore reads a header as ISO-8859-1 and sends what it is given as UTF-8: the restore hands
    it the string whose UTF-8 is the bytes S3 returned."""
    stored = text.encode()
    assert wire_text(returned(stored)).encode() == stored
    parameters = put_parameters({"ContentType": returned(stored), "Metadata": {"name": returned(stored)}})
    assert parameters == {"ContentType": text, "Metadata": {"name": text}} if text else {"Metadata": {"name": ""}}


PIECES = st.sampled_from(["=?", "?=", "?B?", "?Q?", "?q?", "UTF-8", "x-unknown", "\xff", "=", "?", " ", "\t", "Zg==", "w6s",
                          "_", "=E4", "\x00", "\u674e", "\r\n"])


@PROPERTY
@given(value=st.lists(st.one_of(PIECES, st.text(max_size=5)), max_size=20).map("".join),
       name=st.one_of(st.text(TOKEN, min_size=1, max_size=20), st.text(max_size=5)))
def test_a_reader_refuses_a_planted_comment_with_one_error_never_a_crash(value, name):
    """Anything in a comment (planted by a writer who holds the passphrase) is either read or
    refused as not this tool's JSON; RFC 2047 look-alikes are counted, never decoded."""
    import json

    assert 0 <= metadata_value_bytes(value) <= len(value)
    for planted in ({"Metadata": {name: value}}, {"ContentType": value, "Metadata": value}, {"ContentDisposition": [value]}):
        try:
            decode_attributes(json.dumps(planted).encode(), "upload.pdf")
        except VerificationError as refused:
            assert "is not the JSON this tool writes" in str(refused)


# -- the bounds a reader keeps --------------------------------------------------------------------
def comment(**attributes) -> bytes:
    import json

    return json.dumps({"ContentType": "text/plain", "Metadata": {}, **attributes}).encode()


@pytest.mark.parametrize("planted, why", [
    ({"Metadata": {"a" * 1000: "b" * 1049}}, "over S3's 2048"),
    ({"Metadata": {"title": "=?UTF-8?B?" + base64.b64encode(("\u674e" * 683).encode()).decode() + "?="}}, "over S3's 2048"),
    ({"Metadata": {"a b": "v"}}, "not an HTTP header name"),
    ({"Metadata": {"a": "line\r\nx-amz-meta-b: injected"}}, "not a header value"),
    ({"Metadata": {"a": "\u674e"}}, "not a header value"),  # botocore never returns it: one character a byte
    ({"Metadata": {"a": 42}}, "not a header value"),
    ({"Metadata": ["a"]}, "not a map"),
    ({"ContentType": "text/plain\nSet-Cookie: x"}, "ContentType is not a header value"),
    ({"ContentDisposition": "d" * 8193}, "over S3's 8192-byte request header"),
    # RFC 2047 words that decode to nothing still take their room in the request header
    ({"Metadata": {f"m{i}": "=?UTF-8?B??= " * 60 for i in range(12)}}, "over S3's 8192-byte request header"),
])
def test_a_planted_comment_beyond_s3s_limits_is_refused(planted, why):
    with pytest.raises(VerificationError, match=why):
        decode_attributes(comment(**planted), "upload.pdf")


def test_comments_written_before_still_read():
    """The format did not change: what earlier versions wrote reads as it did."""
    old = b'{"ContentType":"image/png","Metadata":{"uploaded-by":"zoe"},"CacheControl":"max-age=60"}'
    assert decode_attributes(old) == {"ContentType": "image/png", "Metadata": {"uploaded-by": "zoe"}, "CacheControl": "max-age=60"}
    assert decode_attributes(b"") == {"Metadata": {}}


def test_an_abandoned_archive_writes_nothing_more_and_raises_nothing_later():
    """A failed backup used to end with a stray `ZipFile.__del__` traceback: zipfile, collected,
    wrote its central directory into a sink already closed."""
    class ClosingSink(Unseekable):
        closed = False

        def write(self, data: bytes) -> int:
            if self.closed:
                raise ValueError("write to closed file")
            return super().write(data)

    unraisable = []
    sink = ClosingSink()
    hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        with pytest.raises(RuntimeError), archive_write.ArchiveWriter(sink) as writer:
            writer.add("a.txt", 1, WHEN, b"", [b"a"])
            written = len(sink.buf)
            raise RuntimeError("the next object could not be read")
        sink.closed = True
        del writer
        gc.collect()
    finally:
        sys.unraisablehook = hook
    assert unraisable == [] and len(sink.buf) == written


def test_unnamed_file_has_no_name_and_holds_what_is_written(tmp_path):
    descriptor = archive_read.unnamed_file(str(tmp_path))
    try:
        os.write(descriptor, b"plaintext")
        assert list(tmp_path.iterdir()) == []
        assert os.fstat(descriptor).st_mode & 0o777 == 0o600
        with archive_read.FileSection(descriptor, 5, 4) as section:
            assert section.read() == b"text"
            section.seek(1)
            assert section.read(2) == b"ex"
    finally:
        os.close(descriptor)
