"""What a site's configuration or environment could make a benchmark do to the site (bench/bench_config.py,
bench/receivers.py): the live index, the production port, the live audit trail, a running appliance's volumes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from appliance.config import load_config
from bench import driver, receivers
from bench.bench_config import BENCH_FOLDER, SiteConfig
from tests.unit.test_bench_datasheet_parts import site_file


def test_appliance_env_overrides_are_measured_but_never_reach_the_benchmarks_appliance(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    live_index = tmp_path / "meta" / "index"
    monkeypatch.setenv("APPLIANCE_STORAGE_INDEX_PATH", json.dumps(str(live_index)))
    monkeypatch.setenv("APPLIANCE_SERVER_PORT", "104")
    monkeypatch.setenv("APPLIANCE_SERVER_WORKERS", "5")
    monkeypatch.setenv("APPLIANCE_TLS_PORT", "2762")
    site = SiteConfig(site_file(tmp_path))
    work = tmp_path / "work"
    work.mkdir()
    path = site.write_run_config(work, "r1")
    env = receivers.receiver_env()
    assert not [k for k in env if k.startswith(("APPLIANCE_SERVER_", "APPLIANCE_STORAGE_", "APPLIANCE_TLS_"))]
    cfg = load_config(path, environ=env)  # what the benchmark's appliance reads
    assert cfg.storage.index_path == tmp_path / "meta" / BENCH_FOLDER / "r1" / "index"  # not the live index
    assert cfg.server.port == 0
    assert cfg.server.workers == 5  # the site's override is what the site runs: measured
    assert site.describe()["environment"] == ["APPLIANCE_SERVER_PORT", "APPLIANCE_SERVER_WORKERS",
                                              "APPLIANCE_STORAGE_INDEX_PATH", "APPLIANCE_TLS_PORT"]
    site.remove_run("r1")


def test_a_spawned_receiver_gets_no_config_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPLIANCE_STORAGE_INDEX_PATH", "/var/lib/appliance/index")
    monkeypatch.setenv("APPLIANCE_SERVER_PORT", "104")
    port_file = tmp_path / "port.json"
    code = ("import json, os, sys; json.dump({'port': 0, 'env': sorted(k for k in os.environ "
            "if k.startswith('APPLIANCE_'))}, open(sys.argv[1], 'w'))")
    spawned = driver.Spawned([sys.executable, "-c", code, str(port_file)], tmp_path, port_file, "probe")
    spawned.stop()
    assert spawned.info["env"] == []
