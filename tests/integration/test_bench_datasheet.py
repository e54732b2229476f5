"""appliance bench datasheet against real receivers (the appliance, DCMTK storescp; Orthanc forced to "not
installed" so that the test is the same on every machine and stays short), tiny bursts: the figures of the
datasheet are the step reports' own, every figure comes with its spread, and the HTML is one file with its plots.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import datasheet, receivers
from bench.bench_config import BENCH_FOLDER
from tests.conftest import require_dcmtk
from tests.unit.test_bench_datasheet_parts import site_file

TINY = ["--quick", "--count", "6", "--associations", "2", "--sustained-seconds", "2", "--hardware-seconds", "0.3"]


@pytest.fixture
def no_orthanc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(receivers.OrthancReceiver, "available", staticmethod(lambda: "Orthanc is not installed"))


@pytest.fixture
def unpinned() -> Iterator[None]:
    """--sender-cpus pins this process: undone after the test."""
    before = os.sched_getaffinity(0)
    yield None
    receivers.RECEIVER_CPUS = None
    os.sched_setaffinity(0, before)


def test_a_site_configuration_three_repeats(tmp_path: Path, no_orthanc: None, unpinned: None) -> None:
    require_dcmtk()
    config = site_file(tmp_path)  # two volumes, peers, a live audit path: bench/bench_config.py's job
    out = tmp_path / "sheet"
    pin = ["--sender-cpus", "0"] if len(os.sched_getaffinity(0)) > 1 else []
    rc = datasheet.main(["-c", str(config), "--out", str(out), "--cache", str(tmp_path / "cache"), *TINY,
                         "--repeats", "3", "--scenarios", "mr-burst", "--title", "Box <X1>", *pin])
    assert rc == 0
    doc = json.loads((out / "datasheet.json").read_text())
    assert doc["ok"] and doc["repeats"] == 3 and doc["problems"] == []
    assert doc["units"]["MB"] == "10^6 bytes" and doc["units"]["MiB"] == "2^20 bytes"
    assert isinstance(doc["machine"]["memory_bytes"], int)
    (disk,) = doc["disks"]  # the volumes and the index share this machine's one disk: probed once, named by both
    assert disk["holds"] == "volume raid-a, volume raid-b, the index" and disk["results"][
        "fsync_512kib_t8_files_per_s"]["n"] == 3
    assert doc["appliance"]["config"]["volumes"][1]["name"] == "raid-b"

    # Every throughput figure is the median, min and max of the step report's OK runs.
    samples = json.loads((out / "steps" / "compare.json").read_text())["compare"]["samples"]
    assert len(samples) == 3 * 2 * 2  # repeats x clients x receivers (appliance, storescp)
    assert all(s["ok"] for s in samples)
    for row in doc["throughput"]:
        rates = [s["instances_per_s"] for s in samples if (s["client"], s["receiver"]) == (row["client"],
                                                                                           row["receiver"])]
        assert row["instances_per_s"]["n"] == 3
        assert row["instances_per_s"]["median"] == pytest.approx(statistics.median(rates), abs=0.06)
        assert (row["instances_per_s"]["min"], row["instances_per_s"]["max"]) == pytest.approx(
            (min(rates), max(rates)), abs=0.06)
    assert {r["other"] for r in doc["ratios"]} == {"storescp"} and all(r["ratio"]["n"] == 3 for r in doc["ratios"])
    # The sustained rate is --load of the MR maximum of step 2 (the driver's appliance runs), 3 runs of it.
    mr = [s["instances_per_s"] for s in samples if s["client"] == "driver" and s["receiver"].startswith("appl")]
    assert doc["sustained"]["offered_rate"] == pytest.approx(0.5 * statistics.median(mr), abs=0.1)
    assert doc["sustained"]["repeats"] == 3 and doc["sustained"]["failures"] == 0
    assert doc["many_small_associations"]["instances_per_s"]["n"] == 3
    if pin:
        assert doc["sender"]["cpus"] == [0] and 0 not in doc["sender"]["receiver_cpus"]

    md = (out / "datasheet.md").read_text()
    assert re.search(r"\d \(\d[\d,.]*-\d[\d,.]*\)", md)  # figures with their range (the group was optional)
    assert "raid-a" in md and "not used by the benchmark: peers" in md and "MB = 10^6 bytes" in md
    for internal in ("target", "met", "TARGET", "issue"):  # wording for customers: no pass/fail rows
        assert not re.search(rf"\b{internal}\b", md), internal
    page = (out / "datasheet.html").read_text()
    assert page.count("data:image/png;base64,") >= 3 and "Box &lt;X1&gt;" in page
    assert "<script" not in page and 'src="http' not in page
    # The site's volumes hold nothing of the benchmark afterwards.
    assert not any((tmp_path / name / BENCH_FOLDER).exists() for name in ("a", "b", "meta"))


def test_a_running_appliance_as_target_with_a_storescp_beside_it(tmp_path: Path) -> None:
    require_dcmtk()
    appliance = receivers.ApplianceReceiver(tmp_path / "appliance", workers=1)
    scp = receivers.StorescpReceiver(tmp_path / "storescp")
    for receiver in (appliance, scp):
        receiver.workdir.mkdir()
    try:
        appliance.start()
        scp.start()
        out = tmp_path / "sheet"
        rc = datasheet.main(["--target", f"127.0.0.1:{appliance.port}", "--storescp", f"127.0.0.1:{scp.port}",
                             "--out", str(out), "--cache", str(tmp_path / "cache"), *TINY, "--scenarios",
                             "mr-burst"])
    finally:
        appliance.stop()
        scp.stop()
    assert rc == 0
    doc = json.loads((out / "datasheet.json").read_text())
    assert doc["disks"] == [] and doc["skipped"] == {"orthanc": "--orthanc HOST:PORT was not given"}
    assert {r["receiver"] for r in doc["throughput"]} == {"appliance", "storescp"}
    assert all(r["cpu_ms_per_instance"]["median"] is None for r in doc["throughput"])  # not readable from here
    md = (out / "datasheet.md").read_text()
    assert "Orthanc: not measured" in md and "appliance bench hardware" in md
    assert "not for quoting" in md  # --quick


@pytest.mark.parametrize("args, message", [
    (["--repeats", "2"], "at least 3"),
    (["--storescp", "127.0.0.1:1"], "beside --target"),
    (["--target", "127.0.0.1:1", "-c", "X"], "--target"),
    (["--scenarios", "ct-burst"], "mr-burst"),
])
def test_usage_errors_are_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    args = [str(tmp_path / "site.toml") if a == "X" else a for a in args]
    (tmp_path / "site.toml").write_text("")
    result = subprocess.run([sys.executable, "-m", "appliance", "bench", "datasheet", *args, "--out",
                             str(tmp_path / "o")], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_site_volume_that_is_not_mounted_is_refused(tmp_path: Path) -> None:
    require_dcmtk()
    config = site_file(tmp_path)
    shutil.rmtree(tmp_path / "b")
    (tmp_path / "b").mkdir()  # the empty mount point of an array that is not mounted
    result = subprocess.run([sys.executable, "-m", "appliance", "bench", "datasheet", "-c", str(config), "--out",
                             str(tmp_path / "o"), "--quick"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "raid-b" in result.stderr and "mount" in result.stderr


def test_datasheet_is_an_appliance_command() -> None:
    result = subprocess.run([sys.executable, "-m", "appliance", "bench", "datasheet", "--help"], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "COLUMNS": "160"})
    assert result.returncode == 0
    for option in ("--config", "--target", "--storescp", "--orthanc", "--sender-cpus", "--repeats", "--title"):
        assert option in result.stdout, option


def test_datasheet_without_dcmtk_says_so_and_keeps_no_stale_report(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "sheet"
    (out / "steps").mkdir(parents=True)
    (out / "datasheet.json").write_text("{}")  # from an earlier run into the same folder
    monkeypatch.setattr(datasheet.shutil, "which", lambda name: None)
    assert datasheet.main(["--out", str(out), "--quick"]) == 2
    assert not (out / "datasheet.json").exists()
