"""kill -9 of a recall in each phase (tiering/recall.py PHASES, via the test-only APPLIANCE_TEST_RECALL_CRASH_AT):
the next `appliance tier recall` finishes it; nothing is lost, nothing is indexed twice, `verify` is clean.

Real processes (`appliance tier run` to put the study on a virtual tape, `appliance tier recall` killed by SIGKILL
at the phase), a real index and real segment and tape files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.index.db import StudyIndex
from appliance.store.online import BlobStore, recover
from tests.tier_rig import ingest, write_tier_config
from tiering.recall import CRASH_ENV, PHASES, open_tiers

APPLIANCE = [sys.executable, "-m", "appliance"]
POLICY = """
[[policies]]
name = "all-to-tape"
from = "online"
to = "tape"
received_days_min = 1
"""


def cli(config: Path, *args: str, crash_at: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash_at:
        env[CRASH_ENV] = crash_at
    return subprocess.run([*APPLIANCE, *args, "-c", str(config)], capture_output=True, text=True, env=env, timeout=120)


def taped_site(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """Studies 1.1 (3 instances) and 1.2 (2) put on the virtual tape by `appliance tier run`."""
    from appliance.store.volumes import init_volume

    init_volume(tmp_path / "vol0", "vol0")
    config_path = write_tier_config(tmp_path, policies=POLICY)
    config = load_config(config_path)
    index = StudyIndex(config.storage.index_path)
    try:
        data = ingest(config, index, {"1.1": 3, "1.2": 2})
    finally:
        index.close()
    for tier in ("tape", "nl"):
        assert cli(config_path, "tier", "init", tier).returncode == 0
    moved = cli(config_path, "tier", "run", "--json")
    assert moved.returncode == 0 and json.loads(moved.stdout)["moved"] == 2, moved.stderr
    return config_path, data


@pytest.mark.parametrize("phase", PHASES)
def test_kill9_in_each_phase_then_the_next_run_finishes(tmp_path: Path, phase: str) -> None:
    config_path, data = taped_site(tmp_path)
    config = load_config(config_path)
    crashed = cli(config_path, "tier", "recall", "1.1", crash_at=phase)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    done = cli(config_path, "tier", "recall", "1.1", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"online": ["1.1"], "nearline": [], "queued": [], "errors": {}}

    index = StudyIndex(config.storage.index_path)
    store = BlobStore.open(config, index=index, tiers=open_tiers(config))
    try:
        # What a server starting now does: its recovery must not index the killed run's copies a second time.
        # (It seals the killed run's segment and records how far it goes: only container records change.)
        before = {k: v for k, v in index.dump().items() if k != "containers"}
        recover(store, index)
        assert {k: v for k, v in index.dump().items() if k != "containers"} == before
        assert index.recalls() == []
        for study, expected in (("1.1", "ONLINE"), ("1.2", "OFFLINE")):
            for _key, rec in index.instances_under(study):
                assert rec.availability == expected
        for sop, raw in data.items():
            ((_key, rec),) = index.instances_under(sop)
            blob = index.blob(rec.digest)
            assert blob is not None
            backends = sorted(c.backend for c in blob.copies)
            # Nothing indexed twice: one online copy of a recalled blob, its tape copy kept.
            assert backends == (["tape", "vol0"] if sop.startswith("1.1.") else ["tape"]), (sop, backends)
            assert store.read_all(rec.digest, blob, allow_offline=True) == raw
    finally:
        store.close()
        index.close()
    report = cli(config_path, "verify", "--json")
    assert report.returncode == 0, report.stdout + report.stderr
    assert json.loads(report.stdout)["tiers"]["online"]["checked"] == 3


def test_export_of_a_study_on_tape_recalls_it_when_no_server_runs(tmp_path: Path) -> None:
    config_path, data = taped_site(tmp_path)
    out = tmp_path / "out"
    result = cli(config_path, "export", "1.2", str(out), "--json")
    assert result.returncode == 0, result.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {f"{sop}.dcm": raw for sop, raw in data.items()
                                                             if sop.startswith("1.2.")}
    status = json.loads(cli(config_path, "tier", "recall", "1.2", "--json").stdout)
    assert status["online"] == ["1.2"]  # already online: nothing queued
    assert cli(config_path, "tier", "recall", "9.9.9").returncode == 3  # no such study


def test_recall_wait_s_zero_export_fails_clearly_when_a_server_would_do_it(tmp_path: Path) -> None:
    """With the serve lock held (a server running, its recaller busy elsewhere), an export that cannot wait says
    why, exit 69, and leaves the recall queued and no partial file."""
    import fcntl

    config_path, _data = taped_site(tmp_path)
    text = config_path.read_text()
    assert "[tiering]\n" in text
    config_path.write_text(text.replace("[tiering]\n", "[tiering]\nrecall_wait_s = 0\n", 1))
    fd = os.open(tmp_path / "index" / "serve.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        result = cli(config_path, "export", "1.1", str(tmp_path / "out"))
    finally:
        os.close(fd)
    assert result.returncode == 69 and "study is on tape; recall queued" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    index = StudyIndex(tmp_path / "index")
    try:
        assert [rec.requested_by for _k, rec in index.recalls()] == ["export"]
    finally:
        index.close()
