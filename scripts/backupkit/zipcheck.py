"""Checking a ZIP archive as a stream, without ever holding it on disk or in memory.

`ZipStreamChecker` is a write-only sink: feed it the decrypted archive in order. It walks the
local headers and member data (CRC-32 and size of every member, data descriptors included, as
zipfile writes them in streaming mode), then parses the central directory and its end records
and cross-checks names, CRCs, sizes and offsets against what went past.

A member followed by a data descriptor has no size in its local header, and its bytes are the
app's: a file holding a descriptor's signature and its own length so far would end the member
early if the end were found by scanning. So the files backup writes each member's exact size in
a local extra field of its own (SIZE_EXTRA_ID), and the checker then reads exactly that many
bytes and expects the descriptor right after them. Only archives without that field (written
before it, or by the original system) are scanned for their descriptors.

Not stream-unzip: it refuses a stored member followed by a data descriptor (NotStreamUnzippable,
uktrade/stream-unzip#105 and #106), which is every member of our streamed archives, and it does
not cross-check the central directory against what went past.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import VerificationError

LOCAL_SIG = b"PK\x03\x04"
CENTRAL_SIG = b"PK\x01\x02"
DESCRIPTOR_SIG = b"PK\x07\x08"
DESCRIPTOR_SIGS = (DESCRIPTOR_SIG, DESCRIPTOR_SIG[::-1])
ZIP64_END_SIG = b"PK\x06\x06"
ZIP64_LOCATOR_SIG = b"PK\x06\x07"
END_SIG = b"PK\x05\x06"
LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # 30 bytes
CENTRAL_HEADER = struct.Struct("<4s6H3L5H2L")  # 46 bytes
END_RECORD = struct.Struct("<4s4H2LH")  # 22 bytes
ZIP64_END_RECORD = struct.Struct("<4sQ2H2L4Q")  # 56 bytes
ZIP64_LOCATOR = struct.Struct("<4sLQL")  # 20 bytes
DESCRIPTOR = struct.Struct("<4sLLL")  # 16 bytes
DESCRIPTOR64 = struct.Struct("<4sLQQ")  # 24 bytes, after a member with a ZIP64 local header
ZIP64_EXTRA_ID = 0x0001
# The member's size, in a local extra field of this tool's (8 bytes, little-endian); zip readers
# skip extra fields they do not know.
SIZE_EXTRA_ID = 0x6B62
SIZE_EXTRA = struct.Struct("<2HQ")
STORED = 0
FLAG_ENCRYPTED, FLAG_DESCRIPTOR, FLAG_UTF8 = 0x1, 0x8, 0x800


class ZipCheckError(VerificationError):
    pass


@dataclass
class Member:
    name: str
    offset: int
    flags: int
    method: int
    zip64: bool
    crc: int = 0  # computed from the data
    compressed_size: int = 0
    size: int = 0
    comment: bytes = b""
    data_offset: int = 0  # where the member's bytes start in the archive
    name_valid: bool = True  # False: not UTF-8 although flagged so (shown with replacements)


@dataclass
class ZipSummary:
    members: list[Member] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.members)

    @property
    def total_bytes(self) -> int:
        return sum(m.size for m in self.members)


def _name(raw: bytes, flags: int) -> tuple[str, bool]:
    """A member name as text, and whether it decoded cleanly."""
    try:
        return raw.decode("utf-8" if flags & FLAG_UTF8 else "cp437"), True
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace"), False


def _extra_field(extra: bytes, tag: int) -> bytes | None:
    """The data of extra field `tag`, or None when the extra bytes hold none."""
    pos = 0
    while pos + 4 <= len(extra):
        found, size = struct.unpack_from("<2H", extra, pos)
        if found == tag:
            return extra[pos + 4: pos + 4 + size]
        pos += 4 + size
    return None


def _zip64_extra(extra: bytes, wanted: list[bool]) -> list[int | None]:
    """Values of the ZIP64 extra field, in order, for each field marked as wanted (0xFFFFFFFF)."""
    values: list[int | None] = [None] * len(wanted)
    data, at = _extra_field(extra, ZIP64_EXTRA_ID) or b"", 0
    for i, want in enumerate(wanted):
        if want and at + 8 <= len(data):
            values[i] = struct.unpack_from("<Q", data, at)[0]
            at += 8
    return values


def size_extra(size: int) -> bytes:
    """The local extra field that tells the checker a member's exact size."""
    return SIZE_EXTRA.pack(SIZE_EXTRA_ID, SIZE_EXTRA.size - 4, size)


