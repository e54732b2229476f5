"""Migration throughput against the slower device's limit, and ingest's rate while a migration runs (issue 10).

One appliance (server running, fsync on) with a nearline tier on a second folder and a policy that moves CT
studies (`modalities = ["CT"]`, any age, via ``APPLIANCE_TIER_NOW`` a year ahead). Steps, all on this machine:

1. **Device limit**: sequential writes of incompressible 8 MiB chunks with an fdatasync every 64 MiB into the
   nearline folder (what an archive write does, without compression): MB/s.
2. **Load**: ``--studies`` synthetic CT studies (bench/synth.py, ``--slices`` each) stored with DCMTK storescu.
3. ``--repeats`` times, interleaved: an MR ingest burst alone (DCMTK storescu, 4 associations, new UIDs each
   time); ``appliance tier run --limit K`` alone, migrating the next K CT studies; then another MR burst while
   another ``tier run --limit K`` migrates the next K (the burst starts once the mover is writing its first
   archive, and the batch must outlast it: choose K and --rate so). The CT studies make 2 x repeats batches of K.
   Migration MB/s counts the original bytes moved per second of the run's wall time (process start included);
   ingest counts instances/s of the burst.

Medians are reported, as JSON and a Markdown table. The data of every run is kept until the end (deleting
thousands of files on this VM's ext4 slows the next run's inode allocation).

    .venv/bin/python -m bench.migrate --out docs/results/tiering-<date>
    .venv/bin/python -m bench.migrate --studies 4 --slices 20 --mr 200 --repeats 1   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import synth
from bench.receivers import DCMTK_ENV, ApplianceReceiver

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
FUTURE = "2099-01-01"


class TieredAppliance(ApplianceReceiver):
    """The benchmark's appliance with a nearline tier (its own folder) and a CT-only policy."""

    def __init__(self, workdir: Path, level: int) -> None:
        super().__init__(workdir, workers=0)
        self.level = level
        self.nearline = workdir / "nearline"

    def command(self) -> list[str]:
        cmd = super().command()
        with open(self.config_path, "a") as fh:
            fh.write(f'[[tiers]]\nname = "nas"\nkind = "nearline"\ncompression_level = {self.level}\n'
                     f'volumes = [{{ name = "nas1", path = {json.dumps(str(self.nearline))} }}]\n'
                     '[[policies]]\nname = "ct-down"\nfrom = "online"\nto = "nas"\nmodalities = ["CT"]\n'
                     # getscu's default calling AE, allowed to C-GET (an unknown AE may only echo and store)
                     '[peers.getscu]\nae_title = "GETSCU"\nport = 1\nallow_receive = false\n')
        self.nearline.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(ROOT / ".venv/bin/python"), "-m", "appliance", "tier", "init", "nas",
                        "-c", str(self.config_path)], check=True, capture_output=True)
        return cmd


def device_limit(folder: Path, total_bytes: int = 512 * MiB) -> float:
    """MB/s of sequential incompressible writes with an fdatasync every 64 MiB (a nearline archive's pattern)."""
    chunk = os.urandom(8 * MiB)
    path = folder / "device-limit.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        t0 = time.perf_counter()
        written = 0
        while written < total_bytes:
            os.write(fd, chunk)
            written += len(chunk)
            if written % (64 * MiB) == 0:
                os.fdatasync(fd)
        os.fdatasync(fd)
        seconds = time.perf_counter() - t0
    finally:
        os.close(fd)
    # Kept (not deleted) until the end, like every run's data.
    return written / seconds / 1e6


