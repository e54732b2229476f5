"""Group commit: the only place that writes both blobs and the index.

Order for every instance (the durability contract; invariants also in store/segments.py and index/db.py):
1. the event loop hands over a complete instance (spooled bytes + its index entry);
2. the writer thread appends every instance handed over so far to its volume's active segment, then makes
   them durable with ONE ``sync`` (fdatasync) per segment for the whole group;
3. the index thread indexes every durable instance in ONE LMDB write transaction (fsync'd by LMDB), which also
   records how far each segment is committed;
4. only then are the associations woken, and they send Success.

A crash before 2's sync returns leaves records beyond the committed end of their segment that may be torn: startup
recovery cuts from the first one that is not whole or does not hash to its name (it was never acknowledged). Whole
records there are indexed by recovery: they were durable, and the index (which syncs LMDB's meta page lazily, one
flush per group instead of two) may have lost the transaction that acknowledged them. A crash after 3 loses
nothing acknowledged.

The two threads form a pipeline: while the index thread commits group N, the writer appends and syncs group N+1.
A failed sync or an I/O error from LMDB is fail-stop (``StorageFault``): nothing of the group is acknowledged,
everything later is refused, and ``on_fault`` stops the worker (the supervisor then stops the appliance).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import lmdb

from appliance import errors
from appliance.errors import ApplianceError, StorageFault
from appliance.index.db import IndexEntry, Outcome, StudyIndex
from appliance.index.records import Header
from appliance.index.schema import Copy
from appliance.store.backend import BlobMeta
from appliance.store.segments import SegmentBackend, committed_ends, segment_copy
from appliance.store.spool import InstanceSpool

if TYPE_CHECKING:
    from appliance.metrics import Metrics

log = logging.getLogger(__name__)

# LMDB errors that mean the disk or the map is broken, not this batch: fail-stop.
_LMDB_FATAL = (lmdb.DiskError, lmdb.PanicError, lmdb.CorruptedError, lmdb.InvalidError)


@dataclass
class CommitResult:
    status: int
    outcome: Outcome | None = None
    comment: str = ""


@dataclass
class Submission:
    """What the store service hands over for one complete instance."""

    spool: InstanceSpool
    backend: SegmentBackend
    header: Header
    transfer_syntax: str
    received_ns: int
    calling_ae: str
    policy: str = ""


@dataclass
class _Pending:
    sub: Submission
    future: asyncio.Future[CommitResult]
    queued_at: float
    entry: IndexEntry | None = None  # set once appended
    durable_at: float = 0.0
    answered: bool = False  # set by the thread that resolves it (reading future.done() off the loop is racy)


class GroupCommitter:
    def __init__(
        self,
        index: StudyIndex,
        policy: str,
        loop: asyncio.AbstractEventLoop,
        max_batch: int = 256,
        max_wait_ms: float = 2.0,
        metrics: Metrics | None = None,
        on_fault: Callable[[str], None] | None = None,
        queue_max: int = 1024,
        copy_exists: Callable[[Copy], bool] | None = None,
        lanes: int = 1,
    ) -> None:
        assert max_batch >= 1 and queue_max >= max_batch and 1 <= lanes <= 16
        self.index = index
        self.policy = policy
        self.loop = loop
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.metrics = metrics
        self.on_fault = on_fault
        self.queue_max = queue_max
        self.copy_exists = copy_exists or (lambda _copy: True)
        self.receiving = 0  # stores whose dataset is still arriving (written by the event loop only)
        self.fault: str | None = None
        self._cond = threading.Condition()
        self._incoming: deque[_Pending] = deque()
        self._durable: deque[tuple[list[_Pending], list[tuple[str, str]]]] = deque()  # (group, segments sealed)
        self._writing = 0  # instances taken by the writer and not yet handed to the index thread
        self._indexing = 0  # instances handed to the index thread and not yet answered
        self._closed = False
        self._accepting = True
        # Writer lanes: each has its own active segment per volume and takes the next group while the others wait
        # in fdatasync, so that several flushes are in flight (one lane serialises every group's flush). Lane 0
        # writes through the submission's own backend; the others through backends of their own on the same volume.
        self._lane_backends: list[dict[str, SegmentBackend]] = [{} for _ in range(lanes)]
        self._writers = [threading.Thread(target=self._write_loop, args=(lane,), name=f"segment-writer-{lane}",
                                          daemon=True) for lane in range(lanes)]
        self._indexer = threading.Thread(target=self._index_loop, name="group-commit", daemon=True)
        for writer in self._writers:
            writer.start()
        self._indexer.start()

    def submit(self, sub: Submission) -> asyncio.Future[CommitResult]:
        future: asyncio.Future[CommitResult] = self.loop.create_future()
        refusal = None
        if not self._accepting:
            refusal = CommitResult(errors.PROCESSING_FAILURE, None, "shutting down")
        elif self.fault is not None:
            refusal = CommitResult(errors.OUT_OF_RESOURCES, None, "storage fault: the appliance is stopping")
        elif len(self._incoming) + self._writing + self._indexing >= self.queue_max:
            # Bounded: a disk slower than the network must push back on the modalities, not fill memory.
            refusal = CommitResult(errors.OUT_OF_RESOURCES, None, "commit queue full")
        if refusal is not None:
            sub.spool.discard()
            future.set_result(refusal)
            return future
        with self._cond:
            self._incoming.append(_Pending(sub, future, time.perf_counter()))
            self._cond.notify_all()
        return future

    def close(self) -> None:
        """Commit what was submitted, then stop both threads. submit() refuses from now on."""
        self._accepting = False
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for writer in self._writers:
            writer.join()
        self._indexer.join()
        for backends in self._lane_backends[1:]:
            for backend in backends.values():
                backend.close()

    # ---- stage 1: append + sync ---------------------------------------------------------------------

    def _write_loop(self, lane: int = 0) -> None:
        while True:
            with self._cond:
                while not self._incoming and not self._closed:
                    self._cond.wait()
                if not self._incoming and self._closed:
                    self._cond.notify_all()
                    return
                if self.max_wait > 0 and self.receiving and len(self._incoming) < self.max_batch:
                    # Instances are still arriving: a bounded wait lets them share this group's sync.
                    self._cond.wait_for(lambda: not self.receiving or len(self._incoming) >= self.max_batch
                                        or self._closed, self.max_wait)
                batch = [self._incoming.popleft() for _ in range(min(self.max_batch, len(self._incoming)))]
                self._writing += len(batch)
            try:
                durable, sealed = self._append_and_sync(batch, lane)
            except StorageFault as exc:
                self._fail_stop(str(exc), batch)
                durable, sealed = [], []
            except Exception:
                log.exception("appending a group to its segments")
                self._resolve([(p, CommitResult(errors.PROCESSING_FAILURE, None, "write failure")) for p in batch
                               if not p.answered])
                durable, sealed = [], []
            with self._cond:
                self._writing -= len(batch)
                if durable:
                    self._durable.append((durable, sealed))
                    self._indexing += len(durable)
                self._cond.notify_all()

    def _lane_backend(self, lane: int, backend: SegmentBackend) -> SegmentBackend:
        if lane == 0:
            return backend
        own = self._lane_backends[lane].get(backend.name)
        if own is None:
            own = self._lane_backends[lane][backend.name] = SegmentBackend(
                backend.volume, backend.segment_bytes_max, backend.fsync, backend.on_create)
        return own

    def _append_and_sync(self, batch: list[_Pending], lane: int = 0) -> tuple[list[_Pending], list[tuple[str, str]]]:
        """Append the group, then make it durable and visible (sync, publish: the backend's contract); returns the
        instances now durable and the segments whose seal is."""
        refused: list[tuple[_Pending, CommitResult]] = []
        written: list[_Pending] = []
        backends: dict[str, SegmentBackend] = {}
        try:
            self._append(batch, refused, written, backends, lane)
        finally:
            # Whatever escaped (a segment that could not be registered), every spool of the group goes now: its
            # memory back to the budget, its spill file out of tmp/. discard() is idempotent.
            for item in batch:
                item.sub.spool.discard()
        if refused:
            self._resolve(refused)
        sealed: list[tuple[str, str]] = []
        for backend in backends.values():
            backend.sync()  # raises StorageFault: nothing of the group is acknowledged
            backend.publish([item.entry.copy.location for item in written
                             if item.entry is not None and item.entry.copy.backend == backend.name])
            sealed += [(backend.name, name) for name in backend.take_sealed()]
        now = time.perf_counter()
        for item in written:
            item.durable_at = now
        return written, sealed

    def _append(self, batch: list[_Pending], refused: list[tuple[_Pending, CommitResult]], written: list[_Pending],
                backends: dict[str, SegmentBackend], lane: int = 0) -> None:
        for item in batch:
            sub = item.sub
            if self.fault is not None:
                refused.append((item, CommitResult(errors.OUT_OF_RESOURCES, None, "storage fault")))
                continue
            digest = sub.spool.digest()
            meta = BlobMeta(digest, sub.spool.size, sub.received_ns, sub.calling_ae, sub.policy)
            backend = self._lane_backend(lane, sub.backend)
            try:
                location = backend.put(meta, sub.spool)
            except StorageFault:
                raise
            except ApplianceError as exc:  # the volume is full or failing: this instance only
                refused.append((item, CommitResult(exc.status, None, str(exc))))
                continue
            finally:
                sub.spool.discard()  # appended or refused: its memory or spill file goes now, not at the group's end
            item.entry = IndexEntry(sub.header, digest, meta.size, sub.transfer_syntax, sub.received_ns,
                                    sub.calling_ae, segment_copy(backend.name, location, sub.received_ns), sub.policy)
            backends[backend.name] = backend
            written.append(item)

    # ---- stage 2: index ------------------------------------------------------------------------------

    def _index_loop(self) -> None:
        while True:
            with self._cond:
                while not self._durable and not (self._closed and not any(w.is_alive() for w in self._writers)):
                    self._cond.wait(0.5)
                if not self._durable:
                    return
                # Every durable group waiting, up to max_batch instances in one transaction (at least one group).
                groups = [self._durable.popleft()]
                taken = len(groups[0][0])
                while self._durable and taken + len(self._durable[0][0]) <= self.max_batch:
                    taken += len(self._durable[0][0])
                    groups.append(self._durable.popleft())
            batch = [item for items, _sealed in groups for item in items]
            sealed = [name for _items, group_sealed in groups for name in group_sealed]
            try:
                self._commit(batch, sealed)
            except StorageFault as exc:
                self._fail_stop(str(exc), batch)
            except Exception:
                # Whatever broke (a metrics error, an unexpected index error), this thread must live on and every
                # instance of the batch must get an answer, or its association waits forever. An instance that
                # was in fact committed is answered with a failure: the modality re-sends it, and the identical
                # re-send is a no-op Success.
                log.exception("group commit failed")
                self._resolve([(item, CommitResult(errors.PROCESSING_FAILURE, None, "commit failure"))
                               for item in batch if not item.answered])
            with self._cond:
                self._indexing -= len(batch)

    def _commit(self, batch: list[_Pending], sealed: list[tuple[str, str]]) -> None:
        if self.fault is not None:
            self._resolve([(item, CommitResult(errors.OUT_OF_RESOURCES, None, "storage fault")) for item in batch])
            return
        entries = [item.entry for item in batch if item.entry is not None]
        t1 = time.perf_counter()
        try:
            # The segments' committed ends go in the same transaction as the entries that name them.
            applied = self.index.apply(entries, self.policy, committed_ends(e.copy for e in entries), sealed,
                                       self.copy_exists)
        except _LMDB_FATAL as exc:
            raise StorageFault(f"index commit failed: {exc}") from None
        except Exception:
            # Nothing of this batch is indexed: refuse it (0xC211) and keep serving; the modality may retry. The
            # appended bytes stay dead in their segment (compaction reclaims them).
            log.exception("group commit failed before the index commit")
            self._resolve([(item, CommitResult(errors.PROCESSING_FAILURE, None, "index failure")) for item in batch])
            return
        t2 = time.perf_counter()
        results: list[tuple[_Pending, CommitResult]] = []
        for item, res in zip(batch, applied, strict=True):
            if res.outcome is Outcome.CONFLICT:
                results.append((item, CommitResult(errors.CANNOT_UNDERSTAND, res.outcome, res.reason)))
            elif res.outcome is Outcome.REJECTED:
                results.append((item, CommitResult(errors.DUPLICATE_SOP_INSTANCE, res.outcome,
                                                   "duplicate SOP Instance UID with other content")))
            else:
                results.append((item, CommitResult(errors.SUCCESS, res.outcome)))
        repaired = sum(1 for res in applied if res.reason == "repaired")
        if repaired:
            log.warning("%d lost blob(s) restored from identical re-sends", repaired)
        self._resolve(results)
        if self.metrics is not None:
            self.metrics.commit(len(batch), t2 - t1, [(item.durable_at - item.queued_at, t1 - item.durable_at)
                                                      for item in batch])

    # ---- answers ---------------------------------------------------------------------------------------

    def _fail_stop(self, reason: str, batch: list[_Pending]) -> None:
        log.critical("STORAGE FAULT, stopping: %s", reason)
        self.fault = reason
        self._resolve([(item, CommitResult(errors.OUT_OF_RESOURCES, None, "storage fault")) for item in batch
                       if not item.answered])
        if self.on_fault is not None:
            self.loop.call_soon_threadsafe(self.on_fault, reason)

    def _resolve(self, results: list[tuple[_Pending, CommitResult]]) -> None:
        if not results:
            return
        for item, _result in results:
            item.answered = True

        def wake() -> None:
            for item, result in results:
                if not item.future.done():
                    item.future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(wake)
        except RuntimeError:  # the loop is closed (worker exiting): nobody is waiting any more
            pass
