"""What the index stores per level, and how it is read from a dataset's header.

Only the attributes listed here are parsed, and parsing stops before group 0x0029, so the pixel data of a
1 GiB multi-frame instance is never looked at. Values are kept as DICOM strings (dates as YYYYMMDD, names
as PN strings decoded with the dataset's Specific Character Set).
"""

from __future__ import annotations

import io
import os
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

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
_SPECIFIC_TAGS: list[BaseTag | int] = [*(Tag(t) for t in ALL_ATTRS.values()), Tag(0x00080005)]
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
    _check_uids(header)
    return header


# PS3.5 9.1: a UID is components of digits separated by dots, at most 64 characters. Leading zeros in a component
# are not allowed by the standard but are sent by real modalities and harm nothing here, so they are accepted;
# anything else (NUL, '/', '..', letters, an empty component) would break the index's NUL-joined keys or a path.
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
# Control characters in the attributes that become index keys (ESC stays: ISO 2022 character sets use it).
_CONTROL = re.compile(r"[\x00-\x1a\x1c-\x1f\x7f]")
_KEY_ATTRIBUTES = (("patient", "PatientID"), ("patient", "IssuerOfPatientID"), ("study", "AccessionNumber"),
                   ("study", "StudyDate"), ("series", "Modality"))


def valid_uid(uid: str) -> bool:
    return len(uid) <= 64 and _UID.fullmatch(uid) is not None


def _check_uids(header: Header) -> None:
    if not header.study.get("StudyInstanceUID") or not header.series.get("SeriesInstanceUID"):
        raise MissingUIDs("dataset has no Study or Series Instance UID")
    if not header.sop_instance_uid or not header.sop_class_uid:
        raise MissingUIDs("dataset has no SOP Instance UID or SOP Class UID")
    for level, keyword in (("study", "StudyInstanceUID"), ("series", "SeriesInstanceUID"),
                           ("instance", "SOPInstanceUID"), ("instance", "SOPClassUID")):
        if not valid_uid(getattr(header, level)[keyword]):
            raise CannotUnderstand(f"{keyword} is not a valid UID (digits and dots, at most 64 characters)")
    for level, keyword in _KEY_ATTRIBUTES:
        if _CONTROL.search(getattr(header, level).get(keyword, "")):
            raise CannotUnderstand(f"{keyword} holds control characters")
    _check_key_sizes(header)


# LMDB refuses keys longer than 511 bytes. One such key used to fail the whole group-commit transaction, so every
# other instance of the batch was answered 0xC211 too: refuse the one instance here instead (0xC000).
_MAX_KEY = 511


def _check_key_sizes(header: Header) -> None:
    uids = [header.study["StudyInstanceUID"], header.series["SeriesInstanceUID"], header.sop_instance_uid]
    if any(len(uid) > 64 for uid in [*uids, header.sop_class_uid]):
        raise CannotUnderstand("a UID is longer than 64 characters")
    pid = header.patient.get("PatientID", "").encode()
    issuer = header.patient.get("IssuerOfPatientID", "").encode()
    patient_key = len(pid) + (2 + len(issuer) if issuer or not pid else 0)  # as index.db.patient_key builds it
    instance_key = patient_key + sum(len(uid.encode()) + 1 for uid in uids)
    secondary = max([len(pid), len(header.series.get("Modality", "").encode())]
                    + [len(header.study.get(k, "").encode()) for k in ("AccessionNumber", "StudyDate")])
    if instance_key > _MAX_KEY or secondary + 1 + len(uids[0].encode()) > _MAX_KEY:
        raise CannotUnderstand("PatientID, Issuer, Accession Number, Study Date or Modality too long to index")


class _Stop:
    """stop_when callback that remembers whether parsing reached the end of what the index needs."""

    def __init__(self) -> None:
        self.reached = False

    def __call__(self, tag: BaseTag, vr: str | None, length: int) -> bool:
        if tag > _LAST_GROUP_NEEDED:
            self.reached = True
            return True
        return False


# The first bytes of a dataset kept in memory while it streams to disk; the index attributes are nearly always
# in them. The live path and `index rebuild` parse exactly this prefix the same way, so both index the same.
HEAD_LIMIT = 64 * 1024
# How much of a deflated dataset's head is inflated to find the index attributes (never the whole dataset).
DEFLATED_INFLATE_MAX = 4 << 20

