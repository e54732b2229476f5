"""zstd on DICOM, as the nearline tier stores it: ratio and MB/s per core, and whether a header dictionary pays.

Each file is compressed the way tiering/archive.py writes a member: cut into ``frame_bytes`` pieces, each an
independent zstd frame with content size and checksum, one thread. MB/s are of ORIGINAL bytes per second on one
core (best of ``--repeats`` runs, each run bounded by ``--run-s-max``), the ratio is original / compressed bytes.

Corpora: synthetic CT and MR instances (bench/synth.py, Explicit VR Little Endian, Part-10 files), pydicom's own
test files (``pydicom.data.get_testdata_files()``), and, when present, the larger files of the pydicom-data
package (its ``data_store/data`` folder, installed or given with ``--extra-dir``).

Dictionary: trained (``zstandard.train_dictionary``) on the first ``--sample-bytes`` of one set of files and
measured on another (synthetic: another seed; pydicom: every other file), on whole instances and on small ones
(pydicom files under 16 KiB, and the first 4 KiB of each synthetic instance: the size of an SR, a key object
selection or a presentation state, which are nearly all header).

    python -m bench.compress                      # ~1 minute on one core
    python -m bench.compress --quick --json out.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import zstandard

from bench import synth

FRAME_BYTES = 4 << 20  # the nearline tier's default frame_bytes
LEVELS = (1, 3, 9)
SMALL_BYTES = 16 << 10


@dataclass
class LevelResult:
    corpus: str
    files: int
    mbytes: float
    level: int
    ratio: float
    compress_mb_s: float
    decompress_mb_s: float


@dataclass
class DictResult:
    corpus: str
    files: int
    mean_bytes: int
    ratio_plain: float
    ratio_dict: float
    compress_mb_s_plain: float
    compress_mb_s_dict: float
    decompress_mb_s_plain: float
    decompress_mb_s_dict: float


def synthetic(profile: str, count: int, seed: int) -> list[bytes]:
    return [inst.part10_bytes() for inst in synth.iter_instances(profile, count, seed)]


def pydicom_files() -> list[bytes]:
    from pydicom.data import get_testdata_files

    return [Path(p).read_bytes() for p in sorted(get_testdata_files()) if Path(p).is_file()]


def pydicom_data_dir(extra: Path | None) -> Path | None:
    """The pydicom-data files: ``--extra-dir``, else the installed package's folder, else None."""
    if extra is not None:
        return extra
    spec = importlib.util.find_spec("data_store")
    if spec is not None and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations))) / "data"
        return folder if folder.is_dir() else None
    return None


def _pieces(data: bytes) -> list[bytes]:
    return [data[i : i + FRAME_BYTES] for i in range(0, len(data), FRAME_BYTES)] or [b""]


def _timed(run: Callable[[], object], repeats: int, run_s_max: float) -> float:
    """Best wall time of up to ``repeats`` runs (fewer once ``run_s_max`` seconds were spent)."""
    best = float("inf")
    spent = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
        if spent > run_s_max:
            break
    return best


def measure(files: list[bytes], level: int, repeats: int, run_s_max: float,
            dictionary: zstandard.ZstdCompressionDict | None = None) -> tuple[float, float, float]:
    """(ratio, compress MB/s, decompress MB/s) of ``files``, one frame per FRAME_BYTES piece."""
    pieces = [p for f in files for p in _pieces(f)]
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True,
                                    dict_data=dictionary)
    dctx = zstandard.ZstdDecompressor(dict_data=dictionary)
    frames: list[bytes] = []

    def compress() -> None:
        frames[:] = [cctx.compress(p) for p in pieces]

    def decompress() -> None:
        for frame in frames:
            dctx.decompress(frame)

    original = sum(len(p) for p in pieces)
    t_c = _timed(compress, repeats, run_s_max)
    t_d = _timed(decompress, repeats, run_s_max)
    assert [dctx.decompress(f) for f in frames] == pieces  # byte-exact, or the numbers mean nothing
    stored = sum(len(f) for f in frames)
    return original / stored, original / t_c / 1e6, original / t_d / 1e6


@dataclass
class BackendResult:
    corpus: str
    level: int
    files: int
    mbytes: float
    put_sync_mb_s: float  # original bytes/s through put + sync (compression, write, fsync, rename)
    iter_read_mb_s: float  # original bytes/s through iter_read of every blob (page cache warm)
    first_read_ms: float  # one instance from a backend just opened: open, header, decompress


