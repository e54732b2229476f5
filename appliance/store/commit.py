"""Group commit: many C-STOREs share one fsync batch and one LMDB write transaction.

Order (the durability contract; see also store/blobs.py):
1. as soon as an instance's last PDV is written (its mtime = receive time and calling-AE xattr already set),
   a pool thread fsyncs its tmp file; concurrent fsyncs share journal commits. The index thread then takes
   every instance made durable so far as one batch and fsyncs each volume's tmp/ folder once if one of the
   batch's tmp files was created on the spot (files from the TmpFileReserve were created, and their folder
   fsync'd, before they were handed out);
2. one LMDB write transaction indexes every instance of the batch, and is committed (fsync'd by LMDB);
3. rename each new blob from tmp/ to blobs/ab/cd/<digest>; drop tmp files of duplicates;
4. delete blobs that no index entry names any more (their ``gc`` rows were written in step 2);
5. only now wake the associations, which send Success.

A crash after 2 and before 3 leaves indexed blobs in tmp/: ``recover_volume`` at startup finishes the rename.
Batching: the index thread takes everything fsync'd so far; if other instances are still in the fsync pool,
it waits up to ``commit_max_wait_ms`` for them, so one LMDB commit serves many instances. While it commits,
the pool is already fsyncing the next ones (a two-stage pipeline).
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from appliance import errors
from appliance.index.db import ApplyResult, IndexEntry, Outcome, StudyIndex
from appliance.store.blobs import BlobWriter, hash_file
from appliance.store.volumes import Volume, VolumeSet, fsync_dir

if TYPE_CHECKING:
    from appliance.metrics import Metrics

log = logging.getLogger(__name__)

FSYNC_THREADS = 16  # concurrent fsyncs share device flushes; the hardware probe saturates at about 8


@dataclass
class CommitResult:
    status: int
    outcome: Outcome | None = None
    comment: str = ""


@dataclass
class _Pending:
    writer: BlobWriter
    entry: IndexEntry
    future: asyncio.Future[CommitResult]
    queued_at: float


class GroupCommitter:
    """Two stages, so that the disk always has work: a pool fsyncs each instance as soon as its last PDV is
    written (concurrent fsyncs share journal commits), and one index thread commits whatever is durable in
    one LMDB transaction, while the next instances are being fsync'd."""

    def __init__(
        self,
        index: StudyIndex,
        volumes: VolumeSet,
        policy: str,
        loop: asyncio.AbstractEventLoop,
        max_batch: int = 256,
        max_wait_ms: float = 2.0,
        fsync: bool = True,
        metrics: Metrics | None = None,
    ) -> None:
        self.index = index
        self.volumes = volumes
        self.policy = policy
        self.loop = loop
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.fsync = fsync
        self.metrics = metrics
        self.receiving = 0  # stores whose dataset is still arriving (written by the event loop only)
        self._durable: deque[tuple[_Pending, OSError | None, float]] = deque()
        self._syncing = 0  # instances handed to the fsync pool and not yet back
        self._cond = threading.Condition()
        self._closed = False  # the index thread stops once this is set and nothing is left
        self._accepting = True
        # Stage 1 is a fixed set of threads on a C-level SimpleQueue rather than a ThreadPoolExecutor: the
        # executor's submit (work item, locks, thread-count check) held the GIL for ~18% of a busy worker's
        # Python time under py-spy --gil.
        self._fsync_queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._fsync_threads = [threading.Thread(target=self._fsync_loop, name=f"fsync-{i}", daemon=True)
                               for i in range(FSYNC_THREADS)]
        for thread in self._fsync_threads:
            thread.start()
        self._folders: set[tuple[str, str]] = set()  # (volume, ab/cd) blob folders known to exist
        self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
        self._thread.start()

    def submit(self, writer: BlobWriter, entry: IndexEntry) -> asyncio.Future[CommitResult]:
        future: asyncio.Future[CommitResult] = self.loop.create_future()
        if not self._accepting:  # stopping: nothing would fsync or answer it any more
            writer.discard()
            future.set_result(CommitResult(errors.PROCESSING_FAILURE, None, "shutting down"))
            return future
        item = _Pending(writer, entry, future, time.perf_counter())
        with self._cond:
            self._syncing += 1
        self._fsync_queue.put(item)
        return future

    def close(self) -> None:
        self._accepting = False  # submit() refuses from now on; what is queued is still fsync'd and committed
        for _ in self._fsync_threads:
            self._fsync_queue.put(None)
        for thread in self._fsync_threads:
            thread.join()
        late: list[tuple[_Pending, CommitResult]] = []  # submitted while close() was starting: refuse them
        while True:
            try:
                item = self._fsync_queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item.writer.discard()
                late.append((item, CommitResult(errors.PROCESSING_FAILURE, None, "shutting down")))
        if late:
            self._resolve(late)
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    # ---- stage 1: fsync pool ------------------------------------------------------------------------

    def _fsync_loop(self) -> None:
        while (item := self._fsync_queue.get()) is not None:
            self._make_durable(item)

    def _make_durable(self, item: _Pending) -> None:
        error: OSError | None = None
        writer = item.writer
        try:
            if self.fsync:
                os.fsync(writer.fd)  # fsync, not fdatasync: the mtime and xattr must be durable too
            writer.close()
            # The blob's folder is made now, before the index names the blob: on a full volume mkdir fails
            # with ENOSPC, and here that refuses this instance cleanly. After the index commit it would have
            # failed an already indexed instance.
            digest = item.entry.digest
            key = (writer.volume.name, digest[:4])
            if key not in self._folders:
                os.makedirs(os.path.dirname(writer.volume.blob_file(digest)), exist_ok=True)
                self._folders.add(key)
        except OSError as exc:
            error = exc
        except Exception as exc:  # never lose an item: its association waits for an answer
            log.exception("making an instance durable")
            error = OSError(str(exc))
        with self._cond:
            self._syncing -= 1
            self._durable.append((item, error, time.perf_counter()))
            self._cond.notify()

    # ---- stage 2: index thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._durable and not self._closed:
                    self._cond.wait()
                if not self._durable and self._closed:
                    return
                if self.max_wait > 0 and (self._syncing or self.receiving) and len(self._durable) < self.max_batch:
                    # More instances are being received or fsync'd right now: a bounded wait lets them share
                    # this commit.
                    self._cond.wait_for(lambda: (not self._syncing and not self.receiving)
                                        or len(self._durable) >= self.max_batch, self.max_wait)
                batch = [self._durable.popleft() for _ in range(min(self.max_batch, len(self._durable)))]
            try:
                self._commit(batch)
            except Exception:
                # Whatever broke (a metrics error, an unexpected OSError), this thread must live on and every
                # instance of the batch must get an answer, or its association waits forever. An instance
                # that was in fact committed is answered with a failure: the modality re-sends it, and the
                # identical re-send is a no-op Success.
                log.exception("group commit failed")
                self._resolve([(item, CommitResult(errors.PROCESSING_FAILURE, None, "commit failure"))
                               for item, _error, _at in batch])

    def _commit(self, batch: list[tuple[_Pending, OSError | None, float]]) -> None:
        durable: list[_Pending] = []
        results: list[tuple[_Pending, CommitResult]] = []
        for item, error, _at in batch:
            if error is None:
                durable.append(item)
            else:
                item.writer.discard()
                results.append((item, CommitResult(errors.OUT_OF_RESOURCES, None, f"not made durable: {error}")))
        try:
            if self.fsync:
                # The tmp files' directory entries: one fsync per volume per batch, only for files created on
                # the spot (reserve files had their folder fsync'd before they were handed out).
                for vol in {id(i.writer.volume): i.writer.volume for i in durable
                            if not i.writer.entry_durable}.values():
                    fsync_dir(vol.tmp_dir)
            t1 = time.perf_counter()
            applied = self.index.apply([i.entry for i in durable], self.policy) if durable else []
            t2 = time.perf_counter()
        except Exception:
            # Nothing of this batch is indexed: refuse it (0xC211) and keep serving; the modality may retry.
            log.exception("group commit failed before the index commit")
            for item in durable:
                item.writer.discard()
            self._resolve(results + [(item, CommitResult(errors.PROCESSING_FAILURE, None, "index failure"))
                                     for item in durable])
            return
        for item, res in zip(durable, applied, strict=True):
            if res.outcome is Outcome.REJECTED:
                results.append((item, CommitResult(errors.DUPLICATE_SOP_INSTANCE, res.outcome,
                                                   "duplicate SOP Instance UID with other content")))
            else:
                results.append((item, CommitResult(errors.SUCCESS, res.outcome)))
        try:
            self._after_commit(durable, applied)
        except Exception:
            # The batch is indexed and durable: its instances are stored whatever failed here (a rename or a
            # blob delete); startup recovery finishes such leftovers.
            log.exception("after the index commit")
        self._resolve(results)
        if self.metrics is not None:
            self.metrics.commit(len(batch), t2 - t1, [(at - item.queued_at, t1 - at) for item, _e, at in batch])

    def _after_commit(self, durable: list[_Pending], applied: list[ApplyResult]) -> None:
        """Steps 3 and 4: move new blobs into place, drop duplicates' tmp files, delete freed blobs."""
        freed: list[tuple[str, str]] = []
        for item, res in zip(durable, applied, strict=True):
            if res.blob_is_new:
                final = item.writer.volume.blob_file(item.entry.digest)
                try:
                    os.rename(item.writer.tmp_path, final)
                except OSError:
                    # Indexed and durable in tmp/ already: never discard it. This is the state a crash between
                    # steps 2 and 3 leaves, and startup recovery finishes the rename.
                    log.exception("blob %s stays in %s until the next start", item.entry.digest,
                                  item.writer.tmp_path)
                item.writer.volume.charge(item.writer.size)
            elif res.outcome is Outcome.IDENTICAL and self._restores_lost_blob(item):
                pass
            else:
                item.writer.discard()
            freed.extend(res.freed)
        if freed:
            self.index.collect_garbage(freed, self.volumes.unlink_blob)

    def _restores_lost_blob(self, item: _Pending) -> bool:
        """An identical re-send of an instance whose blob is gone (`verify` reports it missing) puts it back:
        the modality re-sending is how a site repairs such a loss. Only on the volume the index names."""
        writer, digest = item.writer, item.entry.digest
        if item.entry.volume != writer.volume.name:
            return False
        final = writer.volume.blob_path(digest)
        if final.exists():
            return False
        try:
            os.rename(writer.tmp_path, final)
        except OSError:
            log.exception("could not restore the missing blob %s", digest)
            return False
        log.warning("blob %s was missing from volume %s; restored from an identical re-send", digest,
                    writer.volume.name)
        return True

    def _resolve(self, results: list[tuple[_Pending, CommitResult]]) -> None:
        def wake() -> None:
            for item, result in results:
                if not item.future.done():
                    item.future.set_result(result)

        self.loop.call_soon_threadsafe(wake)


