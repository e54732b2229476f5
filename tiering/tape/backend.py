"""The offline tier: blobs in large tar (pax) archives (tiering/archive.py) on tape cartridges.

- An archive is one tape file (tape file 0 is the cartridge's label). Many studies go into one archive: it stays
  open across ``sync`` calls and is closed (catalog member, end-of-archive, filemark) when it passes
  ``archive_bytes_max``, when its cartridge is full (it continues as a new archive on the next cartridge: a member
  never straddles cartridges), on ``seal()``, or by ``recover`` after a crash.
  Why open across syncs: a filemark and a catalog per study would make tens of thousands of tiny tape files, each
  costing a drive stop and a repositioning; one archive of gigabytes streams.
- ``sync`` pads the stream to a whole drive block with a filler tar skips (stream.py) and flushes the drive
  (``write_filemarks(0)``: MTWEOF 0 on st, fsync on a file): every put before it is durable.
- Container = ``<label>/<tape file number>``; location = archive.py's ``<container>:<record>:<data>:<stored>:<size>``
  (offsets from the tape file's start).
- Tape is append-only: ``delete`` and ``remove_container`` only forget (the index stops naming the blob).
- ``random_read`` is False: a range can be read without decompressing the whole member, but reaching it costs a
  positioning of the tape (seconds to minutes): callers should read whole blobs, in tape order.
- Every drive use holds the library's drive lock for one operation (a put, a sync, a read); ``iter_read`` holds it
  until its iterator is exhausted or closed, so the caller must not use the same library inside that loop.
"""

from __future__ import annotations

import builtins
import hashlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from appliance.config_tiering import TierConfig
from appliance.errors import BlobMissing, ConfigError, NotFound, OutOfSpace, StorageFault
from appliance.store.backend import (
    BlobBackend,
    BlobMeta,
    BlobSource,
    Capabilities,
    LatencyClass,
    Location,
    Recovery,
    StoredBlob,
    Usage,
)
from tiering.archive import (
    BLOCK,
    Member,
    iter_member,
    make_location,
    member_at,
    parse_location,
    read_range,
)
from tiering.tape.drive import BLOCK_BYTES, Sleep, TapeDrive, TapeError
from tiering.tape.library import (
    LIBRARY_FILE,
    LtfsLibrary,
    StLibrary,
    TapeLibrary,
    VirtualLibrary,
)
from tiering.tape.stream import BlockSink, FileReader, TapeArchiveWriter, filler, walk_archive

log = logging.getLogger(__name__)

SOURCE_CHUNK = 1 << 20
STAGE_BYTES_MAX = 64 << 20  # a blob opened as a file is held in memory up to this, then in a temporary file


def split_container(container: str) -> tuple[str, int]:
    """``<label>/<tape file number>`` -> its parts; BlobMissing when it is not a tape container."""
    label, slash, number = container.partition("/")
    if not slash or not label or not number.isdigit() or int(number) < 1:
        raise BlobMissing(f"not a tape archive: {container!r}")
    return label, int(number)


