"""The console's shared conventions (appliance/cli_common.py): the safety net turning errors into one line or
JSON, DICOM date ranges for --date, UID arguments, human units and times. The commands themselves are tested in
tests/integration/test_cli_consistency.py; here what a real archive cannot show (permission denied as root)."""

from __future__ import annotations

import errno
import json
from datetime import datetime
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from appliance import errors
from appliance.cli_common import RootGroup, check_uid, date_range, human_key, human_ns, humanize


def _app(exc: BaseException) -> typer.Typer:
    app = typer.Typer(cls=RootGroup)

    @app.command()
    def fails(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
        raise exc

    @app.command()
    def other() -> None:  # two commands: a group, as the real console
        pass

    return app


@pytest.mark.parametrize(("exc", "code", "message"), [
    (PermissionError(errno.EACCES, "Permission denied", "/srv/x"), errors.EXIT_FAILURE, "/srv/x: permission denied"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/a"), errors.EXIT_NOT_FOUND,
     "/a: no such file or directory"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/etc"), errors.EXIT_FAILURE, "/etc: is a directory"),
    (errors.IndexInUse("the index is in use"), errors.EXIT_UNAVAILABLE, "the index is in use"),
    (errors.ConfigError("server.port: an integer"), errors.EXIT_CONFIG, "server.port: an integer"),
])
def test_errors_end_as_one_line_or_json(exc: BaseException, code: int, message: str) -> None:
    runner = CliRunner()
    human = runner.invoke(_app(exc), ["fails"])
    assert human.exit_code == code and human.stderr == f"error: {message}\n" and human.stdout == ""
    as_json = runner.invoke(_app(exc), ["fails", "--json"])
    assert as_json.exit_code == code and as_json.stderr == ""
    assert json.loads(as_json.stdout) == {"error": message, "exit": code}


def test_a_usage_error_is_json_with_json_and_a_bug_keeps_its_traceback() -> None:
    runner = CliRunner()
    usage = runner.invoke(_app(ValueError()), ["fails", "--nope", "--json"])
    assert usage.exit_code == errors.EXIT_USAGE and json.loads(usage.stdout)["exit"] == errors.EXIT_USAGE
    assert runner.invoke(_app(ValueError()), ["fails", "--nope"]).exit_code == errors.EXIT_USAGE
    bug = runner.invoke(_app(ZeroDivisionError("bug")), ["fails"])
    assert isinstance(bug.exception, ZeroDivisionError)  # not hidden: a bug is to be reported with its traceback


@pytest.mark.parametrize(("text", "expected"), [
    ("20040315", ("20040315", "20040315")),
    ("2004", ("20040101", "20041231")),
    ("200402", ("20040201", "20040231")),  # an upper bound for string comparison: every day of February is below
    ("2004-2005", ("20040101", "20051231")),
    ("20040315-", ("20040315", "99999999")),
    ("-200403", ("00000000", "20040331")),
    (" 2004 ", ("20040101", "20041231")),
])
def test_date_ranges_as_dicom(text: str, expected: tuple[str, str]) -> None:
    assert date_range(text) == expected


@pytest.mark.parametrize("text", ["", "-", "04", "200", "20041", "2004031", "20041301", "20040230", "2004x",
                                  "yesterday", "2004--2005", "2004-20051"])
def test_bad_dates_are_refused(text: str) -> None:
    with pytest.raises(typer.BadParameter):
        date_range(text)


def test_uids() -> None:
    assert check_uid("1.2.3") == "1.2.3" and check_uid(None) is None and check_uid(["1.2", "1.3"]) == ["1.2", "1.3"]
    for bad in ("", "  ", "1" * 257, ["1.2", ""]):
        with pytest.raises(typer.BadParameter):
            check_uid(bad)


def test_human_values() -> None:
    ns = 1_764_200_000_123_456_789
    when = datetime.fromisoformat(human_ns(ns))
    assert when.tzinfo is not None and when.microsecond == 0 and abs(when.timestamp() - ns / 1e9) < 1
    assert human_ns(0) == "never"
    assert humanize("received_ns", ns) == human_ns(ns) and human_key("received_ns") == "received"
    assert humanize("size", 39_212) == "39.2 KB" and humanize("Size", 2_500_000) == "2.5 MB"
    assert humanize("used_bytes", 999) == "999 B" and humanize("NumberOfInstances", 3) == 3
    assert humanize("size", True) is True and humanize("PatientID", "P1") == "P1"


def test_audit_human_time_is_local_iso() -> None:
    from appliance.cli_audit import human

    stamp = human({"time": "2026-11-26T08:00:00.123Z", "event": "store", "outcome": 0}).split()[0]
    when = datetime.fromisoformat(stamp)
    assert when.tzinfo is not None and when.timestamp() == datetime.fromisoformat("2026-11-26T08:00:00+00:00").timestamp()
