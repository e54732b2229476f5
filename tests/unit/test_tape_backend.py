"""The tape backend on a virtual library (tiering/tape/backend.py): cartridges that fill, archives read back with
GNU tar, dd and zstd alone, crashes (a truncated cartridge, kill -9 mid-write) recovered, and two processes sharing
the drive."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.errors import BlobMissing
from appliance.store.backend import BlobMeta, BlobSource
from tiering.archive import parse_location, read_catalog
from tiering.tape.backend import TapeBackend, split_container
from tiering.tape.library import VirtualLibrary
from tiering.tape.verify import verify_cartridge

BLOCK = 16 << 10
FRAME = 64 << 10
REPO = Path(__file__).resolve().parents[2]


class Bytes(BlobSource):
    def __init__(self, data: bytes) -> None:
        self.data, self.size = data, len(data)

    def chunks(self, chunk_bytes: int) -> Iterator[bytes]:
        for start in range(0, len(self.data), chunk_bytes):
            yield self.data[start : start + chunk_bytes]


def blob(i: int, size: int = 100_000) -> bytes:
    """Incompressible and reproducible in another process."""
    return random.Random(i).randbytes(size)


def meta(data: bytes, i: int = 0) -> BlobMeta:
    return BlobMeta(hashlib.sha256(data).hexdigest(), len(data), 1_700_000_000_000_000_000 + i, "CT_1")


def library(tmp_path: Path, cartridges: int = 2, capacity: int = 64 << 20, **kw: float) -> VirtualLibrary:
    lib = VirtualLibrary(tmp_path / "vtl", "tape1", block_bytes=BLOCK, fsync=False, **kw)  # type: ignore[arg-type]
    if not lib.exists():
        lib.create(cartridges, capacity)
    return lib


def backend(lib: VirtualLibrary) -> TapeBackend:
    return TapeBackend("tape1", lib, compression_level=3, frame_bytes=FRAME)


def tape_file(lib: VirtualLibrary, container: str) -> bytes:
    label, number = split_container(container)
    marks = [int(x) for x in (lib.folder / f"{label}.marks").read_text().split()]
    raw = (lib.folder / f"{label}.tape").read_bytes()
    return raw[marks[number - 1] : marks[number] if number < len(marks) else len(raw)]


def test_a_cartridge_that_fills_mid_run_closes_its_archive_and_continues_on_the_next(tmp_path: Path) -> None:
    lib = library(tmp_path, cartridges=3, capacity=2 << 20)
    tape = backend(lib)
    stored: dict[str, bytes] = {}
    containers = []
    for study in range(6):  # 6 studies of 5 x 100 kB, synced per study: 3 MB on 2 MiB cartridges
        containers.append(tape.begin_container(f"study{study}"))
        for i in range(5):
            data = blob(study * 10 + i)
            stored[tape.put(meta(data), Bytes(data))] = data
        tape.sync()
    tape.seal()
    labels = {split_container(parse_location(loc)[0])[0] for loc in stored}
    assert labels == {"VTL001L6", "VTL002L6"}
    for cart in lib.cartridges():
        assert cart.used_bytes <= cart.capacity_bytes
    for loc, data in stored.items():  # every blob readable, byte for byte, wherever it landed
        assert tape.read(loc) == data
    # The full cartridge's archive was closed with its catalog, and it lists exactly the members written there.
    first = "VTL001L6/1"
    raw = tape_file(lib, first)
    catalog = read_catalog(lambda o, n: raw[o : o + n], len(raw))
    assert sorted(m.meta.digest for m in catalog) == sorted(
        hashlib.sha256(d).hexdigest() for loc, d in stored.items() if loc.startswith(first + ":"))
    report = verify_cartridge(tape, "VTL001L6")
    assert report.ok and report.members == len(catalog)


def test_archives_stay_open_across_syncs_and_gnu_tar_reads_them(tmp_path: Path) -> None:
    lib = library(tmp_path)
    tape = backend(lib)
    datas = [blob(i, 30_000 + i) for i in range(7)]
    locations = []
    for data in datas:
        locations.append(tape.put(meta(data), Bytes(data)))
        tape.sync()  # each sync pads to a drive block with a filler tar skips
    assert {parse_location(loc)[0] for loc in locations} == {"VTL001L6/1"}
    tape.seal()
    path = tmp_path / "archive.tar"
    path.write_bytes(tape_file(lib, "VTL001L6/1"))
    listing = subprocess.run(["tar", "-tf", str(path)], capture_output=True, text=True, check=True)
    assert listing.stderr == ""
    assert listing.stdout.split() == [hashlib.sha256(d).hexdigest() + ".dcm.zst" for d in datas] + ["catalog.json"]


@pytest.mark.skipif(shutil.which("zstd") is None, reason="needs the zstd command")
def test_a_cartridge_reads_back_with_dd_tar_zstd_and_the_catalog_alone(tmp_path: Path) -> None:
    lib = library(tmp_path)
    tape = backend(lib)
    datas = {hashlib.sha256(d).hexdigest(): d for d in (blob(i, 150_000) for i in range(4))}
    for data in datas.values():
        tape.put(meta(data), Bytes(data))
    tape.sync()
    tape.seal()
    cartridge = lib.folder / "VTL001L6.tape"
    marks = [int(x) for x in (lib.folder / "VTL001L6.marks").read_text().split()]
    out = tmp_path / "out"
    out.mkdir()
    # The admin's way: `mt fsf 1` on a tape; on a cartridge file, dd skips to the filemark's block.
    skip, count = marks[0] // BLOCK, (marks[1] - marks[0]) // BLOCK
    shell = f"dd if={cartridge} bs={BLOCK} skip={skip} count={count} status=none | tar -xf - -C {out} catalog.json"
    subprocess.run(shell, shell=True, check=True)
    catalog = json.loads((out / "catalog.json").read_text())
    for entry in catalog["members"]:
        start = marks[0] + entry["data_offset"]
        piece = (f"dd if={cartridge} iflag=skip_bytes,count_bytes skip={start} count={entry['stored_bytes']} "
                 "status=none | zstd -d -q -c")
        plain = subprocess.run(piece, shell=True, check=True, capture_output=True).stdout
        assert plain == datas[entry["digest"]]
    assert len(catalog["members"]) == len(datas)


def test_a_truncated_cartridge_is_cut_back_to_its_last_whole_member_and_closed(tmp_path: Path) -> None:
    lib = library(tmp_path)
    tape = backend(lib)
    datas = [blob(i, 60_000) for i in range(6)]
    locations = []
    for data in datas:
        locations.append(tape.put(meta(data), Bytes(data)))
        tape.sync()
    container = parse_location(locations[0])[0]
    # Power loss while the last member was being written: the cartridge file ends inside its data.
    _c, _record, data_offset, stored, _size = parse_location(locations[-1])
    cartridge = lib.folder / "VTL001L6.tape"
    marks = [int(x) for x in (lib.folder / "VTL001L6.marks").read_text().split()]
    os.truncate(cartridge, marks[-1] + data_offset + stored // 2)
    tape.close()

    committed = parse_location(locations[1])
    fresh = backend(lib)
    result = fresh.recover(lambda c: committed[2] + committed[3] + (-committed[3]) % 512 if c == container else None)
    assert [s.location for s in result.tail] == locations[2:5]
    assert result.counts["closed"] == 1 and result.counts["truncated_bytes"] > 0
    for loc, data in zip(locations[:5], datas[:5], strict=True):
        assert fresh.read(loc) == data
    with pytest.raises(BlobMissing):
        fresh.read(locations[5])
    path = tmp_path / "recovered.tar"
    path.write_bytes(tape_file(lib, container))
    listing = subprocess.run(["tar", "-tf", str(path)], capture_output=True, text=True, check=True)
    assert listing.stderr == "" and listing.stdout.split()[-1] == "catalog.json"
    assert len(listing.stdout.split()) == 6
    assert verify_cartridge(fresh, "VTL001L6").ok
    again = fresh.recover(lambda c: 10**12)  # idempotent: nothing is open any more
    assert again.tail == [] and again.counts["closed"] == 0
    new = fresh.put(meta(b"next run"), Bytes(b"next run"))
    fresh.sync()
    assert parse_location(new)[0] == "VTL001L6/2" and fresh.read(new) == b"next run"


CHILD_WRITER = textwrap.dedent("""
    import hashlib, random, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from appliance.store.backend import BlobMeta, BlobSource
    from tiering.tape.backend import TapeBackend
    from tiering.tape.library import VirtualLibrary

    class Bytes(BlobSource):
        def __init__(self, data): self.data, self.size = data, len(data)
        def chunks(self, n):
            for s in range(0, len(self.data), n): yield self.data[s:s + n]

    lib = VirtualLibrary(Path(sys.argv[1]), "tape1", block_bytes=16 << 10, fsync=False)
    tape = TapeBackend("tape1", lib, frame_bytes=64 << 10)
    i = 0
    while True:
        data = random.Random(i).randbytes(80_000)
        loc = tape.put(BlobMeta(hashlib.sha256(data).hexdigest(), len(data), 1, "CT"), Bytes(data))
        if i % 3 == 2:
            tape.sync()
            print(i, loc, flush=True)
        i += 1
