"""The LMDB index: Patient -> Study -> Series -> Instance, secondary indexes, blob references, pending deletes.

Sub-databases (keys are UTF-8, components joined by NUL, so a study's series are a prefix scan):

=============  =========================================  ==================================================
name           key                                        value (JSON)
=============  =========================================  ==================================================
patients       pk                                         patient attributes + counts and sizes
studies        pk NUL study_uid                           study attributes + ModalitiesInStudy, counts, size
series         pk NUL study_uid NUL series_uid            series attributes + count, size
instances      pk NUL study NUL series NUL sop_uid        digest, volume, size, ts, class, received, AE, tier
uids           any Study/Series/SOP Instance UID          level letter + full key of its record
idx_patientid  PatientID NUL study_uid                    study key
idx_accession  AccessionNumber NUL study_uid              study key
idx_studydate  StudyDate NUL study_uid                    study key
blobs          sha256 hex                                 {"volume", "size", "refs"}
gc             volume NUL sha256 hex                      empty: blob to delete once no entry names it
=============  =========================================  ==================================================

``pk`` is the PatientID (with ``^^issuer`` appended when an Issuer of Patient ID is present). A study stays
under the patient of the first instance that created it. Level attributes are those of the instance with the
latest receive time, so the result does not depend on commit order and a rebuild reproduces it exactly.

There is one write path, ``apply``: a list of entries in one write transaction (the group commit). When the
map is full it grows by doubling and the transaction is replayed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import lmdb

from appliance.index.records import Header

DB_NAMES = ("patients", "studies", "series", "instances", "uids", "idx_patientid", "idx_accession",
            "idx_studydate", "blobs", "gc", "meta")
LEVELS = ("patients", "studies", "series", "instances")
SEP = "\x00"
SCHEMA_VERSION = b"1"
# Held (flock) by the serving supervisor: one server per index, and no index swap under a running one.
SERVE_LOCK = "serve.lock"


def _enc(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def _dec(raw: bytes) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(raw)
    return result


def patient_key(patient: dict[str, str]) -> str:
    pid = patient.get("PatientID", "")
    issuer = patient.get("IssuerOfPatientID", "")
    # PatientID is Type 2 (may be empty), but LMDB refuses empty keys (MDB_BAD_VALSIZE): an instance without one
    # failed its whole commit batch with 0xC211. Such instances share the key "^^" (no ID, no issuer).
    return f"{pid}^^{issuer}" if issuer or not pid else pid


class Outcome(Enum):
    STORED = "stored"  # new instance
    REPLACED = "replaced"  # overwrite policy, different bytes
    IDENTICAL = "identical"  # same SOP Instance UID, same bytes: no-op
    KEPT_FIRST = "kept-first"  # keep-first policy: new bytes dropped
    REJECTED = "rejected"  # reject policy


@dataclass
class IndexEntry:
    header: Header
    digest: str
    volume: str
    size: int
    transfer_syntax: str
    received_ns: int
    calling_ae: str
    tier: str = "online"


@dataclass
class ApplyResult:
    outcome: Outcome
    blob_is_new: bool  # the tmp file must be renamed into place (else it is a duplicate and is dropped)
    freed: list[tuple[str, str]]  # (volume, digest) blobs no longer named by any entry


class StudyIndex:
    def __init__(self, path: Path, map_size: int = 256 << 20, sync: bool = True, readonly: bool = False) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.env = lmdb.open(
            str(path), map_size=map_size, max_dbs=len(DB_NAMES) + 2, sync=sync, metasync=sync,
            readonly=readonly, lock=True, max_readers=1024,
        )
        self.dbs = {name: self.env.open_db(name.encode(), create=not readonly) for name in DB_NAMES}
        if not readonly:
            with self.env.begin(write=True) as txn:
                txn.put(b"schema", SCHEMA_VERSION, db=self.dbs["meta"], overwrite=False)

    def close(self) -> None:
        self.env.close()

    # ---- write path -------------------------------------------------------------------------------

    def apply(self, entries: list[IndexEntry], policy: str) -> list[ApplyResult]:
        """Index ``entries`` in one durable write transaction; grows the map and retries when full."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    results = [self._apply_one(txn, entry, policy) for entry in entries]
                    self._unfree_renamed(txn, results)
                    return results
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)  # another process grew the map: adopt its size

    def _unfree_renamed(self, txn: lmdb.Transaction, results: list[ApplyResult]) -> None:
        """Drop from ``freed`` the blobs that a later entry of the same batch names again.

        The committer deletes every freed blob after the commit. Within one batch a blob freed by one entry can
        be named again by a later one (X: A -> B -> A, or X and Y sharing A both replaced and then Z arriving
        with A): it was reported freed by the earlier entry and renamed into place for the later one, so the
        committer deleted a blob the index names. Only the transaction's final state decides.
        """
        for res in results:
            if not res.freed:
                continue
            kept = []
            for volume, digest in res.freed:
                blob = self._get(txn, "blobs", digest)
                if blob is not None and blob["volume"] == volume:
                    txn.delete(f"{volume}{SEP}{digest}".encode(), db=self.dbs["gc"])
                else:
                    kept.append((volume, digest))
            res.freed = kept

    def collect_garbage(self, freed: list[tuple[str, str]], unlink: Callable[[str, str], None]) -> int:
        """Delete freed blobs, each only if no entry names its digest any more, inside a write transaction.

        The transaction holds LMDB's write lock, which every worker process takes to commit: another worker
        cannot index the same content between our check and our unlink (it would rename its own copy into
        the very path we are deleting). Its ``gc`` row goes in the same transaction. Returns how many were
        deleted.
        """
        if not freed:
            return 0
        deleted = 0
        with self.env.begin(write=True) as txn:
            for volume, digest in freed:
                if txn.get(digest.encode(), db=self.dbs["blobs"]) is None:
                    unlink(volume, digest)
                    deleted += 1
                txn.delete(f"{volume}{SEP}{digest}".encode(), db=self.dbs["gc"])
        return deleted

    def pending_gc(self) -> list[tuple[str, str]]:
        with self.env.begin() as txn:
            return [tuple(k.decode().split(SEP, 1)) for k, _ in txn.cursor(db=self.dbs["gc"])]  # type: ignore[misc]

    def _get(self, txn: lmdb.Transaction, db: str, key: str) -> dict[str, Any] | None:
        raw = txn.get(key.encode(), db=self.dbs[db])
        return None if raw is None else _dec(bytes(raw))

    def _put(self, txn: lmdb.Transaction, db: str, key: str, value: dict[str, Any]) -> None:
        txn.put(key.encode(), _enc(value), db=self.dbs[db])

    def _apply_one(self, txn: lmdb.Transaction, entry: IndexEntry, policy: str) -> ApplyResult:
        sop_uid = entry.header.sop_instance_uid
        existing = txn.get(sop_uid.encode(), db=self.dbs["uids"])
        freed: list[tuple[str, str]] = []
        outcome = Outcome.STORED
        if existing is not None:
            inst_key = bytes(existing[1:]).decode()
            old = self._get(txn, "instances", inst_key)
            assert old is not None, f"uids names a missing instance {inst_key!r}"
            if old["digest"] == entry.digest:
                entry.volume = str(old["volume"])  # where the stored copy is (the committer checks it is there)
                return ApplyResult(Outcome.IDENTICAL, False, [])
            if policy == "reject":
                return ApplyResult(Outcome.REJECTED, False, [])
            if policy == "keep-first":
                return ApplyResult(Outcome.KEPT_FIRST, False, [])
            freed = self._remove_instance(txn, inst_key, old)
            outcome = Outcome.REPLACED
        blob_is_new = self._add_ref(txn, entry)
        self._insert_instance(txn, entry)
        # A blob freed by this replacement may be named again by the new entry (A -> B -> A): keep it.
        freed = [(v, d) for v, d in freed if txn.get(d.encode(), db=self.dbs["blobs"]) is None]
        for volume, digest in freed:
            txn.put(f"{volume}{SEP}{digest}".encode(), b"", db=self.dbs["gc"])
        return ApplyResult(outcome, blob_is_new, freed)

    def _add_ref(self, txn: lmdb.Transaction, entry: IndexEntry) -> bool:
        blob = self._get(txn, "blobs", entry.digest)
        if blob is None:
            self._put(txn, "blobs", entry.digest, {"volume": entry.volume, "size": entry.size, "refs": 1})
            txn.delete(f"{entry.volume}{SEP}{entry.digest}".encode(), db=self.dbs["gc"])
            return True
        blob["refs"] += 1
        self._put(txn, "blobs", entry.digest, blob)
        entry.volume = blob["volume"]  # identical bytes are stored once, where they already are
        return False

    def _drop_ref(self, txn: lmdb.Transaction, digest: str) -> list[tuple[str, str]]:
        blob = self._get(txn, "blobs", digest)
        if blob is None:
            return []
        blob["refs"] -= 1
        if blob["refs"] > 0:
            self._put(txn, "blobs", digest, blob)
            return []
        txn.delete(digest.encode(), db=self.dbs["blobs"])
        return [(blob["volume"], digest)]

    @staticmethod
    def _count_in(record: dict[str, Any], size: int, attrs: dict[str, str], received_ns: int) -> None:
        """One more instance under a patient/study/series record; its attributes are those of the instance
        with the latest receive time (so the result does not depend on commit order)."""
        record["NumberOfInstances"] += 1
        record["Size"] += size
        if received_ns >= int(record.get("_t", 0)):
            record.update(attrs)
            record["_t"] = received_ns

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
        patient = self._get(txn, "patients", pk)
        if patient is None:
            patient = {"NumberOfStudies": 0, "NumberOfInstances": 0, "Size": 0, "_t": 0}
        if found is None:
            patient["NumberOfStudies"] += 1
        self._count_in(patient, entry.size, h.patient, t)
        self._put(txn, "patients", pk, patient)

        study = self._get(txn, "studies", study_key)
        old_secondary: list[tuple[str, str]] = []
        if study is None:
            study = {"NumberOfSeries": 0, "NumberOfInstances": 0, "Size": 0, "ModalitiesInStudy": [], "_t": 0}
            txn.put(study_uid.encode(), b"S" + study_key.encode(), db=uids)
        else:
            old_secondary = self._secondary(study_key, study)
        series_key = f"{study_key}{SEP}{series_uid}"
        series = self._get(txn, "series", series_key)
        if series is None:
            series = {"NumberOfInstances": 0, "Size": 0, "_t": 0}
            study["NumberOfSeries"] += 1
            txn.put(series_uid.encode(), b"R" + series_key.encode(), db=uids)
        self._count_in(study, entry.size, {**h.study, "PatientID": h.patient.get("PatientID", "")}, t)
        modality = h.series.get("Modality", "")
        if modality and modality not in study["ModalitiesInStudy"]:
            study["ModalitiesInStudy"] = sorted([*study["ModalitiesInStudy"], modality])
        self._put(txn, "studies", study_key, study)
        # Secondary keys change only when the study's PatientID, AccessionNumber or StudyDate does: rewriting
        # them for every instance cost six LMDB operations per instance for nothing.
        new_secondary = self._secondary(study_key, study)
        if new_secondary != old_secondary:
            for db, key in old_secondary:
                txn.delete(key.encode(), db=self.dbs[db])
            for db, key in new_secondary:
                txn.put(key.encode(), study_key.encode(), db=self.dbs[db])

        self._count_in(series, entry.size, h.series, t)
        self._put(txn, "series", series_key, series)

        inst_key = f"{series_key}{SEP}{h.sop_instance_uid}"
        record: dict[str, Any] = dict(h.instance)
        record.update(
            digest=entry.digest, volume=entry.volume, size=entry.size, TransferSyntaxUID=entry.transfer_syntax,
            received_ns=entry.received_ns, calling_ae=entry.calling_ae, tier=entry.tier,
        )
        self._put(txn, "instances", inst_key, record)
        txn.put(h.sop_instance_uid.encode(), b"I" + inst_key.encode(), db=uids)

    def _secondary(self, study_key: str, study: dict[str, Any]) -> list[tuple[str, str]]:
        study_uid = study_key.split(SEP, 1)[1]
        return [
            ("idx_patientid", f"{study.get('PatientID', '')}{SEP}{study_uid}"),
            ("idx_accession", f"{study.get('AccessionNumber', '')}{SEP}{study_uid}"),
            ("idx_studydate", f"{study.get('StudyDate', '')}{SEP}{study_uid}"),
        ]

    def _unindex_study(self, txn: lmdb.Transaction, study_key: str, study: dict[str, Any]) -> None:
        for db, key in self._secondary(study_key, study):
            txn.delete(key.encode(), db=self.dbs[db])

    def _remove_instance(self, txn: lmdb.Transaction, inst_key: str, old: dict[str, Any]) -> list[tuple[str, str]]:
        """Take an instance out of the tree and the aggregates; returns blobs that became unreferenced."""
        pk, study_uid, series_uid, sop_uid = inst_key.split(SEP)
        study_key = f"{pk}{SEP}{study_uid}"
        series_key = f"{study_key}{SEP}{series_uid}"
        uids = self.dbs["uids"]
        size = int(old["size"])
        txn.delete(inst_key.encode(), db=self.dbs["instances"])
        txn.delete(sop_uid.encode(), db=uids)
        series = self._get(txn, "series", series_key) or {"NumberOfInstances": 1, "Size": size}
        study = self._get(txn, "studies", study_key) or {"NumberOfSeries": 1, "NumberOfInstances": 1, "Size": size}
        patient = self._get(txn, "patients", pk) or {"NumberOfStudies": 1, "NumberOfInstances": 1, "Size": size}
        series["NumberOfInstances"] -= 1
        series["Size"] -= size
        study["NumberOfInstances"] -= 1
        study["Size"] -= size
        patient["NumberOfInstances"] -= 1
        patient["Size"] -= size
        if series["NumberOfInstances"] <= 0:
            txn.delete(series_key.encode(), db=self.dbs["series"])
            txn.delete(series_uid.encode(), db=uids)
            study["NumberOfSeries"] -= 1
            modality = series.get("Modality")
            if modality and not any(
                _dec(v).get("Modality") == modality for _, v in self._scan(txn, "series", study_key + SEP)
            ):
                study["ModalitiesInStudy"] = [m for m in study.get("ModalitiesInStudy", []) if m != modality]
        else:
            self._put(txn, "series", series_key, series)
        if study["NumberOfInstances"] <= 0:
            self._unindex_study(txn, study_key, study)
            txn.delete(study_key.encode(), db=self.dbs["studies"])
            txn.delete(study_uid.encode(), db=uids)
            patient["NumberOfStudies"] -= 1
        else:
            self._put(txn, "studies", study_key, study)
        if patient["NumberOfInstances"] <= 0:
            txn.delete(pk.encode(), db=self.dbs["patients"])
        else:
            self._put(txn, "patients", pk, patient)
        return self._drop_ref(txn, str(old["digest"]))

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

    def items(self, level: str, prefix: str = "") -> list[tuple[str, dict[str, Any]]]:
        """Records of one level whose key starts with ``prefix`` (e.g. a study key + NUL for its series)."""
        with self.env.begin() as txn:
            return [(k, _dec(v)) for k, v in self._scan(txn, level, prefix)]

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
            record = self._get(txn, level, key)
            return (level, key, record) if record is not None else None

    def instances_under(self, uid: str) -> list[tuple[str, dict[str, Any]]]:
        """Every instance of a study, series or single instance UID (for export, move, tiering)."""
        found = self.lookup(uid)
        if found is None:
            return []
        level, key, record = found
        if level == "instances":
            return [(key, record)]
        return self.items("instances", key + SEP)

    def blob(self, digest: str) -> dict[str, Any] | None:
        with self.env.begin() as txn:
            return self._get(txn, "blobs", digest)

    def counts(self) -> dict[str, int]:
        with self.env.begin() as txn:
            return {level: txn.stat(self.dbs[level])["entries"] for level in LEVELS}

    def dump(self, include_provenance: bool = True) -> dict[str, list[tuple[str, Any]]]:
        """Every table as sorted (key, value) rows: what `index rebuild` must reproduce."""
        with self.env.begin() as txn:
            out: dict[str, list[tuple[str, Any]]] = {}
            for name in DB_NAMES:
                if name == "meta":
                    continue
                rows = []
                for key, value in txn.cursor(db=self.dbs[name]):
                    decoded: Any = value.decode() if name not in ("patients", "studies", "series", "instances",
                                                                  "blobs") else _dec(value)
                    rows.append((key.decode(), decoded))
                out[name] = rows
            return out
