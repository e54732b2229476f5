"""C-FIND matching (PS3.4 C.2.2.2) on decoded values: many small cases, no I/O."""

from __future__ import annotations

import pytest

from appliance.query.matching import (
    Options,
    combined_date_time,
    compile_key,
    datetime_bound,
    literal_prefix,
    time_bound,
)


def matches(vr: str, query: str, stored: str, **options: bool) -> bool:
    predicate = compile_key(vr, query, Options(**options))
    return True if predicate is None else predicate(stored)


@pytest.mark.parametrize(("vr", "query"), [("PN", ""), ("LO", "*"), ("PN", "*"), ("DA", ""), ("UI", ""),
                                           ("CS", "  ")])
def test_universal(vr: str, query: str) -> None:
    assert compile_key(vr, query) is None


def test_star_alone_is_literal_where_wildcards_are_not_allowed() -> None:
    assert compile_key("UI", "*") is not None
    assert not matches("UI", "*", "1.2.3")
    assert not matches("DA", "2020*", "20200101")


@pytest.mark.parametrize(("vr", "query", "stored", "expected"), [
    ("LO", "PID001", "PID001", True),
    ("LO", "PID001", "PID0011", False),
    ("LO", "pid001", "PID001", False),  # single value matching is case-sensitive except for PN
    ("LO", "PID0*", "PID001", True),
    ("LO", "PID0?1", "PID001", True),
    ("LO", "PID0?1", "PID0011", False),
    ("LO", "*01", "PID001", True),
    ("LO", "P*D*1", "PID001", True),
    ("LO", "PID.01", "PID001", False),  # regex characters are literal
    ("LO", "PID[0]01", "PID001", False),
    ("SH", "ACC1", "ACC1 ", True),  # padding is not part of the value
    ("CS", "CT", "CT\\MR", True),  # a multi-valued stored value matches by any value
    ("CS", "US", "CT\\MR", False),
    ("CS", "CT\\US", "MR\\US", True),  # a list in the query: any
    ("CS", "C?", "CT", True),
    ("LO", "X", "", False),  # an empty stored value only matches universal
    ("LO", '""', "", True),  # empty value matching
    ("LO", '""', "X", False),
    ("IS", "7", "007", True),
    ("IS", "7", "8", False),
])
def test_single_value_wildcard_list(vr: str, query: str, stored: str, expected: bool) -> None:
    assert matches(vr, query, stored) is expected


@pytest.mark.parametrize(("query", "stored", "expected"), [
    ("DOE^JOHN", "DOE^JOHN", True),
    ("doe^john", "DOE^JOHN", True),
    ("DOE*", "Doe^Jane", True),
    ("DOE", "DOE^JOHN", False),
    ("DOE^JOHN", "DOE^JOHN^^^", True),  # trailing empty components
    ("*JOHN*", "DOE^JOHN", True),
    ("müller*", "MÜLLER^JÜRGEN", True),
    ("Nguyễn^Văn^An", "NGUYỄN^VĂN^AN", True),
    ("山田^太郎", "Yamada^Tarou=山田^太郎=やまだ^たろう", True),  # one component group
    ("山田*", "Yamada^Tarou=山田^太郎=やまだ^たろう", True),
    ("やまだ*", "Yamada^Tarou=山田^太郎=やまだ^たろう", True),
    ("Yamada^Tarou", "Yamada^Tarou=山田^太郎=やまだ^たろう", True),
    ("Yamada^Tarou=山田^太郎=やまだ^たろう", "Yamada^Tarou=山田^太郎=やまだ^たろう", True),
    ("Yamada^Tarou=鈴木^太郎", "Yamada^Tarou=山田^太郎=やまだ^たろう", False),
    ("SMITH*", "DOE^JOHN", False),
])
def test_person_names(query: str, stored: str, expected: bool) -> None:
    assert matches("PN", query, stored) is expected


