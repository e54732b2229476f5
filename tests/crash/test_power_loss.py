"""Simulated power loss, as CrashMonkey and ALICE do it: everything not yet made durable is dropped.

``PowerModel`` wraps the durability seams of the store in one process: ``os.fdatasync`` of a segment file (the
file's content as of that call becomes its durable content), ``fsync_dir`` of the segments folder (the folder's
listing becomes durable: a file created or deleted since the last one may come back or vanish), and the LMDB
writes of StudyIndex (apply, register_container, move_copies, collect_garbage; LMDB is opened with sync=True, so a
committed transaction is durable when it returns). At a chosen point (the k-th call of one kind, before or after it
runs) the power is cut: that call and every later one raise ``PowerOff``, so nothing more becomes durable or is
acknowledged. Once no call is in flight, the "disk after reboot" is built in a new folder: each segment file of the
last durable listing with its last durable content, and a consistent copy of the LMDB environment. Startup
recovery then runs on it, and the test checks that every instance answered Success is indexed and byte-exact, that
``verify`` finds nothing missing, corrupt or orphaned, and that ``index rebuild`` reproduces the live index.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import shutil
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from appliance import errors
from appliance.config import Config, StorageConfig, VolumeConfig
from appliance.index.db import StudyIndex
from appliance.index.records import read_header_blob
from appliance.store import segments
from appliance.store.commit import CommitResult, GroupCommitter, Submission
from appliance.store.compact import candidates, compact
from appliance.store.online import BlobStore, recover
from appliance.store.rebuild import rebuild_index
from appliance.store.spool import InstanceSpool, SpoolBudget
from appliance.store.volumes import init_volume
from tiering.scrub import ScrubReport, scrub

CT = "1.2.840.10008.5.1.4.1.1.2"
STUDY = "1.2.826.0.1.3680043.99.1"


class PowerOff(Exception):
    """Raised by every durable operation once the power is cut (not an OSError: nothing retries it)."""


@dataclass
class PowerModel:
    seg_dir: str
    cut_at: tuple[str, int, str] | None = None  # (kind, k-th call, "before" | "after")
    cut: bool = False
    counts: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    synced: dict[str, bytes] = field(default_factory=dict)  # segment name -> durable content
    listing: set[str] = field(default_factory=set)  # segment names in the durable directory
    lock: threading.Lock = field(default_factory=threading.Lock)

    def op(self, kind: str, fn: Callable[[], Any]) -> Any:
        with self.lock:
            if self.cut:
                raise PowerOff(kind)
            self.counts[kind] += 1
            point = (kind, self.counts[kind])
            if self.cut_at is not None and point == self.cut_at[:2] and self.cut_at[2] == "before":
                self.cut = True
                raise PowerOff(kind)
            self.in_flight += 1
        try:
            result = fn()
        finally:
            with self.lock:
                self.in_flight -= 1
        with self.lock:
            if self.cut_at is not None and point == self.cut_at[:2]:
                self.cut = True
                raise PowerOff(kind)  # it ran (durably), but the caller never learns it
        return result

    def quiet(self) -> bool:
        with self.lock:
            return self.in_flight == 0

    def install(self, monkeypatch: pytest.MonkeyPatch, index: StudyIndex) -> None:
        real_fdatasync, real_fsync_dir = os.fdatasync, segments.fsync_dir
        seg_dir = os.path.realpath(self.seg_dir)
        self.listing = set(os.listdir(seg_dir))
        for name in self.listing:
            self.synced[name] = (Path(seg_dir) / name).read_bytes()

        def fdatasync(fd: int) -> None:
            path = os.readlink(f"/proc/self/fd/{fd}")
            if os.path.dirname(path) != seg_dir:
                real_fdatasync(fd)
                return

            def flush() -> None:
                real_fdatasync(fd)
                size = os.fstat(fd).st_size
                self.synced[os.path.basename(path)] = os.pread(fd, size, 0)

            self.op("fdatasync", flush)

        def fsync_dir(path: Path | str) -> None:
            if os.path.realpath(path) != seg_dir:
                real_fsync_dir(path)
                return

            def flush() -> None:
                real_fsync_dir(path)
                self.listing = set(os.listdir(seg_dir))

            self.op("dirsync", flush)

        monkeypatch.setattr(os, "fdatasync", fdatasync)
        monkeypatch.setattr(segments, "fsync_dir", fsync_dir)
        for method, kind in (("apply", "apply"), ("register_container", "register"), ("move_copies", "move"),
                             ("collect_garbage", "gc")):
            real = getattr(index, method)
            monkeypatch.setattr(index, method, lambda *a, _r=real, _k=kind, **kw: self.op(_k, lambda: _r(*a, **kw)))

    def after_reboot(self, index: StudyIndex, root: Path) -> None:
        """Write the durable state into ``root``: volume vol0 and the index, as the disk holds them now."""
        assert self.cut, "the cut point was never reached"
        init_volume(root / "vol0", "vol0")
        with self.lock:
            for name in sorted(self.listing):
                (root / "vol0" / "segments" / name).write_bytes(self.synced.get(name, b""))
        (root / "index").mkdir()
        index.env.copy(str(root / "index"))  # a read transaction: exactly the last committed state


# ---- instances ------------------------------------------------------------------------------------------------



def verify(config: Config, index: StudyIndex) -> ScrubReport:
    """`appliance verify` (tiering/scrub.py) on the online volumes: every copy re-hashed, segments checked."""
    store = BlobStore.open(config)
    try:
        return scrub(config, index, store)
    finally:
        store.close()

def part10(n: int, version: int = 0, size: int = 30_000) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(CT)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(f"{STUDY}.3.{n}")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = f"{STUDY}.3.{n}"
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = f"{STUDY}.2.{n % 3}"
    ds.PatientID = "PWR"
    ds.PatientName = "Power^Loss"
    ds.Modality = "CT"
    ds.InstanceNumber = n
    ds.ImageComments = f"version {version}"
    ds.BitsAllocated = 8
    ds.PixelData = hashlib.sha256(f"{n}/{version}".encode()).digest() * (size // 32)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@dataclass
class Site:
    """A volume, an index and a committer, as one worker has them."""

    root: Path
    config: Config
    index: StudyIndex
    store: BlobStore
    budget: SpoolBudget = field(default_factory=lambda: SpoolBudget(1 << 20, 64 << 20))
    clock: int = 1_700_000_000_000_000_000

    @classmethod
    def open(cls, root: Path) -> Site:
        init_volume(root / "vol0", "vol0")
        config = make_config(root)
        index = StudyIndex(root / "index")
        return cls(root, config, index, BlobStore.open(config, index=index))

    def submission(self, data: bytes) -> Submission:
        backend = self.store.segment_backend("vol0")
        spool = InstanceSpool(self.budget, backend.volume.tmp, b"")
        spool.write(data)
        head, ts = read_header_blob(lambda: io.BytesIO(data), len(data))
        self.clock += 1000
        return Submission(spool, backend, head, ts, self.clock, "MODALITY")

    def close(self) -> None:
        self.store.close()
        self.index.close()


def make_config(root: Path) -> Config:
    storage = StorageConfig(index_path=root / "index", duplicate_policy="overwrite", segment_bytes_max=1 << 20,
                            compaction_dead_ratio=0.3, compaction_bytes_per_s=1 << 40)
    return Config(storage=storage, volumes=(VolumeConfig("vol0", root / "vol0", 0.999),))


async def burst(site: Site, instances: list[tuple[int, bytes]], submitters: int = 4) -> dict[int, CommitResult]:
    """Several concurrent submitters, small groups; returns every answer (each submission gets one)."""
    loop = asyncio.get_running_loop()
    committer = GroupCommitter(site.index, "overwrite", loop, max_batch=4, max_wait_ms=0.0)
    answers: dict[int, CommitResult] = {}

    async def submitter(mine: list[tuple[int, bytes]]) -> None:
        for n, data in mine:
            answers[n] = await asyncio.wait_for(committer.submit(site.submission(data)), 20)

    try:
        await asyncio.gather(*(submitter(instances[k::submitters]) for k in range(submitters)))
    finally:
        await asyncio.to_thread(committer.close)
    return answers


def normalized(dump: dict[str, list[tuple[str, Any]]]) -> dict[str, list[tuple[str, Any]]]:
    """verify's history (state, verified_ns of each copy) is not content."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in ("verified_ns", "state")}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return {table: [(k, strip(v)) for k, v in rows] for table, rows in dump.items()}