class ZipStreamChecker:
    """Write the archive's bytes in; call `finish()` at the end for the summary (or an error).

    The first problem found is kept in `error` and parsing stops there, but `write()` keeps
    accepting bytes, so a decryptor feeding it still reaches its own end-of-stream check (the
    AES Crypt HMAC), whose failure is the better explanation.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._offset = 0  # offset in the archive of _buf[0]
        self._state: Callable[[], bool] = self._record
        self._member: Member | None = None
        self._remaining = 0  # member data still expected, when its size is known
        self._expected: tuple[int, int, int] | None = None  # (crc, compressed, size) from the local header
        self._sized = False  # a descriptor follows, but the size came from our extra field: no scanning
        self._central: list[Member] = []
        self._central_start: int | None = None
        self._central_end: int | None = None
        self._end: dict[str, int] | None = None
        self.summary = ZipSummary()
        self.error: ZipCheckError | None = None
        self.bytes_in = 0

    # -- the sink --------------------------------------------------------------------------

    def write(self, data: bytes) -> int:
        self.bytes_in += len(data)
        if self.error is None:
            self._buf += data
            try:
                while self._state():
                    pass
            except ZipCheckError as exc:
                self.error = exc
                self._buf.clear()
        return len(data)

    def finish(self) -> ZipSummary:
        if self.error is not None:
            raise self.error
        if self._state != self._trailing:
            where = f" inside member {self._member.name!r}" if self._member else ""
            raise ZipCheckError(
                f"the ZIP is truncated{where}: it ends after {self.bytes_in} bytes without its central directory")
        self._cross_check()
        return self.summary

    # -- parsing ---------------------------------------------------------------------------

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self._offset += n
        return out

    def _record(self) -> bool:
        if len(self._buf) < 4:
            return False
        sig = bytes(self._buf[:4])
        if sig == LOCAL_SIG and self._central_start is None:
            self._state = self._local_header
        elif sig == CENTRAL_SIG:
            if self._central_start is None:
                self._central_start = self._offset
            self._state = self._central_header
        elif sig == ZIP64_END_SIG and self._central_start is not None:
            self._central_end = self._central_end or self._offset
            self._state = self._zip64_end
        elif sig == ZIP64_LOCATOR_SIG and self._central_start is not None:
            self._state = self._zip64_locator
        elif sig == END_SIG:
            if self._central_start is None:
                self._central_start = self._offset
            self._central_end = self._central_end or self._offset
            self._state = self._end_record
        else:
            raise ZipCheckError(f"the ZIP is damaged: unexpected bytes {sig.hex()} at offset {self._offset}")
        return True

    def _local_header(self) -> bool:
        if len(self._buf) < LOCAL_HEADER.size:
            return False
        _, _, flags, method, _, _, crc, csize, usize, nlen, xlen = LOCAL_HEADER.unpack_from(self._buf)
        if len(self._buf) < LOCAL_HEADER.size + nlen + xlen:
            return False
        offset = self._offset
        header = self._take(LOCAL_HEADER.size + nlen + xlen)
        raw_name = header[LOCAL_HEADER.size: LOCAL_HEADER.size + nlen]
        extra = header[LOCAL_HEADER.size + nlen:]
        name, valid = _name(raw_name, flags)
        member = Member(name, offset, flags, method, _extra_field(extra, ZIP64_EXTRA_ID) is not None, data_offset=self._offset, name_valid=valid)
        if flags & FLAG_ENCRYPTED:
            raise ZipCheckError(f"the ZIP member {member.name!r} is encrypted with ZIP encryption: not one of ours")
        if method != STORED:  # the files backup stores its members: anything else is not one of ours
            raise ZipCheckError(f"the ZIP member {member.name!r} is compressed (method {method}): not an archive this tool wrote")
        self._member = member
        self._sized = False
        if flags & FLAG_DESCRIPTOR:
            self._expected = None
            sized = _extra_field(extra, SIZE_EXTRA_ID)
            self._sized = sized is not None and len(sized) == 8
            if self._sized:
                self._remaining = struct.unpack("<Q", sized)[0]
        else:
            big_u, big_c = _zip64_extra(extra, [usize == 0xFFFFFFFF, csize == 0xFFFFFFFF])
            csize = big_c if big_c is not None else csize
            usize = big_u if big_u is not None else usize
            self._expected = (crc, csize, usize)
            self._remaining = csize
        self._state = self._member_data
        return True

    def _data(self, chunk: bytes) -> None:
        member = self._member
        member.compressed_size += len(chunk)
        member.crc = zlib.crc32(chunk, member.crc)
        member.size += len(chunk)

    def _member_data(self) -> bool:
        if self._expected is not None or self._sized:  # the size is known: read exactly that
            n = min(self._remaining, len(self._buf))
            if n:
                self._data(self._take(n))
                self._remaining -= n
            if self._remaining:
                return False
            if self._sized:
                self._state = self._descriptor
                return True
            crc, csize, usize = self._expected
            self._end_member(crc, csize, usize)
            return True
        # Stored with a data descriptor: the data ends at the first descriptor signature followed
        # by this member's own CRC and sizes (zipfile's streaming mode writes exactly this; the
        # original system's writer, aiozipstream 0.4, wrote the signature's bytes reversed).
        found = [at for at in (self._buf.find(sig) for sig in DESCRIPTOR_SIGS) if at >= 0]
        if not found:
            keep = len(DESCRIPTOR_SIG) - 1
            if len(self._buf) > keep:
                self._data(self._take(len(self._buf) - keep))
            return False
        at = min(found)
        if at:
            self._data(self._take(at))
        if len(self._buf) < DESCRIPTOR64.size:
            return False
        if self._match_descriptor():
            return True
        self._data(self._take(1))  # the signature's first byte was member data
        return True

    def _descriptor(self) -> bool:
        """The descriptor right after a member whose size our extra field gave."""
        if len(self._buf) < DESCRIPTOR64.size:
            return False
        if bytes(self._buf[:4]) not in DESCRIPTOR_SIGS or not self._match_descriptor():
            member = self._member
            raise ZipCheckError(f"the ZIP member {member.name!r} is not followed by its data descriptor "
                                f"({member.size} bytes, as its header says): damaged")
        return True

    def _match_descriptor(self) -> bool:
        member = self._member
        for layout in (DESCRIPTOR64, DESCRIPTOR) if member.zip64 else (DESCRIPTOR, DESCRIPTOR64):
            _, crc, csize, usize = layout.unpack_from(self._buf)
            if (csize, usize) == (member.compressed_size, member.size):
                # The signature followed by this member's exact size twice is its descriptor; a
                # CRC that differs then means damaged data (_end_member says so).
                self._take(layout.size)
                self._end_member(crc, csize, usize)
                return True
        return False

    def _end_member(self, crc: int, csize: int, usize: int) -> None:
        member = self._member
        if (member.crc, member.compressed_size, member.size) != (crc, csize, usize):
            raise ZipCheckError(
                f"the ZIP member {member.name!r} is damaged: CRC {member.crc:08x} and {member.size} bytes, "
                f"its header says CRC {crc:08x} and {usize} bytes")
        self.summary.members.append(member)
        self._member = None
        self._state = self._record

    def _central_header(self) -> bool:
        if len(self._buf) < CENTRAL_HEADER.size:
            return False
        fields = CENTRAL_HEADER.unpack_from(self._buf)
        flags, method, crc, csize, usize, nlen, xlen, clen, offset = (
            fields[3], fields[4], fields[7], fields[8], fields[9], fields[10], fields[11], fields[12], fields[16])
        if len(self._buf) < CENTRAL_HEADER.size + nlen + xlen + clen:
            return False
        record = self._take(CENTRAL_HEADER.size + nlen + xlen + clen)
        name, _ = _name(record[CENTRAL_HEADER.size: CENTRAL_HEADER.size + nlen], flags)
        extra = record[CENTRAL_HEADER.size + nlen: CENTRAL_HEADER.size + nlen + xlen]
        comment = record[CENTRAL_HEADER.size + nlen + xlen:]
        big_u, big_c, big_o = _zip64_extra(extra, [usize == 0xFFFFFFFF, csize == 0xFFFFFFFF, offset == 0xFFFFFFFF])
        entry = Member(name, big_o if big_o is not None else offset, flags, method, False, crc,
                       big_c if big_c is not None else csize, big_u if big_u is not None else usize, comment)
        self._central.append(entry)
        self._state = self._record
        return True

    def _zip64_end(self) -> bool:
        if len(self._buf) < 12:
            return False
        total = 12 + struct.unpack_from("<Q", self._buf, 4)[0]
        if len(self._buf) < max(total, ZIP64_END_RECORD.size):
            return False
        fields = ZIP64_END_RECORD.unpack_from(self._buf)
        self._take(total)
        self._end = {"entries": fields[7], "cd_size": fields[8], "cd_offset": fields[9]}
        self._state = self._record
        return True

    def _zip64_locator(self) -> bool:
        if len(self._buf) < ZIP64_LOCATOR.size:
            return False
        self._take(ZIP64_LOCATOR.size)
        self._state = self._record
        return True

    def _end_record(self) -> bool:
        if len(self._buf) < END_RECORD.size:
            return False
        _, _, _, _, entries, cd_size, cd_offset, clen = END_RECORD.unpack_from(self._buf)
        if len(self._buf) < END_RECORD.size + clen:
            return False
        self._take(END_RECORD.size + clen)
        end = dict(self._end or {})
        if entries != 0xFFFF or "entries" not in end:
            end["entries"] = entries
        if cd_size != 0xFFFFFFFF or "cd_size" not in end:
            end["cd_size"] = cd_size
        if cd_offset != 0xFFFFFFFF or "cd_offset" not in end:
            end["cd_offset"] = cd_offset
        self._end = end
        self._state = self._trailing
        return True

    def _trailing(self) -> bool:
        if self._buf:
            raise ZipCheckError(f"the ZIP has {len(self._buf)}+ unexpected bytes after its end record at offset {self._offset}")
        return False

    def _cross_check(self) -> None:
        local, central, end = self.summary.members, self._central, self._end or {}
        if end.get("entries") != len(central):
            raise ZipCheckError(f"the ZIP's end record counts {end.get('entries')} members, its central directory holds {len(central)}")
        if (end.get("cd_offset"), end.get("cd_size")) != (self._central_start, self._central_end - self._central_start):
            raise ZipCheckError("the ZIP's end record does not point at its central directory: damaged")
        if len(local) != len(central):
            raise ZipCheckError(f"the ZIP holds {len(local)} members but its central directory lists {len(central)}")
        for seen, listed in zip(local, central):
            if seen.name != listed.name or seen.offset != listed.offset:
                raise ZipCheckError(
                    f"the ZIP's central directory lists {listed.name!r} at offset {listed.offset} where the archive "
                    f"holds {seen.name!r} at offset {seen.offset}")
            if (seen.crc, seen.compressed_size, seen.size) != (listed.crc, listed.compressed_size, listed.size):
                raise ZipCheckError(
                    f"the ZIP member {seen.name!r} does not match the central directory (CRC {seen.crc:08x}, {seen.size} "
                    f"bytes; listed CRC {listed.crc:08x}, {listed.size} bytes): damaged")
            seen.comment = listed.comment
