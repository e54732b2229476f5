"""The index's side of space accounting: containers (segments, archives) with their committed end and live bytes,
the blobs each holds live, compaction's switch, verify's marks, and the deletes queued in ``gc``.

Invariant (with store/compact.py): a container's ``live_bytes`` is the sum of the ``stored_bytes`` of the copies in
it that a blob record names; a container file is deleted only after the transaction that stopped naming anything in
it is durable (``collect_garbage`` syncs first)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import lmdb
import msgspec

from appliance.index import schema
from appliance.index.env import SEP, IndexEnv, container_key
from appliance.index.schema import BlobRecord, ContainerRecord, Copy


class ContainerIndex(IndexEnv):
    def _count_copy(self, txn: lmdb.Transaction, digest: str, copy: Copy, sign: int) -> None:
        """A copy starts (+1) or stops (-1) being named: its container's live accounting follows."""
        rec = self._container(txn, copy.backend, copy.container)
        if rec is None:  # every writer registers its containers first; a tier that does not gets a bare record
            rec = ContainerRecord(copy.backend, copy.container, 0)
        rec.live_bytes += sign * copy.stored_bytes
        rec.live_records += sign
        assert rec.live_bytes >= 0 and rec.live_records >= 0, rec
        self._put_container(txn, rec)
        key = f"{copy.backend}{SEP}{copy.container}{SEP}{digest}".encode()
        if sign > 0:
            txn.put(key, b"", db=self.dbs["contents"])
        else:
            txn.delete(key, db=self.dbs["contents"])

    def _replace_copy(self, txn: lmdb.Transaction, digest: str, blob: BlobRecord, i: int, new: Copy) -> None:
        """Name ``new`` instead of the blob's i-th copy (compaction's switch, the earliest record named), and store
        the blob record; both containers' accounting follows."""
        self._count_copy(txn, digest, blob.copies[i], -1)
        blob.copies[i] = new
        self._count_copy(txn, digest, new, +1)
        self._put_blob(txn, digest, blob)

    # ---- containers ---------------------------------------------------------------------------------

    def register_container(self, backend: str, name: str, created_ns: int) -> None:
        """A new container (segment), before its first byte is written: recovery then knows it is ours."""

        def body(txn: lmdb.Transaction) -> None:
            if self._container(txn, backend, name) is None:
                self._put_container(txn, ContainerRecord(backend, name, created_ns))

        self._write(body)
        if self.lazy_meta:
            self.env.sync(True)  # once per segment: recovery must know the segment is ours

    def register_containers(self, records: list[ContainerRecord]) -> None:
        """Containers found on a tier by `index rebuild --from-tier`, with their end and seal, in one transaction:
        a record already there keeps the larger end and the earlier creation (a container listed twice)."""

        def body(txn: lmdb.Transaction) -> None:
            for rec in records:
                old = self._container(txn, rec.backend, rec.name)
                if old is not None:
                    old.end, old.sealed = max(old.end, rec.end), old.sealed or rec.sealed
                    old.created_ns = min(old.created_ns, rec.created_ns)
                    rec = old
                self._put_container(txn, rec)

        self._write(body)

    def seal_containers(self, backend: str, names: list[str]) -> None:
        def body(txn: lmdb.Transaction) -> None:
            for name in names:
                rec = self._container(txn, backend, name)
                if rec is not None and not rec.sealed:
                    rec.sealed = True
                    self._put_container(txn, rec)

        self._write(body)

    def container(self, backend: str, name: str) -> ContainerRecord | None:
        with self.env.begin() as txn:
            return self._container(txn, backend, name)

    def containers(self, backend: str | None = None) -> list[ContainerRecord]:
        with self.env.begin() as txn:
            prefix = "" if backend is None else backend + SEP
            return [schema.decode(ContainerRecord, v) for _k, v in self._scan(txn, "containers", prefix)]

    def iter_containers(self, backend: str | None = None, batch: int = 1024) -> Iterator[ContainerRecord]:
        """``containers(backend)`` in short read transactions of ``batch`` records: memory bounded by the batch
        (a nearline tier has one container per study moved: millions)."""
        prefix = ("" if backend is None else backend + SEP).encode()
        after = prefix
        while True:
            with self.env.begin() as txn:
                cursor = txn.cursor(db=self.dbs["containers"])
                found = cursor.set_range(after)
                rows: list[tuple[bytes, ContainerRecord]] = []
                while found and len(rows) < batch:
                    key = bytes(cursor.key())
                    if not key.startswith(prefix):
                        break
                    if key != after or after == prefix:
                        rows.append((key, schema.decode(ContainerRecord, cursor.value())))
                    found = cursor.next()
            if not rows:
                return
            yield from (rec for _key, rec in rows)
            after = rows[-1][0]

    def container_contents(self, backend: str, name: str) -> list[tuple[str, BlobRecord]]:
        """The blobs a container holds live, with their records."""
        prefix = f"{backend}{SEP}{name}{SEP}"
        with self.env.begin() as txn:
            out = []
            for key, _v in self._scan(txn, "contents", prefix):
                digest = key[len(prefix):]
                blob = self._blob(txn, digest)
                assert blob is not None, f"contents names a blob without a record: {digest}"
                out.append((digest, blob))
            return out

    def move_copies(self, backend: str, old_container: str, moves: dict[str, Copy]) -> int:
        """Compaction's switch: repoint each blob's copy in ``old_container`` to its new copy (compare-and-swap:
        a blob freed or moved meanwhile is skipped), then, if nothing live is left in the old container, forget it
        and queue its file for deletion (``gc``). One transaction. Returns how many copies moved."""

        def body(txn: lmdb.Transaction) -> int:
            moved = 0
            for digest, new in moves.items():
                blob = self._blob(txn, digest)
                if blob is None:
                    continue  # freed since the copy was made: the new bytes stay dead
                for i, old in enumerate(blob.copies):
                    if old.backend == backend and old.container == old_container:
                        self._replace_copy(txn, digest, blob, i, new)
                        moved += 1
                        break
            rec = self._container(txn, backend, old_container)
            if rec is not None and rec.live_records == 0:
                txn.delete(container_key(backend, old_container), db=self.dbs["containers"])
                txn.put(container_key(backend, old_container), b"", db=self.dbs["gc"])
            return moved

        moved: int = self._write(body)
        return moved

    def mark_verified(self, results: list[tuple[str, Copy, str]], when_ns: int) -> None:
        """Record what ``verify`` found per copy ('ok' or a suspect state) and when."""

        def body(txn: lmdb.Transaction) -> None:
            for digest, checked, state in results:
                blob = self._blob(txn, digest)
                if blob is None:
                    continue
                blob.copies = [msgspec.structs.replace(c, state=state, verified_ns=when_ns)
                               if c == checked else c for c in blob.copies]
                self._put_blob(txn, digest, blob)

        self._write(body)

    def pending_gc(self) -> list[tuple[str, str]]:
        with self.env.begin() as txn:
            return [tuple(k.decode().split(SEP, 1)) for k, _ in txn.cursor(db=self.dbs["gc"])]  # type: ignore[misc]

    def _forget_gc(self, key: bytes, txn: lmdb.Transaction) -> None:
        txn.delete(key, db=self.dbs["gc"])

    def collect_garbage(self, containers: list[tuple[str, str]], remove: Callable[[str, str], None]) -> int:
        """Delete containers queued in ``gc`` (their file first, then the row: a crash in between repeats the
        harmless delete at the next start). Returns how many."""
        done = 0
        if containers:
            self.env.sync(True)  # the transaction that stopped naming them must be durable before the files go
        for backend, name in containers:
            with self.env.begin() as txn:
                named = self._container(txn, backend, name) is not None
            if not named:  # (named again cannot happen today; never delete what the index knows, drop the row)
                remove(backend, name)
                done += 1
            self._write(functools.partial(self._forget_gc, container_key(backend, name)))
        return done