def nearline_throughput(name: str, files: list[bytes], level: int, work: Path) -> BackendResult:
    """The same files through a NearlineBackend on ``work`` (one archive, as a study): the end-to-end cost."""
    import hashlib

    from appliance.config_tiering import TierConfig, TierVolumeConfig
    from appliance.store.backend import BlobMeta, BlobSource
    from tiering.nearline import init_tier, open_nearline

    class Source(BlobSource):
        def __init__(self, data: bytes) -> None:
            self.data, self.size = data, len(data)

        def chunks(self, chunk_bytes: int) -> Iterator[bytes]:
            for start in range(0, len(self.data), chunk_bytes):
                yield self.data[start : start + chunk_bytes]

    tier = TierConfig("bench", "nearline", volumes=(TierVolumeConfig("v", work / f"{name}-{level}".replace(" ", "_"),
                                                                     0.999),), compression_level=level)
    init_tier(tier)
    metas = [BlobMeta(hashlib.sha256(f).hexdigest(), len(f), 1, "BENCH") for f in files]
    backend = open_nearline(tier)
    start = time.perf_counter()
    backend.begin_container("study")
    locations = [backend.put(m, Source(f)) for m, f in zip(metas, files, strict=True)]
    backend.sync()
    put_s = time.perf_counter() - start
    backend.close()
    fresh = open_nearline(tier)
    start = time.perf_counter()
    assert fresh.read(locations[len(locations) // 2]) == files[len(files) // 2]
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    for loc in locations:
        for _chunk in fresh.iter_read(loc):
            pass
    read_s = time.perf_counter() - start
    fresh.close()
    total = sum(map(len, files))
    return BackendResult(name, level, len(files), round(total / 1e6, 1), round(total / put_s / 1e6, 1),
                         round(total / read_s / 1e6, 1), round(first_s * 1e3, 2))


def train(samples: list[bytes], dict_bytes: int) -> zstandard.ZstdCompressionDict:
    buffers: list[bytes | bytearray | memoryview] = list(samples)
    return zstandard.train_dictionary(dict_bytes, buffers)


def run(count_ct: int, count_mr: int, extra_dir: Path | None, repeats: int, run_s_max: float, sample_bytes: int,
        dict_bytes: int, progress: Callable[[str], None], work_dir: Path | None = None) -> dict[str, object]:
    corpora: dict[str, list[bytes]] = {}
    progress("generating synthetic CT and MR")
    corpora["synthetic CT"] = synthetic("ct", count_ct, 1)
    corpora["synthetic MR"] = synthetic("mr", count_mr, 1)
    corpora["pydicom test files"] = pydicom_files()
    data_dir = pydicom_data_dir(extra_dir)
    if data_dir is not None:
        corpora["pydicom-data"] = [p.read_bytes() for p in sorted(data_dir.glob("*.dcm"))]
    levels: list[LevelResult] = []
    for name, files in corpora.items():
        for level in LEVELS:
            progress(f"{name}: level {level}")
            ratio, c, d = measure(files, level, repeats, run_s_max)
            levels.append(LevelResult(name, len(files), round(sum(map(len, files)) / 1e6, 1), level,
                                      round(ratio, 3), round(c, 1), round(d, 1)))

    # Dictionary: train on other files than those measured.
    progress("dictionaries")
    # zstd's trainer wants at least a few dozen samples: MR instances are cheap to make, so they fill up.
    train_synth = synthetic("ct", max(4, count_ct // 2), 2) + synthetic("mr", max(40, count_mr // 2), 2)
    synth_dict = train([f[:sample_bytes] for f in train_synth], dict_bytes)
    pyd = corpora["pydicom test files"] + corpora.get("pydicom-data", [])
    pyd_train, pyd_eval = pyd[0::2], pyd[1::2]
    pyd_dict = train([f[:sample_bytes] for f in pyd_train], dict_bytes)
    cases = [
        ("synthetic CT+MR, whole", corpora["synthetic CT"] + corpora["synthetic MR"], synth_dict),
        ("synthetic CT+MR, first 4 KiB", [f[:4096] for f in corpora["synthetic CT"] + corpora["synthetic MR"]],
         synth_dict),
        ("pydicom, whole", pyd_eval, pyd_dict),
        (f"pydicom, files < {SMALL_BYTES >> 10} KiB", [f for f in pyd_eval if len(f) < SMALL_BYTES], pyd_dict),
    ]
    dicts: list[DictResult] = []
    for name, files, dictionary in cases:
        progress(f"dictionary: {name}")
        plain = measure(files, 3, repeats, run_s_max)
        with_dict = measure(files, 3, repeats, run_s_max, dictionary)
        dicts.append(DictResult(name, len(files), sum(map(len, files)) // max(1, len(files)), round(plain[0], 3),
                                round(with_dict[0], 3), round(plain[1], 1), round(with_dict[1], 1),
                                round(plain[2], 1), round(with_dict[2], 1)))
    progress("through the nearline backend")
    backends: list[BackendResult] = []
    with tempfile.TemporaryDirectory(dir=work_dir) as work:
        for name in ("synthetic CT", "synthetic MR"):
            for level in (0, 3):
                backends.append(nearline_throughput(name, corpora[name], level, Path(work)))
    return {"frame_bytes": FRAME_BYTES, "sample_bytes": sample_bytes, "dict_bytes": dict_bytes,
            "zstandard": zstandard.__version__, "zstd": ".".join(map(str, zstandard.ZSTD_VERSION)),
            "levels": [asdict(r) for r in levels], "dictionary": [asdict(r) for r in dicts],
            "nearline": [asdict(r) for r in backends]}


def tables(result: dict[str, object]) -> str:
    lines = ["| corpus | files | MB | level | ratio | compress MB/s | decompress MB/s |", "|---|---|---|---|---|---|---|"]
    for r in result["levels"]:  # type: ignore[attr-defined]
        lines.append(f"| {r['corpus']} | {r['files']} | {r['mbytes']} | {r['level']} | {r['ratio']:.2f} | "
                     f"{r['compress_mb_s']:.0f} | {r['decompress_mb_s']:.0f} |")
    lines += ["", "| level 3, dictionary | files | mean bytes | ratio without | ratio with | compress MB/s without "
                  "/ with | decompress MB/s without / with |", "|---|---|---|---|---|---|---|"]
    for r in result["dictionary"]:  # type: ignore[attr-defined]
        lines.append(f"| {r['corpus']} | {r['files']} | {r['mean_bytes']} | {r['ratio_plain']:.2f} | "
                     f"{r['ratio_dict']:.2f} | {r['compress_mb_s_plain']:.0f} / {r['compress_mb_s_dict']:.0f} | "
                     f"{r['decompress_mb_s_plain']:.0f} / {r['decompress_mb_s_dict']:.0f} |")
    lines += ["", "| through NearlineBackend | level | files | MB | put + sync MB/s | iter_read MB/s | first read ms |",
              "|---|---|---|---|---|---|---|"]
    for r in result["nearline"]:  # type: ignore[attr-defined]
        lines.append(f"| {r['corpus']} | {r['level']} | {r['files']} | {r['mbytes']} | {r['put_sync_mb_s']:.0f} | "
                     f"{r['iter_read_mb_s']:.0f} | {r['first_read_ms']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compress", description=__doc__.split("\n")[0])
    parser.add_argument("--ct", type=int, default=60, help="synthetic CT instances (0.5 MiB each)")
    parser.add_argument("--mr", type=int, default=150, help="synthetic MR instances (130 KiB each)")
    parser.add_argument("--extra-dir", type=Path, help="the pydicom-data files (its data_store/data folder)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--run-s-max", type=float, default=2.0, help="stop repeating a measurement after this")
    parser.add_argument("--sample-bytes", type=int, default=4096, help="bytes of each file a dictionary learns")
    parser.add_argument("--dict-bytes", type=int, default=64 << 10)
    parser.add_argument("--quick", action="store_true", help="a few files, one run each (the test's setting)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--work-dir", type=Path, help="where the nearline measurement writes (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.quick:
        args.ct, args.mr, args.repeats, args.dict_bytes = 4, 8, 1, 4 << 10
    result = run(args.ct, args.mr, args.extra_dir, args.repeats, args.run_s_max, args.sample_bytes,
                 args.dict_bytes, lambda msg: print(f"... {msg}", file=sys.stderr, flush=True), args.work_dir)
    print(tables(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
