"""``appliance bench datasheet``: the figures a vendor can quote for a box, or a site for its own configuration,
in one command, one folder and one self-contained HTML report.

Steps (their own reports go into ``<out>/steps/``; the datasheet quotes them):
  1. the machine: CPU, memory, and bench/hardware.py's probe of the disk of each volume (fsync'd files,
     sequential writes) and of loopback TCP; skipped for a remote ``--target`` (run ``appliance bench hardware``
     on that box);
  2. side by side: the appliance, DCMTK ``storescp --fork`` and Orthanc receive the same bursts (CT, MR, a
     morning rush of CT + MR + DX) from two senders, DCMTK ``storescu`` and our asyncio driver, ``--repeats``
     times, receivers interleaved and rotated (bench/sidebyside.py);
  3. sustained MR at ``--load`` of the appliance's MR maximum (step 2), ``--repeats`` times: latency at a steady
     rate;
  4. one instance per association, 8 at a time, ``--repeats`` times: the association rate;
  5. ``datasheet.json``, ``datasheet.md`` and ``datasheet.html`` (bench/datasheet_report.py): every figure the
     median of the repeats with its minimum and maximum.

    appliance bench datasheet                                   # ~15 minutes on a 2-core machine
    appliance bench datasheet -c /etc/appliance/appliance.toml  # the site's volumes, workers and settings
    appliance bench datasheet --target 10.0.0.5:11112 --storescp 10.0.0.5:11113 --orthanc 10.0.0.5:4242
    appliance bench datasheet --quick                           # a smoke run: 1 repeat, not for quoting
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import driver, hardware, receivers, report, sidebyside, synth
from bench.bench_config import BENCH_FOLDER, SiteConfig, load_site
from bench.sidebyside_report import per_repeat_ratios

SCHEMA_VERSION = 2
KIND = "appliance-bench-datasheet"
REPEATS_MIN = 3  # a median and a spread need at least three runs; --quick is the only way below it
SCENARIOS = ("ct-burst", "mr-burst", "morning-rush")


def stat(values: list[float | None], digits: int = 2) -> dict[str, Any]:
    """Median, minimum and maximum of the runs that have a value, and the values in run order."""
    present = [v for v in values if v is not None]
    if not present:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {"median": round(statistics.median(present), digits), "min": round(min(present), digits),
            "max": round(max(present), digits), "n": len(present), "values": [round(v, digits) for v in present]}


def throughput_rows(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (scenario, client, receiver, N) of the side by side: instances/s, MB/s (10^6 bytes) and the
    receiver's CPU ms per instance, each a stat over the OK repeats."""
    groups: dict[tuple[str, str, str, int], list[dict[str, Any]]] = {}
    for s in samples:
        groups.setdefault((s["scenario"], s["client"], s["receiver"], s["associations"]), []).append(s)
    rows = []
    for (scenario, client, receiver, n), group in sorted(groups.items()):
        good = [s for s in group if s["ok"]]
        cpu = [1000.0 * s["receiver_cpu_s"] / s["instances"] if s.get("receiver_cpu_s") is not None
               and s["instances"] else None for s in good]
        rows.append({
            "scenario": scenario, "client": client, "receiver": receiver, "associations": n,
            "instances": group[0]["instances"], "runs": len(group), "ok_runs": len(good),
            "bytes_kind": group[0]["bytes_kind"],
            "mean_kb": round(group[0]["bytes"] / group[0]["instances"] / 1e3, 1) if group[0]["bytes"] else None,
            "instances_per_s": stat([s["instances_per_s"] for s in good], 1),
            "mb_per_s": stat([s["mb_per_s"] for s in good], 1),
            "cpu_ms_per_instance": stat(cpu, 2),
        })
    return rows


