"""Deterministic synthetic DICOM instances for the ingest benchmarks.

Profiles (``PROFILES``, the one table of what each kind of instance looks like):

- ``ct``: one CT series, default 600 axial slices (100 to 1,000 is typical) of 512x512 16-bit (12 stored), about
  0.5 MiB a file: a body phantom (soft tissue, lungs, spine, table) that changes along z, plus Gaussian noise;
- ``mr``, ``mr320``: one MR brain study of several series (T1/T2/PD/FLAIR, 200 images each), 256x256 or
  320x320 16-bit (12 stored), a head phantom with Rician-like noise;
- ``dx``: chest radiographs, Digital X-Ray Image Storage - For Presentation, 2048x2048 12-bit (8 MiB), two
  views (PA, lateral) per study;
- ``mg``: mammograms, Digital Mammography X-Ray Image Storage - For Presentation, 4280 rows x 2560 columns
  12-bit (21 MiB), four views (R CC, L CC, R MLO, L MLO) per study;
- ``us``: ultrasound clips, Ultrasound Multi-frame Image Storage, 480x640 RGB, 30 frames (27 MiB), a B-mode
  sector with speckle, a moving echo and a colour-Doppler box.

Each in Explicit VR Little Endian (``none``), Implicit VR Little Endian (``implicit``), or a lossless compressed
transfer syntax: ``rle`` (RLE Lossless: pydicom's own encoder, or pylibjpeg-rle when installed), ``jpegls``
(JPEG-LS Lossless, needs pyjpegls) and ``j2k`` (JPEG 2000 Lossless, needs pylibjpeg + pylibjpeg-openjpeg); the
last two come with ``pip install -e '.[bench]'``.

Headers are complete enough for an archive (patient/study/series/instance hierarchy, new patient per study,
positions and orientation, pixel spacing, rescale, window, modality-specific modules, a few private tags
under the private creator ``BENCH SYNTH``). Everything (UIDs, names, dates, pixel noise) is derived from one
seed, so the same parameters always give byte-identical datasets. UIDs are 2.25.<UUID as integer> (PS3.5 B.2),
the UUIDs drawn from the seeded RNG. Pixel data is a phantom per profile (cached, a few bases per series) plus
noise drawn from a per-seed noise bank at a random offset, so a 1,000-slice CT takes seconds, not minutes.

APIs: ``iter_instances(profile, count, seed, ts)`` streams ``SynthInstance`` objects (the dataset bytes
exactly as they travel in a C-STORE, no File Meta) without touching the disk; ``write_folder`` writes Part-10
files; ``load_or_generate(spec)`` keeps a generated burst under ``<cache>/<key>/all/`` (the key holds every
parameter) with a manifest, and ``split(burst, k)`` makes ``<cache>/<key>/k<K>/<i>/`` folders of hard links
(copies where links fail), one per parallel association, contiguous runs of instances like a modality
splitting a series over associations.

    python -m bench.synth --profile ct --count 600 --k 4            # generate (or find in the cache) and split
    python -m bench.synth --profile us --count 5 --ts rle --out DIR  # write Part-10 files into DIR
    python -m bench.synth --list                                     # the profiles and the encoders available
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import random
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
DX_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
MG_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.2"
US_MULTIFRAME_STORAGE = "1.2.840.10008.5.1.4.1.1.3.1"
# Bumped whenever the generator's output changes, so stale caches are never reused.
GENERATOR_VERSION = 2
DEFAULT_CACHE = Path(os.environ.get("BENCH_CACHE", Path(__file__).resolve().parent / ".cache"))
MANIFEST = "manifest.json"
PRIVATE_GROUP = 0x0029
PRIVATE_CREATOR = "BENCH SYNTH"
# Our own implementation class UID (not pydicom's, which changes with its version): files stay identical.
IMPLEMENTATION_CLASS_UID = "2.25." + str(uuid.uuid5(uuid.NAMESPACE_OID, "dicom-appliance bench synth").int)
IMPLEMENTATION_VERSION = f"BENCHSYNTH_{GENERATOR_VERSION}"

# Transfer syntax names of the command line -> UIDs.
TRANSFER_SYNTAXES: dict[str, str] = {
    "none": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "rle": RLELossless,
    "jpegls": JPEGLSLossless,
    "j2k": JPEG2000Lossless,
}
_TS_NAMES = {uid: name for name, uid in TRANSFER_SYNTAXES.items()}


@dataclass(frozen=True)
class Profile:
    """What one kind of synthetic instance looks like. ``series_size``/``study_size`` 0 = all in one."""

    name: str
    modality: str
    sop_class_uid: str
    rows: int
    cols: int
    bits_allocated: int
    bits_stored: int
    samples: int  # samples per pixel: 1 (MONOCHROME2) or 3 (RGB)
    frames: int  # 1 = single-frame SOP class; >1 = multi-frame (NumberOfFrames)
    series_size: int
    study_size: int
    default_count: int
    noise: float  # standard deviation of the additive noise, in stored values
    study_description: str
    body_part: str

    @property
    def frame_bytes(self) -> int:
        return self.rows * self.cols * self.samples * self.bits_allocated // 8

    @property
    def pixel_bytes(self) -> int:
        return self.frame_bytes * self.frames


PROFILES: dict[str, Profile] = {
    "ct": Profile("ct", "CT", CT_IMAGE_STORAGE, 512, 512, 16, 12, 1, 1, 0, 0, 600, 12.0, "CT CHEST ABDOMEN", "CHEST"),
    "mr": Profile("mr", "MR", MR_IMAGE_STORAGE, 256, 256, 16, 12, 1, 1, 200, 0, 2000, 25.0, "MR BRAIN", "HEAD"),
    "mr320": Profile("mr320", "MR", MR_IMAGE_STORAGE, 320, 320, 16, 12, 1, 1, 200, 0, 1000, 25.0, "MR BRAIN", "HEAD"),
    "dx": Profile("dx", "DX", DX_PRESENTATION_STORAGE, 2048, 2048, 16, 12, 1, 1, 1, 2, 40, 20.0,
                  "XR CHEST 2 VIEWS", "CHEST"),
    "mg": Profile("mg", "MG", MG_PRESENTATION_STORAGE, 4280, 2560, 16, 12, 1, 1, 4, 4, 16, 18.0,
                  "MG SCREENING BILATERAL", "BREAST"),
    "us": Profile("us", "US", US_MULTIFRAME_STORAGE, 480, 640, 8, 8, 3, 30, 0, 0, 10, 14.0, "US ABDOMEN",
                  "ABDOMEN"),
}


def get_profile(profile: str | Profile, *, frames: int | None = None, size: int | None = None) -> Profile:
    """The profile (by name, or as given), with the number of frames (multi-frame only) or rows = columns changed."""
    p = PROFILES[profile] if isinstance(profile, str) else profile
    if frames is not None:
        if p.frames == 1 and frames != 1:
            raise ValueError(f"profile {p.name} is single-frame")
        p = dataclasses.replace(p, frames=frames)
    if size is not None:
        p = dataclasses.replace(p, rows=size, cols=size)
    return p


def ts_uid(ts: str | None) -> str:
    """The transfer syntax UID for a name of ``TRANSFER_SYNTAXES`` (None = Explicit VR Little Endian) or a UID."""
    if ts is None:
        return ExplicitVRLittleEndian
    if ts in TRANSFER_SYNTAXES:
        return TRANSFER_SYNTAXES[ts]
    if ts in _TS_NAMES:
        return ts
    raise ValueError(f"unknown transfer syntax {ts!r}: one of {', '.join(TRANSFER_SYNTAXES)} or its UID")


def available_transfer_syntaxes() -> dict[str, bool]:
    """Whether an encoder is installed for each transfer syntax name."""
    return {name: _plugin(uid) is not None for name, uid in TRANSFER_SYNTAXES.items()}


def _plugin(uid: str) -> str | None:
    """The encoding plugin to use: "" for uncompressed, None when no encoder is installed."""
    if uid in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        return ""
    from pydicom.pixels import get_encoder

    available = get_encoder(uid).available_plugins
    for preferred in ("pylibjpeg", "pyjpegls", "pydicom", "gdcm"):  # pylibjpeg-rle is ~10x pydicom's RLE
        if preferred in available:
            return preferred
    return None


# ---- burst specs (the cache) --------------------------------------------------------------------------


@dataclass(frozen=True)
class BurstSpec:
    kind: str  # a profile name
    count: int
    rows: int
    cols: int
    seed: int = 1
    series_size: int = 0  # images per series; 0 = one series
    ts: str = "none"
    frames: int = 0  # 0 = the profile's

    @property
    def key(self) -> str:
        extra = ("" if self.ts == "none" else f"-{self.ts}") + (f"-f{self.frames}" if self.frames else "")
        return (f"{self.kind}-n{self.count}-{self.rows}x{self.cols}-ser{self.series_size or self.count}"
                f"-s{self.seed}-v{GENERATOR_VERSION}{extra}")

    @property
    def profile(self) -> Profile:
        p = dataclasses.replace(PROFILES[self.kind], rows=self.rows, cols=self.cols, series_size=self.series_size)
        return dataclasses.replace(p, frames=self.frames) if self.frames else p


def ct_spec(count: int = 600, size: int = 512, seed: int = 1, ts: str = "none") -> BurstSpec:
    return BurstSpec("ct", count, size, size, seed, 0, ts)


def mr_spec(count: int = 2000, size: int = 256, seed: int = 1, ts: str = "none") -> BurstSpec:
    return BurstSpec("mr", count, size, size, seed, 200, ts)


def profile_spec(profile: str, count: int | None = None, seed: int = 1, ts: str = "none", frames: int | None = None,
                 size: int | None = None) -> BurstSpec:
    """The cache spec of ``count`` instances of a profile (``ct_spec``/``mr_spec`` for any profile)."""
    p = get_profile(profile, frames=frames, size=size)
    ts = _TS_NAMES[ts_uid(ts)]
    return BurstSpec(p.name, count or p.default_count, p.rows, p.cols, seed, p.series_size, ts,
                     frames if frames is not None else 0)


@dataclass(frozen=True)
class Burst:
    spec: BurstSpec
    folder: Path  # <cache>/<key>/all
    files: tuple[Path, ...]
    total_bytes: int


# ---- UIDs and header values ---------------------------------------------------------------------------


class _Uids:
    """2.25.<int> UIDs from a seeded RNG: deterministic, unique, no registered root needed."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def __call__(self) -> str:
        return "2.25." + str(uuid.UUID(int=self.rng.getrandbits(128), version=4).int)


