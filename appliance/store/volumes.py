"""Volume roots (RAID arrays, iSCSI LUNs mounted somewhere), their markers, free space and placement.

A volume is a folder holding ``.appliance-volume`` (a marker written once by ``volume init``), ``segments/``
(append-only tar segments, store/segments.py) and ``tmp/`` (spill files of large instances being received).
A folder without the marker is never written into: an empty mount point whose filesystem did not mount looks
exactly like that, and writing there would fill the root filesystem with data nobody finds later.
A configured volume (a ``[[volumes]]`` table) is never created by ``serve``: a path inside an unmounted mount point
does not exist either, and creating it would fill the root disk all the same. ``appliance init`` and ``volume init``
create volumes; ``serve`` creates only the built-in default's (a config without ``[[volumes]]``: ``make run``).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from appliance.config import Config, VolumeConfig
from appliance.errors import VolumeError, VolumeRefused

MARKER = ".appliance-volume"


@dataclass
class Volume:
    name: str
    root: Path
    high_watermark: float
    volume_id: str = ""
    _stat_at: float = field(default=0.0, repr=False)
    _free: int = field(default=0, repr=False)
    _total: int = field(default=1, repr=False)
    _attached: bool = field(default=False, repr=False)
    # The string form of the hot-path folder: pathlib's joins and conversions cost ~5% of a busy worker's Python
    # time (py-spy), plain string joins a tenth of that.
    tmp: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        self.tmp = os.path.join(self.root, "tmp")

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    def refresh(self, max_age: float = 0.5) -> None:
        """Re-read free space and the marker at most every ``max_age`` seconds (two syscalls per instance
        cost more than the rest of placement)."""
        now = time.monotonic()
        if now - self._stat_at < max_age:
            return
        st = os.statvfs(self.root)
        self._free = st.f_bavail * st.f_frsize
        self._total = max(1, st.f_blocks * st.f_frsize)
        self._attached = (self.root / MARKER).is_file()
        self._stat_at = now

    def free_bytes(self) -> int:
        self.refresh()
        return self._free

    def total_bytes(self) -> int:
        self.refresh()
        return self._total

    def fill(self) -> float:
        self.refresh()
        return 1.0 - self._free / self._total

    def can_take(self, size_hint: int) -> bool:
        """True when writing ``size_hint`` more bytes keeps the filesystem under the high watermark."""
        self.refresh()
        used_after = self._total - self._free + size_hint
        return used_after / self._total < self.high_watermark and self._free > size_hint

    def is_attached(self) -> bool:
        self.refresh()
        return self._attached

    def charge(self, nbytes: int) -> None:
        """Account for bytes just written, so placement between statvfs refreshes is not blind."""
        self._free -= nbytes


def init_volume(root: Path, name: str) -> str:
    """Write the marker (and folders) of a new volume; refuse a folder that already holds another marker."""
    root.mkdir(parents=True, exist_ok=True)
    marker = root / MARKER
    if marker.exists():
        data = json.loads(marker.read_text())
        if data.get("name") != name:
            raise VolumeError(f"{root} is already volume {data.get('name')!r}, not {name!r}")
        return str(data["id"])
    volume_id = str(uuid.uuid4())
    (root / "segments").mkdir(exist_ok=True, mode=0o700)
    (root / "tmp").mkdir(exist_ok=True, mode=0o700)
    tmp = root / (MARKER + ".tmp")
    with open(tmp, "w") as fh:
        json.dump({"name": name, "id": volume_id, "created": time.time()}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.rename(tmp, marker)
    fsync_dir(root)
    return volume_id


def fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def volume_problem(vc: VolumeConfig) -> str:
    """Why a configured volume cannot be opened as configured ("" when it can): missing, no marker, another's."""
    root = vc.path
    if not root.is_dir():
        return f"{root} does not exist (is its filesystem mounted?)"
    marker = root / MARKER
    if not marker.is_file():
        return (f"{root} has no {MARKER} marker. If it is a mount point, its filesystem is probably not mounted; "
                f"if it is a new volume, run `appliance volume init {root} -c CONFIG`")
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError) as exc:
        return f"unreadable marker {marker}: {exc}"
    if data.get("name") != vc.name:
        return f"{root} is marked as volume {data.get('name')!r} (id {data.get('id', '?')}), not {vc.name!r}"
    return ""


def open_volume(vc: VolumeConfig, create_missing: bool) -> Volume:
    """``create_missing``: only for the built-in default volume (no ``[[volumes]]`` in the config)."""
    root = vc.path
    if create_missing and not root.exists():
        init_volume(root, vc.name)
    problem = volume_problem(vc)
    if problem:
        raise VolumeRefused(f"volume {vc.name}: {problem}")
    data = json.loads((root / MARKER).read_text())
    old = root / "blobs"
    if old.is_dir() and any(old.iterdir()):
        raise VolumeError(
            f"volume {vc.name}: {root} holds blobs/ in the one-file-per-instance layout of version 0.1, which this "
            "version does not read (no site ran it; there is no migration): use a new volume")
    for sub in ("segments", "tmp"):
        (root / sub).mkdir(exist_ok=True, mode=0o700)
    if not os.access(root / "tmp", os.W_OK) or not os.access(root / "segments", os.W_OK):
        raise VolumeError(f"volume {vc.name}: {root} is not writable")
    return Volume(vc.name, root, vc.high_watermark, str(data.get("id", "")))


class VolumeSet:
    """All configured volumes; picks where a new instance goes."""

    def __init__(self, volumes: list[Volume]) -> None:
        self.volumes = volumes
        self.by_name = {v.name: v for v in volumes}

    @classmethod
    def open(cls, config: Config, create_missing: bool = False) -> VolumeSet:
        return cls([open_volume(vc, create_missing) for vc in config.volumes])

    def pick(self, size_hint: int) -> Volume | None:
        """The attached volume with the most free space that stays under its watermark, or None."""
        best: Volume | None = None
        for vol in self.volumes:
            # A volume whose marker went away (its filesystem unmounted under us) is skipped: never write into
            # the bare mount point, but keep using the other volumes.
            if not vol.can_take(size_hint) or not vol.is_attached():
                continue
            if best is None or vol.free_bytes() > best.free_bytes():
                best = vol
        return best
