"""Which instances a C-MOVE or C-GET identifier names (PS3.4 C.4.2.2.1, C.4.3.2: baseline hierarchical retrieve).

Patient Root: PATIENT (Patient ID), STUDY (+ Study Instance UID), SERIES (+ Series Instance UID), IMAGE (+ SOP
Instance UID). Study Root: the same without the PATIENT level. The unique key of the retrieve level is required
and may be a list of UIDs (list of UID matching); a unique key of a level above, when present, must be a single
value and must agree with what is stored (a Series Instance UID under another study matches nothing). A missing
unique key of a level above is tolerated: a UID names its level alone, and DCMTK movescu, Orthanc and most
viewers leave Patient ID out of a Patient Root STUDY retrieve.

Every match is found through the index's ``uids`` table or its Patient ID index (``StudyIndex.lookup``,
``instances_under``, ``studies_by``): a retrieve never scans a whole level.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from appliance import errors
from appliance.dicom import uids
from appliance.index.db import StudyIndex
from appliance.index.env import SEP
from appliance.index.records import DEFLATED, EXPLICIT_BE, IMPLICIT_LE, valid_uid
from appliance.index.schema import OFFLINE, InstanceRecord

log = logging.getLogger(__name__)

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
# The unique key of each level, by keyword and tag.
UNIQUE_KEYS = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
               "IMAGE": "SOPInstanceUID"}
PATIENT_ROOT = frozenset({uids.PATIENT_ROOT_MOVE, uids.PATIENT_ROOT_GET})
STUDY_ROOT = frozenset({uids.STUDY_ROOT_MOVE, uids.STUDY_ROOT_GET})
# (0008,0058) Failed SOP Instance UID List: a UI element's value is at most 65534 bytes in Explicit VR (16-bit
# length), so the list in a final response is cut there (the counts stay exact).
FAILED_LIST_BYTES_MAX = 65534


class RetrieveRefused(Exception):
    """The retrieve is refused before any sub-operation: ``status`` and ``comment`` go in the final response."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status, self.comment = status, comment


@dataclass(frozen=True, slots=True)
class Match:
    """One instance to send: what the sub-operation needs, from its index record."""

    sop_class_uid: str
    sop_instance_uid: str
    digest: str
    transfer_syntax: str
    size: int
    availability: str
    study_key: str = ""  # pk NUL study UID: what a recall is requested for, and last access recorded on


def parse_identifier(data: bytes, transfer_syntax: str) -> Dataset:
    """The identifier as a pydicom Dataset, parsed completely (a broken element raises here, not later)."""
    if transfer_syntax == DEFLATED:
        raise RetrieveRefused(errors.UNABLE_TO_PROCESS, "deflated identifiers are not supported")
    try:
        ds = read_dataset(io.BytesIO(data), transfer_syntax == IMPLICIT_LE, transfer_syntax != EXPLICIT_BE)
        # pydicom reads leniently: a value cut short by the end of the data comes back shorter, and bytes that are
        # no element at all come back as an empty dataset. Both are a malformed identifier here.
        if data and not len(ds):
            raise ValueError("no element")
        for tag in ds.keys():
            raw = ds.get_item(tag)
            if isinstance(raw, RawDataElement) and raw.length != 0xFFFFFFFF and raw.value_tell + raw.length > len(data):
                raise ValueError("an element's value runs past the end")
        for _elem in ds.iterall():  # pydicom parses lazily: make every element's value be read now
            pass
        return ds
    except (InvalidDicomError, ValueError, KeyError, TypeError, EOFError, OverflowError, NotImplementedError) as exc:
        raise RetrieveRefused(errors.UNABLE_TO_PROCESS, f"identifier cannot be parsed: {type(exc).__name__}") from None


