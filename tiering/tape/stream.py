"""Byte streams over a tape drive: the archive writer's sink (whole blocks, padded at a sync with a filler that tar
skips) and readers of one tape file (sequential, and at offsets)."""

from __future__ import annotations

import io
import tarfile
from typing import Any

from tiering.archive import BLOCK, ArchiveWriter
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


class SequentialReader(io.RawIOBase):
    """The current tape file from the head on, as a non-seekable stream (tar's ``r|`` mode)."""

    def __init__(self, drive: TapeDrive) -> None:
        self.drive = drive
        self.ended = False
        self._pending = b""
        self._at = 0
        self.total = 0  # bytes read from the drive so far

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._at >= len(self._pending) and not self.ended:
            self._pending, self._at = self.drive.read(READ_BYTES_MAX), 0
            self.total += len(self._pending)
            self.ended = not self._pending
        n = min(len(buffer), len(self._pending) - self._at)
        buffer[:n] = self._pending[self._at : self._at + n]
        self._at += n
        return n


def _round_up(n: int, unit: int) -> int:
    return n + (-n) % unit
