"""bench.migrate with tiny parameters: studies moved to nearline by real `appliance tier run` processes beside a
DCMTK ingest burst, single instances got back with getscu from both tiers, the results written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import migrate
from tests.conftest import require_dcmtk


@pytest.mark.slow
def test_bench_migrate_smoke(tmp_path: Path) -> None:
    require_dcmtk()
    out = tmp_path / "results"
    # --rate 1 (MiB/s) keeps each 2-study batch copying for seconds, so the burst overlaps it.
    rc = migrate.main(["--studies", "2", "--slices", "4", "--mr", "20", "--repeats", "1", "--reads", "2",
                       "--rate", "1", "--cache", str(tmp_path / "cache"), "--tmp", str(tmp_path), "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "migrate.json").read_text())
    s = doc["summary"]
    assert s["device_limit_mb_s"] > 0 and s["migration_alone_mb_s"] > 0 and s["ingest_alone_inst_s"] > 0
    moved = [r for r in doc["runs"] if r["kind"] == "migration alone"]
    assert moved and all(r["studies"] == 1 for r in moved)
    assert doc["retrieve"]["reads"] == 2 and doc["retrieve"]["nas_ms_p50"] > 0
    assert doc["read"]["nas_ms_p50"] > 0
    assert "C-GET of one CT instance" in (out / "migrate.md").read_text()


@pytest.mark.slow
def test_bench_migrate_s3_smoke(tmp_path: Path) -> None:
    """The same into an S3 tier on a SeaweedFS the benchmark starts itself, with nearline beside it for reads."""
    require_dcmtk()
    out = tmp_path / "results"
    rc = migrate.main(["--tier", "s3", "--studies", "2", "--slices", "4", "--mr", "20", "--repeats", "1",
                       "--reads", "2", "--rate", "1", "--cache", str(tmp_path / "cache"), "--tmp", str(tmp_path),
                       "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "migrate.json").read_text())
    assert doc["summary"]["device_limit_mb_s"] > 0 and doc["summary"]["migration_alone_mb_s"] > 0
    assert doc["retrieve"]["cloud_ms_p50"] > 0 and doc["retrieve"]["nas_ms_p50"] > 0
    assert doc["read"]["cloud_ms_p50"] > 0 and doc["read"]["nas_ms_p50"] > 0
    assert "S3" in (out / "migrate.md").read_text()