def _text(ds: Dataset, keyword: str) -> str | None:
    """The element's value as one string, None when absent or empty."""
    if keyword not in ds:
        return None
    value = ds[keyword].value
    if value is None or value == "":
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str | int | float) and hasattr(value, "__iter__"):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _uid_list(ds: Dataset, keyword: str, level: str, at_retrieve_level: bool) -> list[str] | None:
    text = _text(ds, keyword)
    if text is None:
        return None
    values = [v.strip().rstrip("\x00") for v in text.split("\\")]
    if not at_retrieve_level and len(values) > 1:
        raise RetrieveRefused(errors.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                              f"{keyword} above the retrieve level must be a single value")
    if any(not valid_uid(v) for v in values):
        raise RetrieveRefused(errors.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"{keyword} is not a UID (list)")
    return values


def select(index: StudyIndex, sop_class: str, ds: Dataset, matches_max: int) -> list[Match]:
    """The instances the identifier ``ds`` of a C-MOVE/C-GET on ``sop_class`` names, in index order (patient,
    study, series, SOP Instance UID); an empty list when nothing matches. Raises RetrieveRefused."""
    level = (_text(ds, "QueryRetrieveLevel") or "").upper()
    patient_root = sop_class in PATIENT_ROOT
    allowed = LEVELS if patient_root else LEVELS[1:]
    if level not in allowed:
        raise RetrieveRefused(errors.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                              f"Query/Retrieve Level must be one of {', '.join(allowed)}")
    depth = LEVELS.index(level)
    patient_id = _text(ds, "PatientID")
    if patient_id is not None and "\\" in patient_id:
        raise RetrieveRefused(errors.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "PatientID must be a single value")
    issuer = _text(ds, "IssuerOfPatientID") if patient_id is not None else None
    keys: dict[str, list[str] | None] = {}
    for lvl in LEVELS[1 : depth + 1]:
        keys[lvl] = _uid_list(ds, UNIQUE_KEYS[lvl], lvl, lvl == level)
    if level == "PATIENT":
        if patient_id is None:
            raise RetrieveRefused(errors.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "PATIENT level needs a PatientID")
    elif keys[level] is None:
        raise RetrieveRefused(errors.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"{level} level needs a {UNIQUE_KEYS[level]}")

    found: list[Match] = []

    def add(records: list[tuple[str, InstanceRecord]]) -> None:
        for key, rec in records:
            if not _agrees(key, patient_id, issuer, keys):
                continue
            found.append(_match(key, rec))
            if len(found) > matches_max:
                raise RetrieveRefused(errors.OUT_OF_RESOURCES_MATCHES,
                                      f"more than {matches_max} instances match (retrieve.matches_max)")

    if level == "PATIENT":
        assert patient_id is not None
        for study_key in index.studies_by("idx_patientid", patient_id):
            add(index.instances_under(study_key.split(SEP, 1)[1]))
    else:
        seen: set[str] = set()
        for uid in keys[level] or ():
            if uid in seen:
                continue
            seen.add(uid)
            found_level = index.lookup(uid)
            if found_level is None or found_level[0] != _DB_OF[level]:
                continue  # unknown, or a UID of another level: matches nothing
            add(index.instances_under(uid))
    return found


_DB_OF = {"STUDY": "studies", "SERIES": "series", "IMAGE": "instances"}


def _agrees(key: str, patient_id: str | None, issuer: str | None, keys: dict[str, list[str] | None]) -> bool:
    """Does the instance at index ``key`` (pk NUL study NUL series NUL sop) agree with the unique keys given for
    the levels above the retrieve level? The patient key is the PatientID, with ``^^issuer`` when the instance
    had an Issuer of Patient ID (index/db.py patient_key): an identifier's issuer narrows, its absence does not."""
    pk, study, series, _sop = key.split(SEP)
    if patient_id is not None:
        if issuer is not None and pk != f"{patient_id}^^{issuer}":
            return False
        if pk != patient_id and not pk.startswith(patient_id + "^^"):
            return False
    for lvl, value in (("STUDY", study), ("SERIES", series)):
        wanted = keys.get(lvl)
        if wanted is not None and value not in wanted:
            return False
    return True


