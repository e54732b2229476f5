"""Volume placement: free space, watermarks, detached mounts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance.config import VolumeConfig
from appliance.errors import VolumeError
from appliance.store import blobs
from appliance.store.blobs import TmpFileReserve
from appliance.store.volumes import MARKER, Volume, VolumeSet, init_volume, open_volume
from bench.receivers import wait_for


def volume(tmp_path: Path, name: str, watermark: float = 0.999) -> Volume:
    init_volume(tmp_path / name, name)
    return open_volume(VolumeConfig(name, tmp_path / name, watermark), create_missing=False)


def test_detached_volume_is_skipped_not_fatal(tmp_path: Path) -> None:
    a, b = volume(tmp_path, "a"), volume(tmp_path, "b")
    a.refresh()
    b.refresh()
    a._free, b._free = 10 << 30, 5 << 30  # a has more room (until the next refresh)
    vols = VolumeSet([a, b])
    assert vols.pick(1) is a
    a._free, b._free = 5 << 30, 10 << 30
    assert vols.pick(1) is b  # placement follows free space
    a._free, b._free = 10 << 30, 5 << 30
    (a.root / MARKER).unlink()  # a's filesystem went away under us
    a._stat_at = 0.0  # as after the 0.5 s refresh interval
    assert vols.pick(1) is b


def test_above_watermark_takes_nothing(tmp_path: Path) -> None:
    full = volume(tmp_path, "full", watermark=0.000001)
    assert VolumeSet([full]).pick(1) is None


def test_folder_without_marker_is_refused_and_missing_folder_is_created(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    with pytest.raises(VolumeError, match="volume init"):
        open_volume(VolumeConfig("v", tmp_path / "mnt"), create_missing=True)
    created = open_volume(VolumeConfig("v", tmp_path / "new"), create_missing=True)
    assert (created.root / MARKER).is_file() and created.is_attached()


def test_tmp_reserve_hands_out_files_only_after_their_folder_is_fsynced(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The group commit skips the tmp/ folder fsync for reserve files, so the reserve must have made their
    directory entries durable before handing them out; and it refills in batches, not one fsync per file."""
    vol = volume(tmp_path, "v")
    synced: list[set[str]] = []  # names present in tmp/ at each folder fsync

    def recording_fsync_dir(path: Path) -> None:
        assert Path(path) == vol.tmp_dir
        synced.append({p.name for p in vol.tmp_dir.iterdir()})

    monkeypatch.setattr(blobs, "fsync_dir", recording_fsync_dir)
    reserve = blobs.TmpFileReserve(vol, depth=8)
    try:
        taken = []
        for _ in range(40):
            ready = wait_for_reserve(reserve)
            writer = blobs.BlobWriter(vol, b"", None)
            assert writer.entry_durable is False  # made on the spot: the commit fsyncs tmp/ for it
            writer.discard()
            taken.append(ready)
        for fd, path in taken:
            assert any(os.path.basename(path) in names for names in synced), "handed out before its folder was fsync'd"
            os.close(fd)
        assert len(synced) < len(taken)  # batched refills
        wait_for(lambda: len(reserve._ready) > 0, timeout=10, what="a refill")
        writer = blobs.BlobWriter(vol, b"", reserve)
        assert writer.entry_durable is True
        assert any(os.path.basename(writer.tmp_path) in names for names in synced)
        writer.discard()
    finally:
        reserve.close()


def wait_for_reserve(reserve: TmpFileReserve) -> tuple[int, str]:
    result: tuple[int, str] = wait_for(reserve.take, timeout=10, what="a reserve tmp file")
    return result
