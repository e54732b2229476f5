"""C-FIND responses encoded without pydicom on the common path.

Building a pydicom Dataset and writing it cost ~0.25 ms of CPU per match, most of a query's time once it returns
more than a few matches (a name wildcard at a million instances returns ~50). The common response is a handful of
short ASCII strings in a little-endian transfer syntax: that is encoded here directly, in tag order with the
padding PS3.5 7.1 and 6.2 prescribe, which is byte for byte what pydicom writes (tests/unit/test_query_encoding.py
compares the two on generated records). Anything else (a non-ASCII value, which needs the character-set logic of
identifier.encode_response, a binary VR, a value its VR cannot hold, a sequence key, big endian or deflate) goes
through pydicom as before.
"""

from __future__ import annotations

import re
import struct

from appliance.query.identifier import (
    QUERY_RETRIEVE_LEVEL,
    SPECIFIC_CHARACTER_SET,
    UNIQUE_KEYS,
    Query,
    QueryKey,
    _element_vr,
    _tag_of,
    encode_response,
    response_dataset,
)

# Text VRs encoded as their ASCII value padded with a space (UI: with NUL); other VRs go through pydicom.
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR", "UT", "IS",
                       "DS"})
_LONG_HEADER_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_IS = re.compile(r"\s*[+-]?\d+\s*")
_DS = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*")
_SHORT = struct.Struct("<HH2sH")
_LONG = struct.Struct("<HH2s2xL")
_IMPLICIT = struct.Struct("<HHL")


def _plan(query: Query) -> list[tuple[int, str, str]] | None:
    """(tag, VR, keyword) of every element of a response, in tag order; None when the fast path cannot apply."""
    keys = list(query.keys)
    unique = UNIQUE_KEYS[query.level]
    if unique not in query.by_keyword:
        keys.append(QueryKey(unique, _tag_of(unique), "LO" if unique == "PatientID" else "UI", ""))
    plan = [(QUERY_RETRIEVE_LEVEL, "CS", "")]
    for key in keys:
        if key.sequence:
            return None
        vr = _element_vr(key)
        if vr not in _TEXT_VRS and vr != "UI":
            return None
        plan.append((key.tag, vr, key.keyword))
    if any(tag == SPECIFIC_CHARACTER_SET for tag, _, _ in plan):
        return None
    plan.sort()
    if len({tag for tag, _, _ in plan}) != len(plan):
        return None  # a key given twice: pydicom keeps the last, leave that to it
    return plan


def _element(tag: int, vr: str, value: bytes, implicit: bool) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr == "UI" else b" "
    group, element = tag >> 16, tag & 0xFFFF
    if implicit:
        return _IMPLICIT.pack(group, element, len(value)) + value
    if vr in _LONG_HEADER_VRS:
        return _LONG.pack(group, element, vr.encode(), len(value)) + value
    if len(value) > 0xFFFF:
        raise ValueError("value too long for a short explicit VR")
    return _SHORT.pack(group, element, vr.encode(), len(value)) + value


def fast_response(query: Query, record: dict[str, str], implicit: bool) -> bytes | None:
    """The encoded identifier of one match in Implicit or Explicit VR Little Endian, or None when it must go
    through pydicom (see the module's docstring)."""
    if query.encoding_plan is None:
        query.encoding_plan = ("plan", _plan(query))
    plan = query.encoding_plan[1]
    if plan is None:
        return None
    assert isinstance(plan, list)
    out = []
    if query.charsets:
        charsets = "\\".join(query.charsets)
        if not charsets.isascii():
            return None
        out.append(_element(SPECIFIC_CHARACTER_SET, "CS", charsets.encode(), implicit))
    for tag, vr, keyword in plan:
        text = query.level if tag == QUERY_RETRIEVE_LEVEL else (record.get(keyword, "") if keyword else "")
        if not text.isascii():
            return None
        if text and vr == "IS" and not all(_IS.fullmatch(v) for v in text.split("\\")):
            return None
        if text and vr == "DS" and not all(_DS.fullmatch(v) for v in text.split("\\")):
            return None
        try:
            out.append(_element(tag, vr, text.encode(), implicit))
        except ValueError:
            return None
    if query.charsets:
        out.sort(key=lambda raw: struct.unpack_from("<HH", raw))  # (0008,0005) in its place
    return b"".join(out)


def encode_match(query: Query, record: dict[str, str], implicit: bool, little_endian: bool, deflated: bool) -> bytes:
    """One C-FIND response identifier: the fast path when it applies, else pydicom's."""
    if little_endian and not deflated:
        fast = fast_response(query, record, implicit)
        if fast is not None:
            return fast
    return encode_response(response_dataset(query, record), query, implicit, little_endian, deflated)
