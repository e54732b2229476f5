"""bench.compare --scenario (bench/sidebyside.py): one driver scenario against the appliance and storescp --fork,
sent by our driver and by DCMTK storescu, with tiny parameters (~10 s). Orthanc is never started here: it is
reported as not installed (forced, so the test is the same whether or not the machine has it) and skipped.
The statistics of the compare section (medians, ratios of medians and per repeat) are also checked on synthetic
samples, without any receiver."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import compare, receivers, report, sidebyside_report
from bench.monitor import STAGES
from tests.conftest import require_dcmtk


def test_side_by_side_ct_burst(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    require_dcmtk()
    monkeypatch.setattr(receivers.OrthancReceiver, "available", staticmethod(lambda: "Orthanc is not installed"))
    out = tmp_path / "results" / "side.json"
    rc = compare.main(["--scenario", "ct-burst", "--count", "20", "--associations", "2", "--repeats", "1",
                       "--receivers", "appliance,storescp,orthanc", "--clients", "driver,storescu",
                       "--cache", str(tmp_path / "cache"), "--tmp", str(tmp_path), "--out", str(out),
                       "--timeout", "120", "--hardware-seconds", "0.1"])
    captured = capsys.readouterr()
    assert "SKIPPING orthanc: Orthanc is not installed" in captured.err
    doc = json.loads(out.read_text())
    assert rc == 0, [s["errors"] for s in doc["compare"]["samples"]]
    assert report.validate(doc) == []
    assert sidebyside_report.validate_compare(doc) == []

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
    # Receivers take turns going first from one cell (client) to the next.
    assert {s["receiver"] for s in samples if s["position"] == 0} == {"appliance-w2", "storescp"}
    for s in samples:
        if s["client"] == "driver":  # per-C-STORE latency from driver.run_one
            lat = s["latency_ms"]
            assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        else:
            assert s["latency_ms"] is None
        if s["receiver"] == "appliance-w2":  # the appliance's /metrics, scraped before and after, either client
            assert set(s["stages_ms"]) == set(STAGES)
            assert all(s["stages_ms"][st] is not None and s["stages_ms"][st] >= 0 for st in STAGES)
            assert s["batch_size_mean"] >= 1 and s["commits"] >= 1
        else:
            assert s["stages_ms"] is None and s["batch_size_mean"] is None
        if receivers.disk_io(tmp_path) is not None:  # the block device's counters, where /sys has them
            assert s["disk"]["bytes_written"] > 0
            if s["receiver"] == "appliance-w2":  # fsyncs (concurrent ones may share a flush request)
                assert s["disk"]["flushes"] > 0, s["disk"]

    assert len(c["medians"]) == 4 and all(r["ok_runs"] == r["runs"] == 1 for r in c["medians"])
    hw = c["hardware"]
    assert hw["skipped"] is None and hw["threads"] == 8
    ceiling = hw["ceilings"]["ct-burst"]
    assert ceiling["files_per_s"] > 0 and ceiling["file_bytes"] > 100_000  # a 512x512 16-bit CT slice
    assert [g["instances"] for g in ceiling["sizes"]] == [20] and ceiling["sizes"][0]["files_per_s"] == pytest.approx(
        ceiling["files_per_s"], rel=1e-2)  # one size: the scenario rate is that size's rate
    for r in c["medians"]:
        assert (r["latency_ms"] is not None) == (r["client"] == "driver")
        assert (r["stages_ms"] is not None) == (r["receiver"] == "appliance-w2")
        assert r["durable_ceiling_instances_per_s"] == ceiling["files_per_s"]
        # Rounded to 3 decimals in the report: a small ratio needs the absolute tolerance.
        assert r["of_durable_ceiling"] == pytest.approx(r["instances_per_s"] / ceiling["files_per_s"], rel=1e-2,
                                                        abs=1e-3)
    assert {(r["client"], r["appliance"]) for r in c["ratios"]} == {("driver", "appliance-w2"),
                                                                     ("storescu", "appliance-w2")}
    for r in c["ratios"]:
        assert r["vs_storescp"] is not None and r["vs_storescp"] > 0
        assert r["vs_orthanc"] is None  # skipped
        assert r["vs_storescp"] == pytest.approx(r["appliance_instances_per_s"] / r["storescp_instances_per_s"],
                                                 rel=1e-2)
        assert r["vs_storescp_per_repeat"] == [pytest.approx(r["vs_storescp"], rel=1e-2)]  # one repeat
        assert r["vs_storescp_per_repeat_min"] == r["vs_storescp_per_repeat_max"] == r["vs_storescp_per_repeat"][0]
        assert r["vs_orthanc_per_repeat"] == [] and r["vs_orthanc_per_repeat_median"] is None

    # The driver runs are ordinary bench/report.py runs (raw samples, summaries), one per receiver.
    assert sorted(r["system"] for r in doc["runs"]) == ["appliance-w2", "storescp"]
    assert all(r["summary"]["instances_ok"] == 20 and r["summary"]["failures"] == 0 for r in doc["runs"])

    md = out.with_suffix(".md").read_text()
    assert "| scenario | client | N | appliance | inst/s | vs storescp" in md
    assert "| ct-burst | storescu | 2 | appliance-w2 |" in md
    assert "orthanc: SKIPPED" in md
    assert "| p50 ms | p99 ms |" in md and "| ct-burst (20) | storescu | 2 | storescp | " in md
    assert "| scenario | client | N | receiver | receive | fsync | queue | index | total | batch size |" in md
    assert "Durable ceiling of this disk" in md and "- ct-burst: " in md
    for name in ("side-throughput.png", "side-latency-cdf.png"):  # the CDF: driver runs, one curve per receiver
        assert (out.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert {r["system"] for r in doc["runs"] if r.get("client") == "driver"} == {"appliance-w2", "storescp"}
    assert "Ratios of instances/s" in captured.out


# ---- the statistics, on synthetic samples -------------------------------------------------------------


def _sample(receiver: str, repeat: int, rate: float | None, client: str = "driver", n: int = 4,
            scenario: str = "ct-burst", ok: bool = True, **extra: object) -> dict[str, object]:
    return {"receiver": receiver, "client": client, "scenario": scenario, "associations": n, "repeat": repeat,
            "instances": 100, "instances_per_s": rate, "mb_per_s": rate, "wall_s": 1.0, "receiver_cpu_s": 1.0,
            "client_cpu_s": 1.0, "machine_busy_s": 2.0, "ok": ok, "errors": [] if ok else ["boom"],
            "latency_ms": None, "stages_ms": None, "batch_size_mean": None, "commits": None, **extra}


def test_per_repeat_ratios() -> None:
    samples = [
        # repeat 0: appliance 100, storescp 400, orthanc 50 -> 0.25, 2.0
        _sample("appliance-w2", 0, 100.0), _sample("storescp", 0, 400.0), _sample("orthanc", 0, 50.0),
        # repeat 1: appliance 300, storescp 500, orthanc 200 -> 0.6, 1.5
        _sample("appliance-w2", 1, 300.0), _sample("storescp", 1, 500.0), _sample("orthanc", 1, 200.0),
        # repeat 2: appliance 200, storescp 1000; orthanc failed -> 0.2 only
        _sample("appliance-w2", 2, 200.0), _sample("storescp", 2, 1000.0), _sample("orthanc", 2, None, ok=False),
        # another client and N: kept apart
        _sample("appliance-w2", 0, 10.0, client="storescu"), _sample("storescp", 0, 20.0, client="storescu"),
        _sample("appliance-w2", 0, 90.0, n=8), _sample("orthanc", 0, 30.0, n=8),
    ]
    per = sidebyside_report.per_repeat_ratios(samples)
    assert per[("ct-burst", "driver", 4, "appliance-w2", "storescp")] == [0.25, 0.6, 0.2]  # repeat order
    assert per[("ct-burst", "driver", 4, "appliance-w2", "orthanc")] == [2.0, 1.5]  # repeat 2's orthanc failed
    assert per[("ct-burst", "storescu", 4, "appliance-w2", "storescp")] == [0.5]
    assert per[("ct-burst", "driver", 8, "appliance-w2", "orthanc")] == [3.0]
    assert ("ct-burst", "storescu", 4, "appliance-w2", "orthanc") not in per

    rows = sidebyside_report.medians(samples)
    by = {(r["client"], r["associations"], r["receiver"]): r for r in rows}
    assert by[("driver", 4, "appliance-w2")]["instances_per_s"] == 200.0
    assert by[("driver", 4, "orthanc")]["instances_per_s"] == 125.0 and by[("driver", 4, "orthanc")]["ok_runs"] == 2
    ratios = {(r["client"], r["associations"]): r for r in sidebyside_report.ratios(rows, samples)}
    r = ratios[("driver", 4)]
    assert r["vs_storescp"] == pytest.approx(200.0 / 500.0, abs=1e-3)  # ratio of the medians
    assert r["vs_storescp_per_repeat"] == [0.25, 0.6, 0.2]
    assert (r["vs_storescp_per_repeat_median"], r["vs_storescp_per_repeat_min"],
            r["vs_storescp_per_repeat_max"]) == (0.25, 0.2, 0.6)
    assert r["vs_orthanc"] == pytest.approx(200.0 / 125.0, abs=1e-3)
    assert r["vs_orthanc_per_repeat_median"] == pytest.approx(1.75)
    assert (r["vs_orthanc_per_repeat_min"], r["vs_orthanc_per_repeat_max"]) == (1.5, 2.0)
    s = ratios[("storescu", 4)]
    assert s["vs_storescp_per_repeat"] == [0.5] and s["vs_orthanc"] is None and s["vs_orthanc_per_repeat"] == []
    assert s["vs_orthanc_per_repeat_median"] is s["vs_orthanc_per_repeat_min"] is None
    # Without samples (an older caller): the per-repeat fields are empty, the ratios of medians unchanged.
    assert sidebyside_report.ratios(rows)[0]["vs_storescp_per_repeat"] == []


def test_medians_of_latency_stages_and_ceiling() -> None:
    stages = [{st: float(i + k) for k, st in enumerate(STAGES)} for i in range(3)]
    samples = [
        _sample("appliance-w2", i, 100.0 + i, latency_ms={"p50": 1.0 + i, "p95": 2.0, "p99": 3.0 + i, "max": 9.0,
                                                          "mean": 1.5},
                stages_ms=stages[i], batch_size_mean=2.0 + i, commits=10) for i in range(3)
    ] + [_sample("appliance-w2", 3, None, ok=False, latency_ms={"p50": 99.0, "p95": 99.0, "p99": 99.0, "max": 99.0},
                 stages_ms=stages[0])]
    samples.append(_sample("storescp", 0, 400.0, client="storescu"))
    rows = {r["receiver"]: r for r in sidebyside_report.medians(samples, {"ct-burst": 200.0})}
    a = rows["appliance-w2"]
    assert a["runs"] == 4 and a["ok_runs"] == 3  # the failed run counts in neither median
    assert a["latency_ms"] == {"p50": 2.0, "p95": 2.0, "p99": 4.0, "max": 9.0}
    assert a["stages_ms"] == {st: float(1 + k) for k, st in enumerate(STAGES)}
    assert a["batch_size_mean"] == 3.0
    assert a["durable_ceiling_instances_per_s"] == 200.0 and a["of_durable_ceiling"] == pytest.approx(0.505)
    st = rows["storescp"]
    assert st["latency_ms"] is None and st["stages_ms"] is None and st["batch_size_mean"] is None
    assert st["of_durable_ceiling"] == 2.0  # a no-fsync receiver above what the disk can make durable

    doc = {"created": "now", "versions": {"git_commit": "abc"},
           "machine": {"cpu_count": 2, "cpu_model": "x", "kernel": "k", "python": "3", "loadavg_at_start": [0, 0, 0]},
           "compare": {"scenarios": ["ct-burst"], "repeats": 4, "receivers": {}, "skipped": {}, "samples": samples,
                       "medians": list(rows.values()), "ratios": sidebyside_report.ratios(list(rows.values()), samples),
                       "hardware": {"skipped": "--no-hardware", "ceilings": {}}}}
    md = sidebyside_report.compare_markdown(doc)
    assert "Durable ceiling: not measured (--no-hardware)." in md
    assert "| 2.00 | 4.00 |" in md  # appliance p50 / p99
    assert "| ct-burst (100) | storescu | 4 | storescp | 400.0 | 400.0-400.0 | 400.0 | - | - |" in md
    assert "| ct-burst | driver | 4 | appliance-w2 | 1.00 | 2.00 | 3.00 | 4.00 | 5.00 | 3.00 | 3/4 |" in md
    del doc["compare"]["hardware"]  # a document from before the field: still renders
    assert "Durable ceiling" not in sidebyside_report.compare_markdown(doc)


def test_mixed_ceiling_adds_up_each_sizes_time() -> None:
    """600 CT at 1,000/s take 0.6 s, 400 MR at 4,000/s 0.1 s, 20 DX at 50/s 0.4 s: 1,020 in 1.1 s."""
    from bench.sidebyside import mixed_ceiling

    rate = mixed_ceiling([(600, 525_000), (400, 131_000), (20, 8_400_000)],
                         {525_000: 1000.0, 131_000: 4000.0, 8_400_000: 50.0})
    assert rate == pytest.approx(1020 / 1.1)
    assert mixed_ceiling([(10, 1)], {1: 123.0}) == pytest.approx(123.0)
    assert mixed_ceiling([(10, 1), (5, 2)], {1: 100.0, 2: 0.0}) == 0.0  # a size the probe could not write


def test_probe_sizes_within_five_percent_share_one_probe() -> None:
    from bench.sidebyside import _probe_size

    measured = {525_478: (900.0, 470.0)}
    assert _probe_size(525_477, measured) == 525_478  # morning-rush's CT and ct-burst's: one probe
    assert _probe_size(131_000, measured) is None
    assert _probe_size(8_400_000, measured) is None


def test_rotated() -> None:
    assert receivers.rotated(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert receivers.rotated(["a", "b", "c"], 4) == ["b", "c", "a"]
    assert receivers.rotated([], 3) == []