def _ds(value: float) -> str:
    """A DS value within 16 characters."""
    text = f"{value:.6g}"
    return text if len(text) <= 16 else f"{value:.8e}"[:16]


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


# ---- pixel phantoms (bases are cached; only the noise changes from instance to instance) ----------------


def _grid(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    x = (np.arange(cols, dtype=np.float32) - cols / 2) / (cols / 2)  # both in [-1, 1)
    y = (np.arange(rows, dtype=np.float32) - rows / 2) / (rows / 2)
    return np.broadcast_to(x[None, :], (rows, cols)), np.broadcast_to(y[:, None], (rows, cols))


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0


def _smooth_field(rows: int, cols: int, cell: int, seed: int) -> np.ndarray:
    """A smooth random texture in [0, 1]: a coarse random grid, upsampled and box-blurred."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((rows // cell + 2, cols // cell + 2), dtype=np.float32)
    fine: np.ndarray = np.repeat(np.repeat(coarse, cell, axis=0), cell, axis=1)[:rows + cell, :cols + cell]
    c = np.cumsum(fine, axis=0, dtype=np.float32)
    fine = (c[cell:] - c[:-cell])[:rows] / cell
    c = np.cumsum(fine, axis=1, dtype=np.float32)
    fine = (c[:, cell:] - c[:, :-cell])[:, :cols] / cell
    lo, hi = float(fine.min()), float(fine.max())
    return (fine - lo) / max(hi - lo, 1e-6)


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


CT_LEVELS = 64  # distinct phantom bases along z (the noise makes every slice distinct)
MR_LEVELS = 32


@functools.lru_cache(maxsize=2 * CT_LEVELS)
def _ct_base(rows: int, cols: int, level: int) -> np.ndarray:
    """Stored values (unsigned 12 bit, HU = value - 1024) of an axial chest/abdomen slice, z = level / (L - 1)."""
    x, y = _grid(rows, cols)
    z = level / (CT_LEVELS - 1)
    hu = np.full(x.shape, -1000.0, dtype=np.float32)  # air
    body_a, body_b = 0.78 + 0.06 * np.sin(np.pi * z), 0.55 + 0.04 * np.sin(np.pi * z)
    hu[_ellipse(x, y, 0, 0, body_a, body_b)] = -90.0  # subcutaneous fat
    hu[_ellipse(x, y, 0, 0, body_a - 0.06, body_b - 0.06)] = 40.0  # soft tissue
    if z > 0.35:  # lungs in the upper part of the scan
        lung = 0.18 + 0.12 * np.sin(np.pi * (z - 0.35) / 0.65)
        hu[_ellipse(x, y, -0.32, -0.05, lung * 1.1, lung * 1.6)] = -850.0
        hu[_ellipse(x, y, 0.32, -0.05, lung * 1.1, lung * 1.6)] = -850.0
    else:  # liver and kidneys below
        hu[_ellipse(x, y, -0.28, -0.05, 0.3, 0.25)] = 60.0
        hu[_ellipse(x, y, -0.2, 0.28, 0.08, 0.1)] = 30.0
        hu[_ellipse(x, y, 0.2, 0.28, 0.08, 0.1)] = 30.0
    hu[_ellipse(x, y, 0, 0.38, 0.09, 0.08)] = 700.0  # vertebra
    hu[_ellipse(x, y, 0, 0.38, 0.04, 0.035)] = 250.0  # spinal canal / marrow
    hu[_ellipse(x, y, 0.08, 0.1, 0.06, 0.06)] = 180.0  # aorta with contrast
    hu[(y > 0.72) & (y < 0.76) & (np.abs(x) < 0.9)] = 300.0  # table
    return _frozen(np.clip(hu + 1024.0, 0, 4095).astype(np.uint16))


MR_PROTOCOLS = [("T1 SE AX", "500", "12", 1.0), ("T2 SE AX", "4000", "100", 1.6), ("PD SE AX", "2500", "20", 1.2),
                ("FLAIR AX", "9000", "120", 0.7)]


@functools.lru_cache(maxsize=len(MR_PROTOCOLS) * MR_LEVELS)
def _mr_base(rows: int, cols: int, level: int, contrast: float) -> np.ndarray:
    """Stored values (unsigned 12 bit) of an axial head slice; ``contrast`` varies by series."""
    x, y = _grid(rows, cols)
    z = level / (MR_LEVELS - 1)
    img = np.zeros(x.shape, dtype=np.float32)
    scale = 0.6 + 0.3 * np.sin(np.pi * min(max(z, 0.05), 0.95))
    img[_ellipse(x, y, 0, 0, 0.75 * scale, 0.9 * scale)] = 1400.0  # scalp/skull marrow
    img[_ellipse(x, y, 0, 0, 0.68 * scale, 0.83 * scale)] = 200.0  # skull
    img[_ellipse(x, y, 0, 0, 0.62 * scale, 0.77 * scale)] = 900.0 * contrast  # grey matter
    img[_ellipse(x, y, 0, 0, 0.5 * scale, 0.65 * scale)] = 700.0 + 500.0 * (1.0 - contrast)  # white matter
    img[_ellipse(x, y, -0.12, 0, 0.06 * scale, 0.25 * scale)] = 2200.0 * contrast  # ventricles (CSF)
    img[_ellipse(x, y, 0.12, 0, 0.06 * scale, 0.25 * scale)] = 2200.0 * contrast
    img *= 1.0 - 0.15 * (x**2 + y**2)  # coil sensitivity falloff
    return _frozen(np.clip(img, 0, 4095).astype(np.uint16))


DX_VIEWS = [("PA", ["L", "F"], "CHEST PA"), ("LL", ["P", "F"], "CHEST LAT")]


@functools.lru_cache(maxsize=4)
def _dx_base(rows: int, cols: int, view: int) -> np.ndarray:
    """A chest radiograph for presentation (MONOCHROME2: attenuation is bright), PA (0) or lateral (1)."""
    x, y = _grid(rows, cols)
    img = np.full(x.shape, 150.0, dtype=np.float32)  # direct exposure
    ribs = np.clip(np.sin(2 * np.pi * (5.5 * y + 0.9 * x**2)), 0, 1) ** 3 * 420.0
    if view == 0:
        body = _ellipse(x, y, 0, 0.25, 0.86, 1.05)
        img[body] = 1850.0
        for cx in (-0.38, 0.38):
            lung = _ellipse(x, y, cx, -0.05, 0.27, 0.62)
            img[lung] = 700.0 + ribs[lung]
        img[_ellipse(x, y, 0.12, 0.3, 0.3, 0.28)] = 2350.0  # heart
        img[(np.abs(x) < 0.07) & body] = 2650.0  # spine and mediastinum
        for sign in (-1, 1):  # clavicles
            img[(np.abs(y + 0.62 - 0.25 * sign * x) < 0.025) & (np.abs(x) < 0.5) & (sign * x > 0.05)] = 2900.0
    else:
        body = _ellipse(x, y, 0, 0.2, 0.62, 1.0)
        img[body] = 1900.0
        lung = _ellipse(x, y, -0.05, -0.05, 0.42, 0.6)
        img[lung] = 760.0 + ribs[lung] * 0.6
        img[_ellipse(x, y, -0.25, 0.3, 0.25, 0.3)] = 2300.0  # heart
        img[(np.abs(x - 0.45) < 0.07) & body] = 2700.0  # spine
    img[(x > 0.8) & (x < 0.9) & (y > -0.9) & (y < -0.78)] = 4000.0  # side marker
    img *= 1.0 + 0.08 * y  # heel effect
    return _frozen(np.clip(img, 0, 4095).astype(np.uint16))


MG_VIEWS = [("R", "CC", ["P", "L"]), ("L", "CC", ["A", "R"]), ("R", "MLO", ["P", "F"]), ("L", "MLO", ["A", "F"])]


@functools.lru_cache(maxsize=4)
def _mg_base(rows: int, cols: int, view: int) -> np.ndarray:
    """A mammogram for presentation, chest wall on the right for the right breast (the left one is mirrored)."""
    laterality, position, _ = MG_VIEWS[view]
    if laterality == "L":
        return _frozen(np.ascontiguousarray(_mg_base(rows, cols, view - 1)[:, ::-1]))
    x, y = _grid(rows, cols)
    img = np.full(x.shape, 60.0, dtype=np.float32)
    r = np.sqrt(((x - 1.0) / 1.55) ** 2 + (y / 0.82) ** 2)  # breast outline from the chest wall (x = 1)
    breast = r < 1.0
    texture = _smooth_field(rows, cols, max(8, cols // 40), 20240 + view)
    img[breast] = 1500.0 + 900.0 * texture[breast] * (1.0 - r[breast])  # fibroglandular tissue
    img[(r > 0.97) & breast] = 1900.0  # skin line
    if position == "MLO":
        img[(x - 1.0) * 0.9 > y * 1.6 + 0.25] = 2600.0  # pectoral muscle (upper chest-wall corner)
    rng = np.random.default_rng(7 + view)
    for _ in range(12):  # microcalcifications
        cy, cx = int(rng.integers(rows // 4, 3 * rows // 4)), int(rng.integers(cols // 3, cols - 20))
        radius = int(rng.integers(2, 6))
        dy, dx = np.ogrid[-radius:radius + 1, -radius:radius + 1]
        sl = (slice(cy - radius, cy + radius + 1), slice(cx - radius, cx + radius + 1))
        img[sl][dy**2 + dx**2 <= radius**2] = 3600.0
    return _frozen(np.clip(img, 0, 4095).astype(np.uint16))


@functools.lru_cache(maxsize=2)
def _us_base(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """The B-mode sector (grey, 8 bit) and the mask where speckle noise goes."""
    x, y = _grid(rows, cols)
    py = (y + 1.0) * rows / cols  # depth from the top, in units of half the width
    r = np.sqrt(x**2 + (py + 0.1) ** 2)
    theta = np.arctan2(x, py + 0.1)
    fan = (np.abs(theta) < 0.62) & (r > 0.15) & (r < 1.45)
    texture = _smooth_field(rows, cols, 12, 99)
    img = np.zeros(x.shape, dtype=np.float32)
    img[fan] = (55.0 + 50.0 * texture[fan]) * (1.0 - 0.35 * r[fan])  # tissue, attenuated with depth
    for depth in (0.35, 0.42, 0.9):  # fascia / capsule lines
        img[fan & (np.abs(r - depth) < 0.008)] = 190.0
    img[fan & _ellipse(x, py, -0.12, 0.72, 0.14, 0.1)] = 6.0  # a cyst (anechoic)
    img[fan & _ellipse(x, py, -0.12, 0.84, 0.16, 0.03)] = 150.0  # with posterior enhancement
    img[:18, 10:200:7] = 200.0  # annotation text bar
    img[:18, 10:200:13] = 0.0
    img[rows // 4: rows * 3 // 4, cols - 14:cols - 8] = np.linspace(255, 0, rows * 3 // 4 - rows // 4)[:, None]  # bar
    return _frozen(np.clip(img, 0, 255).astype(np.int16)), _frozen(fan.astype(np.int16))


NOISE_SLACK = 1 << 16  # noise offsets are drawn from [0, NOISE_SLACK)


@functools.lru_cache(maxsize=6)
def _noise_bank(n: int, sigma: float, rician: bool, seed: int) -> np.ndarray:
    """``n + NOISE_SLACK`` int16 noise values; an image takes ``n`` of them at a random offset."""
    bank = np.random.default_rng([seed, n, 104729]).standard_normal(n + NOISE_SLACK, dtype=np.float32)
    bank *= sigma
    if rician:
        np.abs(bank, out=bank)
    return _frozen(np.rint(bank, out=bank).astype(np.int16))


def clear_caches() -> None:
    """Drop the cached phantom bases and noise banks (memory; tests use it to regenerate from scratch)."""
    for cached in (_ct_base, _mr_base, _dx_base, _mg_base, _us_base, _noise_bank):
        cached.cache_clear()


def _noisy(base: np.ndarray, noise: np.ndarray, offset: int, maxval: int, mask: np.ndarray | None = None) -> np.ndarray:
    n = noise[offset:offset + base.size].reshape(base.shape)
    if mask is not None:
        n = n * mask
    out = np.add(base, n, dtype=np.int32)
    np.clip(out, 0, maxval, out=out)
    return out.astype(np.uint16 if maxval > 255 else np.uint8)


# ---- datasets -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthInstance:
    """One generated instance. ``dataset_bytes`` is the dataset encoded in ``transfer_syntax_uid`` without File
    Meta (what a C-STORE carries); ``part10_bytes()`` is the file."""

    profile: str
    index: int  # 0-based position in the burst
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    patient_id: str
    study_instance_uid: str
    series_instance_uid: str
    dataset_bytes: bytes

    def file_meta_bytes(self) -> bytes:
        return _file_meta(self.sop_class_uid, self.sop_instance_uid, self.transfer_syntax_uid)

    def part10_bytes(self) -> bytes:
        return self.file_meta_bytes() + self.dataset_bytes

    def dataset(self) -> Dataset:
        """The parsed dataset (with its File Meta)."""
        from pydicom import dcmread

        return dcmread(DicomBytesIO(self.part10_bytes()))


def _file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, "DICM" and the File Meta Information group of a Part-10 file."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    return fp.getvalue()


def _study(rng: random.Random, uids: _Uids, p: Profile) -> dict[str, Any]:
    """Patient and study attributes shared by every image of a study."""
    day = 1 + rng.randrange(28)
    return {
        "PatientName": f"BENCH^{p.modality}{rng.randrange(10**6):06d}",
        "PatientID": f"BENCH{rng.randrange(10**8):08d}",
        "PatientBirthDate": f"19{50 + rng.randrange(45)}0{1 + rng.randrange(9)}{day:02d}",
        "PatientSex": "F" if p.modality == "MG" else rng.choice(["F", "M"]),
        "StudyInstanceUID": uids(),
        "StudyDate": f"202403{day:02d}",
        "StudyTime": f"{8 + rng.randrange(10):02d}{rng.randrange(60):02d}00",
        "AccessionNumber": f"A{rng.randrange(10**9):09d}",
        "StudyID": str(1 + rng.randrange(9999)),
        "ReferringPhysicianName": "REF^BENCH",
        "StudyDescription": p.study_description,
        "FrameOfReferenceUID": uids(),
    }


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _header(p: Profile, study: dict[str, Any], series: dict[str, Any], number: int, view: int, sop_uid: str,
            index: int, seed: int) -> Dataset:
    """Everything but the pixel data of one instance."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = UID(p.sop_class_uid)
    ds.SOPInstanceUID = UID(sop_uid)
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study["StudyDate"]
    ds.StudyTime = study["StudyTime"]
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = series["SeriesTime"]
    ds.AccessionNumber = study["AccessionNumber"]
    ds.Modality = p.modality
    ds.Manufacturer = "BENCH SYNTHETIC"
    ds.InstitutionName = "BENCH HOSPITAL"
    ds.ReferringPhysicianName = study["ReferringPhysicianName"]
    ds.StationName = f"SYNTH{p.modality}01"
    ds.StudyDescription = study["StudyDescription"]
    ds.SeriesDescription = series["SeriesDescription"]
    ds.ManufacturerModelName = f"SYNTH-{p.modality}"
    ds.DeviceSerialNumber = f"{_stable_int(p.name) % 10**6:06d}"
    ds.SoftwareVersions = IMPLEMENTATION_VERSION
    ds.PatientName = study["PatientName"]
    ds.PatientID = study["PatientID"]
    ds.PatientBirthDate = study["PatientBirthDate"]
    ds.PatientSex = study["PatientSex"]
    ds.BodyPartExamined = p.body_part
    ds.StudyInstanceUID = study["StudyInstanceUID"]
    ds.SeriesInstanceUID = series["SeriesInstanceUID"]
    ds.StudyID = study["StudyID"]
    ds.SeriesNumber = series["SeriesNumber"]
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = number
    ds.SamplesPerPixel = p.samples
    ds.PhotometricInterpretation = "RGB" if p.samples == 3 else "MONOCHROME2"
    if p.samples == 3:
        ds.PlanarConfiguration = 0
    ds.Rows = p.rows
    ds.Columns = p.cols
    ds.BitsAllocated = p.bits_allocated
    ds.BitsStored = p.bits_stored
    ds.HighBit = p.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "00"
    if p.modality in ("CT", "MR"):
        _cross_sectional(ds, p, study, series, number)
    elif p.modality in ("DX", "MG"):
        _projection(ds, p, view)
    else:
        _ultrasound(ds, p)
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "LO", p.name)
    block.add_new(0x11, "UL", index)
    block.add_new(0x12, "LO", str(seed))
    block.add_new(0x13, "US", GENERATOR_VERSION)
    block.add_new(0x14, "DS", _ds((number - 1) / max(1, series["size"] - 1)))
    return ds


