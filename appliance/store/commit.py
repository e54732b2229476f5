"""Group commit: many C-STOREs share one fsync batch and one LMDB write transaction.

Order for one batch (the durability contract; see also store/blobs.py):
1. set the blob's mtime (= receive time) and calling-AE xattr, then fsync each tmp file, in parallel threads
   (the filesystem journal merges concurrent fsyncs), then fsync each volume's tmp/ folder once;
2. one LMDB write transaction indexes every instance of the batch, and is committed (fsync'd by LMDB);
3. rename each new blob from tmp/ to blobs/ab/cd/<digest>; drop tmp files of duplicates;
4. delete blobs that no index entry names any more (their ``gc`` rows were written in step 2);
5. only now wake the associations, which send Success.

A crash after 2 and before 3 leaves indexed blobs in tmp/: ``recover_volume`` at startup finishes the rename.
Batching: the committer thread takes everything queued; if associations are still receiving, it waits up to
``commit_max_wait_ms`` for them to join, so one core's worth of fsync serves many instances.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from appliance import errors
from appliance.index.db import IndexEntry, Outcome, StudyIndex
from appliance.store.blobs import BlobWriter, hash_file, set_calling_ae
from appliance.store.volumes import Volume, VolumeSet, fsync_dir

if TYPE_CHECKING:
    from appliance.metrics import Metrics

log = logging.getLogger(__name__)


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
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fsync")
        self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
        self._thread.start()

    def submit(self, writer: BlobWriter, entry: IndexEntry) -> asyncio.Future[CommitResult]:
        future: asyncio.Future[CommitResult] = self.loop.create_future()
        with self._cond:
            self._queue.append(_Pending(writer, entry, future, time.perf_counter()))
            self._cond.notify()
        return future

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
        self._pool.shutdown()

    # ---- committer thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue and self._closed:
                    return
                if self.max_wait > 0 and len(self._queue) < min(self.max_batch, self.receiving + 1):
                    # Others are mid-receive: give them a bounded moment to join this batch.
                    self._cond.wait_for(
                        lambda: len(self._queue) >= min(self.max_batch, self.receiving + 1), self.max_wait
                    )
                batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
            try:
                self._commit(batch)
            except Exception:  # never let the committer die: fail the batch, keep serving
                log.exception("group commit failed")
                for item in batch:
                    item.writer.discard()
                self._resolve([(item, CommitResult(errors.PROCESSING_FAILURE, None, "index failure"))
                               for item in batch])

    def _make_durable(self, item: _Pending) -> None:
        writer = item.writer
        ns = item.entry.received_ns
        os.utime(writer.fd, ns=(ns, ns))
        set_calling_ae(writer.tmp_path, item.entry.calling_ae)
        if self.fsync:
            os.fsync(writer.fd)  # fsync, not fdatasync: the mtime and xattr must be durable too
        writer.close()

    def _commit(self, batch: list[_Pending]) -> None:
        t0 = time.perf_counter()
        durable: list[_Pending] = []
        results: list[tuple[_Pending, CommitResult]] = []
        for item, exc in zip(batch, self._pool.map(self._try_durable, batch), strict=True):
            if exc is None:
                durable.append(item)
            else:
                item.writer.discard()
                results.append((item, CommitResult(errors.OUT_OF_RESOURCES, None, f"fsync failed: {exc}")))
        if self.fsync:
            for vol in {id(i.writer.volume): i.writer.volume for i in durable}.values():
                fsync_dir(vol.tmp_dir)
        t1 = time.perf_counter()
        applied = self.index.apply([i.entry for i in durable], self.policy) if durable else []
        t2 = time.perf_counter()
        freed: list[tuple[str, str]] = []
        for item, res in zip(durable, applied, strict=True):
            if res.blob_is_new:
                final = item.writer.volume.blob_path(item.entry.digest)
                final.parent.mkdir(parents=True, exist_ok=True)
                os.rename(item.writer.tmp_path, final)
                item.writer.volume.charge(item.writer.size)
            else:
                item.writer.discard()
            freed.extend(res.freed)
            if res.outcome is Outcome.REJECTED:
                results.append((item, CommitResult(errors.DUPLICATE_SOP_INSTANCE, res.outcome,
                                                   "duplicate SOP Instance UID with other content")))
            else:
                results.append((item, CommitResult(errors.SUCCESS, res.outcome)))
        if freed:
            delete_blobs(self.volumes, freed)
            self.index.forget_gc(freed)
        if self.metrics is not None:
            m = self.metrics
            m.batch_size.observe(len(batch))
            for item in batch:
                m.store_seconds.labels("queue").observe(t0 - item.queued_at)
                m.store_seconds.labels("fsync").observe(t1 - t0)
                m.store_seconds.labels("index").observe(t2 - t1)
        self._resolve(results)

    def _try_durable(self, item: _Pending) -> OSError | None:
        try:
            self._make_durable(item)
            return None
        except OSError as exc:
            return exc

    def _resolve(self, results: list[tuple[_Pending, CommitResult]]) -> None:
        def wake() -> None:
            for item, result in results:
                if not item.future.done():
                    item.future.set_result(result)

        self.loop.call_soon_threadsafe(wake)


def delete_blobs(volumes: VolumeSet, freed: list[tuple[str, str]]) -> None:
    for volume, digest in freed:
        vol = volumes.by_name.get(volume)
        if vol is None:
            continue
        try:
            os.unlink(vol.blob_path(digest))
        except FileNotFoundError:
            pass


def recover_volume(volume: Volume, index: StudyIndex) -> dict[str, int]:
    """Startup recovery of one volume's tmp/: finish renames the index already committed, drop the rest."""
    moved = dropped = 0
    for path in sorted(Path(volume.tmp_dir).iterdir()):
        if not path.is_file():
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
    pending = index.pending_gc()
    still_free = [(v, d) for v, d in pending if index.blob(d) is None]
    delete_blobs(volumes, still_free)
    index.forget_gc(pending)
    totals["deleted"] = len(still_free)
    return totals
