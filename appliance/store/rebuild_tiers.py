"""`index rebuild --from-tier`: the blobs a tier lists, as index entries, and the bounded-memory replay order.

A tier (nearline, tape, S3) keeps with every blob what its index entry holds: the provenance in the archive's
catalog (digest, size, receive time, calling AE, duplicate policy) and the Part-10 bytes, whose header is read
through the tier backend as the online rebuild reads a segment's record. The node layers never import ``tiering``:
the composition root (the CLI) opens the tier backends and hands them in as ``TierSources``, with the few
functions of the tier model the rebuild needs.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import pickle
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from appliance.errors import ApplianceError, TierUnavailable
from appliance.index.db import IndexEntry
from appliance.index.records import read_header_blob
from appliance.index.schema import ContainerRecord, Copy
from appliance.store.backend import BlobBackend, Location, StoredBlob
from appliance.store.online import replay_order

# Entries sorted in memory before a run is written to the spill folder (an entry with its header is a few KB).
RUN_ENTRIES = 20_000
# Containers registered per index transaction while a tier is listed (a nearline tier has one per study moved).
CONTAINER_BATCH = 1024
# Member headers read at once from a tier with random reads (object store, nearline), and members per read batch.
READERS = 16
READ_BATCH = 512
# Unreadable members listed by name (all are counted): a lost volume of a million must not fill memory.
UNREADABLE_LISTED_MAX = 1000


@dataclass
class TierSources:
    """The tiers a rebuild reads, opened by the composition root, and the tier model's functions it needs."""

    backends: dict[str, BlobBackend]  # the tiers named by --from-tier, by tier name (= Copy.backend)
    copy_of: Callable[[BlobBackend, Location, int], Copy]  # a listed location -> its index Copy (as the mover's)
    end_of: Callable[[Location], int]  # offset just past a member in its container: the committed end
    availability: Callable[[list[str]], str]  # Instance Availability of copies on these backends
    tier_of: Callable[[str], str]  # a backend name -> its tier ("online" for a volume)
    order: list[str]  # tier names, fastest first ("online" first)


@dataclass
class TierCounts:
    blobs: int = 0  # members listed
    containers: int = 0  # archives (nearline, S3) or tape files holding them
    unreadable: int = 0  # members whose header could not be read (or whose content did not hash, with --rehash)


@dataclass
class Unreadable:
    """What could not be indexed: every one counted, the first UNREADABLE_LISTED_MAX named."""

    count: int = 0
    listed: list[str] = field(default_factory=list)

    def add(self, what: str) -> None:
        self.count += 1
        if len(self.listed) < UNREADABLE_LISTED_MAX:
            self.listed.append(what)


class ReplaySpill:
    """Index entries handed back in replay order (receive order) with bounded memory: runs of ``run_entries``
    entries are sorted in memory and pickled to ``folder`` (ours, 0700, removed by the caller), then merged."""

    def __init__(self, folder: Path, run_entries: int = RUN_ENTRIES) -> None:
        self.folder, self.run_entries = folder, run_entries
        self.run: list[IndexEntry] = []
        self.files: list[Path] = []

    def add(self, entry: IndexEntry) -> None:
        self.run.append(entry)
        if len(self.run) >= self.run_entries:
            self._spill()

    def _spill(self) -> None:
        self.run.sort(key=replay_order)
        path = self.folder / f"run-{len(self.files):06d}.pickle"
        with open(path, "wb") as fh:
            for entry in self.run:
                pickle.dump(entry, fh, protocol=pickle.HIGHEST_PROTOCOL)
        self.files.append(path)
        self.run = []

    @staticmethod
    def _read(path: Path) -> Iterator[IndexEntry]:
        with open(path, "rb") as fh:
            while True:
                try:
                    entry: IndexEntry = pickle.load(fh)  # noqa: S301 - our own file, written just before
                except EOFError:
                    return
                yield entry

    def __iter__(self) -> Iterator[IndexEntry]:
        self.run.sort(key=replay_order)
        return heapq.merge(*(self._read(p) for p in self.files), iter(self.run), key=replay_order)


def tier_entry(backend: BlobBackend, stored: StoredBlob, copy: Copy) -> IndexEntry:
    """The index entry of a blob a tier lists: the header parsed from its first bytes (read through the backend,
    decompressed), the provenance from its catalog, the copy where it lies."""
    meta = stored.meta
    header, ts = read_header_blob(functools.partial(backend.open, stored.location, meta.size), meta.size)
    return IndexEntry(header, meta.digest, meta.size, ts, meta.received_ns, meta.calling_ae, copy, meta.policy)


def list_tier(name: str, backend: BlobBackend, sources: TierSources, spill: ReplaySpill,
              register: Callable[[list[ContainerRecord]], None], unreadable: Unreadable,
              rehash: bool = False) -> TierCounts:
    """Every blob ``backend`` lists into ``spill``; its containers, with the end of their last listed member and
    sealed (a tier's archives are sealed by the mover after each sync), go to ``register`` a batch at a time.
    The end counts every whole member listed, named or not: recovery of an open tape archive never cuts back one
    the index names. A listing that fails (a volume not mounted, the store unreachable) raises: a rebuild must not
    silently miss a tier's content; so does a member read that finds the store unreachable."""
    counts = TierCounts()
    pending: dict[str, ContainerRecord] = {}
    previous = ""  # backends list a container's members together: a new name is a new container
    to_read: list[tuple[StoredBlob, Copy]] = []
    # An object store answers one small ranged GET per member in milliseconds: several in flight hide the
    # latency (reads may come from any thread). A tape drive must not be asked to seek for several at once.
    readers = READERS if backend.capabilities.random_read else 1

    def read(item: tuple[StoredBlob, Copy]) -> IndexEntry | str:
        stored, copy = item
        try:
            if rehash and backend.sha256(stored.location) != stored.meta.digest:
                raise ApplianceError("content does not match its name")
            return tier_entry(backend, stored, copy)
        except TierUnavailable:
            raise
        except (ApplianceError, OSError) as exc:
            return f"{name}:{stored.location}: {exc}"

    def read_batch(pool: ThreadPoolExecutor | None) -> None:
        for result in (pool.map(read, to_read) if pool is not None else map(read, to_read)):
            if isinstance(result, str):
                unreadable.add(result)
                counts.unreadable += 1
            else:
                spill.add(result)
        to_read.clear()
        register(list(pending.values()))  # the containers of what was just read, before the next batch
        pending.clear()

    with ThreadPoolExecutor(readers, thread_name_prefix=f"rebuild-{name}") if readers > 1 else _no_pool() as pool:
        for stored in backend.list():
            counts.blobs += 1
            meta, location = stored.meta, stored.location
            try:
                copy = sources.copy_of(backend, location, meta.received_ns)
                end = sources.end_of(location)
            except ApplianceError as exc:
                unreadable.add(f"{name}:{location}: {exc}")
                counts.unreadable += 1
                continue
            if copy.container != previous:
                counts.containers += 1
                previous = copy.container
            rec = pending.get(copy.container)
            if rec is None:
                rec = pending[copy.container] = ContainerRecord(name, copy.container, meta.received_ns, end, 0, 0,
                                                                True)
            rec.end, rec.created_ns = max(rec.end, end), min(rec.created_ns, meta.received_ns)
            to_read.append((stored, copy))
            if len(to_read) >= READ_BATCH or len(pending) >= CONTAINER_BATCH:
                read_batch(pool)
        read_batch(pool)
    return counts


@contextlib.contextmanager
def _no_pool() -> Iterator[None]:
    yield None
