"""What tripped a storage admin trying tiering from the docs alone (issue 10 walk-through), as real CLI runs: a
policy up the tiers, `tier init` on a NAS that is not mounted, files readable by all, `tier recall` of a nearline
study, `tier status` / `verify` with an unmounted volume, Ctrl-C in the middle of `tier run`, units."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import time
from pathlib import Path

from tests.integration.test_tier_cli import APPLIANCE, tier, tier_json
from tests.tier_rig import (
    DAY_NS,
    NEARLINE_ONLY,
    NEARLINE_THEN_TAPE,
    OLD_TO_NEARLINE,
    TAPE,
    nearline_site,
    read_everything,
    write_tier_config,
)
from tiering.audit import read_audit


def appliance(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*APPLIANCE, *args, "-c", str(config)], capture_output=True, text=True, timeout=120)


def test_a_policy_up_the_tiers_is_a_configuration_error(tmp_path: Path) -> None:
    config = write_tier_config(tmp_path, policies="""
[[policies]]
name = "back-up"
from = "tape"
to = "nl"
""")
    result = tier(config, "plan", check=False)
    assert result.returncode == 78
    assert "'tape' -> 'nl' is not a move to a slower tier" in result.stderr and "tier recall" in result.stderr


def test_tier_init_does_not_create_a_missing_mount_and_warns_on_the_local_disk(tmp_path: Path) -> None:
    config = write_tier_config(tmp_path, tiers=NEARLINE_ONLY.format(root=tmp_path / "mnt" / "nas"))
    result = tier(config, "init", "nl", check=False)
    assert result.returncode == 69 and "does not exist. Mount the volume's filesystem first" in result.stderr
    assert not (tmp_path / "mnt").exists()
    (tmp_path / "mnt" / "nas").mkdir(parents=True)  # an empty mount point: the NAS is not mounted
    (tmp_path / "index").mkdir()
    result = tier(config, "init", "nl")
    assert "initialised" in result.stdout
    assert "warning: nearline volume nl0" in result.stderr and "same filesystem as the index" in result.stderr


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_tier_and_tape_commands_write_private_files_whatever_the_umask(tmp_path: Path) -> None:
    config, _data = nearline_site(tmp_path)
    config.write_text(config.read_text() + TAPE.format(root=tmp_path))

    def as_admin(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*APPLIANCE, *args, "-c", str(config)], capture_output=True, text=True, timeout=120,
                              preexec_fn=lambda: os.umask(0o022))

    assert as_admin("tier", "init", "tape").returncode == 0
    assert as_admin("tier", "run").returncode == 0
    archives = _modes(tmp_path / "nl0" / "archives")
    assert any(name.endswith(".tar") for name in archives)
    for root in (tmp_path / "nl0" / "archives", tmp_path / "library"):
        loose = {name: oct(mode) for name, mode in _modes(root).items() if mode & 0o077}
        assert loose == {}, loose


def test_recall_of_a_nearline_study_says_it_needs_none(tmp_path: Path) -> None:
    config, _data = nearline_site(tmp_path)
    tier(config, "run")
    data = tier_json(config, "recall", "1.1")
    assert data["nearline"] == ["1.1"] and data["online"] == [] and data["queued"] == []
    human = tier(config, "recall", "1.1", "1.3").stdout
    assert "1.1: nearline, not on tape" in human and "1.3: online" in human
    assert tier(config, "recall", "9.9", check=False).returncode == 3


def test_status_and_verify_with_the_nas_not_mounted(tmp_path: Path) -> None:
    config, _data = nearline_site(tmp_path)
    tier(config, "run")
    (tmp_path / "nl0").rename(tmp_path / "nl0.away")
    (tmp_path / "nl0").mkdir()  # the empty mount point

    human = tier(config, "status").stdout
    row = next(line for line in human.splitlines() if line.strip().startswith("nl0"))
    assert "UNAVAILABLE" in row and "0 B" not in row
    assert "has no .appliance-nearline marker" in human
    volume = tier_json(config, "status")["tiers"][1]["volumes"][0]
    assert volume["name"] == "nl0" and "not mounted" in volume["error"]

    verify = appliance(config, "verify")
    assert verify.returncode == 69 and "Nothing was checked" in verify.stderr and "--tier online" in verify.stderr
    assert verify.stdout == ""  # not one "missing" line per copy
    assert appliance(config, "verify", "--tier", "online").returncode == 0
    typo = appliance(config, "verify", "--tier", "ln")
    assert typo.returncode == 78 and "no tier named ln" in typo.stderr  # not 1, which means "problems found"

    (tmp_path / "nl0").rmdir()
    (tmp_path / "nl0.away").rename(tmp_path / "nl0")
    verify = appliance(config, "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert re.search(r"nl +5 +15\.0 KB ", verify.stdout), verify.stdout  # bytes read in units, not raw


def test_ctrl_c_in_the_middle_of_a_run_says_so_and_the_next_run_finishes(tmp_path: Path) -> None:
    config, data = nearline_site(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "APPLIANCE_TIER_NOW"}
    # 1 kB/s: the first study takes seconds, so the Ctrl-C lands inside a move.
    # SIGINT as a terminal's Ctrl-C finds it: a test run started in the background by a non-interactive shell
    # (nohup make test &) has SIGINT ignored, the child inherits that, and Python then never raises
    # KeyboardInterrupt (seen in a CI clone started that way: the run finished, exit 0).
    proc = subprocess.Popen([*APPLIANCE, "tier", "run", "--rate", "0.001", "-c", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # Interrupted once it is inside a move: its archive is being written (polled, not a fixed wait).
    partials = tmp_path / "nl0" / "tmp"
    deadline = time.monotonic() + 60
    while not (partials.is_dir() and any(p.name.endswith(".partial") for p in partials.iterdir())):
        assert time.monotonic() < deadline and proc.poll() is None, "tier run never started copying"
        time.sleep(0.02)
    # The archive is begun just before the move is journaled: wait for the journal too (a Ctrl-C between the two
    # leaves nothing to resume, which is right but not what this test is about; seen in CI under load).
    while not tier_json(config, "status")["moves_in_progress"]:
        assert time.monotonic() < deadline and proc.poll() is None, "tier run never journaled its move"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert "interrupted" in err and "next `appliance tier run`" in err and "Traceback" not in err

    pending = tier(config, "status").stdout
    when = r"20\d\d-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d"  # local ISO time, as every human time of the CLI
    assert re.search(rf"move 1\.[12] online -> nl \(old-to-nearline, since {when}\)", pending), pending
    done = tier_json(config, "run")
    assert done["moved"] + done["resumed"] >= 2 and done["failed"] == 0
    assert tier_json(config, "status")["moves_in_progress"] == []
    assert read_everything(config)[0] == data
    outcomes = [(ln["outcome"], ln["resumed"]) for ln in read_audit(tmp_path / "audit.jsonl")]
    assert ("failed", False) in outcomes and ("moved", True) in outcomes


def test_tape_list_shows_the_units_tier_status_shows(tmp_path: Path) -> None:
    config, _data = nearline_site(tmp_path, tape=True)
    listed = appliance(config, "tape", "list").stdout
    row = next(line for line in listed.splitlines() if line.startswith("VTL001L6"))
    assert "67.1 MB" in row and "MiB" not in row  # cartridge_bytes = 67108864, as `tier status` prints it
    assert "67.1 MB" in tier(config, "status").stdout
    assert json.loads(appliance(config, "tape", "list", "--json").stdout)["cartridges"][0]["capacity_bytes"] == 67108864


def test_tier_init_has_json_too(tmp_path: Path) -> None:
    config = write_tier_config(tmp_path, tiers=NEARLINE_ONLY.format(root=tmp_path))
    data = tier_json(config, "init", "nl")
    assert data["tier"] == "nl" and data["kind"] == "nearline" and "initialised" in data["done"][0]
    assert "already initialised" in tier_json(config, "init", "nl")["done"][0]


def test_export_with_the_nas_not_mounted_does_not_claim_a_recall(tmp_path: Path) -> None:
    config, _data = nearline_site(tmp_path, tape=True, policies=NEARLINE_THEN_TAPE)
    later = time.time_ns() + 400 * DAY_NS
    tier(config, "run", now_ns=later)  # 1.1, 1.2 -> nl
    tier(config, "run", now_ns=later)  # -> tape
    tier(config, "recall", "1.1")  # back online (no server: recalled by this command); its tape copy stays
    tier(config, "run", "--policy", "old-to-nearline", now_ns=later)  # 1.1 -> nl again, NEARLINE, tape copy kept
    assert tier_json(config, "recall", "1.1")["nearline"] == ["1.1"]
    (tmp_path / "nl0").rename(tmp_path / "nl0.away")
    (tmp_path / "nl0").mkdir()

    result = appliance(config, "export", "1.1", str(tmp_path / "out"))
    assert result.returncode == 69
    assert "recall queued" not in result.stderr and "Is the NAS mounted?" in result.stderr, result.stderr
    assert not list((tmp_path / "out").glob("*"))


def test_an_unmounted_nas_holding_emptied_archives_does_not_stop_every_run(tmp_path: Path) -> None:
    config, data = nearline_site(tmp_path, tape=True, policies=NEARLINE_THEN_TAPE)
    later = time.time_ns() + 400 * DAY_NS
    tier(config, "run", now_ns=later)  # 1.1, 1.2 -> nl
    tier(config, "run", now_ns=later)  # -> tape
    tier(config, "recall", "1.1")  # online again, its tape copy kept
    tier(config, "run", "--policy", "old-to-nearline", now_ns=later)  # 1.1 -> nl (and still on tape)
    (tmp_path / "nl0").rename(tmp_path / "nl0.away")
    (tmp_path / "nl0").mkdir()
    # 1.1 -> tape is an index switch (its tape copy is there); its nl archive cannot be deleted now.
    moved = tier(config, "run", "--policy", "nearline-to-tape")
    assert "moved 1 studies" in moved.stdout
    assert "left for the next run" in moved.stderr
    again = tier(config, "run", "--policy", "nearline-to-tape", check=False)  # was: exit 69 before anything
    assert again.returncode == 0, again.stderr
    assert "left for the next run" in again.stderr
    (tmp_path / "nl0").rmdir()
    (tmp_path / "nl0.away").rename(tmp_path / "nl0")
    tier(config, "run", "--policy", "nearline-to-tape")
    assert not list((tmp_path / "nl0" / "archives").rglob("*.tar"))  # mounted again: the archives went
    assert read_everything(config)[0] == data


def test_plan_rows_are_never_wrapped(tmp_path: Path) -> None:
    filters = ('received_days_min = 30\naccessed_days_min = 14\nmodalities = ["CT", "MR"]\ncalling_aes = ["SCU"]\n'
               'study_bytes_min = 1000')
    config, _data = nearline_site(tmp_path, policies=OLD_TO_NEARLINE.replace("received_days_min = 30", filters))
    rows = [line for line in tier(config, "plan").stdout.splitlines() if line.startswith("old-to-nearline ")]
    assert len(rows) == 2  # `tier plan | grep` keeps whole rows: policy, study, move, size and reason on one line
    assert all("online -> nl" in row and "received 60 days ago" in row and "modality CT" in row for row in rows), rows
    assert max(len(row) for row in rows) > 160  # wider than the table used to be


def test_index_rebuild_does_not_silently_drop_the_tiers(tmp_path: Path) -> None:
    config, data = nearline_site(tmp_path)
    tier(config, "run")  # 1.1, 1.2 -> nl
    refused = appliance(config, "index", "rebuild")
    assert refused.returncode == 78 and "reads the online volumes, not the tiers nl" in refused.stderr
    assert "Nothing was changed" in refused.stderr and "--from-tier NAME" in refused.stderr
    assert not (tmp_path / "index.old").exists()
    assert read_everything(config)[0] == data
    inspect = appliance(config, "index", "rebuild", "--into", str(tmp_path / "rebuilt"))
    # (the rig's instances are not real DICOM files, so this rebuild reports them unreadable: only the warning counts)
    assert "warning: index rebuild reads the online volumes, not the tiers nl" in inspect.stderr
    assert "indexed" in inspect.stdout and (tmp_path / "rebuilt").is_dir()
