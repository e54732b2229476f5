"""`appliance bench find` end to end at a tiny size: index built, server started, every query kind answered."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import APPLIANCE


def test_bench_find_small(tmp_path: Path) -> None:
    result = subprocess.run([*APPLIANCE, "bench", "find", "--instances", "800", "--queries", "5", "--workdir",
                             str(tmp_path / "work"), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out/results.json").read_text())
    assert (report["instances"], report["studies"]) == (800, 8)
    assert set(report["results"]) == {"patient_id", "date_range", "name_wildcard", "modality"}
    for row in report["results"].values():
        assert row["queries"] == 5 and row["final_statuses"] == ["0x0000"] and row["p99_ms"] >= row["p50_ms"] > 0
    assert report["results"]["patient_id"]["matches_mean"] == 2
    assert "| appliance | modality |" in (tmp_path / "out/results.md").read_text()
