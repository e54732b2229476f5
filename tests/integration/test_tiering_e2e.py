"""Tiering end to end, as the issue asks, with real processes and real tools: receive over DICOM (DCMTK storescu)
-> age the data (APPLIANCE_TIER_NOW) -> `tier run` -> export byte-exact from nearline -> `tier run` to tape ->
C-MOVE (DCMTK movescu) waits for the recall the server's recaller does -> export byte-exact; `verify` clean at
each step; C-FIND (DCMTK findscu) shows NEARLINE / OFFLINE / ONLINE along the way. And a retrieve that cannot wait
(getscu, recall_wait_s = 0): 0xA702 with its comment, the recall queued, `tier recall --wait` brings it back."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest

from appliance.index.db import StudyIndex
from appliance.index.records import part10_dataset_offset
from tests.conftest import APPLIANCE, DCMTK_ENV, ServerHandle, dataset_bytes, dcmtk, free_port, wait_for
from tests.peers import ct_instances

DAY_NS = 86_400 * 10**9


def tiers_toml(root: Path, recall_wait_s: float) -> str:
    return f"""
[tiering]
audit_log = "{root}/audit.jsonl"
recall_wait_s = {recall_wait_s}
access_flush_s = 0.2
rate_bytes_per_s = 1073741824

[[tiers]]
name = "nl"
kind = "nearline"
volumes = [{{name = "nl0", path = "{root}/nl0"}}]

[[tiers]]
name = "tape"
kind = "tape"
mode = "virtual"
path = "{root}/library"
cartridge_bytes = 67108864
cartridges = 2

[[policies]]
name = "to-nearline"
from = "online"
to = "nl"
received_days_min = 30

