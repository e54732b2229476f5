"""Node replacement from the tiers (issue 11, item 3), on the nearline and virtual-tape tiers: a real appliance
receives over DICOM (DCMTK storescu), its studies age onto the tiers (`tier run` with APPLIANCE_TIER_NOW), then its
index and online volumes are lost; `volume init` + `index rebuild --from-tier` bring it back and every instance
exports byte-exact; C-FIND (DCMTK findscu) shows each study's availability; `tier status` shows the studies on the
tiers; a second rebuild is identical. And the rebuild in place of a node whose online volumes still hold the dead
records of moved instances (not compacted yet): both copies named, the next policy run moves it with a switch only.
The S3 version (SeaweedFS, a SIGKILLed node, two nodes on one bucket) is tests/integration/test_rebuild_s3.py."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom

from appliance.config import load_config
from appliance.index.db import StudyIndex
from tests.conftest import APPLIANCE, ServerHandle, dcmtk
from tests.integration.test_tiering_e2e import availability, export, tier_run, verify_clean
from tests.peers import ct_instances

TIERS = """
[tiering]
audit_log = "{root}/audit.jsonl"
recall_wait_s = 60
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


def start(make_server: Callable[..., ServerHandle], tiers: str = TIERS) -> ServerHandle:
    handle = make_server(start=False, peers={"scu": {"ae_title": "SCU", "port": 1, "allow_receive": False}})
    with open(handle.config_path, "a") as fh:
        fh.write(tiers.format(root=handle.root))
    for tier in load_config(handle.config_path).tiers:
        handle.cli("tier", "init", tier.name)
    return handle.start()


def send_study(server: ServerHandle, folder: Path, count: int, patient_id: str,
               called: str = "APPLIANCE") -> tuple[str, str]:
    """``count`` CT instances of a new study over DICOM to the AE ``called``; (study UID, series UID)."""
    files = ct_instances(folder, count, patient_id=patient_id)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    result = dcmtk("storescu", "-aet", "SCU", "-aec", called, "127.0.0.1", str(server.port), *map(str, files))
    assert result.returncode == 0, result.stderr
    return str(first.StudyInstanceUID), str(first.SeriesInstanceUID)


def lose_index_and_volumes(server: ServerHandle) -> None:
    """What a dead node leaves: nothing of var/ (index, online volumes). Its replacement has a fresh, initialised
    online volume and the same config (tiers included)."""
    shutil.rmtree(server.root / "var" / "index")
    shutil.rmtree(server.volume)
    init = subprocess.run([*APPLIANCE, "volume", "init", str(server.volume), "--name", "vol0"], capture_output=True,
                          text=True, timeout=60)
    assert init.returncode == 0, init.stderr


def rebuild(server: ServerHandle, *args: str) -> dict[str, Any]:
    result = server.cli("index", "rebuild", *args, "--json")
    out: dict[str, Any] = json.loads(result.stdout)
    return out


def dump(index_path: Path) -> dict[str, list[tuple[str, Any]]]:
    index = StudyIndex(index_path, readonly=True)
    try:
        return index.dump()
    finally:
        index.close()


def container_ends(server: ServerHandle, backend: str) -> dict[str, int]:
    index = StudyIndex(server.root / "var" / "index", readonly=True)
    try:
        return {c.name: c.end for c in index.containers(backend)}
    finally:
        index.close()


