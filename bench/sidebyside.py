"""Side by side: a bench/driver.py scenario against the appliance, DCMTK ``storescp --fork`` and Orthanc, sent by
two clients, our asyncio driver and DCMTK ``storescu``; ``python -m bench.compare --scenario ...`` runs it.

For every repeat (outermost) x scenario x N (associations) x client x receiver, one run:
  1. start the receiver (bench/receivers.py: 127.0.0.1, free port, fresh data folder, documented config) and wait
     for its C-ECHO answer;
  2. send the scenario with the client:
     - ``driver``: bench.driver.run_one, exactly as ``appliance bench run`` sends it (fresh SOP Instance UIDs);
     - ``storescu``: the same instances (same profiles, counts and seeds) as Part-10 files from the synth cache,
       split into the same contiguous runs (synth.split); one ``storescu`` per association with the scenario's
       calling AE (CT01..., TCP_NODELAY=1): all at once for ct-burst and morning-rush, one file per storescu, N
       at a time, for many-small-associations;
  3. wall time = first association (process) started -> last one done; the run is OK when every C-STORE got
     Success (driver) / every storescu exited 0, and the stopped receiver holds exactly one file per instance;
  4. stop the receiver, delete its data, ``sync``.
The driver records every C-STORE's latency (p50/p95/p99/max per run); for the appliance, its /metrics are scraped
before and after each run (per-stage mean ms, group commit batch size), as ``appliance bench run --metrics-url``
does. Before the first run, bench/hardware.py's fsync'd-file probe measures the durable ceiling of the data
folder's disk at each instance size of the scenarios (8 threads; --no-hardware skips it), and every run records
the disk's write requests, bytes and flush requests (/sys/dev/block) up to a sync() after it.
Medians over the repeats per (scenario, client, receiver, N), and the ratios appliance / storescp and
appliance / orthanc per (scenario, client, N), of the medians and within each repeat, go to the ``compare``
section of a bench/report.py document (bench/sidebyside_report.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import driver, hardware, report, synth
from bench.monitor import STAGES, MetricsWindow
from bench.receivers import (
    DCMTK_ENV,
    Receiver,
    disk_delta,
    disk_io,
    first_line,
    orthanc_binary,
    rotated,
    system_cpu,
)
from bench.sidebyside_report import compare_markdown, medians, ratios, write_compare

CLIENTS = ("driver", "storescu")
# mr-burst: ct-burst's shape (one modality, one burst split over N associations) with the MR profile, from MR01.
SCENARIOS = ("ct-burst", "mr-burst", "morning-rush", "many-small-associations")
CEILING_THREADS = 8


def driver_args(scenario: str, count: int | None, seed: int, cache: Path, timeout: float) -> argparse.Namespace:
    """The subset of ``appliance bench run`` options that driver.build_scenario and driver.run_one read."""
    if scenario == "mr-burst":
        return argparse.Namespace(scenario="ct-burst", count=count, seed=seed, cache=cache, profile="mr",
                                  calling_ae="MR01", transfer_syntax=driver.EXPLICIT_LE, rate=0.0, duration=0.0,
                                  quiet=True, max_pdu=1 << 20, timeout=timeout)
    return argparse.Namespace(scenario=scenario, count=count, seed=seed, cache=cache, profile=None, calling_ae=None,
                              transfer_syntax=driver.EXPLICIT_LE, rate=0.0, duration=0.0, quiet=True,
                              max_pdu=1 << 20, timeout=timeout)


class Plan:
    """One scenario's data: in memory for the driver, as cached Part-10 bursts for storescu (same instances)."""

    def __init__(self, scenario: str, count: int | None, seed: int, cache: Path, timeout: float,
                 files: bool = True) -> None:
        self.name = scenario
        self.args = driver_args(scenario, count, seed, cache, timeout)
        self.scenario, self.data = driver.build_scenario(self.args)
        self.bursts: dict[str, synth.Burst] = {}
        for ae, info in self.data.items() if files else ():  # one group per calling AE, as in build_scenario
            spec = synth.profile_spec(info["profile"], info["instances"], seed=info["seed"])
            self.bursts[ae] = synth.load_or_generate(spec, cache)
        self.instances = sum(len(items) for _, items in self.scenario.groups)

    def size_mix(self) -> list[tuple[int, int]]:
        """(instances, mean dataset bytes) per group of the scenario (one per calling AE: CT, MR, DX rooms)."""
        return [(info["instances"], round(info["bytes"] / info["instances"]))
                for info in self.data.values() if info["instances"]]

    @property
    def mean_bytes(self) -> int:
        """Mean dataset bytes of the scenario's instances (a Part-10 file adds its File Meta, ~200 bytes)."""
        return round(sum(info["bytes"] for info in self.data.values()) / self.instances) if self.instances else 0

    def storescu_jobs(self, n: int) -> tuple[list[tuple[str, list[Path]]], int, int]:
        """(jobs: (calling AE, paths) per storescu process, how many run at once, Part-10 bytes)."""
        nbytes = sum(b.total_bytes for b in self.bursts.values())
        if self.name == "many-small-associations":
            jobs = [(ae, [path]) for ae, burst in self.bursts.items() for path in burst.files]
            return jobs, n, nbytes
        jobs = [(ae, [folder]) for ae, burst in self.bursts.items()
                for folder in synth.split(burst, min(n, len(burst.files)))]
        return jobs, len(jobs), nbytes


