"""sd_notify messages as systemd would receive them (a datagram socket bound by the test as $NOTIFY_SOCKET), and the
/healthz and /readyz endpoints beside /metrics (issue 12)."""

from __future__ import annotations

import json
import signal
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from appliance.store.volumes import init_volume
from tests.conftest import ServerHandle, wait_for

MakeServer = Callable[..., ServerHandle]


class NotifySocket:
    """What systemd's side of sd_notify sees: each datagram, with the time it arrived and whether the DICOM port
    accepted a connection at that moment."""

    def __init__(self, path: Path, port_file: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.port_file = port_file
        self.messages: list[tuple[float, list[str], bool | None]] = []
        self.closed = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _port_accepts(self) -> bool | None:
        try:
            port = json.loads(self.port_file.read_text())["port"]
        except (OSError, ValueError):
            return None  # no port file yet
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except OSError:
            return False
        return True

    def _run(self) -> None:
        while not self.closed:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            lines = data.decode().splitlines()
            accepts = self._port_accepts() if "READY=1" in lines else None
            self.messages.append((time.monotonic(), lines, accepts))

    def count(self, line: str) -> int:
        return sum(1 for _t, lines, _a in self.messages if line in lines)

    def close(self) -> None:
        self.closed = True
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="nfy", dir="/tmp"))  # AF_UNIX paths are short (108 bytes)
    path = folder / "notify"
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    yield path
    path.unlink(missing_ok=True)
    folder.rmdir()


def test_sd_notify_ready_watchdog_reloading_stopping(make_server: MakeServer, notify_socket: Path) -> None:
    server = make_server(start=False)
    listener = NotifySocket(notify_socket, server.root / "port.json")
    try:
        starter = threading.Thread(target=server.start, daemon=True)
        starter.start()
        wait_for(lambda: listener.count("READY=1") >= 1, 60, interval=0.05, what="READY=1")
        starter.join(60)
        ready_at, lines, accepted = next(m for m in listener.messages if "READY=1" in m[1])
        # READY=1 only once the DICOM port takes connections (and the port file, metrics included, is written).
        assert accepted is True
        assert any(line.startswith("STATUS=serving: 1/1 worker(s)") for line in lines)
        # WATCHDOG=1 about every second (half of WATCHDOG_USEC), from the supervisor's loop.
        wait_for(lambda: listener.count("WATCHDOG=1") >= 3, 10, interval=0.05, what="three WATCHDOG=1")
        beats = [t for t, lines, _a in listener.messages if "WATCHDOG=1" in lines]
        gaps = sorted(b - a for a, b in zip(beats[1:], beats[2:], strict=False))
        # About every second (not flooding), and never as late as WATCHDOG_USEC (2 s), when systemd would kill us.
        assert 0.8 < gaps[len(gaps) // 2] < 1.5 and gaps[-1] < 2.0, gaps

        assert server.proc is not None
        before = len(listener.messages)
        server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: any("READY=1" in m[1] for m in listener.messages[before:]), 20, interval=0.05,
                 what="READY=1 after the reload")
        after = [lines for _t, lines, _a in listener.messages[before:] if "WATCHDOG=1" not in lines]
        assert "RELOADING=1" in after[0] and any(line.startswith("MONOTONIC_USEC=") for line in after[0])
        assert "READY=1" in after[1]

        before = len(listener.messages)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(40) == 0
        stops = [lines for _t, lines, _a in listener.messages[before:] if "STOPPING=1" in lines]
        assert stops and stops[0][0] == "STOPPING=1"
    finally:
        listener.close()
    # The STATUS lines hold counts, never a UID or an AE title of a peer.
    statuses = [ln for _t, lines, _a in listener.messages for ln in lines if ln.startswith("STATUS=")]
    assert statuses and not any("1.2." in s for s in statuses)


def http(server: ServerHandle, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_healthz_readyz_and_metrics_side_by_side(make_server: MakeServer) -> None:
    server = make_server()
    assert http(server, "/healthz") == (200, "ok\n")
    code, body = http(server, "/readyz")
    assert code == 200 and json.loads(body) == {"ready": True}
    code, body = http(server, "/metrics")
    assert code == 200 and "appliance_volume_size_bytes" in body
    assert http(server, "/nope")[0] == 404


def test_readyz_503_when_the_only_volume_is_above_its_watermark(make_server: MakeServer) -> None:
    server = make_server(start=False, volumes=[{"name": "vol0", "path": "var/volumes/vol0", "high_watermark": 0.0001}])
    init_volume(server.volume, "vol0")  # a configured volume is never created by serve (issue 13)
    server.start()
    code, body = http(server, "/readyz")
    assert code == 503
    answer: dict[str, Any] = json.loads(body)
    assert answer["ready"] is False
    assert any(r.startswith("volume vol0:") and "high watermark" in r for r in answer["reasons"]), answer
    assert http(server, "/healthz")[0] == 200  # alive, just not taking work


def test_readyz_503_as_soon_as_the_drain_starts(make_server: MakeServer) -> None:
    server = make_server(server={"drain_timeout_s": 30.0})
    ae = AE(ae_title="HOLDOPEN")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="APPLIANCE")
    assert assoc.is_established
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: http(server, "/readyz")[0] == 503, 10, interval=0.05, what="/readyz 503")
    code, body = http(server, "/readyz")
    assert "draining: the appliance is stopping" in json.loads(body)["reasons"]
    assert http(server, "/healthz") == (200, "ok\n")  # the drain is the supervisor working, not stuck
    assert assoc.send_c_echo().Status == 0  # the open association is still served
    assoc.release()
    assert server.proc.wait(40) == 0
