"""Byte streams over a tape drive: the archive writer's sink (whole blocks, padded at a sync with a filler that tar
skips) and readers of one tape file (sequential, and at offsets)."""

from __future__ import annotations

import tarfile

from appliance.errors import BlobMissing
from tiering.archive import BLOCK, CATALOG_NAME, ArchiveWriter, Member, member_at
from tiering.tape.drive import TapeDrive

READ_BYTES_MAX = 8 << 20  # one drive read at most (a multiple of every block size we use)


def filler(size: int) -> bytes:
    """``size`` bytes (a multiple of 512, at least 512) that tar readers skip: a pax global header whose only
    record is a ``comment`` (ignored by GNU tar, bsdtar and Python's tarfile). A sync pads the tape stream to a
    whole drive block with it, so that an archive stays open across syncs and still reads as one tar archive."""
    assert size >= BLOCK and size % BLOCK == 0, size
    length = size - BLOCK
    record = b""
    if length:
        for digits in range(1, 12):  # the record's length counts its own digits
            record = f"{length} comment={'.' * (length - digits - len(' comment=') - 1)}\n".encode()
            if len(record) == length:
                break
        assert len(record) == length
    info = tarfile.TarInfo("pax_global_header")
    info.type = tarfile.XGLTYPE
    info.size = length
    return info.tobuf(format=tarfile.USTAR_FORMAT) + record


class TapeArchiveWriter(ArchiveWriter):
    """The archive writer with one addition: a filler written between members, counted in the archive's offsets."""

    def pad(self, data: bytes) -> None:
        self._write(data)


class BlockSink:
    """The writer's sink: bytes gather into whole drive blocks, written while a drive session is attached."""

    def __init__(self, block_bytes: int) -> None:
        self.block_bytes = block_bytes
        self.buffer = bytearray()
        self.drive: TapeDrive | None = None  # set for the length of a drive session
        self.flushed = 0  # bytes of this tape file handed to the drive

    def write(self, data: bytes | memoryview, /) -> int:
        self.buffer += data
        if len(self.buffer) >= READ_BYTES_MAX:
            self.flush_blocks()
        return len(data)

    def flush_blocks(self) -> None:
        """Write every whole block buffered (the rest waits for more bytes or for a sync's filler)."""
        whole = len(self.buffer) - len(self.buffer) % self.block_bytes
        if whole:
            assert self.drive is not None, "tape writes happen inside a drive session"
            self.drive.write(memoryview(self.buffer)[:whole])
            del self.buffer[:whole]
            self.flushed += whole

    def partial(self) -> int:
        return len(self.buffer) % self.block_bytes


class FileReader:
    """Reads one tape file at offsets from its start, moving the head forward only (a read behind it positions to
    the file again: a rewind and a space on a real drive)."""

    def __init__(self, drive: TapeDrive, file_number: int) -> None:
        self.drive, self.file_number = drive, file_number
        self.block_bytes = drive.block_bytes
        self.head: int | None = None  # offset of the head from the file's start (block aligned), None: unknown

    def read_at(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        start = offset - offset % self.block_bytes
        if self.head is None or start < self.head:
            self.drive.position_file(self.file_number)
            self.head = 0
        if start > self.head:
            self.drive.skip_blocks((start - self.head) // self.block_bytes)
            self.head = start
        want = offset + length - start
        parts: list[bytes] = []
        got = 0
        while got < want:
            chunk = self.drive.read(min(READ_BYTES_MAX, _round_up(want - got, self.block_bytes)))
            if not chunk:
                self.head = None  # at (or past) the filemark: where exactly is not worth tracking
                break
            parts.append(chunk)
            got += len(chunk)
        if self.head is not None:
            self.head += got
        data = b"".join(parts)
        return data[offset - start : offset - start + length]


def walk_archive(reader: FileReader, where: str) -> tuple[list[Member], bool, int]:
    """The blob members of the archive in one tape file, from their headers alone: the data between them is spaced
    over (MTFSR on a drive), not read, so listing a cartridge costs a fraction of reading it. Returns the whole
    members, whether the archive ends with its catalog and end-of-archive, and the tape file's length."""
    members: list[Member] = []
    pos = 0
    complete = False
    while True:
        block = reader.read_at(pos, BLOCK)
        if len(block) < BLOCK or not any(block):
            break  # the end of the data, or an end-of-archive without a catalog before it
        info = _header(block)
        if info is None:
            break  # a torn or foreign header: nothing after it is trusted
        padded = info.size + (-info.size) % BLOCK
        if info.type == tarfile.XGLTYPE:  # a sync's filler
            pos += BLOCK + padded
            continue
        if info.type == tarfile.XHDTYPE:  # a pax header, then the member's own ustar header
            ustar = _header(reader.read_at(pos + BLOCK + padded, BLOCK))
            if ustar is None:
                break
            if ustar.name == CATALOG_NAME:
                complete, pos = _catalog_whole(reader, pos + 2 * BLOCK + padded, ustar.size, pos)
                break
            try:
                member = member_at(reader.read_at, pos, pos + 2 * BLOCK + padded, where)
            except BlobMissing:  # BlobCorrupt too: a torn or damaged header ends the walk
                break
            if len(reader.read_at(member.end - BLOCK, BLOCK)) < BLOCK:
                break  # its data was cut short
            members.append(member)
            pos = member.end
            continue
        if info.name == CATALOG_NAME:
            complete, pos = _catalog_whole(reader, pos + BLOCK, info.size, pos)
            break
        pos += BLOCK + padded  # a member that is not one of ours (another tool appended it): skipped
    return members, complete, _length(reader, pos)


def _header(block: bytes) -> tarfile.TarInfo | None:
    try:
        return tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.TarError:
        return None


def _catalog_whole(reader: FileReader, data_offset: int, size: int, record: int) -> tuple[bool, int]:
    """Whether the catalog's data and the end-of-archive after it are on the tape, and where the archive (or, cut
    short, its last whole member) ends."""
    end = data_offset + size + (-size) % BLOCK
    if reader.read_at(end, 2 * BLOCK) == bytes(2 * BLOCK):
        return True, end + 2 * BLOCK
    return False, record


def _length(reader: FileReader, pos: int) -> int:
    """The tape file's length: read on from ``pos`` to its end (after a whole archive, only the zeros that pad its
    last drive block; after a crash, the torn tail)."""
    while True:
        chunk = reader.read_at(pos, READ_BYTES_MAX)
        pos += len(chunk)
        if len(chunk) < READ_BYTES_MAX:
            return pos


def _round_up(n: int, unit: int) -> int:
    return n + (-n) % unit
