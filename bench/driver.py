"""Load driver: our asyncio SCU (appliance.net.client) pushing a scenario at a receiver over N associations.

    appliance bench run --scenario ct-burst --start-appliance --associations 4,8
    appliance bench run --scenario morning-rush --target 127.0.0.1:11112 --ae APPLIANCE --server-pid 1234 \\
        --metrics-url http://127.0.0.1:9110/metrics
    appliance bench run --scenario sustained --start-appliance --rate 100 --duration 60
    appliance bench run --scenario many-small-associations --start-appliance --count 500 --associations 8

Scenarios (N = --associations; a comma list runs the scenario once per value):
  ct-burst                 one scanner (CT01) pushing a --count slice CT series (default 1000), split into N
                           contiguous runs, one association each;
  morning-rush             three CTs (CT01-03), two MRs (MR01-02) and a DX room (DX01) at once, each with its own
                           calling AE and N associations: --count instances per CT and MR (default 200), count/10 DX;
  sustained                MR01 offers --rate instances/s (default 50) for --duration s (default 60) over N
                           associations, open loop: latency under a steady load, queueing shows as queue_ms;
  many-small-associations  one instance per association (US01), --count of them (default 200), N at a time.

Every run records per-C-STORE latency, instances/s, MB/s, failures by status and association set-up times; with
a local receiver's pid (--server-pid, or --start-appliance) the receiver's CPU seconds (process tree) and peak RSS;
with --metrics-url (implied by --start-appliance) the appliance's per-stage breakdown and group commit batch size
from /metrics. The same scenario then runs against bench/discard.py (answers Success, stores nothing; its own
process) to report the driver's own ceiling next to the result. Output: JSON (schema in bench/report.py and
docs/benchmarks.md), Markdown (stdout and beside the JSON) and PNG plots.

By default every run sends fresh SOP Instance UIDs (rewritten in the dataset bytes before the clock starts), so
repeated runs against one archive store new instances instead of hitting the duplicate path (--keep-uids).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import receivers, report, synth
from bench.bench_config import SiteConfig, load_site
from bench.monitor import STAGES, MetricsWindow, ServerMonitor, metrics_delta, scrape
from bench.scenarios import (
    EXPLICIT_LE,
    IMPLICIT_LE,
    NOT_REWRITABLE,
    SCENARIOS,
    SOP_INSTANCE_TAG,
    Instance,
    Scenario,
    Workload,
    build_scenario,
    chunks,
    load_instances,
    new_uid,
    rewrite_instance_uid,
)

__all__ = [
    "EXPLICIT_LE", "IMPLICIT_LE", "NOT_REWRITABLE", "OPEN_TIMEOUT", "ROOT", "SCENARIOS", "SOP_INSTANCE_TAG", "STAGES",
    "STORE_TIMEOUT", "VERIFICATION", "Instance", "Recorder", "Scenario", "ServerMonitor", "Spawned", "Target",
    "Workload", "build_scenario", "chunks", "is_local", "load_instances", "main", "metrics_delta", "new_uid",
    "parse_target", "rewrite_instance_uid", "run_one", "scrape", "start_appliance", "start_discard",
]

ROOT = Path(__file__).resolve().parent.parent
VERIFICATION = "1.2.840.10008.1.1"
OPEN_TIMEOUT = 30.0
STORE_TIMEOUT = 120.0


# ---- one run ------------------------------------------------------------------------------------------


class Recorder:
    """Raw samples of one run (the report's ``samples``), plus live counters for the progress line."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.stores: dict[str, list[Any]] = {k: [] for k in ("t_s", "latency_s", "queue_s", "status", "bytes",
                                                              "association", "error")}
        self.associations: dict[str, list[Any]] = {"calling_ae": [], "setup_s": [], "ok": [], "error": []}
        self.done = 0
        self.failed = 0

    def association(self, ae: str, setup_s: float, ok: bool, error: str | None = None) -> int:
        a = self.associations
        a["calling_ae"].append(ae)
        a["setup_s"].append(round(setup_s, 6))
        a["ok"].append(ok)
        a["error"].append(error)
        return len(a["ok"]) - 1

    def store(self, start: float, latency: float, queue: float | None, status: int, nbytes: int, assoc: int,
              error: str | None = None) -> None:
        s = self.stores
        s["t_s"].append(round(start - self.t0, 6))
        s["latency_s"].append(round(latency, 7))
        s["queue_s"].append(None if queue is None else round(queue, 6))
        s["status"].append(status)
        s["bytes"].append(nbytes)
        s["association"].append(assoc)
        s["error"].append(error)
        self.done += 1
        self.failed += status != 0


