"""C-FIND attribute matching (PS3.4 C.2.2.2) on the index's values, which are decoded Unicode strings.

A query key compiles once into a predicate on a stored value (``None``: universal matching, every record
matches). The kinds, by the key's VR and value:

* universal: an empty value, or ``*`` alone for the VRs that allow wildcards (C.2.2.2.3, C.2.2.2.4);
* empty value matching: the value ``""`` (two quotes) matches records whose value is empty;
* list of UIDs: a UI value with backslashes matches any of them (C.2.2.2.2); CS values with backslashes are
  treated the same way (``ModalitiesInStudy = CT\\MR``: either);
* range: ``lo-hi``, ``-hi``, ``lo-`` for DA, TM and DT (C.2.2.2.5); a partial bound covers its whole precision
  (``-1200`` takes 12:00:59.999999, ``2020-`` as DT every instant of 2020 onwards);
* wildcard: ``*`` and ``?`` for AE, CS, LO, LT, PN, SH, ST, UC, UR and UT only (elsewhere they are literal);
* single value: anything else; PN compares case-insensitively unless configured otherwise (C.2.2.2.1 leaves it
  to the SCP), and a PN query without ``=`` matches the whole name or any one of its component groups, so an
  ideographic ``山田^太郎`` finds ``Yamada^Tarou=山田^太郎``.

A multi-valued stored value (ModalitiesInStudy, SOPClassesInStudy) matches when one of its values does. A record
without the attribute (empty) matches only universal and empty value matching.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Predicate = Callable[[str], bool]

WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
RANGE_VRS = frozenset({"DA", "TM", "DT"})
LIST_VRS = frozenset({"UI", "CS"})


@dataclass(frozen=True)
class Options:
    case_sensitive_person_names: bool = False


def compile_key(vr: str, value: str, options: Options = Options()) -> Predicate | None:
    """The predicate of one query key; None for universal matching."""
    value = value.strip(" \x00")
    if not value or (value == "*" and vr in WILDCARD_VRS):
        return None
    if value == '""':
        return lambda stored: not stored
    if vr in LIST_VRS and "\\" in value:
        alternatives = [compile_key(vr, v, options) for v in value.split("\\") if v.strip(" ")]
        predicates = [p for p in alternatives if p is not None]
        if len(predicates) < len(alternatives) or not predicates:
            return None  # one alternative is universal: so is the whole list
        if vr == "UI":
            wanted = frozenset(v.strip() for v in value.split("\\"))
            return _any_value(wanted.__contains__)
        return lambda stored: any(p(stored) for p in predicates)
    if vr in RANGE_VRS:
        return _any_value(_range(vr, value))
    if vr == "PN":
        return _any_value(_person_name(value, options.case_sensitive_person_names))
    if vr in WILDCARD_VRS and ("*" in value or "?" in value):
        return _any_value(lambda stored: wildcard_match(value, stored))
    if vr == "IS":
        return _any_value(_integer(value))
    return _any_value(lambda stored: stored == value)


def _any_value(single: Predicate) -> Predicate:
    def match(stored: str) -> bool:
        stored = stored.strip(" \x00")
        if not stored:
            return False
        if "\\" in stored:
            return any(single(v.strip(" ")) for v in stored.split("\\"))
        return single(stored)

    return match


def wildcard_match(pattern: str, text: str) -> bool:
    """``*`` any run of characters (also none), ``?`` one character; everything else literal. The greedy walk
    that returns to the last ``*`` only: O(len(pattern) x len(text)) at worst. A regex (``.*a.*a.*b``) backtracks
    exponentially: ``*a`` twelve times then ``*b`` against forty ``a`` took 109 s, one peer's C-FIND stalling a
    worker thread."""
    p = t = 0
    star, resume = -1, 0
    while t < len(text):
        if p < len(pattern) and (pattern[p] == "?" or (pattern[p] != "*" and pattern[p] == text[t])):
            p += 1
            t += 1
        elif p < len(pattern) and pattern[p] == "*":
            star, resume = p, t
            p += 1
        elif star >= 0:
            p = star + 1
            resume += 1
            t = resume
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


def literal_prefix(value: str) -> str:
    """The characters before the first wildcard: what an index range scan can use."""
    cut = min((i for i in (value.find("*"), value.find("?")) if i >= 0), default=len(value))
    return value[:cut]


def _integer(value: str) -> Predicate:
    try:
        wanted = int(value)
    except ValueError:
        return lambda stored: stored == value

    def match(stored: str) -> bool:
        try:
            return int(stored) == wanted
        except ValueError:
            return False

    return match


def _person_name(value: str, case_sensitive: bool) -> Predicate:
    fold = (lambda s: s) if case_sensitive else str.casefold
    query = fold(value).rstrip("^ ")
    if "*" in query or "?" in query:
        def one(text: str) -> bool:
            return wildcard_match(query, text)
    else:
        def one(text: str) -> bool:
            return text == query

    by_group = "=" not in query

    def match(stored: str) -> bool:
        name = fold(stored)
        if one(name.rstrip("^ ")):
            return True
        return by_group and "=" in name and any(one(group.rstrip("^ ")) for group in name.split("="))

    return match


# ---- dates and times ----------------------------------------------------------------------------------------

def normalize_date(text: str) -> str:
    """YYYYMMDD; the ACR-NEMA form YYYY.MM.DD too."""
    return text.strip().replace(".", "")


def _time_digits(text: str) -> tuple[str, str]:
    """(HHMMSS as given, possibly shorter, fraction digits) of a TM; the ACR-NEMA HH:MM:SS too."""
    text = text.strip().replace(":", "")
    whole, _, fraction = text.partition(".")
    return whole, fraction


def time_bound(text: str, upper: bool) -> str:
    """A TM as a comparable 13-character string HHMMSS.ffffff; the unspecified part of a partial value is the
    earliest (lower bound) or latest (upper bound) instant it covers."""
    whole, fraction = _time_digits(text)
    fill = "9" if upper else "0"
    if len(whole) < 6:
        fraction = ""
    whole = (whole + ("5959" if upper else "0000"))[:6] if len(whole) in (2, 4) else whole.ljust(6, fill)[:6]
    return f"{whole}.{fraction.ljust(6, fill)[:6]}"


def datetime_bound(text: str, upper: bool) -> str:
    """A DT (offset dropped) as a comparable YYYYMMDDHHMMSS.ffffff; partial values as in time_bound."""
    text = text.strip()
    for sign in "+-":
        if len(text) > 4 and sign in text[4:]:
            text = text[: 4 + text[4:].index(sign)]  # a UTC offset: compared as local time (documented)
    date, rest = text[:8], text[8:]
    if len(date) < 8:
        date = date + ("1231" if upper else "0101")[len(date) - 4 :] if len(date) >= 4 else date.ljust(8, "0")
        rest = ""
    clock = time_bound(rest, upper) if rest else ("235959.999999" if upper else "000000.000000")
    return date + clock


def _range(vr: str, value: str) -> Predicate:
    lo, dash, hi = value.partition("-") if vr != "DT" else _dt_partition(value)
    if not dash:
        lo = hi = value
    if vr == "DA":
        low, high = normalize_date(lo), normalize_date(hi)

        def norm(stored: str) -> str:
            return normalize_date(stored)
    elif vr == "TM":
        low = time_bound(lo, False) if lo.strip() else ""
        high = time_bound(hi, True) if hi.strip() else ""

        def norm(stored: str) -> str:
            return time_bound(stored, False)
    else:
        low = datetime_bound(lo, False) if lo.strip() else ""
        high = datetime_bound(hi, True) if hi.strip() else ""

        def norm(stored: str) -> str:
            return datetime_bound(stored, False)

    def match(stored: str) -> bool:
        key = norm(stored)
        return (not low or key >= low) and (not high or key <= high)

    return match


def _dt_partition(value: str) -> tuple[str, str, str]:
    """Split a DT range at its range hyphen, not at a UTC offset's minus sign: a DT's offset follows at least a
    four-digit year, so the range hyphen is the one at position 0 or the first one that ends a full bound."""
    if value.startswith("-"):
        return "", "-", value[1:]
    for i, c in enumerate(value):
        if c == "-" and i >= 4 and (value[i + 1 : i + 2].isdigit() or i + 1 == len(value)):
            rest = value[i + 1 :]
            # "2020+0100-2021": the hyphen after the offset; "20200101-0500" (an offset) has 4 digits after it
            # and nothing more, which is ambiguous: DICOM's own examples read it as a range, so do we.
            return value[:i], "-", rest
    return value, "", ""


def combined_date_time(date_value: str, time_value: str) -> Callable[[str, str], bool] | None:
    """PS3.4 C.2.2.2.5.1 combined matching of a date key and a time key as one date-time range: with
    ``StudyDate=20200101-20200102`` and ``StudyTime=2300-0100``, 23:30 on the 2nd matches and 23:30 on the 1st
    too (the range runs from 2020-01-01 23:00 to 2020-01-02 01:00:59). None when either key is universal."""
    date_value, time_value = date_value.strip(), time_value.strip()
    if not date_value or not time_value:
        return None
    d_lo, d_dash, d_hi = date_value.partition("-")
    t_lo, t_dash, t_hi = time_value.partition("-")
    if not d_dash:
        d_lo = d_hi = date_value
    if not t_dash:
        t_lo = t_hi = time_value
    low = (normalize_date(d_lo) + time_bound(t_lo, False)) if d_lo else ""
    high = (normalize_date(d_hi) + time_bound(t_hi, True)) if d_hi else ""

    def match(stored_date: str, stored_time: str) -> bool:
        if not stored_date.strip():
            return False
        key = normalize_date(stored_date) + time_bound(stored_time or "000000", False)
        return (not low or key >= low) and (not high or key <= high)

    return match