def recover_volume(volume: Volume, index: StudyIndex) -> dict[str, int]:
    """Startup recovery of one volume's tmp/: finish renames the index already committed, drop the rest."""
    moved = dropped = 0
    for path in sorted(Path(volume.tmp_dir).iterdir()):
        if not path.is_file():
            continue
        if path.stat().st_size == 0:
            path.unlink()  # a tmp file created ahead of use (TmpFileReserve) and never written
            continue
        digest = hash_file(path)
        blob = index.blob(digest)
        final = volume.blob_path(digest)
        if blob is not None and blob.get("volume") == volume.name and not final.exists():
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(path, final)
            moved += 1
        else:
            path.unlink()
            dropped += 1
    if moved:
        fsync_dir(volume.blobs_dir)
    return {"moved": moved, "dropped": dropped}


def recover(volumes: VolumeSet, index: StudyIndex) -> dict[str, int]:
    """Run before any worker starts: tmp/ leftovers and pending blob deletes from an interrupted commit."""
    totals = {"moved": 0, "dropped": 0, "deleted": 0}
    for vol in volumes.volumes:
        for key, value in recover_volume(vol, index).items():
            totals[key] += value
    totals["deleted"] = index.collect_garbage(index.pending_gc(), volumes.unlink_blob)
    return totals
