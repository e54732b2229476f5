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


def test_a_configuration_an_appliance_is_serving_is_refused(tmp_path: Path) -> None:
    import fcntl
    import os

    from bench.bench_config import BenchConfigError

    path = site_file(tmp_path)
    index = tmp_path / "meta" / "index"
    index.mkdir()
    (index / "serve.lock").touch()
    SiteConfig(path)  # the lock file of a stopped appliance: fine
    fd = os.open(index / "serve.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as appliance/server.py holds it while it serves
    try:
        with pytest.raises(BenchConfigError, match=r"an appliance is serving this configuration .*--target"):
            SiteConfig(path)
    finally:
        os.close(fd)
    SiteConfig(path)


def test_a_folder_the_benchmark_cannot_write_into_is_refused_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from bench import bench_config
    from bench.bench_config import BenchConfigError

    path = site_file(tmp_path)
    real_access = os.access
    # Tests run as root, for whom a mode is no obstacle: the check's answer for the index's folder is faked.
    monkeypatch.setattr(bench_config.os, "access",
                        lambda p, mode: False if Path(p) == tmp_path / "meta" else real_access(p, mode))
    with pytest.raises(BenchConfigError, match=r"cannot write into .*/meta: run the benchmark as") as err:
        SiteConfig(path)
    assert "\n" not in str(err.value)


def test_an_audit_trail_to_journald_gets_none_of_the_benchmarks_events(tmp_path: Path) -> None:
    path = site_file(tmp_path)
    path.write_text(path.read_text().replace('destination = "file"', 'destination = "journald"'))
    site = SiteConfig(path)
    work = tmp_path / "work"
    work.mkdir()
    cfg = load_config(site.write_run_config(work, "r1"))
    assert cfg.audit.destination == "file" and cfg.audit.path == work / "audit" / "audit.jsonl"
    assert site.describe()["audit"] == "journald"  # the report says what the site runs
    site.remove_run("r1")


def _datasheet_text(doc: dict[str, object], tmp_path: Path) -> str:
    from bench.datasheet_report import blocks, to_markdown

    return to_markdown(blocks(doc, None), tmp_path)


def test_the_datasheet_says_durably_only_of_an_appliance_that_fsyncs(tmp_path: Path) -> None:
    import copy

    ref = json.loads((Path(__file__).parents[2] / "docs/results/datasheet-2026-11-27/datasheet.json").read_text())
    assert "stored durably" in _datasheet_text(ref, tmp_path)  # the harness's own configuration: fsync on
    nofsync = copy.deepcopy(ref)
    nofsync["appliance"]["config"] = {
        "file": "/etc/appliance/appliance.toml", "volumes": [{"name": "v", "path": "/srv/v"}], "audit": "file",
        "dropped_sections": [], "environment": [],
        "storage": {"fsync": False, "commit_max_batch": 64, "commit_max_wait_ms": 2.0}}
    text = _datasheet_text(nofsync, tmp_path)
    assert "durably" not in text and "stored WITHOUT fsync" in text and "NOT made durable" in text
    assert "each image on disk (fdatasync)" not in text
    remote = copy.deepcopy(ref)
    remote["appliance"]["target"] = "10.0.0.5:11112 (AE APPLIANCE)"
    text = _datasheet_text(remote, tmp_path)
    assert "durably" not in text and "as configured on that machine" in text
    assert "started by the vendor on that machine" in text


CHILD = """
import sys, time
from pathlib import Path
from bench import datasheet, receivers

class Sleeper(receivers.Receiver):
    label = "sleeper"
    def command(self):
        return ["sleep", "120"]
    def start(self):
        import subprocess
        self.proc = subprocess.Popen(self.command(), start_new_session=True)

r = Sleeper(Path(sys.argv[1]))
with datasheet.exit_on_signals():
    try:
        r.start()
        print(r.proc.pid, flush=True)
        time.sleep(120)
    finally:
        r.stop()
        Path(sys.argv[1], "cleaned").touch()
"""


def test_a_terminated_datasheet_stops_its_receivers_and_cleans_up(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import time

    root = Path(__file__).parents[2]
    harness = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], cwd=root, stdout=subprocess.PIPE,
                               text=True)
    assert harness.stdout is not None
    receiver_pid = int(harness.stdout.readline())
    harness.send_signal(signal.SIGTERM)  # as a closed session or `kill` would
    assert harness.wait(30) == 128 + signal.SIGTERM
    assert (tmp_path / "cleaned").exists()
    deadline = time.monotonic() + 10
    while True:
        try:
            os.kill(receiver_pid, 0)
        except ProcessLookupError:
            break
        if time.monotonic() > deadline:
            os.kill(receiver_pid, signal.SIGKILL)
            raise AssertionError("the receiver outlived the terminated harness")
        time.sleep(0.05)


def test_ctrl_c_ends_the_whole_datasheet_not_only_its_current_step() -> None:
    import os
    import signal
    import time

    from bench import datasheet

    # Ctrl-C as a terminal delivers it (a suite started in the background has SIGINT ignored)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit) as stop, datasheet.exit_on_signals():
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            except KeyboardInterrupt:  # what the side by side and `bench run` catch, to go on
                pytest.fail("Ctrl-C was caught as KeyboardInterrupt by the step")
        assert stop.value.code == 128 + signal.SIGINT
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_hang_up_under_nohup_does_not_end_the_datasheet() -> None:
    import signal

    from bench import datasheet

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # what nohup leaves
    try:
        with datasheet.exit_on_signals():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            signal.raise_signal(signal.SIGHUP)  # ignored: nothing happens
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


