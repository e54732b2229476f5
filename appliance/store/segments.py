"""The online tier: append-only segment files on a volume, one active segment per writer.

A segment is a POSIX tar (pax) archive: ``tar -tf`` lists it and ``tar -xf`` extracts valid Part-10 files named
``<sha256>.dcm``, without our software. Each record is a pax extended header (``mtime`` = receive time with ns,
``comment`` = our provenance as JSON), a ustar header and the blob's bytes padded to 512. ``comment`` is a
standard pax keyword that readers ignore silently (GNU tar warns on unknown keywords).

Invariants (kept with store/commit.py and index/db.py):
- one writer per segment: the worker (or compactor) that created it; it appends at the offset it tracks itself,
  so a torn append is simply overwritten by the next one;
- a segment is registered in the index (``on_create``) before its first byte is written, so a segment file
  that the index does not know is never ours to delete (the index was lost or replaced: ``index rebuild``);
- the index names a record only after ``sync`` made it durable;
- ``recover`` keeps what the index committed, hands back every whole record beyond it whose bytes hash to its name
  (durable, so possibly acknowledged: the index's last transaction is synced lazily) for re-indexing, truncates
  from the first torn one (never made durable, so never acknowledged) and seals: the segments of a previous run
  are never appended to again;
- a sealed segment ends with the two zero blocks of a tar end-of-archive and is read-only.
"""

from __future__ import annotations

import errno
import io
import itertools
import json
import logging
import os
import tarfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, MutableSequence
from typing import BinaryIO

from appliance.errors import BlobMissing, OutOfSpace, StorageFault
from appliance.index.schema import Copy
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
from appliance.store.volumes import Volume, fsync_dir

log = logging.getLogger(__name__)

BLOCK = 512
END_OF_ARCHIVE = b"\x00" * (2 * BLOCK)
SUFFIX = ".tar"
PROVENANCE_VERSION = 1
COPY_CHUNK = 8 << 20


def segment_name() -> str:
    """Sortable by creation time, unique across processes and restarts."""
    return f"{time.time_ns():016x}-{uuid.uuid4().hex[:8]}{SUFFIX}"


def created_ns(segment: str) -> int:
    """The creation time a segment's name carries."""
    return int(segment.split("-", 1)[0], 16)


def parse_location(location: Location) -> tuple[str, int, int, int]:
    """``segment:record_offset:data_offset:size`` -> its parts."""
    segment, record, data, size = location.rsplit(":", 3)
    return segment, int(record), int(data), int(size)


def make_location(segment: str, record: int, data: int, size: int) -> Location:
    return f"{segment}:{record}:{data}:{size}"


def record_end(location: Location) -> int:
    """Offset just past the record (data padded to a tar block)."""
    _seg, _record, data, size = parse_location(location)
    return data + size + (-size) % BLOCK


def segment_copy(backend: str, location: Location, received_ns: int) -> Copy:
    """The index's copy for a record: its segment, and the bytes it occupies there (headers and padding included)."""
    segment, record, _data, _size = parse_location(location)
    return Copy(backend, segment, location, record_end(location) - record, received_ns)


def committed_ends(copies: Iterable[Copy]) -> dict[tuple[str, str], int]:
    """Per (backend, segment), the end of the last of ``copies`` there: what an index commit naming them records as
    committed (recovery keeps what lies before it as it is)."""
    ends: dict[tuple[str, str], int] = {}
    for copy in copies:
        key = (copy.backend, copy.container)
        ends[key] = max(ends.get(key, 0), record_end(copy.location))
    return ends


def record_header(meta: BlobMeta) -> bytes:
    info = tarfile.TarInfo(f"{meta.digest}.dcm")
    info.size = meta.size
    info.mode = 0o600
    info.mtime = meta.received_ns // 1_000_000_000
    info.pax_headers = {
        "mtime": f"{meta.received_ns // 1_000_000_000}.{meta.received_ns % 1_000_000_000:09d}",
        "comment": json.dumps({"appliance": PROVENANCE_VERSION, "received_ns": meta.received_ns,
                               "calling_ae": meta.calling_ae, "policy": meta.policy}, separators=(",", ":")),
    }
    return info.tobuf(format=tarfile.PAX_FORMAT)


def meta_of(info: tarfile.TarInfo) -> BlobMeta | None:
    """Provenance of one tar member, or None when it is not one of our records."""
    name = info.name
    if not name.endswith(".dcm") or len(name) != 68 or not info.isfile():
        return None
    try:
        prov = json.loads(info.pax_headers.get("comment", "{}"))
        return BlobMeta(digest=name[:64], size=info.size, received_ns=int(prov["received_ns"]),
                        calling_ae=str(prov.get("calling_ae", "")), policy=str(prov.get("policy", "")))
    except (ValueError, KeyError, TypeError, AssertionError):
        return None


