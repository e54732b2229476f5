"""Tape drives and libraries (tiering/tape/drive.py, library.py): the st ioctl layouts against the kernel header,
the mtx parser against real output, and the cartridge-file drive's tape semantics."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tiering.tape.drive import (
    MTGET,
    MTIOCGET,
    MTIOCPOS,
    MTIOCTOP,
    MTOP,
    MTPOS,
    EndOfMedium,
    FileDrive,
    LtfsDrive,
    MtStatus,
    TapeError,
    mtop,
)
from tiering.tape.library import VirtualLibrary, VolumeLabel, parse_mtx_status

BLOCK = 4096

C_PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <linux/mtio.h>
int main(void) {
    printf("%zu %zu %zu\n", sizeof(struct mtop), sizeof(struct mtget), sizeof(struct mtpos));
    printf("%lu %lu %lu\n", (unsigned long)MTIOCTOP, (unsigned long)MTIOCGET, (unsigned long)MTIOCPOS);
    printf("%zu %zu %zu\n", offsetof(struct mtop, mt_count), offsetof(struct mtget, mt_fileno),
           offsetof(struct mtget, mt_blkno));
    return 0;
}
"""


def test_st_ioctl_layouts_match_linux_mtio_h(tmp_path: Path) -> None:
    """Compiled against the real header: sizes, ioctl numbers and field offsets are what drive.py packs."""
    if shutil.which("gcc") is None or not Path("/usr/include/linux/mtio.h").exists():
        pytest.skip("needs gcc and the kernel headers")
    (tmp_path / "mt.c").write_text(C_PROGRAM)
    subprocess.run(["gcc", "-o", str(tmp_path / "mt"), str(tmp_path / "mt.c")], check=True, capture_output=True)
    sizes, numbers, offsets = subprocess.run([str(tmp_path / "mt")], capture_output=True, text=True,
                                             check=True).stdout.splitlines()
    assert [int(x) for x in sizes.split()] == [MTOP.size, MTGET.size, MTPOS.size]
    assert [int(x) for x in numbers.split()] == [MTIOCTOP, MTIOCGET, MTIOCPOS]
    mt_count, mt_fileno, mt_blkno = (int(x) for x in offsets.split())
    # The packed bytes put each value at the C field's offset.
    assert mtop(5, 0x01020304)[mt_count : mt_count + 4] == (0x01020304).to_bytes(4, "little")
    raw = MTGET.pack(0x72, 0, 512, 0x41010000, 0, 7, 99)
    assert int.from_bytes(raw[mt_fileno : mt_fileno + 4], "little") == 7
    assert int.from_bytes(raw[mt_blkno : mt_blkno + 4], "little") == 99


def test_mt_status_decodes_the_generic_status_bits() -> None:
    status = MtStatus.unpack(MTGET.pack(0x72, 0, (0x58 << 24) | 262144, 0x08000000 | 0x01000000, 0, 3, 0))
    assert status.block_bytes == 262144 and status.file_number == 3 and status.at_eod and status.online
    assert not status.write_protected


# Laid out exactly as mtx.c's Status() prints (its printf formats), for a 3-drive, 24-slot library.
MTX_STATUS = """\
  Storage Changer /dev/sg4:3 Drives, 24 Slots ( 1 Import/Export )
Data Transfer Element 0:Full (Storage Element 3 Loaded):VolumeTag = 000003L6
Data Transfer Element 1:Empty
Data Transfer Element 2:Full (Unknown Storage Element Loaded):VolumeTag = 000007L6:AlternateVolumeTag = X
      Storage Element 1:Full :VolumeTag=000001L6
      Storage Element 2:Full :VolumeTag=000002L6:AlternateVolumeTag=B2
      Storage Element 3:Empty
      Storage Element 4:Full :VolumeTag=CLN001L1
      Storage Element 5:Full\x20
      Storage Element 24 IMPORT/EXPORT:Empty
"""


def test_mtx_status_output_is_parsed() -> None:
    elements = parse_mtx_status(MTX_STATUS)
    drives = [e for e in elements if e.kind == "drive"]
    assert [(d.number, d.full, d.label, d.source_slot) for d in drives] == [
        (0, True, "000003L6", 3), (1, False, None, None), (2, True, "000007L6", None)]
    slots = {e.number: e for e in elements if e.kind == "slot"}
    assert slots[1].label == "000001L6" and slots[2].label == "000002L6"
    assert slots[3].full is False and slots[4].label == "CLN001L1"
    assert slots[5].full and slots[5].label is None  # a cartridge without a readable barcode
    assert [(e.number, e.full) for e in elements if e.kind == "mail"] == [(24, False)]


def test_volume_label_round_trips_and_rejects_foreign_blocks() -> None:
    raw = VolumeLabel("VTL001L6", "tape1").encode()
    assert len(raw) == 80 and raw.startswith(b"VOL1VTL001") and raw.endswith(b"4")
    assert VolumeLabel.decode(raw.ljust(BLOCK, b"\0")) == VolumeLabel("VTL001L6", "tape1")
    assert VolumeLabel.decode(b"") is None and VolumeLabel.decode(b"ustar".ljust(512, b"\0")) is None


def cartridge(tmp_path: Path, capacity: int = 64 * BLOCK, **kw: float) -> FileDrive:
    path = tmp_path / "T00001L6.tape"
    path.touch()
    drive = FileDrive(path, capacity, BLOCK, fsync=False, **kw)  # type: ignore[arg-type]
    drive.load()
    return drive


def blocks(byte: int, count: int = 1) -> bytes:
    return bytes([byte]) * (BLOCK * count)


