"""The nearline tier beyond the conformance suite: volumes and markers, placement, containers, faults, crashes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.config_tiering import TierConfig, TierVolumeConfig
from appliance.errors import BlobCorrupt, BlobMissing, OutOfSpace, VolumeError
from appliance.store.backend import BlobMeta, BlobSource
from appliance.store.volumes import init_volume
from tiering.archive import parse_location
from tiering.nearline import MARKER, NearlineBackend, archive_stored_bytes, init_tier, open_nearline

ROOT = Path(__file__).resolve().parents[2]
FRAME = 64 << 10
BIG = b"".join(b"(0028,0010) US %08d rows\n" % i for i in range(12_000))  # several 64 KiB frames


class Bytes(BlobSource):
    def __init__(self, data: bytes) -> None:
        self.data, self.size = data, len(data)

    def chunks(self, chunk_bytes: int) -> Iterator[bytes]:
        for start in range(0, len(self.data), chunk_bytes):
            yield self.data[start : start + chunk_bytes]


def meta_for(data: bytes) -> BlobMeta:
    return BlobMeta(hashlib.sha256(data).hexdigest(), len(data), 1_700_000_000_000_000_001, "MR_3T")


def tier_of(tmp_path: Path, *names: str, level: int = 3, watermarks: dict[str, float] | None = None) -> TierConfig:
    marks = watermarks or {}
    volumes = tuple(TierVolumeConfig(n, tmp_path / n, marks.get(n, 0.999)) for n in names or ("nv0",))
    return TierConfig("near", "nearline", volumes=volumes, compression_level=level, frame_bytes=FRAME)


@pytest.fixture
def tier(tmp_path: Path) -> TierConfig:
    t = tier_of(tmp_path, "nv0", "nv1")
    init_tier(t)
    return t


def put_synced(backend: NearlineBackend, blobs: list[bytes], hint: str | None = None) -> list[str]:
    if hint is not None:
        backend.begin_container(hint)
    locations = [backend.put(meta_for(b), Bytes(b)) for b in blobs]
    backend.sync()
    backend.publish(locations)
    return locations


# ---- volumes -----------------------------------------------------------------------------------------------


def test_init_tier_marks_each_volume_once_and_refuses_foreign_folders(tmp_path: Path, tier: TierConfig) -> None:
    assert "already initialised" in init_tier(tier)
    assert all((v.path / MARKER).is_file() for v in tier.volumes)
    other = TierConfig("cold", "nearline", volumes=(TierVolumeConfig("nv0", tmp_path / "nv0"),))
    with pytest.raises(VolumeError, match="tier 'near'"):
        init_tier(other)
    with pytest.raises(VolumeError, match="tier 'near'"):
        open_nearline(other)  # a volume of another tier is a configuration error, refused at once
    init_volume(tmp_path / "online0", "online0")
    with pytest.raises(VolumeError, match="online volume"):
        init_tier(TierConfig("x", "nearline", volumes=(TierVolumeConfig("v", tmp_path / "online0"),)))


def test_an_unmounted_volume_is_never_created_or_filled(tmp_path: Path) -> None:
    t = tier_of(tmp_path, "nv0", "gone")
    init_tier(t)
    (tmp_path / "gone" / MARKER).unlink()  # the NAS did not mount: an empty mount point
    backend = open_nearline(t)
    usage = {u.name: u for u in backend.usage()}
    assert usage["nv0"].accepting and not usage["gone"].accepting
    locations = [put_synced(backend, [b"study %d" % i], hint=f"s{i}")[0] for i in range(4)]
    assert {parse_location(loc)[0].split("/")[0] for loc in locations} == {"nv0"}
    assert not (tmp_path / "gone" / MARKER).exists() and not list((tmp_path / "gone" / "archives").iterdir())
    with pytest.raises(VolumeError, match="not mounted"):
        list(backend.list())  # a rebuild or verify must not silently miss a volume
    with pytest.raises(VolumeError):
        backend.remove_container("gone/x-1.tar")  # gc keeps its row and retries later
    (tmp_path / "nv0" / MARKER).unlink()
    with pytest.raises(OutOfSpace, match="not mounted"):
        backend.begin_container("s9")
    missing = tier_of(tmp_path, "never")
    open_nearline(missing)
    assert not (tmp_path / "never").exists()


def test_placement_skips_volumes_above_their_watermark(tmp_path: Path) -> None:
    t = tier_of(tmp_path, "full", "roomy", watermarks={"full": 0.000001})
    init_tier(t)
    backend = open_nearline(t)
    assert [u.accepting for u in backend.usage()] == [False, True]
    for i in range(3):
        assert backend.begin_container(f"study{i}").startswith("roomy/")
    backend.sync()


# ---- containers --------------------------------------------------------------------------------------------


def test_begin_container_names_the_archive_the_puts_go_to(tier: TierConfig) -> None:
    backend = open_nearline(tier)
    container = backend.begin_container("1.2.840.99/../x")
    assert ":" not in container and "/../" not in container and "840.99" not in container  # no UID in names
    locations = [backend.put(meta_for(b), Bytes(b)) for b in (BIG, b"", b"tail")]
    assert {backend.container_of(loc) for loc in locations} == {container}
    with pytest.raises(BlobMissing):  # not published before sync: never readable half written
        backend.read(locations[0])
    partials = [p for v in tier.volumes for p in (v.path / "tmp").iterdir()]
    assert len(partials) == 1 and partials[0].name.endswith(".partial")
    backend.sync()
    assert not [p for v in tier.volumes for p in (v.path / "tmp").iterdir()]
    path = backend.archive_file(container)
    listing = subprocess.run(["tar", "-tf", path], capture_output=True, text=True, check=True)
    assert listing.stderr == "" and len(listing.stdout.split()) == 4  # three members and the catalog
    assert [backend.read(loc) for loc in locations] == [BIG, b"", b"tail"]
    assert backend.sha256(locations[0]) == hashlib.sha256(BIG).hexdigest()  # of the original bytes
    assert parse_location(locations[0])[3] < len(BIG) // 4  # stored compressed
    assert archive_stored_bytes(locations[0]) % 512 == 0
    # The next puts, without begin_container, go to a new archive of the backend's choosing.
    (later,) = put_synced(backend, [b"later"])
    assert backend.container_of(later) != container


def test_a_tier_at_level_0_stores_members_raw(tmp_path: Path) -> None:
    t = tier_of(tmp_path, "nv0", level=0)
    init_tier(t)
    backend = open_nearline(t)
    (loc,) = put_synced(backend, [BIG])
    assert parse_location(loc)[3] == len(BIG)
    assert backend.read(loc) == BIG and backend.read(loc, 100_000, 10) == BIG[100_000:100_010]


def test_delete_removes_an_archive_only_when_every_blob_in_it_goes(tier: TierConfig) -> None:
    backend = open_nearline(tier)
    a, b = put_synced(backend, [b"a", b"b"], hint="study")
    path = backend.archive_file(backend.container_of(a))
    backend.delete([a])
    assert os.path.exists(path) and backend.read(b) == b"b"
    backend.delete([a, b])
    assert not os.path.exists(path)
    with pytest.raises(BlobMissing):
        backend.read(b)
    backend.delete([a, b])  # harmless again
    backend.remove_container(backend.container_of(a))


def test_remove_container_removes_a_finished_or_a_partial_archive(tier: TierConfig) -> None:
    backend = open_nearline(tier)
    (done,) = put_synced(backend, [b"done"], hint="s1")
    partial = backend.begin_container("s2")
    backend.put(meta_for(b"half"), Bytes(b"half"))
    backend.remove_container(partial)  # a move redone after a crash removes its container first
    backend.remove_container(backend.container_of(done))
    backend.sync()  # nothing left to finish
    assert not [p for v in tier.volumes for p in (v.path / "tmp").iterdir()]
    assert list(backend.list()) == []


# ---- faults ------------------------------------------------------------------------------------------------


def test_a_corrupted_archive_byte_raises_never_serves_wrong_bytes(tier: TierConfig) -> None:
    backend = open_nearline(tier)
    (loc,) = put_synced(backend, [BIG])
    path = backend.archive_file(backend.container_of(loc))
    _c, _record, data, stored, _size = parse_location(loc)
    raw = bytearray(Path(path).read_bytes())
    raw[data + stored // 2] ^= 0x01
    Path(path).write_bytes(raw)
    fresh = open_nearline(tier)
    with pytest.raises(BlobCorrupt):
        fresh.read(loc)
    with pytest.raises(BlobCorrupt):
        fresh.sha256(loc)
    with pytest.raises(BlobCorrupt):
        b"".join(fresh.iter_read(loc))


def test_a_volume_that_disappears_gives_blob_missing(tmp_path: Path, tier: TierConfig) -> None:
    backend = open_nearline(tier)
    (loc,) = put_synced(backend, [BIG], hint="study")
    chunks = backend.iter_read(loc, 1 << 16)
    assert next(chunks) == BIG[: 1 << 16]
    # Mid-read, the archive's bytes go away (a NAS export lost, a filesystem cut short under us).
    os.truncate(backend.archive_file(backend.container_of(loc)), 0)
    with pytest.raises(BlobMissing):
        b"".join(chunks)
    # The volume unmounted: its mount point is empty. A new reader says so.
    volume = parse_location(loc)[0].split("/")[0]
    os.rename(tmp_path / volume, tmp_path / "elsewhere")
    (tmp_path / volume).mkdir()
    with pytest.raises(BlobMissing, match="not mounted"):
        open_nearline(tier).read(loc)


def test_open_archives_stay_bounded(tier: TierConfig) -> None:
    backend = NearlineBackend(tier, open_archives_max=3)
    locations = [put_synced(backend, [b"study %d" % i * 1000], hint=f"s{i}")[0] for i in range(12)]
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(2):
        for i, loc in enumerate(locations):
            assert backend.read(loc) == b"study %d" % i * 1000
    assert len(os.listdir("/proc/self/fd")) <= before + 3
    backend.close()


# ---- crashes -----------------------------------------------------------------------------------------------

WRITER = """
import hashlib, sys
from pathlib import Path
from appliance.config_tiering import TierConfig, TierVolumeConfig
from appliance.store.backend import BlobMeta, BlobSource
from tiering.nearline import open_nearline