[[policies]]
name = "to-tape"
from = "nl"
to = "tape"
received_days_min = 365
"""


def start(make_server: Callable[..., ServerHandle], recall_wait_s: float, dest_port: int) -> ServerHandle:
    handle = make_server(start=False, peers={"scu": {"ae_title": "SCU", "port": 1, "allow_receive": False},
                                             "dest": {"ae_title": "DEST", "port": dest_port}})
    with open(handle.config_path, "a") as fh:
        fh.write(tiers_toml(handle.root, recall_wait_s))
    for tier in ("nl", "tape"):
        handle.cli("tier", "init", tier)
    return handle.start()


def tier_run(server: ServerHandle, days_later: int) -> dict[str, object]:
    env = {**os.environ, "APPLIANCE_TIER_NOW": str(time.time_ns() + days_later * DAY_NS)}
    result = subprocess.run([*APPLIANCE, "tier", "run", "--json", "-c", str(server.config_path)], capture_output=True,
                            text=True, env=env, cwd=server.root, timeout=300)
    assert result.returncode == 0, result.stderr
    out: dict[str, object] = json.loads(result.stdout)
    return out


def availability(server: ServerHandle, study: str, series: str) -> set[str]:
    """Instance Availability of each instance of the study, as DCMTK findscu gets it (-X: responses as files)."""
    out = server.root / "find"
    out.mkdir(exist_ok=True)
    for old in out.glob("rsp*.dcm"):
        old.unlink()
    result = dcmtk("findscu", "-S", "-X", "-od", str(out), "-aet", "SCU", "-aec", "APPLIANCE", "-k",
                   "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={study}", "-k", f"SeriesInstanceUID={series}", "-k",
                   "SOPInstanceUID", "-k",
                   "InstanceAvailability", "127.0.0.1", str(server.port))
    assert result.returncode == 0, result.stderr
    return {str(pydicom.dcmread(p).InstanceAvailability) for p in out.glob("rsp*.dcm")}


def move(server: ServerHandle, study: str) -> subprocess.CompletedProcess[str]:
    result = dcmtk("movescu", "-v", "-aet", "SCU", "-aem", "DEST", "-aec", "APPLIANCE", "-S", "-k",
                   "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(server.port))
    assert result.returncode == 0, result.stderr
    return result


def last_access_ns(server: ServerHandle, study: str) -> int:
    index = StudyIndex(server.root / "var/index", readonly=True)
    try:
        key = index.study_key(study)
        assert key is not None
        return index.placement(key).last_access_ns
    finally:
        index.close()


def export(server: ServerHandle, study: str, dest: Path) -> dict[str, bytes]:
    server.cli("export", study, str(dest))
    return {p.name: p.read_bytes() for p in dest.iterdir()}


def verify_clean(server: ServerHandle) -> dict[str, dict[str, object]]:
    report = server.cli_json("verify")
    assert report["ok"], report
    tiers: dict[str, dict[str, object]] = report["tiers"]
    return tiers


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    port, out = free_port(), tmp_path / "dest"
    out.mkdir()
    proc = subprocess.Popen(["storescp", "+B", "-od", str(out), "-aet", "DEST", str(port)], env=DCMTK_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: dcmtk("echoscu", "-aec", "DEST", "127.0.0.1", str(port)).returncode == 0, 30, interval=0.05,
                 what="storescp")
        yield port, out
    finally:
        proc.terminate()
        proc.wait(10)


def test_online_nearline_tape_recall_and_back(make_server: Callable[..., ServerHandle], storescp: tuple[int, Path],
                                              tmp_path: Path) -> None:
    dest_port, received = storescp
    server = start(make_server, recall_wait_s=60, dest_port=dest_port)
    files = ct_instances(tmp_path / "in", 4)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    result = dcmtk("storescu", "-aet", "SCU", "-aec", "APPLIANCE", "127.0.0.1", str(server.port), *map(str, files))
    assert result.returncode == 0, result.stderr
    reference = export(server, study, tmp_path / "x-online")
    assert len(reference) == 4 and availability(server, study, series) == {"ONLINE"}
    assert verify_clean(server)["online"]["checked"] == 4

    # Forty days later: the study goes to nearline; read back decompressed, byte for byte.
    moved = tier_run(server, 40)
    assert moved["moved"] == 1, moved
    assert availability(server, study, series) == {"NEARLINE"}
    assert export(server, study, tmp_path / "x-nearline") == reference
    # C-MOVE from nearline: the datasets arrive as they were received (storescp +B writes them as they come).
    moved_at_ns = time.time_ns()  # (after the export, which records its own access)
    assert "(Success)" in move(server, study).stderr
    sent = [dataset_bytes(p) for p in received.iterdir()]
    assert len(sent) == 4
    assert sorted(sent) == sorted(raw[part10_dataset_offset(raw[:65536])[0]:] for raw in reference.values())
    # The C-MOVE was recorded as an access (batched by the worker, written within access_flush_s).
    wait_for(lambda: last_access_ns(server, study) > moved_at_ns, 30, what="last access recorded")
    tiers = verify_clean(server)
    assert tiers["nl"]["checked"] == 4 and tiers["online"]["checked"] == 0

    # Four hundred days later: on to tape.
    moved = tier_run(server, 400)
    assert moved["moved"] == 1, moved
    assert availability(server, study, series) == {"OFFLINE"}
    tiers = verify_clean(server)
    assert tiers["tape"]["checked"] == 4 and tiers["nl"]["checked"] == 0

    # A C-MOVE of the study on tape: the recall is queued, the server's recaller brings it online, the move goes on.
    started = time.monotonic()
    result = move(server, study)
    recall_s = time.monotonic() - started
    assert result.returncode == 0 and "Final Move Response (Success)" in result.stderr, result.stderr
    assert len(list(received.iterdir())) == 4
    assert availability(server, study, series) == {"ONLINE"}
    assert export(server, study, tmp_path / "x-recalled") == reference
    tiers = verify_clean(server)
    assert tiers["online"]["checked"] == 4 and tiers["tape"]["checked"] == 4  # the tape copies are kept
    status = server.cli_json("tier", "status")
    assert status["recalls_queued"] == []
    audit = [json.loads(line) for line in (server.root / "audit.jsonl").read_text().splitlines()]
    assert any(line["event"] == "recall" and line.get("outcome") == "recalled" and line["from"] == "tape"
               for line in audit)
    metrics = server.metrics()
    assert "appliance_recall_duration_seconds_count 1.0" in metrics, metrics
    print(f"C-MOVE of a 4-instance study on virtual tape, recall included: {recall_s:.2f}s")


def test_retrieve_that_cannot_wait_fails_clearly_and_the_recall_stays_queued(
        make_server: Callable[..., ServerHandle], tmp_path: Path) -> None:
    server = start(make_server, recall_wait_s=0, dest_port=free_port())
    files = ct_instances(tmp_path / "in", 2)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    result = dcmtk("storescu", "-aet", "SCU", "-aec", "APPLIANCE", "127.0.0.1", str(server.port), *map(str, files))
    assert result.returncode == 0, result.stderr
    for days in (40, 400):  # online -> nl, then nl -> tape
        assert tier_run(server, days)["moved"] == 1
    assert availability(server, study, series) == {"OFFLINE"}
    out = tmp_path / "got"
    out.mkdir()
    # recall_wait_s = 0: the C-GET does not wait; its final response says why (-d shows the Error Comment).
    result = dcmtk("getscu", "-d", "-aet", "SCU", "-aec", "APPLIANCE", "-S", "-od", str(out), "-k",
                   "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(server.port))
    assert "Refused: OutOfResourcesSubOperations" in result.stderr, result.stderr
    assert "study is on tape; recall queued" in result.stderr, result.stderr
    assert list(out.iterdir()) == []
    # The recall was queued; the server's recaller does it, and a second C-GET gets the study.
    wait_for(lambda: availability(server, study, series) == {"ONLINE"}, 60, what="the queued recall")
    result = dcmtk("getscu", "-v", "-aet", "SCU", "-aec", "APPLIANCE", "-S", "-od", str(out), "-k",
                   "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(server.port))
    assert result.returncode == 0 and len(list(out.iterdir())) == 2, result.stderr


def test_a_corrupt_nearline_instance_is_found_by_verify_and_never_served(
        make_server: Callable[..., ServerHandle], storescp: tuple[int, Path], tmp_path: Path) -> None:
    from appliance.config import load_config
    from tiering.archive import parse_location
    from tiering.nearline import open_nearline

    dest_port, received = storescp
    server = start(make_server, recall_wait_s=0, dest_port=dest_port)
    files = ct_instances(tmp_path / "in", 3)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    assert dcmtk("storescu", "-aet", "SCU", "-aec", "APPLIANCE", "127.0.0.1", str(server.port),
                 *map(str, files)).returncode == 0
    assert tier_run(server, 40)["moved"] == 1
    # Flip one byte in the middle of one instance's compressed data on the nearline volume (a failing disk).
    index = StudyIndex(server.root / "var/index", readonly=True)
    try:
        (key, rec), *_ = index.instances_under(first.SOPInstanceUID)
        blob = index.blob(rec.digest)
        assert blob is not None
        [copy] = blob.copies
    finally:
        index.close()
    tier = load_config(server.config_path).tier("nl")
    assert tier is not None
    nearline = open_nearline(tier)
    container, _record, data, stored, _size = parse_location(copy.location)
    path = nearline.archive_file(container)
    nearline.close()
    with open(path, "r+b") as fh:
        fh.seek(data + stored // 2)
        byte = fh.read(1)
        fh.seek(data + stored // 2)
        fh.write(bytes([byte[0] ^ 0xFF]))

    report = server.cli("verify", "--json", "--tier", "nl", check=False)
    assert report.returncode == 1
    found = json.loads(report.stdout)["tiers"]["nl"]
    assert found["corrupt"] == [f"nl/{copy.container} {rec.digest}"] and found["checked"] == 3
    # Export fails, leaving no file of that instance; a C-MOVE sends the two good ones and counts one failed.
    out = tmp_path / "x"
    assert server.cli("export", study, str(out), check=False).returncode != 0
    assert not any(p.name.startswith(str(first.SOPInstanceUID)) for p in out.glob("*"))
    result = dcmtk("movescu", "-v", "-aet", "SCU", "-aem", "DEST", "-aec", "APPLIANCE", "-S", "-k",
                   "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(server.port))
    assert "Final Move Response (Warning: SubOperationsCompleteOneOrMoreFailures)" in result.stderr, result.stderr
    got = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in received.iterdir()}
    assert len(got) == 2 and str(first.SOPInstanceUID) not in got
    assert availability(server, study, series) == {"NEARLINE"}
