"""kill -9 of `appliance tier run` in each phase of a move (the mover's test-only hook APPLIANCE_TIER_CRASH_AT
makes it SIGKILL itself there): after the journal, mid-copy, after the sync before the switch, after the switch
before the delete. A second `tier run` completes the move; every instance reads back byte-exact, nothing is indexed
twice (the index's counts are unchanged), and no container is left that the index does not name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tier_rig import NEARLINE_THEN_TAPE, nearline_site, orphans, read_everything
from tiering.audit import read_audit
from tiering.mover import CRASH_ENV, PHASES

APPLIANCE = [sys.executable, "-m", "appliance"]


def tier_run(config: Path, crash_at: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash_at:
        env[CRASH_ENV] = crash_at
    return subprocess.run([*APPLIANCE, "tier", "run", "--json", "-c", str(config)], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.parametrize("phase", PHASES)
def test_kill9_in_each_phase_then_the_next_run_completes(tmp_path: Path, phase: str) -> None:
    config, data = nearline_site(tmp_path)
    before, counts = read_everything(config)
    assert before == data

    crashed = tier_run(config, phase)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    # Whatever the phase, what was there is still readable, exactly once.
    assert read_everything(config) == (data, counts)

    done = tier_run(config)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["failed"] == 0
    assert read_everything(config) == (data, counts)
    assert orphans(config) == {"unnamed_files": [], "missing_files": [], "gc": []}
    status = json.loads(subprocess.run([*APPLIANCE, "tier", "status", "--json", "-c", str(config)],
                                       capture_output=True, text=True, timeout=60, check=True).stdout)
    nl = next(t for t in status["tiers"] if t["name"] == "nl")
    assert (nl["studies"], nl["instances"]) == (2, 5) and status["moves_in_progress"] == []
    if phase != "switched":
        # The interrupted move was redone from the journal.
        assert report["resumed"] == 1
    # And as an admin gets them back: `appliance export` (nearline copies decompressed on the way).
    for study in ("1.1", "1.2", "1.3"):
        subprocess.run([*APPLIANCE, "export", study, str(tmp_path / "out"), "-c", str(config)], capture_output=True,
                       timeout=60, check=True)
    assert {p.stem: p.read_bytes() for p in (tmp_path / "out").iterdir()} == data
    # One line per completed move, the interrupted one included (its line is written at its switch).
    moved = [(ln["study"], ln["outcome"]) for ln in read_audit(tmp_path / "audit.jsonl")]
    assert sorted(moved) == [("1.1", "moved"), ("1.2", "moved")]


def test_kill9_twice_in_a_row(tmp_path: Path) -> None:
    config, data = nearline_site(tmp_path)
    _before, counts = read_everything(config)
    assert tier_run(config, "copying").returncode == -signal.SIGKILL
    assert tier_run(config, "synced").returncode == -signal.SIGKILL  # the resumed move dies too
    assert tier_run(config).returncode == 0
    assert read_everything(config) == (data, counts)
    assert orphans(config) == {"unnamed_files": [], "missing_files": [], "gc": []}


@pytest.mark.parametrize("phase", PHASES)
def test_kill9_in_each_phase_of_a_move_from_nearline_to_tape(tmp_path: Path, phase: str) -> None:
    config, data = nearline_site(tmp_path, NEARLINE_THEN_TAPE, tape=True)
    _before, counts = read_everything(config)
    assert json.loads(tier_run(config).stdout)["moved"] == 2  # to nearline (a study is planned once per run)
    crashed = tier_run(config, phase)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert read_everything(config) == (data, counts)
    done = tier_run(config)
    assert done.returncode == 0, done.stderr
    assert read_everything(config) == (data, counts)
    # The nearline archives are deleted once the studies are on tape; tape keeps what it wrote (append-only).
    assert orphans(config) == {"unnamed_files": [], "missing_files": [], "gc": []}
    status = json.loads(subprocess.run([*APPLIANCE, "tier", "status", "--json", "-c", str(config)],
                                       capture_output=True, text=True, timeout=60, check=True).stdout)
    by_tier = {t["name"]: t for t in status["tiers"]}
    assert (by_tier["tape"]["studies"], by_tier["tape"]["instances"], by_tier["nl"]["studies"]) == (2, 5, 0)
