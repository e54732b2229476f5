"""A C-FIND identifier: decoded with pydicom (text in its Specific Character Set), checked against the query
model's hierarchy (PS3.4 C.4.1.2, C.6.1, C.6.2), and the response identifiers built from matched records.

Errors are QueryError with the status PS3.4 C.4.1.1.4 gives: 0xA900 (Identifier does not match SOP Class) for a
missing or unknown Query/Retrieve Level, a level the model does not have, a missing or non-unique key of a level
above the query level, or a unique key of a level below it; 0xC000 (Unable to process) for bytes that do not
parse.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field

from pydicom.charset import _encode_string_impl, _encode_string_parts, convert_encodings
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pynetdicom.dsutils import decode, encode

from appliance import errors
from appliance.dicom.uids import PATIENT_ROOT_FIND

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
UNIQUE_KEYS = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
               "IMAGE": "SOPInstanceUID"}

# The attributes the index holds (or computes) per level. Requested keys outside these are returned empty.
PATIENT_KEYS = frozenset({"PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
                          "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                          "NumberOfPatientRelatedInstances"})
STUDY_KEYS = frozenset({"StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
                        "StudyDescription", "ReferringPhysicianName", "ModalitiesInStudy", "SOPClassesInStudy",
                        "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"})
SERIES_KEYS = frozenset({"SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "BodyPartExamined",
                         "SeriesDate", "SeriesTime", "NumberOfSeriesRelatedInstances"})
IMAGE_KEYS = frozenset({"SOPInstanceUID", "SOPClassUID", "InstanceNumber", "NumberOfFrames", "Rows", "Columns",
                        "ContentDate"})
ANY_LEVEL_KEYS = frozenset({"RetrieveAETitle", "InstanceAvailability"})
KEYS_OF = {"PATIENT": PATIENT_KEYS, "STUDY": STUDY_KEYS, "SERIES": SERIES_KEYS, "IMAGE": IMAGE_KEYS}

SPECIFIC_CHARACTER_SET = 0x00080005
QUERY_RETRIEVE_LEVEL = 0x00080052
DEFAULT_CHARSET = "ISO_IR 6"
UTF8 = "ISO_IR 192"


class QueryError(Exception):
    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


@dataclass(frozen=True)
class QueryKey:
    keyword: str  # "" for a private or unknown tag: returned empty, never matched
    tag: int
    vr: str
    value: str  # decoded; "" for universal matching
    sequence: bool = False


@dataclass
class Query:
    model: str  # the FIND SOP class
    level: str
    keys: list[QueryKey]
    charsets: list[str]  # the requester's (0008,0005), [] for the default repertoire
    by_keyword: dict[str, QueryKey] = field(default_factory=dict)
    # query/encoding.py's element plan for the responses, computed once per query: ("plan", list or None)
    encoding_plan: tuple[str, object] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.by_keyword = {k.keyword: k for k in self.keys if k.keyword}

    def value(self, keyword: str) -> str:
        key = self.by_keyword.get(keyword)
        return key.value if key is not None and not key.sequence else ""

    @property
    def patient_root(self) -> bool:
        return self.model == PATIENT_ROOT_FIND

    def level_keys(self, level: str) -> frozenset[str]:
        """What the index holds for records of ``level`` in this model (Study Root puts the patient's attributes
        at the study level)."""
        keys = KEYS_OF[level] | ANY_LEVEL_KEYS
        if level == "STUDY" and not self.patient_root:
            keys |= PATIENT_KEYS
        return keys


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(_text(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("latin-1").strip(" \x00")
    return str(value).strip(" \x00")


_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"})
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
NESTING_MAX = 8


def check_structure(data: bytes, implicit: bool, little_endian: bool) -> None:
    """Every element's length fits in the identifier (pydicom reads a truncated value without a word, so a cut or
    lying identifier would be matched as if it said something), sequences nest at most NESTING_MAX deep."""
    order = "<" if little_endian else ">"
    tag_format, u16, u32 = struct.Struct(order + "HH"), struct.Struct(order + "H"), struct.Struct(order + "L")

    def walk(pos: int, end: int, depth: int, in_item: bool) -> int:
        while pos < end:
            if pos + 8 > end:
                raise ValueError("truncated element header")
            group, element = tag_format.unpack_from(data, pos)
            tag = group << 16 | element
            if group == 0xFFFE:
                length, value = u32.unpack_from(data, pos + 4)[0], pos + 8
                if tag in (_ITEM_END, _SEQUENCE_END):
                    return value
            elif implicit:
                length, value = u32.unpack_from(data, pos + 4)[0], pos + 8
            else:
                vr = data[pos + 4 : pos + 6]
                if vr in _LONG_VRS:
                    if pos + 12 > end:
                        raise ValueError("truncated element header")
                    length, value = u32.unpack_from(data, pos + 8)[0], pos + 12
                else:
                    length, value = u16.unpack_from(data, pos + 6)[0], pos + 8
            if length == 0xFFFFFFFF:
                if depth >= NESTING_MAX:
                    raise ValueError("sequences nested too deep")
                pos = walk(value, end, depth + 1, tag == _ITEM)
                continue
            if value + length > end:
                raise ValueError("an element overruns the identifier")
            if tag == _ITEM or (not implicit and data[pos + 4 : pos + 6] == b"SQ"):
                if depth >= NESTING_MAX:
                    raise ValueError("sequences nested too deep")
                walk(value, value + length, depth + 1, tag == _ITEM)
            pos = value + length
        if in_item and end == len(data):
            raise ValueError("an item without its end")
        return pos

    walk(0, len(data), 0, False)


def parse(data: bytes, transfer_syntax_implicit: bool, little_endian: bool, deflated: bool, model: str) -> Query:
    """Decode and check an identifier (QueryError on failure)."""
    try:
        if not deflated:
            check_structure(data, transfer_syntax_implicit, little_endian)
        ds = decode(io.BytesIO(data), transfer_syntax_implicit, little_endian, deflated)
        charsets = [c for c in _text(ds.get("SpecificCharacterSet", "")).split("\\") if c]
        keys: list[QueryKey] = []
        for elem in ds:  # iterating converts every element: decoding errors surface here
            if elem.tag in (SPECIFIC_CHARACTER_SET, QUERY_RETRIEVE_LEVEL) or elem.tag.group in (0x0000, 0x0002):
                continue
            keyword = "" if elem.tag.is_private else (keyword_for_tag(elem.tag) or "")
            vr = elem.VR if elem.VR != "UN" or not keyword else dictionary_VR(elem.tag)
            if elem.VR == "SQ" or isinstance(elem.value, Sequence):
                # Sequence items are never matched (the index holds no sequence); whether they asked for any
                # value decides between 0xFF00 and 0xFF01.
                asks = any(_text(e.value) for item in elem.value or [] for e in item if e.VR != "SQ")
                keys.append(QueryKey(keyword, int(elem.tag), "SQ", "items" if asks else "", sequence=True))
            else:
                keys.append(QueryKey(keyword, int(elem.tag), vr, _text(elem.value)))
        level = _text(ds.get("QueryRetrieveLevel", ""))
    except QueryError:
        raise
    except Exception as exc:
        raise QueryError(errors.UNABLE_TO_PROCESS, f"identifier cannot be parsed: {type(exc).__name__}") from None
    query = Query(model, level.upper(), keys, charsets)
    check(query)
    return query


def check(query: Query) -> None:
    """The hierarchy rules of PS3.4 C.4.1.2.1 for the model's levels."""
    level = query.level
    if not level:
        raise QueryError(errors.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "Query/Retrieve Level (0008,0052) is missing")
    if level not in LEVELS:
        raise QueryError(errors.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "unknown Query/Retrieve Level")
    if level == "PATIENT" and not query.patient_root:
        raise QueryError(errors.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "Study Root has no PATIENT level")
    depth = LEVELS.index(level)
    first = 0 if query.patient_root else 1
    for upper in LEVELS[first:depth]:
        keyword = UNIQUE_KEYS[upper]
        value = query.value(keyword)
        if not value or "*" in value or "?" in value:
            raise QueryError(errors.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                             f"a {level} query needs a single {keyword} (unique key of the {upper} level)")
    for lower in LEVELS[depth + 1 :]:
        if query.value(UNIQUE_KEYS[lower]):
            raise QueryError(errors.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                             f"{UNIQUE_KEYS[lower]} belongs to a level below {level}")