class SegmentBackend(BlobBackend):
    """The segments of one volume. ``name`` is the volume's name (the index's copies say which volume)."""

    capabilities = Capabilities(random_read=True, atomic_publish=True, latency=LatencyClass.ONLINE,
                                deletes_immediately=False)

    def __init__(self, volume: Volume, segment_bytes_max: int = 1 << 30, fsync: bool = True,
                 on_create: Callable[[str, int], None] | None = None, open_files_max: int = 64) -> None:
        assert segment_bytes_max >= 1 << 20, "a segment must hold at least a few instances"
        self.volume = volume
        self.name = volume.name
        self.dir = os.path.join(volume.root, "segments")
        self.segment_bytes_max = segment_bytes_max
        self.fsync = fsync
        self.on_create = on_create
        self.active: str | None = None
        self._fd = -1
        self._end = 0  # where the next record goes in the active segment
        self._unsynced: list[int] = []  # descriptors written since the last sync (a segment sealed meanwhile too)
        self._to_close: list[int] = []
        self._sealed: list[str] = []  # sealed since the last take_sealed(), for the index
        self._readers: OrderedDict[str, int] = OrderedDict()  # segment -> read-only fd, LRU
        self._readers_max = open_files_max
        self._readers_lock = threading.Lock()

    # ---- write path (one writer thread) -------------------------------------------------------------

    def put(self, meta: BlobMeta, source: BlobSource) -> Location:
        assert source.size == meta.size
        header = record_header(meta)
        # Room for the record, its padding and the end-of-archive a seal appends: a sealed segment never exceeds
        # segment_bytes_max (unless one record alone is larger).
        needed = len(header) + meta.size + (-meta.size) % BLOCK + len(END_OF_ARCHIVE)
        if self.active is None or (self._end > 0 and self._end + needed > self.segment_bytes_max):
            self._roll()
        assert self.active is not None
        start = self._end
        data_offset = start + len(header)
        pad = b"\x00" * ((-meta.size) % BLOCK)
        try:
            fd = source.fileno()
            if fd is not None:  # a spill file: copied in the kernel
                self._pwrite_all([header], start)
                self._copy_from(fd, meta.size, data_offset)
                self._pwrite_all([pad], data_offset + meta.size)
            elif meta.size <= COPY_CHUNK:  # the common case: one syscall for the whole record
                self._pwrite_all([header, *source.chunks(COPY_CHUNK), pad], start)
            else:  # a large blob streamed from elsewhere (compaction, a recall): bounded memory
                offset = start
                for part in itertools.chain([header], source.chunks(COPY_CHUNK)):
                    self._pwrite_all([part], offset)
                    offset += len(part)
                if offset != data_offset + meta.size:
                    raise OSError(errno.EIO, "source shorter than its size")
                self._pwrite_all([pad], offset)
        except OSError as exc:
            # Nothing names the torn bytes and the next put overwrites them; give the space back now.
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                pass
            raise _write_error(self.name, exc) from None
        except BaseException:
            # The source failed (a tier copy that does not hash to its name, a recall's tape read): the same cut.
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                pass
            raise
        self._end = data_offset + meta.size + len(pad)
        if not self._unsynced or self._unsynced[-1] != self._fd:
            self._unsynced.append(self._fd)
        self.volume.charge(self._end - start)
        return make_location(self.active, start, data_offset, meta.size)

    def _pwrite_all(self, parts: list[bytes | memoryview], offset: int) -> None:
        views = [memoryview(p) for p in parts if len(p)]
        while views:
            written = os.pwritev(self._fd, views, offset)
            offset += written
            while views and written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            if views and written:
                views[0] = views[0][written:]

    def _copy_from(self, src: int, size: int, offset: int) -> None:
        done = 0
        while done < size:
            n = os.copy_file_range(src, self._fd, min(COPY_CHUNK, size - done), done, offset + done)
            if n == 0:
                raise OSError(errno.EIO, "spill file shorter than its instance")
            done += n

    def sync(self) -> None:
        pending, self._unsynced = self._unsynced, []
        for fd in pending:
            try:
                if self.fsync:
                    os.fdatasync(fd)  # data and size; a segment's other metadata never matters
                gone = os.fstat(fd).st_nlink == 0
            except OSError as exc:
                raise StorageFault(f"fdatasync of a segment on volume {self.name} failed: {exc.strerror}; "
                                   "the page cache can no longer be trusted") from None
            if gone:  # deleted behind our back: what was just written there is in no file any more
                raise StorageFault(f"a segment on volume {self.name} was deleted while being written")
        for fd in self._to_close:
            os.close(fd)
        self._to_close.clear()

    def take_sealed(self) -> list[str]:
        """Segments sealed since the last call (their seal is durable once ``sync`` returned)."""
        sealed, self._sealed = self._sealed, []
        return sealed

    def publish(self, locations: list[Location]) -> None:
        """Records are readable as soon as they are written; only the index makes them reachable."""

    def seal_active(self) -> None:
        """Write the end-of-archive after the active segment's last record (durable at the next ``sync``); the next
        put starts a new segment."""
        if self.active is None:
            return
        try:
            self._pwrite_all([END_OF_ARCHIVE], self._end)
        except OSError as exc:
            raise _write_error(self.name, exc) from None
        if not self._unsynced or self._unsynced[-1] != self._fd:
            self._unsynced.append(self._fd)
        self._to_close.append(self._fd)  # closed after the sync that makes the seal durable
        self._sealed.append(self.active)
        self.active, self._fd = None, -1

    def _roll(self) -> None:
        """Seal the active segment (if any) and start a new one."""
        self.seal_active()
        name = segment_name()
        path = os.path.join(self.dir, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise OutOfSpace(f"volume {self.name}: cannot create a segment: {exc.strerror}") from None
        try:
            if self.fsync:
                fsync_dir(self.dir)
            if self.on_create is not None:
                self.on_create(name, created_ns(name))  # registered in the index before its first byte
        except Exception:
            os.close(fd)
            os.unlink(path)
            raise
        self.active, self._fd, self._end = name, fd, 0
        log.debug("volume %s: new segment %s", self.name, name)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        for fd in self._to_close:
            os.close(fd)
        self._to_close.clear()
        with self._readers_lock:
            for fd in self._readers.values():
                os.close(fd)
            self._readers.clear()

    # ---- read path (any thread) ---------------------------------------------------------------------

    def _reader_locked(self, segment: str) -> int:
        """A read-only descriptor of ``segment`` from the LRU (the caller holds ``_readers_lock``)."""
        fd = self._readers.get(segment)
        if fd is not None:
            self._readers.move_to_end(segment)
            return fd
        try:
            fd = os.open(os.path.join(self.dir, segment), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BlobMissing(f"segment {self.name}/{segment} is gone") from None
        self._readers[segment] = fd
        while len(self._readers) > self._readers_max:
            _old, old_fd = self._readers.popitem(last=False)
            os.close(old_fd)
        return fd

    def forget_reader(self, segment: str) -> None:
        with self._readers_lock:
            fd = self._readers.pop(segment, None)
            if fd is not None:
                os.close(fd)

    def read(self, location: Location, offset: int = 0, length: int = -1) -> bytes:
        segment, _record, data, size = parse_location(location)
        if length < 0 or offset + length > size:
            length = max(0, size - offset)
        chunks = []
        pos = data + offset
        # The pread runs under the readers' lock: another thread evicting this segment from the LRU would close
        # the descriptor (and the number could be reused) mid-read. Reads are not concurrent in a worker today;
        # C-GET/C-MOVE will want a reference count instead.
        with self._readers_lock:
            fd = self._reader_locked(segment)
            while length > 0:
                chunk = os.pread(fd, length, pos)
                if not chunk:
                    raise BlobMissing(f"{self.name}:{location}: segment ends before the record does")
                chunks.append(chunk)
                pos += len(chunk)
                length -= len(chunk)
        return b"".join(chunks)

    def stat(self, location: Location) -> BlobMeta:
        segment, record, data, _size = parse_location(location)
        with self._readers_lock:
            header = os.pread(self._reader_locked(segment), data - record, record)
        info = _first_member(header)
        meta = meta_of(info) if info is not None else None
        if meta is None:
            raise BlobMissing(f"{self.name}:{location}: no record there")
        return meta

    def delete(self, locations: list[Location]) -> None:
        """Space in a segment comes back through compaction (store/compact.py), which rewrites what is live."""

    def has_container(self, segment: str) -> bool:
        return os.path.exists(os.path.join(self.dir, segment))

    def segments(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.dir) if n.endswith(SUFFIX))
        except FileNotFoundError:
            return []

    def list(self) -> Iterator[StoredBlob]:
        for segment in self.segments():
            yield from self.list_segment(segment)

    def list_segment(self, segment: str) -> Iterator[StoredBlob]:
        """Every record of one segment, in order; stops quietly at a torn tail."""
        path = os.path.join(self.dir, segment)
        try:
            with open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r:") as archive:
                size = os.fstat(fh.fileno()).st_size
                while True:
                    try:
                        info = archive.next()
                    except tarfile.TarError:
                        return  # a torn tail (an append a crash cut short): nothing beyond was acknowledged
                    if info is None:
                        return
                    meta = meta_of(info)
                    if meta is None or info.offset_data + info.size > size:
                        continue
                    yield StoredBlob(make_location(segment, info.offset, info.offset_data, info.size), meta)
        except tarfile.ReadError:
            return  # empty or not a tar at all
        except FileNotFoundError:
            return

    # ---- recovery -----------------------------------------------------------------------------------

    def recover(self, committed_end: Callable[[str], int | None]) -> Recovery:
        """Each known segment: keep what the index committed, verify every record beyond it (whole, and hashing to
        its name) and hand those back to be indexed (durable, and possibly acknowledged: the index syncs its last
        transaction lazily), truncate from the first torn or corrupt one, and seal. Unknown files are left alone
        (loudly), except empty ones, which never held a byte."""
        result = Recovery()
        counts = result.counts
        counts.update(truncated_bytes=0, sealed=0, unknown=0, tail_records=0)
        for segment in self.segments():
            path = os.path.join(self.dir, segment)
            end = committed_end(segment)
            if end is None and os.path.getsize(path) == 0:
                # Created, then a crash before its registration: it never held a byte, whatever index is in use.
                os.unlink(path)
                continue
            if end is None:
                counts["unknown"] += 1
                log.warning("volume %s: segment %s is not in the index; it is left alone (run `appliance index "
                            "rebuild` if the index was lost)", self.name, segment)
                continue
            with open(path, "r+b") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size < end:
                    raise StorageFault(f"volume {self.name}: segment {segment} is {size} bytes but the index "
                                       f"committed records up to {end}: the volume lost acknowledged data")
                pos, sealed = self._verified_tail(fh, segment, end, size, result.tail)
                if sealed and size == pos + len(END_OF_ARCHIVE):
                    continue  # sealed, nothing after the end-of-archive
                counts["truncated_bytes"] += size - pos
                fh.truncate(pos)
                fh.seek(pos)
                fh.write(END_OF_ARCHIVE)
                fh.flush()
                if self.fsync:
                    os.fdatasync(fh.fileno())
                counts["sealed"] += 1
        counts["tail_records"] = len(result.tail)
        return result

    def _verified_tail(self, fh: BinaryIO, segment: str, start: int, size: int, tail: MutableSequence[StoredBlob]
                       ) -> tuple[int, bool]:
        """Walk the records from ``start``: append each whole, hash-verified one to ``tail``. Returns where the good
        records end and whether an end-of-archive starts there."""
        pos = start
        fd = fh.fileno()
        while True:
            block = os.pread(fd, BLOCK, pos)
            if len(block) < BLOCK:
                return pos, False  # the end of the file (or a torn header)
            if block == b"\x00" * BLOCK:
                return pos, True
            fh.seek(pos)
            try:
                with tarfile.open(fileobj=fh, mode="r:") as archive:
                    info = archive.next()
            except tarfile.TarError:
                return pos, False
            meta = meta_of(info) if info is not None else None
            if info is None or meta is None or info.offset_data + info.size > size:
                return pos, False
            location = make_location(segment, pos, info.offset_data, info.size)
            if self.sha256(location) != meta.digest:
                return pos, False  # written but not made durable before the crash: never acknowledged
            tail.append(StoredBlob(location, meta))
            pos = record_end(location)

    def container_of(self, location: Location) -> str:
        return parse_location(location)[0]

    def remove_container(self, name: str) -> None:
        self.remove_segment(name)

    def usage(self) -> tuple[Usage, ...]:
        st = os.statvfs(self.volume.root)
        capacity = st.f_blocks * st.f_frsize
        used = capacity - st.f_bavail * st.f_frsize
        return (Usage(self.volume.name, used, capacity, bool(capacity) and used / capacity < self.volume.high_watermark),)

    def remove_segment(self, segment: str) -> None:
        """Delete a whole segment file (compaction, after the index stopped naming anything in it)."""
        self.forget_reader(segment)
        try:
            os.unlink(os.path.join(self.dir, segment))
        except FileNotFoundError:
            pass
        if self.fsync:
            fsync_dir(self.dir)


def _write_error(volume: str, exc: OSError) -> Exception:
    """A full volume refuses one instance (0xA700); any other write error (EIO) is a storage fault: what the page
    cache holds for this file can no longer be trusted."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return OutOfSpace(f"volume {volume} full: {exc.strerror}")
    return StorageFault(f"writing a segment on volume {volume} failed: {exc.strerror}")


def _first_member(header: bytes) -> tarfile.TarInfo | None:
    try:
        with tarfile.open(fileobj=io.BytesIO(header + b"\x00" * BLOCK), mode="r:") as archive:
            return archive.next()
    except tarfile.TarError:
        return None
