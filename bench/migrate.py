"""Migration throughput against the slower device's limit, and ingest's rate while a migration runs (issues 10, 11).

One appliance (server running, fsync on) with a nearline tier on a second folder, with ``--tier s3`` also an S3
tier in a real SeaweedFS started here (bench/seaweed.py, data beside the appliance's), and one policy per tier that
moves CT studies (`modalities = ["CT"]`, any age, via ``APPLIANCE_TIER_NOW`` a year ahead; each run names its
policy). ``--tier`` chooses where the measured migrations go. Steps, all on this machine:

1. **Device limit**: nearline: sequential writes of incompressible 8 MiB chunks with an fdatasync every 64 MiB
   into the nearline folder (what an archive write does, without compression); s3: multipart uploads of
   incompressible 16 MiB parts into the bucket (what an archive upload does, without compression): MB/s.
2. **Load**: ``--studies`` synthetic CT studies (bench/synth.py, ``--slices`` each) stored with DCMTK storescu.
3. ``--repeats`` times, interleaved: an MR ingest burst alone (DCMTK storescu, 4 associations, new UIDs each
   time); ``appliance tier run --limit K`` alone, migrating the next K CT studies; then another MR burst while
   another ``tier run --limit K`` migrates the next K (the burst starts once the mover is writing its first
   archive, and the batch must outlast it: choose K and --rate so). The CT studies make 2 x repeats batches of K.
   Migration MB/s counts the original bytes moved per second of the run's wall time (process start included);
   ingest counts instances/s of the burst.

4. Single-instance reads: C-GET (DCMTK getscu) of one CT instance from a study online, on nearline (and on S3),
   interleaved; and the same instances read in-process through the tier backends (``BlobBackend.read`` of the
   whole member: ranged reads of the archive, decompressed), without DICOM and process start.

Medians are reported, as JSON and a Markdown table. The data of every run is kept until the end (deleting
thousands of files on this VM's ext4 slows the next run's inode allocation).

    .venv/bin/python -m bench.migrate --out docs/results/tiering-<date>
    .venv/bin/python -m bench.migrate --studies 4 --slices 20 --mr 200 --repeats 1   # a smoke run
    .venv/bin/python -m bench.migrate --tier s3 --out docs/results/s3-<date>
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
from bench.seaweed import Seaweed

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
FUTURE = "2099-01-01"


class TieredAppliance(ApplianceReceiver):
    """The benchmark's appliance with a nearline tier "nas" (its own folder), with ``seaweed`` an S3 tier "cloud"
    too, and one CT-only policy per tier ("ct-nas", "ct-cloud")."""

    def __init__(self, workdir: Path, level: int, seaweed: Seaweed | None = None) -> None:
        super().__init__(workdir, workers=0)
        self.level = level
        self.nearline = workdir / "nearline"
        self.seaweed = seaweed

    def command(self) -> list[str]:
        cmd = super().command()
        tiers = ["nas"]
        with open(self.config_path, "a") as fh:
            fh.write(f'[[tiers]]\nname = "nas"\nkind = "nearline"\ncompression_level = {self.level}\n'
                     f'volumes = [{{ name = "nas1", path = {json.dumps(str(self.nearline))} }}]\n'
                     '[[policies]]\nname = "ct-nas"\nfrom = "online"\nto = "nas"\nmodalities = ["CT"]\n'
                     # getscu's default calling AE, allowed to C-GET (an unknown AE may only echo and store)
                     '[peers.getscu]\nae_title = "GETSCU"\nport = 1\nallow_receive = false\n')
            if self.seaweed is not None:
                creds = self.seaweed.credentials_file(self.workdir / "s3-credentials.toml")
                fh.write(f'[[tiers]]\nname = "cloud"\nkind = "s3"\ncompression_level = {self.level}\n'
                         f'endpoint = "{self.seaweed.endpoint}"\nbucket = "{self.seaweed.make_bucket("bench")}"\n'
                         f'prefix = "node-a"\ncredentials_file = {json.dumps(str(creds))}\n'
                         '[[policies]]\nname = "ct-cloud"\nfrom = "online"\nto = "cloud"\nmodalities = ["CT"]\n')
                tiers.append("cloud")
        self.nearline.mkdir(parents=True, exist_ok=True)
        for tier in tiers:
            subprocess.run([str(ROOT / ".venv/bin/python"), "-m", "appliance", "tier", "init", tier,
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


def s3_device_limit(seaweed: Seaweed, bucket: str, total_bytes: int = 512 * MiB, part_bytes: int = 16 * MiB
                    ) -> float:
    """MB/s of multipart uploads of incompressible parts into the bucket, one part at a time (the store's limit for
    an archive upload on this machine, without compression). The objects are kept, like every run's data."""
    client = seaweed.client()
    chunk = os.urandom(part_bytes)
    t0 = time.perf_counter()
    sent = 0
    for n in range(total_bytes // (64 * MiB)):
        key = f"device-limit/{n}.bin"
        upload = client.create_multipart_upload(Bucket=bucket, Key=key)
        parts = []
        for number in range(1, 64 * MiB // part_bytes + 1):
            answer = client.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=number,
                                        Body=chunk)
            parts.append({"PartNumber": number, "ETag": answer["ETag"]})
            sent += len(chunk)
        client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"],
                                         MultipartUpload={"Parts": parts})
    return sent / (time.perf_counter() - t0) / 1e6


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