def test_file_drive_has_tape_semantics(tmp_path: Path) -> None:
    drive = cartridge(tmp_path)
    drive.write(blocks(1, 2))
    drive.write_filemarks(1)
    drive.write(blocks(2))
    drive.write_filemarks(1)
    drive.write(blocks(3, 3))  # tape file 2, open (no filemark yet)
    assert drive.position().file_number == 2 and drive.position().at_eod
    drive.position_file(1)
    assert drive.read(10 * BLOCK) == blocks(2)
    assert drive.read(BLOCK) == b""  # the filemark, once; the head is then at the start of file 2
    assert drive.position().file_number == 2 and drive.position().block_number == 0
    drive.skip_blocks(2)
    assert drive.read(10 * BLOCK) == blocks(3)
    assert drive.read(BLOCK) == b"" and drive.read(BLOCK) == b""  # end of data: no filemark to pass
    drive.position_eod()
    assert drive.position() == drive.position().__class__(2, 3, True)
    with pytest.raises(TapeError):
        drive.position_file(3)
    # Writing in the middle erases everything after the head, filemarks included (as a real drive does).
    drive.position_file(1)
    drive.write(blocks(9))
    assert drive.marks() == [2 * BLOCK]
    drive.position_eod()
    assert drive.position().file_number == 1 and drive.eod_bytes() == 3 * BLOCK
    with pytest.raises(AssertionError):
        drive.write(b"x")  # whole blocks only


def test_file_drive_refuses_a_write_past_its_capacity(tmp_path: Path) -> None:
    drive = cartridge(tmp_path, capacity=4 * BLOCK)
    drive.write(blocks(1, 3))
    with pytest.raises(EndOfMedium):
        drive.write(blocks(2, 2))
    assert drive.eod_bytes() == 3 * BLOCK  # nothing of the refused write reached the medium
    drive.write(blocks(2))


def test_filemarks_survive_a_reload_and_damaged_marks_are_refused(tmp_path: Path) -> None:
    drive = cartridge(tmp_path)
    drive.write(blocks(1))
    drive.write_filemarks(2)
    drive.close()
    again = cartridge(tmp_path)
    assert again.marks() == [BLOCK, BLOCK]
    again.position_file(2)
    assert again.position().at_eod
    again.close()
    (tmp_path / "T00001L6.marks").write_text(f"{100 * BLOCK}\n")
    with pytest.raises(TapeError, match="damaged"):
        cartridge(tmp_path)


def test_simulated_load_and_seek_times_are_applied(tmp_path: Path) -> None:
    """Measured with the clock: a load takes load_s, a positioning seek_s_per_gib per GiB the head moves."""
    drive = cartridge(tmp_path, capacity=1 << 30)
    drive.write(bytes(16 << 20))
    drive.write_filemarks(1)
    drive.close()
    path = tmp_path / "T00001L6.tape"
    slow = FileDrive(path, 1 << 30, BLOCK, load_s=0.15, seek_s_per_gib=16.0, fsync=False)  # 16 MiB: 0.25 s
    start = time.monotonic()
    slow.load()
    loaded = time.monotonic()
    slow.position_file(1)
    positioned = time.monotonic()
    slow.position_file(0)
    back = time.monotonic()
    assert 0.15 <= loaded - start < 1.0
    assert 0.25 <= positioned - loaded < 1.5 and 0.25 <= back - positioned < 1.5
    slow.close()


def test_ltfs_drive_writes_one_file_per_tape_file_and_never_rewrites(tmp_path: Path) -> None:
    mount = tmp_path / "ltfs"
    mount.mkdir()
    drive = LtfsDrive(mount, fsync=False)
    drive.load()
    drive.position_eod()
    drive.write(VolumeLabel("LTF001L6", "t").encode().ljust(512, b"\0"))
    drive.write_filemarks(1)
    drive.write(b"a" * 1024)
    drive.write_filemarks(1)
    drive.write(b"b" * 512)
    assert sorted(p.name for p in mount.iterdir()) == ["1.tar", "2.tar", "VOL1.label"]
    assert (mount / "1.tar").read_bytes() == b"a" * 1024
    drive.position_file(1)
    assert drive.read(4096) == b"a" * 1024 and drive.read(4096) == b""
    assert drive.position().file_number == 2
    drive.position_file(1)
    with pytest.raises(TapeError, match="rewrite"):
        drive.write(b"c" * 512)
    drive.position_eod()
    assert drive.position().file_number == 2 and drive.position().at_eod
    drive.close()


def test_virtual_library_shares_the_loaded_cartridge_and_its_head_across_instances(tmp_path: Path) -> None:
    one = VirtualLibrary(tmp_path / "vtl", "t1", block_bytes=BLOCK, fsync=False)
    assert one.create(3, 64 * BLOCK) == ["VTL001L6", "VTL002L6", "VTL003L6"]
    assert one.create(3, 64 * BLOCK) == []  # idempotent
    with one.session("VTL002L6") as drive:
        assert one.read_label(drive) == VolumeLabel("VTL002L6", "t1")
        drive.position_eod()
        drive.write(blocks(7))
    other = VirtualLibrary(tmp_path / "vtl", "t1", block_bytes=BLOCK, fsync=False)  # another process's view
    assert other.loaded() == "VTL002L6"
    with other.session(None) as drive:
        assert drive.position().file_number == 1 and drive.position().block_number == 1
    cartridges = {c.label: c for c in other.cartridges()}
    assert cartridges["VTL002L6"].loaded and cartridges["VTL002L6"].archives == 1
    assert cartridges["VTL001L6"].archives == 0 and cartridges["VTL001L6"].labelled
    assert other.eject() == "VTL002L6" and one.loaded() is None
