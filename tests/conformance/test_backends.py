"""The BlobBackend contract (appliance/store/backend.py), one suite for every backend.

Each backend plugs in as one ``Harness`` factory in ``HARNESSES``: today the online segment store on a temp
volume; nearline, tape and S3 add theirs (a MinIO bucket, a tape emulator) and inherit every test. Tests that
hold only for one container format (segment rolling, the tar layout that stock tools read) check
``harness.kind`` and skip for the others.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from appliance.config import VolumeConfig
from appliance.errors import BlobMissing
from appliance.store.backend import BlobBackend, BlobMeta, BlobSource, Location
from appliance.store.segments import (
    COPY_CHUNK,
    END_OF_ARCHIVE,
    SegmentBackend,
    parse_location,
    record_end,
)
from appliance.store.spool import InstanceSpool, SpoolBudget
from appliance.store.volumes import init_volume, open_volume

MiB = 1 << 20


class BytesSource(BlobSource):
    """A blob held in memory, without a file descriptor (the common, small-instance path)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)

    def chunks(self, chunk_bytes: int) -> Iterator[bytes | memoryview]:
        view = memoryview(self.data)
        for start in range(0, len(view), chunk_bytes):
            yield view[start : start + chunk_bytes]


def meta_for(data: bytes, received_ns: int = 1_700_000_000_123_456_789, calling_ae: str = "CT_SCANNER") -> BlobMeta:
    return BlobMeta(hashlib.sha256(data).hexdigest(), len(data), received_ns, calling_ae)


@dataclass
class Harness:
    """What the suite needs to drive one backend beyond the interface itself."""

    kind: str  # "tar-segments", later "nearline", "tape", "s3"
    make: Callable[[int], BlobBackend]  # a backend instance over the same storage (a restart makes a new one)
    container_of: Callable[[Location], str]  # the container a location lives in (what committed_end is asked about)
    spill_dir: Path  # where a file-backed BlobSource keeps its spill file
    opened: list[BlobBackend] = field(default_factory=list)
    # Offset just past a location's record in its container (what an index commit records as committed).
    record_end: Callable[[Location], int] = record_end
    # The raw bytes of one container, and a way to damage one stored blob (a write that never reached the medium
    # whole); None: the segment store's own (a file per container).
    raw_container: Callable[[BlobBackend, str], bytes] | None = None
    corrupt: Callable[[BlobBackend, Location], None] | None = None

    def backend(self, segment_bytes_max: int = 64 * MiB) -> BlobBackend:
        backend = self.make(segment_bytes_max)
        self.opened.append(backend)
        return backend

    def restart(self, old: BlobBackend, segment_bytes_max: int = 64 * MiB) -> BlobBackend:
        """What a process restart does: the old instance is gone (nothing unsynced survives in it)."""
        old.close()
        return self.backend(segment_bytes_max)


def segments_harness(tmp_path: Path) -> Harness:
    init_volume(tmp_path / "vol0", "vol0")
    volume = open_volume(VolumeConfig("vol0", tmp_path / "vol0", 0.999), create_missing=False)
    created: list[str] = []

    def make(segment_bytes_max: int) -> BlobBackend:
        # on_create stands in for the index registration: the suite only needs to know the names.
        return SegmentBackend(volume, segment_bytes_max, on_create=lambda name, _ns: created.append(name))

    return Harness("tar-segments", make, lambda loc: parse_location(loc)[0], volume.tmp_dir)


def nearline_harness(tmp_path: Path) -> Harness:
    """A nearline tier of two volumes, 64 KiB frames (so that blobs span several), zstd level 3."""
    from appliance.config_tiering import TierConfig, TierVolumeConfig
    from tiering.archive import parse_location as archive_location
    from tiering.nearline import init_tier, open_nearline

    tier = TierConfig("near", "nearline", volumes=(TierVolumeConfig("nv0", tmp_path / "nv0", 0.999),
                                                   TierVolumeConfig("nv1", tmp_path / "nv1", 0.999)),
                      frame_bytes=64 << 10)
    init_tier(tier)
    (tmp_path / "spill").mkdir()
    return Harness("nearline", lambda _max: open_nearline(tier), lambda loc: archive_location(loc)[0],
                   tmp_path / "spill")


