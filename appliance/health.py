"""The supervisor's HTTP endpoint: /metrics (Prometheus), /healthz (alive), /readyz (takes work).

A small ThreadingHTTPServer instead of prometheus_client.start_http_server, which serves only the registry. Bounded:
at most ``THREADS_MAX`` requests are served at once (one more connection is closed unanswered: a scraper retries),
each socket has a timeout so a client that sends nothing cannot hold a thread, and only GET/HEAD without a body are
read (http.server caps the request line and the header count itself).

Nothing here imports prometheus_client at module level: server.py imports this module before it sets
PROMETHEUS_MULTIPROC_DIR.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from appliance.store.volumes import VolumeSet

log = logging.getLogger("appliance.health")

THREADS_MAX = 8
REQUEST_TIMEOUT_S = 5.0


class HealthServer(ThreadingHTTPServer):
    daemon_threads = True  # a request in progress never holds the supervisor's exit

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry, alive: Callable[[], bool],
                 readiness: Callable[[], list[str]]) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.registry = registry
        self.alive = alive
        self.readiness = readiness  # the reasons the appliance is not ready ([]: ready)
        self._busy = threading.BoundedSemaphore(THREADS_MAX)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._busy.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._busy.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._busy.release()


class _Handler(BaseHTTPRequestHandler):
    server: HealthServer
    timeout = REQUEST_TIMEOUT_S
    protocol_version = "HTTP/1.0"  # one request per connection: nothing to keep a thread for

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            # Imported here: prometheus-client picks its multi-process value storage at first import, which must
            # come after the supervisor sets PROMETHEUS_MULTIPROC_DIR (see appliance/metrics.py).
            from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

            self._reply(200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            ok = self.server.alive()
            self._reply(200 if ok else 503, b"ok\n" if ok else b"supervisor loop stalled\n", "text/plain")
        elif path == "/readyz":
            try:
                reasons = self.server.readiness()
            except Exception as exc:  # noqa: BLE001 - a probe that fails says "not ready", never crashes
                log.exception("readiness check")
                reasons = [f"readiness check failed: {type(exc).__name__}"]
            body = {"ready": not reasons, **({"reasons": reasons} if reasons else {})}
            self._reply(503 if reasons else 200, json.dumps(body).encode() + b"\n", "application/json")
        else:
            self._reply(404, b"not found\n", "text/plain")

    def _reply(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        log.debug("%s " + format, self.address_string(), *args)


def start(host: str, port: int, registry: CollectorRegistry, alive: Callable[[], bool],
          readiness: Callable[[], list[str]]) -> HealthServer:
    server = HealthServer((host, port), registry, alive, readiness)
    threading.Thread(target=server.serve_forever, name="appliance-http", daemon=True).start()
    return server


def volume_reasons(volumes: VolumeSet) -> list[str]:
    """[] when at least one volume takes writes (the placement rule of VolumeSet.pick: attached and under its high
    watermark); else why each one does not."""
    if volumes.pick(0) is not None:
        return []
    reasons = []
    for vol in volumes.volumes:
        if not vol.is_attached():
            reasons.append(f"volume {vol.name}: detached (no marker)")
        else:
            reasons.append(f"volume {vol.name}: {vol.fill():.1%} full, at or above its high watermark "
                           f"{vol.high_watermark:.0%}")
    return reasons
