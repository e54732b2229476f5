"""Deleting on purpose against a running appliance fed by DCMTK storescu (docs/operations.md "Deleting studies"):
`appliance delete` refuses without --yes and a terminal, removes an instance, a series, a study; findscu, getscu
and export no longer find them; the audit trail says who; compaction reclaims the bytes; a legal hold blocks it."""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pydicom
import pytest
from typer.testing import CliRunner

from appliance import cli_delete
from appliance.cli import app
from appliance.errors import EXIT_FAILURE, EXIT_NOT_FOUND, EXIT_TEMPFAIL, EXIT_USAGE
from appliance.index.db import StudyIndex
from bench.synth import write_folder
from tests.conftest import APPLIANCE, ServerHandle, dcmtk
from tests.integration.test_audit import audit_lines

MakeServer = Callable[..., ServerHandle]
PEERS = {"scu": {"ae_title": "SCU", "port": 1}}


def _uid(path: Path, keyword: str) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).get(keyword))


def _segment_bytes(server: ServerHandle) -> int:
    return sum(p.stat().st_size for p in (server.volume / "segments").glob("*.tar"))


def _find_studies(server: ServerHandle) -> str:
    result = dcmtk("findscu", "-S", "-aet", "SCU", "-aec", "APPLIANCE", "-k", "QueryRetrieveLevel=STUDY",
                   "-k", "StudyInstanceUID", "-k", "NumberOfStudyRelatedInstances", "127.0.0.1", str(server.port))
    assert result.returncode == 0, result.stderr
    return result.stderr + result.stdout


def _delete(server: ServerHandle, *args: str) -> subprocess.CompletedProcess[str]:
    """A real subprocess with no terminal on stdin (a cron job, a script)."""
    return subprocess.run([*APPLIANCE, "delete", *args, "-c", str(server.config_path)], capture_output=True,
                          text=True, cwd=server.root, stdin=subprocess.DEVNULL, timeout=120)


def test_delete_instance_series_study_on_a_running_server(make_server: MakeServer, tmp_path: Path) -> None:
    ct = write_folder("ct", 6, 21, "none", tmp_path / "ct", size=32)
    mr = write_folder("mr", 3, 22, "none", tmp_path / "mr", size=32)
    server = make_server(peers=PEERS, storage={"segment_bytes_max": 1 << 20})
    result = dcmtk("storescu", "-aet", "SCU", "-aec", "APPLIANCE", "127.0.0.1", str(server.port),
                   *map(str, ct + mr))
    assert result.returncode == 0, result.stderr
    ct_study, mr_study = _uid(ct[0], "StudyInstanceUID"), _uid(mr[0], "StudyInstanceUID")
    ct_series, one = _uid(ct[0], "SeriesInstanceUID"), _uid(ct[0], "SOPInstanceUID")

    # No terminal and no --yes: refused, one line, nothing deleted.
    refused = _delete(server, one)
    assert refused.returncode == EXIT_USAGE and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "--yes" in refused.stderr and server.cli("show", one).returncode == 0
    missing = _delete(server, "1.2.3.4.5.6.7", "--yes")
    assert missing.returncode == EXIT_NOT_FOUND and missing.stderr.count("\n") == 1

    done = server.cli_json("delete", one, "--yes", "--reason", "sent to the wrong patient")
    assert (done["level"], done["instances"], done["study_uid"]) == ("instance", 1, ct_study)
    assert done["copies"] == {"vol0": 1} and done["user"] == getpass.getuser()
    assert server.cli("show", one, check=False).returncode == EXIT_NOT_FOUND
    assert server.cli_json("show", ct_study)["NumberOfInstances"] == len(ct) - 1

    series = server.cli_json("delete", ct_series, "--yes")
    assert series["level"] == "series" and series["instances"] == len(ct) - 1
    study = server.cli_json("delete", mr_study, "--yes")
    assert (study["level"], study["instances"]) == ("study", len(mr))
    found = _find_studies(server)
    assert ct_study not in found and mr_study not in found
    out = tmp_path / "got"
    out.mkdir()
    got = dcmtk("getscu", "-S", "-aet", "SCU", "-aec", "APPLIANCE", "-od", str(out), "-k",
                "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={mr_study}", "127.0.0.1", str(server.port))
    assert list(out.iterdir()) == [], got.stderr
    exported = server.cli("export", mr_study, str(tmp_path / "export"), check=False)
    assert exported.returncode == EXIT_NOT_FOUND and exported.stderr.count("\n") == 1

    # The audit trail: who, when, what, why.
    lines = [x for x in audit_lines(server.config_path, "--event", "delete") if x.get("why") == "appliance delete"]
    assert [(x["level"], x["uid"]) for x in lines] == [("instance", one), ("series", ct_series), ("study", mr_study)]
    assert all(x["user"] == getpass.getuser() and x["action"] == "D" and x["time"] for x in lines)
    assert lines[0]["reason"] == "sent to the wrong patient" and lines[0]["study_uid"] == ct_study

    # Before compaction the records are still in the segments: a rebuild skips them (tombstones), the delete sticks.
    server.cli("index", "rebuild", "--into", str(tmp_path / "rebuilt"))
    rebuilt = StudyIndex(tmp_path / "rebuilt", readonly=True)
    try:
        assert all(rebuilt.lookup(uid) is None for uid in (one, ct_series, ct_study, mr_study))
        assert rebuilt.counts()["instances"] == 0 and len(rebuilt.tombstones()) == len(ct) + len(mr)
    finally:
        rebuilt.close()

    # The server still takes the same study again (a re-send after a wrong delete), then compaction reclaims the
    # dead bytes once the segments are sealed (at the restart: the active segment is never rewritten).
    server.stop()
    server.start()
    before = _segment_bytes(server)
    assert before > 0
    compacted = server.cli_json("compact")
    assert compacted["segments_compacted"] >= 1 and compacted["bytes_reclaimed"] > 0
    assert _segment_bytes(server) < before
    assert server.cli_json("verify")["ok"]
    result = dcmtk("storescu", "-aet", "SCU", "-aec", "APPLIANCE", "127.0.0.1", str(server.port), *map(str, mr))
    assert result.returncode == 0, result.stderr
    assert mr_study in _find_studies(server)
    # Sent again after its delete, the study is received later than its tombstones: a rebuild keeps it.
    server.stop()
    server.cli("index", "rebuild")
    assert server.cli_json("show", mr_study)["NumberOfInstances"] == len(mr)
    assert server.cli("show", ct_study, check=False).returncode == EXIT_NOT_FOUND