@dataclass
class Target:
    system: str
    role: str  # "target" or "ceiling"
    host: str
    port: int
    called_ae: str
    pid: int | None = None
    metrics_url: str | None = None


def _contexts(items: Iterable[Instance]) -> list[tuple[str, list[str]]]:
    pairs = sorted({(i.sop_class_uid, i.transfer_syntax_uid) for i in items})
    return [(VERIFICATION, [IMPLICIT_LE]), *((sop, [ts]) for sop, ts in pairs)]


async def _open(target: Target, ae: str, contexts: list[tuple[str, list[str]]], rec: Recorder, max_pdu: int) -> tuple[
        Any, int]:
    from appliance.net.client import ClientAssociation

    t = time.perf_counter()
    try:
        assoc = await asyncio.wait_for(ClientAssociation.open(target.host, target.port, target.called_ae, ae,
                                                              contexts, max_pdu), OPEN_TIMEOUT)
    except Exception as exc:
        return None, rec.association(ae, time.perf_counter() - t, False, f"{type(exc).__name__}: {exc}")
    return assoc, rec.association(ae, time.perf_counter() - t, True)


async def _store(assoc: Any, idx: int, inst: Instance, rec: Recorder, queue: float | None = None) -> bool:
    """One C-STORE, recorded; False when the association is no longer usable."""
    t = time.perf_counter()
    try:
        status = await asyncio.wait_for(assoc.store(inst.sop_class_uid, inst.sop_instance_uid,
                                                    inst.transfer_syntax_uid, inst.dataset_bytes), STORE_TIMEOUT)
    except Exception as exc:
        rec.store(t, time.perf_counter() - t, queue, -1, len(inst.dataset_bytes), idx, type(exc).__name__)
        assoc.abort()
        return False
    rec.store(t, time.perf_counter() - t, queue, status, len(inst.dataset_bytes), idx)
    return True


async def _release(assoc: Any) -> None:
    try:
        await asyncio.wait_for(assoc.release(), 30)
    except Exception:
        assoc.abort()


async def _stream(target: Target, ae: str, next_item: Callable[[], Instance | None], rec: Recorder,
                  contexts: list[tuple[str, list[str]]], max_pdu: int) -> None:
    assoc, idx = await _open(target, ae, contexts, rec, max_pdu)
    if assoc is None:
        return
    while (inst := next_item()) is not None:
        if not await _store(assoc, idx, inst, rec):
            return
    await _release(assoc)


async def _per_instance(target: Target, w: Workload, rec: Recorder, max_pdu: int) -> None:
    pending: Iterator[Instance] = (items[0] for _, items in w.streams)

    async def worker() -> None:
        for inst in pending:
            assoc, idx = await _open(target, w.calling_ae, _contexts([inst]), rec, max_pdu)
            if assoc is None:
                rec.store(time.perf_counter(), 0.0, None, -1, len(inst.dataset_bytes), idx, "association-failed")
                continue
            if await _store(assoc, idx, inst, rec):
                await _release(assoc)

    await asyncio.gather(*(worker() for _ in range(w.concurrency)))


async def _for_duration(target: Target, w: Workload, rec: Recorder, max_pdu: int) -> None:
    counter = itertools.count()
    end = time.perf_counter() + w.duration

    def next_item() -> Instance | None:
        if time.perf_counter() >= end:
            return None
        return rewrite_instance_uid(w.pool[next(counter) % len(w.pool)], new_uid())

    contexts = _contexts(w.pool)
    await asyncio.gather(*(_stream(target, w.calling_ae, next_item, rec, contexts, max_pdu)
                           for _ in range(w.concurrency)))


async def _open_loop(target: Target, w: Workload, rec: Recorder, max_pdu: int) -> None:
    """Arrivals every 1/rate s whatever the receiver does; each goes to the next idle association (FIFO)."""
    contexts = _contexts(w.pool)
    idle: asyncio.Queue[tuple[Any, int]] = asyncio.Queue()
    for assoc, idx in await asyncio.gather(*(_open(target, w.calling_ae, contexts, rec, max_pdu)
                                             for _ in range(w.concurrency))):
        if assoc is not None:
            idle.put_nowait((assoc, idx))
    if idle.empty():
        return
    lost = 0

    async def one(i: int, due: float) -> None:
        nonlocal lost
        assoc, idx = await idle.get()
        inst = rewrite_instance_uid(w.pool[i % len(w.pool)], new_uid())
        if await _store(assoc, idx, inst, rec, queue=time.perf_counter() - due):
            idle.put_nowait((assoc, idx))
            return
        assoc, idx = await _open(target, w.calling_ae, contexts, rec, max_pdu)  # replace the broken one
        if assoc is not None:
            idle.put_nowait((assoc, idx))
        else:
            lost += 1
            if lost >= w.concurrency:
                raise RuntimeError("every association failed and none could be reopened")

    tasks = []
    t0 = time.perf_counter()
    for i in range(w.planned):
        due = t0 + i / w.rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, due)))
    await asyncio.gather(*tasks)
    while not idle.empty():
        await _release(idle.get_nowait()[0])