def canonical(rows: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """A dump's rows with each blob's copies in one order (the index keeps them in the order they came: the
    recall appended its online copy after the tape copy; a rebuild replays the online record first)."""
    out = []
    for key, value in rows:
        if isinstance(value, dict) and "copies" in value:
            value = {**value, "copies": sorted(value["copies"], key=lambda c: (c["backend"], c["location"]))}
        out.append((key, value))
    return out


def tier_studies(server: ServerHandle) -> dict[str, tuple[int, int]]:
    """`tier status`: (studies, instances) per tier."""
    status = server.cli_json("tier", "status")
    return {t["name"]: (t["studies"], t["instances"]) for t in status["tiers"]}


def test_node_replaced_from_nearline_and_tape(make_server: Callable[..., ServerHandle], tmp_path: Path) -> None:
    server = start(make_server)
    old_study, old_series = send_study(server, tmp_path / "in-a", 3, "PA")
    reference = {old_study: export(server, old_study, tmp_path / "x-old")}
    assert tier_run(server, 40)["moved"] == 1  # A -> nearline
    new_study, new_series = send_study(server, tmp_path / "in-b", 2, "PB")
    reference[new_study] = export(server, new_study, tmp_path / "x-new")
    assert tier_run(server, 400)["moved"] == 2  # A -> tape; B (received "400 days ago") -> nearline
    assert availability(server, old_study, old_series) == {"OFFLINE"}
    assert availability(server, new_study, new_series) == {"NEARLINE"}
    before = tier_studies(server)
    assert (before["nl"], before["tape"]) == ((1, 2), (1, 3))
    tape_ends = container_ends(server, "tape")
    assert tape_ends and all(end > 0 for end in tape_ends.values())

    server.kill()  # the node dies
    lose_index_and_volumes(server)
    refused = server.cli("index", "rebuild", "--from-tier", "nl", check=False)  # tape left out: refused
    assert refused.returncode == 78 and "not the tiers tape" in refused.stderr, refused.stderr
    unknown = server.cli("index", "rebuild", "--from-tier", "nas", check=False)
    assert unknown.returncode == 78 and "no tier named 'nas'" in unknown.stderr, unknown.stderr
    stats = rebuild(server, "--from-tier", "nl", "--from-tier", "tape")
    assert stats["instances"] == 5 and stats["unreadable_count"] == 0, stats
    assert stats["tiers"]["nl"] == {"blobs": 2, "containers": 1, "unreadable": 0}, stats
    # Tape keeps what it wrote (A's nearline archive went, its tape copy came): 3 members, in one tape file.
    assert stats["tiers"]["tape"]["blobs"] == 3 and stats["tiers"]["tape"]["containers"] == 1, stats
    assert stats["studies_placed"] == {"nl": 1, "tape": 1}

    # The tape archive's committed end is where the mover left it: a recovery keeps every member the index names.
    assert container_ends(server, "tape") == tape_ends
    server.start()
    assert tier_studies(server) == before
    assert availability(server, new_study, new_series) == {"NEARLINE"}
    assert availability(server, old_study, old_series) == {"OFFLINE"}
    assert export(server, new_study, tmp_path / "y-new") == reference[new_study]
    # The study on tape: the export queues its recall, the server's recaller brings it online, the export goes on.
    assert export(server, old_study, tmp_path / "y-old") == reference[old_study]
    assert availability(server, old_study, old_series) == {"ONLINE"}
    tiers = verify_clean(server)
    assert tiers["nl"]["checked"] == 2 and tiers["tape"]["checked"] == 3 and tiers["online"]["checked"] == 3

    # A second rebuild (into a folder, beside the running server) gives the same index, recall included: the
    # recalled study is online with its tape copy kept, as the live index has it.
    again = rebuild(server, "--from-tier", "nl", "--from-tier", "tape", "--into", str(tmp_path / "again"))
    assert again["instances"] == 5
    live, rebuilt = dump(server.root / "var" / "index"), dump(tmp_path / "again")
    live.pop("placement"), rebuilt.pop("placement")  # the recall's placement has its own time (since_ns)
    for name in set(live) | set(rebuilt):
        assert canonical(live[name]) == canonical(rebuilt[name]), name


def test_rebuild_in_place_names_dead_online_records_and_the_next_run_only_switches(
        make_server: Callable[..., ServerHandle], tmp_path: Path) -> None:
    """The online volumes still hold the records of the moved instances (dead bytes, not compacted yet): the
    rebuilt index names both copies (both are the digest's bytes), so the study reads ONLINE; the next policy run
    moves it down again without copying a byte, and compaction reclaims the records after that."""
    server = start(make_server)
    study, series = send_study(server, tmp_path / "in", 3, "PA")
    reference = export(server, study, tmp_path / "x")
    assert tier_run(server, 40)["moved"] == 1
    assert availability(server, study, series) == {"NEARLINE"}
    server.stop()

    stats = rebuild(server, "--from-tier", "nl", "--from-tier", "tape")
    assert stats["blobs"] == 6 and stats["instances"] == 3 and stats["studies_placed"] == {"online": 1}, stats
    assert (server.root / "var" / "index.old").is_dir()  # replaced in place, the old one kept
    server.start()
    assert availability(server, study, series) == {"ONLINE"}
    assert tier_studies(server)["online"] == (1, 3)
    again: dict[str, Any] = tier_run(server, 40)
    assert again["moved"] == 1 and again["results"][0]["bytes"] == 0, again  # a switch, nothing copied
    assert availability(server, study, series) == {"NEARLINE"}
    assert export(server, study, tmp_path / "y") == reference
    assert verify_clean(server)["nl"]["checked"] == 3


def test_rebuild_without_a_tier_in_the_config_is_refused(make_server: Callable[..., ServerHandle]) -> None:
    server = make_server(start=False)
    result = server.cli("index", "rebuild", "--from-tier", "cloud", check=False)
    assert result.returncode == 78 and "no tier named 'cloud'" in result.stderr and "tiers: none" in result.stderr



def test_an_unreadable_member_is_named_and_the_rest_indexed(make_server: Callable[..., ServerHandle],
                                                            tmp_path: Path) -> None:
    from tiering.archive import parse_location
    from tiering.nearline import open_nearline

    server = start(make_server)
    study, _series = send_study(server, tmp_path / "in", 3, "PA")
    assert tier_run(server, 40)["moved"] == 1
    server.stop()
    index = StudyIndex(server.root / "var" / "index", readonly=True)
    try:
        (_key, rec), *_ = index.instances_under(study)
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
    with open(path, "r+b") as fh:  # one byte of one instance's compressed data flipped (a failing disk)
        fh.seek(data + stored // 2)
        byte = fh.read(1)
        fh.seek(data + stored // 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    lose_index_and_volumes(server)

    result = server.cli("index", "rebuild", "--from-tier", "nl", "--from-tier", "tape", "--json", check=False)
    assert result.returncode == 1, result.stderr
    stats = json.loads(result.stdout)
    assert stats["instances"] == 2 and stats["unreadable_count"] == 1
    assert stats["tiers"]["nl"] == {"blobs": 3, "containers": 1, "unreadable": 1}
    [named] = stats["unreadable"]
    assert named.startswith(f"nl:{copy.location}: ")
    human = server.cli("index", "rebuild", "--from-tier", "nl", "--from-tier", "tape", "--into",
                       str(tmp_path / "again"), check=False).stdout
    assert "tier nl: 3 blob(s) in 1 container(s), 1 unreadable" in human and f"unreadable nl:{copy.location}" in human
