"""Last access of studies, recorded cheaply: C-MOVE, C-GET and export note the studies they read in memory, and
the notes are written to the index in one transaction every ``tiering.access_flush_s`` (``record_access``), so
that the policies can move by "days since last accessed" without a write per retrieve.

The buffer is bounded (ACCESS_STUDIES_MAX studies): past it, the oldest notes are written at the next flush all the
same (nothing is dropped, the buffer asks for an early flush). A crash loses at most one interval of notes, which
only delays a study's move down by that much."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol

log = logging.getLogger(__name__)

# Distinct studies noted between two flushes before an early flush is asked for. A note is one dict entry (~200
# bytes): 10,000 is ~2 MB per worker, and far more distinct studies than a worker reads in 30 s.
ACCESS_STUDIES_MAX = 10_000


class AccessSink(Protocol):
    def record_access(self, study_uids_ns: dict[str, int]) -> int: ...


class AccessRecorder:
    """Thread-safe (notes come from the event loop and reader threads); ``flush`` runs on any thread."""

    def __init__(self, sink: AccessSink, studies_max: int = ACCESS_STUDIES_MAX,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.sink = sink
        self.studies_max = studies_max
        self.clock = clock
        self._notes: dict[str, int] = {}
        self._lock = threading.Lock()
        self.full = threading.Event()  # set when the buffer reaches studies_max: the flusher goes early

    def note(self, study_uids: Iterable[str]) -> None:
        now = self.clock()
        with self._lock:
            for uid in study_uids:
                self._notes[uid] = now
            if len(self._notes) >= self.studies_max:
                self.full.set()

    def pending(self) -> int:
        with self._lock:
            return len(self._notes)

    def flush(self) -> int:
        """Write the notes in one index transaction; returns how many studies. On an error the notes are kept
        (merged with newer ones) for the next flush, so a busy index only delays them."""
        with self._lock:
            notes, self._notes = self._notes, {}
            self.full.clear()
        if not notes:
            return 0
        try:
            self.sink.record_access(notes)
        except Exception:
            with self._lock:
                for uid, when in notes.items():
                    if when > self._notes.get(uid, 0):
                        self._notes[uid] = when
            raise
        return len(notes)


async def flush_periodically(recorder: AccessRecorder, interval_s: float, stop: asyncio.Event) -> None:
    """The worker's flusher: every ``interval_s``, or sooner when the buffer is full, and once more at ``stop``.
    The index write runs on a thread (an LMDB write transaction must not block the event loop)."""
    loop = asyncio.get_running_loop()
    while True:
        full: asyncio.Future[bool] = loop.run_in_executor(None, recorder.full.wait, interval_s)
        stopping: asyncio.Future[bool] = asyncio.ensure_future(stop.wait())
        await asyncio.wait([full, stopping], return_when=asyncio.FIRST_COMPLETED)
        try:
            await loop.run_in_executor(None, recorder.flush)
        except Exception:  # the notes are kept; recording access must never stop the worker
            log.exception("recording last access")
        if stop.is_set():
            recorder.full.set()  # wake the waiting thread, so the executor shuts down at once
            stopping.cancel()
            return
        stopping.cancel()