async def _execute(target: Target, w: Workload, rec: Recorder, max_pdu: int, timeout: float,
                   progress: report.Progress) -> list[str]:
    if w.mode == "streams":
        coro: Any = asyncio.gather(*(_stream(target, ae, functools.partial(next, iter(items), None), rec,
                                             _contexts(items), max_pdu) for ae, items in w.streams))
    elif w.mode == "per-instance":
        coro = _per_instance(target, w, rec, max_pdu)
    elif w.mode == "open-loop":
        coro = _open_loop(target, w, rec, max_pdu)
    else:
        coro = _for_duration(target, w, rec, max_pdu)

    async def tick() -> None:
        while True:
            progress.update(rec.done, rec.failed)
            await asyncio.sleep(0.5)

    ticker = asyncio.create_task(tick())
    errors = []
    try:
        await asyncio.wait_for(coro, timeout)
    except TimeoutError:
        errors.append(f"run timed out after {timeout:.0f}s")
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        ticker.cancel()
        progress.close(rec.done, rec.failed)
    return errors


def run_one(target: Target, w: Workload, args: argparse.Namespace, label: str) -> dict[str, Any]:
    monitor = ServerMonitor(target.pid) if target.pid else None
    window = MetricsWindow(target.metrics_url)
    window.open()  # before the CPU monitor starts: the scrapes are not the server's work
    if monitor is not None:
        monitor.start()
    rec = Recorder()
    progress = report.Progress(label, w.planned, enabled=not args.quiet)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    rec.t0 = progress.t0 = time.perf_counter()
    errors = asyncio.run(_execute(target, w, rec, args.max_pdu, args.timeout, progress))
    wall = time.perf_counter() - rec.t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    server = monitor.stop() if monitor is not None else None
    metrics = window.close(sum(1 for s in rec.stores["status"] if s == 0))
    if window.error:
        errors.append(window.error)
    errors.extend(e for e in rec.associations["error"] if e)
    return {
        "system": target.system,
        "role": target.role,
        "scenario": w.scenario,
        "mode": w.mode,
        "associations": w.n,
        "associations_concurrent": w.concurrency,  # at most this many open at once
        "target": f"{target.host}:{target.port}",
        "called_ae": target.called_ae,
        "offered_rate": w.rate or None,
        "duration_s": w.duration or None,
        "planned_instances": w.planned or len(rec.stores["status"]),
        "wall_s": wall,
        "driver_cpu_s": round(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime, 3),
        "server": server,
        "metrics": metrics,
        "errors": errors[:50],
        "samples": {"stores": rec.stores, "associations": rec.associations},
    }


# ---- receivers we start -------------------------------------------------------------------------------


def _python() -> str:
    venv = ROOT / ".venv/bin/python"
    return str(venv) if venv.exists() else sys.executable


def _wait_file(path: Path, proc: subprocess.Popen[bytes], what: str, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode} while starting")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not start within {timeout:.0f}s")
        time.sleep(0.05)
    return dict(json.loads(path.read_text()))


async def _echo(host: str, port: int, ae: str) -> int:
    from appliance.net.client import ClientAssociation

    assoc = await asyncio.wait_for(ClientAssociation.open(host, port, ae, "BENCHECHO",
                                                          [(VERIFICATION, [IMPLICIT_LE])], 1 << 16), 5)
    status = await assoc.echo()
    await assoc.release()
    return status