def ratio_rows(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """appliance / other within each repeat (both runs OK), as a stat per (scenario, client, N, other)."""
    out = []
    for (scenario, client, n, appliance, other), values in sorted(per_repeat_ratios(samples).items()):
        out.append({"scenario": scenario, "client": client, "associations": n, "appliance": appliance,
                    "other": other, "ratio": stat(list(values), 2)})
    return out


def driver_stats(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The target runs of repeated ``bench run`` reports, as stats (rate, latency, set-up, failures) plus
    whether the driver's ceiling could offer each run's load."""
    rows = [r for d in docs for r in d["summary"]["rows"] if r["role"] == "target"]
    runs = [run for d in docs for run in d["runs"] if run["role"] == "target"]
    lat = {k: stat([(r["latency_ms"] or {}).get(k) for r in rows], 2) for k in ("p50", "p95", "p99", "max")}
    return {
        "repeats": len(rows),
        "associations": rows[0]["associations"] if rows else None,
        "instances_per_s": stat([r["instances_per_s"] for r in rows], 1),
        "mb_per_s": stat([r["mb_per_s"] for r in rows], 1),
        "latency_ms": lat,
        "setup_ms_p50": stat([(r["setup_ms"] or {}).get("p50") for r in rows], 2),
        "failures": sum(r["failures"] for r in rows),
        "instances_ok": sum(r["instances_ok"] for r in rows),
        "driver_can_offer_rate": all(r.get("driver_can_offer_rate", True) for r in rows),
        "driver_ceiling_instances_per_s": stat([r.get("driver_ceiling_instances_per_s") for r in rows], 1),
        "peak_rss_mib": stat([((run.get("server") or {}).get("peak_rss_bytes") or 0) / 2**20 or None
                              for run in runs], 0),
        "cpu_ms_per_instance": stat([1000.0 * (run.get("server") or {})["cpu_s"] / r["instances_ok"]
                                     if (run.get("server") or {}).get("cpu_s") is not None and r["instances_ok"]
                                     else None for run, r in zip(runs, rows, strict=False)], 2),
    }


def operating_system() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return ""


def probe_disks(folders: list[tuple[Path, str]], seconds: float, repeats: int, subfolder: str | None = None
                ) -> list[dict[str, Any]]:
    """bench/hardware.py's probe, ``repeats`` times, on each distinct device among ``folders`` ((folder, what it
    holds): several volumes on one array are one disk, named by all it holds): each figure a stat. ``subfolder``
    (a site's volumes): the probe's files go into ``<folder>/<subfolder>``, where the rest of the benchmark
    writes, not beside the site's data in the volume's root (a killed probe leaves its files where the docs say
    to look)."""
    roles: dict[int, list[str]] = {}
    first: dict[int, Path] = {}
    for folder, role in folders:
        dev = os.stat(folder).st_dev
        roles.setdefault(dev, []).append(role)
        first.setdefault(dev, folder)
    out = []
    for dev, folder in first.items():
        where = folder / subfolder if subfolder else folder
        created = not where.exists()
        where.mkdir(exist_ok=True)
        try:
            runs = [hardware.probe(where, seconds) for _ in range(repeats)]
        finally:
            if created:  # not the one main made for the receivers' data
                with contextlib.suppress(OSError):
                    where.rmdir()
        results = {key: stat([r.get(key) for r in runs], 1) for key in runs[0]}
        out.append({"path": str(folder), "holds": ", ".join(roles[dev]),
                    "filesystem": hardware.machine(folder)["filesystem"], "results": results})
    return out


def summarize(out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """datasheet.json from the step reports in ``out/steps`` and what main knows (``meta``)."""
    steps = out / "steps"
    cmp_doc = json.loads((steps / "compare.json").read_text())
    c = cmp_doc["compare"]
    sustained = [json.loads(p.read_text()) for p in sorted(steps.glob("sustained-*.json"))]
    small = [json.loads(p.read_text()) for p in sorted(steps.glob("many-small-*.json"))]
    problems = [f"{s['receiver']} {s['client']} {s['scenario']} N={s['associations']} repeat {s['repeat']}: "
                + "; ".join(s["errors"])[:300] for s in c["samples"] if not s["ok"]]
    sus, sm = driver_stats(sustained), driver_stats(small)
    if sus["failures"] or sm["failures"]:
        problems.append(f"{sus['failures']} sustained and {sm['failures']} many-small C-STOREs failed")
    return {
        "kind": KIND, "schema_version": SCHEMA_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **meta,
        "versions": report.versions(),
        "receivers": c["receivers"], "skipped": c.get("skipped") or {},
        "dcmtk": c.get("dcmtk"), "orthanc": c.get("orthanc"),
        "throughput": throughput_rows(c["samples"]),
        "ratios": ratio_rows(c["samples"]),
        "durable_ceiling": {k: v["files_per_s"] for k, v in ((c.get("hardware") or {}).get("ceilings") or {}).items()},
        "sustained": {"offered_rate": meta["sustained_rate"], **sus},
        "many_small_associations": sm,
        "ok": not problems,
        "problems": problems,
    }


def _mr_max(samples: list[dict[str, Any]], n: int) -> float | None:
    rates = [s["instances_per_s"] for s in samples if s["ok"] and s["scenario"] == "mr-burst"
             and s["client"] == "driver" and s["receiver"].startswith("appliance") and s["associations"] == n]
    return statistics.median(rates) if rates else None


@contextlib.contextmanager
def exit_on_signals() -> Iterator[None]:
    """SIGTERM, SIGHUP and SIGINT as a clean exit of the whole datasheet. The receivers run in sessions of
    their own (so that a stop reaches their workers), so a harness killed by SIGTERM's or SIGHUP's default action
    (a ``kill``, a closed ssh session) left them running, and the run folders on the site's volumes, behind. And
    Ctrl-C as KeyboardInterrupt ended only the step it came in (the side by side and ``bench run`` catch it to
    report what ran), after which the datasheet went on with the next step. As SystemExit, which those do not
    catch, the ``finally`` blocks that stop each receiver and remove its folders run, and nothing more starts.
    A signal already ignored stays ignored: ``nohup appliance bench datasheet &`` means that a hang-up (or, in a
    background job, a Ctrl-C) must not end it."""
    def leave(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    old = {sig: signal.signal(sig, leave) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
           if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def parse_cpus(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise argparse.ArgumentTypeError(f"expected a CPU list such as 0 or 0-1,3, got {text!r}")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="appliance bench datasheet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="folder for the reports (default ./datasheet-<time>)")
    p.add_argument("--config", "-c", type=Path, help="the appliance configuration to measure")
    p.add_argument("--target", type=driver.parse_target, help="HOST:PORT of an appliance already running")
    p.add_argument("--called-ae", default="APPLIANCE", help="--target's AE title")
    p.add_argument("--storescp", type=driver.parse_target, help="with --target: HOST:PORT of a storescp --fork")
    p.add_argument("--orthanc", type=driver.parse_target, help="with --target: HOST:PORT of an Orthanc")
    p.add_argument("--tmp", type=Path, help="where the receivers' data goes")
    p.add_argument("--cache", type=Path, default=synth.DEFAULT_CACHE)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int)
    p.add_argument("--associations", default="4", type=lambda t: [int(v) for v in t.split(",") if v.strip()])
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--count", type=int)
    p.add_argument("--load", type=float, default=0.5)
    p.add_argument("--sustained-seconds", type=float)
    p.add_argument("--hardware-seconds", type=float)
    p.add_argument("--workers", type=int)
    p.add_argument("--sender-cpus", type=parse_cpus)
    p.add_argument("--title")
    p.add_argument("--keep", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else REPEATS_MIN)
    if repeats < REPEATS_MIN and not args.quick:
        parser.error(f"--repeats must be at least {REPEATS_MIN} (a median and its spread); --quick for a smoke run")
    if args.target is None and (args.storescp or args.orthanc):
        parser.error("--storescp and --orthanc name receivers beside a --target")
    if args.target is not None and args.config is not None:
        parser.error("-c configures an appliance this command starts; --target measures one already running")
    if not 0 < args.load <= 1:
        parser.error("--load must be in (0, 1]")
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not scenarios or any(s not in SCENARIOS for s in scenarios) or "mr-burst" not in scenarios:
        parser.error(f"--scenarios: a comma list of {', '.join(SCENARIOS)} that includes mr-burst")
    if not args.associations or min(args.associations) < 1:
        parser.error("--associations: a comma list of numbers of at least 1")
    out = args.out or Path.cwd() / time.strftime("datasheet-%Y%m%d-%H%M%S")
    steps = out / "steps"
    steps.mkdir(parents=True, exist_ok=True)
    for old in [*steps.glob("*"), *out.glob("datasheet*")]:  # a reused --out lends no old numbers
        if old.is_file():
            old.unlink()
    if shutil.which("storescu") is None:
        print("error: DCMTK is not installed (apt-get install dcmtk): the side by side sends with storescu and "
              "compares with storescp", file=sys.stderr)
        return 2
    site = load_site(args.config)
    if site is not None:
        left = site.leftovers()
        if left:
            print(f"note: earlier benchmark runs left {', '.join(map(str, left[:5]))}"
                  + (f" and {len(left) - 5} more" if len(left) > 5 else "")
                  + ": remove them unless a benchmark is running", file=sys.stderr)
    count = args.count or (100 if args.quick else None)
    sustained_s = args.sustained_seconds or (10.0 if args.quick else 30.0)
    hw_s = args.hardware_seconds or (3.0 if args.quick else 10.0)
    top_n = max(args.associations)
    if args.sender_cpus:
        everything = os.sched_getaffinity(0)
        rest = everything - args.sender_cpus
        if not args.sender_cpus <= everything or not rest:
            print(f"error: --sender-cpus {sorted(args.sender_cpus)}: this machine has CPUs {sorted(everything)}, "
                  "and the receivers need at least one of them", file=sys.stderr)
            return 2
        receivers.RECEIVER_CPUS = rest
        os.sched_setaffinity(0, args.sender_cpus)  # this process, its threads and the storescu it starts
    created_tmp = None
    if args.tmp is not None:
        tmp = args.tmp
    elif site is not None:  # storescp and Orthanc write on the site's first volume: the same array
        tmp = created_tmp = site.config.volumes[0].path / BENCH_FOLDER
        tmp.mkdir(exist_ok=True)
    else:
        tmp = Path(tempfile.gettempdir())
    try:
        with exit_on_signals():
            return _run(args, argv, out, steps, site, tmp, repeats, count, sustained_s, hw_s, top_n, scenarios)
    finally:
        if created_tmp is not None:
            try:
                created_tmp.rmdir()
            except OSError:
                pass


def _run(args: argparse.Namespace, argv: list[str], out: Path, steps: Path, site: SiteConfig | None, tmp: Path,
         repeats: int, count: int | None, sustained_s: float, hw_s: float, top_n: int, scenarios: list[str]) -> int:
    from bench.datasheet_report import write_reports

    total = 4
    disks: list[dict[str, Any]] = []
    loopback = None
    if args.target is None:
        folders = ([(vc.path, f"volume {vc.name}") for vc in site.config.volumes] if site is not None
                   else [(tmp, "the receivers' data")])
        index_folder = site.config.storage.index_path.parent if site is not None else None
        if index_folder is not None and index_folder.is_dir():  # often an SSD beside the volumes' array
            folders.append((index_folder, "the index"))
        print(f"[1/{total}] the machine: disks of {', '.join(str(f) for f, _ in folders)} ({repeats} x {hw_s:g} s "
              "each)", file=sys.stderr, flush=True)
        disks = probe_disks(folders, hw_s, repeats, BENCH_FOLDER if site is not None else None)
        loopback = disks[0]["results"].get("tcp_loopback_mb_per_s") if disks else None
        (steps / "hardware.json").write_text(json.dumps(disks, indent=1))
    else:
        print(f"[1/{total}] the machine: skipped (the appliance is at {args.target[0]}:{args.target[1]})",
              file=sys.stderr, flush=True)

    factories, info, skipped = _receivers(args, site)
    print(f"[2/{total}] side by side: {', '.join(scenarios)}; {', '.join(info)}; {repeats} repeat(s)",
          file=sys.stderr, flush=True)
    ns = argparse.Namespace(scenario=scenarios, count=count, seed=1, cache=args.cache, timeout=900.0,
                            clients=list(sidebyside.CLIENTS), tmp=tmp, repeats=repeats,
                            associations=list(args.associations), no_hardware=args.target is not None,
                            hardware_seconds=min(3.0, hw_s), keep=args.keep)
    rc = sidebyside.run(ns, argv, factories, info, skipped, steps / "compare.json")
    samples = json.loads((steps / "compare.json").read_text())["compare"]["samples"]
    mr_max = _mr_max(samples, top_n)
    if not mr_max:
        print("error: no successful MR burst of the appliance: nothing to base the sustained rate on (see "
              f"{steps / 'compare.md'})", file=sys.stderr)
        return 1
    rate = max(1.0, round(args.load * mr_max, 1))
    where = (["--target", f"{args.target[0]}:{args.target[1]}", "--ae", args.called_ae] if args.target is not None
             else ["--start-appliance", *(["--config", str(site.path)] if site is not None else []),
                   *(["--workers", str(args.workers)] if args.workers is not None else [])])
    common = ["--cache", str(args.cache), "--tmp", str(tmp), "--quiet", "--no-plots", *where]
    for i in range(repeats):
        print(f"[3/{total}] sustained MR at {rate:g}/s for {sustained_s:g} s, repeat {i + 1} of {repeats}",
              file=sys.stderr, flush=True)
        rc |= driver.main(["--scenario", "sustained", "--rate", str(rate), "--duration", str(sustained_s),
                           "--associations", "8", "--json", str(steps / f"sustained-{i + 1}.json"), *common])
    for i in range(repeats):
        print(f"[4/{total}] many small associations, repeat {i + 1} of {repeats}", file=sys.stderr, flush=True)
        rc |= driver.main(["--scenario", "many-small-associations", "--count", str(count * 2 if count else 400),
                           "--associations", "8", "--json", str(steps / f"many-small-{i + 1}.json"), *common])
    meta = {
        "title": args.title, "quick": args.quick, "repeats": repeats, "argv": argv,
        "units": {"MB": "10^6 bytes", "kB": "10^3 bytes", "MiB": "2^20 bytes", "GiB": "2^30 bytes"},
        "machine": {"cpu_count": os.cpu_count(), "cpu_model": hardware.cpu_model(),
                    "memory_bytes": hardware.memory_bytes(),
                    "kernel": os.uname().release, "os": operating_system(), "python": sys.version.split()[0]},
        "disks": disks, "loopback_mb_per_s": loopback,
        "sender": {"where": "this machine" if args.target is None or driver.is_local(args.target[0])
                   else "another machine than the appliance's",
                   "cpus": sorted(args.sender_cpus) if args.sender_cpus else None,
                   "receiver_cpus": sorted(receivers.RECEIVER_CPUS) if receivers.RECEIVER_CPUS else None},
        "appliance": {"target": "started by the benchmark" if args.target is None
                      else f"{args.target[0]}:{args.target[1]} (AE {args.called_ae})",
                      "config": site.describe() if site is not None else None,
                      "workers": (args.workers if args.workers is not None
                                  else site.workers if site is not None else 0) if args.target is None else None},
        "scenarios": scenarios, "associations": list(args.associations), "mr_max_instances_per_s": mr_max,
        "sustained_rate": rate, "load": args.load, "sustained_seconds": sustained_s,
    }
    doc = summarize(out, meta)
    paths = write_reports(doc, out)
    print(paths["markdown"].read_text())
    print(f"datasheet: {paths['html']} ({paths['markdown'].name}, {paths['json'].name}; step reports in {steps})",
          file=sys.stderr)
    return 0 if rc == 0 and doc["ok"] else 1


def _receivers(args: argparse.Namespace, site: SiteConfig | None) -> tuple[list[Any], dict[str, dict[str, str]],
                                                                          dict[str, str]]:
    """(factories, label -> {ae, durability}, skipped receivers with why) for the side by side."""
    import functools

    skipped: dict[str, str] = {}
    factories: list[Any] = []
    if args.target is not None:
        remote = [("appliance", args.target, args.called_ae, "as configured on that machine"),
                  ("storescp", args.storescp, "STORESCP", "as started on that machine (storescp does not fsync)"),
                  ("orthanc", args.orthanc, "ORTHANC", "as configured on that machine")]
        for label, where, ae, durability in remote:
            if where is None:
                skipped[label] = f"--{label} HOST:PORT was not given"
                continue
            factories.append(functools.partial(receivers.RemoteReceiver, label=label, host=where[0], port=where[1],
                                               ae=ae, durability=durability))
    else:
        workers = args.workers if args.workers is not None else (None if site is not None else 0)
        factories.append(functools.partial(receivers.ApplianceReceiver, workers=workers, site=site))
        for name, cls in (("storescp", receivers.StorescpReceiver), ("orthanc", receivers.OrthancReceiver)):
            why = cls.available()
            if why:
                print(f"SKIPPING {name}: {why}", file=sys.stderr)
                skipped[name] = why
            else:
                factories.append(cls)
    info: dict[str, dict[str, str]] = {}
    probe = Path(tempfile.gettempdir())
    for factory in factories:
        r = factory(probe)
        info[r.label] = {"ae": r.ae, "durability": r.fsync}
    return factories, info, skipped


if __name__ == "__main__":
    sys.exit(main())
