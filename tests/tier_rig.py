"""Test rig for tiering: a config with online volumes and tiers, real online data (segments + index), and a small
file-per-blob tier backend that honours the BlobBackend contract (per-study containers, sync, remove_container),
for the mover's unit tests."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from appliance.config import Config, load_config
from appliance.index.db import IndexEntry, StudyIndex
from appliance.store.backend import (
    BlobBackend,
    BlobMeta,
    BlobSource,
    Capabilities,
    LatencyClass,
    Location,
    Recovery,
    StoredBlob,
    Usage,
)
from appliance.store.online import BlobStore
from appliance.store.segments import segment_copy
from appliance.store.volumes import init_volume
from tests.unit.test_index import header


class MemorySource(BlobSource):
    def __init__(self, data: bytes) -> None:
        self.data, self.size = data, len(data)

    def chunks(self, chunk_bytes: int) -> Iterator[bytes | memoryview]:
        for start in range(0, self.size, chunk_bytes):
            yield self.data[start : start + chunk_bytes]


def write_tier_config(root: Path, policies: str = "", tiering: str = "", tiers: str | None = None) -> Path:
    """vol0 online, a nearline tier "nl" (volume nl0) and a virtual tape tier "tape"."""
    if tiers is None:
        tiers = f"""
[[tiers]]
name = "nl"
kind = "nearline"
volumes = [{{name = "nl0", path = "{root}/nl0"}}]

[[tiers]]
name = "tape"
kind = "tape"
mode = "virtual"
path = "{root}/library"
cartridge_bytes = 67108864
cartridges = 4
"""
    text = f"""
[server]
port = 0
metrics_port = 0
workers = 1
log_level = "info"

[storage]
index_path = "{root}/index"
segment_bytes_max = 1048576

[[volumes]]
name = "vol0"
path = "{root}/vol0"