def run_storescu_jobs(ae: str, port: int, jobs: list[tuple[str, list[Path]]], concurrency: int, timeout: float,
                      logdir: Path, host: str = "127.0.0.1") -> tuple[float, int, float, list[str]]:
    """Each job is one storescu (one association); ``concurrency`` at a time. Returns (wall seconds, failed
    processes, their CPU seconds, error notes)."""
    lock = threading.Lock()
    pending = list(enumerate(jobs))[::-1]
    failures, cpu = [0], [0.0]
    notes: list[str] = []
    t0 = time.perf_counter()
    deadline = t0 + timeout
    ends = [t0]

    def worker() -> None:
        while True:
            with lock:
                if not pending:
                    return
                i, (calling, paths) = pending.pop()
            if time.perf_counter() > deadline:
                with lock:
                    failures[0] += 1
                continue
            log_path = logdir / f"storescu-{i}.log"
            scan = ["+sd"] if paths[0].is_dir() else []
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(["storescu", "-aec", ae, "-aet", calling, *scan, host, str(port),
                                         *map(str, paths)], env=DCMTK_ENV, stdout=log, stderr=subprocess.STDOUT)
            timer = threading.Timer(max(0.0, deadline - time.perf_counter()), proc.kill)
            timer.start()
            try:
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = code = os.waitstatus_to_exitcode(status)
            finally:
                timer.cancel()
            end = time.perf_counter()
            with lock:
                ends.append(end)
                cpu[0] += usage.ru_utime + usage.ru_stime
                if code != 0:
                    failures[0] += 1
                    if len(notes) < 10:
                        tail = log_path.read_text(errors="replace").splitlines()[-3:]
                        notes.append(f"storescu {i} ({calling}) exited {code}: " + " | ".join(tail))

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(concurrency, len(jobs)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(1.0, deadline + 15 - time.perf_counter()))
    if time.perf_counter() > deadline:
        notes.append(f"run longer than {timeout:.0f}s: storescu processes still running were killed")
    return max(ends) - t0, failures[0], cpu[0], notes