def _cross_sectional(ds: Dataset, p: Profile, study: dict[str, Any], series: dict[str, Any], number: int) -> None:
    ct = p.modality == "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    thickness = 1.0 if ct else 4.0
    z_mm = -(number - 1) * thickness
    ds.SliceThickness = _ds(thickness)
    if ct:
        ds.KVP = "120"
        ds.XRayTubeCurrent = 200
        ds.ExposureTime = 500
        ds.ConvolutionKernel = "STANDARD"
        ds.PatientPosition = "FFS"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = ["40", "-600"]
        ds.WindowWidth = ["400", "1500"]
        ds.WindowCenterWidthExplanation = ["SOFT TISSUE", "LUNG"]
    else:
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = series["RepetitionTime"]
        ds.EchoTime = series["EchoTime"]
        ds.EchoTrainLength = 1
        ds.MagneticFieldStrength = "3"
        ds.ImagingFrequency = "127.74"
        ds.SpacingBetweenSlices = _ds(thickness)
        ds.PatientPosition = "HFS"
        ds.WindowCenter = "900"
        ds.WindowWidth = "1800"
    spacing = (500.0 if ct else 230.0) / p.cols
    x0 = -spacing * p.cols / 2
    ds.ImagePositionPatient = [_ds(x0), _ds(x0), _ds(z_mm)]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = study["FrameOfReferenceUID"]
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(z_mm)
    ds.PixelSpacing = [_ds(spacing), _ds(spacing)]