@pytest.fixture
def stored(make_server: MakeServer, tmp_path: Path) -> tuple[ServerHandle, list[Path]]:
    """A stopped appliance holding one CT study (the CliRunner opens its index directly)."""
    ct = write_folder("ct", 2, 23, "none", tmp_path / "ct", size=32)
    server = make_server(peers=PEERS)
    result = dcmtk("storescu", "-aet", "SCU", "-aec", "APPLIANCE", "127.0.0.1", str(server.port), *map(str, ct))
    assert result.returncode == 0, result.stderr
    server.stop()
    return server, ct


def test_confirmation_at_a_terminal(stored: tuple[ServerHandle, list[Path]], monkeypatch: pytest.MonkeyPatch) -> None:
    server, ct = stored
    monkeypatch.setattr(cli_delete, "interactive", lambda: True)
    uid = _uid(ct[0], "SOPInstanceUID")
    runner = CliRunner()
    no = runner.invoke(app, ["delete", uid, "-c", str(server.config_path)], input="n\n")
    assert no.exit_code == EXIT_FAILURE and "will delete instance" in no.output and "1 instance(s)" in no.output
    assert server.cli("show", uid).returncode == 0
    yes = runner.invoke(app, ["delete", uid, "-c", str(server.config_path)], input="y\n")
    assert yes.exit_code == 0, yes.output
    assert server.cli("show", uid, check=False).returncode == EXIT_NOT_FOUND


