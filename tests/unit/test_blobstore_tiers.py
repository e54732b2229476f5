"""BlobStore reads across tiers (appliance/store/online.py): fastest copy first, suspect copies last, offline copies
only for the recaller, and a copy that does not hash to its name never served.

The tier backends here are real segment stores on their own folders, declared nearline or offline: the read order
and the offline rule depend only on a backend's ``capabilities.latency``, and the nearline/tape backends get the
same treatment in tests/integration/test_tiering_e2e.py once they are installed."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from msgspec.structs import replace

from appliance.config import VolumeConfig
from appliance.errors import BlobCorrupt, BlobMissing, Offline
from appliance.index.schema import COPY_SUSPECT, BlobRecord, Copy
from appliance.store.backend import BlobBackend, BlobMeta, BlobSource, Capabilities, LatencyClass
from appliance.store.online import BlobStore
from appliance.store.segments import COPY_CHUNK, SegmentBackend, parse_location, segment_copy
from appliance.store.volumes import VolumeSet, init_volume, open_volume


class _Bytes(BlobSource):
    def __init__(self, data: bytes) -> None:
        self.data, self.size = data, len(data)

    def chunks(self, chunk_bytes: int) -> Iterator[bytes]:
        for i in range(0, len(self.data), chunk_bytes):
            yield self.data[i : i + chunk_bytes]


def _segments(root: Path, name: str, latency: LatencyClass) -> SegmentBackend:
    init_volume(root / name, name)
    backend = SegmentBackend(open_volume(VolumeConfig(name, root / name, 0.999), create_missing=False))
    backend.capabilities = Capabilities(True, True, latency, False)  # type: ignore[misc]
    return backend


def _put(backend: BlobBackend, data: bytes) -> Copy:
    meta = BlobMeta(hashlib.sha256(data).hexdigest(), len(data), 1, "AE")
    location = backend.put(meta, _Bytes(data))
    backend.sync()
    return segment_copy(backend.name, location, 1)


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[BlobStore]:
    online = _segments(tmp_path, "vol0", LatencyClass.ONLINE)
    tiers: dict[str, BlobBackend] = {"nas": _segments(tmp_path, "nas", LatencyClass.NEARLINE),
                                     "lto": _segments(tmp_path, "lto", LatencyClass.OFFLINE)}
    s = BlobStore(VolumeSet([]), {"vol0": online}, tiers)
    yield s
    s.close()


def _corrupt(backend: BlobBackend, copy: Copy) -> None:
    """Flip one byte of the copy's data in its segment file, as a failing disk would."""
    assert isinstance(backend, SegmentBackend)
    segment, _record, data, _size = parse_location(copy.location)
    with open(os.path.join(backend.dir, segment), "r+b") as fh:
        fh.seek(data + 10)
        byte = fh.read(1)
        fh.seek(data + 10)
        fh.write(bytes([byte[0] ^ 0xFF]))


DATA = os.urandom(3000)
DIGEST = hashlib.sha256(DATA).hexdigest()


def test_fastest_copy_first_whatever_the_record_order(store: BlobStore) -> None:
    copies = [_put(store.tiers["lto"], DATA), _put(store.tiers["nas"], DATA), _put(store.backends["vol0"], DATA)]
    blob = BlobRecord(len(DATA), 1, copies)
    assert [c.backend for c in store.read_order(blob)] == ["vol0", "nas", "lto"]
    assert store.read_all(DIGEST, blob) == DATA
    # Without the online copy the nearline one is read; without both, the tape one is Offline...
    assert store.read_all(DIGEST, BlobRecord(len(DATA), 1, copies[:2])) == DATA
    tape_only = BlobRecord(len(DATA), 1, copies[:1])
    with pytest.raises(Offline) as info:
        store.read_all(DIGEST, tape_only)
    assert isinstance(info.value, BlobMissing) and info.value.status == 0xA702
    assert "recall queued" in str(info.value)
    # ...except for the recaller.
    assert store.read_all(DIGEST, tape_only, allow_offline=True) == DATA


def test_suspect_copy_read_last(store: BlobStore) -> None:
    online = _put(store.backends["vol0"], DATA)
    nearline = _put(store.tiers["nas"], DATA)
    blob = BlobRecord(len(DATA), 1, [replace(online, state=COPY_SUSPECT), nearline])
    assert [c.backend for c in store.read_order(blob)] == ["nas", "vol0"]
    # The only readable copy left is suspect: it is still tried (verify may have seen a detached volume).
    assert store.read_all(DIGEST, BlobRecord(len(DATA), 1, [replace(online, state=COPY_SUSPECT)])) == DATA


