"""`appliance bench ...` as typer commands (issue 13): usage and errors like every other command, the burst cache in
the user's cache folder, `bench clean`; and one real quick command through a subprocess. No benchmark is run."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pydicom
import pytest
from typer.testing import CliRunner

from appliance.cli import app
from bench import synth
from tests.conftest import APPLIANCE

COMMANDS = ["clean", "synth", "run", "compare", "hardware", "datasheet", "find", "retrieve", "soak", "migrate",
            "recall", "compress"]
runner = CliRunner()


@pytest.mark.parametrize("name", COMMANDS)
def test_help_names_the_command(name: str) -> None:
    result = runner.invoke(app, ["bench", name, "--help"], prog_name="appliance")
    assert result.exit_code == 0, result.output
    assert f"appliance bench {name}" in result.output


@pytest.mark.parametrize("argv", [
    ["run", "--scenario", "ct-burst", "--target", "127.0.0.1:104", "--associations", "4,x"],
    ["run", "--scenario", "ct-burst", "--target", "nohost"],
    ["run", "--scenario", "no-such", "--target", "127.0.0.1:104"],
    ["compare", "--scenarios", "ct,xr"],
    ["compare", "--receivers", "appliance,pacs"],
    ["compare", "--scenario", "ct-burst", "--clients", "x"],
    ["datasheet", "-a", "0"],
    ["synth", "--count", "many"],
    ["synth", "--profile", "pet"],
    ["hardware", "--seconds", "0"],
    ["migrate", "--tier", "tape"],
    ["soak", "-a", "0"],
])
def test_a_bad_value_is_a_usage_error(argv: list[str]) -> None:
    result = runner.invoke(app, ["bench", *argv])
    assert result.exit_code == 2, result.output
    assert "Invalid value" in result.output and "<lambda>" not in result.output
    assert "Traceback" not in result.output


def test_a_bad_value_with_json_is_one_json_line() -> None:
    result = runner.invoke(app, ["bench", "compare", "--scenarios", "xr", "--json"])
    assert result.exit_code == 2
    assert json.loads(result.stdout)["exit"] == 2


def test_cache_is_in_the_users_cache_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("BENCH_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert synth.default_cache() == tmp_path / "xdg" / "appliance" / "bench"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert synth.default_cache() == Path.home() / ".cache" / "appliance" / "bench"
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "mine"))
    assert synth.default_cache() == tmp_path / "mine"


def test_clean_removes_the_cache_and_says_what_it_frees(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "ct-1").mkdir(parents=True)
    (cache / "ct-1" / "a.dcm").write_bytes(b"x" * 2_500_000)
    monkeypatch.setenv("BENCH_CACHE", str(cache))
    refused = runner.invoke(app, ["bench", "clean"], input="n\n")
    assert refused.exit_code == 1 and cache.exists()
    result = runner.invoke(app, ["bench", "clean", "--yes"])
    assert result.exit_code == 0, result.output
    assert "2.5 MB freed" in result.output and not cache.exists()
    again = runner.invoke(app, ["bench", "clean", "--yes"])
    assert again.exit_code == 0 and "nothing to remove" in again.output


def test_synth_into_a_folder_through_a_subprocess(tmp_path: Path) -> None:
    out = tmp_path / "study"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    env.pop("BENCH_CACHE", None)
    result = subprocess.run([*APPLIANCE, "bench", "synth", "--profile", "ct", "--count", "3", "--size", "64",
                             "--out", str(out)], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    files = sorted(out.rglob("*.dcm")) or sorted(p for p in out.rglob("*") if p.is_file())
    assert len(files) == 3
    assert pydicom.dcmread(files[0]).Rows == 64
    assert not (tmp_path / "xdg").exists()  # --out writes no cache


def test_hardware_json_on_stdout_and_report_in_out(tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = subprocess.run([*APPLIANCE, "bench", "hardware", "--seconds", "1", "--dir", str(tmp_path),
                             "--out", str(out), "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)  # the table went to stderr: stdout is the JSON alone
    assert doc["seconds"] == 1 and doc["results"]["pagecache_write_mb_per_s"] > 0
    assert json.loads((out / "hardware.json").read_text()) == doc


@pytest.mark.parametrize(("argv", "hidden"), [
    (["synth", "--k", "x"], "--k"), (["compare", "--k", "1,x"], "--k"), (["run", "--scenario", "ct-burst",
                                                                         "--start-appliance", "-n", "0"], "-n"),
])
def test_old_spellings_are_checked_and_hidden(argv: list[str], hidden: str) -> None:
    result = runner.invoke(app, ["bench", *argv])
    assert result.exit_code == 2 and "Invalid value" in result.output
    help_text = runner.invoke(app, ["bench", argv[0], "--help"], env={"COLUMNS": "200"}).output
    assert f" {hidden} " not in help_text and f" {hidden}," not in help_text
