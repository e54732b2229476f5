"""One consistent console (issue 13, item 3): `--version`; every user error one line and an exit code of
errors.py, never a traceback, and JSON with `--json`; every `ls` filter at every level, or refused; human units
and times for people, raw values in `--json`. Against the real archive of test_cli_metrics (a server fed by
pynetdicom): in-process with typer's CliRunner for the filter matrix, real subprocesses for the error paths."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from datetime import datetime
from importlib.metadata import version
from pathlib import Path

import pytest
from typer.testing import CliRunner

from appliance import errors
from appliance.cli import app
from tests.conftest import APPLIANCE, ServerHandle, wait_for, write_config
from tests.integration import test_cli_metrics
from tests.integration.test_cli_metrics import Archive, ls

archive = test_cli_metrics.archive  # its module-scoped fixture: two patients, three studies, nine instances

UNKNOWN = "1.2.826.0.1.3680043.8.498.999999"


def one_error_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The failure is exactly one stderr line ``error: ...`` (or click's usage text for exit 2), no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    if code != errors.EXIT_USAGE:
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    return result.stderr


def json_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    """With --json: {"error": ..., "exit": N} on stdout, nothing on stderr."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert result.stderr == "" and "Traceback" not in result.stdout
    data = json.loads(result.stdout)
    assert set(data) == {"error", "exit"} and data["exit"] == code and data["error"]
    return str(data["error"])


# ---- --version --------------------------------------------------------------------------------------