def test_corrupt_tier_copy_never_served(store: BlobStore) -> None:
    nearline = _put(store.tiers["nas"], DATA)
    _corrupt(store.tiers["nas"], nearline)
    with pytest.raises(BlobMissing, match="does not hash"):
        store.read_all(DIGEST, BlobRecord(len(DATA), 1, [nearline]))
    assert store.check(DIGEST, nearline) == "corrupt"
    # Another copy is readable: it is served instead, byte for byte.
    tape = _put(store.tiers["lto"], DATA)
    assert store.read_all(DIGEST, BlobRecord(len(DATA), 1, [nearline, tape]), allow_offline=True) == DATA


def test_corrupt_multi_chunk_copy_raises_before_its_last_chunk(store: BlobStore) -> None:
    big = os.urandom((3 << 20) + 5)
    copy = _put(store.tiers["nas"], big)
    _corrupt(store.tiers["nas"], copy)
    got = []
    with pytest.raises(BlobCorrupt):
        for chunk in store.open_blob(hashlib.sha256(big).hexdigest(), BlobRecord(len(big), 1, [copy])):
            got.append(chunk)
    assert sum(map(len, got)) < len(big)  # the reader never had the whole (wrong) blob


def test_startup_recovery_leaves_tier_gc_rows_to_the_movers(tmp_path: Path) -> None:
    """A gc row of a tier's container (a mover killed after its switch) survives the server's startup recovery,
    so that the next `tier run` deletes the archive instead of forgetting it."""
    from appliance.config import Config, StorageConfig
    from appliance.index.db import StudyIndex
    from appliance.index.env import container_key
    from appliance.store.online import recover

    init_volume(tmp_path / "vol0", "vol0")
    config = Config(storage=StorageConfig(index_path=tmp_path / "index"),
                    volumes=(VolumeConfig("vol0", tmp_path / "vol0", 0.999),))
    index = StudyIndex(tmp_path / "index")
    store = BlobStore.open(config, index=index)
    try:
        index._write(lambda txn: txn.put(container_key("nl", "nl0/archive-1.tar"), b"", db=index.dbs["gc"]))
        recover(store, index)
        assert index.pending_gc() == [("nl", "nl0/archive-1.tar")]
    finally:
        store.close()
        index.close()


class _CorruptAfterFirstChunk(_Bytes):
    """A copy from a tier that fails its digest at the end (BlobStore's hashing reader): not an OSError."""

    def chunks(self, chunk_bytes: int) -> Iterator[bytes]:
        yield self.data[:chunk_bytes]
        raise BlobCorrupt("copy on lto:L1/1 does not hash to its name")


def test_a_large_put_whose_source_fails_leaves_no_torn_bytes(tmp_path: Path) -> None:
    """A recall streams a large blob from tape into a segment; when the tape copy fails its digest half-way, the
    bytes written so far are cut off (not left after the end-of-archive, counted nowhere) and the next put goes
    where it would have."""
    backend = _segments(tmp_path, "vol0", LatencyClass.ONLINE)
    ok = os.urandom(1000)
    first = backend.put(BlobMeta(hashlib.sha256(ok).hexdigest(), len(ok), 1, "CT"), _Bytes(ok))
    folder = tmp_path / "vol0" / "segments"

    def on_disk() -> int:
        return sum(p.stat().st_size for p in folder.iterdir())

    size_before = on_disk()
    big = os.urandom(COPY_CHUNK + (1 << 20))  # streamed chunk by chunk (bounded memory)
    with pytest.raises(BlobCorrupt):
        backend.put(BlobMeta(hashlib.sha256(big).hexdigest(), len(big), 2, "CT"), _CorruptAfterFirstChunk(big))
    assert on_disk() <= size_before + 4096  # (a new segment may have been started: its first bytes at most)
    again = backend.put(BlobMeta(hashlib.sha256(ok).hexdigest(), len(ok), 3, "CT"), _Bytes(ok))
    backend.sync()
    assert backend.read(again) == ok and backend.read(first) == ok
    backend.close()


def test_a_suspect_online_copy_is_hashed_when_read(store: BlobStore) -> None:
    """Online copies are not re-hashed on the hot path, but one that `verify` found corrupt (suspect) is still
    tried when nothing else can be read: then it is hashed like a tier's copy, and wrong bytes are never served."""
    online = _put(store.backends["vol0"], DATA)
    _corrupt(store.backends["vol0"], online)
    with pytest.raises(BlobMissing):
        store.read_all(DIGEST, BlobRecord(len(DATA), 1, [replace(online, state=COPY_SUSPECT)]))
    tape = _put(store.tiers["lto"], DATA)  # the recaller gets the good tape copy instead
    assert store.read_all(DIGEST, BlobRecord(len(DATA), 1, [replace(online, state=COPY_SUSPECT), tape]),
                          allow_offline=True) == DATA