class Bytes(BlobSource):
    def __init__(self, data): self.data, self.size = data, len(data)
    def chunks(self, n):
        for i in range(0, len(self.data), n): yield self.data[i:i + n]

root = Path(sys.argv[1])
tier = TierConfig("near", "nearline", volumes=(TierVolumeConfig("nv0", root / "nv0", 0.999),
                  TierVolumeConfig("nv1", root / "nv1", 0.999)), frame_bytes=64 << 10)
backend = open_nearline(tier)
study = 0
while True:
    backend.begin_container(f"study{study}")
    locations = []
    for i in range(20):
        data = b"study %d instance %d " % (study, i) * (1000 + 997 * i)
        meta = BlobMeta(hashlib.sha256(data).hexdigest(), len(data), 1, "AE")
        locations.append((backend.put(meta, Bytes(data)), meta.digest))
    backend.sync()
    for loc, digest in locations:
        print(loc, digest, flush=True)  # acknowledged only after sync returned
    study += 1
"""


def test_kill_9_while_writing_loses_no_synced_blob_and_recover_removes_partials(tmp_path: Path,
                                                                               tier: TierConfig) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    acknowledged: list[tuple[str, str]] = []
    deadline = time.monotonic() + 60
    # Kill once several studies are synced and a later one is being written (a .partial exists).
    while len(acknowledged) < 60 or not any(p.name.endswith(".partial") for v in tier.volumes
                                             for p in (v.path / "tmp").iterdir()):
        assert time.monotonic() < deadline, "the writer made no progress"
        line = proc.stdout.readline()
        assert line, "the writer died"
        loc, digest = line.decode().split()
        acknowledged.append((loc, digest))
    proc.kill()
    proc.wait()
    proc.stdout.close()
    backend = open_nearline(tier)
    result = backend.recover(lambda _c: None)
    assert result.counts["removed_partial"] >= 1
    assert not [p for v in tier.volumes for p in (v.path / "tmp").iterdir()]
    for loc, digest in acknowledged:
        assert backend.sha256(loc) == digest
    listed = {s.location for s in backend.list()}
    assert {loc for loc, _ in acknowledged} <= listed
    for container in {backend.container_of(loc) for loc, _ in acknowledged}:
        run = subprocess.run(["tar", "-tf", backend.archive_file(container)], capture_output=True, check=True)
        assert run.stderr == b""
    assert backend.recover(lambda _c: None).counts["removed_partial"] == 0


FULL = """
import hashlib, os, resource, signal, sys
from pathlib import Path
from appliance.config_tiering import TierConfig, TierVolumeConfig
from appliance.errors import OutOfSpace
from appliance.store.backend import BlobMeta, BlobSource
from tiering.nearline import open_nearline