class Spawned:
    """A receiver process we started in its own session (appliance or discard); stopped with SIGTERM."""

    def __init__(self, cmd: list[str], workdir: Path, port_file: Path, what: str) -> None:
        self.workdir, self.what = workdir, what
        self.cleanup: Callable[[], None] | None = None  # removes what the receiver wrote outside workdir
        self.ae = what.upper()
        self.log_path = workdir / f"{what}.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=receivers.receiver_env(),  # no APPLIANCE_* override of its config
                                         preexec_fn=receivers._pin_receiver if receivers.RECEIVER_CPUS else None)
        try:
            self.info = _wait_file(port_file, self.proc, what)
        except Exception:
            self.stop()
            raise
        self.port = int(self.info["port"])

    def wait_echo(self, ae: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if asyncio.run(_echo("127.0.0.1", self.port, ae)) == 0:
                    return
            except Exception:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.05)

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM and wait; then whatever is left of the process group (a worker whose supervisor died, or
        everything after ``timeout``) is killed: no receiver outlives its run."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        receivers.kill_group(self.proc)
        if self.cleanup is not None:
            self.cleanup()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start_appliance(workdir: Path, workers: int | None, fsync: bool, site: SiteConfig | None = None) -> Spawned:
    """An appliance on 127.0.0.1 and free ports: the harness's config with its data under ``workdir``, or a site's
    configuration file (bench/bench_config.py: its volumes, a fresh folder in each). ``workers`` None: the
    site's (0, one per CPU, without a site)."""
    from bench.receivers import ApplianceReceiver

    receiver = ApplianceReceiver(workdir, workers=workers, fsync=fsync, site=site)
    try:
        cmd = receiver.command()  # writes the config (and, for a site, each volume's run folder)
        cmd[0] = _python()
        spawned = Spawned(cmd, workdir, receiver.port_file, "appliance")
    except BaseException:
        receiver.cleanup()
        raise
    spawned.cleanup = receiver.cleanup
    spawned.ae = receiver.ae
    try:
        spawned.wait_echo(receiver.ae)
    except BaseException:
        spawned.stop()
        raise
    return spawned


def start_discard(workdir: Path, max_pdu: int) -> Spawned:
    cmd = [_python(), "-m", "bench.discard", "--port-file", str(workdir / "discard.json"), "--stats-file",
           str(workdir / "discard-stats.json"), "--max-pdu", str(max_pdu)]
    spawned = Spawned(cmd, workdir, workdir / "discard.json", "discard")
    spawned.wait_echo("DISCARD")
    return spawned


# ---- command line -------------------------------------------------------------------------------------


