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
idx_patientname  name_key(group) NUL study_uid            study key (one row per PN component group)
idx_modality   Modality NUL study_uid                     study key (one row per modality in the study)
blobs          sha256 hex                                 BlobRecord: size, refs, copies (backend, container, ..)
containers     backend NUL container                      ContainerRecord: committed end, live bytes, sealed
contents       backend NUL container NUL sha256 hex       empty: the blobs a container holds live (compaction)
gc             backend NUL container                      empty: container to delete once nothing names it
placement      pk NUL study_uid                           StudyPlacement: tier, since, last access (tiers.py)
moves          pk NUL study_uid                           MoveRecord: the journal of a move in progress
recalls        pk NUL study_uid                           RecallRecord: a queued recall
holds          study_uid                                  HoldRecord: a legal hold (deletion.py)
tombstones     sop_uid                                    when it was deleted (ns, decimal): rebuild skips it
meta           "schema"                                   schema version (5; 2 to 4 are upgraded on open)
=============  =========================================  ==================================================

``name_key`` folds case and keeps a bounded prefix, so ``DOE*`` or ``doe*`` is a range scan; the query layer
re-checks every candidate against the full value.

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
from typing import Any

import lmdb

from appliance.index import schema
from appliance.index.deletion import DeletionIndex, HoldRecord
from appliance.index.env import DB_NAMES, SEP
from appliance.index.records import Header
from appliance.index.schema import (
    COPY_OK,
    BlobRecord,
    ContainerRecord,
    Copy,
    InstanceRecord,
    LevelRecord,
    MoveRecord,
    RecallRecord,
    StudyPlacement,
)
from appliance.index.upgrade import upgrade_from_2, upgrade_from_3, upgrade_from_4

LEVELS = ("patients", "studies", "series", "instances")
MAX_KEY_BYTES = 511  # LMDB's default maximum key size
# Held (flock) by the serving supervisor: one server per index, and no index swap under a running one.
SERVE_LOCK = "serve.lock"


def patient_key(patient: dict[str, str]) -> str:
    pid = patient.get("PatientID", "")
    issuer = patient.get("IssuerOfPatientID", "")
    # PatientID is Type 2 (may be empty), but LMDB refuses empty keys (MDB_BAD_VALSIZE): an instance without one
    # failed its whole commit batch with 0xC211. Such instances share the key "^^" (no ID, no issuer).
    return f"{pid}^^{issuer}" if issuer or not pid else pid


# Bytes of a folded name kept in an idx_patientname key (LMDB keys are at most 511 bytes with the study UID).
NAME_KEY_BYTES_MAX = 192


def name_key(text: str) -> str:
    """The idx_patientname form of one PN component group (or of a query's literal prefix): case folded, trailing
    empty components dropped, NUL (our key separator) removed, cut to NAME_KEY_BYTES_MAX bytes on a character
    boundary."""
    folded = text.casefold().rstrip("^ ").replace(SEP, "")
    raw = folded.encode()
    if len(raw) <= NAME_KEY_BYTES_MAX:
        return folded
    return raw[:NAME_KEY_BYTES_MAX].decode("utf-8", "ignore")


def name_keys(person_name: str) -> list[str]:
    """The idx_patientname keys of a PN value: one per non-empty component group (alphabetic, ideographic,
    phonetic), so a query in any of the three finds it."""
    return sorted({key for group in person_name.split("=") if (key := name_key(group))})


class Outcome(Enum):
    STORED = "stored"  # new instance
    REPLACED = "replaced"  # overwrite policy, different bytes
    IDENTICAL = "identical"  # same SOP Instance UID, same bytes: no-op
    KEPT_FIRST = "kept-first"  # keep-first policy: new bytes dropped
    SUPERSEDED = "superseded"  # overwrite policy, but the stored version was received later: it stays
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


