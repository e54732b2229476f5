"""Deterministic synthetic DICOM bursts for the ingest benchmarks.

Two bursts, both written as Part-10 files in Explicit VR Little Endian:

- ``ct``: one CT series, default 600 axial slices of 512x512 16-bit (about 0.5 MiB a file): a body phantom
  (soft tissue, lungs, spine, table) that changes along z, plus Gaussian noise;
- ``mr``: one MR study, default 2000 images of 256x256 16-bit (about 130 KiB a file) in series of 200, a head
  phantom with noise.

Everything (UIDs, names, dates, pixel noise) is derived from one seed, so the same parameters always give
byte-identical files. UIDs are 2.25.<UUID as integer> (PS3.5 B.2), the UUIDs drawn from the seeded RNG.

A generated burst is cached under ``<cache>/<key>/all/`` (the key holds every parameter), with a manifest;
``split(burst, k)`` makes ``<cache>/<key>/k<K>/<i>/`` folders of hard links (copies where links fail), one per
parallel association, contiguous runs of instances like a modality splitting a series over associations.

    python -m bench.synth --kind ct --count 600 --k 4     # generate (or find in the cache) and split
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
# Bumped whenever the generator's output changes, so stale caches are never reused.
GENERATOR_VERSION = 1
DEFAULT_CACHE = Path(os.environ.get("BENCH_CACHE", Path(__file__).resolve().parent / ".cache"))
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class BurstSpec:
    kind: str  # "ct" or "mr"
    count: int
    rows: int
    cols: int
    seed: int = 1
    series_size: int = 0  # images per series; 0 = one series

    @property
    def key(self) -> str:
        return (f"{self.kind}-n{self.count}-{self.rows}x{self.cols}-ser{self.series_size or self.count}"
                f"-s{self.seed}-v{GENERATOR_VERSION}")


def ct_spec(count: int = 600, size: int = 512, seed: int = 1) -> BurstSpec:
    return BurstSpec("ct", count, size, size, seed, 0)


def mr_spec(count: int = 2000, size: int = 256, seed: int = 1) -> BurstSpec:
    return BurstSpec("mr", count, size, size, seed, 200)


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


# ---- pixel phantoms -----------------------------------------------------------------------------------


def _grid(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    return (x - cols / 2) / (cols / 2), (y - rows / 2) / (rows / 2)  # both in [-1, 1)


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0


def ct_slice(x: np.ndarray, y: np.ndarray, z: float, rng: np.random.Generator) -> np.ndarray:
    """Stored values (unsigned 12 bit, HU = value - 1024) of an axial chest/abdomen slice at z in [0, 1]."""
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
    hu += rng.normal(0.0, 12.0, x.shape).astype(np.float32)
    return np.clip(hu + 1024.0, 0, 4095).astype(np.uint16)


def mr_slice(x: np.ndarray, y: np.ndarray, z: float, contrast: float, rng: np.random.Generator) -> np.ndarray:
    """Stored values (unsigned 12 bit) of an axial head slice at z in [0, 1]; ``contrast`` varies by series."""
    img = np.zeros(x.shape, dtype=np.float32)
    scale = 0.6 + 0.3 * np.sin(np.pi * min(max(z, 0.05), 0.95))
    img[_ellipse(x, y, 0, 0, 0.75 * scale, 0.9 * scale)] = 1400.0  # scalp/skull marrow
    img[_ellipse(x, y, 0, 0, 0.68 * scale, 0.83 * scale)] = 200.0  # skull
    img[_ellipse(x, y, 0, 0, 0.62 * scale, 0.77 * scale)] = 900.0 * contrast  # grey matter
    img[_ellipse(x, y, 0, 0, 0.5 * scale, 0.65 * scale)] = 700.0 + 500.0 * (1.0 - contrast)  # white matter
    img[_ellipse(x, y, -0.12, 0, 0.06 * scale, 0.25 * scale)] = 2200.0 * contrast  # ventricles (CSF)
    img[_ellipse(x, y, 0.12, 0, 0.06 * scale, 0.25 * scale)] = 2200.0 * contrast
    img *= 1.0 - 0.15 * (x**2 + y**2)  # coil sensitivity falloff
    img += np.abs(rng.normal(0.0, 25.0, x.shape)).astype(np.float32)  # Rician-ish background noise
    return np.clip(img, 0, 4095).astype(np.uint16)


# ---- datasets -----------------------------------------------------------------------------------------


def _base(rng: random.Random, uids: _Uids, modality: str) -> dict[str, object]:
    """Patient and study attributes shared by every image of a burst."""
    day = 1 + rng.randrange(28)
    return {
        "PatientName": f"BENCH^{modality}{rng.randrange(10**6):06d}",
        "PatientID": f"BENCH{rng.randrange(10**8):08d}",
        "PatientBirthDate": f"19{50 + rng.randrange(45)}0{1 + rng.randrange(9)}{day:02d}",
        "PatientSex": rng.choice(["F", "M"]),
        "StudyInstanceUID": uids(),
        "StudyDate": f"202403{day:02d}",
        "StudyTime": f"{8 + rng.randrange(10):02d}{rng.randrange(60):02d}00",
        "AccessionNumber": f"A{rng.randrange(10**9):09d}",
        "StudyID": str(1 + rng.randrange(9999)),
        "ReferringPhysicianName": "REF^BENCH",
        "StudyDescription": "CT CHEST ABDOMEN" if modality == "CT" else "MR BRAIN",
        "FrameOfReferenceUID": uids(),
    }


def _image(spec: BurstSpec, common: dict[str, object], series: dict[str, object], number: int, z_mm: float,
           pixels: np.ndarray, sop_uid: str) -> Dataset:
    ds = Dataset()
    ct = spec.kind == "ct"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE if ct else MR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = common["StudyDate"]
    ds.StudyTime = common["StudyTime"]
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = series["SeriesTime"]
    ds.AccessionNumber = common["AccessionNumber"]
    ds.Modality = "CT" if ct else "MR"
    ds.Manufacturer = "BENCH SYNTHETIC"
    ds.InstitutionName = "BENCH HOSPITAL"
    ds.ReferringPhysicianName = common["ReferringPhysicianName"]
    ds.StudyDescription = common["StudyDescription"]
    ds.SeriesDescription = series["SeriesDescription"]
    ds.ManufacturerModelName = "SYNTH-CT" if ct else "SYNTH-MR"
    ds.PatientName = common["PatientName"]
    ds.PatientID = common["PatientID"]
    ds.PatientBirthDate = common["PatientBirthDate"]
    ds.PatientSex = common["PatientSex"]
    ds.BodyPartExamined = "CHEST" if ct else "HEAD"
    thickness = 1.0 if ct else 4.0
    ds.SliceThickness = _ds(thickness)
    if ct:
        ds.KVP = "120"
        ds.XRayTubeCurrent = 200
        ds.ConvolutionKernel = "STANDARD"
        ds.PatientPosition = "FFS"
    else:
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = series["RepetitionTime"]
        ds.EchoTime = series["EchoTime"]
        ds.MagneticFieldStrength = "3"
        ds.ImagingFrequency = "127.74"
        ds.EchoTrainLength = 1
        ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = common["StudyInstanceUID"]
    ds.SeriesInstanceUID = series["SeriesInstanceUID"]
    ds.StudyID = common["StudyID"]
    ds.SeriesNumber = series["SeriesNumber"]
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = number
    spacing = (500.0 if ct else 230.0) / spec.cols
    x0 = -spacing * spec.cols / 2
    ds.ImagePositionPatient = [_ds(x0), _ds(x0), _ds(z_mm)]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = common["FrameOfReferenceUID"]
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(z_mm)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = spec.rows
    ds.Columns = spec.cols
    ds.PixelSpacing = [_ds(spacing), _ds(spacing)]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    if ct:
        ds.WindowCenter = ["40", "-600"]
        ds.WindowWidth = ["400", "1500"]
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
    else:
        ds.WindowCenter = "900"
        ds.WindowWidth = "1800"
    ds.PixelData = pixels.astype("<u2", copy=False).tobytes()
    ds["PixelData"].VR = "OW"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def _generate(spec: BurstSpec, folder: Path) -> None:
    rng = random.Random(f"{spec.key}")  # str seeds are hashed deterministically (sha512), unlike hash()
    nprng = np.random.default_rng([spec.seed, spec.count, spec.rows, spec.cols, 0 if spec.kind == "ct" else 1])
    uids = _Uids(rng)
    modality = "CT" if spec.kind == "ct" else "MR"
    common = _base(rng, uids, modality)
    x, y = _grid(spec.rows, spec.cols)
    per_series = spec.series_size or spec.count
    n_series = -(-spec.count // per_series)
    mr_protocols = [("T1 SE AX", "500", "12", 1.0), ("T2 SE AX", "4000", "100", 1.6), ("PD SE AX", "2500", "20", 1.2),
                    ("FLAIR AX", "9000", "120", 0.7)]
    width = len(str(spec.count))
    number = 0
    for s in range(n_series):
        in_series = min(per_series, spec.count - s * per_series)
        name, tr, te, contrast = mr_protocols[s % len(mr_protocols)]
        series = {
            "SeriesInstanceUID": uids(),
            "SeriesNumber": s + 1,
            "SeriesTime": f"{8 + s // 6:02d}{(s * 10) % 60:02d}00",
            "SeriesDescription": "AXIAL 1MM STANDARD" if spec.kind == "ct" else f"{name} {s + 1}",
            "RepetitionTime": tr,
            "EchoTime": te,
        }
        thickness = 1.0 if spec.kind == "ct" else 4.0
        for i in range(in_series):
            z = i / max(1, in_series - 1)
            pixels = ct_slice(x, y, z, nprng) if spec.kind == "ct" else mr_slice(x, y, z, contrast, nprng)
            ds = _image(spec, common, series, i + 1, -i * thickness, pixels, uids())
            number += 1
            ds.save_as(folder / f"{spec.kind}{number:0{width}d}.dcm", enforce_file_format=True)


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
        _generate(spec, work / "all")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=["ct", "mr"], default="ct")
    parser.add_argument("--count", type=int, help="number of images (default 600 CT, 2000 MR)")
    parser.add_argument("--size", type=int, help="rows = columns (default 512 CT, 256 MR)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--k", type=int, default=1, help="split into this many folders")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args(argv)
    make = ct_spec if args.kind == "ct" else mr_spec
    kwargs = {k: v for k, v in (("count", args.count), ("size", args.size)) if v is not None}
    burst = load_or_generate(make(seed=args.seed, **kwargs), args.cache)
    for folder in split(burst, args.k):
        print(folder)
    print(f"{len(burst.files)} files, {burst.total_bytes / 1e6:.1f} MB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