""")


def test_kill_9_while_writing_loses_nothing_that_was_synced(tmp_path: Path) -> None:
    lib = library(tmp_path, capacity=1 << 30)
    child = subprocess.Popen([sys.executable, "-c", CHILD_WRITER, str(lib.folder), str(REPO)],
                             stdout=subprocess.PIPE, text=True)
    synced: list[tuple[int, str]] = []
    assert child.stdout is not None
    try:
        while len(synced) < 6:
            line = child.stdout.readline()
            assert line, "the writer died"
            number, loc = line.split()
            synced.append((int(number), loc))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    container = parse_location(synced[0][1])[0]
    last = parse_location(synced[-1][1])
    fresh = backend(lib)
    result = fresh.recover(lambda c: last[2] + last[3] + (-last[3]) % 512 if c == container else None)
    for number, loc in synced:  # every put acknowledged by a sync is there, byte for byte
        assert fresh.read(loc) == random.Random(number).randbytes(80_000)
    for stored in result.tail:  # whatever else survived is whole
        assert fresh.sha256(stored.location) == stored.meta.digest
    assert verify_cartridge(fresh, "VTL001L6").ok


CHILD_READER = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from tiering.tape.backend import TapeBackend
    from tiering.tape.library import VirtualLibrary

    lib = VirtualLibrary(Path(sys.argv[1]), "tape1", block_bytes=16 << 10, fsync=False)
    tape = TapeBackend("tape1", lib, frame_bytes=64 << 10)
    want = bytes.fromhex(sys.argv[4])
    for _ in range(int(sys.argv[5])):
        import hashlib
        assert hashlib.sha256(tape.read(sys.argv[3])).digest() == want
    print("ok", flush=True)
""")