def _projection(ds: Dataset, p: Profile, view: int) -> None:
    """DX / MG for presentation: DX Series, DX Image, DX Detector, DX Positioning, Mammography Image."""
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.BurnedInAnnotation = "NO"
    ds.DetectorType = "DIRECT" if p.modality == "MG" else "SCINTILLATOR"
    ds.KVP = "28" if p.modality == "MG" else "125"
    ds.ExposureInuAs = 80000 if p.modality == "MG" else 2500
    ds.DistanceSourceToDetector = "660" if p.modality == "MG" else "1800"
    pitch = 0.07 if p.modality == "MG" else 0.2
    ds.ImagerPixelSpacing = [_ds(pitch), _ds(pitch)]
    ds.PixelSpacing = [_ds(pitch), _ds(pitch)]
    ds.WindowCenter = "2048"
    ds.WindowWidth = "4096"
    if p.modality == "DX":
        name, orientation, _ = DX_VIEWS[view]
        ds.ViewPosition = name
        ds.PatientOrientation = orientation
        ds.AnatomicRegionSequence = [_code("T-D3000", "SRT", "Chest")]
        ds.ImageLaterality = "U"
    else:
        laterality, position, orientation = MG_VIEWS[view]
        ds.ImageLaterality = laterality
        ds.ViewPosition = position
        ds.PatientOrientation = orientation
        ds.PositionerType = "MAMMOGRAPHIC"
        ds.OrganExposed = "BREAST"
        ds.BreastImplantPresent = "NO"
        ds.PartialView = "NO"
        ds.BodyPartThickness = "52"
        ds.CompressionForce = "110"
        ds.AnatomicRegionSequence = [_code("T-04000", "SRT", "Breast")]
        ds.ViewCodeSequence = [_code("R-10242", "SRT", "cranio-caudal") if position == "CC"
                               else _code("R-10226", "SRT", "medio-lateral oblique")]