def store(app: TieredAppliance, folders: list[Path], timeout: float = 1800) -> float:
    """Send every folder on its own association (parallel storescu processes); returns the wall time."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aec", app.ae, "+sd", "127.0.0.1", str(app.port), str(f)],
                              env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for f in folders]
    for p in procs:
        _out, err = p.communicate(timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-1000:]}")
    return time.perf_counter() - t0


def migrate(app: TieredAppliance, studies: int, rate_mb_s: float) -> tuple[subprocess.Popen[str], float]:
    cmd = [str(ROOT / ".venv/bin/python"), "-m", "appliance", "tier", "run", "--json", "--limit", str(studies),
           "--rate", str(rate_mb_s), "-c", str(app.config_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "APPLIANCE_TIER_NOW": FUTURE})
    return proc, time.perf_counter()


def wait_copying(app: TieredAppliance, proc: subprocess.Popen[str], timeout_s: float = 120.0) -> float:
    """Wait until the mover is copying (an archive is being written in the tier's tmp folder), so the ingest
    burst measures ingest beside a migration, not beside a Python process starting up. Returns the wait."""
    t0 = time.perf_counter()
    tmp = app.nearline / "tmp"
    while time.perf_counter() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError("tier run ended before the ingest burst started: make the batches larger")
        if tmp.is_dir() and any(name.endswith(".partial") for name in os.listdir(tmp)):
            return time.perf_counter() - t0
        time.sleep(0.005)
    raise RuntimeError("the mover did not start copying")


def finish_migration(proc: subprocess.Popen[str], started: float) -> dict[str, Any]:
    out, err = proc.communicate(timeout=3600)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"tier run exited {proc.returncode}: {err[-1500:]}")
    report = json.loads(out)
    moved = [r for r in report.get("results", []) if r.get("outcome") == "moved"]
    nbytes = sum(int(r.get("bytes", 0)) for r in moved)
    return {"studies": len(moved), "bytes": nbytes, "seconds": round(seconds, 3),
            "mb_s": round(nbytes / seconds / 1e6, 1) if seconds else 0.0}


def _sop_uids(burst: synth.Burst, count: int) -> list[tuple[str, str, str]]:
    import pydicom

    out = []
    for path in burst.files[:count]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out.append((ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
    return out


def _get_one(app: TieredAppliance, uids: tuple[str, str, str], out: Path) -> float:
    study, series, sop = uids
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    subprocess.run(["getscu", "-aec", app.ae, "-S", "-od", str(out), "-k", "QueryRetrieveLevel=IMAGE",
                    "-k", f"StudyInstanceUID={study}", "-k", f"SeriesInstanceUID={series}",
                    "-k", f"SOPInstanceUID={sop}", "127.0.0.1", str(app.port)],
                   env=DCMTK_ENV, check=True, capture_output=True, timeout=60)
    seconds = time.perf_counter() - t0
    if not any(out.iterdir()):
        raise RuntimeError(f"getscu got nothing for {sop}")
    return seconds


def retrieve_latency(app: TieredAppliance, moved: synth.Burst, reads: int, work: Path, cache: Path
                     ) -> dict[str, Any]:
    """C-GET (DCMTK getscu, one instance per association, process start included) of single CT instances: from a
    study that was moved to nearline, and from a study of the same kind stored now (online), interleaved."""
    online = synth.load_or_generate(synth.ct_spec(reads, 512, seed=999), cache)
    store(app, [online.folder])
    pairs = list(zip(_sop_uids(moved, reads), _sop_uids(online, reads), strict=False))
    nearline_s, online_s = [], []
    for i, (near, on) in enumerate(pairs):
        nearline_s.append(_get_one(app, near, work / "get" / f"n{i}"))
        online_s.append(_get_one(app, on, work / "get" / f"o{i}"))
    return {"reads": len(pairs), "nearline_ms_p50": round(statistics.median(nearline_s) * 1000, 1),
            "online_ms_p50": round(statistics.median(online_s) * 1000, 1),
            "nearline_ms_max": round(max(nearline_s) * 1000, 1), "online_ms_max": round(max(online_s) * 1000, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.migrate", description=__doc__.split("\n")[0])
    ap.add_argument("--studies", type=int, default=12, help="CT studies loaded (split over the migration runs)")
    ap.add_argument("--slices", type=int, default=100, help="512x512 CT slices per study")
    ap.add_argument("--mr", type=int, default=1000, help="MR instances (256x256) per ingest burst")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--level", type=int, default=3, help="the nearline tier's zstd level")
    ap.add_argument("--rate", type=float, default=1000.0, help="tier run --rate (MB/s) for the runs")
    ap.add_argument("--reads", type=int, default=20, help="single-instance C-GETs from nearline and online each")
    ap.add_argument("--out", type=Path, default=None, help="folder for results.json and results.md")
    ap.add_argument("--cache", type=Path, default=synth.DEFAULT_CACHE, help="synthetic instances cache")
    ap.add_argument("--tmp", type=Path, default=None, help="where the appliance's data goes (kept)")
    args = ap.parse_args(argv)
    runs = args.repeats
    if args.studies < 2 * runs:
        ap.error("--studies must be at least 2 x --repeats (one batch per migration run)")
    batch = args.studies // (2 * runs)

    work = Path(tempfile.mkdtemp(prefix="bench-migrate-", dir=args.tmp)).resolve()
    print(f"data under {work} (kept)", file=sys.stderr)
    cts = [synth.load_or_generate(synth.ct_spec(args.slices, 512, seed=100 + i), args.cache) for i in range(args.studies)]
    app = TieredAppliance(work / "appliance", args.level)
    app.workdir.mkdir(parents=True)
    results: dict[str, Any] = {"studies": args.studies, "slices": args.slices, "mr": args.mr, "repeats": runs,
                               "level": args.level, "rate_mb_s": args.rate, "runs": []}
    app.start()
    try:
        results["device_limit_mb_s"] = round(device_limit(app.nearline), 1)
        print(f"device limit: {results['device_limit_mb_s']} MB/s", file=sys.stderr)
        load_s = store(app, [b.folder for b in cts])
        results["ct_bytes"] = sum(b.total_bytes for b in cts)
        print(f"loaded {args.studies} CT studies ({results['ct_bytes'] / 1e6:.0f} MB) in {load_s:.1f}s",
              file=sys.stderr)
        for repeat in range(runs):
            # a fresh MR burst per run: new UIDs (seed), so nothing is a duplicate of the previous run
            burst = synth.load_or_generate(synth.mr_spec(args.mr, 256, seed=1000 + repeat), args.cache)
            folders = synth.split(burst, 4)
            t = store(app, folders)
            alone = {"kind": "ingest alone", "repeat": repeat, "inst_s": round(args.mr / t, 1)}
            usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            proc, started = migrate(app, batch, args.rate)
            mig_alone = finish_migration(proc, started)
            usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the tier run process, reaped
            mover_cpu_s = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
            mig_alone.update(kind="migration alone", repeat=repeat, mover_cpu_s=round(mover_cpu_s, 2),
                             mover_cpu_s_per_gb=round(mover_cpu_s / (mig_alone["bytes"] / 1e9), 2)
                             if mig_alone["bytes"] else 0.0)
            burst2 = synth.load_or_generate(synth.mr_spec(args.mr, 256, seed=2000 + repeat), args.cache)
            folders2 = synth.split(burst2, 4)
            proc, started = migrate(app, batch, args.rate)
            copying_after_s = wait_copying(app, proc)
            t2 = store(app, folders2)
            during_mig = finish_migration(proc, started)
            during = {"kind": "ingest during migration", "repeat": repeat, "inst_s": round(args.mr / t2, 1),
                      "ingest_s": round(t2, 2), "copying_after_s": round(copying_after_s, 2),
                      "migration": during_mig}
            for row in (alone, mig_alone, during):
                results["runs"].append(row)
                print(json.dumps(row), file=sys.stderr)
        results["retrieve"] = retrieve_latency(app, cts[0], args.reads, work, args.cache)
    finally:
        app.stop()

    def med(kind: str, key: str) -> float:
        values = [r[key] for r in results["runs"] if r["kind"] == kind]
        return round(statistics.median(values), 1) if values else 0.0

    during_mb = [r["migration"]["mb_s"] for r in results["runs"] if r["kind"] == "ingest during migration"]
    results["summary"] = {
        "device_limit_mb_s": results["device_limit_mb_s"],
        "migration_alone_mb_s": med("migration alone", "mb_s"),
        "migration_during_ingest_mb_s": round(statistics.median(during_mb), 1) if during_mb else 0.0,
        "ingest_alone_inst_s": med("ingest alone", "inst_s"),
        "ingest_during_migration_inst_s": med("ingest during migration", "inst_s"),
        "mover_cpu_s_per_gb": med("migration alone", "mover_cpu_s_per_gb"),
    }
    s = results["summary"]
    s["migration_vs_device"] = round(s["migration_alone_mb_s"] / s["device_limit_mb_s"], 2)
    s["ingest_kept"] = round(s["ingest_during_migration_inst_s"] / s["ingest_alone_inst_s"], 2) \
        if s["ingest_alone_inst_s"] else 0.0
    md = "\n".join([
        f"| measure (medians of {runs}) | value |", "|---|---|",
        f"| device limit (sequential write + fdatasync, incompressible) | {s['device_limit_mb_s']} MB/s |",
        f"| migration online -> nearline alone (zstd level {args.level}, original bytes) | "
        f"{s['migration_alone_mb_s']} MB/s ({s['migration_vs_device']:.0%} of the device) |",
        f"| mover CPU per GB moved (read, hash, compress, write, re-read, re-hash) | {s['mover_cpu_s_per_gb']} s |",
        f"| migration during the MR ingest burst | {s['migration_during_ingest_mb_s']} MB/s |",
        f"| MR ingest alone ({args.mr} x 256x256, 4 associations) | {s['ingest_alone_inst_s']} inst/s |",
        f"| MR ingest during a migration (`--rate {args.rate:g}`) | {s['ingest_during_migration_inst_s']} inst/s "
        f"({s['ingest_kept']:.0%} kept) |",
    ])
    r = results["retrieve"]
    md += (f"\n| C-GET of one CT instance (getscu, process start included), p50 of {r['reads']} | online "
           f"{r['online_ms_p50']} ms, nearline {r['nearline_ms_p50']} ms |")
    print(md)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "migrate.json").write_text(json.dumps(results, indent=2) + "\n")
        (args.out / "migrate.md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
