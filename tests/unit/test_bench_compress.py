"""bench/compress.py runs end to end (quick mode, a real subprocess) and reports sane, byte-exact numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_reports_every_corpus_level_and_dictionary_case(tmp_path: Path) -> None:
    out = tmp_path / "compress.json"
    run = subprocess.run([sys.executable, "-m", "bench.compress", "--quick", "--json", str(out), "--work-dir",
                          str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    corpora = {r["corpus"] for r in result["levels"]}
    assert {"synthetic CT", "synthetic MR", "pydicom test files"} <= corpora
    assert sorted({r["level"] for r in result["levels"]}) == [1, 3, 9]
    for r in result["levels"]:
        assert r["files"] > 0 and r["ratio"] > 1.0 and r["compress_mb_s"] > 0 and r["decompress_mb_s"] > 0
    assert len(result["dictionary"]) == 4
    for r in result["dictionary"]:
        assert r["files"] > 0 and r["ratio_plain"] > 1.0 and r["ratio_dict"] > 1.0
    assert [(r["corpus"], r["level"]) for r in result["nearline"]] == [
        ("synthetic CT", 0), ("synthetic CT", 3), ("synthetic MR", 0), ("synthetic MR", 3)]
    assert all(r["put_sync_mb_s"] > 0 and r["iter_read_mb_s"] > 0 for r in result["nearline"])
    assert "| synthetic CT | 4 |" in run.stdout  # the markdown table for docs/benchmarks-history.md
