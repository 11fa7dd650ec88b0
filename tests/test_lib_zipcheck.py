"""The streaming ZIP checker: archives as zipfile writes them on a non-seekable stream (data
descriptors), fed in chunks of every size; damage, truncation and trailing bytes are caught; a
member of ours ends where its size field says, whatever its bytes look like."""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from datetime import UTC, datetime

import pytest

from backupkit import archive_write as archive
from backupkit.zipcheck import SIZE_EXTRA_ID, ZipCheckError, ZipStreamChecker

# Member data that contains the data-descriptor signature, twice, one with plausible sizes.
TRICKY = b"abc" + b"PK\x07\x08" + b"x" * 20 + b"PK\x07\x08" + struct.pack("<LLL", 0, 5, 5)
MEMBERS = [("a.txt", b"hello"), ("dir/b.bin", os.urandom(100_000)), ("empty", b""), ("tricky", TRICKY), ("ü.txt", b"u")]


class Unseekable:
    def __init__(self):
        self.buf = bytearray()

    def write(self, data):
        self.buf += data
        return len(data)

    def flush(self):
        pass


def streamed_zip(members=MEMBERS, zip64=False, method=zipfile.ZIP_STORED) -> bytes:
    out = Unseekable()
    with zipfile.ZipFile(out, "w", compression=method) as archive:
        for name, data in members:
            info = zipfile.ZipInfo(name, (2026, 11, 29, 10, 0, 0))
            info.compress_type = method
            info.comment = b'{"ContentType": "text/plain"}'
            with archive.open(info, "w", force_zip64=zip64) as member:
                member.write(data)
    return bytes(out.buf)


def check(blob: bytes, step: int = 4096):
    checker = ZipStreamChecker()
    for i in range(0, len(blob), step):
        checker.write(blob[i:i + step])
    return checker.finish()


@pytest.mark.parametrize("zip64", [False, True])
@pytest.mark.parametrize("step", [1, 7, 65536, 10**7])
def test_streamed_archives_check_out(zip64, step):
    summary = check(streamed_zip(zip64=zip64), step)
    assert [m.name for m in summary.members] == [name for name, _ in MEMBERS]
    assert [m.crc for m in summary.members] == [zlib.crc32(data) for _, data in MEMBERS]
    assert summary.total_bytes == sum(len(data) for _, data in MEMBERS)
    assert summary.members[0].comment == b'{"ContentType": "text/plain"}'


def test_seekable_archive_with_sizes_in_local_headers():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in MEMBERS:
            archive.writestr(name, data)
    assert check(buffer.getvalue()).count == len(MEMBERS)


def test_empty_archive():
    assert check(streamed_zip([])).count == 0


def flip(blob: bytes, at: int) -> bytes:
    return blob[:at] + bytes([blob[at] ^ 1]) + blob[at + 1:]


def test_a_compressed_member_is_not_one_of_ours():
    with pytest.raises(ZipCheckError, match="compressed"):
        check(streamed_zip(method=zipfile.ZIP_DEFLATED))


def test_flipped_member_byte_is_a_crc_error():
    blob = streamed_zip()
    with pytest.raises(ZipCheckError, match="dir/b.bin"):
        check(flip(blob, blob.index(b"dir/b.bin") + 500))


@pytest.mark.parametrize("cut", [10, 200, 50_000])
def test_truncated_archive(cut):
    with pytest.raises(ZipCheckError, match="truncated"):
        check(streamed_zip()[:-cut])


def test_trailing_bytes():
    with pytest.raises(ZipCheckError, match="after its end record"):
        check(streamed_zip() + b"junk")


def test_central_directory_that_disagrees():
    blob = streamed_zip()
    central = blob.rindex(b"PK\x01\x02a.txt"[:4], 0, blob.index(b"PK\x05\x06"))  # last central header
    crc_at = central + 16
    with pytest.raises(ZipCheckError, match="central directory"):
        check(flip(blob, crc_at))


def test_error_is_kept_and_bytes_still_accepted():
    checker = ZipStreamChecker()
    checker.write(b"not a zip at all")
    checker.write(b"more")
    assert checker.bytes_in == 20
    with pytest.raises(ZipCheckError, match="unexpected bytes"):
        checker.finish()


def mimics(prefix: bytes) -> list[bytes]:
    """Member contents that end with what looks like their own data descriptor (either signature
    order, a wrong or the right CRC, 32- or 64-bit sizes) and go on: an app's file can hold that."""
    return [prefix + sig + struct.pack(layout, crc, len(prefix), len(prefix)) + b"and the file goes on"
            for sig in (b"PK\x07\x08", b"\x08\x07KP") for crc in (0, zlib.crc32(prefix)) for layout in ("<LLL", "<LQQ")]


@pytest.mark.parametrize("zip64", [False, True])
def test_a_member_mimicking_its_own_descriptor_is_read_whole_in_our_archives(monkeypatch, zip64):
    monkeypatch.setattr(archive, "ZIP64_FROM", 0 if zip64 else archive.ZIP64_FROM)
    contents = mimics(b"an uploaded file ")
    out = Unseekable()
    writer = archive.ArchiveWriter(out)
    for i, data in enumerate(contents):
        writer.add(f"upload-{i}.bin", len(data), datetime(2026, 11, 29, tzinfo=UTC), b"", [data])
    writer.close()
    summary = check(bytes(out.buf), step=7)
    assert [m.size for m in summary.members] == [len(data) for data in contents]
    assert [m.crc for m in summary.members] == [zlib.crc32(data) for data in contents]
    # Without the size field (an archive written by another tool) such a member still ends early.
    with pytest.raises(ZipCheckError):
        check(streamed_zip([("upload.bin", contents[1])]))


def test_a_size_field_that_lies_is_damage():
    out = Unseekable()
    writer = archive.ArchiveWriter(out)
    writer.add("a.bin", 10, datetime(2026, 11, 29, tzinfo=UTC), b"", [b"0123456789"])
    writer.close()
    field = struct.pack("<2HQ", SIZE_EXTRA_ID, 8, 10)
    for lie in (9, 11):
        with pytest.raises(ZipCheckError, match="a.bin"):
            check(bytes(out.buf).replace(field, struct.pack("<2HQ", SIZE_EXTRA_ID, 8, lie), 1))