class StudyIndex(DeletionIndex):
    """The study index (module docstring); the environment, the record codecs, the container accounting and the
    tiering tables are in env.py, containers.py and tiers.py, deletes and holds in deletion.py."""

    # ---- write path -------------------------------------------------------------------------------

    def apply(self, entries: list[IndexEntry], policy: str,
              container_ends: dict[tuple[str, str], int] | None = None,
              sealed: list[tuple[str, str]] | None = None,
              copy_exists: Callable[[Copy], bool] | None = None,
              tier_of: Callable[[str], str] | None = None) -> list[ApplyResult]:
        """Index ``entries`` in one durable write transaction. ``container_ends`` gives, per (backend, container)
        written by this batch, the end of the last record written there: what recovery may not truncate.
        ``sealed`` lists containers whose seal this batch made durable. ``copy_exists`` (cheap, no read) lets an
        identical re-send of an instance whose every copy is lost name its own bytes instead, in this very
        transaction (so the repair is as durable as the answer). ``tier_of`` (`index rebuild --from-tier`: the
        tier of a backend name) keeps the copies of one blob found on several tiers: an identical entry on a tier
        where the blob has no copy yet adds its copy (one copy per tier, as the movers leave them)."""

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
            return [self._apply_one(txn, entry, entry.policy or policy, copy_exists, tier_of) for entry in entries]

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

    def _apply_one(self, txn: lmdb.Transaction, entry: IndexEntry, policy: str,
                   copy_exists: Callable[[Copy], bool] | None = None,
                   tier_of: Callable[[str], str] | None = None) -> ApplyResult:
        """One entry. Which version of a SOP instance wins is decided by receive time, never by commit order (two
        workers commit in either order, recovery re-applies records, `index rebuild` replays in receive order):
        keep-first keeps the earliest received, overwrite the latest received. Only ``reject`` answers by commit
        order (the first committed is kept; the other sender is told 0x0111)."""
        sop_uid = entry.header.sop_instance_uid
        conflict = self._level_conflict(txn, entry.header)
        if conflict:
            return ApplyResult(Outcome.CONFLICT, False, reason=conflict)
        tomb = txn.get(sop_uid.encode(), db=self.dbs["tombstones"])
        if tomb is not None and int(bytes(tomb)) > entry.received_ns:
            # Received before a delete of this instance committed, indexed (and acknowledged) after it: it stays, so
            # the tombstone moves back to it and `index rebuild` (which skips what was received before a tombstone)
            # keeps exactly what this index keeps (invariant 5).
            txn.put(sop_uid.encode(), str(entry.received_ns).encode(), db=self.dbs["tombstones"])
        existing = txn.get(sop_uid.encode(), db=self.dbs["uids"])
        outcome = Outcome.STORED
        if existing is not None:
            inst_key = bytes(existing[1:]).decode()
            old = self._instance(txn, inst_key)
            assert old is not None, f"uids names a missing instance {inst_key!r}"
            if old.digest == entry.digest:
                return self._identical(txn, inst_key, old, entry, copy_exists, tier_of)
            stored_is_newer = old.received_ns > entry.received_ns
            if policy == "reject":
                return ApplyResult(Outcome.REJECTED, False)
            if policy == "keep-first" and not stored_is_newer:
                return ApplyResult(Outcome.KEPT_FIRST, False)
            if policy == "overwrite" and stored_is_newer:
                return ApplyResult(Outcome.SUPERSEDED, False)
            self._remove_instance(txn, inst_key, old)
            outcome = Outcome.REPLACED
        blob_is_new = self._add_ref(txn, entry)
        self._insert_instance(txn, entry)
        return ApplyResult(outcome, blob_is_new)

    def _identical(self, txn: lmdb.Transaction, inst_key: str, old: InstanceRecord, entry: IndexEntry,
                   copy_exists: Callable[[Copy], bool] | None,
                   tier_of: Callable[[str], str] | None = None) -> ApplyResult:
        blob = self._blob(txn, entry.digest)
        assert blob is not None, f"an instance names a blob without a record: {entry.digest}"
        existing = list(blob.copies)
        if copy_exists is not None and all(c.state != COPY_OK or not copy_exists(c) for c in blob.copies):
            # Every stored copy is lost (its segment gone, or verify found it corrupt): a modality re-sending the
            # instance is how a site repairs that, and the bytes just made durable are named instead.
            for copy in blob.copies:
                self._count_copy(txn, entry.digest, copy, -1)
            blob.copies = [entry.copy]
            self._count_copy(txn, entry.digest, entry.copy, +1)
            self._put_blob(txn, entry.digest, blob)
            return ApplyResult(Outcome.IDENTICAL, True, existing, reason="repaired")
        if entry.received_ns < old.received_ns:
            # The same bytes, received earlier, committed later: the instance's provenance is the earliest
            # reception, and the earliest record is the one named (as a replay in receive order has it).
            old.received_ns, old.calling_ae = entry.received_ns, entry.calling_ae
            txn.put(inst_key.encode(), schema.encode(old), db=self.dbs["instances"])
            if self._name_earliest(txn, entry, blob):
                return ApplyResult(Outcome.IDENTICAL, True, existing)
        if tier_of is not None and tier_of(entry.copy.backend) not in {tier_of(c.backend) for c in blob.copies}:
            # A rebuild from the tiers: the same bytes on another tier (moved down, or recalled with the tape copy
            # kept) are a copy of their own, as the movers left them. Replayed in receive order, the first record of
            # each tier is the earliest received: the one a live index names too.
            blob.copies = [*blob.copies, entry.copy]
            self._count_copy(txn, entry.digest, entry.copy, +1)
            self._put_blob(txn, entry.digest, blob)
            return ApplyResult(Outcome.IDENTICAL, True, existing)
        return ApplyResult(Outcome.IDENTICAL, False, existing)

    def _add_ref(self, txn: lmdb.Transaction, entry: IndexEntry) -> bool:
        blob = self._blob(txn, entry.digest)
        if blob is None:
            self._put_blob(txn, entry.digest, BlobRecord(entry.size, 1, [entry.copy]))
            self._count_copy(txn, entry.digest, entry.copy, +1)
            return True
        blob.refs += 1  # identical bytes are stored once: one record is named, the others stay dead
        if self._name_earliest(txn, entry, blob):
            return True
        self._put_blob(txn, entry.digest, blob)
        return False

    def _name_earliest(self, txn: lmdb.Transaction, entry: IndexEntry, blob: BlobRecord) -> bool:
        """Name ``entry``'s record instead of a copy received later, and store the blob record if so.

        Which record is named must not depend on commit order (two workers may commit identical bytes in either
        order), or `index rebuild`, which replays records in receive order, would name another one: the earliest
        received record is the one named (of the same backend, or of any while the blob has one copy: two online
        volumes are alternatives, a nearline copy beside an online one is not)."""
        new = entry.copy
        for i, cur in enumerate(blob.copies):
            if (cur.backend == new.backend or len(blob.copies) == 1) and (new.received_ns, new.location) < (
                    cur.received_ns, cur.location):
                self._replace_copy(txn, entry.digest, blob, i, new)
                return True
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
        study.count_in(entry.size, {**h.study, "PatientID": h.patient.get("PatientID", ""),
                                    "PatientName": h.patient.get("PatientName", "")}, t)
        modality = h.series.get("Modality", "")
        if modality and modality not in study.modalities:
            study.modalities = sorted([*study.modalities, modality])
        sop_class = h.sop_class_uid
        study.sop_classes[sop_class] = study.sop_classes.get(sop_class, 0) + 1
        self._put_level(txn, "studies", study_key, study)
        # Secondary keys change only when the study's PatientID, AccessionNumber, StudyDate, PatientName or
        # modalities do: rewriting them for every instance cost LMDB operations per instance for nothing.
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

    @staticmethod
    def _secondary(study_key: str, study: LevelRecord) -> list[tuple[str, str]]:
        study_uid = study_key.split(SEP, 1)[1]
        attrs = study.attrs
        rows = [
            ("idx_patientid", f"{attrs.get('PatientID', '')}{SEP}{study_uid}"),
            ("idx_accession", f"{attrs.get('AccessionNumber', '')}{SEP}{study_uid}"),
            ("idx_studydate", f"{attrs.get('StudyDate', '')}{SEP}{study_uid}"),
            *(("idx_patientname", f"{key}{SEP}{study_uid}") for key in name_keys(attrs.get("PatientName", ""))),
            *(("idx_modality", f"{modality}{SEP}{study_uid}") for modality in study.modalities),
        ]
        # LMDB refuses keys over 511 bytes, and one such key would fail the whole transaction (a group commit, a
        # recovery replay, a rebuild, the schema upgrade). Ingest refuses such values (records._check_key_sizes);
        # an instance indexed before a check existed is left out of that one secondary index instead.
        return [(db, key) for db, key in rows if len(key.encode()) <= MAX_KEY_BYTES]

    def _upgrade(self, version: bytes) -> None:
        def body(txn: lmdb.Transaction) -> None:
            # The version read before this write transaction may be stale: another process (serve and `appliance
            # hold` started together) can have upgraded the index meanwhile. Decide on what this transaction sees.
            seen = txn.get(b"schema", db=self.dbs["meta"])
            now = bytes(seen) if seen is not None else version
            if now == b"2":  # 2 -> 3 writes the current version too: the tiering tables start empty
                upgrade_from_2(self.dbs, txn, self._secondary)
            elif now == b"3":
                upgrade_from_3(self.dbs, txn)
            elif now == b"4":
                upgrade_from_4(self.dbs, txn)

        self._write(body)

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
        old_secondary = self._secondary(study_key, study)
        sop_class = old.attrs.get("SOPClassUID", "")
        if study.sop_classes.get(sop_class, 0) > 1:
            study.sop_classes[sop_class] -= 1
        else:
            study.sop_classes.pop(sop_class, None)
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
            for db, key in old_secondary:
                txn.delete(key.encode(), db=self.dbs[db])
            txn.delete(study_key.encode(), db=self.dbs["studies"])
            txn.delete(study_uid.encode(), db=uids)
            patient.children -= 1
        else:
            self._put_level(txn, "studies", study_key, study)
            new_secondary = self._secondary(study_key, study)
            if new_secondary != old_secondary:  # a modality left the study
                for db, key in old_secondary:
                    txn.delete(key.encode(), db=self.dbs[db])
                for db, key in new_secondary:
                    txn.put(key.encode(), study_key.encode(), db=self.dbs[db])
        if patient.instances <= 0:
            txn.delete(pk.encode(), db=self.dbs["patients"])
        else:
            self._put_level(txn, "patients", pk, patient)
        self._drop_ref(txn, old.digest)

    # ---- read path --------------------------------------------------------------------------------

    def _decode_level(self, level: str, raw: bytes) -> dict[str, Any]:
        if level == "instances":
            return schema.decode(InstanceRecord, raw).public()
        return schema.decode(LevelRecord, raw).public(level)

    def items(self, level: str, prefix: str = "") -> list[tuple[str, dict[str, Any]]]:
        """Records of one level whose key starts with ``prefix`` (e.g. a study key + NUL for its series), as the
        flat dicts the CLI shows."""
        with self.env.begin() as txn:
            return [(k, self._decode_level(level, v)) for k, v in self._scan(txn, level, prefix)]

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

    def blobs(self, batch: int = 1024) -> Iterator[tuple[str, BlobRecord]]:
        """Every blob record, read ``batch`` at a time in short read transactions: a long walk (verify re-hashing
        terabytes) must not pin LMDB's old pages for hours while ingest goes on."""
        after = b""
        while True:
            with self.env.begin() as txn:
                cursor = txn.cursor(db=self.dbs["blobs"])
                found = cursor.set_range(after) if after else cursor.first()
                rows: list[tuple[bytes, BlobRecord]] = []
                while found and len(rows) < batch:
                    key = bytes(cursor.key())
                    if key != after:
                        rows.append((key, schema.decode(BlobRecord, cursor.value())))
                    found = cursor.next()
            if not rows:
                return
            for key, blob in rows:
                yield key.decode(), blob
            after = rows[-1][0]

    def counts(self) -> dict[str, int]:
        with self.env.begin() as txn:
            return {level: txn.stat(self.dbs[level])["entries"] for level in LEVELS}

    def dump(self, verification: bool = False) -> dict[str, list[tuple[str, Any]]]:
        """Every table as sorted (key, value) rows: what `index rebuild` must reproduce. What `verify` recorded
        per copy (state, time) is history, not content: left out unless ``verification``."""
        typed: dict[str, type] = {"instances": InstanceRecord, "blobs": BlobRecord, "containers": ContainerRecord,
                                  "patients": LevelRecord, "studies": LevelRecord, "series": LevelRecord,
                                  "placement": StudyPlacement, "moves": MoveRecord, "recalls": RecallRecord,
                                  "holds": HoldRecord}
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
                        if name in ("patients", "studies", "series"):
                            # Bookkeeping of which reception the attributes came from: an identical re-send received
                            # earlier but committed later cannot lower it, and the attributes it chose are equal.
                            del decoded["latest_ns"]
                        if name == "placement" and not verification:
                            # Last access is history too (retrieve, export): a study read but never moved has
                            # the placement a rebuild gives it, none.
                            del decoded["last_access_ns"]
                            if decoded == {"tier": schema.ONLINE_TIER, "since_ns": 0}:
                                continue
                    else:
                        decoded = bytes(value).decode()
                    rows.append((bytes(key).decode(), decoded))
                out[name] = rows
            return out