def migrate(app: TieredAppliance, studies: int, rate_mb_s: float, tier: str) -> tuple[subprocess.Popen[str], float]:
    cmd = [str(ROOT / ".venv/bin/python"), "-m", "appliance", "tier", "run", "--json", "--limit", str(studies),
           "--rate", str(rate_mb_s), "--policy", f"ct-{tier}", "-c", str(app.config_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "APPLIANCE_TIER_NOW": FUTURE})
    return proc, time.perf_counter()


def _audit_lines(app: TieredAppliance) -> int:
    path = app.workdir / "var" / "log" / "tiering-audit.jsonl"
    try:
        with open(path, "rb") as fh:
            return sum(1 for _ in fh)
    except FileNotFoundError:
        return 0


def wait_copying(app: TieredAppliance, proc: subprocess.Popen[str], tier: str, audit_before: int,
                 timeout_s: float = 120.0) -> float:
    """Wait until the mover is copying, so the ingest burst measures ingest beside a migration, not beside a
    Python process starting up: nearline, an archive is being written in the tier's tmp folder; s3 (an archive
    smaller than a part goes up in one PUT at its sync, invisible before), the run's first move is audited.
    Returns the wait."""
    t0 = time.perf_counter()
    tmp = app.nearline / "tmp"
    while time.perf_counter() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError("tier run ended before the ingest burst started: make the batches larger")
        if tier == "nas" and tmp.is_dir() and any(name.endswith(".partial") for name in os.listdir(tmp)):
            return time.perf_counter() - t0
        if tier == "cloud" and _audit_lines(app) > audit_before:
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


def retrieve_latency(app: TieredAppliance, moved: dict[str, synth.Burst], reads: int, work: Path, cache: Path
                     ) -> dict[str, Any]:
    """C-GET (DCMTK getscu, one instance per association, process start included) of single CT instances: from a
    study moved to each tier of ``moved`` (tier -> its study), and from a study of the same kind stored now
    (online), interleaved."""
    online = synth.load_or_generate(synth.ct_spec(reads, 512, seed=999), cache)
    store(app, [online.folder])
    uids = {"online": _sop_uids(online, reads), **{tier: _sop_uids(b, reads) for tier, b in moved.items()}}
    count = min(len(v) for v in uids.values())
    seconds: dict[str, list[float]] = {tier: [] for tier in uids}
    for i in range(count):
        for tier, sops in uids.items():
            seconds[tier].append(_get_one(app, sops[i], work / "get" / f"{tier}{i}"))
    out: dict[str, Any] = {"reads": count}
    for tier, values in seconds.items():
        out[f"{tier}_ms_p50"] = round(statistics.median(values) * 1000, 1)
        out[f"{tier}_ms_max"] = round(max(values) * 1000, 1)
    return out


