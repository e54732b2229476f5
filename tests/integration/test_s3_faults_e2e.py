"""The S3 tier's faults as a site sees them, on a real appliance and a real SeaweedFS: the store hanging (SIGSTOP)
pauses the migration, which resumes once it is back; ingest goes on meanwhile; a retrieve of a study held only
in the store fails with a clear status after its timeouts; a bucket that refuses writes pauses the moves to it
and loses nothing."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.conftest import APPLIANCE, ServerHandle, dcmtk, wait_for
from tests.peers import ct_instances
from tests.seaweed import READER_KEY

DAY_NS = 86_400 * 10**9


def s3_site(make_server: Callable[..., ServerHandle], seaweed: Any, bucket: str, tmp_path: Path) -> ServerHandle:
    handle = make_server(start=False, peers={"scu": {"ae_title": "SCU", "port": 1, "allow_receive": False}})
    creds = seaweed.credentials_file(tmp_path / "s3.toml")
    # Short timeouts: the test waits them out. A site keeps the defaults (docs/tiering.md "S3 tier").
    tier = seaweed.tier("cloud", bucket, "node-a", creds, connect_timeout_s=1.0, read_timeout_s=2.0, retries_max=2,
                        unreachable_retry_s=3.0)
    lines = [f"[tiering]\naudit_log = \"{handle.root}/audit.jsonl\"\nrate_bytes_per_s = 1073741824\n",
             "[[tiers]]", *(f"{k} = {json.dumps(v)}" for k, v in tier.items()),
             '\n[[policies]]\nname = "to-cloud"\nfrom = "online"\nto = "cloud"\nreceived_days_min = 30\n']
    with open(handle.config_path, "a") as fh:
        fh.write("\n".join(lines))
    handle.cli("tier", "init", "cloud")
    return handle.start()


def tier_run(server: ServerHandle, days_later: int = 40) -> tuple[int, dict[str, Any], str]:
    env = {**os.environ, "APPLIANCE_TIER_NOW": str(time.time_ns() + days_later * DAY_NS)}
    result = subprocess.run([*APPLIANCE, "tier", "run", "--json", "-c", str(server.config_path)], capture_output=True,
                            text=True, env=env, cwd=server.root, timeout=300)
    return result.returncode, json.loads(result.stdout) if result.stdout.strip() else {}, result.stderr


def store(server: ServerHandle, files: list[Path]) -> None:
    result = dcmtk("storescu", "-aet", "SCU", "-aec", "APPLIANCE", "127.0.0.1", str(server.port), *map(str, files))
    assert result.returncode == 0, result.stderr


def study_of(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def export(server: ServerHandle, study: str, dest: Path) -> dict[str, bytes]:
    server.cli("export", study, str(dest))
    return {p.name: p.read_bytes() for p in dest.iterdir()}


def availability(server: ServerHandle, study: str) -> set[str]:
    rows = server.cli_json("ls", "instances", "--study", study)
    return {str(r.get("InstanceAvailability", "")) for r in rows}


def get_study(server: ServerHandle, study: str, out: Path) -> subprocess.CompletedProcess[str]:
    out.mkdir(parents=True, exist_ok=True)
    return dcmtk("getscu", "-d", "-aet", "SCU", "-aec", "APPLIANCE", "-S", "-od", str(out), "-k",
                 "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(server.port))


@pytest.fixture
def hung_store(seaweed: Any) -> Iterator[Callable[[], None]]:
    """Call it to SIGSTOP the store (it accepts connections and never answers); it is continued at the end
    whatever happens (the cluster is shared by the session)."""
    paused = []

    def pause() -> None:
        seaweed.pause()
        paused.append(True)

    try:
        yield pause
    finally:
        if paused:
            seaweed.resume()


def test_a_hung_store_pauses_migration_ingest_goes_on_and_retrieves_fail_clearly(
        make_server: Callable[..., ServerHandle], seaweed: Any, s3_bucket: str, hung_store: Callable[[], None],
        tmp_path: Path) -> None:
    server = s3_site(make_server, seaweed, s3_bucket, tmp_path)
    moved_files = ct_instances(tmp_path / "a", 2)
    store(server, moved_files)
    study_a = study_of(moved_files)
    before_a = export(server, study_a, tmp_path / "a-before")
    code, report, err = tier_run(server)
    assert code == 0 and report["moved"] == 1, err
    assert availability(server, study_a) == {"NEARLINE"}
    assert [k for k in seaweed.keys(s3_bucket, "node-a/") if "/archives/" in f"/{k}"], "no archive in the bucket"

    waiting_files = ct_instances(tmp_path / "b", 2)
    store(server, waiting_files)
    study_b = study_of(waiting_files)
    before_b = export(server, study_b, tmp_path / "b-before")

    hung_store()
    # Ingest does not touch the object store: a burst is stored and acknowledged as usual.
    burst = ct_instances(tmp_path / "c", 20)
    t0 = time.monotonic()
    store(server, burst)
    assert time.monotonic() - t0 < 30
    assert availability(server, study_of(burst)) == {"ONLINE"}

    # The migration pauses: nothing moved, nothing failed, exit 69, the study still online and whole.
    code, report, err = tier_run(server)
    assert code == 69, (code, report, err)
    assert report["moved"] == 0 and report["failed"] == 0 and "cloud" in report["paused_tiers"], report
    assert availability(server, study_b) == {"ONLINE"}
    assert export(server, study_b, tmp_path / "b-during") == before_b

    # A study held only by the store: the C-GET ends with a failure status and the store named in the Error Comment,
    # after its timeouts, not after one timeout per instance.
    t0 = time.monotonic()
    result = get_study(server, study_a, tmp_path / "got-during")
    elapsed = time.monotonic() - t0
    assert "object store cloud" in result.stderr, result.stderr[-3000:]
    assert list((tmp_path / "got-during").iterdir()) == []
    assert elapsed < 45, elapsed

    seaweed.resume()
    # Back: the next run finishes the move, and both studies read back byte for byte.
    code, report, err = tier_run(server)
    assert code == 0 and report["moved"] == 2 and report["failed"] == 0, (report, err)  # study b and the burst's
    assert availability(server, study_b) == {"NEARLINE"}
    assert export(server, study_b, tmp_path / "b-after") == before_b
    # The server's readers wait out their unreachable_retry_s, then read the store again.
    wait_for(lambda: get_study(server, study_a, tmp_path / "got-after").returncode == 0
             and len(list((tmp_path / "got-after").iterdir())) == 2, 30, interval=0.5, what="C-GET after the store is back")
    assert export(server, study_a, tmp_path / "a-after") == before_a
    assert seaweed.uploads(s3_bucket, "node-a/") == []


def test_a_bucket_that_refuses_writes_pauses_the_moves_and_loses_nothing(
        make_server: Callable[..., ServerHandle], seaweed: Any, s3_bucket: str, tmp_path: Path) -> None:
    server = s3_site(make_server, seaweed, s3_bucket, tmp_path)
    files = ct_instances(tmp_path / "a", 2)
    store(server, files)
    study = study_of(files)
    before = export(server, study, tmp_path / "before")
    # The site's credentials lose the right to write (a policy change on the store): read and list only.
    seaweed.credentials_file(tmp_path / "s3.toml", READER_KEY)
    code, report, err = tier_run(server)
    assert code == 69, (code, report, err)
    assert report["moved"] == 0 and "cloud" in report["paused_tiers"], report
    assert "refuse" in report["paused_tiers"]["cloud"].lower() or "denied" in report["paused_tiers"]["cloud"].lower()
    assert availability(server, study) == {"ONLINE"}
    assert export(server, study, tmp_path / "after") == before
    assert [k for k in seaweed.keys(s3_bucket, "node-a/") if "archives/" in k] == []
