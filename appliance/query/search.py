"""The C-FIND search over the LMDB index: a plan that reads candidates from the most selective index the query
can use, and a resumable walk that examines at most ``batch_rows_max`` index rows per short read transaction
(the handler runs each batch in a thread, so the event loop never waits for LMDB and ingest never waits for a
long reader).

Plans, most selective first (every candidate is still checked against every key, so a plan only has to be a
superset of the matches):

========  ================================================================================================
level     candidates from
========  ================================================================================================
PATIENT   a PatientID (patients, prefix) | a name with a literal prefix (idx_patientname -> its patient) |
          every patient
STUDY     Study Instance UID(s) (uids) | AccessionNumber | PatientID (exact or literal prefix) | PatientName
          (literal prefix, idx_patientname) | StudyDate (single or range, idx_studydate) | ModalitiesInStudy
          without wildcards (idx_modality) | every study
SERIES    Series Instance UID(s) (uids) | the series of the study (a prefix of the series table)
IMAGE     SOP Instance UID(s) (uids) | the instances of the series (a prefix of the instance table)
========  ================================================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lmdb

from appliance.index import schema
from appliance.index.db import NAME_KEY_BYTES_MAX, StudyIndex, name_key
from appliance.index.records import PATIENT_ATTRS, SERIES_ATTRS, STUDY_ATTRS
from appliance.index.schema import ONLINE, InstanceRecord, LevelRecord
from appliance.query.identifier import LEVELS, Query
from appliance.query.matching import Options, Predicate, combined_date_time, compile_key, literal_prefix, normalize_date

SEP = "\x00"
_AVAILABILITY_ORDER = {"ONLINE": 0, "NEARLINE": 1, "OFFLINE": 2}
_LEVEL_DB = {"PATIENT": "patients", "STUDY": "studies", "SERIES": "series", "IMAGE": "instances"}
_UID_LETTER = {"STUDY": b"S", "SERIES": b"R", "IMAGE": b"I"}
_INHERITED = (("PATIENT", frozenset(PATIENT_ATTRS) | {"PatientName", "PatientID"}), ("STUDY", frozenset(STUDY_ATTRS)),
              ("SERIES", frozenset(SERIES_ATTRS)))


@dataclass(frozen=True)
class SearchOptions:
    retrieve_ae_title: str
    batch_rows_max: int = 512
    case_sensitive_person_names: bool = False
    combined_date_time: bool = True


@dataclass
class Span:
    """Rows of one LMDB table with keys in [start, end) (end None: to the table's end). ``via``: how a row names a
    candidate of the query level: "key" (the row's key is it), "value" (the row's value is a study key), "uid"
    (a uids row: level letter + key), "patient" (the value is a study key; its patient is the candidate)."""

    db: str
    start: bytes
    end: bytes | None
    via: str


def prefix_span(db: str, prefix: str, via: str) -> Span:
    raw = prefix.encode()
    return Span(db, raw, raw + b"\xff" if raw else None, via)  # no UTF-8 key byte is 0xFF


@dataclass
class Plan:
    spans: list[Span]
    dedupe: bool = False  # several rows may name one candidate (names per component group, modalities)
    description: str = ""


class Search:
    """One C-FIND's walk. ``next_batch`` (in a worker thread) returns the next matches and whether the walk is
    done."""

    def __init__(self, index: StudyIndex, query: Query, options: SearchOptions) -> None:
        self.index = index
        self.query = query
        self.options = options
        self.level = query.level
        self.requested = {k.keyword for k in query.keys if k.keyword}
        self.predicates, self.unsupported, self.combined = self._compile()
        self.plan = self._plan()
        self.span_index = 0
        self.after: bytes | None = None  # last row key read in the current span
        self.seen: set[str] = set()
        self.rows_examined = 0

    # ---- compiling ---------------------------------------------------------------------------------------

    def _compile(self) -> tuple[list[tuple[str, Predicate]], bool, Callable[[str, str], bool] | None]:
        query, options = self.query, Options(self.options.case_sensitive_person_names)
        # What a record of this level carries: its own keys and the stored attributes of the levels above (a
        # SERIES record holds its study's and patient's), so any of them can be matched.
        held = set(query.level_keys(self.level))
        for upper, attributes in _INHERITED:
            if LEVELS.index(upper) < LEVELS.index(self.level):
                held |= attributes
        combined = None
        skip: set[str] = set()
        if self.options.combined_date_time and self.level == "STUDY":
            combined = combined_date_time(query.value("StudyDate"), query.value("StudyTime"))
            if combined is not None:
                skip = {"StudyDate", "StudyTime"}
        predicates: list[tuple[str, Predicate]] = []
        unsupported = False
        for key in query.keys:
            if key.sequence:
                unsupported = unsupported or bool(key.value)
                continue
            if key.keyword in skip:
                continue
            predicate = compile_key(key.vr, key.value, options)
            if predicate is None:
                continue
            if key.keyword in held and key.keyword not in ("RetrieveAETitle", "InstanceAvailability"):
                predicates.append((key.keyword, predicate))
            elif key.keyword == "InstanceAvailability":
                predicates.append((key.keyword, predicate))
            else:
                unsupported = True  # a value we cannot match on: the matches come with 0xFF01
        return predicates, unsupported, combined

    # ---- planning ----------------------------------------------------------------------------------------

    def _uid_spans(self, keyword: str, level: str) -> list[Span] | None:
        value = self.query.value(keyword)
        if not value or "*" in value or "?" in value:
            return None
        uids = sorted({u.strip() for u in value.split("\\") if u.strip()})
        return [Span("uids", uid.encode(), uid.encode() + b"\x00", "uid") for uid in uids]

    def _index_prefix(self, keyword: str) -> str | None:
        """The literal part of a text key usable as a secondary-index prefix, None when it starts with a wildcard
        or is a list."""
        value = self.query.value(keyword)
        if not value or "\\" in value:
            return None
        prefix = literal_prefix(value)
        if not prefix:
            return None
        return prefix + SEP if prefix == value else prefix

    def _name_prefix(self) -> str | None:
        value = self.query.value("PatientName")
        if not value or "\\" in value:
            return None
        prefix = literal_prefix(value).split("=", 1)[0]
        if not prefix:
            return None
        if prefix == value:
            return name_key(value) + SEP
        folded = prefix.casefold().replace(SEP, "")
        while len(folded.encode()) > NAME_KEY_BYTES_MAX:
            folded = folded[:-1]
        return folded

    def _date_span(self, db: str, keyword: str) -> Span | None:
        value = self.query.value(keyword)
        if not value or "\\" in value:
            return None
        lo, dash, hi = value.partition("-")
        if not dash:
            return prefix_span(db, normalize_date(value) + SEP, "value")
        end = (normalize_date(hi) + "\x01").encode() if hi.strip() else None
        return Span(db, normalize_date(lo).encode(), end, "value")

    def _plan(self) -> Plan:
        level, q = self.level, self.query
        if level == "PATIENT":
            pid = self._index_prefix("PatientID")
            if pid is not None:
                return Plan([prefix_span("patients", pid.rstrip(SEP), "key")], description="patient id")
            name = self._name_prefix()
            if name is not None:
                return Plan([prefix_span("idx_patientname", name, "patient")], dedupe=True, description="name")
            return Plan([prefix_span("patients", "", "key")], description="all patients")
        if level == "STUDY":
            spans = self._uid_spans("StudyInstanceUID", "STUDY")
            if spans:
                return Plan(spans, description="study uids")
            for keyword, db in (("AccessionNumber", "idx_accession"), ("PatientID", "idx_patientid")):
                prefix = self._index_prefix(keyword)
                if prefix is not None:
                    return Plan([prefix_span(db, prefix, "value")], description=keyword)
            name = self._name_prefix()
            if name is not None:
                return Plan([prefix_span("idx_patientname", name, "value")], dedupe=True, description="name")
            date = self._date_span("idx_studydate", "StudyDate")
            if date is not None:
                return Plan([date], description="study date")
            modalities = q.value("ModalitiesInStudy")
            if modalities and "*" not in modalities and "?" not in modalities:
                values = sorted({m.strip() for m in modalities.split("\\") if m.strip()})
                return Plan([prefix_span("idx_modality", m + SEP, "value") for m in values], dedupe=True,
                            description="modality")
            return Plan([prefix_span("studies", "", "key")], description="all studies")
        own = "SeriesInstanceUID" if level == "SERIES" else "SOPInstanceUID"
        spans = self._uid_spans(own, level)
        if spans:
            return Plan(spans, description=f"{own} list")
        parent = "StudyInstanceUID" if level == "SERIES" else "SeriesInstanceUID"
        parent_level = "STUDY" if level == "SERIES" else "SERIES"
        parents: list[Span] = []
        with self.index.env.begin() as txn:
            for span in self._uid_spans(parent, parent_level) or []:
                found = txn.get(span.start, db=self.index.dbs["uids"])
                if found is not None and bytes(found[:1]) == _UID_LETTER[parent_level]:
                    parents.append(prefix_span(_LEVEL_DB[level], bytes(found[1:]).decode() + SEP, "key"))
        return Plan(parents, description=f"under {parent}")

    # ---- walking -----------------------------------------------------------------------------------------

    def next_batch(self) -> tuple[list[dict[str, str]], bool]:
        """Examine up to batch_rows_max rows in one read transaction: (matching records, done)."""
        matches: list[dict[str, str]] = []
        budget = self.options.batch_rows_max
        with self.index.env.begin(buffers=False) as txn:
            while budget > 0 and self.span_index < len(self.plan.spans):
                span = self.plan.spans[self.span_index]
                rows, finished = self._read_span(txn, span, budget)
                budget -= max(len(rows), 1)
                self.rows_examined += len(rows)
                for key, value in rows:
                    candidate = self._candidate(span, key, value)
                    if candidate is None:
                        continue
                    if self.plan.dedupe:
                        if candidate in self.seen:
                            continue
                        self.seen.add(candidate)
                    record = self._record(txn, candidate)
                    if record is not None and self._matches(record):
                        matches.append(record)
                if finished:
                    self.span_index += 1
                    self.after = None
        return matches, self.span_index >= len(self.plan.spans)

    def _read_span(self, txn: lmdb.Transaction, span: Span, limit: int) -> tuple[list[tuple[bytes, bytes]], bool]:
        cursor = txn.cursor(db=self.index.dbs[span.db])
        found = cursor.set_range(self.after if self.after is not None else span.start)
        rows: list[tuple[bytes, bytes]] = []
        while found:
            key = bytes(cursor.key())
            if span.end is not None and key >= span.end:
                return rows, True
            if key != self.after:
                if len(rows) >= limit:
                    return rows, False
                rows.append((key, bytes(cursor.value())))
                self.after = key
            found = cursor.next()
        return rows, True

    def _candidate(self, span: Span, key: bytes, value: bytes) -> str | None:
        if span.via == "key":
            return key.decode()
        if span.via == "value":
            return value.decode()
        if span.via == "patient":
            return value.decode().split(SEP, 1)[0]
        letter = _UID_LETTER.get(self.level)
        return value[1:].decode() if value[:1] == letter else None

    def _matches(self, record: dict[str, str]) -> bool:
        if self.combined is not None and not self.combined(record.get("StudyDate", ""), record.get("StudyTime", "")):
            return False
        return all(predicate(record.get(keyword, "")) for keyword, predicate in self.predicates)

    # ---- records -----------------------------------------------------------------------------------------

    def _level(self, txn: lmdb.Transaction, db: str, key: str) -> LevelRecord | None:
        raw = txn.get(key.encode(), db=self.index.dbs[db])
        return None if raw is None else schema.decode(LevelRecord, raw)

    def _record(self, txn: lmdb.Transaction, key: str) -> dict[str, str] | None:
        """The flat record of one candidate: its attributes, those of its parents the level's matching and return
        keys need, and the computed ones requested."""
        level, wanted = self.level, self.requested
        out: dict[str, str] = {"RetrieveAETitle": self.options.retrieve_ae_title}
        parts = key.split(SEP)
        patient = self._level(txn, "patients", parts[0])
        if patient is None:
            return None
        out.update(patient.attrs)
        if level == "PATIENT":
            out["NumberOfPatientRelatedStudies"] = str(patient.children)
            out["NumberOfPatientRelatedInstances"] = str(patient.instances)
            if "NumberOfPatientRelatedSeries" in wanted:
                out["NumberOfPatientRelatedSeries"] = str(self._series_of_patient(txn, parts[0]))
            return self._availability(txn, key, out)
        study = self._level(txn, "studies", SEP.join(parts[:2]))
        if study is None:
            return None
        out.update(study.attrs)
        if level == "STUDY":
            out["NumberOfStudyRelatedSeries"] = str(study.children)
            out["NumberOfStudyRelatedInstances"] = str(study.instances)
            out["ModalitiesInStudy"] = "\\".join(study.modalities)
            out["SOPClassesInStudy"] = "\\".join(sorted(study.sop_classes))
            if not self.query.patient_root:
                out["NumberOfPatientRelatedStudies"] = str(patient.children)
                out["NumberOfPatientRelatedInstances"] = str(patient.instances)
                if "NumberOfPatientRelatedSeries" in wanted:
                    out["NumberOfPatientRelatedSeries"] = str(self._series_of_patient(txn, parts[0]))
            return self._availability(txn, key, out)
        series = self._level(txn, "series", SEP.join(parts[:3]))
        if series is None:
            return None
        out.update(series.attrs)
        if level == "SERIES":
            out["NumberOfSeriesRelatedInstances"] = str(series.instances)
            return self._availability(txn, key, out)
        raw = txn.get(key.encode(), db=self.index.dbs["instances"])
        if raw is None:
            return None
        instance = schema.decode(InstanceRecord, raw)
        out.update(instance.attrs)
        out["InstanceAvailability"] = instance.availability
        return out

    def _series_of_patient(self, txn: lmdb.Transaction, pk: str) -> int:
        cursor = txn.cursor(db=self.index.dbs["studies"])
        prefix = (pk + SEP).encode()
        total = 0
        found = cursor.set_range(prefix)
        while found and bytes(cursor.key()).startswith(prefix):
            total += schema.decode(LevelRecord, cursor.value()).children
            found = cursor.next()
        return total

    def _availability(self, txn: lmdb.Transaction, key: str, out: dict[str, str]) -> dict[str, str]:
        """Instance Availability of a patient, study or series: the least available of its instances. It walks the
        instances, so only when the key is requested (documented in docs/query.md)."""
        if "InstanceAvailability" not in self.requested:
            return out
        worst = ONLINE
        cursor = txn.cursor(db=self.index.dbs["instances"])
        prefix = (key + SEP).encode()
        found = cursor.set_range(prefix)
        while found and bytes(cursor.key()).startswith(prefix):
            state = schema.decode(InstanceRecord, cursor.value()).availability
            if _AVAILABILITY_ORDER.get(state, 0) > _AVAILABILITY_ORDER[worst]:
                worst = state
            found = cursor.next()
        out["InstanceAvailability"] = worst
        return out


def describe(search: Search) -> dict[str, Any]:
    """For debug logs and the benchmark: which plan, how many rows read (no values: they may be PHI)."""
    return {"level": search.level, "plan": search.plan.description, "spans": len(search.plan.spans),
            "rows_examined": search.rows_examined}
