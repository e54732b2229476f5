"""`appliance tape list|label|load|eject|verify` as an admin runs them: real processes on a virtual library."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from appliance.config import load_config
from appliance.store.backend import BlobMeta
from tests.conformance.test_backends import BytesSource
from tests.conftest import APPLIANCE
from tiering.archive import parse_location
from tiering.tiers import init_tier, open_tier

CONFIG = """\
[[volumes]]
name = "vol0"
path = "vol0"

[[tiers]]
name = "tape1"
kind = "tape"
mode = "virtual"
path = "vtl"
cartridges = 3
cartridge_bytes = 67108864
frame_bytes = 65536
"""


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*APPLIANCE, "tape", *args, "-c", "appliance.toml"], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_tape_commands(tmp_path: Path) -> None:
    (tmp_path / "appliance.toml").write_text(CONFIG)
    cfg = load_config(tmp_path / "appliance.toml")
    tier = cfg.tier("tape1")
    assert tier is not None
    assert "3 cartridge(s) created" in init_tier(tier)

    listed = json.loads(run(tmp_path, "list", "--json").stdout)
    assert [(c["label"], c["slot"], c["archives"], c["labelled"]) for c in listed["cartridges"]] == [
        ("VTL001L6", 1, 0, True), ("VTL002L6", 2, 0, True), ("VTL003L6", 3, 0, True)]

    # A migration wrote three instances in one archive on the first cartridge.
    tape = open_tier(tier)
    blobs = [bytes([i]) * (50_000 + i) + b"tail" for i in range(3)]
    locations = [tape.put(BlobMeta(hashlib.sha256(b).hexdigest(), len(b), 1, "CT"), BytesSource(b)) for b in blobs]
    tape.sync()
    tape.seal()  # type: ignore[attr-defined]
    tape.close()

    human = run(tmp_path, "list")
    assert human.returncode == 0
    row = next(line for line in human.stdout.splitlines() if line.startswith("VTL001L6"))
    assert "loaded" in row and row.split()[-1] == "1"

    verified = run(tmp_path, "verify", "VTL001L6", "--json")
    assert verified.returncode == 0, verified.stderr
    report = json.loads(verified.stdout)
    assert report["ok"] and report["archives"] == 1 and report["members"] == 3

    # A damaged byte on the cartridge: verify names the member and exits 1.
    _container, _record, data, stored, _size = parse_location(locations[1])
    marks = [int(x) for x in (tmp_path / "vtl" / "VTL001L6.marks").read_text().split()]
    with open(tmp_path / "vtl" / "VTL001L6.tape", "r+b") as fh:
        fh.seek(marks[0] + data + stored // 2)
        byte = fh.read(1)
        fh.seek(marks[0] + data + stored // 2)
        fh.write(bytes([byte[0] ^ 0x55]))
    damaged = run(tmp_path, "verify", "VTL001L6")
    assert damaged.returncode == 1
    assert locations[1] in damaged.stdout and "1 problem(s)" in damaged.stdout

    # Relabelling a cartridge that holds archives needs --force (and erases them).
    refused = run(tmp_path, "label", "VTL001L6")
    assert refused.returncode == 1 and "holds data" in refused.stderr
    forced = run(tmp_path, "label", "VTL001L6", "--force", "--json")
    assert forced.returncode == 0 and json.loads(forced.stdout)["erased"] is True
    assert json.loads(run(tmp_path, "list", "--json").stdout)["cartridges"][0]["archives"] == 0

    assert run(tmp_path, "load", "VTL002L6").stdout.strip() == "VTL002L6 loaded"
    loaded = [c["label"] for c in json.loads(run(tmp_path, "list", "--json").stdout)["cartridges"] if c["loaded"]]
    assert loaded == ["VTL002L6"]
    assert run(tmp_path, "eject").stdout.strip() == "VTL002L6 ejected"
    assert run(tmp_path, "eject").stdout.strip() == "the drive was empty"

    missing = run(tmp_path, "load", "VTL009L6")
    assert missing.returncode == 3 and "no cartridge VTL009L6" in missing.stderr
    assert run(tmp_path, "list", "--tier", "nope").returncode == 3
    assert run(tmp_path, "label", "bad-label").returncode == 78


def test_label_a_blank_ltfs_cartridge(tmp_path: Path) -> None:
    (tmp_path / "ltfs").mkdir()
    (tmp_path / "appliance.toml").write_text(CONFIG.replace('mode = "virtual"\npath = "vtl"',
                                                            'mode = "ltfs"\npath = "ltfs"'))
    assert json.loads(run(tmp_path, "list", "--json").stdout)["cartridges"] == []
    labelled = run(tmp_path, "label", "LTF001L8")
    assert labelled.returncode == 0, labelled.stderr
    listed = json.loads(run(tmp_path, "list", "--json").stdout)["cartridges"]
    assert [(c["label"], c["archives"], c["labelled"]) for c in listed] == [("LTF001L8", 0, True)]
    assert (tmp_path / "ltfs" / "VOL1.label").read_bytes()[:10] == b"VOL1LTF001"
    (tmp_path / "ltfs" / "1.tar").write_bytes(b"x" * 1024)  # an archive written since
    refused = run(tmp_path, "label", "LTF001L8")
    assert refused.returncode == 1 and "holds data" in refused.stderr
    forced = run(tmp_path, "label", "LTF001L8", "--force")
    assert forced.returncode == 0, forced.stderr
    assert sorted(p.name for p in (tmp_path / "ltfs").iterdir()) == ["1.tar", "VOL1.label"]
    assert (tmp_path / "ltfs" / "1.tar").read_bytes() == b""  # erased: the empty file after the label's filemark


def test_label_force_refuses_a_cartridge_the_index_names_copies_on(tmp_path: Path) -> None:
    """--force erases a cartridge's archives: never those holding copies the index names (a study whose only copy
    is on it would be lost); once nothing is named there, --force relabels."""
    from appliance.index.db import StudyIndex
    from tests.unit.test_index import entry, header

    (tmp_path / "appliance.toml").write_text(CONFIG)
    cfg = load_config(tmp_path / "appliance.toml")
    tier = cfg.tier("tape1")
    assert tier is not None
    init_tier(tier)
    tape = open_tier(tier)
    data = b"x" * 70_000
    location = tape.put(BlobMeta(hashlib.sha256(data).hexdigest(), len(data), 1, "CT"), BytesSource(data))
    tape.sync()
    tape.seal()  # type: ignore[attr-defined]
    tape.close()
    container = parse_location(location)[0]
    index = StudyIndex(cfg.storage.index_path, cfg.storage.index_map_size)
    try:
        named = entry(header("P", "1.1", "1.1.1", "1.1.1.1"), size=len(data))
        named.copy = type(named.copy)("tape1", container, location, len(data), 1)
        index.register_container("tape1", container, 1)
        index.apply([named], "keep-first")
    finally:
        index.close()
    refused = run(tmp_path, "label", container.split("/")[0], "--force")
    assert refused.returncode == 1, refused.stdout
    assert "the index names 1 cop" in refused.stderr
    assert json.loads(run(tmp_path, "list", "--json").stdout)["cartridges"][0]["archives"] == 1
