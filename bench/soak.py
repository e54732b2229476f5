"""Soak: many concurrent associations storing for a long time, while the appliance's workers are watched.

Starts an appliance on 127.0.0.1 (a fresh data folder under --tmp, one worker per CPU, the association limits
raised to --associations), runs ``appliance bench run --scenario sustained`` against it (our driver, open loop,
--rate instances/s over --associations associations for --duration seconds), and samples every --interval
seconds: each worker's resident memory and open descriptors, and the instances the appliance has stored (its
/metrics). A leak shows as RSS or descriptors that keep growing; a stall as an interval without stores. The report
compares the first and the last minute:

    python -m bench.soak --associations 64 --rate 300 --duration 600 --out bench/results/soak

Output: soak.json (every sample, the driver's report) and soak.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.bench_config import load_site
from bench.monitor import scrape
from bench.receivers import ROOT, ApplianceReceiver


def worker_pids(supervisor: int) -> list[int]:
    try:
        children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    except OSError:
        return []
    return sorted(int(p) for p in children)


def rss_kib(pid: int) -> tuple[int, int]:
    """(resident, anonymous resident) KiB. The difference is mostly LMDB's memory-mapped index, which grows with
    the index and is page cache the kernel reclaims: a leak shows in the anonymous part."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "RssAnon:")):
            key, value = line.split(":", 1)
            values[key] = int(value.split()[0])
    return values.get("VmRSS", 0), values.get("RssAnon", 0)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Sampler(threading.Thread):
    def __init__(self, supervisor: int, metrics_url: str | None, interval: float) -> None:
        super().__init__(daemon=True)
        self.supervisor, self.metrics_url, self.interval = supervisor, metrics_url, interval
        self.samples: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.started = time.monotonic()

    def sample(self) -> None:
        workers = []
        for pid in worker_pids(self.supervisor):
            try:
                rss, anon = rss_kib(pid)
                workers.append({"pid": pid, "rss_kib": rss, "anon_kib": anon, "fds": fd_count(pid)})
            except OSError:
                continue  # a worker exiting between the listing and the read
        stored = None
        if self.metrics_url:
            try:
                values = scrape(self.metrics_url)
                stored = int(sum(v for (name, _labels), v in values.items()
                                 if name == "appliance_instances_stored_total"))
            except OSError:
                pass
        self.samples.append({"t_s": round(time.monotonic() - self.started, 2), "workers": workers,
                             "instances_stored": stored})

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self.sample()


