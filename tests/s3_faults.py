"""A fault-injecting HTTP proxy in front of SeaweedFS's S3 port, for the S3 tier's fault tests.

Each client connection carries one request (the proxy forwards it with ``Connection: close``, so the upstream
answer ends the connection and the client opens a new one for the next request): faults count requests exactly.
Faults, each for the next ``count`` requests whose method and path+query match:

- ``slow_down``: answer ``503 SlowDown`` with S3's XML error body (a throttling store), without reading the body;
- ``cut``: accept the request, read half of its body, then reset the connection (a partial upload);
- ``delay_s``: wait before forwarding (a slow store).

``refuse()`` closes the listening socket (connection refused: the store is down); ``accept()`` opens it again on the
same port. Requests are counted per (method, query kind) in ``seen`` so tests can tell what the client did.
"""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

HEAD_BYTES_MAX = 64 << 10
SLOW_DOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                  b"<Message>Please reduce your request rate.</Message><Resource>/</Resource>"
                  b"<RequestId>fault-proxy</RequestId></Error>")


@dataclass
class Fault:
    kind: str  # "slow_down", "cut", "delay"
    count: int
    method: str = ""  # "" = any
    path_pattern: str = ""  # a regex searched in the request target ("" = any)
    delay_s: float = 0.0


@dataclass
class FaultProxy:
    upstream_port: int
    host: str = "127.0.0.1"
    port: int = 0
    faults: list[Fault] = field(default_factory=list)
    seen: list[str] = field(default_factory=list)  # "METHOD target" of every request, in order
    injected: int = 0
    _listener: socket.socket | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stopping: bool = False

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FaultProxy:
        self.accept()
        return self

    def accept(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept_loop, args=(listener,), daemon=True).start()

    def refuse(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()

    def stop(self) -> None:
        self._stopping = True
        self.refuse()

    def add(self, kind: str, count: int, method: str = "", path_pattern: str = "", delay_s: float = 0.0) -> None:
        with self._lock:
            self.faults.append(Fault(kind, count, method, path_pattern, delay_s))

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def _take_fault(self, method: str, target: str) -> Fault | None:
        with self._lock:
            self.seen.append(f"{method} {target}")
            for fault in self.faults:
                if fault.count > 0 and (not fault.method or fault.method == method) and \
                        (not fault.path_pattern or re.search(fault.path_pattern, target)):
                    fault.count -= 1
                    self.injected += 1
                    return fault
        return None

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _addr = listener.accept()
            except OSError:
                return  # closed by refuse()/stop()
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            with client:
                client.settimeout(30)
                head, rest = _read_head(client)
                if head is None:
                    return
                self._handle(client, head, rest)
        except OSError:
            pass

    def _handle(self, client: socket.socket, head: bytes, rest: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = lines[0].split(" ", 2)
        headers = [line for line in lines[1:] if line]
        names = {line.split(":", 1)[0].strip().lower(): line.split(":", 1)[1].strip() for line in headers}
        length = int(names.get("content-length", "0") or 0)
        expects = names.get("expect", "").lower() == "100-continue"
        fault = self._take_fault(method, target)
        if fault is not None and fault.kind == "slow_down":
            client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                           + f"Content-Length: {len(SLOW_DOWN_BODY)}\r\n\r\n".encode() + SLOW_DOWN_BODY)
            return
        if expects:
            client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        if fault is not None and fault.kind == "cut":
            _read_exact(client, rest, max(1, length // 2))
            # RST, not FIN: the client sees its request die mid-body
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        if fault is not None and fault.kind == "delay":
            time.sleep(fault.delay_s)
        kept = [h for h in headers if h.split(":", 1)[0].strip().lower() not in ("connection", "expect")]
        forwarded = "\r\n".join([lines[0], *kept, "Connection: close", "", ""]).encode("latin-1")
        with socket.create_connection((self.host, self.upstream_port), timeout=60) as upstream:
            upstream.sendall(forwarded)
            sent = 0
            if rest:
                upstream.sendall(rest[:length])
                sent = min(len(rest), length)
            while sent < length:
                chunk = client.recv(min(1 << 20, length - sent))
                if not chunk:
                    return
                upstream.sendall(chunk)
                sent += len(chunk)
            while chunk := upstream.recv(1 << 20):
                client.sendall(chunk)


def _read_head(sock: socket.socket) -> tuple[bytes | None, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        if len(buf) > HEAD_BYTES_MAX:
            return None, b""
        chunk = sock.recv(65536)
        if not chunk:
            return None, b""
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def _read_exact(sock: socket.socket, already: bytes, length: int) -> None:
    got = len(already)
    while got < length:
        chunk = sock.recv(min(1 << 20, length - got))
        if not chunk:
            return
        got += len(chunk)
