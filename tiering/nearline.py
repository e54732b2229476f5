"""The nearline tier: per-study compressed archives (tiering/archive.py) on slower volumes (a NAS, a RAID 6 set).

Layout of a nearline volume (docs/tiering.md "Nearline tier"):

    <root>/.appliance-nearline          marker: tier, volume name, id (written once by `appliance tier init`)
    <root>/tmp/<name>.partial           an archive being written (removed by recover after a crash)
    <root>/archives/<shard>/<name>.tar  finished archives; <shard> = 2 hex digits of a hash of <name>

A container is one archive, named ``<volume>/<name>.tar``. The write path: ``begin_container`` (or the first put
without one) opens ``tmp/<name>.partial`` on the accepting volume with the most free space; puts append members;
``sync`` finishes every open archive (catalog, end-of-archive), fsyncs it, renames it into ``archives/`` and
fsyncs the folders. A blob is therefore readable only once durable and whole (``atomic_publish``), and a crash
leaves at most ``.partial`` files, which nothing names (the mover journals the container and redoes the move).

A folder without our marker is never written into: an empty mount point whose NAS did not mount looks exactly
like that. The tier has one writer at a time (the mover, under ``tiering.lock``); reads come from any thread.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from appliance.config_tiering import TierConfig, TierVolumeConfig
from appliance.errors import BlobMissing, OutOfSpace, StorageFault, VolumeError
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
from appliance.store.volumes import MARKER as ONLINE_MARKER
from appliance.store.volumes import fsync_dir
from tiering.archive import (
    ArchiveTruncated,
    ArchiveWriter,
    Member,
    MemberReader,
    delete_whole_archives,
    iter_member,
    make_location,
    member_at,
    parse_location,
    read_catalog,
    read_range,
    scan_archive,
)

log = logging.getLogger(__name__)

MARKER = ".appliance-nearline"
PARTIAL = ".partial"
SUFFIX = ".tar"
# Archives kept open for reading. A retrieve reads one study = one archive at a time, so a few dozen cover every
# concurrent reader, and the descriptors stay far below a worker's limit (its sockets and segments need them).
OPEN_ARCHIVES_MAX = 64
# Parsed member headers kept per backend (a ranged read would otherwise re-read and re-parse the member's header
# for every 64 KiB the BufferedReader asks for). ~0.5 KB each.
MEMBERS_CACHED_MAX = 8192
COPY_CHUNK = 1 << 20


def archive_stored_bytes(location: Location) -> int:
    """What a member occupies in its archive (headers and padding included): the index's Copy.stored_bytes."""
    _container, record, data, stored, _size = parse_location(location)
    return data + stored + (-stored) % 512 - record


def _shard(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:2]


@dataclass
class _Pending:
    """An archive being written: its writer, file and where it goes at sync."""

    container: str
    volume: NearlineVolume
    partial: str
    final: str
    fh: BinaryIO
    writer: ArchiveWriter
    error: Exception | None = None  # a write failed: the archive is given up, puts and sync raise this again


class NearlineVolume:
    def __init__(self, tier: str, vc: TierVolumeConfig) -> None:
        self.tier = tier
        self.name = vc.name
        self.root = str(vc.path)
        self.high_watermark = vc.high_watermark
        self.tmp = os.path.join(self.root, "tmp")
        self.archives = os.path.join(self.root, "archives")

    def check(self) -> None:
        """Raise VolumeError unless the volume is mounted and is this tier's volume (its marker says so)."""
        marker = os.path.join(self.root, MARKER)
        try:
            with open(marker) as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise VolumeError(f"nearline volume {self.name} of tier {self.tier}: {self.root} has no {MARKER} "
                              "marker. If it is a mount point, its filesystem is probably not mounted: mount it "
                              "(do not run tier init on an unmounted mount point); if it is a new, mounted volume, "
                              f"run `appliance tier init {self.tier}`") from None
        except (OSError, ValueError) as exc:
            raise VolumeError(f"nearline volume {self.name}: unreadable marker {marker}: {exc}") from None
        if data.get("tier") != self.tier or data.get("volume") != self.name:
            raise VolumeError(f"nearline volume {self.name} of tier {self.tier}: {self.root} is marked as volume "
                              f"{data.get('volume')!r} of tier {data.get('tier')!r}")

    def attached(self) -> bool:
        try:
            self.check()
        except VolumeError:
            return False
        return True

    def usage(self) -> Usage:
        if not self.attached():
            return Usage(self.name, 0, 0, False)
        st = os.statvfs(self.root)
        capacity = st.f_blocks * st.f_frsize
        used = capacity - st.f_bavail * st.f_frsize
        accepting = bool(capacity) and used / capacity < self.high_watermark and os.access(self.tmp, os.W_OK)
        return Usage(self.name, used, capacity, accepting)

    def archive_path(self, file_name: str) -> str:
        return os.path.join(self.archives, _shard(file_name), file_name)

    def partial_path(self, file_name: str) -> str:
        return os.path.join(self.tmp, file_name + PARTIAL)