_TAG_LE = struct.Struct("<HH")
_TAG_BE = struct.Struct(">HH")
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"})
_WANTED = {tag: keyword for keyword, tag in ALL_ATTRS.items()}
_US_KEYWORDS = frozenset({"Rows", "Columns"})
_CHARSET = 0x00080005
_PLAIN_CHARSETS = {b"", b"ISO_IR 6", b"ISO_IR 192", b"ISO_IR 100"}


class _Incomplete(Exception):
    pass


# Sequences nested deeper than this are left to pydicom (real headers nest 3 or 4 deep).
SEQUENCE_DEPTH_MAX = 16


class _FastParser:
    """A minimal walk over a dataset prefix that collects the index attributes' raw values.

    It only needs tags, lengths and item structure, so it skips everything else without building objects:
    about 20x cheaper than pydicom's reader on a CT header, which matters at 1,000 instances/s. Anything
    unusual (a character set other than ASCII/Latin-1/UTF-8, odd structure) makes the caller use pydicom.
    """

    def __init__(self, buf: bytes | bytearray, implicit: bool, little: bool) -> None:
        self.buf = buf
        self.implicit = implicit
        self.little = little
        self.tag = _TAG_LE if little else _TAG_BE
        self.u16 = struct.Struct("<H" if little else ">H")
        self.u32 = struct.Struct("<L" if little else ">L")
        self.values: dict[int, bytes | bytearray] = {}
        self.reached = False
        self.depth = 0

    def header(self, pos: int, implicit: bool) -> tuple[int, int, int]:
        """(tag, value length, value offset) of the element at ``pos``."""
        buf = self.buf
        if pos + 8 > len(buf):
            raise _Incomplete
        group, element = self.tag.unpack_from(buf, pos)
        tag = group << 16 | element
        if implicit or group == 0xFFFE:
            return tag, self.u32.unpack_from(buf, pos + 4)[0], pos + 8
        vr = bytes(buf[pos + 4 : pos + 6])
        if not vr.isupper():
            raise _Incomplete  # not Explicit VR after all: let pydicom work out what this is
        if vr in _LONG_VRS:
            if pos + 12 > len(buf):
                raise _Incomplete
            return tag, self.u32.unpack_from(buf, pos + 8)[0], pos + 12
        return tag, self.u16.unpack_from(buf, pos + 6)[0], pos + 8

    def dataset(self, pos: int, implicit: bool, top: bool, end: int | None = None) -> int:
        """Walk elements from ``pos``; nested datasets end at ``end`` or at an Item Delimitation."""
        buf = self.buf
        while end is None or pos < end:
            if top and pos >= len(buf):
                return pos
            tag, length, value = self.header(pos, implicit)
            if not top and tag == _ITEM_END:
                return value
            if top and tag > _LAST_GROUP_NEEDED:
                self.reached = True
                return pos
            if length == 0xFFFFFFFF:
                # Undefined length: a sequence (or UN holding one, encoded Implicit VR Little Endian).
                vr_un = not implicit and buf[pos + 4 : pos + 6] == b"UN"
                pos = self.sequence(value, implicit or vr_un)
                continue
            if value + length > len(buf):
                raise _Incomplete
            if top and tag in _WANTED or tag == _CHARSET:
                if top:
                    self.values[tag] = buf[value : value + length]
            pos = value + length
        return pos

    def sequence(self, pos: int, implicit: bool) -> int:
        # Bounded recursion: a peer can nest sequences thousands deep in 64 KiB. Past the bound the fast walk gives
        # up and pydicom decides (its own recursion ends in an error that refuses the instance with 0xC000).
        self.depth += 1
        if self.depth > SEQUENCE_DEPTH_MAX:
            raise _Incomplete
        try:
            return self._items(pos, implicit)
        finally:
            self.depth -= 1

    def _items(self, pos: int, implicit: bool) -> int:
        while True:
            tag, length, value = self.header(pos, True)
            if tag == _SEQ_END:
                return value
            if tag != _ITEM:
                raise CannotUnderstand(f"unexpected ({tag >> 16:04x},{tag & 0xFFFF:04x}) in a sequence")
            if length == 0xFFFFFFFF:
                pos = self.dataset(value, implicit, top=False)
            else:
                if value + length > len(self.buf):
                    raise _Incomplete
                pos = value + length