def _match(key: str, rec: InstanceRecord) -> Match:
    pk, study, _series, sop_uid = key.split(SEP)
    return Match(rec.attrs.get("SOPClassUID", ""), sop_uid, rec.digest, rec.transfer_syntax, rec.size,
                 rec.availability, pk + SEP + study)


# How often a retrieve waiting for a recall looks at the index (one instance per study: a short read).
RECALL_POLL_S = 0.5
ON_TAPE = "study is on tape; recall queued"  # the Error Comment (64 characters at most)


def offline_studies(matches: list[Match]) -> dict[str, str]:
    """study key -> the SOP Instance UID of one of its offline instances (a switch changes a whole study at once,
    so one instance tells when its recall is done)."""
    out: dict[str, str] = {}
    for m in matches:
        if m.availability == OFFLINE and m.study_key and m.study_key not in out:
            out[m.study_key] = m.sop_instance_uid
    return out


async def await_recalls(index: StudyIndex, matches: list[Match], by: str, wait_s: float, queue_max: int,
                        cancelled: Callable[[], bool], run: Callable[..., Awaitable[Any]]) -> list[Match]:
    """Queue a recall for every study of ``matches`` with offline instances, and wait up to ``wait_s`` for them to
    come online, polling the index every RECALL_POLL_S (the event loop is never blocked: ``run`` runs the index
    reads on a thread). Returns the matches with their availability as it is at the end. Raises RetrieveRefused
    (0xA702, ON_TAPE) when every instance is still offline then: the recalls stay queued, a later retrieve finds
    the study online. Instances still offline when others are online fail one by one (BlobStore says Offline)."""
    waiting = offline_studies(matches)
    if not waiting:
        return matches
    for study_key in waiting:
        if not await run(index.request_recall, study_key, by, queue_max):
            raise RetrieveRefused(errors.OUT_OF_RESOURCES_SUB_OPERATIONS, "study is on tape; recall queue full")
    log.info("retrieve waits up to %.0fs for the recall of %d stud(ies)", wait_s, len(waiting))
    deadline = time.monotonic() + wait_s
    while waiting and not cancelled():
        done = [key for key, sop in waiting.items()
                if all(rec.availability != OFFLINE for _k, rec in await run(index.instances_under, sop))]
        for key in done:
            del waiting[key]
        left = deadline - time.monotonic()
        if not waiting or left <= 0:
            break
        await asyncio.sleep(min(RECALL_POLL_S, left))
    if cancelled():
        return matches  # C-CANCEL (or the association ended) while waiting: the caller answers Cancel
    fresh: dict[str, str] = {}
    for study_key in {m.study_key for m in matches if m.availability == OFFLINE}:
        for key, rec in await run(index.instances_under, study_key.split(SEP, 1)[1]):
            fresh[key.rsplit(SEP, 1)[1]] = rec.availability
    matches = [dataclasses.replace(m, availability=fresh.get(m.sop_instance_uid, m.availability)) for m in matches]
    if all(m.availability == OFFLINE for m in matches):
        raise RetrieveRefused(errors.OUT_OF_RESOURCES_SUB_OPERATIONS, ON_TAPE)
    return matches


def failed_identifier(failed: list[str], transfer_syntax: str) -> bytes:
    """The final response's identifier: (0008,0058) Failed SOP Instance UID List, encoded in the request's
    transfer syntax. Cut at FAILED_LIST_BYTES_MAX (the counts in the command say how many failed)."""
    kept: list[str] = []
    length = 0
    for uid in failed:
        length += len(uid) + 1
        if length > FAILED_LIST_BYTES_MAX:
            break
        kept.append(uid)
    ds = Dataset()
    ds.FailedSOPInstanceUIDList = kept if len(kept) != 1 else kept[0]
    out = DicomBytesIO()
    out.is_little_endian = transfer_syntax != EXPLICIT_BE
    out.is_implicit_VR = transfer_syntax == IMPLICIT_LE
    write_dataset(out, ds)
    return out.getvalue()
