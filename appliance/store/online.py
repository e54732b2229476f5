"""This node's backends by name, the one read API over them, and startup recovery.

``BlobStore.open_blob`` is what ``export``, ``verify``, C-GET and C-MOVE read through: it takes a blob's index
record and returns its bytes from the first copy that can be read, fastest tier first: the online volumes, then
the tier backends it was given (nearline, then tape), in the order given. The tier backends are injected by the
composition roots (cli.py, server.py open them with tiering.tiers.open_tier): this package does not import
``tiering``. A copy marked suspect by ``verify`` is read only when no other copy is readable; a copy on an
offline tier (tape) is read only by the recaller (``allow_offline``): anyone else gets ``Offline``. Bytes from a
tier below online are hashed on the way and a mismatch raises ``BlobCorrupt`` at the end (the caller must not
have committed them: export writes a .part file, a C-STORE sub-operation fails); online segments are not
re-hashed on every read (the hot retrieve path: ``verify`` covers them).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from appliance.config import Config
from appliance.errors import ApplianceError, BlobCorrupt, BlobMissing, Offline, TierUnavailable
from appliance.index.db import IndexEntry, StudyIndex
from appliance.index.records import read_header_blob
from appliance.index.schema import COPY_SUSPECT, BlobRecord, Copy
from appliance.store.backend import BlobBackend, LatencyClass, StoredBlob
from appliance.store.segments import SegmentBackend, committed_ends, segment_copy
from appliance.store.spool import clear_tmp
from appliance.store.volumes import VolumeSet

log = logging.getLogger(__name__)


@dataclass
class BlobStore:
    volumes: VolumeSet
    backends: dict[str, BlobBackend]  # the online volumes' segment backends, by volume name
    # The tiers below online, by tier name, fastest first (tiering.tiers.tier_order): read after the volumes.
    tiers: dict[str, BlobBackend] = field(default_factory=dict)

    @classmethod
    def open(cls, config: Config, index: StudyIndex | None = None, create_missing: bool = False,
             tiers: dict[str, BlobBackend] | None = None) -> BlobStore:
        """One SegmentBackend per configured volume. With ``index``, new segments register themselves in it
        (a writer); without, the store is for reading. ``tiers``: opened tier backends, fastest first."""
        volumes = VolumeSet.open(config, create_missing=create_missing)
        backends: dict[str, BlobBackend] = {}
        for vol in volumes.volumes:
            register = (lambda name, ns, v=vol.name: index.register_container(v, name, ns)) if index is not None else None
            backends[vol.name] = SegmentBackend(vol, config.storage.segment_bytes_max, config.storage.fsync,
                                                on_create=register)
        return cls(volumes, backends, dict(tiers or {}))

    def segment_backend(self, volume: str) -> SegmentBackend:
        backend = self.backends[volume]
        assert isinstance(backend, SegmentBackend)
        return backend

    def backend_of(self, copy: Copy) -> BlobBackend | None:
        return self.backends.get(copy.backend) or self.tiers.get(copy.backend)

    def copy_exists(self, copy: Copy) -> bool:
        """Cheap presence check (no read): the copy's container is there. True for backends it cannot tell."""
        backend = self.backend_of(copy)
        if backend is None:
            return False
        return backend.has_container(copy.container) if isinstance(backend, SegmentBackend) else True

    def is_offline(self, copy: Copy) -> bool:
        backend = self.tiers.get(copy.backend)
        return backend is not None and backend.capabilities.latency == LatencyClass.OFFLINE

    def read_order(self, blob: BlobRecord) -> list[Copy]:
        """The copies in the order they are tried: online volumes, then each tier in its rank; within that, copies
        ``verify`` found missing or corrupt last (still tried: a volume that was detached may be back)."""
        rank = {name: i for i, name in enumerate(self.backends)}
        rank.update({name: len(self.backends) + i for i, name in enumerate(self.tiers)})
        unknown = len(rank)
        return sorted(blob.copies, key=lambda c: (c.state == COPY_SUSPECT, rank.get(c.backend, unknown)))

    def read_copy(self, copy: Copy, digest: str = "") -> Iterator[bytes]:
        """One copy's bytes in chunks. With ``digest``, a copy on a tier below online, or one `verify` marked
        suspect, is hashed as it is read and ``BlobCorrupt`` is raised after its last chunk if it does not match."""
        backend = self.backend_of(copy)
        if backend is None:
            raise BlobMissing(f"copy on {copy.backend!r}, which this node does not have")
        chunks = backend.iter_read(copy.location)
        if digest and (copy.backend in self.tiers or copy.state == COPY_SUSPECT):  # (suspect: verify found it bad)
            return _hashed(chunks, digest, f"{copy.backend}:{copy.container}")
        return chunks

    def open_blob(self, digest: str, blob: BlobRecord, allow_offline: bool = False) -> Iterator[bytes]:
        """The blob's bytes, in chunks, from the first readable copy (fastest tier first). Raises ``Offline``
        when the only copies are on an offline tier and ``allow_offline`` is not set (only the recaller sets
        it), ``BlobMissing`` when no copy can be read."""
        errors = []
        unavailable: list[TierUnavailable] = []
        offline = False
        for copy in self.read_order(blob):
            if not allow_offline and self.is_offline(copy):
                offline = True
                continue
            try:
                chunks = self.read_copy(copy, digest)
                first = next(chunks, b"")
            except BlobMissing as exc:  # (BlobCorrupt of a one-chunk blob included: try the next copy)
                errors.append(str(exc))
                if isinstance(exc, TierUnavailable):
                    unavailable.append(exc)
                continue
            return _chain(first, chunks)
        if offline:
            raise Offline()
        if unavailable and len(unavailable) == len(errors):
            # Nothing is lost, a store is down: its own short message ("object store X unreachable") becomes the
            # retrieve's Error Comment.
            raise unavailable[0]
        raise BlobMissing(f"blob {digest}: no readable copy ({'; '.join(errors) or 'no copies'})")

    def read_all(self, digest: str, blob: BlobRecord, allow_offline: bool = False) -> bytes:
        return b"".join(self.open_blob(digest, blob, allow_offline))

    def check(self, digest: str, copy: Copy) -> str:
        """'ok', 'missing' or 'corrupt' for one copy (re-hashes every byte; a tier's copy after decompression)."""
        backend = self.backend_of(copy)
        try:
            if backend is None:
                return "missing"
            return "ok" if backend.sha256(copy.location) == digest else "corrupt"
        except BlobCorrupt:
            return "corrupt"
        except (BlobMissing, OSError):
            return "missing"

    def close(self) -> None:
        for backend in (*self.backends.values(), *self.tiers.values()):
            backend.close()