def test_legal_hold_blocks_delete(stored: tuple[ServerHandle, list[Path]]) -> None:
    server, ct = stored
    study, series = _uid(ct[0], "StudyInstanceUID"), _uid(ct[0], "SeriesInstanceUID")
    config = ["-c", str(server.config_path)]
    runner = CliRunner()
    assert runner.invoke(app, ["hold", study, "--reason", "litigation 42", *config]).exit_code == 0
    again = runner.invoke(app, ["hold", study, *config])
    assert again.exit_code == EXIT_FAILURE and "already on hold" in again.output
    not_a_study = runner.invoke(app, ["hold", series, *config])
    assert not_a_study.exit_code == EXIT_FAILURE and "a hold names a study" in not_a_study.output
    listed = server.cli_json("hold", "--list")
    assert [(h["study_uid"], h["by"], h["reason"]) for h in listed] == [(study, getpass.getuser(), "litigation 42")]
    server.cli("index", "rebuild")  # holds are in no segment: the rebuilt index takes them from the live one
    assert server.cli_json("hold", "--list") == listed
    for uid in (study, series, _uid(ct[0], "SOPInstanceUID")):
        refused = _delete(server, uid, "--yes")
        assert refused.returncode == EXIT_FAILURE and "legal hold" in refused.stderr
        assert refused.stderr.count("\n") == 1
    assert server.cli("show", study).returncode == 0
    released = runner.invoke(app, ["hold", "--release", study, *config])
    assert released.exit_code == 0
    assert runner.invoke(app, ["hold", "--release", study, *config]).exit_code == EXIT_NOT_FOUND
    assert server.cli_json("hold", "--list") == []
    assert _delete(server, study, "--yes").returncode == 0
    holds = audit_lines(server.config_path, "--event", "hold")
    assert [x.get("released", False) for x in holds] == [False, True] and holds[0]["reason"] == "litigation 42"


RETENTION = '\n[[policies]]\nname = "expire-10y"\nto = "delete"\nreceived_days_min = 3650\nmodalities = ["CT", "MR"]\n'


def retention_server(make_server: MakeServer, files: list[Path], **options: Any) -> ServerHandle:
    """A server with the RETENTION policy, holding ``files`` sent by DCMTK storescu."""
    server = make_server(start=False, peers=PEERS, **options)
    with open(server.config_path, "a") as fh:
        fh.write(RETENTION)
    server.start()
    result = dcmtk("storescu", "-aet", "SCU", "-aec", "APPLIANCE", "127.0.0.1", str(server.port), *map(str, files))
    assert result.returncode == 0, result.stderr
    return server


def test_retention_deletes_expired_studies_but_not_held_ones(make_server: MakeServer, tmp_path: Path) -> None:
    ct = write_folder("ct", 3, 24, "none", tmp_path / "ct", size=32)
    mr = write_folder("mr", 2, 25, "none", tmp_path / "mr", size=32)
    server = retention_server(make_server, ct + mr)
    ct_study, mr_study = _uid(ct[0], "StudyInstanceUID"), _uid(mr[0], "StudyInstanceUID")
    server.cli("hold", mr_study, "--reason", "litigation")

    def tier(*args: str, days_later: int) -> dict[str, object]:
        env = {**os.environ, "APPLIANCE_TIER_NOW": str(time.time_ns() + days_later * 86_400 * 10**9)}
        done = subprocess.run([*APPLIANCE, "tier", *args, "--json", "-c", str(server.config_path)],
                              capture_output=True, text=True, cwd=server.root, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))

    assert tier("run", "--dry-run", days_later=30)["moves"] == []  # nothing has expired yet
    plan = tier("run", "--dry-run", days_later=3651)
    assert [(m["study"], m["to"], m["policy"]) for m in plan["moves"]] == [  # type: ignore[union-attr]
        (ct_study, "delete", "expire-10y")]
    assert server.cli("show", ct_study).returncode == 0  # a dry run deletes nothing
    done = tier("run", days_later=3651)
    assert done["deleted"] == 1 and done["failed"] == 0
    assert server.cli("show", ct_study, check=False).returncode == 3
    found = _find_studies(server)
    assert ct_study not in found and mr_study in found
    [line] = [x for x in audit_lines(server.config_path, "--event", "delete") if x.get("why") == "retention"]
    assert line["study_uid"] == ct_study and line["policy"] == "expire-10y" and line["instances"] == len(ct)
    # Released, the held study goes at the next run.
    server.cli("hold", "--release", mr_study)
    assert tier("run", days_later=3651)["deleted"] == 1
    assert mr_study not in _find_studies(server)