def check_recovered(root: Path, acked: dict[int, bytes], tmp: Path) -> StudyIndex:
    """Startup on the disk after reboot: every acknowledged instance present and byte-exact, verify clean,
    rebuild identical. Returns the (open) recovered index."""
    config = make_config(root)
    index = StudyIndex(root / "index")
    store = BlobStore.open(config, index=index)
    try:
        recover(store, index)
        for n, data in acked.items():
            found = index.instances_under(f"{STUDY}.3.{n}")
            assert found, f"acknowledged instance {n} is not in the index after the power loss"
            (_key, rec), = found
            blob = index.blob(rec.digest)
            assert blob is not None
            assert store.read_all(rec.digest, blob) == data, f"instance {n} is not byte-exact"
    finally:
        store.close()
    report = verify(config, index)
    assert report.ok, report
    rebuilt_path = tmp / "rebuilt"
    rebuild_index(config, rebuilt_path)
    rebuilt = StudyIndex(rebuilt_path)
    try:
        assert normalized(rebuilt.dump()) == normalized(index.dump())
    finally:
        rebuilt.close()
    return index


def newest(acked: dict[int, bytes], *rounds: dict[int, bytes]) -> dict[int, bytes]:
    out = dict(acked)
    for r in rounds:
        out.update(r)
    return out


