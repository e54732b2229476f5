"""The audit trail and the quiet log against a real appliance and real DCMTK peers (storescu, findscu, movescu to
storescp, getscu), read back with `appliance audit --json`; a tier run's migrate and delete lines (docs/operations.md
"Audit trail", "Logs")."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from bench.synth import write_folder
from tests.conftest import DCMTK_ENV, ServerHandle, dcmtk, free_port, wait_for
from tests.tier_rig import nearline_site

APPLIANCE = [sys.executable, "-m", "appliance"]


def audit_lines(config: Path, *args: str) -> list[dict[str, Any]]:
    result = subprocess.run([*APPLIANCE, "audit", "-c", str(config), "--json", *args], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def wait_audit(config: Path, done: Callable[[list[dict[str, Any]]], bool], *args: str) -> list[dict[str, Any]]:
    """The lines once ``done`` says they are all there (written by the worker's writer thread, polled)."""
    box: list[list[dict[str, Any]]] = []

    def ready() -> bool:
        box[:] = [audit_lines(config, *args)]
        return done(box[0])

    wait_for(ready, 30, interval=0.1, what="audit lines")
    return box[0]


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("audit-data")
    return {"ct": write_folder("ct", 5, 11, "none", root / "ct", size=32),
            "mr": write_folder("mr", 3, 12, "none", root / "mr", size=32)}


def uid_of(paths: list[Path], keyword: str) -> str:
    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).get(keyword))


