"""appliance/notify.py against a real AF_UNIX datagram socket standing in for systemd's notification socket."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import notify


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound datagram socket at a path, named by $NOTIFY_SOCKET as systemd does."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def _received(sock: socket.socket) -> list[str]:
    return sock.recv(65536).decode().split("\n")


def test_each_message_is_one_datagram_of_key_value_lines(listener: socket.socket) -> None:
    assert notify.ready("3 workers listening")
    assert _received(listener) == ["READY=1", "STATUS=3 workers listening"]
    assert notify.ready()
    assert _received(listener) == ["READY=1"]
    assert notify.stopping("draining 2 associations")
    assert _received(listener) == ["STOPPING=1", "STATUS=draining 2 associations"]
    assert notify.status("12 associations, 340 instances/s")
    assert _received(listener) == ["STATUS=12 associations, 340 instances/s"]
    assert notify.watchdog()
    assert _received(listener) == ["WATCHDOG=1"]


def test_reloading_carries_a_monotonic_timestamp(listener: socket.socket) -> None:
    import time

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notify.reloading()
    lines = _received(listener)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert lines[0] == "RELOADING=1"
    key, value = lines[1].split("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after


def test_an_abstract_socket_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd may name an abstract socket: "@name" means the name with a leading NUL byte."""
    name = f"appliance-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_a_huge_status_is_cut_to_the_bound(listener: socket.socket) -> None:
    assert notify.status("x" * 100_000)
    assert len(listener.recv(200_000)) == 4096


def test_outside_systemd_every_call_is_a_no_op(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not notify.ready() and not notify.watchdog()
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path")  # neither a path nor an abstract name: ignored
    assert not notify.ready()
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))  # systemd went away: advice, never a failure
    assert not notify.stopping()


@pytest.mark.parametrize(("usec", "pid", "expected"), [
    ("30000000", None, 15.0),  # WatchdogSec=30s: ping every 15 s, half the timeout as sd_watchdog_enabled(3) says
    ("30000000", "self", 15.0),
    ("30000000", "1", 0.0),  # meant for another process (e.g. the supervisor, read in a worker)
    ("0", None, 0.0),
    ("", None, 0.0),
    ("thirty", None, 0.0),
    (None, None, 0.0),  # no WatchdogSec
])
def test_watchdog_interval_from_the_environment(monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None,
                                                expected: float) -> None:
    for key, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, str(os.getpid()) if value == "self" else value)
    assert notify.watchdog_interval_s() == expected