def one_run(factory: Callable[[Path], Receiver], plan: Plan, client: str, n: int, repeat: int, base: Path,
            keep: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One receiver x client x N run. Returns (the compare sample, the driver's run document or None)."""
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{plan.name}-{client}-n{n}-", dir=base))
    receiver = factory(workdir)
    sample: dict[str, Any] = {
        "receiver": receiver.label, "client": client, "scenario": plan.name, "associations": n, "repeat": repeat,
        "instances": plan.instances, "bytes": 0, "bytes_kind": "dataset" if client == "driver" else "part10",
        "processes_or_associations": 0, "wall_s": 0.0, "instances_ok": 0, "instances_per_s": None,
        "mb_per_s": None, "failures": 0, "stored": 0, "receiver_cpu_s": 0.0, "client_cpu_s": 0.0,
        "machine_busy_s": 0.0, "errors": [], "latency_ms": None, "stages_ms": None, "batch_size_mean": None,
        "commits": None, "disk": None,
    }
    run_doc = None
    try:
        workload = plan.scenario.workload(n, unique=True) if client == "driver" else None  # UIDs rewritten here
        receiver.start()
        # The appliance's /metrics are scraped here and after the CPU readings, for either client, so the
        # scrapes (several while the 0.5 s metrics flush settles) are not counted as the receiver's CPU.
        window = MetricsWindow(receiver.metrics_url)  # the appliance's /metrics around the run (either client)
        window.open()
        cpu0 = receiver.cpu_seconds()
        busy0, _, _ = system_cpu()
        disk0 = disk_io(receiver.data_path()) if receiver.counts_stored else None
        if workload is not None:
            target = driver.Target(receiver.label, "target", receiver.host, receiver.port, receiver.ae)
            run_doc = driver.run_one(target, workload, plan.args, f"{receiver.label} {plan.name} N={n}")
            run_doc.update(client="driver", repeat=repeat)
            summary = report.summarize(run_doc)
            sample.update(wall_s=run_doc["wall_s"], instances_ok=summary["instances_ok"],
                          failures=summary["failures"], bytes=summary["bytes_ok"],
                          client_cpu_s=run_doc["driver_cpu_s"],
                          processes_or_associations=summary["associations_opened"],
                          latency_ms=summary["latency_ms"])
            sample["errors"].extend(run_doc["errors"][:10])
        else:
            jobs, concurrency, nbytes = plan.storescu_jobs(n)
            wall, failed, scu_cpu, notes = run_storescu_jobs(receiver.ae, receiver.port, jobs, concurrency,
                                                             plan.args.timeout, workdir, receiver.host)
            sample.update(wall_s=wall, failures=failed, bytes=nbytes, client_cpu_s=round(scu_cpu, 3),
                          instances_ok=plan.instances if failed == 0 else 0, processes_or_associations=len(jobs))
            sample["errors"].extend(notes)
        busy1, _, _ = system_cpu()
        sample["receiver_cpu_s"] = round(receiver.cpu_seconds() - cpu0, 3) if receiver.measures_cpu else None
        sample["machine_busy_s"] = round(busy1 - busy0, 3)
        os.sync()  # a receiver that acknowledged from the page cache pays its writes here, outside the wall time
        sample["disk"] = disk_delta(disk0, receiver.data_path()) if disk0 is not None else None
        # After the CPU readings: not part of the run.
        metrics = window.close(sample["instances_ok"] if client == "driver"
                               else (plan.instances if sample["failures"] == 0 else 0))
        if metrics is not None:
            sample.update(stage_fields(metrics))
            if run_doc is not None:
                run_doc["metrics"] = metrics
        if window.error:
            sample["errors"].append(window.error)
        wall = sample["wall_s"]
        if wall > 0 and sample["failures"] == 0:
            sample["instances_per_s"] = round(sample["instances_ok"] / wall, 2)
            sample["mb_per_s"] = round(sample["bytes"] / 1e6 / wall, 2)
    except Exception as exc:  # a receiver that fails to start or dies: record it, go on with the next run
        sample["errors"].append(f"{type(exc).__name__}: {exc}")
        sample["failures"] = sample["failures"] or 1
    finally:
        receiver.stop()
        try:
            sample["stored"] = receiver.stored_count() if receiver.counts_stored else None
        except OSError:
            sample["stored"] = 0
        if receiver.counts_stored and sample["stored"] != plan.instances and not sample["errors"]:
            sample["errors"].append(f"receiver holds {sample['stored']} of {plan.instances} instances")
        if sample["errors"]:
            tail = receiver.log_tail(15)
            if tail:
                sample["errors"].append("receiver log tail:\n" + tail)
        if keep:
            print(f"  kept {workdir}", file=sys.stderr)
        else:
            receiver.cleanup()
            shutil.rmtree(workdir, ignore_errors=True)
        os.sync()  # the next run must not pay for this one's writeback
    stored_ok = sample["stored"] == plan.instances or not receiver.counts_stored
    sample["ok"] = sample["failures"] == 0 and stored_ok and not sample["errors"]
    return sample, run_doc


def _cpu(seconds: float | None) -> str:
    return "    -" if seconds is None else f"{seconds:5.1f}"


def stage_fields(metrics: dict[str, Any] | None) -> dict[str, Any]:
    """A compare sample's view of bench.monitor.metrics_delta: mean ms per stage, batch size, commits."""
    if not metrics:
        return {}
    stages = metrics.get("stages") or {}
    return {"stages_ms": {st: (stages.get(st) or {}).get("mean_ms") for st in STAGES},
            "batch_size_mean": metrics.get("batch_size_mean"), "commits": metrics.get("commits")}


def _by_size(mix: list[tuple[int, int]]) -> dict[int, int]:
    """Instances per size (three CT rooms are one size)."""
    out: dict[int, int] = {}
    for count, size in mix:
        out[size] = out.get(size, 0) + count
    return out


def mixed_ceiling(mix: list[tuple[int, int]], rates: dict[int, float]) -> float:
    """Instances/s of a mix of sizes when each size goes at its own fsync'd-files rate: the time for the whole
    mix is the sum of each group's count / rate (a 8 MB DX image costs what it costs, whatever the mean is).
    0.0 when a size could not be written at all in the probe's time."""
    if any(rates[size] <= 0 for _count, size in mix):
        return 0.0
    seconds = sum(count / rates[size] for count, size in mix)
    return sum(count for count, _ in mix) / seconds if seconds > 0 else 0.0


def _probe_size(size: int, measured: dict[int, tuple[float, float]]) -> int | None:
    """A size already probed within 5% of ``size`` (the CT of ct-burst and of morning-rush differ by a byte):
    one probe per size class, so two scenarios are not compared against two readings of one noisy probe."""
    for probed in measured:
        if abs(probed - size) <= 0.05 * max(probed, size):
            return probed
    return None


def durable_ceiling(plans: list[Plan], folder: Path, seconds: float) -> dict[str, Any]:
    """bench/hardware.py's fsync'd-file probe (the same code as ``appliance bench hardware``): CEILING_THREADS
    threads creating, writing, fsyncing and closing files for ``seconds``, under ``folder`` (the receivers'
    filesystem), once per distinct instance size of the scenarios (CT, MR, DX...). A scenario's ceiling is
    ``mixed_ceiling`` of its groups: files/s = instances/s."""
    hw: dict[str, Any] = {"threads": CEILING_THREADS, "seconds": seconds, "dir": str(folder),
                          "filesystem": hardware.machine(folder)["filesystem"], "skipped": None, "ceilings": {}}
    measured: dict[int, tuple[float, float]] = {}
    for plan in plans:
        mix: list[tuple[int, int]] = []  # (instances, the probed size standing for theirs)
        for count, size in plan.size_mix():
            probed = _probe_size(size, measured)
            if probed is None:
                probe_dir = Path(tempfile.mkdtemp(prefix=".hwprobe-", dir=folder))
                try:
                    os.sync()  # the scenario data just generated must not be flushed during the probe
                    measured[size] = hardware.fsync_files(probe_dir, size, CEILING_THREADS, seconds,
                                                           os.urandom(max(size, 1)))
                except OSError as exc:
                    hw["skipped"] = f"probe failed: {exc}"
                    return hw
                finally:
                    shutil.rmtree(probe_dir, ignore_errors=True)
                probed = size
            mix.append((count, probed))
        rates = {size: measured[size][0] for _c, size in mix}
        files_s = mixed_ceiling(mix, rates)
        mean = plan.mean_bytes
        hw["ceilings"][plan.name] = {
            "file_bytes": mean, "files_per_s": round(files_s, 1), "mb_per_s": round(files_s * mean / 1e6, 1),
            "sizes": [{"instances": c, "file_bytes": size, "files_per_s": round(measured[size][0], 1)}
                      for size, c in _by_size(mix).items()]}
    return hw


def run(args: argparse.Namespace, argv: list[str], factories: list[Callable[[Path], Receiver]],
        receivers_info: dict[str, dict[str, str]], skipped: dict[str, str], out: Path) -> int:
    """The scenario mode of bench.compare: run everything, write the report, print the Markdown."""
    try:
        import uvloop

        uvloop.install()  # as appliance bench run does
    except ImportError:  # pragma: no cover
        pass
    plans = [Plan(name, args.count, args.seed, args.cache, args.timeout, "storescu" in args.clients)
             for name in args.scenario]
    base = Path(tempfile.mkdtemp(prefix="bench-compare-", dir=args.tmp))
    samples: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    total = args.repeats * len(plans) * len(args.associations) * len(args.clients) * len(factories)
    i = 0
    hw: dict[str, Any] = {"threads": CEILING_THREADS, "seconds": 0.0, "dir": str(base), "filesystem": None,
                          "skipped": "--no-hardware" if args.no_hardware else "interrupted", "ceilings": {}}
    try:
        if not args.no_hardware:
            print(f"durable ceiling: fsync'd files, {CEILING_THREADS} threads, {args.hardware_seconds:g} s per "
                  "instance size", file=sys.stderr, flush=True)
            hw = durable_ceiling(plans, base, args.hardware_seconds)
            for name, ceiling in hw["ceilings"].items():
                print(f"  {name}: {ceiling['files_per_s']:,.0f} files/s of {ceiling['file_bytes'] / 1e3:,.0f} kB",
                      file=sys.stderr, flush=True)
        # Repeats outermost (slow drifts of the machine's load spread over every cell); receivers innermost, so
        # the runs a ratio divides are as close in time as possible, and rotated from cell to cell (rotated()).
        cell = 0
        for repeat in range(args.repeats):
            for plan in plans:
                for n in args.associations:
                    for client in args.clients:
                        for position, factory in enumerate(rotated(factories, cell)):
                            i += 1
                            s, run_doc = one_run(factory, plan, client, n, repeat, base, args.keep)
                            s["position"] = position  # 0: the first run of its cell (receivers take turns)
                            samples.append(s)
                            if run_doc is not None:
                                runs.append(run_doc)
                            status = "ok" if s["ok"] else "FAILED: " + "; ".join(s["errors"])[:2000]
                            rate = s["instances_per_s"] or 0.0
                            print(f"[{i}/{total}] {s['receiver']:<14} {client:<8} {plan.name} x{plan.instances} "
                                  f"N={n} rep {repeat}: {rate:7.1f} inst/s wall {s['wall_s']:6.2f}s recvCPU "
                                  f"{_cpu(s['receiver_cpu_s'])}s clientCPU {s['client_cpu_s']:5.1f}s {status}",
                                  file=sys.stderr, flush=True)
                        cell += 1
    except KeyboardInterrupt:
        print("interrupted: reporting what ran", file=sys.stderr)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    rows = medians(samples, {name: c["files_per_s"] for name, c in hw["ceilings"].items()})
    data = {f"{p.name}/{ae}": info for p in plans for ae, info in p.data.items()}
    config = {
        "scenario": ",".join(args.scenario), "target": "started receivers: " + ", ".join(receivers_info),
        "called_ae": ", ".join(sorted({meta["ae"] for meta in receivers_info.values()})),
        "associations": args.associations, "count": args.count, "rate": None, "duration": None, "seed": args.seed,
        "transfer_syntax": driver.EXPLICIT_LE, "unique_uids": True, "max_pdu": 1 << 20, "start_appliance": None,
        "server_pid": None, "metrics_url": None, "ceiling": None,
    }
    doc = report.build_document(argv, config, data, runs)
    doc["compare"] = {
        "mode": "scenario",
        "scenarios": list(args.scenario),
        "clients": list(args.clients),
        "associations": list(args.associations),
        "repeats": args.repeats,
        "receivers": receivers_info,
        "skipped": skipped,
        "dcmtk": first_line(["storescu", "--version"]),
        "orthanc": first_line([orthanc_binary() or "Orthanc", "--version"]),
        "samples": samples,
        "medians": rows,
        "ratios": ratios(rows, samples),
        "ok": bool(samples) and all(s["ok"] for s in samples),
        "hardware": hw,
    }
    paths = write_compare(doc, out)
    print(compare_markdown(doc))
    print(f"report: {paths['json']} ({paths['markdown'].name}" + "".join(f", {p.name}" for p in paths["plots"])
          + ")", file=sys.stderr)
    return 0 if doc["compare"]["ok"] else 1

