"""The archive container (tiering/archive.py): byte-exact round trips, ranged reads, stock tools, corruption."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from appliance.errors import BlobCorrupt, BlobMissing
from appliance.store.backend import BlobMeta
from tiering.archive import (
    BLOCK,
    CODEC_NONE,
    CODEC_ZSTD,
    END_OF_ARCHIVE,
    ArchiveTruncated,
    ArchiveWriter,
    Member,
    MemberReader,
    ReadAt,
    iter_member,
    make_location,
    member_at,
    parse_location,
    read_catalog,
    read_range,
    scan_archive,
)

FRAME = 64 << 10
ODD = bytes((i * 7 + 3) % 251 for i in range(100_003))
TEXTISH = b"".join(b"(0010,0010) PN [DOE^JOHN %06d]\n" % i for i in range(20_000))  # compressible, 5+ frames


def meta_for(data: bytes, received_ns: int = 1_700_000_000_123_456_789, ae: str = "CT_SCANNER") -> BlobMeta:
    return BlobMeta(hashlib.sha256(data).hexdigest(), len(data), received_ns, ae, "overwrite")


def chunked(data: bytes, size: int = 10_007) -> Iterator[memoryview]:
    view = memoryview(data)
    for start in range(0, len(data), size):
        yield view[start : start + size]


BLOBS = [b"", b"x", ODD, TEXTISH, os.urandom(3 * FRAME + 17)]  # empty, 1 byte, odd, many frames, incompressible


def write_archive(path: Path, blobs: list[bytes], level: int = 3, **kw: int) -> list[Member]:
    with open(path, "wb") as fh:
        writer = ArchiveWriter(fh, compression_level=level, frame_bytes=FRAME, spill_dir=str(path.parent), **kw)
        members = [writer.add(meta_for(b), chunked(b)) for b in blobs]
        writer.finish()
        assert writer.bytes_written == fh.tell()
    assert os.path.getsize(path) == writer.bytes_written
    return members


def reader(path: Path) -> ReadAt:
    data = path.read_bytes()
    return lambda offset, length: data[offset : offset + length]


@pytest.mark.parametrize("level", [0, 1, 3])
def test_round_trip_is_byte_exact_and_every_index_agrees(tmp_path: Path, level: int) -> None:
    path = tmp_path / "a.tar"
    members = write_archive(path, BLOBS, level)
    read_at = reader(path)
    for data, m in zip(BLOBS, members, strict=True):
        assert m.codec == (CODEC_NONE if level == 0 else CODEC_ZSTD)
        assert m.meta == meta_for(data) and m.record_offset % BLOCK == 0 and m.data_offset % BLOCK == 0
        container, record, data_offset, stored, size = parse_location(make_location("vol/x.tar", m))
        assert (container, record, data_offset, stored, size) == ("vol/x.tar", m.record_offset, m.data_offset,
                                                                   m.stored_bytes, len(data))
        again = member_at(read_at, record, data_offset)
        assert again == m
        assert read_range(read_at, again) == data
        assert b"".join(iter_member(read_at, again)) == data
    with open(path, "rb") as fh:
        assert list(scan_archive(fh)) == members
    assert read_catalog(read_at, os.path.getsize(path)) == members
    padded = path.read_bytes() + b"\x00" * (64 << 10)  # a tape writer's last block padded with zeros
    assert read_catalog(lambda o, n: padded[o : o + n], len(padded)) == members
    assert path.read_bytes().endswith(END_OF_ARCHIVE)
    if level:
        assert members[3].stored_bytes < len(TEXTISH) // 5 and len(members[3].frames) == -(-len(TEXTISH) // FRAME)
        assert len(members[0].frames) == 1  # an empty blob is one empty frame: `zstd -d` restores an empty file


def test_ranged_reads_across_frame_boundaries(tmp_path: Path) -> None:
    path = tmp_path / "a.tar"
    (m,) = write_archive(path, [TEXTISH])
    calls: list[tuple[int, int]] = []
    data = path.read_bytes()

    def read_at(offset: int, length: int) -> bytes:
        calls.append((offset, length))
        return data[offset : offset + length]

    for offset, length in [(0, 1), (FRAME - 1, 2), (FRAME, FRAME), (FRAME - 5, 2 * FRAME + 10), (3 * FRAME + 1, -1),
                           (len(TEXTISH) - 1, 1), (len(TEXTISH), 5), (12_345, 0), (0, -1)]:
        calls.clear()
        want = TEXTISH[offset:] if length < 0 else TEXTISH[offset : offset + length]
        assert read_range(read_at, m, offset, length) == want, (offset, length)
        if want:  # only the frames holding the range were read
            first, last = offset // FRAME, (offset + len(want) - 1) // FRAME
            assert [c[1] for c in calls] == list(m.frames[first : last + 1])


def test_a_writer_over_an_append_only_stream_writes_the_same_bytes(tmp_path: Path) -> None:
    """The tape case: a sink with write() only, in small pieces (short writes), and a scan from a pipe."""

    class Trickle:
        def __init__(self) -> None:
            self.out = bytearray()

        def write(self, data: bytes | memoryview) -> int:
            piece = bytes(data[:4096])
            self.out += piece
            return len(piece)

    sink = Trickle()
    writer = ArchiveWriter(sink, start_offset=10 << 20, compression_level=3, frame_bytes=FRAME)
    members = [writer.add(meta_for(b), chunked(b)) for b in BLOBS]
    writer.finish()
    assert writer.sink_position == (10 << 20) + len(sink.out)
    path = tmp_path / "f.tar"
    assert write_archive(path, BLOBS) == members
    on_file = path.read_bytes()
    # Byte for byte the same (the catalog header's mtime is the time of writing: compared apart from it).
    end = members[-1].end
    assert bytes(sink.out[:end]) == on_file[:end] and len(sink.out) == len(on_file)
    assert bytes(sink.out[end + BLOCK :]) == on_file[end + BLOCK :]
    with subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE) as cat:
        assert cat.stdout is not None
        assert list(scan_archive(cat.stdout)) == members  # type: ignore[arg-type]


def test_a_member_spills_to_a_file_beyond_the_memory_bound(tmp_path: Path) -> None:
    path = tmp_path / "a.tar"
    data = os.urandom(5 * FRAME)
    (m,) = write_archive(path, [data], spool_bytes_max=FRAME)
    assert read_range(reader(path), m) == data
    assert os.listdir(tmp_path) == ["a.tar"]  # the spill file is gone


def test_stock_tar_and_zstd_restore_the_original_files(tmp_path: Path) -> None:
    path = tmp_path / "a.tar"
    members = write_archive(path, BLOBS)
    listing = subprocess.run(["tar", "-tf", str(path)], capture_output=True, text=True, check=True)
    assert listing.stderr == ""
    assert listing.stdout.split() == [m.name for m in members] + ["catalog.json"]
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["tar", "-xf", str(path), "-C", str(out)], capture_output=True, check=True)
    for data, m in zip(BLOBS, members, strict=True):
        packed = (out / m.name).read_bytes()
        if shutil.which("zstd"):
            restored = subprocess.run(["zstd", "-d", "-c", str(out / m.name)], capture_output=True,
                                      check=True).stdout
        else:
            restored = zstandard.ZstdDecompressor().decompressobj(read_across_frames=True).decompress(packed)
        assert restored == data
        assert hashlib.sha256(restored).hexdigest() + ".dcm.zst" == m.name


def test_stock_tar_extracts_raw_members_as_they_are(tmp_path: Path) -> None:
    path = tmp_path / "a.tar"
    members = write_archive(path, BLOBS, level=0)
    out = tmp_path / "x"
    out.mkdir()
    run = subprocess.run(["tar", "-xf", str(path), "-C", str(out)], capture_output=True, check=True)
    assert run.stderr == b""
    for data, m in zip(BLOBS, members, strict=True):
        assert m.name.endswith(".dcm") and (out / m.name).read_bytes() == data


def corrupt(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x40
    path.write_bytes(raw)


@pytest.mark.parametrize("where", ["first frame", "last frame", "frame header"])
def test_a_corrupted_byte_in_a_frame_is_detected_never_served(tmp_path: Path, where: str) -> None:
    path = tmp_path / "a.tar"
    (m,) = write_archive(path, [TEXTISH])
    offset = {"first frame": m.data_offset + m.frames[0] // 2, "last frame": m.data_offset + m.stored_bytes - 2,
              "frame header": m.data_offset + 5}[where]
    corrupt(path, offset)
    read_at = reader(path)
    with pytest.raises(BlobCorrupt):
        b"".join(iter_member(read_at, m))
    with pytest.raises(BlobCorrupt):
        read_range(read_at, m)
    # A range in a frame left intact is still served (the frames are independent).
    if where == "last frame":
        assert read_range(read_at, m, 0, FRAME) == TEXTISH[:FRAME]


def test_a_corrupted_raw_member_is_detected_when_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "a.tar"
    (m,) = write_archive(path, [ODD], level=0)
    corrupt(path, m.data_offset + 1000)
    read_at = reader(path)
    with pytest.raises(BlobCorrupt):
        read_range(read_at, m)
    with pytest.raises(BlobCorrupt):
        b"".join(iter_member(read_at, m))


def test_a_corrupted_header_or_catalog_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "a.tar"
    members = write_archive(path, [ODD, TEXTISH])
    good = path.read_bytes()
    m = members[1]
    header = good[m.record_offset : m.data_offset]
    # The frame list in the provenance says something else than the stored bytes.
    first = str(m.frames[0]).encode()
    assert header.count(b"[" + first + b",") == 1
    path.write_bytes(good.replace(b"[" + first + b",", b"[" + str(m.frames[0] + 1).encode() + b",", 1))
    with pytest.raises(BlobMissing):  # tar's header checksum or our frame sum: either way, not served
        member_at(reader(path), m.record_offset, m.data_offset)
    # A catalog that does not parse.
    catalog_at = good.rindex(b"catalog.json\x00")
    raw = bytearray(good)
    raw[catalog_at + BLOCK + 3] = ord("#")
    path.write_bytes(raw)
    with pytest.raises(BlobCorrupt):
        read_catalog(reader(path), len(raw))
    # Not an archive at all.
    with pytest.raises(BlobCorrupt):
        read_catalog(lambda o, n: b"\x00" * n, 1 << 20)


def test_a_hostile_frame_cannot_declare_a_huge_size(tmp_path: Path) -> None:
    path = tmp_path / "a.tar"
    (m,) = write_archive(path, [b"tiny"])
    huge = zstandard.ZstdCompressor(write_content_size=True).compress(b"\x00" * (FRAME + 1))
    data = bytearray(path.read_bytes())
    frame = huge[: m.stored_bytes] if len(huge) >= m.stored_bytes else huge + b"\x00" * (m.stored_bytes - len(huge))
    data[m.data_offset : m.data_offset + m.stored_bytes] = frame
    with pytest.raises(BlobCorrupt, match="declares"):
        read_range(lambda o, n: bytes(data[o : o + n]), m)


def test_a_truncated_archive_lists_its_whole_members_then_says_so(tmp_path: Path) -> None:
    path = tmp_path / "a.tar"
    members = write_archive(path, BLOBS)
    whole = path.read_bytes()
    for cut in (members[3].data_offset + 100, members[-1].end, len(whole) - len(END_OF_ARCHIVE)):
        path.write_bytes(whole[:cut])
        seen: list[Member] = []
        with open(path, "rb") as fh, pytest.raises(ArchiveTruncated):
            for member in scan_archive(fh):
                seen.append(member)
        assert seen == [m for m in members if m.end <= cut]
        with pytest.raises(BlobCorrupt):
            read_catalog(reader(path), cut)
    with pytest.raises(BlobCorrupt):
        read_range(lambda o, n: whole[: members[3].data_offset + 100][o : o + n], members[3])


def test_a_source_of_the_wrong_length_is_refused(tmp_path: Path) -> None:
    sink = io.BytesIO()
    writer = ArchiveWriter(sink, compression_level=3, frame_bytes=FRAME)
    with pytest.raises(ValueError):
        writer.add(meta_for(ODD), chunked(ODD[:-1]))
    with pytest.raises(ValueError):
        writer.add(meta_for(ODD), chunked(ODD + b"!"))
    assert sink.getvalue() == b""  # compressed members are written only once whole: the archive goes on
    m = writer.add(meta_for(ODD), chunked(ODD))
    writer.finish()
    assert read_range(lambda o, n: sink.getvalue()[o : o + n], m) == ODD
    raw = ArchiveWriter(io.BytesIO(), compression_level=0)
    with pytest.raises(ValueError):
        raw.add(meta_for(ODD), chunked(ODD[:-1]))
    with pytest.raises(ValueError, match="broken"):  # half a raw member went out: the archive is given up
        raw.add(meta_for(b"x"), [b"x"])


@pytest.mark.parametrize("location", ["", "a:1:2:3", "a:x:1024:3:4", ":0:512:3:4", "a:512:0:3:4", "a:-1:512:3:4"])
def test_malformed_locations_are_blob_missing(location: str) -> None:
    with pytest.raises(BlobMissing):
        parse_location(location)


def test_member_at_refuses_offsets_that_name_no_record(tmp_path: Path) -> None:
    path = tmp_path / "a.tar"
    m1, m2 = write_archive(path, [ODD, b"second"])
    read_at = reader(path)
    for record, data in [(m1.record_offset, m1.data_offset + BLOCK), (m1.data_offset, m1.data_offset + BLOCK),
                         (m2.end + 10 * BLOCK, m2.end + 12 * BLOCK), (1, 513), (0, 1 << 30)]:
        with pytest.raises(BlobMissing):
            member_at(read_at, record, data)


def test_member_reader_decompresses_each_frame_once_when_read_in_small_pieces(tmp_path: Path) -> None:
    path = tmp_path / "a.tar"
    members = write_archive(path, [TEXTISH, ODD], level=3) + write_archive(tmp_path / "b.tar", [ODD], level=0)
    for m, data, file in [(members[0], TEXTISH, path), (members[1], ODD, path), (members[2], ODD, tmp_path / "b.tar")]:
        raw = file.read_bytes()
        calls: list[int] = []

        def read_at(offset: int, length: int, raw: bytes = raw, calls: list[int] = calls) -> bytes:
            calls.append(length)
            return raw[offset : offset + length]

        with io.BufferedReader(MemberReader(read_at, m), buffer_size=4096) as fh:
            got = b"".join(iter(lambda: fh.read(1000), b""))
            assert got == data
            if m.codec == CODEC_ZSTD:
                assert calls == list(m.frames)  # each frame read (and decompressed) once
            fh.seek(FRAME - 3)
            assert fh.read(10) == data[FRAME - 3 : FRAME + 7]
            fh.seek(-5, io.SEEK_END)
            assert fh.read() == data[-5:]


def test_a_catalog_larger_than_the_first_window_is_found(tmp_path: Path) -> None:
    path = tmp_path / "a.tar"
    blobs = [b"instance %d" % i for i in range(600)]  # a catalog of ~200 KB: read from the end in growing windows
    members = write_archive(path, blobs)
    assert read_catalog(reader(path), os.path.getsize(path)) == members
