"""Association slots shared by the workers of one server: one small table in shared memory.

Each open association holds one row: (owner worker + 1, hash of its calling AE title, hash of its source address).
Rows rather than counters, because that gives three things with one lock and no per-key allocation:
- the total over all workers (``server.max_associations``), and the counts per calling AE and per source host
  (``server.max_associations_per_ae`` / ``_per_host``) by scanning at most ``max_associations`` rows;
- the rows of a worker that died (kill -9, OOM) can be released by the supervisor (``reap``): with a plain shared
  counter the dead worker's associations stayed counted until a full restart.
64-bit BLAKE2 hashes keep the rows fixed-size; two different titles colliding is a 2^-64 event.
"""

from __future__ import annotations

import hashlib
import multiprocessing
from typing import Any

FIELDS = 3  # owner + 1 (0 = free row), AE hash, host hash
# Why take() failed: which limit was reached.
FULL, PER_AE, PER_HOST = "max_associations", "max_associations_per_ae", "max_associations_per_host"


def key_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest(), "little",
                          signed=True)


class SlotTable:
    def __init__(self, capacity: int, mp_context: Any = None) -> None:
        self.capacity = capacity
        ctx = mp_context or multiprocessing.get_context("fork")
        self._rows = ctx.Array("q", FIELDS * capacity, lock=True)

    def take(self, worker: int, calling_ae: str, host: str, per_ae: int, per_host: int) -> int | str:
        """A row index for a new association, or the name of the limit that refuses it."""
        ae, addr = key_hash(calling_ae), key_hash(host)
        with self._rows.get_lock():
            rows = self._rows.get_obj()
            free, same_ae, same_host = -1, 0, 0
            for i in range(0, FIELDS * self.capacity, FIELDS):
                if rows[i] == 0:
                    if free < 0:
                        free = i
                    continue
                same_ae += rows[i + 1] == ae
                same_host += rows[i + 2] == addr
            if free < 0:
                return FULL
            if same_ae >= per_ae:
                return PER_AE
            if same_host >= per_host:
                return PER_HOST
            rows[free], rows[free + 1], rows[free + 2] = worker + 1, ae, addr
            return free // FIELDS

    def give(self, index: int) -> None:
        with self._rows.get_lock():
            self._rows.get_obj()[index * FIELDS] = 0

    def reap(self, worker: int) -> int:
        """Free every row of ``worker`` (it died); returns how many were held."""
        freed = 0
        with self._rows.get_lock():
            rows = self._rows.get_obj()
            for i in range(0, FIELDS * self.capacity, FIELDS):
                if rows[i] == worker + 1:
                    rows[i] = 0
                    freed += 1
        return freed

    def in_use(self, worker: int | None = None) -> int:
        with self._rows.get_lock():
            rows = self._rows.get_obj()
            owners = [rows[i] for i in range(0, FIELDS * self.capacity, FIELDS)]
        return sum(1 for o in owners if o and (worker is None or o == worker + 1))
