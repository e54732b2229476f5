"""The LMDB index: Patient -> Study -> Series -> Instance, secondary indexes, blobs and their copies, containers.

Sub-databases (keys are UTF-8, components joined by NUL, so a study's series are a prefix scan):

=============  =========================================  ==================================================
name           key                                        value
=============  =========================================  ==================================================
patients       pk                                         LevelRecord: attributes, studies, instances, size
studies        pk NUL study_uid                           LevelRecord: attributes, series, modalities, ..
series         pk NUL study_uid NUL series_uid            LevelRecord: attributes, instances, size
instances      pk NUL study NUL series NUL sop_uid        InstanceRecord (every record: schema.py, MessagePack)
uids           any Study/Series/SOP Instance UID          level letter + full key of its record
idx_patientid  PatientID NUL study_uid                    study key
idx_accession  AccessionNumber NUL study_uid              study key
idx_studydate  StudyDate NUL study_uid                    study key
blobs          sha256 hex                                 BlobRecord: size, refs, copies (backend, container, ..)
containers     backend NUL container                      ContainerRecord: committed end, live bytes, sealed
contents       backend NUL container NUL sha256 hex       empty: the blobs a container holds live (compaction)
gc             backend NUL container                      empty: container to delete once nothing names it
meta           "schema"                                   schema version (2)
=============  =========================================  ==================================================

``pk`` is the PatientID (with ``^^issuer`` appended when an Issuer of Patient ID is present). A study stays
under the patient of the first instance that created it. Level attributes are those of the instance with the
latest receive time, so the result does not depend on commit order and a rebuild reproduces it exactly.

Invariants (with store/commit.py): an entry names a copy only after the copy's bytes are durable; a container
is deleted only after the transaction that stopped naming anything in it (its ``gc`` row) has committed; a
container's ``live_bytes`` is the sum of the ``stored_bytes`` of the copies in it that a blob record names.

There is one ingest write path, ``apply``: a list of entries in one write transaction (the group commit). When
the map is full it grows by doubling and the transaction is replayed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import lmdb

from appliance.errors import ApplianceError
from appliance.index import schema
from appliance.index.records import Header
from appliance.index.schema import BlobRecord, ContainerRecord, Copy, InstanceRecord, LevelRecord

DB_NAMES = ("patients", "studies", "series", "instances", "uids", "idx_patientid", "idx_accession",
            "idx_studydate", "blobs", "containers", "contents", "gc", "meta")
LEVELS = ("patients", "studies", "series", "instances")
SEP = "\x00"
SCHEMA_VERSION = schema.SCHEMA_VERSION
# Held (flock) by the serving supervisor: one server per index, and no index swap under a running one.
SERVE_LOCK = "serve.lock"


def patient_key(patient: dict[str, str]) -> str:
    pid = patient.get("PatientID", "")
    issuer = patient.get("IssuerOfPatientID", "")
    # PatientID is Type 2 (may be empty), but LMDB refuses empty keys (MDB_BAD_VALSIZE): an instance without one
    # failed its whole commit batch with 0xC211. Such instances share the key "^^" (no ID, no issuer).
    return f"{pid}^^{issuer}" if issuer or not pid else pid


def container_key(backend: str, container: str) -> bytes:
    return f"{backend}{SEP}{container}".encode()


class Outcome(Enum):
    STORED = "stored"  # new instance
    REPLACED = "replaced"  # overwrite policy, different bytes
    IDENTICAL = "identical"  # same SOP Instance UID, same bytes: no-op
    KEPT_FIRST = "kept-first"  # keep-first policy: new bytes dropped
    REJECTED = "rejected"  # reject policy
    CONFLICT = "conflict"  # a UID of the instance already names another level or sits under another parent


@dataclass
class IndexEntry:
    header: Header
    digest: str
    size: int
    transfer_syntax: str
    received_ns: int
    calling_ae: str
    copy: Copy  # where the bytes were just made durable
    policy: str = ""  # this entry's duplicate policy ("" = the index-wide one given to apply)


@dataclass
class ApplyResult:
    outcome: Outcome
    blob_is_new: bool  # the entry's copy is now named (else its bytes are dead: a duplicate or a refusal)
    existing: list[Copy] = field(default_factory=list)  # IDENTICAL: the copies already named
    reason: str = ""  # CONFLICT: what clashed (no UID in it: it goes to the peer and to the log)


class SchemaMismatch(ApplianceError):
    pass


class StudyIndex:
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
        self.env = lmdb.open(
            str(path), map_size=map_size, max_dbs=len(DB_NAMES) + 2, sync=sync, metasync=sync and not lazy_meta,
            readonly=readonly, lock=True, max_readers=1024, mode=0o600,
        )
        with self.env.begin() as txn:
            meta = self.env.open_db(b"meta", txn=txn, create=False) if self._has_db(txn, b"meta") else None
            version = txn.get(b"schema", db=meta) if meta is not None else None
        if version is not None and bytes(version) != SCHEMA_VERSION:
            self.env.close()
            raise SchemaMismatch(
                f"the index at {path} has schema version {bytes(version).decode()}, this appliance needs "
                f"{SCHEMA_VERSION.decode()}: the one-file-per-instance layout (schema 1) has no migration; "
                "start from an empty index and volumes")
        self.dbs = {name: self.env.open_db(name.encode(), create=not readonly) for name in DB_NAMES}
        if not readonly:
            with self.env.begin(write=True) as txn:
                txn.put(b"schema", SCHEMA_VERSION, db=self.dbs["meta"], overwrite=False)

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
        """One durable write transaction; grows the map and replays ``body`` when full."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    return body(txn)
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)  # another process grew the map: adopt its size

    # ---- write path -------------------------------------------------------------------------------

    def apply(self, entries: list[IndexEntry], policy: str,
              container_ends: dict[tuple[str, str], int] | None = None,
              sealed: list[tuple[str, str]] | None = None) -> list[ApplyResult]:
        """Index ``entries`` in one durable write transaction. ``container_ends`` gives, per (backend, container)
        written by this batch, the end of the last record written there: what recovery may not truncate.
        ``sealed`` lists containers whose seal this batch made durable."""

        def body(txn: lmdb.Transaction) -> list[ApplyResult]:
            for backend, name in sealed or ():
                rec = self._container(txn, backend, name)
                if rec is not None and not rec.sealed:
                    rec.sealed = True
                    self._put_container(txn, rec)
            for (backend, name), end in (container_ends or {}).items():
                rec = self._container(txn, backend, name)
                assert rec is not None, f"container {backend}/{name} written before it was registered"
                if end > rec.end:
                    rec.end = end
                    self._put_container(txn, rec)
            return [self._apply_one(txn, entry, entry.policy or policy) for entry in entries]

        results: list[ApplyResult] = self._write(body)
        return results

    def _level_conflict(self, txn: lmdb.Transaction, h: Header) -> str:
        """Why the instance's UIDs cannot be filed as they say (one UID naming two levels, a series already in
        another study), or "". Checked per entry inside the transaction, so a bad instance fails alone, never the
        group."""
        study, series, sop = h.study["StudyInstanceUID"], h.series["SeriesInstanceUID"], h.sop_instance_uid
        if len({study, series, sop}) < 3:
            return "the Study, Series and SOP Instance UIDs are not distinct"
        uids = self.dbs["uids"]
        found = {uid: txn.get(uid.encode(), db=uids) for uid in (study, series, sop)}
        for uid, letter, level in ((study, b"S", "study"), (series, b"R", "series"), (sop, b"I", "SOP instance")):
            raw = found[uid]
            if raw is not None and bytes(raw[:1]) != letter:
                return f"the {level} UID already names another level"
        series_raw, study_raw = found[series], found[study]
        if series_raw is not None:
            series_key = bytes(series_raw[1:]).decode()
            study_key = bytes(study_raw[1:]).decode() if study_raw is not None else None
            if study_key is None or not series_key.startswith(study_key + SEP):
                return "the series UID already belongs to another study"
        return ""

    def _apply_one(self, txn: lmdb.Transaction, entry: IndexEntry, policy: str) -> ApplyResult:
        sop_uid = entry.header.sop_instance_uid
        conflict = self._level_conflict(txn, entry.header)
        if conflict:
            return ApplyResult(Outcome.CONFLICT, False, reason=conflict)
        existing = txn.get(sop_uid.encode(), db=self.dbs["uids"])
        outcome = Outcome.STORED
        if existing is not None:
            inst_key = bytes(existing[1:]).decode()
            old = self._instance(txn, inst_key)
            assert old is not None, f"uids names a missing instance {inst_key!r}"
            if old.digest == entry.digest:
                blob = self._blob(txn, entry.digest)
                return ApplyResult(Outcome.IDENTICAL, False, list(blob.copies) if blob is not None else [])
            if policy == "reject":
                return ApplyResult(Outcome.REJECTED, False)
            if policy == "keep-first":
                return ApplyResult(Outcome.KEPT_FIRST, False)
            self._remove_instance(txn, inst_key, old)
            outcome = Outcome.REPLACED
        blob_is_new = self._add_ref(txn, entry)
        self._insert_instance(txn, entry)
        return ApplyResult(outcome, blob_is_new)

    def _add_ref(self, txn: lmdb.Transaction, entry: IndexEntry) -> bool:
        blob = self._blob(txn, entry.digest)
        if blob is None:
            self._put_blob(txn, entry.digest, BlobRecord(entry.size, 1, [entry.copy]))
            self._count_copy(txn, entry.digest, entry.copy, +1)
            return True
        blob.refs += 1  # identical bytes are stored once: one record is named, the others stay dead
        # Which record is named must not depend on commit order (two workers may commit identical bytes in either
        # order), or `index rebuild`, which replays records in receive order, would name another one: the
        # earliest received record of a backend is the one named.
        for i, cur in enumerate(blob.copies):
            new = entry.copy
            if cur.backend == new.backend and (new.received_ns, new.location) < (cur.received_ns, cur.location):
                self._count_copy(txn, entry.digest, cur, -1)
                blob.copies[i] = new
                self._count_copy(txn, entry.digest, new, +1)
                self._put_blob(txn, entry.digest, blob)
                return True
        self._put_blob(txn, entry.digest, blob)
        return False

    def _drop_ref(self, txn: lmdb.Transaction, digest: str) -> None:
        blob = self._blob(txn, digest)
        if blob is None:
            return
        blob.refs -= 1
        if blob.refs > 0:
            self._put_blob(txn, digest, blob)
            return
        txn.delete(digest.encode(), db=self.dbs["blobs"])
        for copy in blob.copies:
            self._count_copy(txn, digest, copy, -1)

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

    # ---- containers ---------------------------------------------------------------------------------

    def _container(self, txn: lmdb.Transaction, backend: str, name: str) -> ContainerRecord | None:
        raw = txn.get(container_key(backend, name), db=self.dbs["containers"])
        return None if raw is None else schema.decode(ContainerRecord, raw)

    def _put_container(self, txn: lmdb.Transaction, rec: ContainerRecord) -> None:
        txn.put(container_key(rec.backend, rec.name), schema.encode(rec), db=self.dbs["containers"])

    def register_container(self, backend: str, name: str, created_ns: int) -> None:
        """A new container (segment), before its first byte is written: recovery then knows it is ours."""

        def body(txn: lmdb.Transaction) -> None:
            if self._container(txn, backend, name) is None:
                self._put_container(txn, ContainerRecord(backend, name, created_ns))

        self._write(body)
        if self.lazy_meta:
            self.env.sync(True)  # once per segment: recovery must know the segment is ours

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
                        self._count_copy(txn, digest, old, -1)
                        blob.copies[i] = new
                        self._count_copy(txn, digest, new, +1)
                        self._put_blob(txn, digest, blob)
                        moved += 1
                        break
            rec = self._container(txn, backend, old_container)
            if rec is not None and rec.live_records == 0:
                txn.delete(container_key(backend, old_container), db=self.dbs["containers"])
                txn.put(container_key(backend, old_container), b"", db=self.dbs["gc"])
            return moved

        moved: int = self._write(body)
        return moved

    def repair_copies(self, repairs: list[tuple[str, list[Copy], Copy]]) -> int:
        """Name a new durable copy in place of copies found unreadable (an identical re-send repairing a lost
        segment). A blob changed meanwhile (its lost copies no longer named) is left alone. Returns how many."""

        def body(txn: lmdb.Transaction) -> int:
            done = 0
            for digest, lost, new in repairs:
                blob = self._blob(txn, digest)
                if blob is None or not all(c in blob.copies for c in lost):
                    continue
                for copy in lost:
                    self._count_copy(txn, digest, copy, -1)
                blob.copies = [c for c in blob.copies if c not in lost] + [new]
                self._count_copy(txn, digest, new, +1)
                self._put_blob(txn, digest, blob)
                done += 1
            return done

        done: int = self._write(body)
        return done

    def mark_verified(self, results: list[tuple[str, Copy, str]], when_ns: int) -> None:
        """Record what ``verify`` found per copy ('ok' or a suspect state) and when."""

        def body(txn: lmdb.Transaction) -> None:
            for digest, checked, state in results:
                blob = self._blob(txn, digest)
                if blob is None:
                    continue
                blob.copies = [schema.msgspec.structs.replace(c, state=state, verified_ns=when_ns)
                               if c == checked else c for c in blob.copies]
                self._put_blob(txn, digest, blob)

        self._write(body)

    def pending_gc(self) -> list[tuple[str, str]]:
        with self.env.begin() as txn:
            return [tuple(k.decode().split(SEP, 1)) for k, _ in txn.cursor(db=self.dbs["gc"])]  # type: ignore[misc]

    def collect_garbage(self, containers: list[tuple[str, str]], remove: Callable[[str, str], None]) -> int:
        """Delete containers queued in ``gc`` (their file first, then the row: a crash in between repeats the
        harmless delete at the next start). Returns how many."""
        done = 0
        if containers:
            self.env.sync(True)  # the transaction that stopped naming them must be durable before the files go
        for backend, name in containers:
            with self.env.begin() as txn:
                if self._container(txn, backend, name) is not None:
                    continue  # named again (cannot happen today; never delete what the index knows)
            remove(backend, name)
            key = container_key(backend, name)
            with self.env.begin(write=True) as txn:
                txn.delete(key, db=self.dbs["gc"])
            done += 1
        return done

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

    def _insert_instance(self, txn: lmdb.Transaction, entry: IndexEntry) -> None:
        h = entry.header
        t = entry.received_ns
        study_uid = h.study["StudyInstanceUID"]
        series_uid = h.series["SeriesInstanceUID"]
        uids = self.dbs["uids"]

        found = txn.get(study_uid.encode(), db=uids)
        if found is not None:
            study_key = bytes(found[1:]).decode()
            pk = study_key.split(SEP, 1)[0]
        else:
            pk = patient_key(h.patient)
            study_key = f"{pk}{SEP}{study_uid}"
        patient = self._level(txn, "patients", pk) or LevelRecord({})
        if found is None:
            patient.children += 1
        patient.count_in(entry.size, h.patient, t)
        self._put_level(txn, "patients", pk, patient)

        study = self._level(txn, "studies", study_key)
        old_secondary: list[tuple[str, str]] = []
        if study is None:
            study = LevelRecord({})
            txn.put(study_uid.encode(), b"S" + study_key.encode(), db=uids)
        else:
            old_secondary = self._secondary(study_key, study)
        series_key = f"{study_key}{SEP}{series_uid}"
        series = self._level(txn, "series", series_key)
        if series is None:
            series = LevelRecord({})
            study.children += 1
            txn.put(series_uid.encode(), b"R" + series_key.encode(), db=uids)
        study.count_in(entry.size, {**h.study, "PatientID": h.patient.get("PatientID", "")}, t)
        modality = h.series.get("Modality", "")
        if modality and modality not in study.modalities:
            study.modalities = sorted([*study.modalities, modality])
        self._put_level(txn, "studies", study_key, study)
        # Secondary keys change only when the study's PatientID, AccessionNumber or StudyDate does: rewriting
        # them for every instance cost six LMDB operations per instance for nothing.
        new_secondary = self._secondary(study_key, study)
        if new_secondary != old_secondary:
            for db, key in old_secondary:
                txn.delete(key.encode(), db=self.dbs[db])
            for db, key in new_secondary:
                txn.put(key.encode(), study_key.encode(), db=self.dbs[db])

        series.count_in(entry.size, h.series, t)
        self._put_level(txn, "series", series_key, series)

        inst_key = f"{series_key}{SEP}{h.sop_instance_uid}"
        record = InstanceRecord(dict(h.instance), entry.digest, entry.size, entry.transfer_syntax,
                                entry.received_ns, entry.calling_ae)
        txn.put(inst_key.encode(), schema.encode(record), db=self.dbs["instances"])
        txn.put(h.sop_instance_uid.encode(), b"I" + inst_key.encode(), db=uids)

    def _secondary(self, study_key: str, study: LevelRecord) -> list[tuple[str, str]]:
        study_uid = study_key.split(SEP, 1)[1]
        attrs = study.attrs
        return [
            ("idx_patientid", f"{attrs.get('PatientID', '')}{SEP}{study_uid}"),
            ("idx_accession", f"{attrs.get('AccessionNumber', '')}{SEP}{study_uid}"),
            ("idx_studydate", f"{attrs.get('StudyDate', '')}{SEP}{study_uid}"),
        ]

    def _unindex_study(self, txn: lmdb.Transaction, study_key: str, study: LevelRecord) -> None:
        for db, key in self._secondary(study_key, study):
            txn.delete(key.encode(), db=self.dbs[db])

    def _remove_instance(self, txn: lmdb.Transaction, inst_key: str, old: InstanceRecord) -> None:
        """Take an instance out of the tree and the aggregates, and drop its blob reference."""
        pk, study_uid, series_uid, sop_uid = inst_key.split(SEP)
        study_key = f"{pk}{SEP}{study_uid}"
        series_key = f"{study_key}{SEP}{series_uid}"
        uids = self.dbs["uids"]
        size = old.size
        txn.delete(inst_key.encode(), db=self.dbs["instances"])
        txn.delete(sop_uid.encode(), db=uids)
        series = self._level(txn, "series", series_key)
        study = self._level(txn, "studies", study_key)
        patient = self._level(txn, "patients", pk)
        assert series is not None and study is not None and patient is not None, f"a parent of {inst_key!r} is gone"
        for record in (series, study, patient):
            record.instances -= 1
            record.size -= size
            assert record.instances >= 0 and record.size >= 0, (inst_key, record)
        if series.instances <= 0:
            txn.delete(series_key.encode(), db=self.dbs["series"])
            txn.delete(series_uid.encode(), db=uids)
            study.children -= 1
            modality = series.attrs.get("Modality")
            if modality and not any(schema.decode(LevelRecord, v).attrs.get("Modality") == modality
                                    for _, v in self._scan(txn, "series", study_key + SEP)):
                study.modalities = [m for m in study.modalities if m != modality]
        else:
            self._put_level(txn, "series", series_key, series)
        if study.instances <= 0:
            self._unindex_study(txn, study_key, study)
            txn.delete(study_key.encode(), db=self.dbs["studies"])
            txn.delete(study_uid.encode(), db=uids)
            patient.children -= 1
        else:
            self._put_level(txn, "studies", study_key, study)
        if patient.instances <= 0:
            txn.delete(pk.encode(), db=self.dbs["patients"])
        else:
            self._put_level(txn, "patients", pk, patient)
        self._drop_ref(txn, old.digest)

    # ---- read path --------------------------------------------------------------------------------

    def _scan(self, txn: lmdb.Transaction, db: str, prefix: str) -> Iterator[tuple[str, bytes]]:
        cursor = txn.cursor(db=self.dbs[db])
        raw_prefix = prefix.encode()
        if not cursor.set_range(raw_prefix):
            return
        for key, value in cursor:
            if not bytes(key).startswith(raw_prefix):
                return
            yield bytes(key).decode(), bytes(value)

    def _decode_level(self, level: str, raw: bytes) -> dict[str, Any]:
        if level == "instances":
            return schema.decode(InstanceRecord, raw).public()
        return schema.decode(LevelRecord, raw).public(level)

    def items(self, level: str, prefix: str = "") -> list[tuple[str, dict[str, Any]]]:
        """Records of one level whose key starts with ``prefix`` (e.g. a study key + NUL for its series), as the
        flat dicts the CLI shows."""
        with self.env.begin() as txn:
            return [(k, self._decode_level(level, v)) for k, v in self._scan(txn, level, prefix)]

    def instance_records(self, prefix: str = "") -> Iterator[tuple[str, InstanceRecord]]:
        """Typed instance records under a key prefix, read in one transaction."""
        with self.env.begin() as txn:
            for key, raw in self._scan(txn, "instances", prefix):
                yield key, schema.decode(InstanceRecord, raw)

    def studies_by(self, index: str, value: str) -> list[str]:
        """Study keys from a secondary index (``idx_patientid``, ``idx_accession``, ``idx_studydate``)."""
        with self.env.begin() as txn:
            return [v.decode() for _, v in self._scan(txn, index, value + SEP)]

    def studies_in_date_range(self, start: str, end: str) -> list[str]:
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self.dbs["idx_studydate"])
            result = []
            if cursor.set_range(start.encode()):
                for key, value in cursor:
                    if key.split(b"\x00", 1)[0].decode() > end:
                        break
                    result.append(value.decode())
            return result

    def lookup(self, uid: str) -> tuple[str, str, dict[str, Any]] | None:
        """(level, key, record) for a Study, Series or SOP Instance UID."""
        with self.env.begin() as txn:
            found = txn.get(uid.encode(), db=self.dbs["uids"])
            if found is None:
                return None
            level = {"S": "studies", "R": "series", "I": "instances"}[chr(found[0])]
            key = found[1:].decode()
            raw = txn.get(key.encode(), db=self.dbs[level])
            return (level, key, self._decode_level(level, raw)) if raw is not None else None

    def instances_under(self, uid: str) -> list[tuple[str, InstanceRecord]]:
        """Every instance of a study, series or single instance UID (for export, move, tiering), typed."""
        with self.env.begin() as txn:
            found = txn.get(uid.encode(), db=self.dbs["uids"])
            if found is None:
                return []
            key = found[1:].decode()
            if chr(found[0]) == "I":
                rec = self._instance(txn, key)
                return [(key, rec)] if rec is not None else []
            return [(k, schema.decode(InstanceRecord, v)) for k, v in self._scan(txn, "instances", key + SEP)]

    def blob(self, digest: str) -> BlobRecord | None:
        with self.env.begin() as txn:
            return self._blob(txn, digest)

    def blobs(self) -> Iterator[tuple[str, BlobRecord]]:
        with self.env.begin() as txn:
            for key, raw in txn.cursor(db=self.dbs["blobs"]):
                yield bytes(key).decode(), schema.decode(BlobRecord, raw)

    def counts(self) -> dict[str, int]:
        with self.env.begin() as txn:
            return {level: txn.stat(self.dbs[level])["entries"] for level in LEVELS}

    def dump(self, verification: bool = False) -> dict[str, list[tuple[str, Any]]]:
        """Every table as sorted (key, value) rows: what `index rebuild` must reproduce. What `verify` recorded
        per copy (state, time) is history, not content: left out unless ``verification``."""
        typed: dict[str, type] = {"instances": InstanceRecord, "blobs": BlobRecord, "containers": ContainerRecord,
                                  "patients": LevelRecord, "studies": LevelRecord, "series": LevelRecord}
        with self.env.begin() as txn:
            out: dict[str, list[tuple[str, Any]]] = {}
            for name in DB_NAMES:
                if name == "meta":
                    continue
                rows = []
                for key, value in txn.cursor(db=self.dbs[name]):
                    decoded: Any
                    if name in typed:
                        decoded = schema.to_builtins(schema.decode(typed[name], value))
                        if name == "blobs" and not verification:
                            for copy in decoded["copies"]:
                                del copy["state"], copy["verified_ns"]
                    else:
                        decoded = bytes(value).decode()
                    rows.append((bytes(key).decode(), decoded))
                out[name] = rows
            return out
