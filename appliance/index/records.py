"""What the index stores per level, and how it is read from a dataset's header.

Only the attributes listed here are parsed, and parsing stops before group 0x0029, so the pixel data of a
1 GiB multi-frame instance is never looked at. Values are kept as DICOM strings (dates as YYYYMMDD, names
as PN strings decoded with the dataset's Specific Character Set).
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.filereader import dcmread, read_dataset
from pydicom.tag import BaseTag, Tag

from appliance.errors import CannotUnderstand, MissingUIDs

PATIENT_ATTRS = {
    "PatientID": 0x00100020,
    "IssuerOfPatientID": 0x00100021,
    "PatientName": 0x00100010,
    "PatientBirthDate": 0x00100030,
    "PatientSex": 0x00100040,
}
STUDY_ATTRS = {
    "StudyInstanceUID": 0x0020000D,
    "StudyDate": 0x00080020,
    "StudyTime": 0x00080030,
    "AccessionNumber": 0x00080050,
    "StudyID": 0x00200010,
    "StudyDescription": 0x00081030,
    "ReferringPhysicianName": 0x00080090,
}
SERIES_ATTRS = {
    "SeriesInstanceUID": 0x0020000E,
    "Modality": 0x00080060,
    "SeriesNumber": 0x00200011,
    "SeriesDescription": 0x0008103E,
    "BodyPartExamined": 0x00180015,
    "SeriesDate": 0x00080021,
    "SeriesTime": 0x00080031,
}
INSTANCE_ATTRS = {
    "SOPInstanceUID": 0x00080018,
    "SOPClassUID": 0x00080016,
    "InstanceNumber": 0x00200013,
    "NumberOfFrames": 0x00280008,
    "Rows": 0x00280010,
    "Columns": 0x00280011,
    "ContentDate": 0x00080023,
}
ALL_ATTRS = {**PATIENT_ATTRS, **STUDY_ATTRS, **SERIES_ATTRS, **INSTANCE_ATTRS}
_SPECIFIC_TAGS: list[BaseTag | int] = [Tag(t) for t in ALL_ATTRS.values()] + [Tag(0x00080005)]
_LAST_GROUP_NEEDED = 0x0028FFFF

DEFLATED = "1.2.840.10008.1.2.1.99"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"


@dataclass
class Header:
    patient: dict[str, str] = field(default_factory=dict)
    study: dict[str, str] = field(default_factory=dict)
    series: dict[str, str] = field(default_factory=dict)
    instance: dict[str, str] = field(default_factory=dict)

    @property
    def sop_instance_uid(self) -> str:
        return self.instance.get("SOPInstanceUID", "")

    @property
    def sop_class_uid(self) -> str:
        return self.instance.get("SOPClassUID", "")


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(_text(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip("\x00 ")
    return str(value).strip("\x00 ")


def _from_dataset(ds: Any) -> Header:
    header = Header()
    for level, attrs in (
        (header.patient, PATIENT_ATTRS),
        (header.study, STUDY_ATTRS),
        (header.series, SERIES_ATTRS),
        (header.instance, INSTANCE_ATTRS),
    ):
        for keyword, tag in attrs.items():
            if tag in ds:
                try:
                    text = _text(ds[tag].value)
                except Exception:  # a malformed optional value must not refuse the instance
                    text = ""
                if text:
                    level[keyword] = text
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        level = header.study if keyword == "StudyInstanceUID" else header.series
        if not level.get(keyword):
            raise MissingUIDs(f"dataset has no {keyword}")
    if not header.sop_instance_uid or not header.sop_class_uid:
        raise MissingUIDs("dataset has no SOP Instance UID or SOP Class UID")
    return header


class _Stop:
    """stop_when callback that remembers whether parsing reached the end of what the index needs."""

    def __init__(self) -> None:
        self.reached = False

    def __call__(self, tag: BaseTag, vr: str | None, length: int) -> bool:
        if tag > _LAST_GROUP_NEEDED:
            self.reached = True
            return True
        return False


def read_header(head: bytes | bytearray, transfer_syntax: str, complete: bool) -> Header | None:
    """Parse the index attributes from the first bytes of a dataset.

    Returns None when ``head`` ends before the attributes do (the caller then parses the blob file).
    Raises CannotUnderstand / MissingUIDs for datasets that cannot be indexed.
    """
    if transfer_syntax == DEFLATED:
        try:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            head = inflater.decompress(bytes(head), 4 << 20)
        except zlib.error as exc:
            raise CannotUnderstand(f"deflated dataset does not inflate: {exc}") from None
        complete = complete and not inflater.unconsumed_tail
    stop = _Stop()
    try:
        ds = read_dataset(
            io.BytesIO(head),
            transfer_syntax == IMPLICIT_LE,
            transfer_syntax != EXPLICIT_BE,
            stop_when=stop,
            specific_tags=_SPECIFIC_TAGS,
        )
    except Exception as exc:
        if not complete:
            return None
        raise CannotUnderstand(f"dataset cannot be parsed: {type(exc).__name__}") from None
    if not stop.reached and not complete:
        return None
    try:
        return _from_dataset(ds)
    except (MissingUIDs, CannotUnderstand):
        if not complete and not stop.reached:
            return None
        raise


def read_header_file(path: Path) -> tuple[Header, str]:
    """Parse a Part-10 blob; returns the header and the transfer syntax from its File Meta."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=_SPECIFIC_TAGS)
    except Exception as exc:
        raise CannotUnderstand(f"{path.name}: cannot be parsed: {type(exc).__name__}: {exc}") from None
    ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
    return _from_dataset(ds), ts
