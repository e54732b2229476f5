"""The archive container of the tiers below online (nearline, tape, later S3): a POSIX tar (pax) archive of
compressed blobs that stock tools read (docs/tiering.md "Archive format").

Layout, member after member from the archive's first byte:

- a pax extended header: ``mtime`` = receive time with ns, ``comment`` = our provenance as JSON
  (``{"v","digest","size","received_ns","calling_ae","policy","codec","frame_bytes","frames"}``);
- a ustar header named ``<digest>.dcm.zst`` (``<digest>.dcm`` for codec "none"), its size the stored bytes;
- the data padded to 512: the blob cut into ``frame_bytes`` pieces, each an independent zstd frame with its
  content size and checksum, concatenated (``zstd -d`` of the member is the original file). ``frames`` lists the
  compressed length of each frame, so one range is read by decompressing only the frames that hold it;
- at the end a ``catalog.json`` member (every member: offsets, stored bytes, frames, provenance), then the tar
  end-of-archive (two zero blocks).

All offsets are relative to the archive's first byte (a tape file, an archive file), so the catalog stays true
wherever the archive is copied. The writer only calls ``write`` on its sink (a tape stream cannot seek): a member's
header carries its frame lengths, so a member is compressed first, into memory up to ``spool_bytes_max`` and into
a spill file beyond, and then written header first.

Nothing read from an archive is trusted: headers are parsed from a bounded read, frame lengths must add up, each
frame's declared content size is checked before it is decompressed (a hostile frame cannot make us allocate
gigabytes) and its checksum is verified; a member stored raw is checked against its digest when read whole.
Whatever fails raises ``BlobCorrupt`` (a ``BlobMissing``: readers fall back to another copy).
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any, BinaryIO, Protocol

import msgspec
import zstandard

from appliance.errors import BlobCorrupt, BlobMissing, TierUnavailable
from appliance.store.backend import BlobMeta, Location

__all__ = ["BLOCK", "CATALOG_NAME", "CODEC_NONE", "CODEC_ZSTD", "END_OF_ARCHIVE", "ArchiveTruncated",
           "ArchiveWriter", "Member", "MemberReader", "ReadAt", "iter_member", "make_location", "member_at",
           "parse_location", "read_catalog", "read_range", "scan_archive"]

BLOCK = 512
END_OF_ARCHIVE = b"\x00" * (2 * BLOCK)
CATALOG_NAME = "catalog.json"
FORMAT_VERSION = 1
CODEC_ZSTD = "zstd"
CODEC_NONE = "none"
# Compressed bytes of one member held in memory before the rest spills to a file: a CT instance (0.5 MB) or an
# MR one never spills, a 2 GB whole-slide image does, and memory stays bounded either way.
SPOOL_BYTES_MAX = 64 << 20
# A member's headers (pax + ustar) are read in one piece of at most this: its frame list is 7 bytes per frame,
# so a 100 GiB blob at 64 KiB frames fits; anything larger is not an archive we wrote.
HEADER_BYTES_MAX = 16 << 20
# The catalog is read into memory: 16 GiB tape archives of 1 KiB members (the worst case) would need ~4 GiB, real
# ones (instances of 100 kB and more) a few MB. A bigger "catalog" is corruption, not ours.
CATALOG_BYTES_MAX = 512 << 20
COPY_CHUNK = 1 << 20

ReadAt = Callable[[int, int], bytes]  # (offset from the archive's start, length) -> bytes (short at its end)


class Sink(Protocol):
    """Where a writer puts the archive: a file, or a tape stream that can only append."""

    def write(self, data: bytes | memoryview, /) -> int | None: ...


class ArchiveTruncated(BlobCorrupt):
    """An archive ends before its catalog and end-of-archive (a crash while it was written, a cut copy)."""


class _Provenance(msgspec.Struct, forbid_unknown_fields=False):
    """The pax ``comment`` of a member (unknown keys are ignored: a later version may add some)."""

    v: int
    digest: str
    size: int
    received_ns: int
    calling_ae: str = ""
    policy: str = ""
    codec: str = CODEC_ZSTD
    frame_bytes: int = 0
    frames: list[int] = []


class _CatalogEntry(_Provenance):
    name: str = ""
    record_offset: int = 0
    data_offset: int = 0
    stored_bytes: int = 0


class _Catalog(msgspec.Struct):
    v: int
    members: list[_CatalogEntry]


@dataclass(frozen=True)
class Member:
    """One blob in an archive: where its record and data lie (from the archive's start) and how it is stored."""

    meta: BlobMeta
    record_offset: int  # the pax header
    data_offset: int  # the first stored byte
    stored_bytes: int  # bytes of data in the archive (compressed)
    codec: str  # CODEC_ZSTD or CODEC_NONE
    frame_bytes: int  # original bytes per frame (the last frame holds the rest); 0 for codec none
    frames: tuple[int, ...]  # compressed length of each frame; () for codec none

    @property
    def size(self) -> int:
        return self.meta.size

    @property
    def name(self) -> str:
        return f"{self.meta.digest}.dcm.zst" if self.codec == CODEC_ZSTD else f"{self.meta.digest}.dcm"

    @property
    def end(self) -> int:
        """Offset just past the member (data padded to a block)."""
        return self.data_offset + self.stored_bytes + (-self.stored_bytes) % BLOCK

    @cached_property
    def frame_starts(self) -> tuple[int, ...]:
        """Offset of each frame from the data's start."""
        starts, pos = [], 0
        for length in self.frames:
            starts.append(pos)
            pos += length
        return tuple(starts)

    def provenance(self) -> _Provenance:
        m = self.meta
        return _Provenance(FORMAT_VERSION, m.digest, m.size, m.received_ns, m.calling_ae, m.policy, self.codec,
                           self.frame_bytes, list(self.frames))


def make_location(container: str, member: Member) -> Location:
    """``<container>:<record_offset>:<data_offset>:<stored_bytes>:<size>`` (container names never hold ':')."""
    assert ":" not in container, container
    return f"{container}:{member.record_offset}:{member.data_offset}:{member.stored_bytes}:{member.size}"


def parse_location(location: Location) -> tuple[str, int, int, int, int]:
    """A location -> (container, record_offset, data_offset, stored_bytes, size); BlobMissing if malformed."""
    try:
        container, record, data, stored, size = location.rsplit(":", 4)
        parts = int(record), int(data), int(stored), int(size)
    except ValueError:
        raise BlobMissing(f"not an archive location: {location!r}") from None
    if not container or min(parts) < 0 or parts[1] <= parts[0]:
        raise BlobMissing(f"not an archive location: {location!r}")
    return container, *parts


# ---- writing -----------------------------------------------------------------------------------------------


class ArchiveWriter:
    """Writes one archive to ``sink`` member by member, then ``finish`` (catalog + end-of-archive).

    ``start_offset`` is where the archive begins in the sink's own coordinates (a tape writer appending after
    earlier tape files): ``sink_position`` counts from there; members' offsets count from the archive's start.
    A write error leaves the writer broken (it refuses more): the caller discards the archive."""

    def __init__(self, sink: Sink, start_offset: int = 0, compression_level: int = 3, frame_bytes: int = 4 << 20,
                 spill_dir: str | None = None, spool_bytes_max: int = SPOOL_BYTES_MAX) -> None:
        assert 0 <= compression_level <= 22 and frame_bytes >= 1
        self.sink = sink
        self.start_offset = start_offset
        self.frame_bytes = frame_bytes
        self.spill_dir = spill_dir
        self.spool_bytes_max = spool_bytes_max
        # Level 0 stores members raw; zstd's own "level 0" would mean its default level.
        self._compressor = (zstandard.ZstdCompressor(level=compression_level, write_checksum=True,
                                                     write_content_size=True) if compression_level else None)
        self.members: list[Member] = []
        self.bytes_written = 0  # from the archive's start
        self._broken = False
        self._finished = False

    @property
    def broken(self) -> bool:
        return self._broken

    @property
    def sink_position(self) -> int:
        return self.start_offset + self.bytes_written

    def add(self, meta: BlobMeta, chunks: Iterable[bytes | memoryview]) -> Member:
        """Append one blob whose bytes ``chunks`` yields (exactly ``meta.size`` of them, else ValueError)."""
        if self._broken or self._finished:
            raise ValueError("archive writer is " + ("broken by an earlier error" if self._broken else "finished"))
        if self._compressor is None:
            return self._add_raw(meta, chunks)
        compressor = self._compressor
        with tempfile.SpooledTemporaryFile(max_size=self.spool_bytes_max, dir=self.spill_dir) as spool:
            frames = []
            for piece in _pieces(chunks, self.frame_bytes, meta.size):
                frame = compressor.compress(piece)
                spool.write(frame)
                frames.append(len(frame))
            stored = sum(frames)
            member = self._write_header(meta, CODEC_ZSTD, self.frame_bytes, tuple(frames), stored)
            spool.seek(0)
            try:
                while chunk := spool.read(COPY_CHUNK):
                    self._write(chunk)
                self._write(b"\x00" * ((-stored) % BLOCK))
            except BaseException:
                self._broken = True
                raise
        self.members.append(member)
        return member

    def _add_raw(self, meta: BlobMeta, chunks: Iterable[bytes | memoryview]) -> Member:
        member = self._write_header(meta, CODEC_NONE, 0, (), meta.size)
        try:
            total = 0
            for chunk in chunks:
                total += len(chunk)
                if total > meta.size:
                    break
                self._write(chunk)
            if total != meta.size:
                raise ValueError(f"blob {meta.digest[:12]}: source gave {total} bytes, not {meta.size}")
            self._write(b"\x00" * ((-meta.size) % BLOCK))
        except BaseException:
            self._broken = True  # half a member is in the sink: this archive cannot be continued
            raise
        self.members.append(member)
        return member

    def _write_header(self, meta: BlobMeta, codec: str, frame_bytes: int, frames: tuple[int, ...], stored: int
                      ) -> Member:
        record = self.bytes_written
        probe = Member(meta, record, record, stored, codec, frame_bytes, frames)
        header = _member_header(probe)
        member = Member(meta, record, record + len(header), stored, codec, frame_bytes, frames)
        try:
            self._write(header)
        except BaseException:
            self._broken = True
            raise
        return member

    def finish(self) -> int:
        """Write the catalog member and the end-of-archive; returns how many bytes that took."""
        if self._broken or self._finished:
            raise ValueError("archive writer is " + ("broken by an earlier error" if self._broken else "finished"))
        before = self.bytes_written
        catalog = msgspec.json.encode(_Catalog(FORMAT_VERSION, [_catalog_entry(m) for m in self.members]))
        info = tarfile.TarInfo(CATALOG_NAME)
        info.size = len(catalog)
        info.mode = 0o600
        info.mtime = int(time.time())
        try:
            self._write(info.tobuf(format=tarfile.PAX_FORMAT))
            self._write(catalog)
            self._write(b"\x00" * ((-len(catalog)) % BLOCK) + END_OF_ARCHIVE)
        except BaseException:
            self._broken = True
            raise
        self._finished = True
        return self.bytes_written - before

    def _write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = self.sink.write(view)
            if n is None:  # a buffered sink writes everything or raises
                n = len(view)
            self.bytes_written += n
            view = view[n:]


def _pieces(chunks: Iterable[bytes | memoryview], frame_bytes: int, size: int) -> Iterator[bytes]:
    """The blob regrouped into ``frame_bytes`` pieces (the last one shorter; one empty piece for an empty blob)."""
    buf = bytearray()
    total = 0
    emitted = False
    for chunk in chunks:
        total += len(chunk)
        if total > size:
            break
        buf += chunk
        while len(buf) >= frame_bytes:
            yield bytes(buf[:frame_bytes])
            del buf[:frame_bytes]
            emitted = True
    if total != size:
        raise ValueError(f"blob source gave {'more than' if total > size else total} bytes, not {size}")
    if buf or not emitted:
        yield bytes(buf)


def _member_header(member: Member) -> bytes:
    meta = member.meta
    info = tarfile.TarInfo(member.name)
    info.size = member.stored_bytes
    info.mode = 0o600
    info.mtime = meta.received_ns // 1_000_000_000
    info.pax_headers = {
        "mtime": f"{meta.received_ns // 1_000_000_000}.{meta.received_ns % 1_000_000_000:09d}",
        "comment": msgspec.json.encode(member.provenance()).decode(),
    }
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _catalog_entry(m: Member) -> _CatalogEntry:
    p = m.provenance()
    return _CatalogEntry(p.v, p.digest, p.size, p.received_ns, p.calling_ae, p.policy, p.codec, p.frame_bytes,
                         p.frames, m.name, m.record_offset, m.data_offset, m.stored_bytes)


# ---- reading -----------------------------------------------------------------------------------------------


def _member_of(prov: _Provenance, name: str, record_offset: int, data_offset: int, stored_bytes: int,
               where: str) -> Member:
    """A member from what an archive says about it, every field checked against the others."""
    try:
        meta = BlobMeta(prov.digest, prov.size, prov.received_ns, prov.calling_ae, prov.policy)
    except AssertionError:
        raise BlobCorrupt(f"{where}: provenance does not describe a blob") from None
    member = Member(meta, record_offset, data_offset, stored_bytes, prov.codec, prov.frame_bytes,
                    tuple(prov.frames))
    if prov.v != FORMAT_VERSION:
        raise BlobCorrupt(f"{where}: archive format version {prov.v}, this software reads {FORMAT_VERSION}")
    if name != member.name:
        raise BlobCorrupt(f"{where}: member {name!r} does not match its provenance ({member.name})")
    if prov.codec == CODEC_NONE:
        ok = stored_bytes == prov.size and not prov.frames
    elif prov.codec == CODEC_ZSTD:
        count = max(1, -(-prov.size // prov.frame_bytes)) if prov.frame_bytes > 0 else -1
        ok = (len(prov.frames) == count and min(prov.frames, default=0) > 0
              and sum(prov.frames) == stored_bytes)
    else:
        ok = False
    if not ok or record_offset < 0 or data_offset <= record_offset:
        raise BlobCorrupt(f"{where}: inconsistent member record (codec {prov.codec!r}, {len(prov.frames)} frames, "
                          f"{stored_bytes} stored bytes for {prov.size})")
    return member


def _member_of_info(info: tarfile.TarInfo, base: int, where: str) -> Member | None:
    """The member a parsed tar header describes (its offsets shifted by ``base``), or None for a member that is
    not a blob (the catalog, something another tool added)."""
    if info.name == CATALOG_NAME or "comment" not in info.pax_headers or not info.isfile():
        return None
    try:
        prov = msgspec.json.decode(info.pax_headers["comment"], type=_Provenance)
    except msgspec.DecodeError as exc:
        raise BlobCorrupt(f"{where}: unreadable provenance: {exc}") from None
    return _member_of(prov, info.name, base + info.offset, base + info.offset_data, info.size, where)


def _read_exact(read_at: ReadAt, offset: int, length: int, where: str) -> bytes:
    data = read_at(offset, length)
    if len(data) != length:
        raise BlobCorrupt(f"{where}: archive ends at {offset + len(data)}, inside a member")
    return data


def member_at(read_at: ReadAt, record_offset: int, data_offset: int, where: str = "archive") -> Member:
    """The member whose record starts at ``record_offset`` (its data at ``data_offset``), from its own headers."""
    header_bytes = data_offset - record_offset
    if not BLOCK <= header_bytes <= HEADER_BYTES_MAX or header_bytes % BLOCK or record_offset % BLOCK:
        raise BlobMissing(f"{where}: no member record at {record_offset}:{data_offset}")
    raw = read_at(record_offset, header_bytes)
    if len(raw) != header_bytes:
        raise BlobMissing(f"{where}: archive ends before offset {data_offset}")
    try:
        with tarfile.open(fileobj=io.BytesIO(raw + b"\x00" * BLOCK), mode="r:") as archive:
            info = archive.next()
    except tarfile.TarError as exc:
        raise BlobMissing(f"{where}: no member record at {record_offset}: {exc}") from None
    if info is None or info.offset_data != header_bytes:
        raise BlobMissing(f"{where}: no member record at {record_offset}:{data_offset}")
    member = _member_of_info(info, record_offset, where)
    if member is None:
        raise BlobMissing(f"{where}: the member at {record_offset} is not a blob")
    return member


def _frame(read_at: ReadAt, member: Member, index: int, where: str) -> bytes:
    """Frame ``index`` of a member, decompressed and checked."""
    raw = _read_exact(read_at, member.data_offset + member.frame_starts[index], member.frames[index], where)
    expected = min(member.frame_bytes, member.size - index * member.frame_bytes)
    try:
        declared = zstandard.frame_content_size(raw)
        if declared != expected:  # checked before decompressing: a hostile header cannot size our buffer
            raise BlobCorrupt(f"{where}: frame {index} declares {declared} bytes, the member {expected}")
        plain = zstandard.ZstdDecompressor().decompress(raw)
    except zstandard.ZstdError as exc:
        raise BlobCorrupt(f"{where}: frame {index} is corrupt ({exc})") from None
    if len(plain) != expected:
        raise BlobCorrupt(f"{where}: frame {index} gave {len(plain)} bytes, not {expected}")
    return plain


def read_range(read_at: ReadAt, member: Member, offset: int = 0, length: int = -1, where: str = "archive") -> bytes:
    """``length`` original bytes of a member from ``offset`` (-1: to its end), decompressing only the frames that
    hold them."""
    size = member.size
    if offset < 0:
        raise ValueError("negative offset")
    if length < 0 or offset + length > size:
        length = max(0, size - offset)
    if length == 0:
        return b""
    if member.codec == CODEC_NONE:
        data = _read_exact(read_at, member.data_offset + offset, length, where)
        if length == size and hashlib.sha256(data).hexdigest() != member.meta.digest:
            raise BlobCorrupt(f"{where}: stored bytes do not hash to the member's digest")
        return data
    fb = member.frame_bytes
    first, last = offset // fb, (offset + length - 1) // fb
    parts = []
    for index in range(first, last + 1):
        plain = _frame(read_at, member, index, where)
        start = index * fb
        parts.append(plain[max(0, offset - start): offset + length - start])
    return parts[0] if len(parts) == 1 else b"".join(parts)


def iter_member(read_at: ReadAt, member: Member, chunk_bytes: int = COPY_CHUNK, where: str = "archive"
                ) -> Iterator[bytes]:
    """A whole member's original bytes, a frame (or, raw, ``chunk_bytes``) at a time. A raw member is hashed on the
    way and raises BlobCorrupt after its last chunk if it does not match its digest (a compressed one is checked
    frame by frame, before each frame is handed out)."""
    if member.codec == CODEC_ZSTD:
        for index in range(len(member.frames)):
            plain = _frame(read_at, member, index, where)
            if plain:
                yield plain
        return
    hasher = hashlib.sha256()
    pos = 0
    while pos < member.size:
        chunk = _read_exact(read_at, member.data_offset + pos, min(chunk_bytes, member.size - pos), where)
        hasher.update(chunk)
        pos += len(chunk)
        yield chunk
    if hasher.hexdigest() != member.meta.digest:
        raise BlobCorrupt(f"{where}: stored bytes do not hash to the member's digest")


class MemberReader(io.RawIOBase):
    """A seekable, read-only file over one member's original bytes. It keeps the frame it last decompressed, so
    that reading through it in small pieces (a BufferedReader asks 64 KiB at a time) decompresses each frame
    once. One per reader: not shared between threads."""

    def __init__(self, read_at: ReadAt, member: Member, where: str = "archive") -> None:
        self.read_at, self.member, self.where = read_at, member, where
        self.pos = 0
        self._index = -1
        self._plain = b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.member.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer: Any) -> int:
        member = self.member
        want = min(len(buffer), member.size - self.pos)
        if want <= 0:
            return 0
        if member.codec == CODEC_NONE:
            data = _read_exact(self.read_at, member.data_offset + self.pos, want, self.where)
        else:
            index = self.pos // member.frame_bytes
            if index != self._index:
                self._plain, self._index = _frame(self.read_at, member, index, self.where), index
            start = self.pos - index * member.frame_bytes
            data = self._plain[start : start + want]
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


def scan_archive(fileobj: BinaryIO, where: str = "archive") -> Iterator[Member]:
    """Every blob member of an archive, in order, from the medium alone (``list``, ``index rebuild``, reading a
    tape without its catalog). ``fileobj`` starts at the archive's first byte; a non-seekable stream (a tape) is
    read straight through. Raises ArchiveTruncated after the last whole member when the archive ends before its
    catalog and end-of-archive, BlobCorrupt at a member whose record is inconsistent."""
    seekable = fileobj.seekable()
    size = -1
    if seekable:
        start = fileobj.tell()
        size = fileobj.seek(0, io.SEEK_END) - start
        fileobj.seek(start)
    catalog_seen = False
    try:
        archive = tarfile.open(fileobj=fileobj, mode="r:" if seekable else "r|")
    except tarfile.TarError as exc:
        raise ArchiveTruncated(f"{where}: not a tar archive ({exc})") from None
    with archive:
        while True:
            try:
                info = archive.next()
            except tarfile.TarError as exc:
                raise ArchiveTruncated(f"{where}: archive is cut or damaged after its last whole member ({exc})"
                                       ) from None
            if info is None:
                break
            if size >= 0 and info.offset_data + info.size > size:
                raise ArchiveTruncated(f"{where}: archive is cut inside member {info.name}")
            if info.name == CATALOG_NAME:
                catalog_seen = True
                catalog_end = info.offset_data + info.size + (-info.size) % BLOCK
                if size >= 0 and size < catalog_end + len(END_OF_ARCHIVE):
                    raise ArchiveTruncated(f"{where}: archive is cut after its catalog")
                continue
            member = _member_of_info(info, 0, where)
            if member is not None:
                yield member
    if not catalog_seen:
        raise ArchiveTruncated(f"{where}: archive ends without its catalog")


def read_catalog(read_at: ReadAt, archive_bytes: int, where: str = "archive") -> list[Member]:
    """The members the catalog at the archive's end lists, found from its end (no scan of the archive). Zero
    blocks after the end-of-archive (a tape writer padding its last block) are allowed."""
    if archive_bytes % BLOCK:
        raise ArchiveTruncated(f"{where}: {archive_bytes} bytes is not a whole number of tar blocks")
    window = 64 << 10
    zero = b"\x00" * BLOCK
    while True:
        start = max(0, archive_bytes - window)
        start -= start % BLOCK
        tail = _read_exact(read_at, start, archive_bytes - start, where)
        last = next((pos for pos in range(len(tail) - BLOCK, -1, -BLOCK) if tail[pos : pos + BLOCK] != zero), None)
        if last is not None:
            end = start + last + BLOCK  # the catalog's data, padded, ends here
            if archive_bytes - end < len(END_OF_ARCHIVE):
                raise ArchiveTruncated(f"{where}: no end-of-archive after the last member")
            for pos in range(last, -1, -BLOCK):
                block = tail[pos : pos + BLOCK]
                if not block.startswith(CATALOG_NAME.encode() + b"\x00") or block[257:262] != b"ustar":
                    continue
                try:
                    info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
                except tarfile.HeaderError:
                    continue
                if start + pos + BLOCK + info.size + (-info.size) % BLOCK == end:
                    return _catalog_members(tail[pos + BLOCK : pos + BLOCK + info.size], where)
        if start == 0 or window >= CATALOG_BYTES_MAX:
            raise BlobCorrupt(f"{where}: no catalog member before the end-of-archive")
        window = min(window * 4, CATALOG_BYTES_MAX)


def _catalog_members(data: bytes, where: str) -> list[Member]:
    try:
        catalog = msgspec.json.decode(data, type=_Catalog)
    except msgspec.DecodeError as exc:
        raise BlobCorrupt(f"{where}: unreadable catalog: {exc}") from None
    if catalog.v != FORMAT_VERSION:
        raise BlobCorrupt(f"{where}: catalog version {catalog.v}, this software reads {FORMAT_VERSION}")
    return [_member_of(e, e.name, e.record_offset, e.data_offset, e.stored_bytes, where) for e in catalog.members]


def delete_whole_archives(locations: list[Location], members_of: Callable[[str], list[Member]],
                          remove_container: Callable[[str], None]) -> None:
    """``BlobBackend.delete`` for per-study archive tiers (nearline, S3): a member cannot be cut out of an archive,
    so an archive is removed only when the call names every member it holds; otherwise nothing is freed (the
    mover removes whole containers). An archive already gone is skipped; a store that cannot be reached raises."""
    by_container: dict[str, set[int]] = {}
    for location in locations:
        container, record, *_ = parse_location(location)
        by_container.setdefault(container, set()).add(record)
    for container, records in by_container.items():
        try:
            members = members_of(container)
        except TierUnavailable:
            raise
        except BlobMissing:
            continue  # already gone
        if {m.record_offset for m in members} <= records:
            remove_container(container)