def test_a_remote_datasheet_does_not_claim_what_it_could_not_see(tmp_path: Path) -> None:
    ref = json.loads((Path(__file__).parents[2] / "docs/results/datasheet-2026-11-27/datasheet.json").read_text())
    ref["sender"].update(cpus=[0], receiver_cpus=[1])
    assert "(receivers on CPU 1)" in _datasheet_text(ref, tmp_path)
    ref["appliance"]["target"] = "10.0.0.5:11112 (AE APPLIANCE)"
    text = _datasheet_text(ref, tmp_path)
    assert "on CPU 0" in text and "receivers on CPU" not in text  # they run on the other machine, not pinned
    assert "those on another machine are not counted from here" in text


def test_a_run_without_a_peak_rss_is_no_crash() -> None:
    from bench import datasheet

    row = {"role": "target", "associations": 8, "instances_per_s": 10.0, "mb_per_s": 1.0, "latency_ms": None,
           "setup_ms": None, "failures": 0, "instances_ok": 10}
    run = {"role": "target", "server": {"cpu_s": 0.5, "peak_rss_bytes": None}}
    stats = datasheet.driver_stats([{"summary": {"rows": [row]}, "runs": [run]}])
    assert stats["peak_rss_mib"]["median"] is None and stats["cpu_ms_per_instance"]["median"] == 50.0


def test_datasheet_json_is_printed_also_when_a_run_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from appliance.cli import app
    from bench import datasheet

    def failed_run(argv: list[str]) -> int:
        out = Path(argv[argv.index("--out") + 1])
        (out / "datasheet.json").write_text(json.dumps({"ok": False, "problems": ["appliance ct-burst: 0xA700"]}))
        return 1

    monkeypatch.setattr(datasheet, "main", failed_run)
    result = CliRunner().invoke(app, ["bench", "datasheet", "--json", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["problems"] == ["appliance ct-burst: 0xA700"]


def test_relative_paths_in_the_site_file_are_the_site_files_not_the_run_folders(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = site_file(tmp_path)
    path.write_text(path.read_text().replace(f'"{tmp_path}/', '"'))  # index_path = "meta/index", path = "a"...
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    site = SiteConfig(path)
    work = tmp_path / "work"
    work.mkdir()
    cfg = load_config(site.write_run_config(work, "r1"))
    assert [v.path for v in cfg.volumes] == [tmp_path / "a" / BENCH_FOLDER / "r1", tmp_path / "b" / BENCH_FOLDER / "r1"]
    assert cfg.storage.index_path == tmp_path / "meta" / BENCH_FOLDER / "r1" / "index"
    site.remove_run("r1")


def test_the_disk_probe_writes_in_the_benchmarks_folder_not_the_volumes_root(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import datasheet, hardware

    probed: list[Path] = []

    def fake_probe(folder: Path, seconds: float) -> dict[str, float]:
        probed.append(Path(folder))
        return {"fsync_512kib_t8_files_per_s": 100.0}

    monkeypatch.setattr(hardware, "probe", fake_probe)
    monkeypatch.setattr(hardware, "machine", lambda folder: {"filesystem": "ext4"})
    volume = tmp_path / "a"
    volume.mkdir()
    disks = datasheet.probe_disks([(volume, "volume a")], 0.1, 3, BENCH_FOLDER)
    assert probed == [volume / BENCH_FOLDER] * 3 and disks[0]["path"] == str(volume)
    assert disks[0]["holds"] == "volume a"
    assert list(volume.iterdir()) == []  # its folder removed again
    (volume / BENCH_FOLDER).mkdir()  # made by main for the receivers' data: stays for them
    datasheet.probe_disks([(volume, "volume a")], 0.1, 1, BENCH_FOLDER)
    assert (volume / BENCH_FOLDER).is_dir()


def test_what_a_killed_run_left_is_named_not_removed(tmp_path: Path) -> None:
    site = SiteConfig(site_file(tmp_path))
    assert site.leftovers() == []
    stale = [tmp_path / "a" / BENCH_FOLDER / "20261127-010101-x", tmp_path / "meta" / BENCH_FOLDER / "20261127-010101-x"]
    for folder in stale:
        folder.mkdir(parents=True)
    assert site.leftovers() == sorted(stale)
    assert all(folder.is_dir() for folder in stale)


def test_the_sustained_rate_names_the_maximum_it_is_a_share_of(tmp_path: Path) -> None:
    ref = json.loads((Path(__file__).parents[2] / "docs/results/datasheet-2026-11-27/datasheet.json").read_text())
    text = _datasheet_text(ref, tmp_path)
    # 412/s is 50% of the asyncio sender's 824, not of the storescu figure (722) the key figures quote first
    assert "At a steady 412 MR images/s (50% of the 824 images/s our sender reached in the MR burst)" in text
    assert "50% of the median 824 images/s the appliance reached in the MR burst from our asyncio sender" in text
