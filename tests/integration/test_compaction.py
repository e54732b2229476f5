"""Space reclaim against a real server: overwrites leave dead records in sealed segments; `appliance compact`
rewrites them while the server runs, nothing named is lost, exports stay byte-exact and a rebuild reproduces the
live index; a scheduled compaction does the same by itself."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from appliance.index.db import StudyIndex
from tests.conftest import ServerHandle, wait_for
from tests.integration.test_cli_metrics import CT, make_instance, send

MakeServer = Callable[..., ServerHandle]
OVERWRITER = {"ct": {"ae_title": "CT01", "allow_overwrite": True}}  # overwrite is granted per peer


def _overwritten_archive(server: ServerHandle, count: int = 40) -> list[Dataset]:
    """``count`` CT instances, each sent twice with different content (the second replaces the first)."""
    datasets = [make_instance(CT, "P1", "1.2.3.1", "1.2.3.1.1", number=i) for i in range(count)]
    assert set(send(server.port, datasets, calling_ae="CT01")) == {0}
    for ds in datasets:
        ds.SeriesDescription = "second version"
    assert set(send(server.port, datasets, calling_ae="CT01")) == {0}
    return datasets


def _digest_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_compact_reclaims_dead_records_and_keeps_everything_named(make_server: MakeServer, tmp_path: Path) -> None:
    server = make_server(storage={"duplicate_policy": "overwrite", "segment_bytes_max": 1 << 20,
                                  "compaction_interval_s": 0.0}, peers=OVERWRITER)
    datasets = _overwritten_archive(server)
    server.stop()
    server.start()  # recovery seals every segment of the first run
    segments_before = sorted((server.volume / "segments").glob("*.tar"))
    bytes_before = sum(p.stat().st_size for p in segments_before)
    plan = server.cli_json("compact", "--dry-run")
    assert plan["dry_run"] and plan["candidates"]
    assert all(c["dead_share"] >= 0.5 for c in plan["candidates"])
    done = server.cli_json("compact")
    assert done["segments_compacted"] == len(plan["candidates"]) and done["records_moved"] > 0
    assert server.cli_json("verify")["ok"]
    bytes_after = sum(p.stat().st_size for p in (server.volume / "segments").glob("*.tar"))
    assert bytes_after < bytes_before * 0.75, (bytes_before, bytes_after)
    # Every instance is still the second version, byte for byte.
    out = tmp_path / "out"
    server.cli("export", "1.2.3.1", str(out))
    for ds in datasets:
        exported = pydicom.dcmread(out / f"{ds.SOPInstanceUID}.dcm")
        assert exported.SeriesDescription == "second version"
        assert exported.PixelData == ds.PixelData
    # The server still takes instances after the compaction, and a rebuild reproduces the live index.
    assert send(server.port, [make_instance(CT, "P2", "1.2.3.2", "1.2.3.2.1")]) == [0]
    server.stop()
    server.cli("index", "rebuild", "--into", str(tmp_path / "rebuilt"))
    live, rebuilt = StudyIndex(server.root / "var/index"), StudyIndex(tmp_path / "rebuilt")
    try:
        assert live.dump() == rebuilt.dump()
    finally:
        live.close()
        rebuilt.close()


def test_the_server_compacts_on_its_own(make_server: MakeServer) -> None:
    server = make_server(storage={"duplicate_policy": "overwrite", "segment_bytes_max": 1 << 20,
                                  "compaction_interval_s": 0.5}, peers=OVERWRITER)
    _overwritten_archive(server, count=30)
    server.stop()
    server.start()  # the old segments are sealed now; the next scheduled run rewrites them

    def compacted() -> bool:
        return not server.cli_json("compact", "--dry-run")["candidates"]

    wait_for(compacted, timeout=60, what="a scheduled compaction")
    assert "compaction:" in server.log()
    assert server.cli_json("verify")["ok"]