def _ultrasound(ds: Dataset, p: Profile) -> None:
    """US Image, Cine and Multi-frame modules, and a US region (for calibrated measurements)."""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL", "0001"]
    ds.NumberOfFrames = p.frames
    ds.FrameTime = "33.3"
    ds.CineRate = 30
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.TransducerData = ["C5-1", "", ""]
    ds.ProcessingFunction = "ABDOMEN"
    ds.MechanicalIndex = "1.1"
    ds.PatientOrientation = ""
    region = Dataset()
    region.RegionSpatialFormat = 1  # 2D
    region.RegionDataType = 1  # tissue
    region.RegionFlags = 0
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 0, 20
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = p.cols - 1, p.rows - 1
    region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3  # cm
    region.PhysicalDeltaX = region.PhysicalDeltaY = 0.025
    region.ReferencePixelX0, region.ReferencePixelY0 = p.cols // 2, 0
    ds.SequenceOfUltrasoundRegions = [region]


def _pixels(p: Profile, series: dict[str, Any], in_series: int, view: int, noise: np.ndarray,
            offsets: np.random.Generator) -> np.ndarray:
    """The pixel array of one instance: (rows, cols), or (frames, rows, cols, 3) for US."""
    maxval = (1 << p.bits_stored) - 1
    if p.modality == "US":
        base, mask = _us_base(p.rows, p.cols)
        frames = np.empty((p.frames, p.rows, p.cols, 3), dtype=np.uint8)
        yy, xx = np.mgrid[0:p.rows, 0:p.cols]
        box = (slice(p.rows // 3, p.rows // 3 + p.rows // 6), slice(p.cols // 2, p.cols // 2 + p.cols // 8))
        for f in range(p.frames):
            gray = _noisy(base, noise, int(offsets.integers(NOISE_SLACK)), maxval, mask)
            phase = 2 * np.pi * f / max(p.frames, 1)
            # a moving echo (a valve leaflet), drawn in its bounding box only
            cy, cx = int(p.rows * (0.5 + 0.06 * np.sin(phase))), int(p.cols * 0.45)
            sl = (slice(max(cy - 14, 0), cy + 15), slice(max(cx - 40, 0), cx + 41))
            leaflet = ((yy[sl] - cy) / 6.0) ** 2 + ((xx[sl] - cx) / 40.0) ** 2 <= 1.0
            gray[sl][leaflet] = 230
            frames[f] = gray[:, :, None]
            # colour Doppler box: red towards, blue away, pulsing with the frame
            by, bx = yy[box], xx[box]
            flow = np.sin(by / 9.0 + bx / 23.0 + phase) * 127.0 * (0.6 + 0.4 * np.cos(phase))
            rgb = frames[f][box]
            towards = flow > 25
            away = flow < -25
            rgb[towards] = np.stack([np.clip(flow[towards] + 128, 0, 255), flow[towards] * 0.3,
                                     np.zeros(int(towards.sum()))], axis=1).astype(np.uint8)
            rgb[away] = np.stack([np.zeros(int(away.sum())), -flow[away] * 0.4,
                                  np.clip(128 - flow[away], 0, 255)], axis=1).astype(np.uint8)
            frames[f][box] = rgb
        return frames
    if p.modality == "CT":
        level = round(series["z"](in_series) * (CT_LEVELS - 1))
        base = _ct_base(p.rows, p.cols, level)
    elif p.modality == "MR":
        level = round(series["z"](in_series) * (MR_LEVELS - 1))
        base = _mr_base(p.rows, p.cols, level, series["contrast"])
    elif p.modality == "DX":
        base = _dx_base(p.rows, p.cols, view)
    else:
        base = _mg_base(p.rows, p.cols, view)
    return _noisy(base, noise, int(offsets.integers(NOISE_SLACK)), maxval)


def _encode(ds: Dataset, arr: np.ndarray, ts: str) -> bytes:
    """The dataset with ``arr`` as its pixel data, encoded in ``ts`` (no File Meta)."""
    if ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ds.PixelData = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        ds["PixelData"].VR = "OW" if arr.dtype.itemsize == 2 else "OB"
    else:
        plugin = _plugin(ts)
        if plugin is None:
            raise RuntimeError(f"no encoder installed for {UID(ts).name} (pip install -e '.[bench]')")
        ds.compress(ts, arr, encoding_plugin=plugin, generate_instance_uid=False)
        del ds.file_meta
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, ts == ImplicitVRLittleEndian
    write_dataset(fp, ds)
    return fp.getvalue()


def iter_instances(profile: str | Profile, count: int | None = None, seed: int = 1, transfer_syntax: str | None = None,
                   *, frames: int | None = None, size: int | None = None) -> Iterator[SynthInstance]:
    """``count`` instances of a profile (default: its ``default_count``), generated in memory one at a time.

    ``transfer_syntax``: a name of ``TRANSFER_SYNTAXES`` or a UID (None = Explicit VR Little Endian). The pixel
    data depends only on (profile, seed), so every transfer syntax decodes to the same pixels; the UIDs also
    depend on the transfer syntax, so bursts in different syntaxes never collide in one archive.
    """
    p = get_profile(profile, frames=frames, size=size)
    count = p.default_count if count is None else count
    ts = ts_uid(transfer_syntax)
    rng = random.Random(f"{p.name}-{p.rows}x{p.cols}-f{p.frames}-s{seed}-{ts}-v{GENERATOR_VERSION}")
    uids = _Uids(rng)
    noise = _noise_bank(p.rows * p.cols, p.noise, p.modality == "MR", seed)
    offsets = np.random.default_rng([seed, _stable_int(p.name) % 2**32, p.rows, p.cols])
    per_study = p.study_size or count
    study: dict[str, Any] = {}
    series: dict[str, Any] = {}
    in_series = series_index = 0
    for index in range(count):
        in_study = index % per_study
        if in_study == 0:
            study = _study(rng, uids, p)
            series_index = 0
        study_len = min(per_study, count - (index - in_study))
        per_series = p.series_size or study_len
        view = in_study % (len(MG_VIEWS) if p.modality == "MG" else len(DX_VIEWS))  # DX, MG: views in turn
        if in_study % per_series == 0:
            size_ = min(per_series, study_len - in_study)
            series = _series(p, uids, series_index, size_, view)
            series_index += 1
            in_series = 0
        sop_uid = uids()
        ds = _header(p, study, series, in_series + 1, view, sop_uid, index, seed)
        data = _encode(ds, _pixels(p, series, in_series, view, noise, offsets), ts)
        yield SynthInstance(p.name, index, p.sop_class_uid, sop_uid, ts, study["PatientID"],
                            study["StudyInstanceUID"], series["SeriesInstanceUID"], data)
        in_series += 1


def _series(p: Profile, uids: _Uids, s: int, size: int, view: int) -> dict[str, Any]:
    name, tr, te, contrast = MR_PROTOCOLS[s % len(MR_PROTOCOLS)]
    description = {
        "CT": "AXIAL 1MM STANDARD",
        "MR": f"{name} {s + 1}",
        "DX": DX_VIEWS[view % len(DX_VIEWS)][2] if size == 1 else "CHEST",
        "MG": " ".join(MG_VIEWS[view][:2]) if size == 1 else "SCREENING MAMMOGRAPHY",
        "US": "ABDOMEN 2D",
    }[p.modality]
    return {
        "SeriesInstanceUID": uids(),
        "SeriesNumber": s + 1,
        "SeriesTime": f"{8 + s // 6:02d}{(s * 10) % 60:02d}00",
        "SeriesDescription": description,
        "RepetitionTime": tr,
        "EchoTime": te,
        "contrast": contrast,
        "size": size,
        "z": lambda i: i / max(1, size - 1),
    }


def write_folder(profile: str | Profile, count: int | None, seed: int, transfer_syntax: str | None, folder: Path,
                 *, frames: int | None = None, size: int | None = None) -> list[Path]:
    """Write the instances of ``iter_instances`` as Part-10 files ``<profile><n>.dcm`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    p = get_profile(profile, frames=frames, size=size)
    count = p.default_count if count is None else count
    width = len(str(count))
    paths = []
    for inst in iter_instances(p, count, seed, transfer_syntax):
        path = folder / f"{p.name}{inst.index + 1:0{width}d}.dcm"
        with open(path, "wb") as f:
            f.write(inst.file_meta_bytes())
            f.write(inst.dataset_bytes)
        paths.append(path)
    return paths


# ---- the cache -----------------------------------------------------------------------------------------


def load_or_generate(spec: BurstSpec, cache: Path = DEFAULT_CACHE, log: bool = True) -> Burst:
    """The burst for ``spec``, generated once into the cache (atomically: a half-written burst is never used)."""
    root = cache / spec.key
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        work = cache / f".{spec.key}.{os.getpid()}.tmp"
        shutil.rmtree(work, ignore_errors=True)
        (work / "all").mkdir(parents=True)
        t0 = time.perf_counter()
        if log:
            print(f"generating {spec.key} in {root} ...", file=sys.stderr, flush=True)
        write_folder(spec.profile, spec.count, spec.seed, spec.ts, work / "all")
        files = sorted(p.name for p in (work / "all").iterdir())
        total = sum((work / "all" / f).stat().st_size for f in files)
        (work / MANIFEST).write_text(json.dumps({"spec": spec.__dict__, "files": files, "total_bytes": total}))
        shutil.rmtree(root, ignore_errors=True)
        os.rename(work, root)
        if log:
            print(f"generated {len(files)} files, {total / 1e6:.1f} MB in {time.perf_counter() - t0:.1f}s",
                  file=sys.stderr, flush=True)
    manifest = json.loads(manifest_path.read_text())
    folder = root / "all"
    return Burst(spec, folder, tuple(folder / f for f in manifest["files"]), int(manifest["total_bytes"]))


def split(burst: Burst, k: int) -> list[Path]:
    """K folders holding contiguous, near-equal runs of the burst's files (hard links), for K associations."""
    if not 1 <= k <= len(burst.files):
        raise ValueError(f"k must be between 1 and {len(burst.files)}, got {k}")
    base = burst.folder.parent / f"k{k}"
    folders = [base / str(i) for i in range(k)]
    done = base / ".complete"
    if done.is_file():
        return folders
    shutil.rmtree(base, ignore_errors=True)
    n = len(burst.files)
    for i, folder in enumerate(folders):
        folder.mkdir(parents=True)
        for src in burst.files[i * n // k:(i + 1) * n // k]:
            try:
                os.link(src, folder / src.name)
            except OSError:
                shutil.copy2(src, folder / src.name)
    done.write_text("")
    return folders


def _profile_table() -> str:
    lines = ["| profile | SOP class | matrix | bits | frames | per series | per study | default count | MB each |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for p in PROFILES.values():
        matrix = f"{p.rows} x {p.cols}" + (" RGB" if p.samples == 3 else "")
        lines.append(f"| {p.name} | {UID(p.sop_class_uid).name} | {matrix} | {p.bits_stored}/{p.bits_allocated} | "
                     f"{p.frames} | {p.series_size or 'all'} | {p.study_size or 'all'} | {p.default_count} | "
                     f"{p.pixel_bytes / 1e6:.2f} |")
    encoders = ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in available_transfer_syntaxes().items())
    return "\n".join(lines) + f"\n\nencoders: {encoders}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", "--kind", dest="profile", choices=list(PROFILES), default="ct",
                        help="what to generate (--kind is the old name)")
    parser.add_argument("--count", type=int, help="number of instances (default: the profile's, see --list)")
    parser.add_argument("--size", type=int, help="rows = columns (default: the profile's)")
    parser.add_argument("--frames", type=int, help="frames per instance (multi-frame profiles: us)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--ts", choices=list(TRANSFER_SYNTAXES), default="none",
                        help="transfer syntax: none = Explicit VR Little Endian")
    parser.add_argument("--out", type=Path, help="write Part-10 files into this folder (no cache, no split)")
    parser.add_argument("--k", type=int, default=1, help="split the cached burst into this many folders")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--list", action="store_true", help="print the profiles and the encoders installed")
    args = parser.parse_args(argv)
    if args.list:
        print(_profile_table())
        return 0
    if not available_transfer_syntaxes()[args.ts]:
        print(f"error: no encoder installed for --ts {args.ts} (pip install -e '.[bench]')", file=sys.stderr)
        return 2
    if args.out is not None:
        t0 = time.perf_counter()
        paths = write_folder(args.profile, args.count, args.seed, args.ts, args.out, frames=args.frames,
                             size=args.size)
        total = sum(p.stat().st_size for p in paths)
        elapsed = time.perf_counter() - t0
        print(f"{len(paths)} files, {total / 1e6:.1f} MB in {args.out} in {elapsed:.1f}s "
              f"({len(paths) / max(elapsed, 1e-9):.0f} files/s)", file=sys.stderr)
        return 0
    if args.profile in ("ct", "mr") and args.frames is None:  # the cache keys of the compare scenarios
        make = ct_spec if args.profile == "ct" else mr_spec
        kwargs = {k: v for k, v in (("count", args.count), ("size", args.size)) if v is not None}
        spec = make(seed=args.seed, ts=args.ts, **kwargs)
    else:
        spec = profile_spec(args.profile, args.count, args.seed, args.ts, args.frames, args.size)
    burst = load_or_generate(spec, args.cache)
    for folder in split(burst, args.k):
        print(folder)
    print(f"{len(burst.files)} files, {burst.total_bytes / 1e6:.1f} MB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
