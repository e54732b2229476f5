"""appliance bench datasheet: every step against real receivers (the appliance, DCMTK storescp; Orthanc forced
to "not installed" so the test is the same on every machine), tiny sizes, then the summary's numbers and target
verdicts are checked against the step reports they come from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import datasheet, receivers
from tests.conftest import require_dcmtk


def test_datasheet_quick(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_dcmtk()
    monkeypatch.setattr(receivers.OrthancReceiver, "available", staticmethod(lambda: "Orthanc is not installed"))
    out = tmp_path / "sheet"
    rc = datasheet.main(["--out", str(out), "--tmp", str(tmp_path), "--cache", str(tmp_path / "cache"), "--quick",
                         "--count", "6", "--associations", "2", "--sustained-seconds", "2", "--hardware-seconds",
                         "0.3", "--workers", "1"])
    assert rc == 0
    for name in ("hardware", "compare", "mr-max", "sustained", "many-small", "datasheet"):
        assert (out / f"{name}.json").exists(), name
    doc = json.loads((out / "datasheet.json").read_text())
    assert doc["ok"] is True
    assert doc["hardware"]["results"]["fsync_512kib_t8_files_per_s"] > 0
    assert set(doc["durable_ceiling"]) == {"ct-burst", "morning-rush"}
    assert {(r["scenario"], r["client"]) for r in doc["compare"]["ratios"]} == {
        (s, c) for s in ("ct-burst", "morning-rush") for c in ("driver", "storescu")}
    assert all(r["vs_orthanc"] is None and r["vs_storescp"] > 0 for r in doc["compare"]["ratios"])

    # The sustained rate is --load of the MR maximum measured in step 3, and the numbers are the reports'.
    mr_max = json.loads((out / "mr-max.json").read_text())
    mr_rate = next(r["instances_per_s"] for r in mr_max["summary"]["rows"] if r["role"] == "target")
    assert doc["mr_max"]["instances_per_s"] == mr_rate
    assert doc["sustained"]["offered_rate"] == pytest.approx(0.5 * mr_rate, abs=0.1)
    sustained = json.loads((out / "sustained.json").read_text())
    assert sustained["config"]["rate"] == pytest.approx(doc["sustained"]["offered_rate"], abs=0.1)
    assert doc["sustained"]["failures"] == 0

    worst_scp = min(r["vs_storescp"] for r in doc["compare"]["ratios"])
    scp = next(t for t in doc["targets"] if "storescp" in t["target"])
    assert scp["measured"] == worst_scp and scp["met"] == (worst_scp >= 1.0)
    p99 = doc["sustained"]["latency_ms"]["p99"]
    sus = next(t for t in doc["targets"] if t["target"].startswith("sustained"))
    kept_up = doc["sustained"]["instances_per_s"] >= 0.95 * doc["sustained"]["offered_rate"]
    assert sus["measured"] == p99 and sus["met"] == (p99 < 20.0 and kept_up)
    orthanc = next(t for t in doc["targets"] if "Orthanc" in t["target"])
    assert orthanc["measured"] is None and orthanc["met"] is False  # not measured is not met
    headroom = next(t for t in doc["targets"] if t["target"].startswith("driver"))
    assert headroom["measured"] == min(doc["driver_headroom"].values()) > 0

    md = (out / "datasheet.md").read_text()
    assert "## Targets" in md and "## Ingest side by side" in md


def test_datasheet_is_an_appliance_command() -> None:
    # typer's help is a table 80 columns wide off a terminal: wide enough for every option's name in full
    result = subprocess.run([sys.executable, "-m", "appliance", "bench", "datasheet", "--help"], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "COLUMNS": "120"})
    assert result.returncode == 0 and "--sustained-seconds" in result.stdout


def test_datasheet_without_dcmtk_says_so_and_keeps_no_stale_report(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "sheet"
    out.mkdir()
    (out / "compare.json").write_text("{}")  # from an earlier run into the same folder
    monkeypatch.setattr(datasheet.shutil, "which", lambda name: None)
    assert datasheet.main(["--out", str(out), "--tmp", str(tmp_path), "--quick"]) == 2
    assert not (out / "compare.json").exists()
