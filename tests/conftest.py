"""Shared fixtures: a real `appliance serve` process on 127.0.0.1, a free port, waited for by polling."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bench.receivers import free_port, wait_for  # noqa: F401  (re-exported for the tests)

ROOT = Path(__file__).resolve().parent.parent
APPLIANCE = [sys.executable, "-m", "appliance"]
# DCMTK keeps Nagle on unless told otherwise: always set it for DCMTK tools.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value)


@dataclass
class ServerHandle:
    root: Path
    config_path: Path
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    tls_port: int = 0  # 0 unless [tls] port is set
    metrics_port: int = 0
    log_path: Path = field(default_factory=Path)

    @property
    def volume(self) -> Path:
        return self.root / "var/volumes/vol0"

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*APPLIANCE, *args, "-c", str(self.config_path)], capture_output=True, text=True,
                                cwd=self.root, timeout=300)
        if check and result.returncode != 0:
            raise AssertionError(f"appliance {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
        return result

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def start(self, timeout: float = 60.0) -> ServerHandle:
        port_file = self.root / "port.json"
        port_file.unlink(missing_ok=True)
        self.log_path = self.root / "server.log"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*APPLIANCE, "serve", "-c", str(self.config_path), "--port-file", str(port_file)],
            cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log()}")
            return port_file.exists()

        wait_for(ready, timeout, what="server port file")
        info = json.loads(port_file.read_text())
        self.port, self.metrics_port = info["port"], info["metrics_port"]
        self.tls_port = info.get("tls_port", 0)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 40.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """kill -9 the whole process group (supervisor and workers): a crash, not a shutdown."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def worker_pids(self) -> list[int]:
        assert self.proc is not None
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as resp:
            return str(resp.read().decode())


def write_config(root: Path, server: dict[str, Any] | None = None, storage: dict[str, Any] | None = None,
                 dicom: dict[str, Any] | None = None, volumes: list[dict[str, Any]] | None = None,
                 peers: dict[str, dict[str, Any]] | None = None, **tables: dict[str, Any]) -> Path:
    """``tables``: any other [section] (query={...}, commitment={...}, tls={...}) as key -> value."""
    server = {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "workers": 1, "log_level": "info",
              **(server or {})}
    lines = ["[server]"] + [f"{k} = {toml_value(v)}" for k, v in server.items()]
    if storage:
        lines += ["[storage]"] + [f"{k} = {toml_value(v)}" for k, v in storage.items()]
    if dicom:
        lines += ["[dicom]"] + [f"{k} = {toml_value(v)}" for k, v in dicom.items()]
    for section, table in tables.items():
        lines += [f"[{section}]"] + [f"{k} = {toml_value(v)}" for k, v in table.items()]
    for vol in volumes or []:
        lines += ["[[volumes]]"] + [f"{k} = {toml_value(v)}" for k, v in vol.items()]
    for name, table in (peers or {}).items():
        lines += [f"[peers.{name}]"] + [f"{k} = {toml_value(v)}" for k, v in table.items()]
    path = root / "appliance.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., ServerHandle]]:
    """Factory: make_server(server={...}, storage={...}, ...) -> started ServerHandle (stopped at teardown)."""
    handles: list[ServerHandle] = []

    def factory(start: bool = True, **sections: Any) -> ServerHandle:
        root = tmp_path / f"srv{len(handles)}"
        root.mkdir()
        handle = ServerHandle(root, write_config(root, **sections))
        handles.append(handle)
        return handle.start() if start else handle

    yield factory
    for handle in handles:
        handle.stop()


@pytest.fixture
def server(make_server: Callable[..., ServerHandle]) -> ServerHandle:
    return make_server()


def require_dcmtk() -> None:
    if shutil.which("storescu") is None:
        pytest.fail("DCMTK is not installed (make test installs Debian's dcmtk)")


def dcmtk(tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    require_dcmtk()
    return subprocess.run([tool, *args], capture_output=True, text=True, env=DCMTK_ENV, timeout=timeout)


def dataset_bytes(path: Path) -> bytes:
    """The dataset part of a Part-10 file (what travels in the P-DATA), i.e. everything after the File Meta."""
    from pynetdicom.dsutils import split_dataset

    _meta, offset = split_dataset(path)
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read()


def storescp_reference(files: list[Path], out: Path) -> dict[str, Path]:
    """What DCMTK storescu really puts on the wire for ``files``: send them to DCMTK's storescp in
    bit-preserving mode (+B writes the dataset exactly as received). Returns {SOPInstanceUID: file}."""
    import pydicom

    require_dcmtk()
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(["storescp", "+B", "-od", str(out), "-aet", "REF", str(port)], env=DCMTK_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: dcmtk("echoscu", "-aec", "REF", "127.0.0.1", str(port)).returncode == 0, 30,
                 interval=0.05, what="storescp")
        result = dcmtk("storescu", "-aec", "REF", "127.0.0.1", str(port), *map(str, files))
        assert result.returncode == 0, result.stderr
    finally:
        proc.terminate()
        proc.wait(10)
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in out.iterdir()}


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One real SeaweedFS cluster (tests/seaweed.py) for the session; each test takes a bucket of its own
    (``s3_bucket``). A test that stops or pauses it must bring it back before it ends (``start``/``resume``)."""
    from tests.seaweed import Seaweed

    cluster = Seaweed(tmp_path_factory.mktemp("seaweed")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


_buckets = iter(range(1_000_000))


@pytest.fixture
def s3_bucket(seaweed: Any) -> Iterator[str]:
    """A new, empty bucket on the session's SeaweedFS, deleted after the test (each bucket holds volumes)."""
    name = str(seaweed.make_bucket(f"test-{os.getpid()}-{next(_buckets)}"))
    yield name
    try:
        seaweed.drop_bucket(name)
    except Exception:  # noqa: BLE001 - a test that left the store paused or stopped; the volumes stay
        pass
