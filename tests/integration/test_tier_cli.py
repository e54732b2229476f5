"""`appliance tier init|status|plan|run` as a storage admin runs them: real processes, real files, the nearline
tier, the planner's clock moved with APPLIANCE_TIER_NOW."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.tier_rig import DAY_NS, nearline_site, orphans, read_everything
from tiering.audit import read_audit
from tiering.run import tiering_lock

APPLIANCE = [sys.executable, "-m", "appliance"]


def tier(config: Path, *args: str, now_ns: int | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ}
    env.pop("APPLIANCE_TIER_NOW", None)
    if now_ns is not None:
        env["APPLIANCE_TIER_NOW"] = str(now_ns)
    result = subprocess.run([*APPLIANCE, "tier", *args, "-c", str(config)], capture_output=True, text=True,
                            env=env, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"tier {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def tier_json(config: Path, *args: str, now_ns: int | None = None) -> Any:
    return json.loads(tier(config, *args, "--json", now_ns=now_ns).stdout)


def test_plan_run_status_and_byte_exact_reads(tmp_path: Path) -> None:
    config, data = nearline_site(tmp_path)
    before, counts = read_everything(config)
    assert before == data

    plan = tier_json(config, "plan")
    assert sorted(m["study"] for m in plan["moves"]) == ["1.1", "1.2"] and plan["bytes"] == 5 * 3000
    assert all(m["policy"] == "old-to-nearline" and "received 60 days ago" in m["reason"] for m in plan["moves"])
    human = tier(config, "plan").stdout
    assert "old-to-nearline: 2 studies, 15.0 KB" in human and "online -> nl" in human
    # As if it were 40 days later: the study received today is old enough too.
    later = tier_json(config, "plan", now_ns=time.time_ns() + 40 * DAY_NS)
    assert sorted(m["study"] for m in later["moves"]) == ["1.1", "1.2", "1.3"]

    dry = tier_json(config, "run", "--dry-run", "--limit", "1")
    assert dry["dry_run"] and len(dry["moves"]) == 1 and dry["moved"] == 0
    assert read_everything(config) == (data, counts)

    first = tier_json(config, "run", "--limit", "7KB", "--rate", "50")  # 1.2 (6 KB) fits, 1.1 (9 KB) not
    assert first["moved"] == 1 and first["failed"] == 0
    rest = tier_json(config, "run")
    assert rest["moved"] == 1
    assert [r["study"] for r in first["results"] + rest["results"]] == ["1.2", "1.1"]
    assert read_everything(config) == (data, counts)
    assert orphans(config) == {"unnamed_files": [], "missing_files": [], "gc": []}

    status = tier_json(config, "status")
    by_tier = {t["name"]: t for t in status["tiers"]}
    assert (by_tier["nl"]["studies"], by_tier["nl"]["instances"], by_tier["nl"]["bytes"]) == (2, 5, 15000)
    assert (by_tier["online"]["studies"], by_tier["online"]["instances"]) == (1, 2)
    assert by_tier["nl"]["volumes"][0]["name"] == "nl0" and by_tier["nl"]["capacity_bytes"] > 0
    assert status["moves_in_progress"] == [] and status["recalls_queued"] == []
    assert "nl" in tier(config, "status").stdout

    lines = read_audit(tmp_path / "audit.jsonl")
    assert [(ln["study"], ln["outcome"]) for ln in lines] in ([("1.1", "moved"), ("1.2", "moved")],
                                                             [("1.2", "moved"), ("1.1", "moved")])
    assert tier_json(config, "plan")["moves"] == []  # nothing left to move


def test_a_second_mover_says_who_holds_the_lock(tmp_path: Path) -> None:
    config, _data = nearline_site(tmp_path)
    with tiering_lock(tmp_path / "index", "appliance tier run"):
        result = tier(config, "run", check=False)
    assert result.returncode == 69
    assert f"another mover is running (appliance tier run, pid {os.getpid()}" in result.stderr


def test_usage_errors(tmp_path: Path) -> None:
    config, _data = nearline_site(tmp_path)
    assert tier(config, "run", "--limit", "lots", check=False).returncode == 2
    assert tier(config, "plan", "--policy", "nope", check=False).returncode == 78
    assert tier(config, "init", "nope", check=False).returncode == 78
    bad_now = subprocess.run([*APPLIANCE, "tier", "plan", "-c", str(config)], capture_output=True, text=True,
                             env={**os.environ, "APPLIANCE_TIER_NOW": "yesterday"}, timeout=60)
    assert bad_now.returncode == 2 and "APPLIANCE_TIER_NOW" in bad_now.stderr


def test_export_while_a_tier_run_moves_the_study(tmp_path: Path, monkeypatch: Any) -> None:
    """`appliance export` reads the index, then the bytes: a `tier run` moving the study in between (its online
    segment deleted after the switch) must not fail the export; the bytes come from the nearline copy."""
    from typer.testing import CliRunner

    from appliance.cli import app
    from appliance.store.online import BlobStore

    config, data = nearline_site(tmp_path)
    opened = BlobStore.open.__func__  # type: ignore[attr-defined]

    def open_after_a_move(cls: Any, *args: Any, **kw: Any) -> Any:
        assert tier_json(config, "run")["moved"] == 2  # 1.1 and 1.2 to nearline; their segment is deleted
        return opened(cls, *args, **kw)

    monkeypatch.setattr(BlobStore, "open", classmethod(open_after_a_move))
    result = CliRunner().invoke(app, ["export", "1.1", str(tmp_path / "out"), "-c", str(config)])
    assert result.exit_code == 0, result.output
    assert {p.stem: p.read_bytes() for p in (tmp_path / "out").iterdir()} == {
        sop: raw for sop, raw in data.items() if sop.startswith("1.1.")}
    assert orphans(config)["unnamed_files"] == []
