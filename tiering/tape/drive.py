"""Tape drives: what the Linux ``st`` driver offers, behind one interface, so that the code writing archives is
the same whether it writes to ``/dev/nst0`` (``StDrive``), to a cartridge file of the virtual library
(``FileDrive``) or to a mounted LTFS cartridge (``LtfsDrive``).

Model (as on a real tape): the medium holds *tape files* 0, 1, 2, ... separated by filemarks; the end of data
(EOD) follows the last write. Writing anywhere erases everything after that point. ``position_file(n)`` puts the
head at the start of tape file n; ``read`` returns bytes of the current file and ``b""`` at its filemark (the head
is then past it, at the start of the next file) or at EOD. ``write_filemarks(0)`` writes no mark but makes every
write before it durable (st: flushes the drive buffer; a file: fsync): the backend's ``sync``.

Writes must be whole blocks of ``block_bytes`` (fixed-block mode, as LTO drives are used with tar); the layer
above (tape/stream.py) buffers and pads.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import OutOfSpace, StorageFault

BLOCK_BYTES = 256 << 10  # LTO drives stream best with large fixed blocks; tar reads them with -b 512
ST_READ_BYTES_MAX = 1 << 20
GiB = 1 << 30

Sleep = Callable[[float], None]


class TapeError(StorageFault):
    """The drive failed an operation (I/O error, no cartridge, a medium that is not what we wrote): stop."""


class EndOfMedium(OutOfSpace):
    """A write did not fit on the cartridge (a real drive's ENOSPC at end of tape): nothing of it was written."""


@dataclass(frozen=True)
class TapePosition:
    file_number: int  # the tape file the head is in (0 = the first)
    block_number: int  # block within that file
    at_eod: bool  # nothing recorded from here on


class TapeDrive(ABC):
    """One drive with one cartridge loaded (or none). Not thread-safe: the library's drive lock serialises users."""

    block_bytes: int = BLOCK_BYTES

    @abstractmethod
    def load(self) -> None:
        """Thread the loaded cartridge; the head is at the beginning of the tape."""

    @abstractmethod
    def unload(self) -> None:
        """Rewind and release the cartridge (the changer may then move it)."""

    def rewind(self) -> None:
        self.position_file(0)

    @abstractmethod
    def position_file(self, file_number: int) -> None:
        """Head at the start of tape file ``file_number`` (MTREW + MTFSF n). Past EOD: TapeError."""

    @abstractmethod
    def position_eod(self) -> None:
        """Head at the end of data, where the next tape file is appended (MTEOM)."""

    @abstractmethod
    def skip_blocks(self, count: int) -> None:
        """Move the head ``count`` blocks forward within the current file (MTFSR), without reading them."""

    @abstractmethod
    def write(self, data: bytes | memoryview) -> None:
        """Append whole blocks at the head (erasing what followed). EndOfMedium when they do not fit."""

    def erase_from_head(self) -> None:  # noqa: B027 - on a real tape the next write erases what follows
        """Forget everything after the head (recovery cuts an archive back before rewriting its end)."""

    @abstractmethod
    def write_filemarks(self, count: int) -> None:
        """Write ``count`` filemarks (MTWEOF); with 0, only make every write so far durable."""

    @abstractmethod
    def read(self, size_max: int) -> bytes:
        """Up to ``size_max`` bytes (a multiple of the block size) of the current file; b"" at its filemark (the
        head moves past it) or at EOD."""

    @abstractmethod
    def position(self) -> TapePosition:
        """Where the head is (MTIOCGET / MTIOCPOS)."""

    def close(self) -> None:  # noqa: B027 - a drive without descriptors has nothing to release
        """Release descriptors (the cartridge stays where it is)."""


# ---- st: the Linux SCSI tape driver ------------------------------------------------------------------------

# linux/mtio.h, native alignment (x86_64, aarch64): struct mtop {short mt_op; int mt_count;}, struct mtget
# {long mt_type, mt_resid, mt_dsreg, mt_gstat, mt_erreg; __kernel_daddr_t (int) mt_fileno, mt_blkno;},
# struct mtpos {long mt_blkno;}. tests/unit/test_tape_drive.py checks them against the C header.
MTOP = struct.Struct("@hi")
MTGET = struct.Struct("@lllllii")
MTPOS = struct.Struct("@l")


def _ioc(direction: int, kind: str, number: int, size: int) -> int:
    """The kernel's _IOC(): direction (1 write, 2 read) << 30 | size << 16 | type << 8 | number."""
    return (direction << 30) | (size << 16) | (ord(kind) << 8) | number


MTIOCTOP = _ioc(1, "m", 1, MTOP.size)
MTIOCGET = _ioc(2, "m", 2, MTGET.size)
MTIOCPOS = _ioc(2, "m", 3, MTPOS.size)
MTFSF, MTBSF, MTFSR, MTWEOF, MTREW, MTOFFL, MTEOM, MTSETBLK, MTLOAD, MTUNLOAD = 1, 2, 3, 5, 6, 7, 12, 20, 30, 31
GMT_EOF, GMT_BOT, GMT_EOT, GMT_EOD, GMT_WR_PROT, GMT_ONLINE, GMT_DR_OPEN = (
    0x80000000, 0x40000000, 0x20000000, 0x08000000, 0x04000000, 0x01000000, 0x00040000)


@dataclass(frozen=True)
class MtStatus:
    """struct mtget, decoded."""

    drive_type: int
    residual: int
    block_bytes: int  # mt_dsreg & MT_ST_BLKSIZE_MASK (0: variable blocks)
    general_status: int
    file_number: int  # -1 when the driver lost track
    block_number: int

    @classmethod
    def unpack(cls, raw: bytes) -> MtStatus:
        mt_type, resid, dsreg, gstat, _erreg, fileno, blkno = MTGET.unpack(raw)
        return cls(mt_type, resid, dsreg & 0xFFFFFF, gstat, fileno, blkno)

    @property
    def at_eod(self) -> bool:
        return bool(self.general_status & GMT_EOD)

    @property
    def online(self) -> bool:
        return bool(self.general_status & GMT_ONLINE)

    @property
    def write_protected(self) -> bool:
        return bool(self.general_status & GMT_WR_PROT)


def mtop(op: int, count: int) -> bytes:
    return MTOP.pack(op, count)


class StDrive(TapeDrive):
    """A drive through ``/dev/nstN`` (the non-rewinding node: the head stays where we leave it between opens).
    Fixed block mode (MTSETBLK) so that every write is exactly one block. NOT TESTED ON HARDWARE: the ioctl
    layouts are checked against linux/mtio.h, the behaviour only through FileDrive, which follows the same rules."""

    def __init__(self, device: Path, block_bytes: int = BLOCK_BYTES, ready_s_max: float = 300.0) -> None:
        self.device = device
        self.block_bytes = block_bytes
        self.ready_s_max = ready_s_max  # how long a freshly loaded cartridge may take to come online
        self._fd = -1

    def _op(self, op: int, count: int = 1) -> None:
        try:
            fcntl.ioctl(self._require(), MTIOCTOP, mtop(op, count))
        except OSError as exc:
            raise TapeError(f"tape {self.device}: operation {op} x{count} failed: {exc.strerror}") from None

    def _require(self) -> int:
        if self._fd < 0:
            try:
                self._fd = os.open(self.device, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise TapeError(f"tape {self.device}: cannot open: {exc.strerror}") from None
        return self._fd

    def status(self) -> MtStatus:
        try:
            raw = fcntl.ioctl(self._require(), MTIOCGET, bytes(MTGET.size))
        except OSError as exc:
            raise TapeError(f"tape {self.device}: status failed: {exc.strerror}") from None
        return MtStatus.unpack(raw)

    def load(self) -> None:
        self._op(MTLOAD)
        # A changer's robot has just put the cartridge in: the drive threads it (LTO: ~15 s) before it is online.
        deadline = time.monotonic() + self.ready_s_max
        while not self.status().online:
            if time.monotonic() > deadline:
                raise TapeError(f"tape {self.device}: not ready {self.ready_s_max:.0f} s after the load")
            time.sleep(1.0)
        self._op(MTSETBLK, self.block_bytes)
        self._op(MTREW)

    def unload(self) -> None:
        self._op(MTOFFL)
        self.close()

    def position_file(self, file_number: int) -> None:
        self._op(MTREW)
        if file_number:
            self._op(MTFSF, file_number)

    def position_eod(self) -> None:
        self._op(MTEOM)

    def skip_blocks(self, count: int) -> None:
        if count:
            self._op(MTFSR, count)

    def write(self, data: bytes | memoryview) -> None:
        assert len(data) % self.block_bytes == 0, "whole blocks only"
        view = memoryview(data)
        fd = self._require()
        while view:
            try:
                written = os.write(fd, view[: self.block_bytes])
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise EndOfMedium(f"tape {self.device}: end of medium") from None
                raise TapeError(f"tape {self.device}: write failed: {exc.strerror}") from None
            if written != self.block_bytes:
                raise TapeError(f"tape {self.device}: short write ({written} of {self.block_bytes} bytes)")
            view = view[written:]

    def write_filemarks(self, count: int) -> None:
        self._op(MTWEOF, count)  # count 0 flushes the drive's buffer to the medium

    def read(self, size_max: int) -> bytes:
        # The st driver reads at most its buffer (or the direct-I/O scatter list) per call: stay at 1 MiB.
        size = max(self.block_bytes, min(size_max, ST_READ_BYTES_MAX) // self.block_bytes * self.block_bytes)
        try:
            return os.read(self._require(), size)
        except OSError as exc:
            if exc.errno == errno.EIO and self.status().at_eod:
                return b""
            raise TapeError(f"tape {self.device}: read failed: {exc.strerror}") from None

    def tell(self) -> int:
        """The absolute logical block (MTIOCPOS: the drive's READ POSITION)."""
        try:
            raw = fcntl.ioctl(self._require(), MTIOCPOS, bytes(MTPOS.size))
        except OSError as exc:
            raise TapeError(f"tape {self.device}: position failed: {exc.strerror}") from None
        return int(MTPOS.unpack(raw)[0])

    def position(self) -> TapePosition:
        status = self.status()
        if status.block_number >= 0:
            return TapePosition(status.file_number, status.block_number, status.at_eod)
        # After MTEOM the driver knows the file but not the block within it: measure it as the distance from the
        # file's start (just past the previous filemark, or the beginning of tape) in absolute blocks.
        eod = self.tell()
        if status.file_number > 0:
            self._op(MTBSF, 1)
            self._op(MTFSF, 1)
            start = self.tell()
        else:
            start = 0
        self._op(MTEOM)
        return TapePosition(status.file_number, eod - start, True)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# ---- a cartridge file (the virtual library) ----------------------------------------------------------------


class FileDrive(TapeDrive):
    """A cartridge as two files: ``<label>.tape`` holds the tape files' bytes back to back (so ``dd`` and ``tar``
    read it like a tape), ``<label>.marks`` the byte offset of each filemark, one per line. The head position lives
    in the caller (the library's shared state): ``file_number`` and ``offset``. Capacity is fixed; load and
    positioning take simulated time (``load_s``, ``seek_s_per_gib``) through ``sleep``."""

    def __init__(self, data_path: Path, capacity_bytes: int, block_bytes: int = BLOCK_BYTES, load_s: float = 0.0,
                 seek_s_per_gib: float = 0.0, sleep: Sleep = time.sleep, fsync: bool = True) -> None:
        self.data_path = data_path
        self.marks_path = data_path.with_suffix(".marks")
        self.capacity_bytes = capacity_bytes
        self.block_bytes = block_bytes
        self.load_s, self.seek_s_per_gib, self.sleep, self.fsync = load_s, seek_s_per_gib, sleep, fsync
        self.file_number = 0
        self.offset = 0
        self._fd = -1
        self._marks: list[int] = []

    # -- medium state

    def _require(self) -> int:
        if self._fd < 0:
            raise TapeError(f"cartridge {self.data_path.stem} is not loaded")
        return self._fd

    def marks(self) -> list[int]:
        return list(self._marks)

    def eod_bytes(self) -> int:
        return os.fstat(self._require()).st_size

    def file_span(self, file_number: int) -> tuple[int, int]:
        """[start, end) of a tape file's bytes; the last file (no filemark yet) ends at EOD."""
        start = self._marks[file_number - 1] if file_number else 0
        end = self._marks[file_number] if file_number < len(self._marks) else self.eod_bytes()
        return start, end

    def _seek_to(self, offset: int) -> None:
        if self.seek_s_per_gib and offset != self.offset:
            self.sleep(abs(offset - self.offset) / GiB * self.seek_s_per_gib)
        self.offset = offset

    # -- TapeDrive

    def load(self) -> None:
        try:
            self._fd = os.open(self.data_path, os.O_RDWR | os.O_CLOEXEC)
            self._marks = [int(line) for line in self.marks_path.read_text().split()]
        except FileNotFoundError:
            self._marks = []
        except (OSError, ValueError) as exc:
            self.close()
            raise TapeError(f"cartridge {self.data_path.stem}: unreadable: {exc}") from None
        if self._fd < 0:
            raise TapeError(f"cartridge {self.data_path.stem}: no such cartridge file {self.data_path}")
        size = os.fstat(self._fd).st_size
        if any(b > a for a, b in zip(self._marks[1:], self._marks, strict=False)) or \
                (self._marks and self._marks[-1] > size):
            self.close()
            raise TapeError(f"cartridge {self.data_path.stem}: filemarks beyond its data (a damaged cartridge)")
        if self.load_s:
            self.sleep(self.load_s)
        self.file_number, self.offset = 0, 0

    def attach(self, file_number: int, offset: int) -> None:
        """Open a cartridge already loaded and threaded (by another process): no load time, head where it was."""
        self.load_s, saved = 0.0, self.load_s
        try:
            self.load()
        finally:
            self.load_s = saved
        self.file_number, self.offset = file_number, min(offset, self.eod_bytes())

    def unload(self) -> None:
        self._seek_to(0)
        self.close()

    def position_file(self, file_number: int) -> None:
        self._require()
        if file_number > len(self._marks):
            raise TapeError(f"cartridge {self.data_path.stem}: no tape file {file_number} "
                            f"({len(self._marks)} filemarks)")
        self._seek_to(self.file_span(file_number)[0])
        self.file_number = file_number

    def position_eod(self) -> None:
        self._seek_to(self.eod_bytes())
        self.file_number = len(self._marks)

    def skip_blocks(self, count: int) -> None:
        _start, end = self.file_span(self.file_number)
        self._seek_to(min(end, self.offset + count * self.block_bytes))

    def write(self, data: bytes | memoryview) -> None:
        fd = self._require()
        assert len(data) % self.block_bytes == 0, "whole blocks only"
        if self.offset + len(data) > self.capacity_bytes:
            raise EndOfMedium(f"cartridge {self.data_path.stem}: end of medium "
                              f"({self.capacity_bytes} bytes)")
        self._erase_from_head(fd)
        view = memoryview(data)
        try:
            while view:
                written = os.pwrite(fd, view, self.offset)
                self.offset += written
                view = view[written:]
        except OSError as exc:
            raise TapeError(f"cartridge {self.data_path.stem}: write failed: {exc.strerror}") from None

    def erase_from_head(self) -> None:
        self._erase_from_head(self._require())

    def _erase_from_head(self, fd: int) -> None:
        """Writing erases everything after the head, filemarks of this file and later included."""
        if os.fstat(fd).st_size > self.offset:
            os.ftruncate(fd, self.offset)
        if len(self._marks) > self.file_number:
            self._marks = self._marks[: self.file_number]
            self._save_marks()

    def write_filemarks(self, count: int) -> None:
        fd = self._require()
        try:
            if self.fsync:
                os.fdatasync(fd)
        except OSError as exc:
            raise TapeError(f"cartridge {self.data_path.stem}: flush failed: {exc.strerror}") from None
        if count:
            self._erase_from_head(fd)
            self._marks.extend([self.offset] * count)
            self.file_number += count
            self._save_marks()

    def _save_marks(self) -> None:
        tmp = self.marks_path.with_suffix(".marks.tmp")
        try:
            with open(tmp, "w") as fh:
                fh.write("".join(f"{m}\n" for m in self._marks))
                fh.flush()
                if self.fsync:
                    os.fsync(fh.fileno())
            os.replace(tmp, self.marks_path)
            if self.fsync:
                dir_fd = os.open(self.marks_path.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except OSError as exc:
            raise TapeError(f"cartridge {self.data_path.stem}: writing its filemarks failed: {exc}") from None

    def read(self, size_max: int) -> bytes:
        fd = self._require()
        _start, end = self.file_span(self.file_number)
        if self.offset >= end:
            if self.file_number < len(self._marks):  # at a filemark: report it once, then move past it
                self.file_number += 1
            return b""
        data = os.pread(fd, min(size_max, end - self.offset), self.offset)
        self.offset += len(data)
        return data

    def position(self) -> TapePosition:
        start, _end = self.file_span(self.file_number)
        return TapePosition(self.file_number, (self.offset - start) // self.block_bytes,
                            self.offset >= self.eod_bytes())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# ---- LTFS: a mounted cartridge is a folder ---------------------------------------------------------------

LTFS_LABEL_FILE = "VOL1.label"


class LtfsDrive(TapeDrive):
    """A cartridge mounted through LTFS: tape file 0 (the label) is ``VOL1.label``, tape file N >= 1 is
    ``N.tar``, written by appending once and never rewritten. A filemark after file N creates the empty
    ``N+1.tar`` (the head is then at its start, as on a tape), so the highest-numbered file is the open one and
    EOD is its end. LTFS itself keeps the index of the medium; we only append."""

    block_bytes = 512  # a file system: no drive blocks, only tar's own

    def __init__(self, mount: Path, fsync: bool = True) -> None:
        self.mount = mount
        self.fsync = fsync
        self.file_number = 0
        self.offset = 0
        self._fd = -1

    def path_of(self, file_number: int) -> Path:
        return self.mount / (LTFS_LABEL_FILE if file_number == 0 else f"{file_number}.tar")

    def files(self) -> list[int]:
        numbers = [0] if (self.mount / LTFS_LABEL_FILE).exists() else []
        for entry in os.listdir(self.mount):
            stem, dot, ext = entry.partition(".")
            if dot and ext == "tar" and stem.isdigit():
                numbers.append(int(stem))
        return sorted(numbers)

    def load(self) -> None:
        if not self.mount.is_dir():
            raise TapeError(f"LTFS cartridge not mounted at {self.mount}")
        self.file_number, self.offset = 0, 0

    def unload(self) -> None:
        self.close()

    def _open(self) -> int:
        if self._fd < 0:
            try:
                self._fd = os.open(self.path_of(self.file_number), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise TapeError(f"LTFS {self.mount}: cannot open tape file {self.file_number}: {exc}") from None
        return self._fd

    def position_file(self, file_number: int) -> None:
        files = self.files()
        if file_number not in files and file_number != (files[-1] + 1 if files else 0):
            raise TapeError(f"LTFS {self.mount}: no tape file {file_number}")
        self.close()
        self.file_number, self.offset = file_number, 0

    def position_eod(self) -> None:
        files = self.files()
        self.close()
        self.file_number = files[-1] if files else 0
        path = self.path_of(self.file_number)
        self.offset = path.stat().st_size if path.exists() else 0

    def skip_blocks(self, count: int) -> None:
        path = self.path_of(self.file_number)
        size = path.stat().st_size if path.exists() else 0
        self.offset = min(size, self.offset + count * self.block_bytes)

    def write(self, data: bytes | memoryview) -> None:
        fd = self._open()
        size = os.fstat(fd).st_size
        if size != self.offset:
            raise TapeError(f"LTFS {self.mount}: tape file {self.file_number} is {size} bytes; writing at "
                            f"{self.offset} would rewrite it (files are appended once)")
        try:
            view = memoryview(data)
            while view:
                written = os.pwrite(fd, view, self.offset)
                self.offset += written
                view = view[written:]
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise EndOfMedium(f"LTFS {self.mount}: cartridge full") from None
            raise TapeError(f"LTFS {self.mount}: write failed: {exc.strerror}") from None

    def erase_from_head(self) -> None:
        """Recovery only: an archive cut back after a crash (LTFS keeps the old blocks; only its index changes)."""
        path = self.path_of(self.file_number)
        if path.exists() and path.stat().st_size > self.offset:
            os.truncate(path, self.offset)
        for later in self.files():
            if later > self.file_number:
                self.path_of(later).unlink()

    def write_filemarks(self, count: int) -> None:
        if self._fd >= 0 and self.fsync:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                raise TapeError(f"LTFS {self.mount}: fsync failed: {exc.strerror}") from None
        for _ in range(count):
            self._open()  # a file that was never written is still a (empty) tape file
            self.close()
            self.file_number, self.offset = self.file_number + 1, 0
            self._open()
        if count and self.fsync:
            dir_fd = os.open(self.mount, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def read(self, size_max: int) -> bytes:
        path = self.path_of(self.file_number)
        try:
            with open(path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read(size_max)
        except FileNotFoundError:
            return b""
        if not data:
            if self.file_number + 1 in self.files():
                self.close()
                self.file_number, self.offset = self.file_number + 1, 0
            return b""
        self.offset += len(data)
        return data

    def position(self) -> TapePosition:
        files = self.files()
        last = files[-1] if files else 0
        path = self.path_of(self.file_number)
        size = path.stat().st_size if path.exists() else 0
        return TapePosition(self.file_number, self.offset // self.block_bytes,
                            self.file_number >= last and self.offset >= size)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