def read_latency(app: TieredAppliance, moved: dict[str, synth.Burst], reads: int) -> dict[str, Any]:
    """In-process reads of whole single instances through each tier's backend (ranged reads of the archive, the
    member decompressed; S3: ranged GETs over HTTP), interleaved; the index names the locations."""
    from appliance.config import load_config
    from appliance.index.db import StudyIndex
    from tiering.tiers import open_tier

    config = load_config(app.config_path)
    index = StudyIndex(config.storage.index_path, config.storage.index_map_size, sync=False)
    backends: dict[str, Any] = {}
    locations: dict[str, list[str]] = {}
    try:
        for tier, burst in moved.items():
            tier_config = config.tier(tier)
            assert tier_config is not None
            backends[tier] = open_tier(tier_config)
            study_uid = _sop_uids(burst, 1)[0][0]
            key = index.study_key(study_uid)
            assert key is not None, study_uid
            locations[tier] = [c.location for _sop, _d, blob, _i in index.study_blobs(key)[:reads]
                               for c in blob.copies if c.backend == tier]
        seconds: dict[str, list[float]] = {tier: [] for tier in moved}
        for i in range(min(len(v) for v in locations.values())):
            for tier, locs in locations.items():
                t0 = time.perf_counter()
                data = backends[tier].read(locs[i])
                seconds[tier].append(time.perf_counter() - t0)
                assert data
    finally:
        for backend in backends.values():
            backend.close()
        index.close()
    out: dict[str, Any] = {"reads": len(next(iter(seconds.values())))}
    for tier, values in seconds.items():
        out[f"{tier}_ms_p50"] = round(statistics.median(values) * 1000, 2)
        out[f"{tier}_ms_max"] = round(max(values) * 1000, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.migrate", description=__doc__.split("\n")[0])
    ap.add_argument("--tier", choices=("nearline", "s3"), default="nearline",
                    help="where the measured migrations go (s3: a SeaweedFS started here)")
    ap.add_argument("--studies", type=int, default=12, help="CT studies loaded (split over the migration runs)")
    ap.add_argument("--slices", type=int, default=100, help="512x512 CT slices per study")
    ap.add_argument("--mr", type=int, default=1000, help="MR instances (256x256) per ingest burst")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--level", type=int, default=3, help="the tiers' zstd level")
    ap.add_argument("--rate", type=float, default=1000.0, help="tier run --rate (MB/s) for the runs")
    ap.add_argument("--reads", type=int, default=20, help="single-instance reads from each tier and online")
    ap.add_argument("--out", type=Path, default=None, help="folder for results.json and results.md")
    ap.add_argument("--cache", type=Path, default=synth.DEFAULT_CACHE, help="synthetic instances cache")
    ap.add_argument("--tmp", type=Path, default=None, help="where the appliance's data goes (kept)")
    args = ap.parse_args(argv)
    runs = args.repeats
    if args.studies < 2 * runs:
        ap.error("--studies must be at least 2 x --repeats (one batch per migration run)")
    batch = args.studies // (2 * runs)
    tier = "cloud" if args.tier == "s3" else "nas"

    work = Path(tempfile.mkdtemp(prefix="bench-migrate-", dir=args.tmp)).resolve()
    print(f"data under {work} (kept)", file=sys.stderr)
    # With s3, one more study goes to nearline at the end, for the read comparison.
    extra = 1 if tier == "cloud" else 0
    cts = [synth.load_or_generate(synth.ct_spec(args.slices, 512, seed=100 + i), args.cache)
           for i in range(args.studies + extra)]
    seaweed = Seaweed(work / "seaweed").start() if tier == "cloud" else None
    app = TieredAppliance(work / "appliance", args.level, seaweed)
    app.workdir.mkdir(parents=True)
    results: dict[str, Any] = {"tier": args.tier, "studies": args.studies, "slices": args.slices, "mr": args.mr,
                               "repeats": runs, "level": args.level, "rate_mb_s": args.rate, "runs": []}
    app.start()
    try:
        if seaweed is not None:
            results["device_limit_mb_s"] = round(s3_device_limit(seaweed, seaweed.make_bucket("device")), 1)
        else:
            results["device_limit_mb_s"] = round(device_limit(app.nearline), 1)
        print(f"device limit: {results['device_limit_mb_s']} MB/s", file=sys.stderr)
        load_s = store(app, [b.folder for b in cts[: args.studies]])
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
            proc, started = migrate(app, batch, args.rate, tier)
            mig_alone = finish_migration(proc, started)
            usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the tier run process, reaped
            mover_cpu_s = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
            mig_alone.update(kind="migration alone", repeat=repeat, mover_cpu_s=round(mover_cpu_s, 2),
                             mover_cpu_s_per_gb=round(mover_cpu_s / (mig_alone["bytes"] / 1e9), 2)
                             if mig_alone["bytes"] else 0.0)
            burst2 = synth.load_or_generate(synth.mr_spec(args.mr, 256, seed=2000 + repeat), args.cache)
            folders2 = synth.split(burst2, 4)
            audit_before = _audit_lines(app)
            proc, started = migrate(app, batch, args.rate, tier)
            copying_after_s = wait_copying(app, proc, tier, audit_before)
            t2 = store(app, folders2)
            during_mig = finish_migration(proc, started)
            during = {"kind": "ingest during migration", "repeat": repeat, "inst_s": round(args.mr / t2, 1),
                      "ingest_s": round(t2, 2), "copying_after_s": round(copying_after_s, 2),
                      "migration": during_mig}
            for row in (alone, mig_alone, during):
                results["runs"].append(row)
                print(json.dumps(row), file=sys.stderr)
        moved = {tier: cts[0]}
        if extra:
            store(app, [cts[-1].folder])
            finish_migration(*migrate(app, 1, args.rate, "nas"))
            moved["nas"] = cts[-1]
        results["retrieve"] = retrieve_latency(app, moved, args.reads, work, args.cache)
        results["read"] = read_latency(app, moved, args.reads)
    finally:
        app.stop()
        if seaweed is not None:
            seaweed.stop()

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
    device = ("multipart upload of incompressible 16 MiB parts into SeaweedFS" if tier == "cloud"
              else "sequential write + fdatasync, incompressible")
    md = "\n".join([
        f"| measure (medians of {runs}) | value |", "|---|---|",
        f"| device limit ({device}) | {s['device_limit_mb_s']} MB/s |",
        f"| migration online -> {args.tier} alone (zstd level {args.level}, original bytes) | "
        f"{s['migration_alone_mb_s']} MB/s ({s['migration_vs_device']:.0%} of the device) |",
        f"| mover CPU per GB moved (read, hash, compress, write, re-read, re-hash) | {s['mover_cpu_s_per_gb']} s |",
        f"| migration during the MR ingest burst | {s['migration_during_ingest_mb_s']} MB/s |",
        f"| MR ingest alone ({args.mr} x 256x256, 4 associations) | {s['ingest_alone_inst_s']} inst/s |",
        f"| MR ingest during a migration (`--rate {args.rate:g}`) | {s['ingest_during_migration_inst_s']} inst/s "
        f"({s['ingest_kept']:.0%} kept) |",
    ])
    r, rd = results["retrieve"], results["read"]
    names = {"online": "online", "nas": "nearline", "cloud": "S3"}
    md += (f"\n| C-GET of one CT instance (getscu, process start included), p50 of {r['reads']} | "
           + ", ".join(f"{names[k]} {r[f'{k}_ms_p50']} ms" for k in ("online", "nas", "cloud") if f"{k}_ms_p50" in r)
           + " |")
    md += (f"\n| read of one CT instance through the tier backend (in-process), p50 of {rd['reads']} | "
           + ", ".join(f"{names[k]} {rd[f'{k}_ms_p50']} ms" for k in ("nas", "cloud") if f"{k}_ms_p50" in rd)
           + " |")
    print(md)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "migrate.json").write_text(json.dumps(results, indent=2) + "\n")
        (args.out / "migrate.md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