def tape_harness(tmp_path: Path) -> Harness:
    """A virtual tape library of two small cartridges, 64 KiB drive blocks (each sync pads to one) and 64 KiB zstd
    frames (a blob of a few hundred kB spans several)."""
    from tiering.archive import parse_location as archive_location
    from tiering.tape.backend import TapeBackend, split_container
    from tiering.tape.library import VirtualLibrary

    library = VirtualLibrary(tmp_path / "vtl", "tape1", block_bytes=64 << 10, fsync=False)
    library.create(2, 96 * MiB)

    def make(_segment_bytes_max: int) -> BlobBackend:
        return TapeBackend("tape1", library, compression_level=3, frame_bytes=64 << 10, spill_dir=str(tmp_path))

    def end_of(location: Location) -> int:
        _c, _record, data, stored, _size = archive_location(location)
        return data + stored + (-stored) % 512

    def file_span(container: str) -> tuple[Path, int, int]:
        label, number = split_container(container)
        marks = [int(x) for x in (library.folder / f"{label}.marks").read_text().split()]
        path = library.folder / f"{label}.tape"
        return path, marks[number - 1], marks[number] if number < len(marks) else path.stat().st_size

    def raw_container(_backend: BlobBackend, container: str) -> bytes:
        path, start, end = file_span(container)
        return path.read_bytes()[start:end]

    def corrupt(_backend: BlobBackend, location: Location) -> None:
        container, _record, data, stored, _size = archive_location(location)
        path, start, _end = file_span(container)
        with open(path, "r+b") as fh:
            fh.seek(start + data + stored // 2)
            byte = fh.read(1)
            fh.seek(start + data + stored // 2)
            fh.write(bytes([byte[0] ^ 0xFF]))

    return Harness("tape", make, lambda loc: archive_location(loc)[0], tmp_path, record_end=end_of,
                   raw_container=raw_container, corrupt=corrupt)


def s3_harness(tmp_path: Path, seaweed: Any, s3_bucket: str) -> Harness:
    """An S3 tier on the session's SeaweedFS (tests/seaweed.py), a bucket per test, 5 MiB parts (the smallest the
    API allows) and 64 KiB frames."""
    from appliance.config_tiering import TierConfig
    from tiering.archive import parse_location as archive_location
    from tiering.s3 import S3Backend, init_tier, open_s3

    tier = TierConfig(**{**seaweed.tier("s3t", s3_bucket, "node-a", seaweed.credentials_file(tmp_path / "s3.toml")),
                         "part_bytes": 5 * MiB, "frame_bytes": 64 << 10, "owner": "CONFORMANCE"})
    init_tier(tier)
    (tmp_path / "spill").mkdir()

    def raw_container(backend: BlobBackend, container: str) -> bytes:
        assert isinstance(backend, S3Backend)
        answer = seaweed.client().get_object(Bucket=s3_bucket, Key=backend.object_key(container))
        return bytes(answer["Body"].read())

    return Harness("s3", lambda _max: open_s3(tier), lambda loc: archive_location(loc)[0], tmp_path / "spill",
                   raw_container=raw_container)


HARNESSES: dict[str, Callable[..., Harness]] = {"segments": segments_harness, "nearline": nearline_harness,
                                                "tape": tape_harness, "s3": s3_harness}
# Fixtures a harness needs beyond tmp_path, by name (asked for only when that harness runs).
HARNESS_FIXTURES: dict[str, tuple[str, ...]] = {"s3": ("seaweed", "s3_bucket")}


@pytest.fixture(params=sorted(HARNESSES))
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    fixtures = {name: request.getfixturevalue(name) for name in HARNESS_FIXTURES.get(request.param, ())}
    h = HARNESSES[request.param](tmp_path, **fixtures)
    yield h
    for backend in h.opened:
        backend.close()


def spill_source(h: Harness, data: bytes) -> InstanceSpool:
    """A BlobSource with a fileno: an InstanceSpool whose memory budget is too small, so it spills to a file."""
    spool = InstanceSpool(SpoolBudget(1, 1), str(h.spill_dir), b"")
    spool.write(data)
    assert spool.fileno() is not None and not spool.in_memory
    return spool


def put_synced(backend: BlobBackend, blobs: list[bytes]) -> list[Location]:
    locations = [backend.put(meta_for(b), BytesSource(b)) for b in blobs]
    backend.sync()
    backend.publish(locations)
    return locations


# ---- put -> sync -> read -------------------------------------------------------------------------------


ODD = bytes((i * 7 + 3) % 251 for i in range(100_003))  # odd size, no 512 alignment, no repeating blocks


@pytest.mark.parametrize("with_fileno", [False, True], ids=["memory", "spill-file"])
def test_put_sync_read_is_byte_exact_for_every_source_kind(harness: Harness, with_fileno: bool) -> None:
    backend = harness.backend()
    blobs = [b"", b"x", ODD, os.urandom(COPY_CHUNK + 12_345)]  # empty, tiny, odd, larger than the copy chunk
    locations = []
    sources: list[InstanceSpool] = []
    for data in blobs:
        if with_fileno and len(data) > 1:
            source: BlobSource = spill_source(harness, data)
            sources.append(source)  # type: ignore[arg-type]
        else:
            source = BytesSource(data)
        locations.append(backend.put(meta_for(data), source))
    backend.sync()
    backend.publish(locations)
    for spool in sources:
        spool.discard()
    for data, loc in zip(blobs, locations, strict=True):
        assert backend.read(loc) == data
        assert b"".join(backend.iter_read(loc, 65_537)) == data
        with backend.open(loc, len(data)) as fh:
            assert fh.read() == data


def test_ranged_reads_at_odd_offsets(harness: Harness) -> None:
    backend = harness.backend()
    (loc,) = put_synced(backend, [ODD])
    for offset, length in [(0, 1), (1, 511), (511, 2), (513, 4097), (99_999, 4), (100_002, 1), (12_345, -1),
                           (100_003, 10), (100_003, -1), (99_000, 5_000)]:
        want = ODD[offset:] if length < 0 else ODD[offset : offset + length]
        assert backend.read(loc, offset, length) == want, (offset, length)
    with backend.open(loc, len(ODD)) as fh:
        fh.seek(77_777)
        assert fh.read(333) == ODD[77_777:78_110]
        fh.seek(-5, io.SEEK_END)
        assert fh.read() == ODD[-5:]


def test_a_large_blob_streams_from_a_source_without_fileno(harness: Harness) -> None:
    """Bigger than COPY_CHUNK and not a multiple of it: the streamed branch of put, chunk boundaries included."""
    backend = harness.backend()
    data = os.urandom(2 * COPY_CHUNK + 4_099)
    (loc,) = put_synced(backend, [data])
    assert backend.read(loc) == data
    assert backend.read(loc, COPY_CHUNK - 3, 7) == data[COPY_CHUNK - 3 : COPY_CHUNK + 4]


def test_stat_returns_the_provenance_stored_with_the_blob(harness: Harness) -> None:
    backend = harness.backend()
    metas = [meta_for(b"a" * 10, 1, "AE1"), meta_for(b"", 2_000_000_000_000_000_001, ""),
             meta_for(ODD, 1_712_345_678_901_234_567, "MR_3T_NORTH")]
    blobs = [b"a" * 10, b"", ODD]
    locations = [backend.put(m, BytesSource(b)) for m, b in zip(metas, blobs, strict=True)]
    backend.sync()
    for meta, loc in zip(metas, locations, strict=True):
        assert backend.stat(loc) == meta
    # Provenance is read from the backend itself, not remembered by this instance: a restart still sees it.
    fresh = harness.restart(backend)
    for meta, loc in zip(metas, locations, strict=True):
        assert fresh.stat(loc) == meta


def test_list_shows_every_synced_put_with_its_meta(harness: Harness) -> None:
    backend = harness.backend()
    blobs = [f"blob {i}".encode() * (i + 1) for i in range(20)] + [b""]
    locations = put_synced(backend, blobs)
    listed = {s.location: s.meta for s in backend.list()}
    for data, loc in zip(blobs, locations, strict=True):
        assert listed.get(loc) == meta_for(data), loc


def test_reading_a_bogus_location_raises_blob_missing(harness: Harness) -> None:
    backend = harness.backend()
    (loc,) = put_synced(backend, [ODD])
    container = harness.container_of(loc)
    bogus = [loc.replace(container, "0000000000000000-deadbeef.tar")]
    if harness.kind == "tar-segments":
        _seg, record, data, size = parse_location(loc)
        bogus.append(f"{container}:{record + 10 * MiB}:{data + 10 * MiB}:{size}")  # beyond the segment's end
    for location in bogus:
        with pytest.raises(BlobMissing):
            backend.read(location)
        with pytest.raises(BlobMissing):
            backend.stat(location)


def test_delete_follows_the_deletes_immediately_capability(harness: Harness) -> None:
    backend = harness.backend()
    gone, kept = put_synced(backend, [b"to be deleted" * 100, ODD])
    backend.delete([gone])
    backend.delete([gone])  # a repeated delete (a crash in the middle, retried) is harmless
    assert backend.read(kept) == ODD  # only what was named goes
    if backend.capabilities.deletes_immediately:
        with pytest.raises(BlobMissing):
            backend.read(gone)
        assert gone not in {s.location for s in backend.list()}
    else:
        # Space comes back through reclaim (compaction); the blob may still be listed, and every other blob is
        # untouched, including for new puts after the delete.
        (later,) = put_synced(backend, [b"after the delete"])
        assert backend.read(later) == b"after the delete"
        assert later in {s.location for s in backend.list()}


# ---- recover ---------------------------------------------------------------------------------------------


def container_bytes(h: Harness, backend: BlobBackend, container: str) -> bytes:
    if h.raw_container is not None:
        return h.raw_container(backend, container)
    if h.kind == "nearline":
        from tiering.nearline import NearlineBackend

        assert isinstance(backend, NearlineBackend)
        return Path(backend.archive_file(container)).read_bytes()
    assert isinstance(backend, SegmentBackend), "extend for other backends: their raw container bytes"
    return (Path(backend.dir) / container).read_bytes()


def require_tail_recovery(h: Harness) -> None:
    if h.kind in ("nearline", "s3"):
        pytest.skip(f"a {h.kind} archive is published whole at sync: no tail (the mover's journal names it)")


def test_recover_hands_back_whole_records_beyond_the_committed_end_and_cuts_a_torn_tail(harness: Harness) -> None:
    """Beyond what the index committed: whole records that hash to their name are durable (their index commit may
    have been lost) and come back in ``tail`` in write order; from the first torn or corrupt one, the container is
    cut (it was never made durable, so never acknowledged)."""
    require_tail_recovery(harness)
    backend = harness.backend()
    committed = put_synced(backend, [b"one" * 1000, ODD])
    durable = put_synced(backend, [b"synced, index commit lost" * 50, b"second" * 77])
    corrupt = put_synced(backend, [b"corrupt" * 300])[0]
    after = put_synced(backend, [b"after the corrupt one"])[0]
    container = harness.container_of(committed[0])
    assert {harness.container_of(loc) for loc in [*committed, *durable, corrupt, after]} == {container}
    end = harness.record_end(committed[-1])
    if harness.corrupt is not None:
        harness.corrupt(backend, corrupt)
    elif harness.kind == "tar-segments":  # a write that did not reach the disk whole: its bytes are not its name's
        path = Path(backend.dir) / container
        raw = bytearray(path.read_bytes())
        raw[parse_location(corrupt)[2] + 5] ^= 0xFF
        path.write_bytes(raw)

    fresh = harness.restart(backend)
    result = fresh.recover(lambda c: end if c == container else None)
    assert [s.location for s in result.tail] == durable
    assert [s.meta.digest for s in result.tail] == [meta_for(d).digest for d in
                                                    (b"synced, index commit lost" * 50, b"second" * 77)]
    assert result.counts.get("truncated_bytes", 1) > 0
    assert fresh.read(committed[0]) == b"one" * 1000 and fresh.read(committed[1]) == ODD
    assert fresh.read(durable[1]) == b"second" * 77
    listed = {s.location for s in fresh.list()}
    assert set(committed) | set(durable) <= listed
    for loc in (corrupt, after):
        assert loc not in listed
        with pytest.raises(BlobMissing):
            fresh.read(loc)
    if harness.kind == "tar-segments":
        raw2 = container_bytes(harness, fresh, container)
        cut = record_end(durable[-1])
        assert raw2 == bytes(raw[:cut]) + END_OF_ARCHIVE  # cut exactly there, then sealed


def test_recover_is_idempotent(harness: Harness) -> None:
    require_tail_recovery(harness)
    backend = harness.backend()
    committed = put_synced(backend, [ODD])
    (beyond,) = put_synced(backend, [b"beyond"])
    container = harness.container_of(committed[0])
    fresh = harness.restart(backend)
    first = fresh.recover(lambda c: harness.record_end(committed[0]) if c == container else None)
    assert [s.location for s in first.tail] == [beyond]
    after_first = container_bytes(harness, fresh, container)
    again = harness.restart(fresh)
    # The caller indexed the tail, so the committed end now covers it: nothing more to hand back or cut.
    second = again.recover(lambda c: harness.record_end(beyond) if c == container else None)
    assert second.tail == [] and second.counts.get("truncated_bytes", 0) == 0
    assert container_bytes(harness, again, container) == after_first
    assert again.read(committed[0]) == ODD and again.read(beyond) == b"beyond"


def test_recover_leaves_an_unknown_container_alone(harness: Harness) -> None:
    backend = harness.backend()
    (loc,) = put_synced(backend, [ODD])
    put_synced(backend, [b"tail"])
    container = harness.container_of(loc)
    before = container_bytes(harness, backend, container)
    fresh = harness.restart(backend)
    result = fresh.recover(lambda _c: None)  # the index does not know it (lost or replaced index)
    assert result.counts.get("unknown", 1) >= 1 and result.tail == []
    assert container_bytes(harness, fresh, container) == before
    assert fresh.read(loc) == ODD


def test_after_recover_new_puts_go_to_a_new_container(harness: Harness) -> None:
    """A new run never appends to a container of the previous one (it was sealed by recover)."""
    backend = harness.backend()
    (old,) = put_synced(backend, [ODD])
    container = harness.container_of(old)
    fresh = harness.restart(backend)
    fresh.recover(lambda c: harness.record_end(old) if c == container else None)
    (new,) = put_synced(fresh, [b"new run"])
    assert harness.container_of(new) != container
    assert fresh.read(old) == ODD and fresh.read(new) == b"new run"


# ---- the tar segment format --------------------------------------------------------------------------


def require_tar_segments(h: Harness) -> SegmentBackend:
    if h.kind != "tar-segments":
        pytest.skip("a property of the tar segment format")
    backend = h.backend(MiB)
    assert isinstance(backend, SegmentBackend)
    return backend


def fill_segments(backend: SegmentBackend, count: int = 12, size: int = 200_001) -> dict[str, bytes]:
    blobs = {}
    for i in range(count):
        data = i.to_bytes(4, "big") + os.urandom(size - 4)
        blobs[hashlib.sha256(data).hexdigest()] = data
        backend.put(meta_for(data, received_ns=1_700_000_000_000_000_000 + i), BytesSource(data))
    backend.sync()
    return blobs


def test_a_segment_rolls_at_segment_bytes_max_and_sealed_segments_end_with_end_of_archive(harness: Harness) -> None:
    backend = require_tar_segments(harness)
    fill_segments(backend)
    sealed = backend.take_sealed()
    assert len(sealed) >= 2, "12 x 200 kB in 1 MiB segments must roll"
    assert backend.active not in sealed
    for name in sealed:
        raw = (Path(backend.dir) / name).read_bytes()
        assert raw.endswith(END_OF_ARCHIVE)
        records = list(backend.list_segment(name))
        assert records and raw[: record_end(records[-1].location)] + END_OF_ARCHIVE == raw
        # Rolling happens before a record would pass the limit: no sealed segment holds another full record.
        assert len(raw) - len(END_OF_ARCHIVE) + 200_001 > MiB


def test_a_sealed_segment_never_exceeds_segment_bytes_max(harness: Harness) -> None:
    """Records sized so that the last one fits with 512 bytes to spare: the 1024-byte end-of-archive must still
    fit (the roll check reserves one block, the seal writes two)."""
    backend = require_tar_segments(harness)
    first = backend.put(meta_for(b"a"), BytesSource(b"a"))
    header = parse_location(first)[2] - parse_location(first)[1]
    # After the first record (header + 512), one record whose data ends exactly 512 bytes before the limit.
    used = record_end(first)
    size = MiB - used - header - 512
    size -= size % 512
    backend.put(meta_for(b"b" * size), BytesSource(b"b" * size))
    backend.put(meta_for(b"c"), BytesSource(b"c"))  # does not fit: rolls, sealing the first segment
    backend.sync()
    sealed = backend.take_sealed()
    assert sealed  # "b" or "c" rolled
    for name in sealed:
        assert os.path.getsize(Path(backend.dir) / name) <= MiB


def test_stock_tar_lists_and_extracts_valid_files_named_by_their_sha256(harness: Harness, tmp_path: Path) -> None:
    backend = require_tar_segments(harness)
    blobs = fill_segments(backend)
    backend.put(meta_for(b""), BytesSource(b""))  # an empty member too
    blobs[hashlib.sha256(b"").hexdigest()] = b""
    backend.sync()
    backend.take_sealed()
    fresh = harness.restart(backend, MiB)
    fresh.recover(lambda _c: None)  # nothing is sealed by this; the active segment stays unsealed
    seen: dict[str, bytes] = {}
    segments = [s for s in sorted(os.listdir(backend.dir)) if s.endswith(".tar")]
    for n, name in enumerate(segments):
        path = Path(backend.dir) / name
        if not path.read_bytes().endswith(END_OF_ARCHIVE):
            continue  # the unsealed active segment: GNU tar would complain about the missing end-of-archive
        listing = subprocess.run(["tar", "-tf", str(path)], capture_output=True, text=True, check=True)
        assert listing.stderr == ""
        names = listing.stdout.split()
        assert names and all(len(m) == 68 and m.endswith(".dcm") for m in names)
        out = tmp_path / f"x{n}"
        out.mkdir()
        subprocess.run(["tar", "-xf", str(path), "-C", str(out)], capture_output=True, check=True)
        assert sorted(os.listdir(out)) == sorted(names)
        for member in names:
            content = (out / member).read_bytes()
            assert hashlib.sha256(content).hexdigest() + ".dcm" == member
            seen[member[:64]] = content
        with tarfile.open(path) as archive:  # Python's reader agrees, member by member
            members = archive.getmembers()
            assert [m.name for m in members] == names
            for m in members:
                fh = archive.extractfile(m)
                assert fh is not None and hashlib.sha256(fh.read()).hexdigest() == m.name[:64]
    sealed_digests = set(seen)
    assert sealed_digests and sealed_digests <= set(blobs)
    assert all(seen[d] == blobs[d] for d in sealed_digests)


def test_a_sealed_segment_after_recover_is_read_by_stock_tar(harness: Harness, tmp_path: Path) -> None:
    """recover seals the active segment of the previous run (after its last whole record): tar reads it too."""
    backend = require_tar_segments(harness)
    locations = put_synced(backend, [ODD, b"", b"last"])
    (torn,) = put_synced(backend, [b"torn by the power loss" * 40])
    container = parse_location(locations[0])[0]
    path = Path(backend.dir) / container
    os.truncate(path, parse_location(torn)[2] + 100)  # the last record's data only partly reached the disk
    fresh = harness.restart(backend, MiB)
    fresh.recover(lambda c: record_end(locations[-1]) if c == container else None)
    listing = subprocess.run(["tar", "-tf", str(path)], capture_output=True, text=True, check=True)
    assert listing.stdout.split() == [hashlib.sha256(b).hexdigest() + ".dcm" for b in (ODD, b"", b"last")]
    assert listing.stderr == ""