# ---- a burst ------------------------------------------------------------------------------------------------

BURST = [(n, part10(n, size=30_000 + 997 * (n % 5))) for n in range(48)]  # ~1.5 MiB: rolls a 1 MiB segment
BURST_POINTS = [("fdatasync", 1, "before"), ("fdatasync", 3, "after"), ("fdatasync", 6, "before"),
                ("apply", 2, "before"), ("apply", 4, "after"), ("register", 2, "after")]


def power_loss_in_a_burst(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: tuple[str, int, str]) -> None:
    site = Site.open(tmp_path / "live")
    power = PowerModel(str(site.root / "vol0" / "segments"), cut_at=point)
    power.install(monkeypatch, site.index)
    answers = asyncio.run(burst(site, BURST))
    assert len(answers) == len(BURST)  # every submission answered, cut or not
    assert power.quiet()
    power.after_reboot(site.index, tmp_path / "rebooted")
    monkeypatch.undo()
    site.close()
    acked = {n: data for n, data in BURST if answers[n].status == errors.SUCCESS}
    lost = [n for n, _ in BURST if answers[n].status != errors.SUCCESS]
    assert lost, "the cut must fall inside the burst"  # else the point tests nothing
    check_recovered(tmp_path / "rebooted", acked, tmp_path).close()


@pytest.mark.parametrize("point", BURST_POINTS, ids=["-".join(map(str, p)) for p in BURST_POINTS])
def test_power_loss_during_a_burst_loses_nothing_acknowledged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              point: tuple[str, int, str]) -> None:
    power_loss_in_a_burst(tmp_path, monkeypatch, point)


SWEEP = [(kind, k, when) for kind in ("fdatasync", "apply") for k in range(1, 12) for when in ("before", "after")]


@pytest.mark.slow
@pytest.mark.parametrize("point", SWEEP, ids=["-".join(map(str, p)) for p in SWEEP])
def test_power_loss_sweep_over_a_burst(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       point: tuple[str, int, str]) -> None:
    power_loss_in_a_burst(tmp_path, monkeypatch, point)


# ---- a compaction ------------------------------------------------------------------------------------------