def test_person_names_case_sensitive_when_configured() -> None:
    assert not matches("PN", "doe*", "DOE^JOHN", case_sensitive_person_names=True)
    assert matches("PN", "DOE*", "DOE^JOHN", case_sensitive_person_names=True)


@pytest.mark.parametrize(("query", "stored", "expected"), [
    ("20200115", "20200115", True),
    ("20200115", "20200116", False),
    ("20200101-20200131", "20200115", True),
    ("20200101-20200131", "20200131", True),
    ("20200101-20200131", "20200201", False),
    ("-20200101", "19991231", True),
    ("-20200101", "20200102", False),
    ("20200101-", "20991231", True),
    ("20200101-", "20191231", False),
    ("2020.01.01-2020.01.31", "20200115", True),  # ACR-NEMA dates
    ("20200101-20200131", "", False),
])
def test_date(query: str, stored: str, expected: bool) -> None:
    assert matches("DA", query, stored) is expected


@pytest.mark.parametrize(("query", "stored", "expected"), [
    ("0800-1200", "101500", True),
    ("0800-1200", "120059", True),  # "1200" as an upper bound covers the whole minute
    ("0800-1200", "120100", False),
    ("0800-1200", "075959.999", False),
    ("-0800", "0759", True),
    ("10-", "095959", False),
    ("10-", "10", True),
    ("101500", "101500.000000", True),
    ("10:15-11:00", "103000", True),  # ACR-NEMA times
])
def test_time(query: str, stored: str, expected: bool) -> None:
    assert matches("TM", query, stored) is expected


@pytest.mark.parametrize(("query", "stored", "expected"), [
    ("20200101-20200102", "20200102235959", True),
    ("20200101-20200102", "20200103000000", False),
    ("20200101103000-20200101110000", "20200101104500.5", True),
    ("-2019", "20191231235959", True),
    ("2020-", "20191231235959", False),
    ("20200101-20200102", "20200101120000+0100", True),  # offsets dropped: compared as given
])
def test_datetime(query: str, stored: str, expected: bool) -> None:
    assert matches("DT", query, stored) is expected


def test_bounds() -> None:
    assert time_bound("12", True) == "125959.999999"
    assert time_bound("1200", False) == "120000.000000"
    assert datetime_bound("2020", False) == "20200101000000.000000"
    assert datetime_bound("202003", True) == "20200331235959.999999"


def test_uid_list() -> None:
    predicate = compile_key("UI", "1.2.3\\1.2.4")
    assert predicate is not None
    assert predicate("1.2.3") and predicate("1.2.4") and not predicate("1.2.5") and not predicate("1.2")


def test_combined_date_time() -> None:
    match = combined_date_time("20200101-20200102", "2300-0100")
    assert match is not None
    assert match("20200101", "233000")  # independent matching would refuse 23:30 (not in 23:00-01:00)
    assert match("20200102", "003000")
    assert not match("20200102", "013000")
    assert not match("20200101", "223000")
    assert combined_date_time("", "2300-0100") is None
    open_start = combined_date_time("-20200101", "1200")
    assert open_start is not None and open_start("19990101", "235959") and not open_start("20200101", "130000")


def test_wildcards_cannot_stall_a_worker() -> None:
    """A regex took 109 s on this (exponential backtracking); the glob walk is quadratic at worst."""
    import time

    predicate = compile_key("LO", "*a" * 12 + "*b")
    assert predicate is not None
    started = time.perf_counter()
    assert not predicate("a" * 64)
    assert predicate("a" * 63 + "b")
    long_query = compile_key("PN", "*a" * 5000)
    assert long_query is not None and not long_query("b" * 64)
    assert time.perf_counter() - started < 1.0


def test_literal_prefix() -> None:
    assert literal_prefix("DOE*") == "DOE"
    assert literal_prefix("D?E*") == "D"
    assert literal_prefix("*X") == ""
    assert literal_prefix("PLAIN") == "PLAIN"
