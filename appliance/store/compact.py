"""Space reclaim: rewrite sealed segments whose records are mostly dead, then delete them.

A record dies when no index entry names it any more: an overwritten instance, an identical re-send (its bytes were
appended before the index found the duplicate), a group whose index commit failed. A sealed segment whose dead
share reaches ``storage.compaction_dead_ratio`` (or that holds nothing live) is compacted:

1. its live records are copied, with their provenance, to the compactor's own active segment, and synced;
2. one index transaction records how far that segment is committed (recovery keeps what lies before it as is);
3. one index transaction repoints every moved blob (compare-and-swap: a blob freed or moved meanwhile is left
   alone) and, if nothing live is left in the old segment, replaces its container record by a ``gc`` row;
4. the old segment file is deleted, then its ``gc`` row.

A crash after 1 or 2 leaves dead copies (reclaimed by a later compaction); after 3, the ``gc`` row makes startup
recovery finish step 4. Every step is idempotent; the copy rate is limited (``compaction_bytes_per_s``) so that
ingest keeps the disk. Only one compactor runs at a time (a lock file beside the index).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from appliance.audit import SUCCESS, write_once
from appliance.config import Config
from appliance.errors import ApplianceError, BlobMissing
from appliance.index.db import StudyIndex
from appliance.index.schema import ContainerRecord, Copy
from appliance.store.backend import BlobBackend, BlobSource
from appliance.store.online import BlobStore
from appliance.store.segments import SegmentBackend, committed_ends, segment_copy

log = logging.getLogger(__name__)
COMPACT_LOCK = "compact.lock"


@dataclass
class CompactionReport:
    candidates: list[dict[str, object]] = field(default_factory=list)
    segments_compacted: int = 0
    records_moved: int = 0
    bytes_copied: int = 0
    bytes_reclaimed: int = 0
    dry_run: bool = False


def dead_share(rec: ContainerRecord) -> float:
    return 1.0 if rec.end <= 0 else max(0.0, (rec.end - rec.live_bytes) / rec.end)


def candidates(index: StudyIndex, backend: str, dead_ratio: float) -> list[ContainerRecord]:
    """Sealed segments worth rewriting, the deadest first."""
    found = [c for c in index.containers(backend)
             if c.sealed and (c.live_records == 0 or dead_share(c) >= dead_ratio)]
    return sorted(found, key=dead_share, reverse=True)


class _CopySource(BlobSource):
    """A blob's bytes streamed from its current copy (bounded memory whatever its size), hashed on the way: a copy
    whose bytes do not match its name is never moved (that would spread the damage and hide it from verify)."""

    def __init__(self, backend: BlobBackend, location: str, size: int) -> None:
        self.backend, self.location, self.size = backend, location, size
        self.hasher = hashlib.sha256()

    def chunks(self, chunk_bytes: int) -> Iterator[bytes]:
        for chunk in self.backend.iter_read(self.location, chunk_bytes):
            self.hasher.update(chunk)
            yield chunk


class _RateLimit:
    def __init__(self, bytes_per_s: int) -> None:
        self.bytes_per_s = bytes_per_s
        self.started = time.monotonic()
        self.done = 0

    def spend(self, nbytes: int) -> None:
        self.done += nbytes
        ahead = self.done / self.bytes_per_s - (time.monotonic() - self.started)
        if ahead > 0:
            time.sleep(min(ahead, 5.0))


@contextlib.contextmanager
def compaction_lock(index_path: Path, wait: bool, what: str = "another compaction is running") -> Iterator[None]:
    """Held by a compaction, and by what must not run beside one: startup recovery (it would cut or delete the
    compactor's segment being written) and `index rebuild` (it would see a record and its copy at once)."""
    index_path.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(index_path / COMPACT_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise ApplianceError(what) from None
        yield
    finally:
        os.close(fd)


def compact(config: Config, index: StudyIndex, dry_run: bool = False, segments_max: int = 64) -> CompactionReport:
    """Compact every volume's candidates (at most ``segments_max`` per run). Takes the compaction lock."""
    st = config.storage
    report = CompactionReport(dry_run=dry_run)
    with compaction_lock(st.index_path, wait=False):
        store = BlobStore.open(config, index=index)
        try:
            limit = _RateLimit(st.compaction_bytes_per_s)
            for name in list(store.backends):
                backend = store.segment_backend(name)
                for rec in candidates(index, name, st.compaction_dead_ratio)[:segments_max]:
                    report.candidates.append({"volume": name, "segment": rec.name, "size": rec.end,
                                              "live_bytes": rec.live_bytes, "live_records": rec.live_records,
                                              "dead_share": round(dead_share(rec), 3)})
                    if dry_run:
                        continue
                    _compact_one(index, backend, rec, limit, report)
            for name in list(store.backends):
                _seal_output(index, store.segment_backend(name))
        finally:
            store.close()
    if report.segments_compacted:
        # Dead records (overwritten instances, identical re-sends) are deleted for good here: one audit line per
        # run. They belong to no study the index still names, so the line has none.
        write_once(config.audit, config.server.ae_title, "delete", SUCCESS, bytes=report.bytes_reclaimed,
                   scope="dead records", why="compaction", segments=report.segments_compacted)
    return report


def _seal_output(index: StudyIndex, backend: SegmentBackend) -> None:
    """Seal the compactor's own segment when it is done with it, so that it can be compacted in turn."""
    if backend.active is None:
        return
    name = backend.active
    backend.seal_active()
    backend.sync()
    index.apply([], "keep-first", None, [(backend.name, name)])


def _compact_one(index: StudyIndex, backend: SegmentBackend, rec: ContainerRecord, limit: _RateLimit,
                 report: CompactionReport) -> None:
    moves: dict[str, Copy] = {}
    for digest, blob in index.container_contents(backend.name, rec.name):
        old = next((c for c in blob.copies if c.backend == backend.name and c.container == rec.name), None)
        if old is None:
            continue
        try:
            meta = backend.stat(old.location)
        except BlobMissing:
            meta = None
        if meta is None or meta.digest != digest or meta.size != blob.size:
            # A header read from disk that does not say what the index says is damage, not a bug: never drop what
            # the index names; leave the segment for `verify` and an operator.
            log.error("compaction: %s in %s/%s cannot be read as indexed; left where it is", digest, backend.name,
                      rec.name)
            return
        source = _CopySource(backend, old.location, meta.size)
        location = backend.put(meta, source)
        if source.hasher.hexdigest() != digest:
            log.error("compaction: %s in %s/%s does not hash to its name; left where it is (run `appliance verify`)",
                      digest, backend.name, rec.name)
            return  # the copy just appended stays dead; the segment keeps what the index names
        moves[digest] = segment_copy(backend.name, location, meta.received_ns)
        report.bytes_copied += meta.size
        limit.spend(meta.size)
    backend.sync()
    backend.publish([copy.location for copy in moves.values()])
    ends = committed_ends(moves.values())
    sealed = [(backend.name, s) for s in backend.take_sealed()]
    if ends or sealed:
        index.apply([], "keep-first", ends, sealed)  # committed ends first: recovery must not cut the copies
    report.records_moved += index.move_copies(backend.name, rec.name, moves)
    if index.collect_garbage([(backend.name, rec.name)], lambda _b, n: backend.remove_segment(n)):
        report.bytes_reclaimed += rec.end - rec.live_bytes
    report.segments_compacted += 1
    log.info("compacted segment %s/%s: %d live records moved", backend.name, rec.name, len(moves))
