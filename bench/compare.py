"""Ingest benchmark: the appliance against DCMTK storescp and Orthanc, driven by K parallel DCMTK storescu.

For every receiver x scenario (CT, MR burst) x K (parallel associations) x repeat:
  1. start the receiver on 127.0.0.1, a free port, a fresh temp data folder; wait for its C-ECHO answer;
  2. start K ``storescu +sd <folder>`` at once (TCP_NODELAY=1), each with its own K-th of the burst;
  3. wall time = start of the first storescu to exit of the last; instances/s and MB/s (10^6 bytes of
     Part-10 files) from that; every storescu must exit 0 and the receiver must hold every instance after;
  4. stop the receiver, delete its data, ``sync`` (so one run's writeback does not land in the next).
Medians over the repeats go to a Markdown table on stdout; raw samples, medians and the machine to --out.

    python -m bench.compare --quick                       # smoke run, small bursts, 1 repeat
    python -m bench.compare                               # everything, 3 repeats
    python -m bench.compare --scenarios ct --k 1,4 --receivers appliance,orthanc --workers 2 --repeats 1

With --scenario, a bench/driver.py scenario instead, sent by our driver and by storescu (bench/sidebyside.py):

    python -m bench.compare --scenario ct-burst,morning-rush --clients driver,storescu --associations 4,8
    python -m bench.compare --scenario ct-burst --associations 4 --repeats 1 --count 200 --no-hardware
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import report, sidebyside, synth
from bench.bench_config import load_site
from bench.receivers import (  # noqa: F401  (re-exported: bench.compare.ApplianceReceiver etc. stay valid)
    DCMTK_ENV,
    RECEIVERS,
    ROOT,
    ApplianceReceiver,
    OrthancReceiver,
    Receiver,
    StorescpReceiver,
    count_files,
    disk_delta,
    disk_io,
    echo,
    first_line,
    free_port,
    make_receivers,
    orthanc_binary,
    proc_tree_cpu,
    rotated,
    system_cpu,
    wait_for,
)

# ---- the machine --------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """bench.report's machine facts plus the DCMTK and Orthanc versions."""
    return {**report.machine_info(), "dcmtk": first_line(["storescu", "--version"]),
            "orthanc": first_line([orthanc_binary() or "Orthanc", "--version"])}


# ---- one run ------------------------------------------------------------------------------------------


@dataclass
class Sample:
    receiver: str
    scenario: str
    k: int
    repeat: int
    instances: int
    bytes: int
    wall_s: float = 0.0
    instances_per_s: float = 0.0
    mb_per_s: float = 0.0
    failures: int = 0  # storescu processes that did not exit 0 (or timed out)
    stored: int = 0  # instances found in the receiver's storage after stop
    receiver_cpu_s: float = 0.0
    storescu_cpu_s: float = 0.0
    machine_busy_s: float = 0.0  # all CPU time on the machine during the run (other load included)
    machine_iowait_s: float = 0.0
    sync_after_s: float = 0.0  # time of a global sync() right after the last storescu: dirty data left
    # The disk holding the receiver's data, from the start of the run to the end of that sync (receivers.disk_io):
    disk_flushes: int | None = None
    disk_bytes_written: int | None = None
    position: int = 0  # order within its cell (repeat x scenario x K): receivers take turns going first
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failures == 0 and self.stored == self.instances and not self.errors


