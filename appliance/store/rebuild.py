"""The blobs are the source of truth: rebuild the index from the backends alone, and verify blobs against it.

Every segment record carries what its index entry holds: the Part-10 bytes (attributes, File Meta with the transfer
syntax), its name (the digest) and, in its pax header, the receive time and calling AE. Records are replayed in
receive-time order with the configured duplicate policy, which reproduces the live index: a record the live index
never named (an identical re-send, a refused duplicate, an overwritten instance) is replayed and loses the same
way it lost live.

With ``--from-tier`` the members the named tiers list (nearline, tape and S3 archives, whose catalogs carry the
same provenance) join the replay: node replacement (store/rebuild_tiers.py; docs/scale-out.md).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from appliance.config import Config
from appliance.errors import ApplianceError, IndexInUse
from appliance.index.db import SERVE_LOCK, IndexEntry, StudyIndex
from appliance.index.deletion import HoldRecord
from appliance.store.compact import compaction_lock
from appliance.store.online import BlobStore, entry_for
from appliance.store.rebuild_tiers import ReplaySpill, TierCounts, TierSources, Unreadable, list_tier
from appliance.store.segments import END_OF_ARCHIVE, SegmentBackend, committed_ends, created_ns, parse_location
from appliance.store.volumes import fsync_dir

log = logging.getLogger(__name__)

BATCH = 512


@dataclass
class RebuildStats:
    blobs: int = 0
    indexed: int = 0
    unreadable: list[str] = field(default_factory=list)  # the first UNREADABLE_LISTED_MAX
    unreadable_count: int = 0
    tiers: dict[str, TierCounts] = field(default_factory=dict)  # --from-tier: what each tier listed
    placed: dict[str, int] = field(default_factory=dict)  # --from-tier: studies per tier ("online" included)
    deleted: int = 0  # records of instances deleted on purpose (tombstones) before compaction reclaimed them


def rebuild_index(config: Config, target: Path, rehash: bool = False,
                  tiers: TierSources | None = None) -> RebuildStats:
    """Build a fresh index at ``target`` (which must not exist or be empty) from every segment of every volume and,
    with ``tiers``, every blob those tiers list.

    Entries are replayed in receive order with their duplicate policy, held in memory RUN_ENTRIES at a time (the
    rest in sorted runs on disk beside ``target``). A blob found on several tiers gets a copy on each (one per
    tier); then each instance's availability follows its copies and each study is placed on the tier its copies
    are on when it has none online (docs/tiering-internals.md "Node replacement")."""
    if target.exists() and any(target.iterdir()):
        raise ApplianceError(f"{target} exists and is not empty")
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    stats = RebuildStats()
    unreadable = Unreadable()
    index = StudyIndex(target, config.storage.index_map_size, sync=True)
    try:
        holds, tombstones = _decisions(config.storage.index_path)
        index.put_tombstones(tombstones.items())
        with tempfile.TemporaryDirectory(prefix=target.name + ".replay-", dir=target.parent) as spill_dir:
            spill = ReplaySpill(Path(spill_dir))
            ends, sealed = _list_online(config, index, spill, stats, unreadable, rehash)
            for name, backend in tiers.backends.items() if tiers is not None else ():
                assert tiers is not None
                stats.tiers[name] = list_tier(name, backend, tiers, spill, index.register_containers, unreadable,
                                              rehash)
                stats.blobs += stats.tiers[name].blobs
            batch: list[IndexEntry] = []
            tier_of = tiers.tier_of if tiers is not None else None
            for entry in spill:
                if tombstones.get(entry.header.sop_instance_uid, 0) > entry.received_ns:
                    stats.deleted += 1  # deleted on purpose after it was received: the delete sticks
                    continue
                batch.append(entry)
                if len(batch) >= BATCH:
                    index.apply(batch, config.storage.duplicate_policy, tier_of=tier_of)
                    batch = []
            index.apply(batch, config.storage.duplicate_policy, ends, sealed, tier_of=tier_of)
        if tiers is not None:
            stats.placed = index.place_rebuilt_studies(tiers.availability, tiers.tier_of, tiers.order)
        for study_uid, record in holds:
            index.hold(study_uid, record)
        stats.indexed = index.counts()["instances"]
    finally:
        index.close()
    stats.unreadable, stats.unreadable_count = unreadable.listed, unreadable.count
    return stats


def _list_online(config: Config, index: StudyIndex, spill: ReplaySpill, stats: RebuildStats,
                 unreadable: Unreadable, rehash: bool) -> tuple[dict[tuple[str, str], int], list[tuple[str, str]]]:
    """Every record of every online segment into ``spill``; the segments registered. Returns each segment's
    committed end (the end of its last record, named or not) and the sealed ones."""
    store = BlobStore.open(config)
    ends: dict[tuple[str, str], int] = {}
    sealed: list[tuple[str, str]] = []
    try:
        for name, backend in store.backends.items():
            assert isinstance(backend, SegmentBackend)
            for segment in backend.segments():
                index.register_container(name, segment, created_ns(segment))
                size = os.path.getsize(os.path.join(backend.dir, segment))
                for blob in backend.list_segment(segment):
                    stats.blobs += 1
                    meta, location = blob.meta, blob.location
                    try:
                        if rehash and backend.sha256(location) != meta.digest:
                            raise ApplianceError("content does not match its name")
                        entry = entry_for(backend, blob)
                    except ApplianceError as exc:
                        unreadable.add(f"{name}/{segment}@{parse_location(location)[1]}: {exc}")
                        continue
                    for key, end in committed_ends([entry.copy]).items():
                        ends[key] = max(ends.get(key, 0), end)
                    spill.add(entry)
                if size >= len(END_OF_ARCHIVE) and _is_sealed(backend, segment, size):
                    sealed.append((name, segment))
    finally:
        store.close()
    return ends, sealed


def _is_sealed(backend: SegmentBackend, segment: str, size: int) -> bool:
    with open(os.path.join(backend.dir, segment), "rb") as fh:
        fh.seek(size - len(END_OF_ARCHIVE))
        return fh.read() == END_OF_ARCHIVE


def _decisions(live: Path) -> tuple[list[tuple[str, HoldRecord]], dict[str, int]]:
    """The legal holds and the tombstones of the live index: an operator's decisions, in no segment or archive, that
    the rebuilt index keeps (when the live one can still be opened: a lost index loses them, docs/operations.md
    "Deleting studies")."""
    if not (live / "data.mdb").exists():
        return [], {}
    try:
        old = StudyIndex(live, readonly=True)
    except (lmdb.Error, ApplianceError) as exc:
        log.warning("rebuild: the legal holds and deletes of %s cannot be read (%s)", live, exc)
        return [], {}
    try:
        return old.holds(), dict(old.tombstones())
    finally:
        old.close()


def replace_index(config: Config, rehash: bool = False, tiers: TierSources | None = None) -> RebuildStats:
    """Rebuild beside the live index, then swap it in (the old one is kept as ``<index>.old``). The serve lock is
    held from the start through the swap, so no server can start on the old index meanwhile."""
    live = config.storage.index_path
    live.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(live / SERVE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by a running supervisor
        except BlockingIOError:
            raise IndexInUse(f"the appliance is serving {live}: stop it first, or use --into DIR") from None
        fresh = live.with_name(live.name + ".rebuild")
        old = live.with_name(live.name + ".old")
        shutil.rmtree(fresh, ignore_errors=True)
        # Not beside a compaction: it would see a record and its copy at once, and name the one about to go.
        with compaction_lock(live, wait=False, what="a compaction is running: wait for it, then rebuild"):
            stats = rebuild_index(config, fresh, rehash, tiers)
        shutil.rmtree(old, ignore_errors=True)
        os.rename(live, old)
        os.rename(fresh, live)
        fsync_dir(live.parent)  # the swap is durable before we say it is done
        return stats
    finally:
        os.close(fd)  # the lock file went to <index>.old with the folder: a new server locks the new one


@dataclass
class VerifyReport:
    checked: int = 0
    missing: list[str] = field(default_factory=list)  # the index names a copy that cannot be read
    corrupt: list[str] = field(default_factory=list)  # a copy's content does not hash to its name
    orphans: list[str] = field(default_factory=list)  # segment files the index does not know, and the reverse
    dead_bytes: int = 0  # bytes in segments that no index entry names (reclaimed by compaction)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.corrupt or self.orphans)


def segment_orphans(store: BlobStore, index: StudyIndex, report: VerifyReport) -> None:
    """Segment files the index does not know and the reverse, and the dead bytes awaiting compaction, of every
    online volume (no read of the records: `verify` and tiering/scrub.py re-hash them)."""
    for name, backend in store.backends.items():
        assert isinstance(backend, SegmentBackend)
        on_disk = set(backend.segments())
        known = {c.name: c for c in index.containers(name)}
        report.orphans += [f"{name}/{s}: not in the index" for s in sorted(on_disk - set(known))]
        report.orphans += [f"{name}/{s}: in the index, file missing" for s, c in sorted(known.items())
                           if s not in on_disk and c.live_records]
        for segment in on_disk & set(known):
            size = os.path.getsize(os.path.join(backend.dir, segment))
            report.dead_bytes += max(0, min(size, known[segment].end) - known[segment].live_bytes)
