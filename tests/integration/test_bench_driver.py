"""bench/driver.py (appliance bench run), bench/discard.py and bench/report.py against a real appliance, with tiny
parameters: every scenario stores what it says, the report has its schema, the discard receiver keeps nothing."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO

from bench import driver, report
from tests.conftest import ServerHandle, wait_for

SCENARIOS = {
    # scenario: (extra arguments, instances expected)
    "ct-burst": (["--count", "20", "--associations", "2"], 20),
    "morning-rush": (["--count", "10", "--associations", "1"], 3 * 10 + 2 * 10 + 1),
    "sustained": (["--rate", "20", "--duration", "2", "--associations", "2", "--ceiling-seconds", "1"], 40),
    "many-small-associations": (["--count", "20", "--associations", "4"], 20),
}


def run_driver(server: ServerHandle, tmp_path: Path, scenario: str, extra: list[str], *more: str) -> tuple[
        int, dict[str, Any]]:
    out = tmp_path / f"{scenario}.json"
    rc = driver.main(["--scenario", scenario, "--target", f"127.0.0.1:{server.port}", "--ae", "APPLIANCE",
                      "--server-pid", str(server.proc.pid if server.proc else 0),
                      "--metrics-url", f"http://127.0.0.1:{server.metrics_port}/metrics",
                      "--json", str(out), "--no-plots", "--quiet", "--tmp", str(tmp_path), *extra, *more])
    return rc, json.loads(out.read_text())


def instances(server: ServerHandle) -> int:
    return int(server.cli_json("status")["counts"]["instances"])


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_scenario_against_the_appliance(server: ServerHandle, tmp_path: Path, scenario: str) -> None:
    extra, expected = SCENARIOS[scenario]
    before = instances(server)
    rc, doc = run_driver(server, tmp_path, scenario, extra)
    assert rc == 0, doc["summary"]
    assert report.validate(doc) == []
    target = [r for r in doc["runs"] if r["role"] == "target"]
    ceiling = [r for r in doc["runs"] if r["role"] == "ceiling"]
    assert len(target) == 1 and len(ceiling) == 1
    run = target[0]
    statuses = run["samples"]["stores"]["status"]
    assert len(statuses) == expected and set(statuses) == {0}
    assert instances(server) - before == expected  # every Success is in the index, nothing else is
    s = run["summary"]
    assert s["instances_ok"] == expected and s["failures"] == 0 and s["failures_by_status"] == {}
    lat = s["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert s["instances_per_s"] > 0 and s["mb_per_s"] > 0
    assert s["associations_opened"] >= 1 and s["associations_failed"] == 0 and s["setup_ms"]["p50"] > 0
    if scenario == "many-small-associations":
        assert s["associations_opened"] == expected  # one instance per association
    if scenario == "morning-rush":
        assert set(run["samples"]["associations"]["calling_ae"]) == {"CT01", "CT02", "CT03", "MR01", "MR02", "DX01"}
    if scenario == "sustained":
        assert s["offered_rate"] == 20 and 1.5 < s["wall_s"] < 10
        assert s["queue_ms"]["p50"] is not None
    # The receiver's side: CPU and memory of its process tree, and the per-stage breakdown from /metrics.
    assert run["server"]["cpu_s"] > 0 and run["server"]["peak_rss_bytes"] > 10e6 and run["server"]["processes"] >= 2
    metrics = run["metrics"]
    assert metrics["instances_stored"] == expected
    for stage in driver.STAGES:
        assert metrics["stages"][stage]["count"] == expected, stage
        assert metrics["stages"][stage]["mean_ms"] >= 0, stage
    assert metrics["stages"]["total"]["mean_ms"] > 0 and metrics["stages"]["receive"]["mean_ms"] > 0
    assert metrics["commits"] >= 1 and metrics["batch_size_mean"] >= 1
    # The driver ceiling ran against the discard receiver, and stored nothing in the appliance.
    c = ceiling[0]
    assert c["system"] == "discard" and c["summary"]["failures"] == 0 and c["summary"]["instances_ok"] > 0
    assert doc["config"]["ceiling"]["counters"]["instances"] == c["summary"]["instances_ok"]
    assert doc["summary"]["ok"] is True
    row = next(r for r in doc["summary"]["rows"] if r["role"] == "target")
    if scenario == "sustained":
        assert row["driver_can_offer_rate"] is True and "fraction_of_driver_ceiling" not in row
    else:
        assert 0 < row["fraction_of_driver_ceiling"] == pytest.approx(s["instances_per_s"] / c["summary"]["instances_per_s"],
                                                                      abs=1e-3)


def test_failures_are_reported_and_fail_the_run(server: ServerHandle, tmp_path: Path) -> None:
    out = tmp_path / "bad.json"
    rc = driver.main(["--scenario", "ct-burst", "--count", "4", "--associations", "2", "--target",
                      f"127.0.0.1:{server.port}", "--ae", "NOT_THE_AE", "--json", str(out), "--no-plots", "--quiet",
                      "--no-ceiling"])
    assert rc == 1
    doc = json.loads(out.read_text())
    s = doc["runs"][0]["summary"]
    assert s["instances_ok"] == 0 and s["failures_by_status"] == {"not-sent": 4}
    assert s["associations_failed"] == 2 and "AssociationRejected" in doc["runs"][0]["errors"][0]
    assert doc["summary"]["ok"] is False


# ---- the discard receiver -----------------------------------------------------------------------------


async def _send(port: int, items: list[driver.Instance]) -> list[int]:
    from appliance.net.client import ClientAssociation

    assoc = await ClientAssociation.open("127.0.0.1", port, "DISCARD", "TEST", driver._contexts(items))
    statuses = [await assoc.echo()]
    for inst in items:
        statuses.append(await assoc.store(inst.sop_class_uid, inst.sop_instance_uid, inst.transfer_syntax_uid,
                                          inst.dataset_bytes))
    # A C-STORE whose SOP class is not the one of its presentation context: the discard receiver refuses it.
    first = items[0]
    assoc.accepted[("1.2.3.4", first.transfer_syntax_uid)] = assoc.context_for(first.sop_class_uid,
                                                                               first.transfer_syntax_uid)
    statuses.append(await assoc.store("1.2.3.4", "1.2.3.4.5", first.transfer_syntax_uid, b"\x08\x00" * 8))
    await assoc.release()
    return statuses


def test_discard_receiver_answers_success_and_stores_nothing(tmp_path: Path) -> None:
    from bench import synth

    items = [driver.Instance(i.sop_class_uid, i.sop_instance_uid, i.transfer_syntax_uid, i.dataset_bytes)
             for i in synth.iter_instances("mr", 3, 7, None)]
    work = tmp_path / "discard"
    work.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "bench.discard", "--port-file", str(work / "port.json"),
                             "--stats-file", str(work / "stats.json")], cwd=work, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        wait_for(lambda: (work / "port.json").exists() or proc.poll() is not None, 30, what="discard port file")
        port = json.loads((work / "port.json").read_text())["port"]
        statuses = asyncio.run(_send(port, items))
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert statuses == [0, 0, 0, 0, 0x0122]
    stats = json.loads((work / "stats.json").read_text())
    assert stats == {"associations": 1, "instances": 3, "dataset_bytes": sum(len(i.dataset_bytes) for i in items)}
    assert sorted(p.name for p in work.rglob("*")) == ["stats.json"]  # no data kept, port file removed


# ---- data and report ----------------------------------------------------------------------------------


def test_rewrite_instance_uid_changes_only_that_element() -> None:
    from bench import synth

    for ts in (driver.EXPLICIT_LE, driver.IMPLICIT_LE):
        src = next(synth.iter_instances("mr", 1, 3, ts))
        inst = driver.Instance(src.sop_class_uid, src.sop_instance_uid, src.transfer_syntax_uid, src.dataset_bytes)
        uid = driver.new_uid()
        out = driver.rewrite_instance_uid(inst, uid)
        assert out.sop_instance_uid == uid and uid.encode() in out.dataset_bytes
        implicit = ts == driver.IMPLICIT_LE
        a = _decode(inst.dataset_bytes, implicit)
        b = _decode(out.dataset_bytes, implicit)
        assert str(b.SOPInstanceUID) == uid and str(a.SOPInstanceUID) == src.sop_instance_uid
        del a.SOPInstanceUID, b.SOPInstanceUID
        assert a == b
    with pytest.raises(ValueError):
        missing = driver.Instance("1.2", "9.9.9", driver.EXPLICIT_LE, b"\x08\x00\x18\x00UI\x02\x001\x00")
        driver.rewrite_instance_uid(missing, "1.2.3")


def _decode(data: bytes, implicit: bool) -> pydicom.Dataset:
    from pynetdicom.dsutils import decode

    return decode(DicomBytesIO(data), implicit, True)


def test_percentiles() -> None:
    assert report.percentile([], 50) is None
    assert report.percentile([3.0], 99) == 3.0
    values = [float(v) for v in range(1, 101)]
    assert report.percentile(values, 50) == pytest.approx(50.5)
    assert report.percentile(values, 99) == pytest.approx(99.01)
    assert report.percentile(list(reversed(values)), 100) == 100.0


def _fake_run(system: str, role: str, n: int, latencies: list[float]) -> dict[str, Any]:
    k = len(latencies)
    return {
        "system": system, "role": role, "scenario": "ct-burst", "mode": "streams", "associations": n,
        "associations_concurrent": n, "target": "127.0.0.1:1", "called_ae": "X", "offered_rate": None,
        "duration_s": None, "planned_instances": k, "wall_s": 0.5, "driver_cpu_s": 0.1, "server": None,
        "metrics": {"stages": {s: {"count": k, "sum_s": 0.01 * k, "mean_ms": 10.0} for s in driver.STAGES},
                    "commits": 2, "batch_size_mean": k / 2, "instances_stored": k, "bytes_stored": 10 * k,
                    "failures_by_status": {}} if role == "target" else None,
        "errors": [],
        "samples": {
            "stores": {"t_s": [0.01 * i for i in range(k)], "latency_s": latencies, "queue_s": [None] * k,
                       "status": [0] * (k - 1) + [0xA700], "bytes": [1000] * k, "association": [0] * k,
                       "error": [None] * k},
            "associations": {"calling_ae": ["CT01"], "setup_s": [0.002], "ok": [True], "error": [None]},
        },
    }


def test_report_writes_json_markdown_and_plots(tmp_path: Path) -> None:
    runs = [_fake_run(system, role, n, [0.001 * (i + 1) * n for i in range(20)])
            for n in (1, 4) for system, role in (("appliance", "target"), ("discard", "ceiling"))]
    doc = report.build_document(["--scenario", "ct-burst"], {"scenario": "ct-burst", "target": "x", "called_ae": "X",
                                                             "rate": None, "duration": None},
                                {"CT01": {"profile": "ct", "source": "test", "instances": 20, "bytes": 20000,
                                          "mean_bytes": 1000}}, runs)
    paths = report.write_all(doc, tmp_path / "r" / "run.json")
    loaded = json.loads(paths["json"].read_text())
    assert report.validate(loaded) == []
    assert loaded["schema_version"] == report.SCHEMA_VERSION == 1
    for key in ("machine", "versions", "config", "data", "runs", "summary"):
        assert loaded[key], key
    assert loaded["versions"]["pynetdicom"] and loaded["machine"]["cpu_count"] >= 1
    s = loaded["runs"][0]["summary"]
    assert s["instances_ok"] == 19 and s["failures_by_status"] == {"0xA700": 1} and loaded["summary"]["ok"] is False
    assert s["instances_per_s"] == pytest.approx(38.0)
    assert s["latency_ms"]["p50"] <= s["latency_ms"]["p99"] <= s["latency_ms"]["max"] == pytest.approx(19.0)
    rows = loaded["summary"]["rows"]
    assert [r["fraction_of_driver_ceiling"] for r in rows if r["role"] == "target"] == [1.0, 1.0]
    md = paths["markdown"].read_text()
    assert "| appliance | ct-burst | 4 |" in md and "discard (ceiling)" in md and "0xA700" in md and "batch size" in md
    assert len(paths["plots"]) == 2
    for png in paths["plots"]:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    # Merging reports: the command line of bench.report.
    assert report.main([str(paths["json"]), str(paths["json"]), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged.md").read_text().count("| appliance | ct-burst | 1 | 19 | 1 |") == 2
    assert (tmp_path / "merged-throughput.png").stat().st_size > 5000
    bad = dict(loaded, schema_version=99)
    del bad["machine"]
    assert set(report.validate(bad)) == {"missing machine", "schema_version 99 is not 1"}
