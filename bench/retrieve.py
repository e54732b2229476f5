"""C-MOVE and C-GET throughput: the appliance next to Orthanc, the same series, the same requesters.

One synthetic series (bench/synth.py, default a 1,000-slice CT) is stored into a fresh appliance and a fresh
Orthanc (DCMTK storescu, one association each). Then, ``--repeats`` times, interleaved (appliance, Orthanc,
appliance, ...): DCMTK ``movescu`` asks each to C-MOVE the series to DCMTK ``storescp --fork`` (AE DEST), and
DCMTK ``getscu`` C-GETs it into a folder. Each run's wall time covers the requester's whole process (association,
every sub-operation, release); a run counts only when every instance arrived. Medians are reported, in
instances/s and MB/s (dataset bytes), as JSON and a Markdown table.

    appliance bench retrieve                       # 1,000 CT slices, 3 repeats, appliance and Orthanc
    appliance bench retrieve --count 50 --size 128 --repeats 1   # a smoke run (seconds)

Run it alone on the machine: the numbers are the machine's as much as the software's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import synth
from bench.receivers import (
    DCMTK_ENV,
    ApplianceReceiver,
    OrthancReceiver,
    Receiver,
    StorescpReceiver,
    count_files,
    orthanc_binary,
)

TARGETS = ("appliance", "orthanc")
OPERATIONS = ("move", "get")
REQUESTER_AE = "BENCHSCU"


class RetrieveAppliance(ApplianceReceiver):
    """The appliance with the requester and the destination under [peers] (both may move and get)."""

    def __init__(self, workdir: Path, workers: int, dest_port: int, move_associations: int) -> None:
        super().__init__(workdir, workers)
        self.dest_port = dest_port
        self.move_associations = move_associations

    def command(self) -> list[str]:
        cmd = super().command()
        with open(self.config_path, "a") as fh:
            fh.write(f"[retrieve]\nmove_associations = {self.move_associations}\n"
                     f'[peers.requester]\nae_title = "{REQUESTER_AE}"\nport = 1\nallow_receive = false\n'
                     f'[peers.dest]\nae_title = "DEST"\nhost = "127.0.0.1"\nport = {self.dest_port}\n')
        return cmd


class RetrieveOrthanc(OrthancReceiver):
    """Orthanc with the destination and the requester as DicomModalities (Orthanc moves only to known ones)."""

    def __init__(self, workdir: Path, dest_port: int) -> None:
        super().__init__(workdir)
        self.dest_port = dest_port

    def command(self) -> list[str]:
        cmd = super().command()
        path = self.workdir / "orthanc.json"
        config = json.loads(path.read_text())
        config["DicomModalities"] = {"dest": ["DEST", "127.0.0.1", self.dest_port],
                                     "requester": [REQUESTER_AE, "127.0.0.1", 1]}
        path.write_text(json.dumps(config, indent=2))
        return cmd


@dataclass
class Run:
    target: str
    operation: str
    repeat: int
    instances: int
    received: int
    seconds: float
    ok: bool
    error: str = ""
    source_cpu_s: float = 0.0  # CPU (user + system) of the server retrieved from, all its processes, during the run
    dest_cpu_s: float = 0.0  # of the move destination (storescp --fork and its children), during the run

    @property
    def source_cpu_ms_per_instance(self) -> float:
        return 1000 * self.source_cpu_s / self.received if self.received else 0.0

    @property
    def per_second(self) -> float:
        return self.received / self.seconds if self.ok and self.seconds > 0 else 0.0


def store_series(receiver: Receiver, files: tuple[Path, ...], folder: Path, timeout: float) -> None:
    result = subprocess.run(["storescu", "-aec", receiver.ae, "+sd", "127.0.0.1", str(receiver.port), str(folder)],
                            env=DCMTK_ENV, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"storing the series into {receiver.label} failed:\n{result.stderr[-2000:]}")


def keys(burst: synth.Burst) -> list[str]:
    import pydicom

    ds = pydicom.dcmread(burst.files[0], stop_before_pixels=True)
    return ["-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={ds.StudyInstanceUID}",
            "-k", f"SeriesInstanceUID={ds.SeriesInstanceUID}"]


def one_run(target: str, receiver: Receiver, operation: str, repeat: int, burst: synth.Burst, dest_out: Path,
            work: Path, timeout: float, dest: Receiver | None = None) -> Run:
    n = len(burst.files)
    if operation == "move":
        out = dest_out
        cmd = ["movescu", "-aet", REQUESTER_AE, "-aem", "DEST", "-aec", receiver.ae, "-S", *keys(burst)]
    else:
        out = work / f"get-{target}-{repeat}"
        out.mkdir(parents=True)
        cmd = ["getscu", "-aet", REQUESTER_AE, "-aec", receiver.ae, "-S", "-od", str(out), *keys(burst)]
    shutil.rmtree(dest_out, ignore_errors=True)
    dest_out.mkdir(parents=True, exist_ok=True)
    cpu0, dest_cpu0 = receiver.cpu_seconds(), dest.cpu_seconds() if dest is not None else 0.0
    t0 = time.perf_counter()
    try:
        result = subprocess.run([*cmd, "127.0.0.1", str(receiver.port)], env=DCMTK_ENV, capture_output=True,
                                text=True, timeout=timeout)
        error = "" if result.returncode == 0 else result.stderr[-500:]
    except subprocess.TimeoutExpired:
        error = f"timed out after {timeout}s"
    seconds = time.perf_counter() - t0
    cpu = receiver.cpu_seconds() - cpu0
    dest_cpu = (dest.cpu_seconds() - dest_cpu0) if dest is not None and operation == "move" else 0.0
    got = count_files(out)
    if operation == "get":
        shutil.rmtree(out, ignore_errors=True)
    ok = not error and got == n
    return Run(target, operation, repeat, n, got, seconds, ok, error or ("" if ok else f"{got} of {n} arrived"),
               round(cpu, 3), round(dest_cpu, 3))


def summarize(runs: list[Run], total_bytes: int, count: int) -> list[dict[str, Any]]:
    rows = []
    for target in TARGETS:
        for operation in OPERATIONS:
            cell = [r for r in runs if r.target == target and r.operation == operation]
            if not cell:
                continue
            good = [r for r in cell if r.ok]
            rate = statistics.median(r.per_second for r in good) if good else 0.0
            rows.append({"target": target, "operation": operation, "runs": len(cell), "ok": len(good),
                         "median_instances_per_s": round(rate, 1),
                         "median_mb_per_s": round(rate * total_bytes / max(count, 1) / 1e6, 1),
                         "median_source_cpu_ms_per_instance": round(statistics.median(
                             r.source_cpu_ms_per_instance for r in good), 2) if good else None,
                         "median_seconds": round(statistics.median(r.seconds for r in good), 3) if good else None})
    return rows


def markdown(rows: list[dict[str, Any]], spec: synth.BurstSpec, repeats: int) -> str:
    lines = [f"C-MOVE / C-GET of one series ({spec.key}), DCMTK movescu/getscu as requester, storescp --fork as move "
             f"destination; medians of {repeats}.", "",
             "| target | operation | ok/runs | instances/s | MB/s | seconds | server CPU ms/instance |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | C-{r['operation'].upper()} | {r['ok']}/{r['runs']} | "
                     f"{r['median_instances_per_s']} | {r['median_mb_per_s']} | {r['median_seconds']} | "
                     f"{r['median_source_cpu_ms_per_instance']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="ct", choices=sorted(synth.PROFILES), help="synthetic profile (ct)")
    parser.add_argument("--count", type=int, default=1000, help="instances in the series (default 1000)")
    parser.add_argument("--size", type=int, default=None, help="rows = columns (default: the profile's)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell; medians are reported (default 3)")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma list of appliance, orthanc")
    parser.add_argument("--operations", default=",".join(OPERATIONS), help="comma list of move, get")
    parser.add_argument("--workers", type=int, default=0, help="appliance workers (default 0: one per CPU)")
    parser.add_argument("--move-associations", type=int, default=2, help="the appliance's retrieve.move_associations")
    parser.add_argument("--timeout", type=float, default=900.0, help="longest one run may take (seconds)")
    parser.add_argument("--cache", type=Path, default=synth.DEFAULT_CACHE)
    parser.add_argument("--tmp", type=Path, default=None, help="where the data folders go (default $TMPDIR)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results (default bench/results/retrieve-<time>.json; the table beside it)")
    args = parser.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    operations = [o for o in args.operations.split(",") if o]
    if not set(targets) <= set(TARGETS) or not set(operations) <= set(OPERATIONS) or args.repeats < 1:
        parser.error("--targets: appliance,orthanc; --operations: move,get; --repeats >= 1")
    for tool in ("storescu", "movescu", "getscu", "storescp"):
        if shutil.which(tool) is None:
            print(f"error: DCMTK {tool} is not installed (make peers)", file=sys.stderr)
            return 2
    if "orthanc" in targets and orthanc_binary() is None:
        print("SKIPPING orthanc: not installed", file=sys.stderr)
        targets.remove("orthanc")

    spec = synth.profile_spec(args.profile, args.count, size=args.size)
    burst = synth.load_or_generate(spec, args.cache)
    work = Path(tempfile.mkdtemp(prefix="bench-retrieve-", dir=args.tmp))
    dest = StorescpReceiver(work / "dest")
    (work / "dest").mkdir()
    receivers: dict[str, Receiver] = {}
    runs: list[Run] = []
    try:
        dest.start()
        for target in targets:
            folder = work / target
            folder.mkdir()
            receiver: Receiver = (RetrieveAppliance(folder, args.workers, dest.port, args.move_associations)
                                  if target == "appliance" else RetrieveOrthanc(folder, dest.port))
            receiver.start()
            receivers[target] = receiver
            t0 = time.perf_counter()
            store_series(receiver, burst.files, burst.folder, args.timeout)
            print(f"stored {len(burst.files)} instances into {receiver.label} in {time.perf_counter() - t0:.1f}s",
                  file=sys.stderr)
        for repeat in range(args.repeats):
            for operation in operations:
                for target in targets:
                    run = one_run(target, receivers[target], operation, repeat, burst, dest.storage(), work,
                                  args.timeout, dest)
                    runs.append(run)
                    print(f"  {target:9} C-{operation.upper():4} run {repeat + 1}: {run.received}/{run.instances} in "
                          f"{run.seconds:.2f}s = {run.per_second:.1f}/s, "
                          f"server CPU {run.source_cpu_ms_per_instance:.2f} ms/inst"
                          f"{'' if run.ok else '  FAILED: ' + run.error}",
                          file=sys.stderr)
    finally:
        for receiver in receivers.values():
            receiver.stop()
        dest.stop()
    rows = summarize(runs, burst.total_bytes, len(burst.files))
    table = markdown(rows, spec, args.repeats)
    print(table)
    out = args.out or Path(__file__).resolve().parent / "results" / f"retrieve-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"spec": asdict(spec), "total_bytes": burst.total_bytes, "summary": rows,
                               "runs": [asdict(r) for r in runs]}, indent=2))
    out.with_suffix(".md").write_text(table)
    shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
