"""The LMDB environment of the index: opening (schema check), durable write transactions, prefix scans and the
typed records' codecs. The index's write logic (db.py) and its container accounting (containers.py) build on it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb

from appliance.errors import ApplianceError
from appliance.index import schema
from appliance.index.schema import BlobRecord, ContainerRecord, InstanceRecord, LevelRecord

DB_NAMES = ("patients", "studies", "series", "instances", "uids", "idx_patientid", "idx_accession",
            "idx_studydate", "idx_patientname", "idx_modality", "blobs", "containers", "contents", "gc", "placement",
            "moves", "recalls", "holds", "tombstones", "meta")
SEP = "\x00"
SCHEMA_VERSION = schema.SCHEMA_VERSION
# Versions an index is upgraded from in place when opened for writing (StudyIndex._upgrade).
UPGRADABLE = (b"2", b"3", b"4")


def container_key(backend: str, container: str) -> bytes:
    return f"{backend}{SEP}{container}".encode()


class SchemaMismatch(ApplianceError):
    pass


class IndexEnv:
    def __init__(self, path: Path, map_size: int = 256 << 20, sync: bool = True, readonly: bool = False,
                 lazy_meta: bool = False) -> None:
        """``lazy_meta`` (the serving workers): each commit flushes its data pages but not LMDB's meta page, which
        the next commit's flush (or ``sync``) makes durable: one flush per group commit instead of two. A power loss
        can then undo the last transaction, and startup recovery redoes it from the segments, whose records were
        made durable before it (store/online.py recover). Anything that deletes data after a commit calls
        ``sync`` first."""
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path
        self.lazy_meta = lazy_meta and sync
        self._write_lock = threading.Lock()
        self.env = lmdb.open(
            str(path), map_size=map_size, max_dbs=len(DB_NAMES) + 2, sync=sync, metasync=sync and not lazy_meta,
            readonly=readonly, lock=True, max_readers=1024, mode=0o600,
        )
        with self.env.begin() as txn:
            meta = self.env.open_db(b"meta", txn=txn, create=False) if self._has_db(txn, b"meta") else None
            version = txn.get(b"schema", db=meta) if meta is not None else None
        upgrade = version is not None and bytes(version) in UPGRADABLE and not readonly
        if version is not None and bytes(version) != SCHEMA_VERSION and not upgrade:
            self.env.close()
            raise SchemaMismatch(
                f"the index at {path} has schema version {bytes(version).decode()}, this appliance needs "
                f"{SCHEMA_VERSION.decode()}: schemas 2 to 4 are upgraded when opened for writing "
                "(appliance serve does); "
                "the one-file-per-instance layout (schema 1) has no migration: start from an empty index and volumes")
        self.dbs = {name: self.env.open_db(name.encode(), create=not readonly) for name in DB_NAMES}
        if upgrade:
            self._upgrade(bytes(version or b""))
        if not readonly:
            with self.env.begin(write=True) as txn:
                txn.put(b"schema", SCHEMA_VERSION, db=self.dbs["meta"], overwrite=False)

    def _upgrade(self, version: bytes) -> None:
        """Bring an index of an older ``version`` (one of UPGRADABLE) to SCHEMA_VERSION, in one transaction."""
        raise SchemaMismatch(f"no upgrade from schema {version.decode()}")

    def _has_db(self, txn: lmdb.Transaction, name: bytes) -> bool:
        return txn.get(name) is not None  # named databases are keys of the main database

    def close(self) -> None:
        if self.lazy_meta:
            self.env.sync(True)
        self.env.close()

    def sync(self) -> None:
        """Make every committed transaction durable, the meta page included."""
        self.env.sync(True)

    def _write(self, body: Callable[[lmdb.Transaction], Any]) -> Any:
        """One durable write transaction; grows the map and replays ``body`` when full. One at a time per process
        (the lock): a worker's writer thread registers segments while its index thread commits, and growing the
        map is not allowed while another thread of the process has a transaction open."""
        with self._write_lock:
            while True:
                try:
                    with self.env.begin(write=True) as txn:
                        return body(txn)
                except lmdb.MapFullError:
                    self.env.set_mapsize(self.env.info()["map_size"] * 2)
                except lmdb.MapResizedError:
                    self.env.set_mapsize(0)  # another process grew the map: adopt its size

    def _scan(self, txn: lmdb.Transaction, db: str, prefix: str) -> Iterator[tuple[str, bytes]]:
        cursor = txn.cursor(db=self.dbs[db])
        raw_prefix = prefix.encode()
        if not cursor.set_range(raw_prefix):
            return
        for key, value in cursor:
            if not bytes(key).startswith(raw_prefix):
                return
            yield bytes(key).decode(), bytes(value)

    # ---- typed records --------------------------------------------------------------------------------

    def _blob(self, txn: lmdb.Transaction, digest: str) -> BlobRecord | None:
        raw = txn.get(digest.encode(), db=self.dbs["blobs"])
        return None if raw is None else schema.decode(BlobRecord, raw)

    def _put_blob(self, txn: lmdb.Transaction, digest: str, blob: BlobRecord) -> None:
        assert blob.refs > 0 and blob.copies, (digest, blob)
        txn.put(digest.encode(), schema.encode(blob), db=self.dbs["blobs"])

    def _instance(self, txn: lmdb.Transaction, key: str) -> InstanceRecord | None:
        raw = txn.get(key.encode(), db=self.dbs["instances"])
        return None if raw is None else schema.decode(InstanceRecord, raw)

    def _level(self, txn: lmdb.Transaction, db: str, key: str) -> LevelRecord | None:
        raw = txn.get(key.encode(), db=self.dbs[db])
        return None if raw is None else schema.decode(LevelRecord, raw)

    def _put_level(self, txn: lmdb.Transaction, db: str, key: str, record: LevelRecord) -> None:
        assert record.instances > 0 and record.size >= 0, (db, key, record)
        txn.put(key.encode(), schema.encode(record), db=self.dbs[db])

    def _container(self, txn: lmdb.Transaction, backend: str, name: str) -> ContainerRecord | None:
        raw = txn.get(container_key(backend, name), db=self.dbs["containers"])
        return None if raw is None else schema.decode(ContainerRecord, raw)

    def _put_container(self, txn: lmdb.Transaction, rec: ContainerRecord) -> None:
        txn.put(container_key(rec.backend, rec.name), schema.encode(rec), db=self.dbs["containers"])