def init_tier(tier: TierConfig) -> str:
    """Mark each volume of a nearline tier (an explicit admin step: mount the filesystem first). Idempotent;
    refuses a folder that is an online volume or another tier's volume."""
    lines = []
    for vc in tier.volumes:
        root = vc.path
        marker = root / MARKER
        if (root / ONLINE_MARKER).exists():
            raise VolumeError(f"{root} is an online volume (it holds {ONLINE_MARKER}); a nearline volume needs its "
                              "own filesystem or folder")
        if marker.exists():
            NearlineVolume(tier.name, vc).check()  # raises if it belongs to another tier or volume
            lines.append(f"nearline volume {vc.name}: {root} already initialised")
            continue
        if not root.parent.is_dir():
            raise VolumeError(f"nearline volume {vc.name} of tier {tier.name}: {root.parent} does not exist. Mount "
                              "the volume's filesystem first (tier init creates only the last folder of the path)")
        root.mkdir(exist_ok=True)
        for sub in ("tmp", "archives"):
            (root / sub).mkdir(exist_ok=True, mode=0o700)
        volume_id = str(uuid.uuid4())
        tmp = root / (MARKER + ".tmp")
        with open(tmp, "w") as fh:
            json.dump({"tier": tier.name, "volume": vc.name, "id": volume_id, "created": time.time()}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, marker)
        fsync_dir(root)
        lines.append(f"nearline volume {vc.name}: {root} initialised (id {volume_id})")
    return "\n".join(lines)


def open_nearline(tier: TierConfig) -> NearlineBackend:
    return NearlineBackend(tier)


