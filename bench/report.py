"""Reports of ``appliance bench run`` (bench/driver.py): one JSON document, a Markdown summary and PNG plots.

The JSON document (``SCHEMA_VERSION`` 1) is documented field by field in docs/benchmarks.md; in short::

    schema_version  1
    kind            "appliance-bench-run"
    created         ISO 8601 local time
    argv            the driver's arguments
    machine         cpu_count, cpu_model, memory, kernel, platform, python, loadavg_at_start, tmp_fstype
    versions        appliance, pydicom, pynetdicom, uvloop, prometheus_client, matplotlib, numpy, git_commit
    config          scenario, target, called_ae, associations (list), count, rate, duration, seed, ...
    data            source per profile ("synth.iter_instances" or "synth.load_or_generate"), instances, bytes
    runs            one object per (system, associations): system, role ("target" | "ceiling"), scenario,
                    associations, offered_rate, wall_s, driver_cpu_s, server, metrics, samples (raw), summary
    summary         rows: one per run (the run's summary plus system/role/associations), and per N the ratio
                    target instances/s / driver ceiling instances/s; ok (every C-STORE of every run got 0x0000)
    compare         only in ``bench.compare --scenario`` documents (bench/sidebyside.py; built, checked and
                    rendered by bench/sidebyside_report.py, whose docstring lists every field): mode, scenarios,
                    clients, associations, repeats, receivers, skipped, dcmtk, orthanc, samples, medians, ratios,
                    ok; added since (optional for readers): per sample latency_ms {p50, p95, p99, max, mean}
                    (driver client; null for storescu), stages_ms {receive, fsync, queue, index, total} (mean ms
                    from the appliance's /metrics; null for other receivers), batch_size_mean, commits; per
                    median row latency_ms, stages_ms, batch_size_mean, durable_ceiling_instances_per_s,
                    of_durable_ceiling; per ratio vs_<other>_per_repeat (list), vs_<other>_per_repeat_median,
                    _min, _max (other = storescp, orthanc); hardware {threads, seconds, dir, filesystem, skipped,
                    ceilings {scenario: {file_bytes, files_per_s, mb_per_s, sizes}}}: bench/hardware.py's
                    fsync'd-file rate at each of the scenario's instance sizes, 8 threads (the durable ceiling);
                    per sample disk {writes, bytes_written, flushes}, per median row flushes_per_instance and
                    disk_bytes_per_instance

Raw samples are columns (parallel lists), one entry per C-STORE: ``t_s`` (start, seconds since the run started),
``latency_s`` (request written -> response decoded), ``queue_s`` (sustained: scheduled arrival -> sent),
``status`` (DIMSE status, -1 = no response), ``bytes`` (dataset bytes), ``association`` (index into
``samples.associations``), and one entry per association: ``calling_ae``, ``setup_s`` (TCP connect ->
A-ASSOCIATE-AC), ``ok``.

    python -m bench.report a.json b.json --out bench/results/combined   # merge runs: Markdown + plots
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import hardware

SCHEMA_VERSION = 1
KIND = "appliance-bench-run"
ROOT = Path(__file__).resolve().parent.parent


# ---- statistics ---------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); ``values`` need not be sorted."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000.0, 3)


def distribution_ms(values: Sequence[float]) -> dict[str, float | None]:
    return {
        "p50": _ms(percentile(values, 50)), "p95": _ms(percentile(values, 95)), "p99": _ms(percentile(values, 99)),
        "max": _ms(max(values) if values else None), "mean": _ms(sum(values) / len(values) if values else None),
    }


def status_key(status: int, error: str | None = None) -> str:
    return f"0x{status:04X}" if status >= 0 else f"no-response:{error or '?'}"


def summarize(run: dict[str, Any]) -> dict[str, Any]:
    """The summary of one run, from its raw samples (so it can always be recomputed from the JSON)."""
    stores = run["samples"]["stores"]
    assocs = run["samples"]["associations"]
    statuses: list[int] = stores["status"]
    errors: list[str | None] = stores.get("error") or [None] * len(statuses)
    ok = [i for i, s in enumerate(statuses) if s == 0]
    latency_ok = [stores["latency_s"][i] for i in ok]
    failures = Counter(status_key(s, e) for s, e in zip(statuses, errors, strict=True) if s != 0)
    unsent = run["planned_instances"] - len(statuses)
    if unsent > 0:
        failures["not-sent"] += unsent
    wall = run["wall_s"]
    ok_bytes = sum(stores["bytes"][i] for i in ok)
    setup = [s for s, good in zip(assocs["setup_s"], assocs["ok"], strict=True) if good]
    summary: dict[str, Any] = {
        "instances_planned": run["planned_instances"],
        "instances_sent": len(statuses),
        "instances_ok": len(ok),
        "failures": sum(failures.values()),
        "failures_by_status": dict(sorted(failures.items())),
        "wall_s": round(wall, 4),
        "instances_per_s": round(len(ok) / wall, 2) if wall > 0 else None,
        "mb_per_s": round(ok_bytes / 1e6 / wall, 2) if wall > 0 else None,
        "bytes_ok": ok_bytes,
        "latency_ms": distribution_ms(latency_ok),
        "associations_opened": sum(1 for g in assocs["ok"] if g),
        "associations_failed": sum(1 for g in assocs["ok"] if not g),
        "setup_ms": distribution_ms(setup),
    }
    queue = [stores["queue_s"][i] for i in ok if stores["queue_s"][i] is not None]
    if queue:
        summary["queue_ms"] = distribution_ms(queue)
    if run.get("offered_rate"):
        summary["offered_rate"] = run["offered_rate"]
    return summary


# ---- environment --------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    try:
        fstype = subprocess.run(["stat", "-f", "-c", "%T", tempfile.gettempdir()], capture_output=True, text=True,
                                timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        fstype = "?"
    return {
        "cpu_count": os.cpu_count(), "cpu_model": hardware.cpu_model(), "memory": hardware.memory_human(),
        "kernel": platform.release(),
        "platform": platform.platform(), "python": sys.version.split()[0], "loadavg_at_start": os.getloadavg(),
        "tmp_dir": tempfile.gettempdir(), "tmp_fstype": fstype,
    }


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for key, dist in (("appliance", "dicom-appliance"), ("pydicom", "pydicom"), ("pynetdicom", "pynetdicom"),
                      ("uvloop", "uvloop"), ("prometheus_client", "prometheus-client"), ("matplotlib", "matplotlib"),
                      ("numpy", "numpy")):
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        out["git_commit"] = (commit + ("-dirty" if dirty else "")) or None
    except (OSError, subprocess.TimeoutExpired):
        out["git_commit"] = None
    return out


# ---- the document -------------------------------------------------------------------------------------


def build_document(argv: list[str], config: dict[str, Any], data: dict[str, Any],
                   runs: list[dict[str, Any]]) -> dict[str, Any]:
    for run in runs:
        run["summary"] = summarize(run)
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": list(argv),
        "machine": machine_info(),
        "versions": versions(),
        "config": config,
        "data": data,
        "runs": runs,
        "summary": overall_summary(runs),
    }


def overall_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rows = []
    ceilings = {r["associations"]: r["summary"]["instances_per_s"] for r in runs if r["role"] == "ceiling"}
    for r in runs:
        row = {"system": r["system"], "role": r["role"], "scenario": r["scenario"], "associations": r["associations"],
               **{k: r["summary"][k] for k in ("instances_ok", "failures", "instances_per_s", "mb_per_s", "wall_s")},
               "latency_ms": r["summary"]["latency_ms"], "setup_ms": r["summary"]["setup_ms"]}
        ceiling = ceilings.get(r["associations"])
        if r["role"] == "target" and ceiling and r["summary"]["instances_per_s"] is not None:
            row["driver_ceiling_instances_per_s"] = ceiling
            if r.get("offered_rate"):  # open loop: the question is whether the driver can offer the rate
                row["driver_can_offer_rate"] = ceiling >= r["offered_rate"]
            else:
                row["fraction_of_driver_ceiling"] = round(r["summary"]["instances_per_s"] / ceiling, 3)
        rows.append(row)
    return {"rows": rows, "ok": all(r["summary"]["failures"] == 0 for r in runs)}


def validate(doc: dict[str, Any]) -> list[str]:
    """What is missing from a document (empty when it has the schema's fields)."""
    problems = []
    for key in ("schema_version", "kind", "created", "argv", "machine", "versions", "config", "data", "runs",
                "summary"):
        if key not in doc:
            problems.append(f"missing {key}")
    if doc.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema_version {doc.get('schema_version')!r} is not {SCHEMA_VERSION}")
    for i, run in enumerate(doc.get("runs", [])):
        for key in ("system", "role", "scenario", "associations", "planned_instances", "wall_s", "samples",
                    "summary", "server", "metrics"):
            if key not in run:
                problems.append(f"runs[{i}]: missing {key}")
        stores = run.get("samples", {}).get("stores", {})
        lengths = {k: len(v) for k, v in stores.items()}
        if len(set(lengths.values())) > 1:
            problems.append(f"runs[{i}]: sample columns differ in length: {lengths}")
    return problems


def write_json(doc: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


# ---- Markdown -----------------------------------------------------------------------------------------


def _f(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown(docs: Iterable[dict[str, Any]]) -> str:
    docs = list(docs)
    out: list[str] = []
    first = docs[0]
    m, v = first["machine"], first["versions"]
    out.append(f"## appliance bench run: {', '.join(sorted({d['config']['scenario'] for d in docs}))} "
               f"({first['created']})\n")
    out.append(f"Machine: {m['cpu_count']} CPU ({m['cpu_model']}), {m['memory']}, kernel {m['kernel']}, Python "
               f"{m['python']}, load average at start {', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}. "
               f"appliance {v.get('appliance')} at {v.get('git_commit')}, pynetdicom {v.get('pynetdicom')}, "
               f"uvloop {v.get('uvloop')}.\n")
    for doc in docs:
        c = doc["config"]
        extra = f", offered rate {c['rate']}/s for {c['duration']} s" if c["scenario"] == "sustained" else ""
        out.append(f"- `{c['scenario']}` against {c['target']} (AE {c['called_ae']}){extra}; data: "
                   + "; ".join(f"{p}: {d['instances']} x {d['mean_bytes'] / 1e3:.0f} kB ({d['source']})"
                               for p, d in doc["data"].items()))
    out.append("")
    out.append("inst/s and MB/s (10^6 dataset bytes) of Success responses over the wall time (first connect to last "
               "release). Latency: C-STORE request written -> response decoded. Setup: TCP connect -> "
               "A-ASSOCIATE-AC. `ceiling` rows are the same scenario against bench/discard.py (answers Success, "
               "stores nothing): the most this driver can offer on this machine.\n")
    out.append("| system | scenario | N | ok | failed | inst/s | MB/s | p50 ms | p95 ms | p99 ms | max ms | setup p50 ms "
               "| of ceiling | server CPU s | server peak RSS MB |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for doc in docs:
        ratios = {(r["system"], r["associations"]): r.get("fraction_of_driver_ceiling")
                  for r in doc["summary"]["rows"]}
        for run in doc["runs"]:
            s, lat, server = run["summary"], run["summary"]["latency_ms"], run.get("server") or {}
            label = run["system"] + (" (ceiling)" if run["role"] == "ceiling" else "")
            ratio = ratios.get((run["system"], run["associations"]))
            rss = server.get("peak_rss_bytes")
            out.append(
                f"| {label} | {run['scenario']} | {run['associations']} | {s['instances_ok']} | {s['failures']} "
                f"| {_f(s['instances_per_s'])} | {_f(s['mb_per_s'])} | {_f(lat['p50'], 2)} | {_f(lat['p95'], 2)} "
                f"| {_f(lat['p99'], 2)} | {_f(lat['max'], 2)} | {_f(s['setup_ms']['p50'], 2)} "
                f"| {'-' if ratio is None else f'{ratio:.2f}'} | {_f(server.get('cpu_s'), 2)} "
                f"| {'-' if rss is None else f'{rss / 1e6:.0f}'} |")
    for doc in docs:
        ceilings = {r["associations"]: r["summary"]["instances_per_s"] for r in doc["runs"] if r["role"] == "ceiling"}
        for run in doc["runs"]:
            s = run["summary"]
            if run["role"] != "target" or "queue_ms" not in s:
                continue
            ceiling, offered = ceilings.get(run["associations"]), s.get("offered_rate") or 0
            verdict = ("" if ceiling is None else " (can offer the rate)" if ceiling >= offered
                       else " (BELOW the offered rate: the driver is the limit)")
            out.append(f"\n{run['system']} N={run['associations']}: offered {_f(offered)}/s, achieved "
                       f"{_f(s['instances_per_s'])}/s; wait for a free association p50 {_f(s['queue_ms']['p50'], 2)} ms, "
                       f"p99 {_f(s['queue_ms']['p99'], 2)} ms, max {_f(s['queue_ms']['max'], 2)} ms; driver ceiling "
                       f"(closed loop) {_f(ceiling)}/s{verdict}.")
    stage_rows = []
    for doc in docs:
        for run in doc["runs"]:
            metrics = run.get("metrics") or {}
            stages = metrics.get("stages") or {}
            if not stages:
                continue
            cells = " | ".join(_f((stages.get(st) or {}).get("mean_ms"), 2)
                               for st in ("receive", "fsync", "queue", "index", "total"))
            stage_rows.append(f"| {run['system']} | {run['scenario']} | {run['associations']} | {cells} "
                              f"| {_f(metrics.get('batch_size_mean'), 2)} | {metrics.get('commits', '-')} |")
    if stage_rows:
        out.append("\nServer-side stages from /metrics (`appliance_store_stage_seconds`, mean ms per instance over the "
                   "run; receive = first to last PDV, total = last PDV to response) and group commit batch size:\n")
        out.append("| system | scenario | N | receive | fsync | queue | index | total | batch size | commits |")
        out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        out.extend(stage_rows)
    failures = [(run["system"], run["associations"], run["summary"]["failures_by_status"])
                for doc in docs for run in doc["runs"] if run["summary"]["failures"]]
    if failures:
        out.append("\nFailures by status:\n")
        out.extend(f"- {system} N={n}: {json.dumps(by)}" for system, n, by in failures)
    return "\n".join(out) + "\n"


# ---- plots --------------------------------------------------------------------------------------------


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out, write (100 dpi) and close a matplotlib figure: every PNG of the harness goes through here."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plots(docs: Iterable[dict[str, Any]], prefix: Path) -> list[Path]:
    """``<prefix>-throughput.png`` (instances/s versus associations, one line per system) and
    ``<prefix>-latency-cdf.png`` (C-STORE latency CDF, one curve per system and N). Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [run for doc in docs for run in doc["runs"]]
    prefix.parent.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[tuple[int, float]]] = {}
    for run in runs:
        label = f"{run['system']}{' (driver ceiling)' if run['role'] == 'ceiling' else ''} - {run['scenario']}"
        if run["summary"]["instances_per_s"] is not None:
            series.setdefault(label, []).append((run["associations"], run["summary"]["instances_per_s"]))
    for label, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("associations (N)")
    ax.set_ylabel("instances/s (Success)")
    ax.set_title("Throughput versus associations")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    written.append(save_figure(fig, prefix.parent / f"{prefix.name}-throughput.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        stores = run["samples"]["stores"]
        lat = sorted(1000.0 * x for x, s in zip(stores["latency_s"], stores["status"], strict=True) if s == 0)
        if not lat:
            continue
        ys = [(i + 1) / len(lat) for i in range(len(lat))]
        kind = " (ceiling)" if run["role"] == "ceiling" else ""
        label = f"{run['system']}{kind} {run['scenario']} N={run['associations']}"
        ax.step(lat, ys, where="post", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("C-STORE latency (ms, log scale)")
    ax.set_ylabel("fraction of C-STOREs")
    ax.set_title("Latency CDF per system")
    ax.set_ylim(0, 1.0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    written.append(save_figure(fig, prefix.parent / f"{prefix.name}-latency-cdf.png"))
    return written


def write_all(doc: dict[str, Any], json_path: Path, with_plots: bool = True) -> dict[str, Any]:
    """JSON at ``json_path``, Markdown and PNGs beside it (same stem). Returns the paths written."""
    write_json(doc, json_path)
    md_path = json_path.with_suffix(".md")
    md_path.write_text(markdown([doc]))
    pngs = plots([doc], json_path.with_suffix("")) if with_plots else []
    return {"json": json_path, "markdown": md_path, "plots": pngs}


# ---- progress -----------------------------------------------------------------------------------------


class Progress:
    """One stderr line rewritten with \\r (a new line every 5 s when stderr is not a terminal)."""

    def __init__(self, label: str, total: int, enabled: bool = True) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.last_line = 0.0
        self.width = 0

    def update(self, done: int, failed: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        elapsed = now - self.t0
        if not self.tty and now - self.last_line < 5.0:
            return
        self.last_line = now
        frac = done / self.total if self.total else 0.0
        bar = "#" * int(frac * 30)
        rate = done / elapsed if elapsed > 0 else 0.0
        text = (f"{self.label} [{bar:<30}] {done}/{self.total} {rate:7.1f} inst/s failed {failed} "
                f"{elapsed:6.1f}s")
        if self.tty:
            sys.stderr.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def close(self, done: int, failed: int) -> None:
        if not self.enabled:
            return
        self.last_line = 0.0
        self.update(done, failed)
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


# ---- command line: merge reports ----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", type=Path, help="JSON documents written by bench run")
    parser.add_argument("--out", type=Path, required=True, help="prefix of the Markdown and PNG files to write")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    docs = []
    for path in args.reports:
        doc = json.loads(path.read_text())
        problems = validate(doc)
        if problems:
            print(f"{path}: {'; '.join(problems)}", file=sys.stderr)
            return 1
        docs.append(doc)
    text = markdown(docs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    if not args.no_plots:
        for path in plots(docs, args.out):
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
