"""bench.compare --scenario (bench/sidebyside.py): one driver scenario against the appliance and storescp --fork,
sent by our driver and by DCMTK storescu, with tiny parameters (~10 s). Orthanc is never started here: it is
reported as not installed (forced, so the test is the same whether or not the machine has it) and skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import compare, receivers, report
from tests.conftest import require_dcmtk


def test_side_by_side_ct_burst(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    require_dcmtk()
    monkeypatch.setattr(receivers.OrthancReceiver, "available", staticmethod(lambda: "Orthanc is not installed"))
    out = tmp_path / "results" / "side.json"
    rc = compare.main(["--scenario", "ct-burst", "--count", "20", "--associations", "2", "--repeats", "1",
                       "--receivers", "appliance,storescp,orthanc", "--clients", "driver,storescu",
                       "--cache", str(tmp_path / "cache"), "--tmp", str(tmp_path), "--out", str(out),
                       "--timeout", "120"])
    captured = capsys.readouterr()
    assert "SKIPPING orthanc: Orthanc is not installed" in captured.err
    doc = json.loads(out.read_text())
    assert rc == 0, [s["errors"] for s in doc["compare"]["samples"]]
    assert report.validate(doc) == []
    assert report.validate_compare(doc) == []

    c = doc["compare"]
    assert c["skipped"] == {"orthanc": "Orthanc is not installed"}
    assert set(c["receivers"]) == {"appliance-w2", "storescp"}
    samples = c["samples"]
    assert len(samples) == 2 * 2  # receivers x clients, one repeat, one N
    assert {(s["receiver"], s["client"]) for s in samples} == {
        (r, cl) for r in ("appliance-w2", "storescp") for cl in ("driver", "storescu")}
    for s in samples:
        assert s["ok"], s["errors"]
        assert s["instances"] == s["instances_ok"] == s["stored"] == 20
        assert s["instances_per_s"] > 0 and s["wall_s"] > 0 and s["associations"] == 2
    assert {s["processes_or_associations"] for s in samples} == {2}  # two associations / two storescu each

    assert len(c["medians"]) == 4 and all(r["ok_runs"] == r["runs"] == 1 for r in c["medians"])
    assert {(r["client"], r["appliance"]) for r in c["ratios"]} == {("driver", "appliance-w2"),
                                                                     ("storescu", "appliance-w2")}
    for r in c["ratios"]:
        assert r["vs_storescp"] is not None and r["vs_storescp"] > 0
        assert r["vs_orthanc"] is None  # skipped
        assert r["vs_storescp"] == pytest.approx(r["appliance_instances_per_s"] / r["storescp_instances_per_s"],
                                                 rel=1e-2)

    # The driver runs are ordinary bench/report.py runs (raw samples, summaries), one per receiver.
    assert sorted(r["system"] for r in doc["runs"]) == ["appliance-w2", "storescp"]
    assert all(r["summary"]["instances_ok"] == 20 and r["summary"]["failures"] == 0 for r in doc["runs"])

    md = out.with_suffix(".md").read_text()
    assert "| scenario | client | N | appliance | inst/s | vs storescp" in md
    assert "| ct-burst | storescu | 2 | appliance-w2 |" in md
    assert "orthanc: SKIPPED" in md
    png = out.parent / "side-throughput.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Ratios of median instances/s" in captured.out
