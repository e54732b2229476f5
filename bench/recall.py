"""Reads across tiers and recall time: the latency of reading one instance from an online volume against a nearline
tier (decompressed), and the time to recall a study from the virtual tape library (`appliance tier run` moves it
there, the recaller brings it back).

    python -m bench.recall [--instances 100] [--reads 50] [--profile ct] [--load-s 0] [--json OUT]

Synthetic CT/MR from bench/synth.py; everything in a temporary folder, removed at the end. The virtual library's
simulated load/seek times are 0 unless --load-s / --seek-s-per-gib are given (a real LTO drive: ~15 s to load,
~0.3 s per GiB skipped), so the recall time measured is the appliance's own cost."""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

DAY_NS = 86_400 * 10**9


def _config(root: Path, load_s: float, seek_s_per_gib: float) -> Path:
    text = f"""
[storage]
index_path = "{root}/index"

[[volumes]]
name = "vol0"
path = "{root}/vol0"

[tiering]
audit_log = "{root}/audit.jsonl"
rate_bytes_per_s = 10737418240

[[tiers]]
name = "nl"
kind = "nearline"
volumes = [{{name = "nl0", path = "{root}/nl0"}}]

[[tiers]]
name = "tape"
kind = "tape"
mode = "virtual"
path = "{root}/library"
cartridge_bytes = 4294967296
cartridges = 2
load_s = {load_s}
seek_s_per_gib = {seek_s_per_gib}

[[policies]]
name = "to-nearline"
from = "online"
to = "nl"
received_days_min = 30

[[policies]]
name = "to-tape"
from = "nl"
to = "tape"
received_days_min = 365
"""
    path = root / "appliance.toml"
    path.write_text(text)
    return path


def _cli(config: Path, *args: str, days_later: int = 0) -> str:
    env = {**os.environ, "APPLIANCE_TIER_NOW": str(time.time_ns() + days_later * DAY_NS)}
    result = subprocess.run([sys.executable, "-m", "appliance", *args, "-c", str(config)], capture_output=True,
                            text=True, env=env, timeout=3600)
    if result.returncode != 0:
        raise SystemExit(f"appliance {' '.join(args)}: {result.stderr}")
    return result.stdout


def _ingest(config_path: Path, files: list[Path]) -> str:
    from appliance.config import load_config
    from appliance.index.db import IndexEntry, StudyIndex
    from appliance.index.records import read_header_blob
    from appliance.store.backend import BlobMeta, BlobSource
    from appliance.store.online import BlobStore
    from appliance.store.segments import committed_ends, segment_copy
    from appliance.store.volumes import init_volume

    class Source(BlobSource):
        def __init__(self, data: bytes) -> None:
            self.data, self.size = data, len(data)

        def chunks(self, chunk_bytes: int) -> Iterator[bytes]:
            for i in range(0, self.size, chunk_bytes):
                yield self.data[i : i + chunk_bytes]

    config = load_config(config_path)
    init_volume(config.volumes[0].path, "vol0")
    index = StudyIndex(config.storage.index_path)
    store = BlobStore.open(config, index=index)
    try:
        backend = store.segment_backend("vol0")
        entries = []
        for n, path in enumerate(files):
            raw = path.read_bytes()
            digest = hashlib.sha256(raw).hexdigest()
            t = time.time_ns() + n
            location = backend.put(BlobMeta(digest, len(raw), t, "BENCH"), Source(raw))
            header, ts = read_header_blob(functools.partial(_bytes_io, raw), len(raw))
            entries.append(IndexEntry(header, digest, len(raw), ts, t, "BENCH", segment_copy("vol0", location, t)))
        backend.seal_active()
        backend.sync()
        index.apply(entries, "keep-first", committed_ends(e.copy for e in entries),
                    [("vol0", s) for s in backend.take_sealed()])
        return entries[0].header.study["StudyInstanceUID"]
    finally:
        store.close()
        index.close()


def _bytes_io(raw: bytes) -> io.BytesIO:
    return io.BytesIO(raw)


def _read_latency_ms(config_path: Path, study: str, reads: int) -> dict[str, float]:
    from appliance.config import load_config
    from appliance.index.db import StudyIndex
    from appliance.store.online import BlobStore
    from tiering.recall import open_tiers

    config = load_config(config_path)
    index = StudyIndex(config.storage.index_path)
    store = BlobStore.open(config, tiers=open_tiers(config))
    try:
        instances = index.instances_under(study)
        samples = []
        for i in range(reads):
            _key, rec = instances[i % len(instances)]
            blob = index.blob(rec.digest)
            assert blob is not None
            started = time.perf_counter()
            store.read_all(rec.digest, blob)
            samples.append((time.perf_counter() - started) * 1000)
        return {"p50_ms": round(statistics.median(samples), 3), "mean_ms": round(statistics.fmean(samples), 3),
                "instance_bytes": instances[0][1].size}
    finally:
        store.close()
        index.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.recall", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="ct")
    ap.add_argument("--instances", type=int, default=100)
    ap.add_argument("--reads", type=int, default=50)
    ap.add_argument("--load-s", type=float, default=0.0)
    ap.add_argument("--seek-s-per-gib", type=float, default=0.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    from bench.synth import write_folder

    with tempfile.TemporaryDirectory(prefix="bench-recall-") as tmp:
        root = Path(tmp)
        config = _config(root, args.load_s, args.seek_s_per_gib)
        files = write_folder(args.profile, args.instances, 7, "none", root / "in")
        study = _ingest(config, files)
        study_bytes = sum(f.stat().st_size for f in files)
        for tier in ("nl", "tape"):
            _cli(config, "tier", "init", tier)
        online = _read_latency_ms(config, study, args.reads)
        _cli(config, "tier", "run", days_later=40)
        nearline = _read_latency_ms(config, study, args.reads)
        _cli(config, "tier", "run", days_later=400)
        started = time.perf_counter()
        _cli(config, "tier", "recall", study, "--wait")
        recall_s = time.perf_counter() - started
        _cli(config, "verify")
        result = {"profile": args.profile, "instances": args.instances, "study_bytes": study_bytes,
                  "read_online": online, "read_nearline": nearline, "recall_s": round(recall_s, 3),
                  "recall_mb_per_s": round(study_bytes / recall_s / 1e6, 1),
                  "load_s": args.load_s, "seek_s_per_gib": args.seek_s_per_gib}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