def member_bytes_max(size: int, frame_bytes: int) -> int:
    """The most a member of ``size`` original bytes can take on tape: zstd's worst case (incompressible data grows
    by ~1/256 plus a frame header), its headers (the frame list is a few bytes per frame) and tar padding."""
    frames = max(1, -(-size // frame_bytes))
    return size + size // 128 + 64 * frames + 16 * frames + 8 * BLOCK


def catalog_bytes_max(members: int, frames: int) -> int:
    """The most the catalog member and the end-of-archive take (a generous bound on the JSON per entry)."""
    return 8 * BLOCK + 1024 * (members + 1) + 12 * frames


@dataclass
class _OpenArchive:
    label: str
    file_number: int
    writer: TapeArchiveWriter
    sink: BlockSink
    start_bytes: int  # bytes on the cartridge before this archive (its capacity check)
    capacity_bytes: int
    frames: int = 0
    unsynced: bool = False

    @property
    def container(self) -> str:
        return f"{self.label}/{self.file_number}"


class TapeBackend(BlobBackend):
    capabilities = Capabilities(random_read=False, atomic_publish=True, latency=LatencyClass.OFFLINE,
                                deletes_immediately=False)

    def __init__(self, name: str, library: TapeLibrary, compression_level: int = 3, frame_bytes: int = 4 << 20,
                 archive_bytes_max: int = 16 << 30, spill_dir: str | None = None) -> None:
        self.name = name
        self.library = library
        self.compression_level = compression_level
        self.frame_bytes = frame_bytes
        self.archive_bytes_max = archive_bytes_max
        self.spill_dir = spill_dir
        self._archive: _OpenArchive | None = None

    # ---- write path ------------------------------------------------------------------------------------------

    def begin_container(self, hint: str) -> str:
        if self._archive is not None and self._archive.writer.bytes_written >= self.archive_bytes_max:
            self._finish_archive()
        if self._archive is None:
            self._archive = self._open_archive(0)
        return self._archive.container

    def put(self, meta: BlobMeta, source: BlobSource) -> Location:
        assert source.size == meta.size
        need = member_bytes_max(meta.size, self.frame_bytes)
        arch = self._archive
        if arch is not None and not self._fits(arch, need):
            self._finish_archive()  # the cartridge is full: close with the catalog, continue on the next one
            arch = None
        if arch is None:
            arch = self._archive = self._open_archive(need)
        with self._writing(arch):
            member = arch.writer.add(meta, source.chunks(SOURCE_CHUNK))
            arch.sink.flush_blocks()
        arch.frames += len(member.frames)
        arch.unsynced = True
        log.debug("tape %s: blob %s in %s", self.name, meta.digest[:12], arch.container)
        return make_location(arch.container, member)

    def _fits(self, arch: _OpenArchive, need: int) -> bool:
        used = arch.start_bytes + arch.writer.bytes_written + arch.sink.block_bytes  # a sync's filler
        reserve = catalog_bytes_max(len(arch.writer.members) + 1, arch.frames + need // self.frame_bytes + 1)
        return used + need + reserve + arch.sink.block_bytes <= arch.capacity_bytes

    def _writing(self, arch: _OpenArchive) -> _Writing:
        return _Writing(self, arch)

    def _attach(self, drive: TapeDrive, arch: _OpenArchive) -> None:
        """Head at the end of data, which must be where this archive's bytes end (a recall may have moved the
        head, or loaded another cartridge, between two of our operations)."""
        drive.position_eod()
        pos = drive.position()
        if pos.file_number != arch.file_number or (pos.block_number >= 0 and
                                                   pos.block_number * arch.sink.block_bytes != arch.sink.flushed):
            raise TapeError(f"tape {self.name}: cartridge {arch.label} ends at file {pos.file_number} block "
                            f"{pos.block_number}, not where archive {arch.container} was being written: another "
                            "writer used it")

    def _open_archive(self, need: int) -> _OpenArchive:
        """A new archive at the end of data of the first cartridge with room (the loaded one first)."""
        # Fill the cartridges that hold archives before starting a blank one (the loaded one first among equals):
        # a study's archives then stay on few cartridges, and a recall loads few.
        candidates = [c for c in self.library.cartridges() if c.labelled and c.owner in (None, self.name)]
        candidates.sort(key=lambda c: (c.archives == 0, not c.loaded, c.label))
        for cart in candidates:
            used = max(0, cart.used_bytes)
            if used + need + catalog_bytes_max(1, need // self.frame_bytes + 1) + 3 * self.library.block_bytes \
                    > cart.capacity_bytes:
                continue
            with self.library.session(cart.label) as drive:
                if cart.owner is None:  # only the tape knows (st): read its label (a rewind)
                    label = self.library.read_label(drive)
                    if label is None or label.tier != self.name:
                        continue
                drive.position_eod()
                pos = drive.position()
                if pos.block_number != 0:
                    raise TapeError(f"tape {self.name}: cartridge {cart.label} ends inside an archive left open by "
                                    "a crash; recover must run before new writes")
            sink = BlockSink(drive.block_bytes)
            writer = TapeArchiveWriter(sink, 0, self.compression_level, self.frame_bytes, self.spill_dir)
            log.info("tape %s: new archive %s/%d", self.name, cart.label, pos.file_number)
            return _OpenArchive(cart.label, pos.file_number, writer, sink, used, cart.capacity_bytes)
        raise OutOfSpace(f"tape tier {self.name}: no cartridge has room for {need} more bytes "
                         "(label or load a new one: `appliance tape list`)")

    def sync(self) -> None:
        arch = self._archive
        if arch is None or not arch.unsynced:
            return
        with self._writing(arch):
            partial = arch.sink.partial()
            if partial:
                arch.writer.pad(filler(arch.sink.block_bytes - partial))
            arch.sink.flush_blocks()
            assert not arch.sink.buffer
            drive = arch.sink.drive
            assert drive is not None
            drive.write_filemarks(0)
        arch.unsynced = False
        if arch.writer.bytes_written >= self.archive_bytes_max:  # roll between studies, not inside one
            self._finish_archive()

    def seal(self) -> None:
        """Close the open archive (catalog, end-of-archive, filemark), durably: the cartridge then reads with tar
        alone. The end of a migration run calls it; the next put opens a new archive."""
        if self._archive is not None:
            self._finish_archive()

    def _finish_archive(self) -> None:
        arch = self._archive
        assert arch is not None
        with self._writing(arch):
            arch.writer.finish()
            arch.sink.buffer += bytes(arch.sink.partial() and arch.sink.block_bytes - arch.sink.partial())
            arch.sink.flush_blocks()
            drive = arch.sink.drive
            assert drive is not None
            drive.write_filemarks(1)
        log.info("tape %s: archive %s closed (%d members, %d bytes)", self.name, arch.container,
                 len(arch.writer.members), arch.writer.bytes_written)
        self._archive = None

    def publish(self, locations: list[Location]) -> None:
        """Synced members are readable; only the index makes them reachable."""

    def delete(self, locations: list[Location]) -> None:
        """Tape is append-only: a blob is forgotten by the index, its bytes stay until the cartridge is recycled."""

    def remove_container(self, name: str) -> None:
        """Append-only: an archive is never removed from its cartridge."""

    def container_of(self, location: Location) -> str:
        return parse_location(location)[0]

    def close(self) -> None:
        """An open archive stays open on the cartridge (its unsynced puts are not durable); ``recover`` at the next
        start closes it after its last whole member."""
        self._archive = None

    # ---- read path ------------------------------------------------------------------------------------------

    def _read_session(self, location: Location) -> _ReadSession:
        return _ReadSession(self, location)

    def read(self, location: Location, offset: int = 0, length: int = -1) -> bytes:
        with self._read_session(location) as (reader, member):
            return read_range(reader.read_at, member, offset, length, f"{self.name}:{location}")

    def iter_read(self, location: Location, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
        with self._read_session(location) as (reader, member):
            for plain in iter_member(reader.read_at, member, chunk_bytes, f"{self.name}:{location}"):
                for start in range(0, len(plain), chunk_bytes):
                    yield plain[start : start + chunk_bytes]

    def sha256(self, location: Location) -> str:
        hasher = hashlib.sha256()
        for chunk in self.iter_read(location, 8 << 20):
            hasher.update(chunk)
        return hasher.hexdigest()

    def open(self, location: Location, size: int) -> BinaryIO:
        """The blob staged in one pass (tape cannot serve the small ranged reads a file object makes): in memory up
        to ``STAGE_BYTES_MAX``, in a temporary file beyond."""
        staged = tempfile.SpooledTemporaryFile(max_size=STAGE_BYTES_MAX, dir=self.spill_dir)  # noqa: SIM115
        try:
            for chunk in self.iter_read(location, 8 << 20):
                staged.write(chunk)
            if staged.tell() != size:
                raise BlobMissing(f"{self.name}:{location}: holds {staged.tell()} bytes, not {size}")
            staged.seek(0)
        except BaseException:
            staged.close()
            raise
        return staged  # type: ignore[return-value]

    def stat(self, location: Location) -> BlobMeta:
        with self._read_session(location) as (_reader, member):
            return member.meta

    def list(self) -> Iterator[StoredBlob]:
        for label in self._our_cartridges():
            number = 1
            while True:
                members = self.scan_file(label, number)
                if members is None:
                    break
                container = f"{label}/{number}"
                for member in members[0]:
                    yield StoredBlob(make_location(container, member), member.meta)
                number += 1

    def _our_cartridges(self, open_only: bool = False) -> builtins.list[str]:
        return [c.label for c in self.library.cartridges()
                if c.labelled and c.owner in (None, self.name) and not (open_only and c.open_archive is False)]

    def scan_file(self, label: str, number: int) -> tuple[builtins.list[Member], bool, int] | None:
        """The whole members of tape file ``number`` (from their headers, spacing over their data), whether the
        archive ends with its catalog, and the file's length; None past the last tape file."""
        with self.library.session(label) as drive:
            try:
                drive.position_file(number)
            except TapeError:
                return None
            if drive.position().at_eod:
                return None
            return walk_archive(FileReader(drive, number), f"{self.name}:{label}/{number}")

    # ---- recovery -------------------------------------------------------------------------------------------

    def recover(self, committed_end: Callable[[str], int | None]) -> Recovery:
        """For each cartridge whose last archive was left open (no catalog, no filemark: a crash): keep what the
        index committed, hand back every whole member beyond it whose bytes hash to its digest, cut the tape file
        back to the end of the last of them, and close the archive there with the catalog of what it keeps (an
        archive whose catalog was written but not its filemark only gets the filemark, when all of it is whole). An
        archive the index does not know is left as it is (a filemark after it, so that new archives follow)."""
        result = Recovery()
        counts = result.counts
        counts.update(truncated_bytes=0, closed=0, unknown=0, tail_records=0)
        self._archive = None
        for label in self._our_cartridges(open_only=True):  # a virtual library knows which: no cartridge loads
            with self.library.session(label) as drive:
                drive.position_eod()
                pos = drive.position()
                if pos.block_number == 0:
                    continue
                number = pos.file_number
            container = f"{label}/{number}"
            end = committed_end(container)
            scanned = self.scan_file(label, number)
            assert scanned is not None
            members, complete, total = scanned
            with self.library.session(label) as drive:
                if end is None:
                    counts["unknown"] += 1
                    log.warning("tape %s: archive %s is not in the index; it is left as it is (run `appliance "
                                "index rebuild` if the index was lost)", self.name, container)
                    drive.position_eod()
                    drive.write_filemarks(1)
                    counts["closed"] += 1
                    continue
                if total < end:
                    raise StorageFault(f"tape {self.name}: archive {container} is {total} bytes but the index "
                                       f"committed members up to {end}: the cartridge lost acknowledged data")
                kept = [m for m in members if m.end <= end]
                cut = end
                reader = FileReader(drive, number)
                for member in members:
                    if member.record_offset < cut:
                        continue
                    if not self.member_is_whole(reader, member, container):
                        break
                    kept.append(member)
                    result.tail.append(StoredBlob(make_location(container, member), member.meta))
                    cut = member.end
                if complete and cut == (members[-1].end if members else end):
                    # The catalog was written, only the filemark is missing (a crash between the two), and every
                    # member after the committed end is whole: nothing to cut.
                    drive.position_eod()
                    drive.write_filemarks(1)
                else:
                    counts["truncated_bytes"] += total - cut
                    self._close_at(drive, number, cut, kept)
                counts["closed"] += 1
        counts["tail_records"] = len(result.tail)
        return result

    def member_is_whole(self, reader: FileReader, member: Member, container: str) -> bool:
        """Whether a member decompresses (every frame checksum) and hashes to its digest."""
        hasher = hashlib.sha256()
        try:
            for chunk in iter_member(reader.read_at, member, SOURCE_CHUNK, f"{self.name}:{container}"):
                hasher.update(chunk)
        except BlobMissing:
            return False
        return hasher.hexdigest() == member.meta.digest

    def _close_at(self, drive: TapeDrive, number: int, cut: int, kept: builtins.list[Member]) -> None:
        """Rewrite the tape file from ``cut`` on: the catalog of ``kept``, the end-of-archive, a filemark."""
        block = drive.block_bytes
        start = cut - cut % block
        head = FileReader(drive, number).read_at(start, cut - start)
        drive.position_file(number)
        drive.skip_blocks(start // block)
        drive.erase_from_head()
        sink = BlockSink(block)
        sink.drive = drive
        sink.buffer += head
        writer = TapeArchiveWriter(sink, 0, self.compression_level, self.frame_bytes, self.spill_dir)
        writer.members = list(kept)
        writer.bytes_written = cut
        writer.finish()
        sink.buffer += bytes(sink.partial() and block - sink.partial())
        sink.flush_blocks()
        drive.write_filemarks(1)

    # ---- accounting -----------------------------------------------------------------------------------------

    def usage(self) -> tuple[Usage, ...]:
        reserve = 3 * self.library.block_bytes + catalog_bytes_max(1, 1)
        return tuple(Usage(c.label, max(0, c.used_bytes), c.capacity_bytes,
                           c.labelled and max(0, c.used_bytes) + reserve < c.capacity_bytes)
                     for c in self.library.cartridges())


class _Writing:
    """A drive session for the open archive: the head at its end, the sink attached; any failure abandons the
    archive (what it wrote since the last sync is not durable; recover cuts it back) and stops the caller."""

    def __init__(self, backend: TapeBackend, arch: _OpenArchive) -> None:
        self.backend, self.arch = backend, arch
        self._session = backend.library.session(arch.label)

    def __enter__(self) -> None:
        drive = self._session.__enter__()
        try:
            self.backend._attach(drive, self.arch)
        except BaseException as exc:
            self._session.__exit__(type(exc), exc, exc.__traceback__)
            self.backend._archive = None
            raise
        self.arch.sink.drive = drive

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.arch.sink.drive = None
        self._session.__exit__(kind, exc, tb)  # type: ignore[arg-type]
        if exc is not None:
            self.backend._archive = None
            if isinstance(exc, ValueError):  # the source gave the wrong number of bytes: the archive is torn
                raise TapeError(f"tape {self.backend.name}: archive {self.arch.container} abandoned: {exc}") from exc
            if isinstance(exc, OSError):
                raise TapeError(f"tape {self.backend.name}: writing {self.arch.container} failed: {exc}") from exc


class _ReadSession:
    """A drive session positioned on one member (its headers read and checked against the location)."""

    def __init__(self, backend: TapeBackend, location: Location) -> None:
        self.backend, self.location = backend, location
        container, self.record, self.data, self.stored, self.size = parse_location(location)
        self.label, self.number = split_container(container)
        self._session = backend.library.session(self.label)

    def __enter__(self) -> tuple[FileReader, Member]:
        where = f"{self.backend.name}:{self.location}"
        try:
            drive = self._session.__enter__()
        except (NotFound, TapeError) as exc:
            raise BlobMissing(f"{where}: {exc}") from None
        try:
            try:
                drive.position_file(self.number)
            except TapeError as exc:
                raise BlobMissing(f"{where}: {exc}") from None
            reader = FileReader(drive, self.number)
            member = member_at(reader.read_at, self.record, self.data, where)
            if member.stored_bytes != self.stored or member.size != self.size:
                raise BlobMissing(f"{where}: the member there is another one")
        except BaseException as exc:
            self._session.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return reader, member

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self._session.__exit__(kind, exc, tb)  # type: ignore[arg-type]


# ---- wiring (tiering/tiers.py) -------------------------------------------------------------------------------


def open_library(tier: TierConfig, sleep: Sleep = time.sleep, block_bytes: int = BLOCK_BYTES) -> TapeLibrary:
    assert tier.path is not None
    if tier.mode == "virtual":
        return VirtualLibrary(tier.path, tier.name, block_bytes, tier.load_s, tier.seek_s_per_gib, sleep,
                              tier.fsync)
    if tier.mode == "ltfs":
        return LtfsLibrary(tier.path, tier.name, tier.cartridge_bytes, tier.fsync)
    if tier.mode == "st":
        return StLibrary(tier.path, tier.changer, tier.name, tier.cartridge_bytes, block_bytes)
    raise ConfigError(f"tiers.{tier.name}.mode: unknown tape mode {tier.mode!r}")


def open_tape(tier: TierConfig) -> TapeBackend:
    return TapeBackend(tier.name, open_library(tier), tier.compression_level, tier.frame_bytes,
                       tier.archive_bytes_max)


def init_tier(tier: TierConfig) -> str:
    """Virtual: create (up to) ``cartridges`` labelled cartridge files of ``cartridge_bytes``. LTFS and st: nothing
    is written (label a cartridge with ``appliance tape label``); reports what the library holds."""
    library = open_library(tier)
    if isinstance(library, VirtualLibrary):
        if library.exists():
            import json

            owner = json.loads((library.folder / LIBRARY_FILE).read_text()).get("tier")
            if owner != tier.name:
                raise ConfigError(f"{library.folder} is the virtual library of tier {owner!r}, not {tier.name!r}")
        created = library.create(tier.cartridges, tier.cartridge_bytes)
        return (f"virtual tape library {tier.path}: {len(created)} cartridge(s) created"
                + (f" ({created[0]}..{created[-1]})" if created else "") + f", {tier.cartridges} in all")
    cartridges = library.cartridges()
    return f"tape tier {tier.name} ({tier.mode}): {len(cartridges)} cartridge(s) found; label new ones with " \
           "`appliance tape label`"