[tiering]
audit_log = "{root}/audit.jsonl"
{tiering}
{tiers}
{policies}
"""
    path = root / "appliance.toml"
    path.write_text(text)
    return path


def make_config(root: Path, **kw: str) -> Config:
    if not (root / "vol0").exists():
        init_volume(root / "vol0", "vol0")
    return load_config(write_tier_config(root, **kw))


def blob_bytes(study: str, i: int, size: int = 3000) -> bytes:
    seed = hashlib.sha256(f"{study}/{i}".encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def ingest(config: Config, index: StudyIndex, studies: dict[str, int], t0: int = 1_000, ae: str = "SCU",
           modality: str = "CT") -> dict[str, bytes]:
    """Store ``studies`` (uid -> instance count) online, as the ingest path does (put, sync, index), one segment
    per call, sealed. Returns sop uid -> bytes."""
    store = BlobStore.open(config, index=index)
    out: dict[str, bytes] = {}
    try:
        backend = store.segment_backend("vol0")
        entries = []
        for study, count in studies.items():
            for i in range(count):
                sop = f"{study}.1.{i}"
                data = blob_bytes(study, i)
                digest = hashlib.sha256(data).hexdigest()
                t = t0 + i
                loc = backend.put(BlobMeta(digest, len(data), t, ae), MemorySource(data))
                entries.append(IndexEntry(header("P", study, f"{study}.1", sop, modality), digest, len(data),
                                          "1.2.840.10008.1.2.1", t, ae, segment_copy("vol0", loc, t)))
                out[sop] = data
        backend.seal_active()
        backend.sync()
        index.apply(entries, "keep-first")
        index.seal_containers("vol0", [c.name for c in index.containers("vol0")])
    finally:
        store.close()
    return out


def read_instance(config: Config, index: StudyIndex, tiers: dict[str, BlobBackend], sop: str) -> bytes:
    """The bytes of an instance from its first copy, whatever the tier."""
    ((_key, inst),) = index.instances_under(sop)
    blob = index.blob(inst.digest)
    assert blob is not None
    store = BlobStore.open(config)
    try:
        backends: dict[str, BlobBackend] = {**store.backends, **tiers}
        copy = blob.copies[0]
        return b"".join(backends[copy.backend].iter_read(copy.location))
    finally:
        store.close()


class DirTier(BlobBackend):
    """A tier of one file per blob in per-move container folders: ``<root>/<container>/<n>`` with ``<n>.json``
    beside it. Locations follow the archive format's shape ``container:record:data:stored:size``."""

    capabilities = Capabilities(random_read=True, atomic_publish=True, latency=LatencyClass.NEARLINE,
                                deletes_immediately=True)

    def __init__(self, name: str, root: Path, capacity_bytes: int = 1 << 30) -> None:
        self.name, self.root, self.capacity = name, root, capacity_bytes
        root.mkdir(parents=True, exist_ok=True)
        self.current = ""
        self.unsynced: list[Path] = []
        self.corrupt_puts = False  # write wrong bytes (a target that corrupts what it is given)
        self.on_put: Callable[[], None] = lambda: None

    def begin_container(self, hint: str) -> str:
        self.current = f"{hint}-{uuid.uuid4().hex[:8]}"
        return self.current

    def put(self, meta: BlobMeta, source: BlobSource) -> Location:
        if not self.current:
            self.begin_container("auto")
        folder = self.root / self.current
        folder.mkdir(exist_ok=True)
        n = len(list(folder.glob("*.json")))
        data = b"".join(bytes(c) for c in source.chunks(1 << 16))
        if self.corrupt_puts:
            data = b"X" + data[1:]
        (folder / str(n)).write_bytes(data)
        (folder / f"{n}.json").write_text(json.dumps(
            {"digest": meta.digest, "size": meta.size, "received_ns": meta.received_ns, "calling_ae": meta.calling_ae}))
        self.unsynced += [folder / str(n), folder / f"{n}.json"]
        self.on_put()
        return f"{self.current}:{n}:{n}:{meta.size}:{meta.size}"

    def sync(self) -> None:
        for path in self.unsynced:
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        self.unsynced = []

    def publish(self, locations: list[Location]) -> None:
        pass

    def _path(self, location: Location) -> Path:
        container, n = location.split(":")[:2]
        return self.root / container / n

    def read(self, location: Location, offset: int = 0, length: int = -1) -> bytes:
        from appliance.errors import BlobMissing

        try:
            with self._path(location).open("rb") as fh:
                fh.seek(offset)
                return fh.read(length if length >= 0 else -1)
        except FileNotFoundError:
            raise BlobMissing(f"{self.name}:{location}: gone") from None

    def stat(self, location: Location) -> BlobMeta:
        raw = json.loads(self._path(location).with_suffix(".json").read_text())
        return BlobMeta(raw["digest"], raw["size"], raw["received_ns"], raw["calling_ae"])

    def delete(self, locations: list[Location]) -> None:
        for loc in locations:
            self._path(loc).unlink(missing_ok=True)

    def list(self) -> Iterator[StoredBlob]:
        for meta_path in sorted(self.root.glob("*/*.json")):
            container, n = meta_path.parent.name, meta_path.stem
            meta = self.stat(f"{container}:{n}")
            yield StoredBlob(f"{container}:{n}:{n}:{meta.size}:{meta.size}", meta)

    def recover(self, committed_end: Callable[[str], int | None]) -> Recovery:
        return Recovery()

    def container_of(self, location: Location) -> str:
        return location.split(":", 1)[0]

    def remove_container(self, name: str) -> None:
        shutil.rmtree(self.root / name, ignore_errors=True)

    def containers(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def usage(self) -> tuple[Usage, ...]:
        used = sum(p.stat().st_size for p in self.root.glob("*/*"))
        return (Usage(f"{self.name}0", used, self.capacity, True),)


NEARLINE_ONLY = """
[[tiers]]
name = "nl"
kind = "nearline"
volumes = [{{name = "nl0", path = "{root}/nl0"}}]
"""
OLD_TO_NEARLINE = """
[[policies]]
name = "old-to-nearline"
from = "online"
to = "nl"
received_days_min = 30
"""
NEARLINE_THEN_TAPE = OLD_TO_NEARLINE + """
[[policies]]
name = "nearline-to-tape"
from = "nl"
to = "tape"
"""
TAPE = """
[[tiers]]
name = "tape"
kind = "tape"
mode = "virtual"
path = "{root}/library"
cartridge_bytes = 67108864
cartridges = 2
"""
DAY_NS = 86_400 * 10**9


def nearline_site(root: Path, policies: str = OLD_TO_NEARLINE, tiering: str = "",
                  tape: bool = False) -> tuple[Path, dict[str, bytes]]:
    """A config (vol0 + nearline "nl", and a virtual tape library "tape" if asked; initialised) with two studies
    received 60 days ago (1.1: 3 instances, 1.2: 2) and one received now (1.3: 2). Returns the config path and
    sop uid -> bytes."""
    from tiering.tiers import init_tier

    tiers = NEARLINE_ONLY + (TAPE if tape else "")
    config = make_config(root, policies=policies, tiering=tiering, tiers=tiers.format(root=root))
    for tier in config.tiers:
        init_tier(tier)
    index = StudyIndex(config.storage.index_path)
    try:
        now = time.time_ns()
        data = ingest(config, index, {"1.1": 3, "1.2": 2}, t0=now - 60 * DAY_NS)
        data.update(ingest(config, index, {"1.3": 2}, t0=now))
    finally:
        index.close()
    return root / "appliance.toml", data


def read_everything(config_path: Path) -> tuple[dict[str, bytes], dict[str, int]]:
    """Every instance's bytes through BlobStore with the tiers opened (what export and retrieve read), and the
    index's counts."""
    from tiering.run import Tiers

    config = load_config(config_path)
    index = StudyIndex(config.storage.index_path)
    tiers = Tiers.open(config)
    store = BlobStore.open(config, tiers=tiers.backends)
    try:
        out = {}
        for key, inst in index.items("instances"):
            blob = index.blob(inst["digest"])
            assert blob is not None, key
            out[inst["SOPInstanceUID"]] = store.read_all(inst["digest"], blob, allow_offline=True)
        return out, index.counts()
    finally:
        store.close()
        tiers.close()
        index.close()


def orphans(config_path: Path) -> dict[str, list[str]]:
    """Container files on disk that the index does not name, and index containers whose file is gone."""
    config = load_config(config_path)
    index = StudyIndex(config.storage.index_path)
    try:
        # Tape containers are files of an append-only cartridge: never deleted, not checked here.
        named = {(c.backend, c.name) for c in index.containers() if c.backend in ("vol0", "nl")}
        gc = index.pending_gc()
    finally:
        index.close()
    on_disk = {("vol0", p.name) for p in (root_of(config) / "vol0" / "segments").glob("*.tar")}
    nl_root = root_of(config) / "nl0"
    on_disk |= {("nl", f"nl0/{p.name}") for p in nl_root.glob("archives/*/*.tar")}
    on_disk |= {("nl", f"nl0/{p.name.removesuffix('.partial')}") for p in nl_root.glob("tmp/*.partial")}
    return {"unnamed_files": sorted(f"{b}/{n}" for b, n in on_disk - named),
            "missing_files": sorted(f"{b}/{n}" for b, n in named - on_disk), "gc": [f"{b}/{n}" for b, n in gc]}


def root_of(config: Config) -> Path:
    return config.storage.index_path.parent