def _element_vr(key: QueryKey) -> str:
    if key.sequence:
        return "SQ"
    if key.keyword and key.vr in ("UN", "", "OB or OW", "US or SS"):
        vr = dictionary_VR(key.tag)
        return vr if " or " not in vr else vr.split(" or ")[0]
    return key.vr or "UN"


def response_dataset(query: Query, record: dict[str, str]) -> Dataset:
    """The identifier of one match: every requested key (empty where the record has no value), the query level's
    unique key, the Query/Retrieve Level."""
    ds = Dataset()
    ds.QueryRetrieveLevel = query.level
    keys = list(query.keys)
    unique = UNIQUE_KEYS[query.level]
    if unique not in query.by_keyword:
        keys.append(QueryKey(unique, _tag_of(unique), "LO" if unique == "PatientID" else "UI", ""))
    for key in keys:
        vr = _element_vr(key)
        if key.sequence:
            ds.add_new(key.tag, "SQ", [])
            continue
        text = record.get(key.keyword, "") if key.keyword else ""
        value: object = text
        if vr in ("US", "SS", "UL", "SL") and text:
            numbers = [int(v) for v in text.split("\\") if v.strip().lstrip("-").isdigit()]
            value = numbers[0] if len(numbers) == 1 else numbers
        elif vr in ("US", "SS", "UL", "SL", "FL", "FD", "OB", "OW", "OF", "OD", "OL", "OV", "AT", "SV", "UV"):
            value = None
        elif "\\" in text:
            value = text.split("\\")
        try:
            ds.add_new(key.tag, vr, value if text else None)
        except (ValueError, TypeError, OverflowError):
            # A value the modality sent that its VR cannot hold (SeriesNumber "abc" in an IS): that key comes back
            # empty for this match instead of the whole query failing.
            ds.add_new(key.tag, vr, None)
    return ds