class NearlineBackend(BlobBackend):
    """Per-study zstd archives on the volumes of one nearline tier. ``name`` is the tier's name.

    ``deletes_immediately`` is False: an archive holds a whole study and a member cannot be cut out of it without
    rewriting it; the mover removes whole containers (``remove_container``) once the index names none of their
    blobs. ``delete`` removes an archive only when the call names every blob in it."""

    capabilities = Capabilities(random_read=True, atomic_publish=True, latency=LatencyClass.NEARLINE,
                                deletes_immediately=False)

    def __init__(self, tier: TierConfig, open_archives_max: int = OPEN_ARCHIVES_MAX) -> None:
        assert tier.kind == "nearline" and tier.volumes
        self.tier = tier
        self.name = tier.name
        self.volumes = {vc.name: NearlineVolume(tier.name, vc) for vc in tier.volumes}
        for volume in self.volumes.values():
            # A volume of another tier is a configuration error: refuse at once. A missing marker (a NAS not
            # mounted) is not: the other volumes serve, and this one's reads fail with a clear BlobMissing.
            if os.path.exists(os.path.join(volume.root, MARKER)):
                volume.check()
            else:
                log.warning("nearline tier %s: volume %s (%s) is not mounted or not initialised", self.name,
                            volume.name, volume.root)
        self._pending: list[_Pending] = []
        self._current: _Pending | None = None  # where puts go until the next sync
        self._readers: OrderedDict[str, int] = OrderedDict()  # container -> read-only fd, LRU
        self._readers_max = open_archives_max
        self._members: OrderedDict[tuple[str, int], Member] = OrderedDict()
        self._lock = threading.Lock()

    # ---- naming ------------------------------------------------------------------------------------------------

    def _split(self, container: str) -> tuple[NearlineVolume, str]:
        volume_name, _, file_name = container.partition("/")
        volume = self.volumes.get(volume_name)
        if volume is None or not file_name.endswith(SUFFIX) or "/" in file_name or file_name.startswith("."):
            raise BlobMissing(f"{self.name}: no archive {container!r} on this tier")
        return volume, file_name

    def archive_file(self, container: str) -> str:
        """The path of a finished archive (for tools and tests: ``tar -tf`` it)."""
        volume, file_name = self._split(container)
        return volume.archive_path(file_name)

    # ---- write path (one writer) -------------------------------------------------------------------------------

    def begin_container(self, hint: str) -> str:
        return self._open_archive(hint).container

    def _pick_volume(self) -> NearlineVolume:
        best: tuple[int, NearlineVolume] | None = None
        for volume in self.volumes.values():
            use = volume.usage()
            if use.accepting and (best is None or use.capacity_bytes - use.used_bytes > best[0]):
                best = (use.capacity_bytes - use.used_bytes, volume)
        if best is None:
            raise OutOfSpace(f"nearline tier {self.name}: no volume takes new archives (each is full beyond its "
                             "high_watermark, read-only, or not mounted)")
        return best[1]

    def _open_archive(self, hint: str) -> _Pending:
        volume = self._pick_volume()
        # The hint is hashed: a caller passing a study UID must not put it into file names on a shared NAS.
        named = hashlib.sha256(hint.encode()).hexdigest()[:16]
        file_name = f"{named}-{time.time_ns():016x}-{uuid.uuid4().hex[:8]}{SUFFIX}"
        partial = volume.partial_path(file_name)
        try:
            fh = open(partial, "xb", buffering=COPY_CHUNK)  # noqa: SIM115 - closed at sync, close or discard
        except OSError as exc:
            raise _write_error(self.name, volume.name, exc) from None
        writer = ArchiveWriter(fh, compression_level=self.tier.compression_level, frame_bytes=self.tier.frame_bytes,
                               spill_dir=volume.tmp)
        pending = _Pending(f"{volume.name}/{file_name}", volume, partial, volume.archive_path(file_name), fh, writer)
        self._pending.append(pending)
        self._current = pending
        log.debug("nearline %s: new archive %s", self.name, pending.container)
        return pending

    def put(self, meta: BlobMeta, source: BlobSource) -> Location:
        assert source.size == meta.size
        pending = self._current if self._current is not None else self._open_archive("blobs")
        if pending.error is not None:
            raise _again(pending.error, f"nearline {self.name}: archive {pending.container} failed earlier")
        try:
            member = pending.writer.add(meta, source.chunks(COPY_CHUNK))
        except OSError as exc:
            pending.error = _write_error(self.name, pending.volume.name, exc)
            raise pending.error from None
        except ValueError as exc:
            if pending.writer.broken:  # a short source is harmless unless half of it went out (raw members)
                pending.error = exc
            raise
        return make_location(pending.container, member)

    def sync(self) -> None:
        """Finish, fsync and rename into place every archive written since the last sync. After a failure none of
        the group's archives counts (the rest are discarded): the caller acknowledges nothing of it."""
        pending, self._pending, self._current = self._pending, [], None
        done = 0
        try:
            for p in pending:
                self._finish(p)
                done += 1
        except BaseException:
            for p in pending[done:]:
                self._discard(p)
            raise

    def _finish(self, p: _Pending) -> None:
        if p.error is not None:
            raise _again(p.error, f"nearline {self.name}: archive {p.container} was not written whole")
        try:
            p.writer.finish()
            p.fh.flush()
        except OSError as exc:  # a full volume refuses this archive; the move is tried again later
            raise _write_error(self.name, p.volume.name, exc) from None
        try:
            if self.tier.fsync:
                os.fsync(p.fh.fileno())
        except OSError as exc:
            raise StorageFault(f"nearline {self.name}: fsync of archive {p.container} failed: {exc.strerror}; "
                               "the page cache can no longer be trusted") from None
        p.fh.close()
        shard = os.path.dirname(p.final)
        try:
            if not os.path.isdir(shard):
                os.makedirs(shard, mode=0o700, exist_ok=True)
                if self.tier.fsync:
                    fsync_dir(p.volume.archives)
            os.rename(p.partial, p.final)
            if self.tier.fsync:
                fsync_dir(shard)
                fsync_dir(p.volume.tmp)
        except OSError as exc:
            raise StorageFault(f"nearline {self.name}: publishing archive {p.container} failed: "
                               f"{exc.strerror}") from None

    def _discard(self, p: _Pending) -> None:
        try:
            p.fh.close()
        except OSError:
            pass
        try:
            os.unlink(p.partial)
        except OSError:
            pass

    def publish(self, locations: list[Location]) -> None:
        """Archives are renamed into place by ``sync``: readable by every process from then on."""

    def close(self) -> None:
        # Unsynced archives are left as .partial files, as a crash would leave them: recover removes them.
        for p in self._pending:
            try:
                p.fh.close()
            except OSError:
                pass
        self._pending, self._current = [], None
        with self._lock:
            for fd in self._readers.values():
                os.close(fd)
            self._readers.clear()
            self._members.clear()

    # ---- read path (any thread) --------------------------------------------------------------------------------

    def _read_at(self, container: str) -> Callable[[int, int], bytes]:
        def read_at(offset: int, length: int) -> bytes:
            # Descriptor lookup and pread under one lock: an eviction by another thread cannot close it in between
            # (decompression, the expensive part, runs outside it).
            with self._lock:
                fd = self._reader_locked(container)
                try:
                    return os.pread(fd, length, offset)
                except OSError as exc:  # a NAS gone away (EIO, ESTALE): this copy is unreadable, not our state
                    self._forget_locked(container)
                    raise BlobMissing(f"{self.name}:{container}: read failed: {exc.strerror}") from None
        return read_at

    def _reader_locked(self, container: str) -> int:
        fd = self._readers.get(container)
        if fd is not None:
            self._readers.move_to_end(container)
            return fd
        volume, file_name = self._split(container)
        try:
            fd = os.open(volume.archive_path(file_name), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            why = "" if volume.attached() else f" (volume {volume.name} is not mounted: no {MARKER} in {volume.root})"
            raise BlobMissing(f"{self.name}: archive {container} cannot be opened: {exc.strerror}{why}") from None
        self._readers[container] = fd
        while len(self._readers) > self._readers_max:
            _old, old_fd = self._readers.popitem(last=False)
            os.close(old_fd)
        return fd

    def _forget_locked(self, container: str) -> None:
        fd = self._readers.pop(container, None)
        if fd is not None:
            os.close(fd)
        for key in [k for k in self._members if k[0] == container]:
            del self._members[key]

    def _member(self, location: Location) -> tuple[Member, Callable[[int, int], bytes]]:
        container, record, data, stored, size = parse_location(location)
        read_at = self._read_at(container)
        key = (container, record)
        with self._lock:
            member = self._members.get(key)
            if member is not None:
                self._members.move_to_end(key)
        if member is None:
            member = member_at(read_at, record, data, f"{self.name}:{container}")
            with self._lock:
                self._members[key] = member
                while len(self._members) > MEMBERS_CACHED_MAX:
                    self._members.popitem(last=False)
        if (member.data_offset, member.stored_bytes, member.size) != (data, stored, size):
            raise BlobMissing(f"{self.name}:{location}: the member there is another one")
        return member, read_at

    def read(self, location: Location, offset: int = 0, length: int = -1) -> bytes:
        member, read_at = self._member(location)
        return read_range(read_at, member, offset, length, f"{self.name}:{location}")

    def iter_read(self, location: Location, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
        member, read_at = self._member(location)
        for plain in iter_member(read_at, member, chunk_bytes, f"{self.name}:{location}"):
            if len(plain) <= chunk_bytes:
                yield plain
                continue
            for start in range(0, len(plain), chunk_bytes):  # a frame larger than the caller's chunk
                yield plain[start : start + chunk_bytes]

    def sha256(self, location: Location) -> str:
        """The SHA-256 of the original (decompressed) bytes: what the index's digest is."""
        hasher = hashlib.sha256()
        member, read_at = self._member(location)
        for plain in iter_member(read_at, member, COPY_CHUNK, f"{self.name}:{location}"):
            hasher.update(plain)
        return hasher.hexdigest()

    def open(self, location: Location, size: int) -> BinaryIO:
        """A seekable file over the original bytes that decompresses each frame once, however it is read."""
        member, read_at = self._member(location)
        return io.BufferedReader(MemberReader(read_at, member, f"{self.name}:{location}"), buffer_size=1 << 16)

    def stat(self, location: Location) -> BlobMeta:
        return self._member(location)[0].meta

    # ---- listing, deleting, recovery ---------------------------------------------------------------------------

    def archives(self, volume: NearlineVolume) -> Iterator[str]:
        """The containers of one volume (finished archives), sorted."""
        volume.check()
        try:
            shards = sorted(os.listdir(volume.archives))
        except FileNotFoundError:
            return
        for shard in shards:
            try:
                names = sorted(os.listdir(os.path.join(volume.archives, shard)))
            except NotADirectoryError:
                continue
            for file_name in names:
                if file_name.endswith(SUFFIX) and _shard(file_name) == shard:
                    yield f"{volume.name}/{file_name}"

    def members(self, container: str) -> list[Member]:
        """The members of one archive: from its catalog, else (a damaged catalog) by scanning it."""
        volume, file_name = self._split(container)
        path = volume.archive_path(file_name)
        where = f"{self.name}:{container}"
        try:
            size = os.path.getsize(path)
        except OSError as exc:
            raise BlobMissing(f"{where}: {exc.strerror}") from None
        try:
            return read_catalog(self._read_at(container), size, where)
        except BlobMissing as exc:
            log.warning("%s: catalog unreadable (%s); scanning the archive", where, exc)
        found: list[Member] = []
        with open(path, "rb") as fh:
            try:
                for member in scan_archive(fh, where):
                    found.append(member)
            except ArchiveTruncated as exc:
                log.error("%s", exc)
        return found

    def list(self) -> Iterator[StoredBlob]:
        """Every blob of every archive. A volume that is not mounted raises VolumeError (a rebuild or verify must
        not silently miss it)."""
        for volume in self.volumes.values():
            for container in self.archives(volume):
                for member in self.members(container):
                    yield StoredBlob(make_location(container, member), member.meta)

    def delete(self, locations: builtins.list[Location]) -> None:
        delete_whole_archives(locations, self.members, self.remove_container)

    def recover(self, committed_end: Callable[[str], int | None]) -> Recovery:
        """Remove the ``.partial`` archives a crash left (nothing names them: the mover redoes its journaled move).
        Finished archives were durable before anything named them; there is no tail to hand back. Call it with
        the tier's writer lock held (no other process writing)."""
        result = Recovery()
        result.counts.update(removed_partial=0, unmounted=0)
        for volume in self.volumes.values():
            if not volume.attached():
                result.counts["unmounted"] += 1
                continue
            try:
                names = os.listdir(volume.tmp)
            except FileNotFoundError:
                continue
            for file_name in names:
                if file_name.endswith(PARTIAL):
                    os.unlink(os.path.join(volume.tmp, file_name))
                    result.counts["removed_partial"] += 1
            if self.tier.fsync:
                fsync_dir(volume.tmp)
        return result

    def container_of(self, location: Location) -> str:
        return parse_location(location)[0]

    def remove_container(self, name: str) -> None:
        """Delete an archive (finished or still partial). Raises VolumeError when its volume is not mounted (the
        index's gc keeps its row and retries), harmless when it is already gone."""
        volume, file_name = self._split(name)
        volume.check()
        for p in [p for p in self._pending if p.container == name]:
            self._pending.remove(p)
            if self._current is p:
                self._current = None
            self._discard(p)
        with self._lock:
            self._forget_locked(name)
        for path in (volume.archive_path(file_name), volume.partial_path(file_name)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            if self.tier.fsync:
                fsync_dir(os.path.dirname(path))

    def usage(self) -> tuple[Usage, ...]:
        return tuple(volume.usage() for volume in self.volumes.values())


def _again(error: Exception, message: str) -> Exception:
    """The error an archive failed with, raised again (same class: a full volume stays OutOfSpace, not a fault)."""
    if isinstance(error, OutOfSpace | StorageFault | ValueError):
        return type(error)(f"{message}: {error}")
    return StorageFault(f"{message}: {error}")


def _write_error(tier: str, volume: str, exc: OSError) -> Exception:
    """A full volume refuses the archive (the mover tries again later); any other write error is a storage fault."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return OutOfSpace(f"nearline {tier}: volume {volume} full: {exc.strerror}")
    return StorageFault(f"nearline {tier}: writing an archive on volume {volume} failed: {exc.strerror}")