FIRST = [(n, part10(n, 0, size=40_000)) for n in range(60)]  # ~2.4 MiB: three 1 MiB segments
OVERWRITE = [(n, part10(n, 1, size=40_000)) for n in range(60) if n % 3]  # two thirds of the records die


@pytest.fixture(scope="module")
def compactable(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site with sealed segments two thirds dead, shut down cleanly (built once, copied per test)."""
    root = tmp_path_factory.mktemp("compactable")
    site = Site.open(root)
    answers = asyncio.run(burst(site, FIRST))
    answers2 = asyncio.run(burst(site, OVERWRITE))
    assert all(a.status == errors.SUCCESS for a in [*answers.values(), *answers2.values()])
    recover(site.store, site.index)  # a restart seals the active segment: every segment is a candidate
    assert len(candidates(site.index, "vol0", 0.3)) >= 2
    site.close()
    return root


def copy_site(src: Path, dest: Path) -> None:
    shutil.copytree(src, dest)


COMPACTION_POINTS = {
    "copies-appended-not-synced": ("fdatasync", 1, "before"),
    "synced-before-ends-commit": ("apply", 1, "before"),
    "ends-committed-before-switch": ("move", 1, "before"),
    "switched-before-file-delete": ("gc", 1, "before"),
    "deleted-before-dir-sync": ("dirsync", 2, "before"),
    "second-segment-half-done": ("apply", 2, "before"),
}


@pytest.mark.parametrize("point", list(COMPACTION_POINTS.values()), ids=list(COMPACTION_POINTS))
def test_power_loss_during_compaction_loses_nothing_and_a_second_compaction_finishes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compactable: Path, point: tuple[str, int, str]) -> None:
    live = tmp_path / "live"
    copy_site(compactable, live)
    config = make_config(live)
    index = StudyIndex(live / "index")
    power = PowerModel(str(live / "vol0" / "segments"), cut_at=point)
    power.install(monkeypatch, index)
    with pytest.raises(PowerOff):
        compact(config, index)
    assert power.quiet()
    power.after_reboot(index, tmp_path / "rebooted")
    monkeypatch.undo()
    index.close()

    expected = newest(dict(FIRST), dict(OVERWRITE))
    recovered = check_recovered(tmp_path / "rebooted", expected, tmp_path)
    try:
        config2 = make_config(tmp_path / "rebooted")
        compact(config2, recovered)
        assert candidates(recovered, "vol0", 0.3) == []
        assert verify(config2, recovered).ok
    finally:
        recovered.close()
    (tmp_path / "rebuilt").rename(tmp_path / "rebuilt-1")
    check_recovered(tmp_path / "rebooted", expected, tmp_path).close()  # and again after the second compaction


def iter_names(root: Path) -> Iterator[str]:
    yield from sorted(os.listdir(root / "vol0" / "segments"))


def test_the_power_model_drops_unsynced_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model itself: a put that was not synced is gone after the cut, a synced one stays."""
    site = Site.open(tmp_path / "live")
    power = PowerModel(str(site.root / "vol0" / "segments"), cut_at=("fdatasync", 2, "before"))
    power.install(monkeypatch, site.index)
    backend = site.store.segment_backend("vol0")
    from tests.conformance.test_backends import BytesSource, meta_for

    first = backend.put(meta_for(b"synced"), BytesSource(b"synced"))
    backend.sync()
    second = backend.put(meta_for(b"unsynced"), BytesSource(b"unsynced"))
    with pytest.raises(PowerOff):
        backend.sync()
    power.after_reboot(site.index, tmp_path / "rebooted")
    monkeypatch.undo()
    site.close()
    (name,) = list(iter_names(tmp_path / "rebooted"))
    raw = (tmp_path / "rebooted" / "vol0" / "segments" / name).read_bytes()
    assert segments.record_end(first) == len(raw) and segments.parse_location(second)[1] == len(raw)


def test_power_loss_between_segment_creation_and_its_registration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                   ) -> None:
    power_loss_in_a_burst(tmp_path, monkeypatch, ("register", 2, "before"))