@pytest.fixture
def dest(tmp_path: Path) -> Iterator[int]:
    """DCMTK storescp as DEST: the C-MOVE destination."""
    port = free_port()
    out = tmp_path / "dest"
    out.mkdir()
    proc = subprocess.Popen(["storescp", "-od", str(out), "-aet", "DEST", str(port)], env=DCMTK_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: dcmtk("echoscu", "-aec", "DEST", "127.0.0.1", str(port)).returncode == 0, 30,
                 interval=0.05, what="storescp")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def test_dcmtk_session_is_audited_per_study_and_association_without_patient_data(
        make_server: Callable[..., ServerHandle], studies: dict[str, list[Path]], dest: int, tmp_path: Path) -> None:
    server = make_server(server={"refuse_unknown_calling_ae": True}, peers={
        "scu": {"ae_title": "SCU", "port": 1},
        "dest": {"ae_title": "DEST", "port": dest},
        "nostore": {"ae_title": "NOSTORE", "port": 1, "allow_store": False},
    })
    port = str(server.port)
    config = server.config_path
    ct, mr = uid_of(studies["ct"], "StudyInstanceUID"), uid_of(studies["mr"], "StudyInstanceUID")
    assert ct != mr

    # Two studies in one association: one store line each, with their counts, then the association line.
    result = dcmtk("storescu", "-aet", "SCU", "-aec", "APPLIANCE", "127.0.0.1", port,
                   *map(str, studies["ct"] + studies["mr"]))
    assert result.returncode == 0, result.stderr
    lines = wait_audit(config, lambda ls: any(x["event"] == "association" for x in ls))
    stores = {x["study_uid"]: x for x in lines if x["event"] == "store"}
    assert set(stores) == {ct, mr}
    assert stores[ct]["instances"] == 5 and stores[mr]["instances"] == 3
    assert all(x["outcome"] == 0 and x["event_id"] == "DCM 110104" and x["action"] == "C" and x["peer_ae"] == "SCU"
               and x["peer_address"] == "127.0.0.1" and x["node"] == "APPLIANCE" and x["bytes"] > 0
               for x in stores.values())
    [assoc] = [x for x in lines if x["event"] == "association"]
    assert assoc["result"] == "released" and assoc["instances"] == 8 and assoc["failed"] == 0
    assert assoc["studies"] == 2 and assoc["duration_s"] >= 0

    # A C-FIND: one Query line with the level and the number of matches, never the keys.
    result = dcmtk("findscu", "-S", "-aet", "SCU", "-aec", "APPLIANCE", "-k", "QueryRetrieveLevel=STUDY",
                   "-k", "PatientName=*", "-k", "StudyInstanceUID", "127.0.0.1", port)
    assert result.returncode == 0, result.stderr
    [query] = wait_audit(config, lambda ls: len(ls) == 1, "--event", "query")
    assert query["level"] == "STUDY" and query["matches"] == 2 and query["event_id"] == "DCM 110112"
    assert query["status"] == "0x0000" and query["outcome"] == 0

    # C-MOVE of one study to DEST, C-GET of the other.
    result = dcmtk("movescu", "-S", "-aet", "SCU", "-aem", "DEST", "-aec", "APPLIANCE", "-k",
                   "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={ct}", "127.0.0.1", port)
    assert result.returncode == 0, result.stderr
    [move] = wait_audit(config, lambda ls: len(ls) == 1, "--event", "move")
    assert move["study_uid"] == ct and move["instances"] == 5 and move["destination_ae"] == "DEST"
    assert move["peer_ae"] == "SCU" and move["action"] == "R" and move["outcome"] == 0
    out = tmp_path / "got"
    out.mkdir()
    result = dcmtk("getscu", "-S", "-aet", "SCU", "-aec", "APPLIANCE", "-od", str(out), "-k",
                   "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={mr}", "127.0.0.1", port)
    assert result.returncode == 0, result.stderr
    [get] = wait_audit(config, lambda ls: len(ls) == 1, "--event", "retrieve")
    assert get["study_uid"] == mr and get["instances"] == 3 and get["outcome"] == 0 and get["level"] == "STUDY"

    # An AE title not under [peers] is rejected: a Security Alert (Node Authentication) and a rejected association.
    result = dcmtk("echoscu", "-aet", "INTRUDER", "-aec", "APPLIANCE", "127.0.0.1", port)
    assert result.returncode != 0
    [alert] = wait_audit(config, lambda ls: len(ls) == 1, "--event", "security_alert")
    assert alert["peer_ae"] == "INTRUDER" and alert["alert_type"] == "DCM 110126" and alert["outcome"] == 4
    rejected = [x for x in audit_lines(config, "--peer", "INTRUDER", "--event", "association")]
    assert [x["result"] for x in rejected] == ["rejected"]

    # A peer without the store right sending 5 instances: one alert (Use of Restricted Function), and the
    # association line counts the 5 refusals.
    dcmtk("storescu", "-nh", "-aet", "NOSTORE", "-aec", "APPLIANCE", "127.0.0.1", port, *map(str, studies["ct"]))
    lines = wait_audit(config, lambda ls: any(x["event"] == "association" for x in ls), "--peer", "NOSTORE")
    assert [x["event"] for x in lines] == ["security_alert", "association"]
    assert lines[0]["alert_type"] == "DCM 110132" and lines[0]["right"] == "store"
    assert lines[1]["refused"] == {"store": 5} and lines[1]["instances"] == 0

    # Filters on the real trail.
    assert {x["event"] for x in audit_lines(config, "--outcome", "failure")} >= {"security_alert"}
    assert all(x.get("study_uid") == ct for x in audit_lines(config, "--study", ct))
    assert len(audit_lines(config, "--study", ct)) == 2  # stored, moved

    # No patient name or ID anywhere in the trail, though findscu asked for names.
    text = "".join(p.read_text() for p in (server.root / "var/audit").glob("audit.jsonl*"))
    for paths in studies.values():
        for keyword in ("PatientName", "PatientID"):
            value = uid_of(paths, keyword)
            assert value and value not in text, keyword
    path = server.root / "var/audit/audit.jsonl"
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_burst_logs_per_association_not_per_instance(make_server: Callable[..., ServerHandle],
                                                       tmp_path: Path) -> None:
    server = make_server(peers={"scu": {"ae_title": "SCU", "port": 1},
                                "nostore": {"ae_title": "NOSTORE", "port": 1, "allow_store": False}})
    files = write_folder("ct", 60, 21, "none", tmp_path / "burst", size=16)
    before = server.log().count("\n")
    for ae in ("SCU", "SCU", "NOSTORE"):  # 180 instances (60 refused), 3 associations
        dcmtk("storescu", "-nh", "-aet", ae, "-aec", "APPLIANCE", "127.0.0.1", str(server.port), *map(str, files))
    wait_for(lambda: server.log().count("association from NOSTORE") >= 1, 30, what="the last association's line")
    new = server.log().splitlines()[before:]
    ends = [line for line in new if re.search(r"association from \w+ \(127\.0\.0\.1\): \d+ stored", line)]
    assert len(ends) == 3, new
    assert "60 stored, 0 failed" in ends[0] and "0 stored, 0 failed" in ends[2] and "released" in ends[0]
    assert len(new) <= 3 * 3, new  # O(associations): the end line, and one refusal warning for NOSTORE
    assert not any(re.search(r"\d+\.\d+\.\d+\.\d+\.\d+", line) for line in new if " INFO " in line)  # no UIDs


def test_json_log_format(make_server: Callable[..., ServerHandle], tmp_path: Path) -> None:
    server = make_server(server={"log_format": "json"}, peers={"scu": {"ae_title": "SCU", "port": 1}})
    files = write_folder("ct", 2, 31, "none", tmp_path / "few", size=16)
    dcmtk("storescu", "-aet", "SCU", "-aec", "APPLIANCE", "127.0.0.1", str(server.port), *map(str, files))
    wait_for(lambda: "association from SCU" in server.log(), 30, what="the association line")
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert len(lines) >= 2 and all({"time", "level", "logger", "pid", "message"} <= set(x) for x in lines)
    [end] = [x for x in lines if x["message"].startswith("association from SCU")]
    assert end["level"] == "info" and "2 stored" in end["message"]


