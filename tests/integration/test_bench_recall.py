"""bench/recall.py in quick mode: it runs the whole chain (ingest, tier run twice, recall, verify) and reports."""

from __future__ import annotations

import json
from pathlib import Path

from bench.recall import main


def test_quick_run_reports_reads_and_recall(tmp_path: Path) -> None:
    out = tmp_path / "recall.json"
    assert main(["--instances", "3", "--reads", "3", "--profile", "mr", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["instances"] == 3 and result["study_bytes"] > 0
    assert 0 < result["read_online"]["p50_ms"] and 0 < result["read_nearline"]["p50_ms"]
    assert result["recall_s"] > 0