def _tag_of(keyword: str) -> int:
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return int(tag)


def encode_response(ds: Dataset, query: Query, implicit: bool, little_endian: bool, deflated: bool) -> bytes:
    """Encode in the requester's character set when every value is representable in it, else in UTF-8 (ISO_IR
    192) with (0008,0005) saying so. The default repertoire stays without (0008,0005) when all is ASCII.
    Representability is checked here, value by value, rather than by turning pydicom's "replacement characters"
    warning into an error: warning filters are process-wide and this runs in the worker's query threads."""
    charsets = query.charsets or [DEFAULT_CHARSET]
    if query.charsets:
        ds.SpecificCharacterSet = charsets if len(charsets) > 1 else charsets[0]
    if not _representable(ds, charsets):
        ds.SpecificCharacterSet = UTF8
    encoded = encode(ds, implicit, little_endian, deflated)
    if encoded is None:
        raise QueryError(errors.UNABLE_TO_PROCESS, "a matched record cannot be encoded")
    return bytes(encoded)


_CHARSET_VRS = frozenset({"PN", "LO", "SH", "LT", "ST", "UT", "UC"})


def _representable(ds: Dataset, charsets: list[str]) -> bool:
    encodings: list[str] | None = None
    for elem in ds:
        if elem.VR not in _CHARSET_VRS or elem.value is None:
            continue
        values = elem.value if isinstance(elem.value, MultiValue | list) else [elem.value]
        for value in values:
            text = str(value)
            if text.isascii():
                continue
            if charsets == [DEFAULT_CHARSET]:
                return False  # the default repertoire is ASCII (pydicom would write Latin-1 without saying so)
            if encodings is None:
                encodings = convert_encodings(charsets)
            if not _fits(text, encodings):
                return False
    return True


def _fits(text: str, encodings: list[str]) -> bool:
    """Whether pydicom can encode ``text`` in ``encodings`` without replacement characters (its own rules: one
    encoding for the whole value, else the ISO 2022 parts of a multi-charset value)."""
    for encoding in encodings:
        try:
            _encode_string_impl(text, encoding)
            return True
        except (UnicodeError, LookupError, ValueError):
            continue
    if len(encodings) > 1:
        try:
            _encode_string_parts(text, encodings)
            return True
        except (UnicodeError, LookupError, ValueError):
            return False
    return False
