"""The audit trail's writer (appliance/audit.py), the `appliance audit` filters (appliance/cli_audit.py) and the
log formats (appliance/logs.py), without a server: docs/operations.md "Audit trail" and "Logs"."""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import socket
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from typer.testing import CliRunner

from appliance import audit, logs
from appliance.cli import app
from appliance.cli_audit import parse_when, read_trail, select
from appliance.config_ops import AuditConfig


def dropped(reason: str) -> float:
    audit._metrics()
    return REGISTRY.get_sample_value("appliance_audit_dropped_total", {"reason": reason}) or 0.0


def events_total(event: str) -> float:
    audit._metrics()
    return REGISTRY.get_sample_value("appliance_audit_events_total", {"event": event}) or 0.0


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_line_format_names_the_ps315_event_and_its_participants(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    sink = audit.open_sink(AuditConfig(path=path), "ARCHIVE", threaded=False)
    before = events_total("move")
    sink.emit("move", audit.SUCCESS, peer_ae="CT1", peer_address="10.1.2.3", tls=False, study_uid="1.2.3",
              instances=300, bytes=123456, destination_ae="WS1", level=None)
    sink.close()
    [line] = lines_of(path)
    assert list(line)[:13] == ["time", "event", "event_id", "event_name", "action", "outcome", "node", "peer_ae",
                               "peer_address", "tls", "study_uid", "instances", "bytes"]
    assert line["event"] == "move" and line["event_id"] == "DCM 110104" and line["action"] == "R"
    assert line["event_name"] == "DICOM Instances Transferred" and line["outcome"] == 0 and line["node"] == "ARCHIVE"
    assert line["destination_ae"] == "WS1" and "level" not in line  # None details are left out
    when = datetime.strptime(line["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs(datetime.now(UTC) - when) < timedelta(seconds=5) and len(line["time"]) == 24  # ms, UTC
    assert events_total("move") == before + 1


def test_file_is_0600_and_its_folder_0700_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = tmp_path / "var" / "audit" / "audit.jsonl"
        destination = audit.FileDestination(path, 1 << 20, 3)
        destination.write(b"{}\n")
        destination.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def _append(path: Path, who: int, count: int, bytes_max: int, files_max: int) -> None:
    destination = audit.FileDestination(path, bytes_max, files_max)
    for i in range(count):
        destination.write(audit.encode({"who": who, "i": i, "pad": "x" * 80}))
    destination.close()


def test_two_processes_append_and_rotate_the_same_file_without_losing_or_mixing_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    count, bytes_max = 2000, 16 * 1024  # ~110 bytes a line: ~14 rotations each
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append, args=(path, who, count, bytes_max, 100)) for who in (1, 2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    files = [path, *sorted(tmp_path.glob("audit.jsonl.*"))]
    assert len(files) > 10  # it did rotate, many times
    seen: dict[int, list[int]] = {1: [], 2: []}
    for file in files:
        assert file.stat().st_size <= 2 * bytes_max  # a late writer may finish a line in the file just rotated
        for line in lines_of(file):  # every line parses: no two writes interleaved
            seen[line["who"]].append(line["i"])
    assert sorted(seen[1]) == list(range(count)) and sorted(seen[2]) == list(range(count))


def test_rotation_keeps_files_max_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _append(path, 1, 1000, 4096, 3)
    assert sorted(p.name for p in tmp_path.glob("audit.jsonl*") if not p.name.endswith(".lock")) == [
        "audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    last = lines_of(path)[-1]
    assert last["i"] == 999  # the newest line is in the current file


class Stuck:
    """A destination whose writes wait until released: the writer thread is stuck, the queue fills."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.entered.set()
        self.release.wait(30)
        self.written.append(data)

    def close(self) -> None:
        pass


def test_a_full_queue_drops_lines_counts_them_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    destination = Stuck()
    sink = audit.WriterSink(destination, "ARCHIVE", queue_max=100)  # type: ignore[arg-type]
    before = dropped("queue_full")
    sink.emit("query")
    assert destination.entered.wait(10)  # the thread holds the first line
    with caplog.at_level(logging.WARNING, logger="appliance.audit"):
        for _ in range(150):
            sink.emit("query")  # never blocks: the test would hang here if it did
    assert dropped("queue_full") == before + 50
    assert len([r for r in caplog.records if "lost" in r.getMessage()]) == 1  # rate-limited
    destination.release.set()
    sink.close()
    assert len(destination.written) == 101


def test_write_errors_are_counted_never_raised(tmp_path: Path) -> None:
    class Broken:
        def write(self, data: bytes) -> None:
            raise OSError(28, "No space left on device")

        def close(self) -> None:
            pass

    sink = audit.WriterSink(Broken(), "ARCHIVE", queue_max=100, threaded=False)  # type: ignore[arg-type]
    before = dropped("write_error")
    sink.emit("store")
    assert dropped("write_error") == before + 1


def test_journald_destination_speaks_the_native_protocol(tmp_path: Path) -> None:
    address = str(tmp_path / "journal.socket")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(address)
    try:
        sink = audit.WriterSink(audit.JournalDestination(address), "ARCHIVE", 100, threaded=False)
        sink.emit("query", peer_ae="CT1", level="STUDY", matches=3)
        sink.close()
        server.settimeout(5)
        datagram = server.recv(65536).decode()
    finally:
        server.close()
    fields = dict(item.split("=", 1) for item in datagram.rstrip("\n").split("\n"))
    assert fields["SYSLOG_IDENTIFIER"] == "appliance-audit" and fields["PRIORITY"] == "6"
    assert json.loads(fields["MESSAGE"])["matches"] == 3


def test_off_writes_nothing(tmp_path: Path) -> None:
    sink = audit.open_sink(AuditConfig(destination="off", path=tmp_path / "a.jsonl"), "ARCHIVE")
    sink.emit("store")
    sink.close()
    assert not (tmp_path / "a.jsonl").exists()


def test_session_writes_one_line_per_study_then_the_association(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "audit.jsonl"
    sink = audit.open_sink(AuditConfig(path=path), "ARCHIVE", threaded=False)
    monkeypatch.setattr(audit, "STUDIES_PER_ASSOCIATION_MAX", 2)
    session = audit.Session(sink, "CT1", "10.1.2.3", True)
    for _ in range(300):
        session.instance_stored("1.1", 1000)
    session.instance_failed("1.1", 0xA700)
    for _ in range(5):
        session.instance_stored("1.2", 10, replaced=True)
    session.instance_stored("1.3", 7)  # beyond the 2 studies counted one by one: the "other studies" line
    session.instance_failed("1.4", 0xC000)
    session.end("released")
    session.end("released")  # once only
    sink.close()
    lines = lines_of(path)
    assert [(x["event"], x["study_uid"], x["instances"], x.get("failed"), x["outcome"]) for x in lines] == [
        ("store", "1.1", 300, 1, audit.MINOR_FAILURE), ("store", "1.2", 5, None, audit.SUCCESS),
        ("store", None, 1, 1, audit.MINOR_FAILURE), ("association", None, 306, 2, audit.SUCCESS)]
    assert lines[2]["other_studies"] is True and lines[1]["replaced"] == 5 and "replaced" not in lines[0]
    assoc = lines[-1]
    assert assoc["result"] == "released" and assoc["bytes"] == 300_000 + 50 + 7 and assoc["tls"] is True
    assert assoc["statuses"] == {"0xA700": 1, "0xC000": 1} and assoc["peer_address"] == "10.1.2.3"
    assert all(x["peer_ae"] == "CT1" and x["event_id"] in ("DCM 110104", "") for x in lines)


def test_a_refused_right_is_one_security_alert_per_association(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = audit.open_sink(AuditConfig(path=path), "ARCHIVE", threaded=False)
    session = audit.Session(sink, "CT1", "10.1.2.3", False)
    for _ in range(50):
        session.refused("store", 0x0124)
    session.end("aborted")
    sink.close()
    alert, assoc = lines_of(path)
    assert alert["event"] == "security_alert" and alert["event_id"] == "DCM 110113"
    assert alert["alert_type"] == audit.RESTRICTED_FUNCTION and alert["right"] == "store"
    assert assoc["refused"] == {"store": 50} and assoc["result"] == "aborted" and assoc["outcome"] == 4


# ---- `appliance audit` -----------------------------------------------------------------------------------------


def trail(tmp_path: Path) -> Path:
    """A config whose audit file (rotated once) holds known lines, oldest in the rotated file."""
    config = tmp_path / "appliance.toml"
    config.write_text('[audit]\npath = "audit/audit.jsonl"\n')
    folder = tmp_path / "audit"
    folder.mkdir()
    now = datetime.now(UTC)

    def line(hours_ago: float, event: str, outcome: int = 0, **fields: Any) -> str:
        rec = audit.record(event, outcome, "ARCHIVE", **fields)
        rec["time"] = (now - timedelta(hours=hours_ago)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        return json.dumps(rec) + "\n"

    (folder / "audit.jsonl.1").write_text(
        line(72, "store", peer_ae="CT1", study_uid="1.1", instances=3)
        + line(50, "association", peer_ae="CT1", instances=3))
    (folder / "audit.jsonl").write_text(
        line(3, "query", peer_ae="WS1", level="STUDY", matches=2)
        + "{not json: a line a crash cut short\n"
        + line(1, "move", peer_ae="WS1", study_uid="1.1", instances=3, destination_ae="WS2")
        + line(0.5, "security_alert", 4, peer_ae="EVIL", alert_type=audit.NODE_AUTHENTICATION))
    return config


def run_cli(config: Path, *args: str) -> list[dict[str, Any]]:
    result = CliRunner().invoke(app, ["audit", "-c", str(config), "--json", *args])
    assert result.exit_code == 0, result.output
    return [json.loads(x) for x in result.output.splitlines()]


def test_cli_reads_rotated_then_current_in_time_order(tmp_path: Path) -> None:
    config = trail(tmp_path)
    assert [x["event"] for x in run_cli(config)] == ["store", "association", "query", "move", "security_alert"]


@pytest.mark.parametrize(("args", "events"), [
    (["--since", "2d"], ["query", "move", "security_alert"]),
    (["--until", "2h"], ["store", "association", "query"]),
    (["--since", "4h", "--until", "45m"], ["query", "move"]),
    (["--event", "store", "--event", "move"], ["store", "move"]),
    (["--peer", "WS2"], ["move"]),  # the destination counts as named
    (["--peer", "CT1"], ["store", "association"]),
    (["--study", "1.1"], ["store", "move"]),
    (["--outcome", "failure"], ["security_alert"]),
    (["--outcome", "success", "--limit", "2"], ["query", "move"]),  # the last two
])
def test_cli_filters(tmp_path: Path, args: list[str], events: list[str]) -> None:
    assert [x["event"] for x in run_cli(trail(tmp_path), *args)] == events


def test_cli_since_an_iso_date_and_human_output(tmp_path: Path) -> None:
    config = trail(tmp_path)
    day = (datetime.now() - timedelta(days=10)).strftime("%Y-%m-%d")
    assert len(run_cli(config, "--since", day)) == 5
    result = CliRunner().invoke(app, ["audit", "-c", str(config), "--event", "move"])
    assert result.exit_code == 0
    [text] = result.output.splitlines()
    assert "move" in text and "WS1 -> WS2" in text and "1.1" in text and "instances=3" in text and "ok" in text
    bad = CliRunner().invoke(app, ["audit", "-c", str(config), "--since", "yesterday"])
    assert bad.exit_code == 2


def test_cli_under_journald_says_where_to_look(tmp_path: Path) -> None:
    config = tmp_path / "appliance.toml"
    config.write_text('[audit]\ndestination = "journald"\n')
    result = CliRunner().invoke(app, ["audit", "-c", str(config)])
    assert result.exit_code == 3 and "journalctl -t appliance-audit" in result.output


def test_parse_when_and_reading_skips_old_files(tmp_path: Path) -> None:
    now = datetime(2026, 11, 26, 12, tzinfo=UTC)
    assert parse_when("2h", now) == now - timedelta(hours=2)
    assert parse_when("7d", now) == now - timedelta(days=7)
    assert parse_when("2026-11-26T08:00:00Z") == datetime(2026, 11, 26, 8, tzinfo=UTC)
    config = trail(tmp_path)
    rotated = tmp_path / "audit" / "audit.jsonl.1"
    old = (datetime.now(UTC) - timedelta(days=2)).timestamp()
    os.utime(rotated, (old, old))
    rotated.write_bytes(b"")  # (write first, then date it)
    os.utime(rotated, (old, old))
    since = datetime.now(UTC) - timedelta(days=1)
    assert [x["event"] for x in select(read_trail(tmp_path / "audit" / "audit.jsonl", since), since)] == [
        "query", "move", "security_alert"]
    assert config.exists()


# ---- logs ------------------------------------------------------------------------------------------------------


def record_of(level: int, message: str, **extra: Any) -> logging.LogRecord:
    rec = logging.LogRecord("appliance.net.association", level, __file__, 1, message, None, None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_text_under_journald_has_syslog_priorities_and_no_timestamp(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    with open(tmp_path / "stderr", "w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        formatter = logs.formatter("text", stream)
        assert formatter.format(record_of(logging.WARNING, "careful")).startswith("<4>WARNING [")
        assert formatter.format(record_of(logging.INFO, "fine")).startswith("<6>INFO")
        assert formatter.format(record_of(logging.ERROR, "a\nb")).split("\n")[1].startswith("<3>")
        as_json = logs.formatter("json", stream).format(record_of(logging.WARNING, "careful"))
        assert as_json.startswith("<4>{") and json.loads(as_json[3:])["level"] == "warning"
        # Inherited by a process writing elsewhere: timestamps again.
        other = io.StringIO()
        assert not logs.under_journald(other)
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    with open(tmp_path / "stderr", "w") as stream:
        line = logs.formatter("text", stream).format(record_of(logging.INFO, "fine"))
        assert line[:4].isdigit() and " INFO [" in line  # 2026-11-26 ... INFO [pid] ...


def test_json_log_lines(tmp_path: Path) -> None:
    formatter = logs.formatter("json", io.StringIO())
    line = json.loads(formatter.format(record_of(logging.INFO, "association from %s", peer_ae="CT1")))
    assert line["level"] == "info" and line["logger"] == "appliance.net.association" and line["pid"] == os.getpid()
    assert line["peer_ae"] == "CT1" and line["message"] == "association from %s" and line["time"].endswith("Z")
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        rec = record_of(logging.ERROR, "failed")
        rec.exc_info = sys.exc_info()
    out = formatter.format(rec)
    assert "\n" not in out and "ValueError: boom" in json.loads(out)["exception"]


def test_a_recall_writes_its_line(tmp_path: Path) -> None:
    from appliance.index.schema import ONLINE
    from tests.tiering_site import Site
    from tiering.recall import recall_queued

    site = Site.open(tmp_path)
    try:
        study, _data = site.ingest(3)
        site.to_tier(study, "lto")
        key = site.index.study_key(study)
        assert key is not None and site.index.request_recall(key, "cli")
        recall_queued(site.config, site.index, site.store)
        assert site.availability(study) == {ONLINE}
    finally:
        site.close()
    [line] = lines_of(site.config.audit.path)
    assert (line["event"], line["event_id"], line["action"], line["outcome"]) == ("recall", "DCM 110103", "U", 0)
    assert (line["study_uid"], line["instances"], line["from_tier"], line["to_tier"]) == (study, 3, "lto", "online")
    assert line["bytes"] > 0