def test_a_reader_process_and_a_writer_share_the_drive(tmp_path: Path) -> None:
    """A recall (another process) reads from the cartridge between the writer's puts: every drive operation holds
    the drive lock, and the writer repositions to the end of data before each append."""
    lib = library(tmp_path)
    tape = backend(lib)
    old = blob(999, 200_000)
    old_loc = tape.put(meta(old), Bytes(old))
    tape.sync()
    tape.seal()
    reader = subprocess.Popen([sys.executable, "-c", CHILD_READER, str(lib.folder), str(REPO), old_loc,
                               hashlib.sha256(old).hexdigest(), "40"], stdout=subprocess.PIPE, text=True)
    written = {}
    for i in range(40):
        data = blob(i, 50_000)
        written[tape.put(meta(data), Bytes(data))] = data
        tape.sync()
    assert reader.communicate(timeout=120)[0].strip() == "ok" and reader.returncode == 0
    for loc, data in written.items():
        assert tape.read(loc) == data
    tape.seal()
    assert verify_cartridge(tape, "VTL001L6").ok


HOLDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from tiering.tape.library import VirtualLibrary

    lib = VirtualLibrary(Path(sys.argv[1]), "tape1", block_bytes=16 << 10, fsync=False)
    with lib.session("VTL002L6"):
        print("holding", flush=True)
        sys.stdin.readline()