def window(samples: list[dict[str, Any]], start_s: float, end_s: float) -> dict[str, Any]:
    chosen = [s for s in samples if start_s <= s["t_s"] <= end_s]
    if len(chosen) < 2:
        return {"samples": len(chosen)}
    rate = ((chosen[-1]["instances_stored"] or 0) - (chosen[0]["instances_stored"] or 0)) / max(
        1e-9, chosen[-1]["t_s"] - chosen[0]["t_s"])
    return {
        "samples": len(chosen),
        "from_s": chosen[0]["t_s"], "to_s": chosen[-1]["t_s"],
        "rss_mib_total": round(statistics.mean(sum(w["rss_kib"] for w in s["workers"]) for s in chosen) / 1024, 1),
        "rss_mib_max_worker": round(max(w["rss_kib"] for s in chosen for w in s["workers"]) / 1024, 1),
        "anon_mib_total": round(statistics.mean(sum(w["anon_kib"] for w in s["workers"]) for s in chosen) / 1024, 1),
        "fds_total": round(statistics.mean(sum(w["fds"] for w in s["workers"]) for s in chosen), 1),
        "fds_max_worker": max(w["fds"] for s in chosen for w in s["workers"]),
        "stored_per_s": round(rate, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--associations", type=int, default=64)
    parser.add_argument("--rate", type=float, default=300.0, help="offered instances/s over all associations")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--workers", type=int, default=None,
                        help="appliance workers (0: one per CPU; default: --config's, else 0)")
    parser.add_argument("--config", "-c", type=Path,
                        help="the appliance runs this configuration (its volumes, workers and settings; "
                        "bench/bench_config.py)")
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/soak")
    args = parser.parse_args(argv)
    if args.associations < 1 or args.duration < 120 or args.rate <= 0:
        parser.error("--associations >= 1, --duration >= 120 (first and last minute), --rate > 0")
    site = load_site(args.config)
    args.out.mkdir(parents=True, exist_ok=True)
    # One driver host and one calling AE open every association: lift the per-AE/per-host limits to the total.
    for key in ("MAX_ASSOCIATIONS", "MAX_ASSOCIATIONS_PER_AE", "MAX_ASSOCIATIONS_PER_HOST"):
        os.environ[f"APPLIANCE_SERVER_{key}"] = str(max(args.associations, 1))
    workdir = Path(tempfile.mkdtemp(prefix="bench-soak-", dir=args.tmp))
    receiver = ApplianceReceiver(workdir, workers=args.workers if args.workers is not None or site else 0, site=site)
    receiver.start()
    assert receiver.proc is not None
    sampler = Sampler(receiver.proc.pid, receiver.metrics_url, args.interval)
    sampler.sample()
    sampler.start()
    driver_json = args.out / "driver.json"
    try:
        cmd = [sys.executable, "-m", "bench.driver", "--scenario", "sustained",
               "--target", f"127.0.0.1:{receiver.port}", "--ae", receiver.ae, "--associations", str(args.associations),
               "--rate", str(args.rate), "--duration", str(args.duration), "--server-pid", str(receiver.proc.pid),
               "--json", str(driver_json), "--no-ceiling", "--no-plots", "--quiet"]
        if receiver.metrics_url:
            cmd += ["--metrics-url", receiver.metrics_url]
        driver = subprocess.run(cmd, cwd=ROOT, timeout=args.duration + 600)
    finally:
        sampler.stop.set()
        sampler.join()
        sampler.sample()
        receiver.stop()
        receiver.cleanup()  # a site's volumes keep nothing of the soak (its work folder stays: data_folder)
    report = json.loads(driver_json.read_text()) if driver_json.exists() else {}
    first = window(sampler.samples, 0, 60)
    last_start = sampler.samples[-1]["t_s"] - 60 if sampler.samples else 0
    last = window(sampler.samples, last_start, sampler.samples[-1]["t_s"] if sampler.samples else 0)
    summary = {"associations": args.associations, "rate": args.rate, "duration_s": args.duration,
               "driver_exit": driver.returncode, "first_minute": first, "last_minute": last,
               "data_folder": str(workdir)}
    lines = [f"# Soak: {args.associations} associations, {args.rate:g}/s offered, {args.duration:g} s", "",
             "| window | stored/s | RSS all workers MiB | of it anonymous MiB | RSS max worker MiB | fds all workers "
             "| fds max worker |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, w in (("first minute", first), ("last minute", last)):
        lines.append(f"| {name} | {w.get('stored_per_s')} | {w.get('rss_mib_total')} | {w.get('anon_mib_total')} "
                     f"| {w.get('rss_mib_max_worker')} | {w.get('fds_total')} | {w.get('fds_max_worker')} |")
    runs = [r for r in report.get("runs", []) if r.get("role", "result") != "ceiling"]
    summaries = [r["summary"] for r in runs]
    summary["driver"] = [{k: s.get(k) for k in ("instances_ok", "failures", "instances_per_s", "latency_ms")}
                         for s in summaries]
    (args.out / "soak.json").write_text(json.dumps({"summary": summary, "samples": sampler.samples,
                                                     "driver": report}, indent=1))
    for s in summaries:
        lat = s.get("latency_ms") or {}
        lines += ["", f"Driver: {s.get('instances_ok')} stored, {s.get('failures')} failures, "
                      f"{s.get('instances_per_s')}/s achieved; C-STORE latency ms p50 {lat.get('p50')} "
                      f"p99 {lat.get('p99')} max {lat.get('max')}."]
    lines += ["", f"Driver exit status {driver.returncode}."]
    (args.out / "soak.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if driver.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