def parse_target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def is_local(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="appliance bench run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", required=True, choices=SCENARIOS)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", type=parse_target, help="HOST:PORT of the receiver")
    where.add_argument("--start-appliance", action="store_true",
                       help="start an appliance on 127.0.0.1 with a fresh data folder under --tmp (as bench.compare)")
    parser.add_argument("--ae", default="APPLIANCE", help="called AE title (default APPLIANCE)")
    parser.add_argument("--calling-ae", help="calling AE (single-modality scenarios; default CT01, MR01, US01)")
    parser.add_argument("--associations", "-n", default="4", type=lambda t: [int(v) for v in t.split(",") if v],
                        help="N, or a comma list (one run per value); per modality in morning-rush (default 4)")
    parser.add_argument("--count", type=int, help="instances: ct-burst 1000, morning-rush 200 per CT/MR (count/10 DX),"
                        " many-small-associations 200; sustained: distinct images cycled (default 100)")
    parser.add_argument("--rate", type=float, default=50.0, help="sustained: offered instances/s (default 50)")
    parser.add_argument("--duration", type=float, default=60.0, help="sustained: seconds (default 60)")
    parser.add_argument("--profile", help="data profile of single-modality scenarios (default ct or mr)")
    parser.add_argument("--transfer-syntax", default=EXPLICIT_LE, help="transfer syntax of the data sent")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=synth.DEFAULT_CACHE, help="bench/synth's burst cache")
    parser.add_argument("--keep-uids", action="store_true",
                        help="send the generated SOP Instance UIDs as they are (re-runs then hit the duplicate path)")
    parser.add_argument("--max-pdu", type=int, default=1 << 20, help="maximum PDU we receive (responses)")
    parser.add_argument("--server-pid", type=int, help="pid of a local receiver: its process tree's CPU and RSS")
    parser.add_argument("--metrics-url", help="the appliance's /metrics, scraped before and after each run")
    parser.add_argument("--label", help="name of the target system in the report (default appliance or target)")
    parser.add_argument("--config", "-c", type=Path,
                        help="--start-appliance: this appliance configuration (its volumes, workers and settings; "
                        "bench/bench_config.py)")
    parser.add_argument("--workers", type=int, default=None,
                        help="--start-appliance: worker processes (default 0: one per CPU, as the product)")
    parser.add_argument("--no-fsync", action="store_true", help="--start-appliance: storage.fsync = false")
    parser.add_argument("--tmp", type=Path, help="--start-appliance: where its data folder goes (default $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the started appliance's data folder")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the driver-ceiling run (discard receiver)")
    parser.add_argument("--ceiling-seconds", type=float, default=5.0,
                        help="sustained: length of the ceiling run (closed loop, default 5)")
    parser.add_argument("--timeout", type=float, default=900.0, help="longest one run may take (seconds)")
    parser.add_argument("--json", type=Path, help="report file (default bench/results/run-<scenario>-<time>.json); "
                        "the Markdown and PNGs go beside it")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.associations):
        parser.error("--associations must be at least 1")
    if args.config is not None and not args.start_appliance:
        parser.error("--config configures the appliance --start-appliance starts")
    if args.scenario == "sustained" and (args.rate <= 0 or args.duration <= 0):
        parser.error("--rate and --duration must be positive")
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass

    site = load_site(args.config)  # before anything is built or started: a refused file is one line
    workdir = Path(tempfile.mkdtemp(prefix="bench-run-", dir=args.tmp))
    appliance = discard = None
    runs: list[dict[str, Any]] = []
    try:
        scenario, data = build_scenario(args)
        if args.start_appliance:
            workers = args.workers if args.workers is not None else (None if site is not None else 0)
            appliance = start_appliance(workdir, workers, not args.no_fsync, site)
            if args.keep:
                appliance.cleanup = None  # --keep: the site volumes' run folders stay too
            metrics_port = int(appliance.info.get("metrics_port") or 0)
            target = Target(args.label or "appliance", "target", "127.0.0.1", appliance.port, appliance.ae,
                            appliance.proc.pid, f"http://127.0.0.1:{metrics_port}/metrics" if metrics_port else None)
        else:
            host, port = args.target
            pid = args.server_pid
            if pid and not is_local(host):
                print(f"note: {host} is not local: --server-pid ignored", file=sys.stderr)
                pid = None
            target = Target(args.label or ("appliance" if args.metrics_url else "target"), "target", host, port,
                            args.ae, pid, args.metrics_url)
        if not args.no_ceiling:
            discard = start_discard(workdir, 1 << 20)
            ceiling_target = Target("discard", "ceiling", "127.0.0.1", discard.port, "DISCARD", discard.proc.pid)
        for n in args.associations:
            w = scenario.workload(n, unique=not args.keep_uids)
            runs.append(run_one(target, w, args, f"{target.system} {args.scenario} N={n}"))
            del w
            if discard is not None:
                runs.append(run_one(ceiling_target, scenario.ceiling(n, args.ceiling_seconds), args,
                                    f"ceiling {args.scenario} N={n}"))
    except KeyboardInterrupt:
        print("interrupted: reporting what ran", file=sys.stderr)
    finally:
        discard_stats = None
        if discard is not None:
            discard.stop()
            stats = workdir / "discard-stats.json"
            discard_stats = json.loads(stats.read_text()) if stats.exists() else None
        if appliance is not None:
            appliance.stop()
            if any(s != 0 for r in runs for s in r["samples"]["stores"]["status"]):
                print(appliance.log_tail(), file=sys.stderr)
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if not runs:
        return 1

    config = {
        "scenario": args.scenario,
        "target": "started appliance" if args.start_appliance else f"{args.target[0]}:{args.target[1]}",
        "called_ae": "APPLIANCE" if args.start_appliance else args.ae,
        "associations": args.associations,
        "count": args.count,
        "rate": args.rate if args.scenario == "sustained" else None,
        "duration": args.duration if args.scenario == "sustained" else None,
        "seed": args.seed,
        "transfer_syntax": args.transfer_syntax,
        "unique_uids": not args.keep_uids,
        "max_pdu": args.max_pdu,
        "start_appliance": {"workers": args.workers, "fsync": not args.no_fsync} if args.start_appliance else None,
        "server_pid": args.server_pid,
        "metrics_url": args.metrics_url,
        "ceiling": None if args.no_ceiling else {"receiver": "bench/discard.py", "seconds": args.ceiling_seconds,
                                                 "counters": discard_stats},
    }
    doc = report.build_document(argv, config, data, runs)
    out = args.json or ROOT / "bench" / "results" / f"run-{args.scenario}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    paths = report.write_all(doc, out, with_plots=not args.no_plots)
    print(report.markdown([doc]))
    print(f"report: {paths['json']} ({paths['markdown'].name}" + "".join(f", {p.name}" for p in paths["plots"]) + ")",
          file=sys.stderr)
    for run in runs:
        for err in run["errors"][:5]:
            print(f"{run['system']} N={run['associations']}: {err}", file=sys.stderr)
    return 0 if doc["summary"]["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
