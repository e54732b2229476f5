"""How fast `index rebuild --from-tier` reads a tier back (node replacement): STUDIES x PER_STUDY CT instances
received over DICOM, moved to the nearline tier and to SeaweedFS, then rebuilt from each (the CLI process timed,
start-up included). Prints instances/s; slow (run with -m slow). APPLIANCE_BENCH_REBUILD_STUDIES and
APPLIANCE_BENCH_REBUILD_PER_STUDY change the size."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ServerHandle
from tests.integration.test_rebuild_from_tier import TIERS, lose_index_and_volumes, rebuild, send_study, start
from tests.integration.test_rebuild_s3 import node
from tests.integration.test_tiering_e2e import tier_run

STUDIES = int(os.environ.get("APPLIANCE_BENCH_REBUILD_STUDIES", "20"))
PER_STUDY = int(os.environ.get("APPLIANCE_BENCH_REBUILD_PER_STUDY", "50"))


def fill_and_move(server: ServerHandle, tmp_path: Path) -> None:
    for i in range(STUDIES):
        send_study(server, tmp_path / f"in{i}", PER_STUDY, f"P{i}", called="APPLIANCE")
        for path in (tmp_path / f"in{i}").iterdir():
            path.unlink()
    moved = tier_run(server, 40)
    assert moved["moved"] == STUDIES, moved


def timed_rebuild(server: ServerHandle, tier: str, into: Path) -> tuple[float, dict[str, Any]]:
    started = time.monotonic()
    stats = rebuild(server, "--from-tier", tier, "--into", str(into))
    return time.monotonic() - started, stats


@pytest.mark.slow
def test_rebuild_rate_from_nearline_and_seaweedfs(make_server: Callable[..., ServerHandle], seaweed: Any,
                                                  s3_bucket: str, tmp_path: Path) -> None:
    total = STUDIES * PER_STUDY
    near = start(make_server, TIERS.replace('received_days_min = 365', 'received_days_min = 100000'))
    fill_and_move(near, tmp_path / "near")
    cloud = node(make_server, seaweed, s3_bucket, "bench", "APPLIANCE").start()
    fill_and_move(cloud, tmp_path / "cloud")
    lines = []
    for server, tier in ((near, "nl"), (cloud, "cloud")):
        server.kill()
        lose_index_and_volumes(server)  # the tier alone
        seconds, stats = timed_rebuild(server, tier, tmp_path / f"rebuilt-{tier}")
        assert stats["tiers"][tier]["blobs"] == total and stats["unreadable_count"] == 0, stats
        lines.append(f"index rebuild --from-tier {tier}: {total} instances in {STUDIES} archives, {seconds:.2f} s "
                     f"({total / seconds:.0f} instances/s, CLI start-up included)")
    print("\n" + "\n".join(lines))
