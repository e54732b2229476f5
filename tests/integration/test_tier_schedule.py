"""The server runs the policies itself every tiering.schedule_s: skipped while an admin's `tier run` holds
tiering.lock, done once it is free; the run is killed at shutdown."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ServerHandle, wait_for
from tests.tier_rig import OLD_TO_NEARLINE, nearline_site, orphans, read_everything
from tiering.run import tiering_lock


def nl_studies(config: Path) -> int:
    out = subprocess.run([sys.executable, "-m", "appliance", "tier", "status", "--json", "-c", str(config)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return next(t["studies"] for t in json.loads(out)["tiers"] if t["name"] == "nl")


def test_scheduled_policy_run(tmp_path: Path) -> None:
    config, data = nearline_site(tmp_path, OLD_TO_NEARLINE, tiering="schedule_s = 0.3")
    _before, counts = read_everything(config)
    server = ServerHandle(tmp_path, config)
    with tiering_lock(tmp_path / "index", "an admin's tier run"):
        server.start()
        try:
            wait_for(lambda: "scheduled run skipped: another mover is running (an admin's tier run" in server.log(),
                     30, what="a skipped scheduled run", interval=0.1)
            assert nl_studies(config) == 0
        except BaseException:
            server.stop()
            raise
    try:
        wait_for(lambda: nl_studies(config) == 2, 60, what="the scheduled run to move the old studies", interval=0.5)
        wait_for(lambda: 'appliance_tier_migration_bytes_total{from_tier="online",to_tier="nl"} 15000.0'
                 in server.metrics(), 30, what="the migration bytes metric", interval=0.2)
    finally:
        assert server.stop() == 0
    assert read_everything(config) == (data, counts)
    assert orphans(config) == {"unnamed_files": [], "missing_files": [], "gc": []}
