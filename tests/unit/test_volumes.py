"""Volume placement: free space, watermarks, detached mounts."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import VolumeConfig
from appliance.errors import VolumeError
from appliance.store.volumes import MARKER, Volume, VolumeSet, init_volume, open_volume


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


def test_a_volume_in_the_one_file_per_instance_layout_is_refused(tmp_path: Path) -> None:
    vol = volume(tmp_path, "old")
    (vol.root / "blobs" / "ab" / "cd").mkdir(parents=True)
    (vol.root / "blobs" / "ab" / "cd" / ("ab" * 32)).write_bytes(b"x")
    with pytest.raises(VolumeError, match="one-file-per-instance"):
        open_volume(VolumeConfig("old", vol.root), create_missing=False)