def test_delete_of_studies_on_a_nearline_tier(tmp_path: Path) -> None:
    """Copies on a tier: the index forgets them at once, verify reports no error, the next tier run removes the
    archive the delete emptied; an archive still holding a live instance keeps its dead members."""
    from tests.tier_rig import nearline_site

    config, _data = nearline_site(tmp_path)
    base = [*APPLIANCE, "-c", str(config)]

    def cli(*args: str) -> dict[str, object]:
        done = subprocess.run([*base[:3], *args, *base[3:], "--json"], capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))

    assert cli("tier", "run")["moved"] == 2  # 1.1 (3 instances) and 1.2 (2) go to "nl"
    archives = sorted((tmp_path / "nl0").rglob("*.tar"))
    assert len(archives) == 2
    study = cli("delete", "1.1", "--yes")
    assert study["copies"] == {"nl": 3} and study["instances"] == 3
    one = cli("delete", "1.2.1.0", "--yes")  # one instance of 1.2: its archive still holds the other
    assert one["copies"] == {"nl": 1}
    assert cli("verify")["ok"]
    assert cli("tier", "run")["moved"] == 0
    left = sorted((tmp_path / "nl0").rglob("*.tar"))
    assert len(left) == 1 and left[0] in archives
    assert cli("verify")["ok"]
    exported = subprocess.run([*base[:3], "export", "1.2", str(tmp_path / "out"), *base[3:]], capture_output=True,
                              text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr
    assert len(list((tmp_path / "out").iterdir())) == 1


NEARLINE = """
[[tiers]]
name = "nl"
kind = "nearline"
volumes = [{{name = "nl0", path = "{root}/nl0"}}]

[[policies]]
name = "to-nearline"
from = "online"
to = "nl"
received_days_min = 1
"""


def test_delete_beside_ingest_and_a_running_mover(make_server: MakeServer, tmp_path: Path) -> None:
    """The race the name says: `appliance delete STUDY` while a real `appliance tier run` is migrating that very
    study to a nearline tier (slowed down by --rate so that the two overlap) and storescu is sending another study
    to the running server. The delete is refused (exit 69, one line: tiering.lock) and changes nothing; the move
    completes whole, the ingest loses nothing; afterwards the delete goes through and finds the copies on the
    tier, and verify finds no error."""
    from appliance.config import load_config
    from appliance.errors import EXIT_UNAVAILABLE
    from tiering.run import TIERING_LOCK
    from tiering.tiers import init_tier

    old = write_folder("mr", 6, 26, "none", tmp_path / "old", size=64)
    new = write_folder("ct", 40, 27, "none", tmp_path / "new", size=32)
    server = make_server(start=False, peers=PEERS)
    with open(server.config_path, "a") as fh:
        fh.write(NEARLINE.format(root=server.root))
    cfg = load_config(server.config_path)
    for tier in cfg.tiers:
        init_tier(tier)
    server.start()
    result = dcmtk("storescu", "-aet", "SCU", "-aec", "APPLIANCE", "127.0.0.1", str(server.port), *map(str, old))
    assert result.returncode == 0, result.stderr
    old_study, new_study = _uid(old[0], "StudyInstanceUID"), _uid(new[0], "StudyInstanceUID")
    old_bytes = server.cli_json("show", old_study)["NumberOfInstances"], sum(p.stat().st_size for p in old)

    # The mover: 2 days later for the planner, the study copied at ~10 kB/s (several seconds for these bytes).
    env = {**os.environ, "APPLIANCE_TIER_NOW": str(time.time_ns() + 2 * 86_400 * 10**9)}
    mover = subprocess.Popen([*APPLIANCE, "tier", "run", "--json", "--rate", "0.01", "-c", str(server.config_path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=server.root, env=env)
    lock = cfg.storage.index_path / TIERING_LOCK
    deadline = time.monotonic() + 60
    while not (lock.exists() and f"pid {mover.pid}," in lock.read_text()):  # the holder writes its pid
        assert mover.poll() is None and time.monotonic() < deadline, mover.communicate()
        time.sleep(0.05)
    sender = subprocess.Popen(["storescu", "-aet", "SCU", "-aec", "APPLIANCE", "127.0.0.1", str(server.port),
                               *map(str, new)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        busy = _delete(server, old_study, "--yes")
        overlapped = mover.poll() is None  # the mover was still moving when the delete came back
    finally:
        _out, err = sender.communicate(timeout=120)
        moved_out, moved_err = mover.communicate(timeout=300)
    assert overlapped, "the tier run ended before the delete: no race exercised (slow it down further)"
    assert busy.returncode == EXIT_UNAVAILABLE and "another mover" in busy.stderr, busy.stderr
    assert busy.stderr.count("\n") == 1 and "Traceback" not in busy.stderr
    assert sender.returncode == 0, err
    assert mover.returncode == 0, moved_err
    moved = json.loads(moved_out)
    assert [(r["study"], r["outcome"], r["to"]) for r in moved["results"]] == [(old_study, "moved", "nl")]
    assert (server.cli_json("show", old_study)["NumberOfInstances"], sum(p.stat().st_size for p in old)) == old_bytes
    assert server.cli_json("show", new_study)["NumberOfInstances"] == len(new)
    deleted = server.cli_json("delete", old_study, "--yes")
    assert deleted["copies"] == {"nl": len(old)} and deleted["instances"] == len(old)
    assert server.cli("show", old_study, check=False).returncode == EXIT_NOT_FOUND
    assert server.cli_json("show", new_study)["NumberOfInstances"] == len(new)
    assert server.cli_json("verify")["ok"]


def test_delete_of_a_study_on_tape(tmp_path: Path) -> None:
    """Tape is append-only: the index forgets the copies, the data stays on the cartridge (verify counts it as
    unnamed, not as an error), and nothing reads it again."""
    from tests.tier_rig import NEARLINE_THEN_TAPE, nearline_site

    config, _data = nearline_site(tmp_path, policies=NEARLINE_THEN_TAPE, tape=True)

    def cli(*args: str) -> dict[str, object]:
        done = subprocess.run([*APPLIANCE, *args, "-c", str(config), "--json"], capture_output=True, text=True,
                              timeout=300, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))

    assert cli("tier", "run")["moved"] == 2  # online -> nl
    assert cli("tier", "run")["moved"] == 2  # nl -> tape
    study = cli("delete", "1.1", "--yes", "--reason", "retention by hand")
    assert study["copies"] == {"tape": 3}
    assert cli("tier", "run")["failed"] == 0
    assert cli("verify")["ok"]
    gone = subprocess.run([*APPLIANCE, "show", "1.1", "-c", str(config)], capture_output=True, text=True, timeout=60)
    assert gone.returncode == EXIT_NOT_FOUND
    assert cli("show", "1.2")["NumberOfInstances"] == 2


def _break_audit(server: ServerHandle) -> None:
    """The audit file replaced by a folder: every write fails (as root too, which a chmod would not stop)."""
    trail = server.root / "var/audit/audit.jsonl"
    trail.unlink(missing_ok=True)
    trail.mkdir(parents=True)


def test_an_audit_failure_after_a_delete_is_reported_and_the_delete_stands(
        stored: tuple[ServerHandle, list[Path]]) -> None:
    server, ct = stored
    uid = _uid(ct[0], "SOPInstanceUID")
    _break_audit(server)
    done = _delete(server, uid, "--yes", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["audit_written"] is False
    (line,) = done.stderr.strip().splitlines()[-1:]
    assert line.startswith("warning: delete done, but its audit line was not written"), done.stderr
    assert "Traceback" not in done.stderr
    assert server.cli("show", uid, check=False).returncode == EXIT_NOT_FOUND


def test_retention_goes_on_when_the_audit_trail_cannot_be_written(make_server: MakeServer, tmp_path: Path) -> None:
    studies = [write_folder("ct", 2, 30 + i, "none", tmp_path / f"ct{i}", size=32) for i in range(2)]
    server = retention_server(make_server, [f for files in studies for f in files])
    server.stop()
    _break_audit(server)
    env = {**os.environ, "APPLIANCE_TIER_NOW": str(time.time_ns() + 3651 * 86_400 * 10**9)}
    done = subprocess.run([*APPLIANCE, "tier", "run", "--json", "-c", str(server.config_path)], capture_output=True,
                          text=True, cwd=server.root, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["deleted"], report["audit_lost"], report["failed"]) == (2, 2, 0), report  # both, not the first
    assert "Traceback" not in done.stderr
    assert "warning: 2 retention delete(s) done, but their audit lines were not written" in done.stderr
    for files in studies:
        assert server.cli("show", _uid(files[0], "StudyInstanceUID"), check=False).returncode == EXIT_NOT_FOUND


def test_a_confirmed_delete_is_refused_when_the_study_changed_since_the_preview(
        make_server: MakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The person saw "2 instance(s)"; while the prompt waited, a third instance of the study arrived. "y" must
    not delete 3: refused (exit 75, one line, asks to run again), nothing deleted."""
    ct = write_folder("ct", 3, 28, "none", tmp_path / "ct", size=32)
    server = make_server(peers=PEERS)
    study = _uid(ct[0], "StudyInstanceUID")
    sent = dcmtk("storescu", "-aet", "SCU", "-aec", "APPLIANCE", "127.0.0.1", str(server.port), *map(str, ct[:2]))
    assert sent.returncode == 0, sent.stderr
    monkeypatch.setattr(cli_delete, "interactive", lambda: True)

    def a_late_instance_then_yes(*_args: object, **_kw: object) -> bool:
        late = dcmtk("storescu", "-aet", "SCU", "-aec", "APPLIANCE", "127.0.0.1", str(server.port), str(ct[2]))
        assert late.returncode == 0, late.stderr
        return True

    monkeypatch.setattr(cli_delete.typer, "confirm", a_late_instance_then_yes)
    result = CliRunner().invoke(app, ["delete", study, "-c", str(server.config_path)])
    assert "will delete study" in result.stdout and "2 instance(s)" in result.stdout
    assert result.exit_code == EXIT_TEMPFAIL == 75, result.output
    assert result.stderr.count("\n") == 1 and "changed since the preview" in result.stderr
    assert "run the command again" in result.stderr
    assert server.cli_json("show", study)["NumberOfInstances"] == 3


def test_hold_list_prints_local_time_and_json_keeps_the_raw_values(stored: tuple[ServerHandle, list[Path]]) -> None:
    server, ct = stored
    study = _uid(ct[0], "StudyInstanceUID")
    server.cli("hold", study, "--reason", "case 7")
    env = {**os.environ, "TZ": "Asia/Kolkata"}  # +05:30 all year: a local time cannot pass for UTC
    listed = subprocess.run([*APPLIANCE, "hold", "--list", "-c", str(server.config_path)], capture_output=True,
                            text=True, env=env, timeout=60)
    (row,) = json.loads(subprocess.run([*APPLIANCE, "hold", "--list", "--json", "-c", str(server.config_path)],
                                       capture_output=True, text=True, env=env, timeout=60).stdout)
    local = datetime.fromtimestamp(row["since_ns"] / 1e9, ZoneInfo("Asia/Kolkata")).isoformat(timespec="seconds")
    assert listed.returncode == 0 and listed.stdout.strip() == f"{study}  since {local} by {row['by']}  case 7"
    assert local.endswith("+05:30") and row["since"].endswith("Z")


def test_retention_deletes_nothing_when_a_run_would_expire_more_than_the_limit(
        make_server: MakeServer, tmp_path: Path) -> None:
    """A clock set years ahead makes everything look expired: with tiering.retention_studies_max = 1 and two
    studies due, the run deletes neither, says why on stderr in one line and exits 1; raised, it deletes both."""
    studies = [write_folder("ct", 2, 40 + i, "none", tmp_path / f"ct{i}", size=32) for i in range(2)]
    server = retention_server(make_server, [f for files in studies for f in files],
                              tiering={"retention_studies_max": 1})
    uids = [_uid(files[0], "StudyInstanceUID") for files in studies]
    env = {**os.environ, "APPLIANCE_TIER_NOW": str(time.time_ns() + 3651 * 86_400 * 10**9)}

    def tier_run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*APPLIANCE, "tier", "run", *args, "-c", str(server.config_path)],
                              capture_output=True, text=True, cwd=server.root, env=env, timeout=300)

    dry = tier_run("--dry-run", "--json")
    assert json.loads(dry.stdout)["moves"] == [] and "retention_studies_max = 1" in dry.stdout
    refused = tier_run()  # as the timer runs it
    assert refused.returncode == EXIT_FAILURE, refused.stderr
    assert refused.stderr.count("\n") == 1 and "error: retention would delete 2 studies" in refused.stderr
    refused = tier_run("--json")
    assert refused.returncode == EXIT_FAILURE and refused.stderr == ""
    report = json.loads(refused.stdout)
    assert report["deleted"] == 0 and "retention_studies_max" in report["retention_refused"]
    assert all(server.cli("show", uid).returncode == 0 for uid in uids)
    text = server.config_path.read_text().replace("retention_studies_max = 1", "retention_studies_max = 2")
    server.config_path.write_text(text)
    done = tier_run("--json")
    assert done.returncode == 0 and json.loads(done.stdout)["deleted"] == 2, done.stderr