def run_storescus(ae: str, port: int, folders: list[Path], timeout: float, logdir: Path) -> tuple[
        float, list[int], float, list[str]]:
    """K storescu at once; returns (wall seconds, exit codes, their CPU seconds, error notes)."""
    ends: list[float] = [0.0] * len(folders)
    codes: list[int] = [0] * len(folders)
    cpu: list[float] = [0.0] * len(folders)
    notes: list[str] = []
    procs: list[subprocess.Popen[bytes]] = []

    def waiter(i: int, proc: subprocess.Popen[bytes]) -> None:
        try:
            _, status, usage = os.wait4(proc.pid, 0)
            ends[i] = time.perf_counter()
            codes[i] = os.waitstatus_to_exitcode(status)
            proc.returncode = codes[i]
            cpu[i] = usage.ru_utime + usage.ru_stime
        except ChildProcessError:  # pragma: no cover
            ends[i] = time.perf_counter()
            codes[i] = -999

    threads = []
    t0 = time.perf_counter()
    for i, folder in enumerate(folders):
        log = open(logdir / f"storescu-{i}.log", "wb")
        proc = subprocess.Popen(["storescu", "-aec", ae, "-aet", f"BENCH{i}", "+sd", "127.0.0.1", str(port),
                                 str(folder)], env=DCMTK_ENV, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        procs.append(proc)
        thread = threading.Thread(target=waiter, args=(i, proc), daemon=True)
        thread.start()
        threads.append(thread)
    deadline = t0 + timeout
    for i, thread in enumerate(threads):
        thread.join(max(0.0, deadline - time.perf_counter()))
        if thread.is_alive():
            notes.append(f"storescu {i} still running after {timeout:.0f}s: killed")
            procs[i].kill()
            thread.join(10)
            codes[i] = codes[i] or -9
    for i, code in enumerate(codes):
        if code != 0:
            tail = (logdir / f"storescu-{i}.log").read_text(errors="replace").splitlines()[-5:]
            notes.append(f"storescu {i} exited {code}: " + " | ".join(tail))
    return max(ends) - t0, codes, sum(cpu), notes


def one_run(factory: Callable[[Path], Receiver], burst: synth.Burst, scenario: str, k: int, repeat: int,
            base: Path, timeout: float, keep: bool) -> Sample:
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{scenario}-k{k}-", dir=base))
    receiver = factory(workdir)
    sample = Sample(receiver.label, scenario, k, repeat, len(burst.files), burst.total_bytes)
    folders = synth.split(burst, k)
    try:
        receiver.start()
        cpu0 = receiver.cpu_seconds()
        busy0, io0, _ = system_cpu()
        disk0 = disk_io(workdir)
        wall, codes, scu_cpu, notes = run_storescus(receiver.ae, receiver.port, folders, timeout, workdir)
        busy1, io1, _ = system_cpu()
        sample.receiver_cpu_s = receiver.cpu_seconds() - cpu0
        t_sync = time.perf_counter()
        os.sync()
        sample.sync_after_s = time.perf_counter() - t_sync
        disk = disk_delta(disk0, workdir)
        if disk is not None:
            sample.disk_flushes, sample.disk_bytes_written = disk["flushes"], disk["bytes_written"]
        sample.wall_s = wall
        sample.failures = sum(1 for c in codes if c != 0)
        sample.storescu_cpu_s = scu_cpu
        sample.machine_busy_s, sample.machine_iowait_s = busy1 - busy0, io1 - io0
        sample.errors.extend(notes)
        sample.instances_per_s = sample.instances / wall if wall > 0 else 0.0
        sample.mb_per_s = sample.bytes / 1e6 / wall if wall > 0 else 0.0
    except Exception as exc:  # a receiver that fails to start or dies: record, go on with the next run
        sample.errors.append(f"{type(exc).__name__}: {exc}")
        sample.failures = k
    finally:
        receiver.stop()
        try:
            sample.stored = receiver.stored_count()
        except OSError:
            sample.stored = 0
        if sample.stored != sample.instances and not sample.errors:
            sample.errors.append(f"receiver holds {sample.stored} of {sample.instances} instances")
        if sample.errors:
            tail = receiver.log_tail(15)
            if tail:
                sample.errors.append("receiver log tail:\n" + tail)
        if keep:
            print(f"  kept {workdir}", file=sys.stderr)
        else:
            receiver.cleanup()
            shutil.rmtree(workdir, ignore_errors=True)
        os.sync()  # the next run must not pay for this one's writeback
    return sample


# ---- report -------------------------------------------------------------------------------------------


def summarize(samples: list[Sample]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, int], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.receiver, s.scenario, s.k), []).append(s)
    rows = []
    for (receiver, scenario, k), group in groups.items():
        good = [s for s in group if s.ok]
        row: dict[str, Any] = {"receiver": receiver, "scenario": scenario, "k": k, "runs": len(group),
                               "ok_runs": len(good), "instances": group[0].instances, "bytes": group[0].bytes}
        for key in ("wall_s", "instances_per_s", "mb_per_s", "receiver_cpu_s", "storescu_cpu_s", "machine_busy_s",
                    "machine_iowait_s", "sync_after_s"):
            values = [getattr(s, key) for s in good]
            row[key] = statistics.median(values) if values else None
            if key == "instances_per_s":
                row["instances_per_s_min"] = min(values) if values else None
                row["instances_per_s_max"] = max(values) if values else None
        for key, field_ in (("flushes_per_instance", "disk_flushes"), ("disk_bytes_per_instance", "disk_bytes_written")):
            per = [getattr(s, field_) / s.instances for s in good if getattr(s, field_) is not None and s.instances]
            row[key] = statistics.median(per) if per else None
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], repeats: int) -> str:
    def f(value: Any, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    out = [
        f"Medians of {repeats} repeat(s). inst/s and MB/s (10^6 B of Part-10 files) over wall time from the first "
        "storescu start to the last storescu exit. CPU = CPU-seconds used during the run (receiver process tree; "
        "the K storescu; whole machine incl. other load). sync = time of a global sync() right after the run. "
        "flush/inst and disk kB/inst: flush requests and bytes written by the disk holding the data, from the "
        "start of the run to the end of that sync (/sys/dev/block/*/stat), per instance.",
        "",
        "| receiver | scenario | K | inst/s | (min-max) | MB/s | wall s | recv CPU s | storescu CPU s | machine CPU s "
        "| iowait s | sync s | flush/inst | disk kB/inst | ok runs |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["scenario"], r["k"], r["receiver"])):
        out.append(
            f"| {r['receiver']} | {r['scenario']} ({r['instances']}) | {r['k']} | {f(r['instances_per_s'])} "
            f"| {f(r['instances_per_s_min'])}-{f(r['instances_per_s_max'])} | {f(r['mb_per_s'])} | {f(r['wall_s'], 2)} "
            f"| {f(r['receiver_cpu_s'])} | {f(r['storescu_cpu_s'])} | {f(r['machine_busy_s'])} "
            f"| {f(r['machine_iowait_s'])} | {f(r['sync_after_s'], 2)} | {f(r.get('flushes_per_instance'), 2)} "
            f"| {f(None if r.get('disk_bytes_per_instance') is None else r['disk_bytes_per_instance'] / 1e3, 0)} "
            f"| {r['ok_runs']}/{r['runs']} |"
        )
    return "\n".join(out)


def parse_list(text: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if allowed is not None:
        for item in items:
            if item not in allowed:
                raise argparse.ArgumentTypeError(f"{item!r} is not one of {', '.join(allowed)}")
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default="ct,mr", type=lambda t: parse_list(t, ("ct", "mr")),
                        help="comma list of ct, mr (default: ct,mr)")
    parser.add_argument("--k", default="1,4,8", type=lambda t: [int(v) for v in parse_list(t)],
                        help="parallel associations, comma list (default: 1,4,8)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell; medians are reported (default 3)")
    parser.add_argument("--receivers", default=",".join(RECEIVERS),
                        type=lambda t: parse_list(t, (*RECEIVERS, "appliance-base")),
                        help=f"comma list of {', '.join(RECEIVERS)} (default: all), and appliance-base: the "
                             "checkout named by $APPLIANCE_BENCH_BASE, for a before/after run")
    parser.add_argument("--workers", default=None, type=lambda t: [int(v) for v in parse_list(t)],
                        help="appliance worker counts to run, comma list (default: 1,2; 2 with --scenario)")
    parser.add_argument("--appliance-nofsync", action="store_true",
                        help="also run the appliance with storage.fsync = false (what fsync costs)")
    parser.add_argument("--quick", action="store_true", help="small bursts (CT 100, MR 300) and 1 repeat: a smoke run")
    parser.add_argument("--ct-count", type=int, help="CT slices (default 600; 100 with --quick)")
    parser.add_argument("--mr-count", type=int, help="MR images (default 2000; 300 with --quick)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--config", "-c", type=Path,
                        help="the appliance under test runs this configuration (its volumes, workers and settings; "
                        "bench/bench_config.py)")
    parser.add_argument("--cache", type=Path, default=synth.DEFAULT_CACHE, help="where generated bursts are kept")
    parser.add_argument("--tmp", type=Path, default=None, help="where receivers' data folders go (default $TMPDIR)")
    parser.add_argument("--timeout", type=float, default=600.0, help="longest one run may take (seconds)")
    parser.add_argument("--keep", action="store_true", help="keep receivers' data folders (debugging)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results file (default bench/results/compare-<time>.json)")
    side = parser.add_argument_group("side by side (bench/sidebyside.py): a driver scenario, two clients")
    side.add_argument("--scenario", type=lambda t: parse_list(t, sidebyside.SCENARIOS),
                      help=f"run these bench/driver.py scenarios instead of the bursts: {', '.join(sidebyside.SCENARIOS)}"
                      " (comma list)")
    side.add_argument("--clients", default=",".join(sidebyside.CLIENTS),
                      type=lambda t: parse_list(t, sidebyside.CLIENTS),
                      help="senders: driver (our asyncio SCU), storescu (DCMTK) (default: both)")
    side.add_argument("--associations", type=lambda t: [int(v) for v in parse_list(t)],
                      help="N, comma list (default 4,8; per modality in morning-rush); without --scenario, same as --k")
    side.add_argument("--count", type=int,
                      help="instances (default: the driver's: ct-burst 1000, morning-rush 200 per CT/MR, "
                      "many-small-associations 200)")
    side.add_argument("--no-hardware", action="store_true",
                      help="skip the durable ceiling: bench/hardware.py's fsync'd-file probe, run once per instance "
                      "size of the scenarios (CT, MR, DX) before the first run")
    side.add_argument("--hardware-seconds", type=float, default=3.0,
                      help="length of that probe per instance size (default 3; it varies between runs: longer is "
                      "steadier)")
    args = parser.parse_args(argv)
    if args.hardware_seconds <= 0:
        parser.error("--hardware-seconds must be positive")
    if args.workers is None:
        args.workers = [2] if args.scenario else [1, 2]
    if args.associations and not args.scenario:
        args.k = args.associations
    if any(n < 1 for n in args.associations or args.k):
        parser.error("--associations / --k must be at least 1")
    if args.quick and "--repeats" not in " ".join(argv if argv is not None else sys.argv):
        args.repeats = 1
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    for tool in ("storescu",):
        if shutil.which(tool) is None:
            print(f"error: DCMTK {tool} is not installed (make dcmtk, or apt-get install dcmtk)", file=sys.stderr)
            return 2

    site = load_site(args.config)
    if site is not None:
        if args.workers is None:
            args.workers = [None]  # the configuration's
    receivers = list(args.receivers)
    skipped = {}
    for name, cls in (("storescp", StorescpReceiver), ("orthanc", OrthancReceiver)):
        why = cls.available()
        if name in receivers and why:
            print(f"SKIPPING {name}: {why}", file=sys.stderr)
            skipped[name] = why
            receivers.remove(name)
    factories = make_receivers(receivers, args.workers, args.appliance_nofsync, site)
    receivers_info: dict[str, dict[str, str]] = {}
    probe = Path(tempfile.gettempdir())
    for factory in factories:
        r = factory(probe)
        receivers_info[r.label] = {"ae": r.ae, "durability": r.fsync}

    if args.scenario:
        args.associations = args.associations or [4, 8]
        out = args.out or ROOT / "bench" / "results" / (f"compare-{'-'.join(args.scenario)}-"
                                                        f"{time.strftime('%Y%m%d-%H%M%S')}.json")
        return sidebyside.run(args, list(sys.argv[1:] if argv is None else argv), factories, receivers_info, skipped,
                              out)

    ct_count = args.ct_count or (100 if args.quick else 600)
    mr_count = args.mr_count or (300 if args.quick else 2000)
    bursts = {}
    for scenario in args.scenarios:
        spec = synth.ct_spec(ct_count, seed=args.seed) if scenario == "ct" else synth.mr_spec(mr_count, seed=args.seed)
        bursts[scenario] = synth.load_or_generate(spec, args.cache)

    base = Path(tempfile.mkdtemp(prefix="bench-compare-", dir=args.tmp))
    out = args.out or ROOT / "bench" / "results" / f"compare-{time.strftime('%Y%m%d-%H%M%S')}.json"
    info = machine_info()
    samples: list[Sample] = []
    total = len(factories) * len(args.scenarios) * len(args.k) * args.repeats
    n = 0
    try:
        # Repeats outermost, so slow drifts of the machine's load spread over every cell instead of one.
        cell = 0
        for repeat in range(args.repeats):
            for scenario in args.scenarios:
                burst = bursts[scenario]
                for k in args.k:
                    for position, factory in enumerate(rotated(factories, cell)):  # receivers take turns first
                        n += 1
                        s = one_run(factory, burst, scenario, k, repeat, base, args.timeout, args.keep)
                        s.position = position
                        samples.append(s)
                        status = "ok" if s.ok else "FAILED: " + "; ".join(s.errors)[:2000]
                        print(f"[{n}/{total}] {s.receiver:<18} {scenario} x{len(burst.files)} K={k} "
                              f"rep {repeat}: {s.instances_per_s:7.1f} inst/s {s.mb_per_s:7.1f} MB/s "
                              f"wall {s.wall_s:6.2f}s recvCPU {s.receiver_cpu_s:5.1f}s scuCPU {s.storescu_cpu_s:5.1f}s "
                              f"{status}", file=sys.stderr, flush=True)
                    cell += 1
    except KeyboardInterrupt:
        print("interrupted: reporting what ran", file=sys.stderr)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    rows = summarize(samples)
    table = markdown(rows, args.repeats)
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv if argv is None else argv,
        "machine": info,
        "receivers": receivers_info,
        "skipped": skipped,
        "bursts": {s: {"key": b.spec.key, "instances": len(b.files), "bytes": b.total_bytes} for s, b in bursts.items()},
        "repeats": args.repeats,
        "medians": rows,
        "samples": [asdict(s) for s in samples],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    print(f"## Ingest benchmark ({time.strftime('%Y-%m-%d %H:%M')})\n")
    print(f"Machine: {info['cpu_count']} CPU ({info['cpu_model']}), kernel {info['kernel']}, Python {info['python']}, "
          f"{info['dcmtk']}, {info['orthanc']}, data on {info['tmp_fstype']} ({info['tmp_dir']}).")
    for label, meta in receivers_info.items():
        print(f"- {label}: durability = {meta['durability']}")
    for name, why in skipped.items():
        print(f"- {name}: SKIPPED ({why})")
    print()
    print(table)
    print(f"\nRaw samples and medians: {out}")
    failed = [s for s in samples if not s.ok]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
