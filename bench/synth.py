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
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from bench.phantoms import CT_LEVELS, MR_LEVELS, NOISE_SLACK, _noise_bank, _pixels, clear_caches
from bench.profiles import (
    _TS_NAMES,
    CT_IMAGE_STORAGE,
    DX_PRESENTATION_STORAGE,
    DX_VIEWS,
    GENERATOR_VERSION,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION,
    MG_PRESENTATION_STORAGE,
    MG_VIEWS,
    MR_IMAGE_STORAGE,
    MR_PROTOCOLS,
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    PROFILES,
    TRANSFER_SYNTAXES,
    US_MULTIFRAME_STORAGE,
    Profile,
    SynthInstance,
    _header,
    _plugin,
    _series,
    _stable_int,
    _study,
    _Uids,
    available_transfer_syntaxes,
    get_profile,
    ts_uid,
)

__all__ = [
    "CT_IMAGE_STORAGE", "CT_LEVELS", "DEFAULT_CACHE", "DX_PRESENTATION_STORAGE", "DX_VIEWS", "GENERATOR_VERSION",
    "IMPLEMENTATION_CLASS_UID", "IMPLEMENTATION_VERSION", "MANIFEST", "MG_PRESENTATION_STORAGE", "MG_VIEWS",
    "MR_IMAGE_STORAGE", "MR_LEVELS", "MR_PROTOCOLS", "NOISE_SLACK", "PRIVATE_CREATOR", "PRIVATE_GROUP", "PROFILES",
    "TRANSFER_SYNTAXES", "US_MULTIFRAME_STORAGE", "Burst", "BurstSpec", "Profile", "SynthInstance",
    "available_transfer_syntaxes", "clear_caches", "ct_spec", "default_cache", "get_profile", "iter_instances",
    "load_or_generate",
    "main", "mr_spec", "profile_spec", "split", "ts_uid", "write_folder",
]



def default_cache() -> Path:
    """$BENCH_CACHE, else the user's cache folder ($XDG_CACHE_HOME/appliance/bench, default ~/.cache/appliance/bench):
    the bursts weigh hundreds of MB and are rebuilt at will, so they never belong inside the installed package."""
    if os.environ.get("BENCH_CACHE"):
        return Path(os.environ["BENCH_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "appliance" / "bench"


DEFAULT_CACHE = default_cache()
MANIFEST = "manifest.json"


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