def _fast_header(head: bytes | bytearray, transfer_syntax: str, complete: bool) -> Header | None:
    parser = _FastParser(head, transfer_syntax == IMPLICIT_LE, transfer_syntax != EXPLICIT_BE)
    try:
        parser.dataset(0, parser.implicit, top=True)
    except (_Incomplete, struct.error, CannotUnderstand, RecursionError):
        return None
    if not parser.reached and not complete:
        return None
    values = parser.values
    charset = bytes(values.get(_CHARSET, b"")).strip(b"\x00 ")
    if charset not in _PLAIN_CHARSETS:
        return None
    encoding = "utf-8" if charset == b"ISO_IR 192" else "latin-1"
    header = Header()
    levels = [(header.patient, PATIENT_ATTRS), (header.study, STUDY_ATTRS), (header.series, SERIES_ATTRS),
              (header.instance, INSTANCE_ATTRS)]
    for level, attrs in levels:
        for keyword, tag in attrs.items():
            raw = values.get(tag)
            if not raw:
                continue
            if keyword in _US_KEYWORDS:
                text = str(parser.u16.unpack_from(raw)[0]) if len(raw) >= 2 else ""
            else:
                text = raw.decode(encoding, "replace").strip("\x00 ")
            if text:
                level[keyword] = text
    try:
        _check_uids(header)
    except MissingUIDs:
        return None  # pydicom decides (and words the error)
    return header


def read_header(head: bytes | bytearray, transfer_syntax: str, complete: bool) -> Header | None:
    """Parse the index attributes from the first bytes of a dataset.

    Returns None when ``head`` ends before the attributes do (the caller then parses the blob file).
    Raises CannotUnderstand / MissingUIDs for datasets that cannot be indexed.
    """
    if transfer_syntax == DEFLATED:
        try:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            head = inflater.decompress(bytes(head), DEFLATED_INFLATE_MAX)
        except zlib.error as exc:
            raise CannotUnderstand(f"deflated dataset does not inflate: {exc}") from None
        # The index attributes must be in what this bounded inflate gave: inflating a whole deflated dataset (a
        # zip bomb, or 1 GiB of pixels) on the event loop is what a hostile peer would want. Not found: refused.
        complete = True
    else:
        fast = _fast_header(head, transfer_syntax, complete)  # reads the bytearray in place, no copy
        if fast is not None:
            return fast
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


def part10_dataset_offset(prefix: bytes) -> tuple[int, str]:
    """Where the dataset starts in a Part-10 blob and its transfer syntax, from the blob's first bytes (preamble,
    ``DICM``, the File Meta group). Raises CannotUnderstand when they are not a Part-10 File Meta."""
    from pydicom.filereader import _read_file_meta_info

    try:
        if prefix[128:132] != b"DICM":
            raise ValueError("no DICM prefix")
        fp = io.BytesIO(prefix)
        fp.seek(132)
        meta = _read_file_meta_info(fp)
        return fp.tell(), str(meta.get("TransferSyntaxUID", ""))
    except Exception as exc:
        raise CannotUnderstand(f"not a DICOM file: {type(exc).__name__}: {exc}") from None


def read_header_blob(open_stream: Callable[[], BinaryIO], size: int) -> tuple[Header, str]:
    """Parse a Part-10 blob (opened by ``open_stream``, from the start) the way the live path parses what it
    receives: the same HEAD_LIMIT prefix, the same fallback. Returns (header, transfer syntax)."""
    with open_stream() as fh:
        prefix = fh.read(HEAD_LIMIT + 4096)
    offset, ts = part10_dataset_offset(prefix)
    head = prefix[offset : offset + HEAD_LIMIT]
    if len(head) < HEAD_LIMIT and size - offset > len(head):
        with open_stream() as fh:
            fh.seek(offset)
            head = fh.read(HEAD_LIMIT)
    header = read_header(head, ts, complete=size - offset <= HEAD_LIMIT)
    if header is None:
        with open_stream() as fh:
            header = read_header_beyond_head(fh)
    return header, ts


def read_header_file(path: Path) -> tuple[Header, str]:
    """read_header_blob for a Part-10 file on disk."""
    return read_header_blob(lambda: open(path, "rb"), path.stat().st_size)


def read_header_beyond_head(path: Path | str | BinaryIO) -> Header:
    """The attributes of a Part-10 file whose first HEAD_LIMIT dataset bytes did not hold them all.

    The live path calls this directly once its own prefix parse returned None (parsing the same prefix again
    would give None again); `read_header_file` calls it in the same case, so both index the same."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=_SPECIFIC_TAGS)
    except Exception as exc:
        name = os.path.basename(path) if isinstance(path, str | Path) else "dataset"
        raise CannotUnderstand(f"{name}: cannot be parsed: {type(exc).__name__}: {exc}") from None
    return _from_dataset(ds)
