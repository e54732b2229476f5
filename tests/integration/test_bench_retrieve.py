"""bench.retrieve with tiny parameters: a 6-instance series moved and got from the appliance (Orthanc in the
slow test only), every instance arriving, the results written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import retrieve
from tests.conftest import require_dcmtk


def run(tmp_path: Path, targets: str) -> dict:
    out = tmp_path / "results" / "retrieve.json"
    rc = retrieve.main(["--count", "6", "--size", "32", "--repeats", "1", "--targets", targets, "--workers", "1",
                        "--cache", str(tmp_path / "cache"), "--tmp", str(tmp_path), "--out", str(out),
                        "--timeout", "120"])
    doc = json.loads(out.read_text())
    assert rc == 0, doc["runs"]
    assert out.with_suffix(".md").read_text().startswith("C-MOVE / C-GET of one series")
    return doc


def test_bench_retrieve_appliance(tmp_path: Path) -> None:
    require_dcmtk()
    doc = run(tmp_path, "appliance")
    assert {(r["target"], r["operation"]) for r in doc["summary"]} == {("appliance", "move"), ("appliance", "get")}
    assert all(r["ok"] and r["received"] == 6 for r in doc["runs"])
    assert not list(tmp_path.glob("bench-retrieve-*"))  # the work folder is removed


@pytest.mark.slow
def test_bench_retrieve_with_orthanc(tmp_path: Path) -> None:
    require_dcmtk()
    doc = run(tmp_path, "appliance,orthanc")
    assert {r["target"] for r in doc["summary"]} == {"appliance", "orthanc"}