def test_version(tmp_path: Path) -> None:
    result = subprocess.run([*APPLIANCE, "--version"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 0 and result.stdout == f"appliance {version('dicom-appliance')}\n"
    assert CliRunner().invoke(app, ["--version"]).stdout == result.stdout


# ---- filters ----------------------------------------------------------------------------------------


def test_ls_patients_honours_every_study_filter(archive: Archive) -> None:
    u = archive.uids

    def patients(*args: str) -> set[str]:
        return {r["PatientID"] for r in ls(archive, "patients", *args)}

    assert patients("--study", u["S3"]) == {"P2"}
    assert patients("--study", u["S2"]) == {"P1"}
    assert patients("--accession", "ACC2") == {"P1"}
    assert patients("--date", "2021") == {"P1"}
    assert patients("--date", "202003") == {"P2"}
    assert patients("--modality", "MR") == {"P1"}
    assert patients("--modality", "CT") == {"P1", "P2"}
    assert patients("--patient-id", "P2", "--modality", "MR") == set()
    assert patients() == {"P1", "P2"}


def test_ls_filters_combine_and_dates_as_dicom_ranges(archive: Archive) -> None:
    u = archive.uids

    def studies(*args: str) -> set[str]:
        return {r["StudyInstanceUID"] for r in ls(archive, "studies", *args)}

    assert studies("--date", "2020") == {u["S1"], u["S3"]}
    assert studies("--date", "202001") == {u["S1"]}
    assert studies("--date", "2021-") == {u["S2"]}
    assert studies("--date", "-2020") == {u["S1"], u["S3"]}
    assert studies("--date", "202002-202012") == {u["S3"]}
    assert studies("--date", "2004") == set()
    # Filters combine (AND), where only the first given was used before.
    assert studies("--patient-id", "P1", "--date", "2020") == {u["S1"]}
    assert studies("--accession", "ACC1", "--patient-id", "P2") == set()
    assert studies("--study", u["S2"], "--date", "2020") == set()


def test_ls_modality_and_series_at_every_level(archive: Archive) -> None:
    u = archive.uids
    sops = {r["SOPInstanceUID"] for r in ls(archive, "instances", "--modality", "MR")}
    assert sops == archive.sops("R2", "R3")
    sops = {r["SOPInstanceUID"] for r in ls(archive, "instances", "--study", u["S1"], "--modality", "CT")}
    assert sops == archive.sops("R1")
    assert ls(archive, "instances", "--series", u["R1"], "--study", u["S2"]) == []
    assert ls(archive, "series", "--series", u["R1"], "--study", u["S2"]) == []
    assert [r["SeriesInstanceUID"] for r in ls(archive, "series", "--series", u["R3"])] == [u["R3"]]
    assert len(ls(archive, "instances", "--limit", "1")) == 1
    assert len(ls(archive, "instances", "--limit", "0")) == 9


@pytest.mark.parametrize("args", [
    ("instances", "--limit", "-1"),
    ("studies", "--date", "2004x"),
    ("studies", "--date", "20041340"),
    ("studies", "--date", "200"),
    ("studies", "--date", "-"),
    ("studies", "--series", "1.2.3"),
    ("patients", "--series", "1.2.3"),
    ("stuff",),
])
def test_ls_refuses_what_it_cannot_filter(archive: Archive, args: tuple[str, ...]) -> None:
    runner = CliRunner()
    config = ["-c", str(archive.server.config_path)]
    result = runner.invoke(app, ["ls", *args, *config])
    assert result.exit_code == errors.EXIT_USAGE, result.output
    assert "Traceback" not in result.output
    as_json = runner.invoke(app, ["ls", *args, *config, "--json"])
    assert as_json.exit_code == errors.EXIT_USAGE
    assert json.loads(as_json.stdout)["exit"] == errors.EXIT_USAGE


# ---- errors: one line, an exit code, JSON with --json ------------------------------------------------


def test_export_to_a_file_is_one_line(archive: Archive, tmp_path: Path) -> None:
    existing = tmp_path / "taken.dcm"
    existing.write_bytes(b"x")
    study = archive.uids["S1"]
    stderr = one_error_line(archive.server.cli("export", study, str(existing), check=False), errors.EXIT_USAGE)
    assert "exists and is not a folder" in stderr
    assert "exists and is not a folder" in json_error(
        archive.server.cli("export", study, str(existing), "--json", check=False), errors.EXIT_USAGE)
    # Below a file: the OS refuses (NotADirectoryError), the safety net makes it one line.
    stderr = one_error_line(archive.server.cli("export", study, str(existing / "sub"), check=False),
                            errors.EXIT_FAILURE)
    assert str(existing) in stderr and existing.read_bytes() == b"x"


def test_errors_as_json(archive: Archive, tmp_path: Path) -> None:
    server = archive.server
    assert UNKNOWN in json_error(server.cli("show", UNKNOWN, "--json", check=False), errors.EXIT_NOT_FOUND)
    assert UNKNOWN in one_error_line(server.cli("show", UNKNOWN, check=False), errors.EXIT_NOT_FOUND)
    (tmp_path / "bad.toml").write_text("[server]\nport = 'eleven'\n")
    for command in (["status"], ["ls", "studies"], ["show", UNKNOWN], ["verify"], ["audit"], ["tier", "status"]):
        result = subprocess.run([*APPLIANCE, *command, "--json", "-c", "bad.toml"], cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)
        assert "server.port" in json_error(result, errors.EXIT_CONFIG), command
    (tmp_path / "empty").mkdir()
    no_index = write_config(tmp_path / "empty")
    result = subprocess.run([*APPLIANCE, "ls", "studies", "--json", "-c", str(no_index)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert "no index" in json_error(result, errors.EXIT_NOT_FOUND)


def test_usage_errors_keep_exit_2(tmp_path: Path) -> None:
    # An empty or absurd UID is refused before it reaches the index (LMDB raised BadValsizeError, a traceback).
    for args in (["audit", "--since", "yesterday-ish"], ["show"], ["ls", "studies", "--limit", "x"], ["show", ""],
                 ["show", "1" * 300], ["export", "", "out"], ["tier", "recall", "1.2", ""],
                 ["ls", "series", "--study", ""], ["find", "PACS", "--limit", "-1"],
                 ["move", "--host", "127.0.0.1", "--port", "99999", "--aet", "X", "-k", "StudyInstanceUID=1"]):
        result = subprocess.run([*APPLIANCE, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        one_error_line(result, errors.EXIT_USAGE)
    result = subprocess.run([*APPLIANCE, "show", "", "--json"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert "is not a UID" in json_error(result, errors.EXIT_USAGE)


# ---- human units and times, raw in --json ------------------------------------------------------------


def test_show_and_ls_human_times_and_sizes(archive: Archive) -> None:
    server = archive.server
    ds = archive.instances["R1"][0]
    raw = server.cli_json("show", ds.SOPInstanceUID)
    assert isinstance(raw["received_ns"], int) and isinstance(raw["size"], int)
    human = dict(line.strip().split(": ", 1) for line in server.cli("show", ds.SOPInstanceUID).stdout.splitlines())
    when = datetime.fromisoformat(human["received"])
    assert when.tzinfo is not None and abs(when.timestamp() - raw["received_ns"] / 1e9) < 1
    assert human["size"].endswith((" kB", " KB", " MB")) and str(raw["size"]) not in human["size"]
    table = server.cli("ls", "instances", "--series", archive.uids["R1"]).stdout
    assert str(raw["size"]) not in table and (" KB" in table or " kB" in table)


# ---- a re-sent instance is never silent ---------------------------------------------------------------


def test_a_re_sent_instance_is_counted_in_the_end_line_and_the_audit(
        make_server: Callable[..., ServerHandle]) -> None:
    from tests.integration.test_audit import wait_audit
    from tests.integration.test_cli_metrics import CT, make_instance, send

    server = make_server()  # duplicate_policy keep-first (the default): the first version stays
    datasets = [make_instance(CT, "P1", "1.2.3.1", "1.2.3.1.1", number=i) for i in range(3)]
    assert send(server.port, datasets) == [0, 0, 0]
    wait_for(lambda: "association from CLITEST" in server.log(), 30, what="the first association's line")
    for ds in datasets[:2]:
        ds.SeriesDescription = "other bytes"
    assert send(server.port, datasets) == [0, 0, 0]  # Success for all three: DICOM wants it so (PS3.4 B.2.3)
    wait_for(lambda: server.log().count("association from CLITEST") == 2, 30, what="the second association's line")
    first, second = [line for line in server.log().splitlines() if "association from CLITEST" in line]
    assert "re-sent" not in first
    assert second.endswith("; re-sent: 1 identical, 2 kept-first"), second
    assocs = wait_audit(server.config_path, lambda lines: len(lines) == 2, "--event", "association")
    assert [x.get("duplicates") for x in assocs] == [None, {"identical": 1, "kept-first": 2}]
    assert server.cli_json("status")["counts"]["instances"] == 3