class Bytes(BlobSource):
    def __init__(self, data): self.data, self.size = data, len(data)
    def chunks(self, n):
        for i in range(0, len(self.data), n): yield self.data[i:i + n]

def put(backend, data):
    return backend.put(BlobMeta(hashlib.sha256(data).hexdigest(), len(data), 1, "AE"), Bytes(data))

root = Path(sys.argv[1])
tier = TierConfig("near", "nearline", volumes=(TierVolumeConfig("nv0", root / "nv0", 0.999),), frame_bytes=64 << 10)
backend = open_nearline(tier)
# The volume "fills up": files may not grow beyond 2 MiB (EFBIG, as ENOSPC would be, without a tiny filesystem).
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, resource.RLIM_INFINITY))
backend.begin_container("big")
outcomes = []
for step in ("put", "put again", "sync"):
    try:
        put(backend, os.urandom(3 << 20)) if step != "sync" else backend.sync()
        outcomes.append(f"{step}: ok")
    except OutOfSpace:
        outcomes.append(f"{step}: out of space")
outcomes.append("partials: %d" % len(os.listdir(root / "nv0" / "tmp")))
backend.begin_container("small")
loc = put(backend, b"fits")
backend.sync()
outcomes.append("small: " + backend.read(loc).decode())
print("\\n".join(outcomes))
"""


def test_a_full_volume_refuses_the_archive_without_a_fault(tmp_path: Path) -> None:
    t = tier_of(tmp_path, "nv0")
    init_tier(t)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", FULL, str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:5] == ["put: out of space", "put again: out of space", "sync: out of space",
                                          "partials: 0", "small: fits"]


def test_concurrent_readers_with_a_small_descriptor_cache_read_the_right_bytes(tier: TierConfig) -> None:
    """Threads evicting each other's archives from a 2-entry LRU: a descriptor is never closed under a read."""
    from concurrent.futures import ThreadPoolExecutor

    backend = NearlineBackend(tier, open_archives_max=2)
    blobs = [bytes([i]) * (FRAME + 1000 * i) for i in range(10)]
    locations = [put_synced(backend, [b], hint=f"s{i}")[0] for i, b in enumerate(blobs)]

    def reader(seed: int) -> int:
        for n in range(60):
            i = (seed * 7 + n * 3) % len(blobs)
            assert backend.read(locations[i], FRAME - 10, 20) == blobs[i][FRAME - 10 : FRAME + 10]
        return seed

    with ThreadPoolExecutor(4) as pool:
        assert sorted(pool.map(reader, range(8))) == list(range(8))
    backend.close()
