"""appliance/health.py on its own: the endpoints' answers and the bound on requests served at once."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter

from appliance import health
from bench.receivers import wait_for


class State:
    alive = True
    reasons: list[str] = []


@pytest.fixture
def served() -> Iterator[tuple[health.HealthServer, State]]:
    registry = CollectorRegistry()
    Counter("probe_things", "things", registry=registry).inc()
    state = State()
    server = health.start("127.0.0.1", 0, registry, alive=lambda: state.alive, readiness=lambda: state.reasons)
    yield server, state
    server.shutdown()
    server.server_close()


def get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def test_answers(served: tuple[health.HealthServer, State]) -> None:
    server, state = served
    port = server.server_port
    assert get(port, "/healthz") == (200, "ok\n")
    assert get(port, "/readyz") == (200, '{"ready": true}\n')
    code, body = get(port, "/metrics")
    assert code == 200 and "probe_things_total 1.0" in body
    assert get(port, "/metrics?name[]=x")[0] == 200
    assert get(port, "/healthz", "HEAD") == (200, "")
    assert get(port, "/other")[0] == 404
    state.alive = False
    state.reasons = ["volume vol0: detached (no marker)"]
    assert get(port, "/healthz")[0] == 503
    code, body = get(port, "/readyz")
    assert code == 503 and json.loads(body) == {"ready": False, "reasons": ["volume vol0: detached (no marker)"]}


def test_a_failing_readiness_check_says_not_ready(served: tuple[health.HealthServer, State]) -> None:
    server, _state = served

    def broken() -> list[str]:
        raise OSError("statvfs hung up")

    server.readiness = broken
    code, body = get(server.server_port, "/readyz")
    assert code == 503 and json.loads(body)["reasons"] == ["readiness check failed: OSError"]


def test_requests_at_once_are_bounded(served: tuple[health.HealthServer, State]) -> None:
    server, _state = served
    port = server.server_port
    # THREADS_MAX clients that connect and send nothing hold every request thread ...
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(health.THREADS_MAX)]
    try:
        wait_for(lambda: server._busy._value == 0, 5, interval=0.02, what="all threads taken")  # type: ignore[attr-defined]
        # ... so one more connection is closed unanswered instead of starting a ninth thread.
        with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
            get(port, "/healthz")
    finally:
        for sock in idle:
            sock.close()
    # Their threads end (the peers closed; else the 5 s socket timeout would end them) and service resumes.
    wait_for(lambda: server._busy._value == health.THREADS_MAX, 10, interval=0.02, what="threads released")  # type: ignore[attr-defined]
    assert get(port, "/healthz") == (200, "ok\n")