""")


def test_the_drive_lock_excludes_another_process_and_a_cartridge_swap_takes_load_time(tmp_path: Path) -> None:
    lib = library(tmp_path, load_s=0.2)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lib.folder), str(REPO)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdin is not None
    assert holder.stdout.readline().strip() == "holding"
    entered = threading.Event()

    def use_drive() -> None:
        with lib.session("VTL001L6"):
            entered.set()

    start = time.monotonic()
    thread = threading.Thread(target=use_drive)
    thread.start()
    assert not entered.wait(0.5)  # the other process holds the drive
    holder.stdin.write("\n")
    holder.stdin.flush()
    holder.wait(30)
    assert entered.wait(30)
    thread.join()
    assert lib.loaded() == "VTL001L6"
    # VTL002L6 was loaded by the holder, so ours was swapped in: unload + load, load_s simulated.
    assert time.monotonic() - start >= 0.5 + 0.2
    swap = time.monotonic()
    lib.load("VTL002L6")
    assert time.monotonic() - swap >= 0.2


def test_verify_checks_the_index_copies_against_the_tape(tmp_path: Path) -> None:
    lib = library(tmp_path)
    tape = backend(lib)
    data = blob(1)
    loc = tape.put(meta(data), Bytes(data))
    tape.sync()
    tape.seal()
    digest = meta(data).digest
    _c, record, data_offset, stored, size = parse_location(loc)
    elsewhere = f"VTL001L6/1:{record + 512}:{data_offset + 512}:{stored}:{size}"
    report = verify_cartridge(tape, "VTL001L6", [(digest, loc), (digest, elsewhere), (digest, "VTL002L6/1:0:512:1:1")])
    assert report.index_copies == 2  # the copy on another cartridge is not this cartridge's business
    assert [f.where for f in report.findings] == [elsewhere]


def test_ltfs_mode_writes_one_tar_file_per_archive(tmp_path: Path) -> None:
    from appliance.config_tiering import TierConfig
    from tiering.tape.backend import open_library
    from tiering.tape.library import VolumeLabel

    mount = tmp_path / "ltfs"
    mount.mkdir()
    tier = TierConfig("tape1", "tape", mode="ltfs", path=mount, cartridge_bytes=64 << 20, frame_bytes=FRAME)
    lib = open_library(tier)
    with lib.session(None) as drive:
        lib.write_label(drive, VolumeLabel("LTF001L6", "tape1"))
    tape = TapeBackend("tape1", lib, frame_bytes=FRAME)
    datas = [blob(i, 70_000) for i in range(3)]
    locations = [tape.put(meta(d), Bytes(d)) for d in datas]
    tape.sync()
    assert [parse_location(loc)[0] for loc in locations] == ["LTF001L6/1"] * 3
    tape.seal()
    later = tape.put(meta(b"later"), Bytes(b"later"))
    tape.sync()
    assert parse_location(later)[0] == "LTF001L6/2"
    for loc, data in zip(locations, datas, strict=True):
        assert tape.read(loc) == data
    listing = subprocess.run(["tar", "-tf", str(mount / "1.tar")], capture_output=True, text=True, check=True)
    assert listing.stdout.split()[-1] == "catalog.json" and listing.stderr == ""
    assert [c.archives for c in lib.cartridges()] == [2]
    # A crash: the open archive 2.tar is cut back and closed by recover.
    tape.close()
    fresh = TapeBackend("tape1", lib, frame_bytes=FRAME)
    result = fresh.recover(lambda c: 0 if c == "LTF001L6/2" else None)
    assert [s.location for s in result.tail] == [later]
    assert fresh.read(later) == b"later"
    listing = subprocess.run(["tar", "-tf", str(mount / "2.tar")], capture_output=True, text=True, check=True)
    assert listing.stdout.split()[-1] == "catalog.json"


def test_an_archive_rolls_at_archive_bytes_max_between_studies(tmp_path: Path) -> None:
    lib = library(tmp_path)
    tape = TapeBackend("tape1", lib, frame_bytes=FRAME, archive_bytes_max=1 << 20)
    containers = []
    for study in range(4):  # 2 x 300 kB per study: the archive passes 1 MiB during the second study
        containers.append(tape.begin_container(f"s{study}"))
        locations = [tape.put(meta(d), Bytes(d)) for d in (blob(study * 2, 300_000), blob(study * 2 + 1, 300_000))]
        assert {parse_location(loc)[0] for loc in locations} == {containers[-1]}  # a study is never split
        tape.sync()
    assert containers == ["VTL001L6/1", "VTL001L6/1", "VTL001L6/2", "VTL001L6/2"]
    tape.seal()
    assert [c.archives for c in lib.cartridges()][0] == 2 and verify_cartridge(tape, "VTL001L6").ok


def test_a_crash_between_the_catalog_and_the_filemark_only_adds_the_filemark(tmp_path: Path) -> None:
    lib = library(tmp_path)
    tape = backend(lib)
    datas = [blob(i, 40_000) for i in range(3)]
    locations = [tape.put(meta(d), Bytes(d)) for d in datas]
    tape.sync()
    arch = tape._archive
    assert arch is not None
    with tape._writing(arch):  # what _finish_archive does, up to the filemark the crash prevented
        arch.writer.finish()
        arch.sink.buffer += bytes(arch.sink.block_bytes - arch.sink.partial())
        arch.sink.flush_blocks()
    tape.close()
    before = tape_file(lib, "VTL001L6/1")
    fresh = backend(lib)
    first = parse_location(locations[0])
    result = fresh.recover(lambda c: first[2] + first[3] + (-first[3]) % 512 if c == "VTL001L6/1" else None)
    assert [s.location for s in result.tail] == locations[1:]
    assert result.counts["truncated_bytes"] == 0 and result.counts["closed"] == 1
    assert tape_file(lib, "VTL001L6/1") == before  # not rewritten
    assert [c.archives for c in lib.cartridges()][0] == 1 and verify_cartridge(fresh, "VTL001L6").ok


def test_init_tier_creates_labelled_cartridges_once_and_refuses_another_tiers_library(tmp_path: Path) -> None:
    from appliance.config_tiering import TierConfig
    from appliance.errors import ConfigError
    from tiering.tape.backend import init_tier, open_tape

    tier = TierConfig("tape1", "tape", path=tmp_path / "vtl", cartridges=2, cartridge_bytes=8 << 20)
    assert "2 cartridge(s) created (VTL001L6..VTL002L6)" in init_tier(tier)
    assert "0 cartridge(s) created" in init_tier(tier)
    more = TierConfig("tape1", "tape", path=tmp_path / "vtl", cartridges=3, cartridge_bytes=8 << 20)
    assert "1 cartridge(s) created (VTL003L6..VTL003L6)" in init_tier(more)
    usage = open_tape(more).usage()
    assert [(u.name, u.capacity_bytes, u.accepting) for u in usage] == [
        ("VTL001L6", 8 << 20, True), ("VTL002L6", 8 << 20, True), ("VTL003L6", 8 << 20, True)]
    with pytest.raises(ConfigError, match="tape1"):
        init_tier(TierConfig("other", "tape", path=tmp_path / "vtl"))


def test_a_damaged_member_is_never_served_and_no_descriptor_leaks(tmp_path: Path) -> None:
    lib = library(tmp_path)
    tape = backend(lib)
    good, bad = blob(1, 200_000), blob(2, 200_000)
    good_loc, bad_loc = (tape.put(meta(d), Bytes(d)) for d in (good, bad))
    tape.sync()
    _c, _record, data_offset, stored, _size = parse_location(bad_loc)
    marks = [int(x) for x in (lib.folder / "VTL001L6.marks").read_text().split()]
    with open(lib.folder / "VTL001L6.tape", "r+b") as fh:
        fh.seek(marks[0] + data_offset + stored - 10)  # the last frame of the member
        fh.write(b"\xff\xfe")
    fds_before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(BlobMissing):
            tape.read(bad_loc)
        with pytest.raises(BlobMissing):
            tape.sha256(bad_loc)
        with pytest.raises(BlobMissing):
            tape.read("VTL001L6/7:0:512:10:10")  # no such tape file
        assert tape.read(good_loc) == good
    assert len(os.listdir("/proc/self/fd")) == fds_before
    report = verify_cartridge(tape, "VTL001L6")
    assert [f.where for f in report.findings] == ["VTL001L6/1", bad_loc]  # open archive; the damaged member


def test_listing_a_cartridge_reads_headers_and_spaces_over_the_data(tmp_path: Path) -> None:
    """list() (index rebuild) reads each member's headers and spaces over its data, as MTFSR does on a drive."""
    from tiering.tape.drive import FileDrive

    read_bytes = [0]

    class CountingDrive(FileDrive):
        def read(self, size_max: int) -> bytes:
            data = super().read(size_max)
            read_bytes[0] += len(data)
            return data

    class CountingLibrary(VirtualLibrary):
        def _drive(self, label: str, capacity_bytes: int) -> FileDrive:
            return CountingDrive(self.folder / f"{label}.tape", capacity_bytes, self.block_bytes, fsync=False)

    lib = library(tmp_path)
    tape = backend(lib)
    datas = [blob(i, 1 << 20) for i in range(12)]
    locations = [tape.put(meta(d), Bytes(d)) for d in datas]
    tape.sync()
    tape.seal()
    counting = TapeBackend("tape1", CountingLibrary(lib.folder, "tape1", block_bytes=BLOCK, fsync=False))
    listed = [s.location for s in counting.list()]
    assert listed == locations
    assert read_bytes[0] < sum(map(len, datas)) // 10  # headers (a block each) and the catalog, not the data