def test_a_tier_run_writes_migrate_and_delete_lines(tmp_path: Path) -> None:
    config, _data = nearline_site(tmp_path)
    run = subprocess.run([*APPLIANCE, "tier", "run", "-c", str(config), "--json"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    migrated = audit_lines(config, "--event", "migrate")
    assert sorted((x["study_uid"], x["instances"], x["from_tier"], x["to_tier"], x["outcome"], x["result"])
                  for x in migrated) == [("1.1", 3, "online", "nl", 0, "moved"), ("1.2", 2, "online", "nl", 0, "moved")]
    assert all(x["event_id"] == "DCM 110103" and x["action"] == "U" and x["bytes"] > 0 for x in migrated)
    deleted = audit_lines(config, "--event", "delete")
    assert sorted((x["study_uid"], x["instances"], x["tier"], x["action"]) for x in deleted) == [
        ("1.1", 3, "online", "D"), ("1.2", 2, "online", "D")]


def test_overwrites_are_counted_and_compaction_deletes_are_audited(make_server: Callable[..., ServerHandle]) -> None:
    from tests.integration.test_compaction import OVERWRITER, _overwritten_archive

    server = make_server(storage={"duplicate_policy": "overwrite", "segment_bytes_max": 1 << 20,
                                  "compaction_interval_s": 0.0}, peers=OVERWRITER)
    _overwritten_archive(server, count=20)  # two associations: 20 new, then the same 20 with other bytes
    stores = wait_audit(server.config_path, lambda ls: len(ls) == 2, "--event", "store")
    assert [(x["study_uid"], x["instances"], x.get("replaced")) for x in stores] == [
        ("1.2.3.1", 20, None), ("1.2.3.1", 20, 20)]
    server.stop()
    server.start()  # recovery seals the segments: now compaction candidates
    done = server.cli_json("compact")
    assert done["segments_compacted"] >= 1
    [delete] = audit_lines(server.config_path, "--event", "delete")
    assert delete["why"] == "compaction" and delete["bytes"] == done["bytes_reclaimed"] > 0
    assert delete["study_uid"] is None and delete["action"] == "D" and delete["outcome"] == 0


def test_a_flood_of_failed_stores_logs_the_first_and_a_summary_and_is_audited_by_status(
        make_server: Callable[..., ServerHandle]) -> None:
    from tests.integration.test_cli_metrics import CT, make_instance, send

    server = make_server(storage={"duplicate_policy": "reject"})
    datasets = [make_instance(CT, "P1", "1.2.3.1", "1.2.3.1.1", number=i) for i in range(40)]
    assert set(send(server.port, datasets)) == {0}
    wait_for(lambda: "association from CLITEST" in server.log(), 30, what="the first association's line")
    before = server.log().count("\n")
    for ds in datasets:
        ds.SeriesDescription = "other bytes"
    statuses = send(server.port, datasets)  # every one refused: duplicate SOP Instance UID with other content
    assert len(set(statuses)) == 1 and statuses[0] != 0
    wait_for(lambda: server.log().count("association from CLITEST") == 2, 30, what="the second association's line")
    new = server.log().splitlines()[before:]
    assert len(new) == 2 and "failed with 0x" in new[0] and "0 stored, 40 failed" in new[1], new
    assert all(" INFO " in line for line in new)
    stores = audit_lines(server.config_path, "--event", "store")
    assert [(x["instances"], x.get("failed"), x["outcome"]) for x in stores] == [(40, None, 0), (0, 40, 8)]
    [assoc] = audit_lines(server.config_path, "--event", "association", "--outcome", "success", "--limit", "1")
    assert assoc["statuses"] == {f"0x{statuses[0]:04X}": 40}
    # The writer's counters reach /metrics through the supervisor's multi-process registry.
    assert re.search(r'appliance_audit_events_total\{event="store"\} 2\.0', server.metrics())


def test_a_failed_tls_handshake_is_a_security_alert(make_server: Callable[..., ServerHandle],
                                                    tmp_path_factory: pytest.TempPathFactory) -> None:
    from tests.integration.test_tls import tls_section
    from tests.tls_pki import make_pki

    pki = make_pki(tmp_path_factory.mktemp("pki"))
    server = make_server(tls=tls_section(pki))
    # A client without a certificate, where one is required (DCMTK's anonymous TLS).
    result = dcmtk("echoscu", "+tla", "+cf", str(pki.ca), "-aec", "APPLIANCE", "127.0.0.1", str(server.tls_port))
    assert result.returncode != 0
    [alert] = wait_audit(server.config_path, lambda ls: len(ls) == 1, "--event", "security_alert")
    assert alert["tls"] is True and alert["peer_address"] == "127.0.0.1" and alert["alert_type"] == "DCM 110126"
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in alert["reason"] and alert["outcome"] == 4
    # A good one over TLS: its association line says tls.
    result = dcmtk("echoscu", "+tls", str(pki.client_key), str(pki.client_cert), "-pw", "+cf", str(pki.ca),
                   "-aec", "APPLIANCE", "127.0.0.1", str(server.tls_port))
    assert result.returncode == 0, result.stderr
    [assoc] = wait_audit(server.config_path, lambda ls: len(ls) == 1, "--event", "association")
    assert assoc["tls"] is True and assoc["result"] == "released"