def _hashed(chunks: Iterator[bytes], digest: str, where: str) -> Iterator[bytes]:
    """``chunks`` hashed on the way, one chunk held back: the last chunk is yielded only once the whole copy has
    been checked, so a reader that got every byte got the right ones, and a reader that stops early (a one-chunk
    blob, a closed generator) never got the end of a wrong copy. A one-chunk copy fails on the first ``next``,
    which lets ``open_blob`` try the next copy."""
    hasher = hashlib.sha256()
    held: bytes | None = None
    try:
        for chunk in chunks:
            hasher.update(chunk)
            if held is not None:
                yield held
            held = chunk
    finally:
        # A reader that stops early closes us: close the backend's reader now (a tape read holds the drive), not
        # whenever the garbage collector gets to it.
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    if hasher.hexdigest() != digest:
        log.error("a copy on %s does not hash to its name: not served (run `appliance verify`)", where)
        raise BlobCorrupt(f"copy on {where} does not hash to its name")
    if held is not None:
        yield held


def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    if first:
        yield first
    yield from rest


def entry_for(backend: BlobBackend, stored: StoredBlob) -> IndexEntry:
    """The index entry of a record read back from a backend (recovery's tail, `index rebuild`): the same header
    parse as the live path, the provenance from the record, the copy where it lies."""
    meta, location = stored.meta, stored.location
    header, ts = read_header_blob(functools.partial(backend.open, location, meta.size), meta.size)
    return IndexEntry(header, meta.digest, meta.size, ts, meta.received_ns, meta.calling_ae,
                      segment_copy(backend.name, location, meta.received_ns), meta.policy)


def replay_order(entry: IndexEntry) -> tuple[int, str, str, str]:
    """The order records are re-applied in (recovery's tail, `index rebuild`): receive order, ties broken so that
    the same records always give the same index."""
    return entry.received_ns, entry.digest, entry.copy.container, entry.copy.location


def recover(store: BlobStore, index: StudyIndex, policy: str = "keep-first") -> dict[str, int]:
    """Before any worker starts: spill files of interrupted receptions; in every segment, the records beyond what
    the index committed are verified and indexed (they were made durable; the index's last transaction may have
    been lost, as it is synced lazily) and a torn tail is truncated; every segment of the previous run is sealed;
    segment deletes that a compaction queued but did not finish are done. ``policy``: the configured duplicate
    policy, for tail records that carry none."""
    totals = {"spill_files": 0, "truncated_bytes": 0, "sealed": 0, "unknown_segments": 0, "reindexed": 0,
              "unreadable": 0, "deleted": 0}
    for vol in store.volumes.volumes:
        totals["spill_files"] += clear_tmp(vol.tmp)
    tail: list[IndexEntry] = []
    for name, backend in store.backends.items():

        def committed_end(segment: str, backend_name: str = name) -> int | None:
            rec = index.container(backend_name, segment)
            return None if rec is None else rec.end

        result = backend.recover(committed_end)
        totals["truncated_bytes"] += result.counts.get("truncated_bytes", 0)
        totals["sealed"] += result.counts.get("sealed", 0)
        totals["unknown_segments"] += result.counts.get("unknown", 0)
        for stored in result.tail:
            try:
                tail.append(entry_for(backend, stored))
            except ApplianceError as exc:  # whole and hashing right, but not indexable: it was refused live too
                totals["unreadable"] += 1
                log.warning("recovery: a record of %s cannot be indexed: %s", name, exc)
    if tail:
        # In receive order, as live (and as `index rebuild`); each record with the policy it was sent under.
        tail.sort(key=replay_order)
        ends = committed_ends(entry.copy for entry in tail)
        for start in range(0, len(tail), 512):
            # The ends go with the last chunk: a crash in between leaves them where they were, so the next start
            # redoes every chunk (one already indexed comes back IDENTICAL, a no-op).
            last = start + 512 >= len(tail)
            index.apply(tail[start : start + 512], policy, ends if last else None)
        totals["reindexed"] = len(tail)
    for name in store.backends:
        index.seal_containers(name, [c.name for c in index.containers(name) if not c.sealed])
    index.sync()  # what recovery did is durable before any worker builds on it
    # Only the online volumes' rows: a tier container's row (an archive a mover emptied) is the movers' to delete
    # (`tier run` resumes it); collecting it here would drop the row and leave the archive behind.
    online_gc = [(backend, name) for backend, name in index.pending_gc() if backend in store.backends]
    totals["deleted"] = index.collect_garbage(online_gc, lambda b, n: _remove(store, b, n))
    return totals


def _remove(store: BlobStore, backend: str, container: str) -> None:
    target = store.backends.get(backend)
    if isinstance(target, SegmentBackend):
        target.remove_segment(container)
