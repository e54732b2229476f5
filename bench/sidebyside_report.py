"""The ``compare`` section of a ``bench.compare --scenario`` document (bench/sidebyside.py): medians per cell,
ratios appliance / storescp and appliance / Orthanc (of the medians, and within each repeat), the durable
ceiling, and its Markdown and plot. The rest of the document is bench/report.py's (schema_version 1); the
fields below are listed there too, and in docs/benchmarks.md.

``compare`` (every field after ``ok`` was added later; readers should treat them as optional)::

    mode, scenarios, clients, associations, repeats, receivers, skipped, dcmtk, orthanc, ok
    samples    one per run: receiver, client, scenario, associations, repeat, instances, instances_ok, stored,
               bytes, bytes_kind, processes_or_associations, wall_s, instances_per_s, mb_per_s, failures,
               receiver_cpu_s, client_cpu_s, machine_busy_s, errors, ok,
               latency_ms   {p50, p95, p99, max, mean} of the run's Success C-STOREs (driver; null for storescu),
               stages_ms    {receive, fsync, queue, index, total}: mean ms per instance from the appliance's
                            /metrics, scraped before and after the run (appliance receivers; null otherwise),
               batch_size_mean, commits   group commit over the run (appliance; null otherwise),
               disk         {writes, bytes_written, flushes} of the block device holding the data, from the
                            start of the run to the end of a sync() after it (null where /sys does not say)
    medians    one per (scenario, client, receiver, N): runs, ok_runs, instances, medians of instances_per_s,
               mb_per_s, wall_s and the CPU seconds, instances_per_s_min / _max,
               latency_ms {p50, p95, p99, max} (medians over the OK runs; null without driver latency),
               stages_ms {stage: median} and batch_size_mean (appliance; null otherwise),
               durable_ceiling_instances_per_s and of_durable_ceiling (median inst/s / ceiling; null without it),
               flushes_per_instance, disk_bytes_per_instance (medians of disk / instances; null without disk)
    ratios     one per appliance row: scenario, client, associations, appliance, appliance_instances_per_s and,
               for other in storescp, orthanc: <other>_instances_per_s, vs_<other> (ratio of the medians),
               vs_<other>_per_repeat (appliance / other within each repeat where both runs are OK, in repeat
               order), vs_<other>_per_repeat_median, _min, _max (null when no repeat has both)
    hardware   the durable ceiling: bench.hardware's fsync'd-file probe run once per scenario at the start, on
               the filesystem of the receivers' data: threads (8), seconds, dir, filesystem, skipped (null, or
               why it did not run), ceilings {scenario: {file_bytes (mean dataset bytes of the scenario's
               instances), files_per_s (= instances/s), mb_per_s, sizes [{instances, file_bytes,
               files_per_s}: one probe per group's mean size; files_per_s of the scenario = all instances /
               the sum of each group's instances / its files_per_s]}}
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import report
from bench.monitor import STAGES

COMPARE_KEYS = ("mode", "scenarios", "clients", "associations", "repeats", "receivers", "skipped", "samples",
                "medians", "ratios", "ok")
OTHERS = ("storescp", "orthanc")
LATENCY_KEYS = ("p50", "p95", "p99", "max")

Key = tuple[str, str, int]  # scenario, client, N


# ---- statistics ---------------------------------------------------------------------------------------


def _median(values: Sequence[float | None], digits: int = 3) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), digits) if present else None


def _kb(value: float | None) -> float | None:
    return None if value is None else value / 1e3


def medians(samples: list[dict[str, Any]], ceilings: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """One row per (scenario, client, receiver, N): medians over the OK runs. ``ceilings``: the durable ceiling
    (instances/s) per scenario, when measured."""
    ceilings = ceilings or {}
    groups: dict[tuple[str, str, str, int], list[dict[str, Any]]] = {}
    for s in samples:
        groups.setdefault((s["scenario"], s["client"], s["receiver"], s["associations"]), []).append(s)
    rows = []
    for (scenario, client, receiver, n), group in groups.items():
        good = [s for s in group if s["ok"]]
        row: dict[str, Any] = {"scenario": scenario, "client": client, "receiver": receiver, "associations": n,
                               "runs": len(group), "ok_runs": len(good), "instances": group[0]["instances"]}
        for key in ("instances_per_s", "mb_per_s", "wall_s", "receiver_cpu_s", "client_cpu_s", "machine_busy_s"):
            row[key] = _median([s[key] for s in good])
        rates = [s["instances_per_s"] for s in good]
        row["instances_per_s_min"] = min(rates) if rates else None
        row["instances_per_s_max"] = max(rates) if rates else None
        latencies = [s["latency_ms"] for s in good if s.get("latency_ms")]
        row["latency_ms"] = ({k: _median([lat.get(k) for lat in latencies]) for k in LATENCY_KEYS}
                             if latencies else None)
        stages = [s["stages_ms"] for s in good if s.get("stages_ms")]
        row["stages_ms"] = {st: _median([x.get(st) for x in stages]) for st in STAGES} if stages else None
        row["batch_size_mean"] = _median([s.get("batch_size_mean") for s in good])
        disks = [(s["disk"], s["instances"]) for s in good if s.get("disk") and s["instances"]]
        row["flushes_per_instance"] = _median([d["flushes"] / n_ for d, n_ in disks if d.get("flushes") is not None])
        row["disk_bytes_per_instance"] = _median([d["bytes_written"] / n_ for d, n_ in disks])
        ceiling = ceilings.get(scenario)
        row["durable_ceiling_instances_per_s"] = ceiling
        row["of_durable_ceiling"] = round(row["instances_per_s"] / ceiling, 3) if ceiling and row[
            "instances_per_s"] is not None else None
        rows.append(row)
    return rows


def per_repeat_ratios(samples: list[dict[str, Any]]) -> dict[tuple[str, str, int, str, str], list[float]]:
    """appliance / other instances/s within each repeat, keyed by (scenario, client, N, appliance label, other),
    in repeat order; a repeat counts only when both runs are OK."""
    rate: dict[tuple[int, str, str, int, str], float] = {}
    for s in samples:
        if s["ok"] and s["instances_per_s"]:
            rate[(s["repeat"], s["scenario"], s["client"], s["associations"], s["receiver"])] = s["instances_per_s"]
    out: dict[tuple[str, str, int, str, str], list[float]] = {}
    for (repeat, scenario, client, n, receiver), value in sorted(rate.items()):
        if not receiver.startswith("appliance"):
            continue
        for other in OTHERS:
            theirs = rate.get((repeat, scenario, client, n, other))
            if theirs:
                out.setdefault((scenario, client, n, receiver, other), []).append(round(value / theirs, 3))
    return out


def ratios(rows: list[dict[str, Any]], samples: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """appliance / storescp and appliance / orthanc of the median instances/s, per scenario, client, N and
    appliance configuration (None when a side has no successful run); with ``samples``, also within each repeat
    (the list, its median, min and max)."""
    rate = {(r["scenario"], r["client"], r["associations"], r["receiver"]): r["instances_per_s"] for r in rows}
    repeats = per_repeat_ratios(samples or [])
    out = []
    for r in rows:
        if not r["receiver"].startswith("appliance"):
            continue
        key = (r["scenario"], r["client"], r["associations"])
        entry: dict[str, Any] = {"scenario": r["scenario"], "client": r["client"], "associations": r["associations"],
                                 "appliance": r["receiver"], "appliance_instances_per_s": r["instances_per_s"]}
        for other in OTHERS:
            theirs = rate.get((*key, other))
            entry[f"{other}_instances_per_s"] = theirs
            entry[f"vs_{other}"] = (round(r["instances_per_s"] / theirs, 3)
                                    if r["instances_per_s"] and theirs else None)
            values = repeats.get((*key, r["receiver"], other), [])
            entry[f"vs_{other}_per_repeat"] = values
            entry[f"vs_{other}_per_repeat_median"] = _median(values)
            entry[f"vs_{other}_per_repeat_min"] = min(values) if values else None
            entry[f"vs_{other}_per_repeat_max"] = max(values) if values else None
        out.append(entry)
    return out


# ---- checks -------------------------------------------------------------------------------------------


def validate_compare(doc: dict[str, Any]) -> list[str]:
    """What is missing from a side-by-side document (its ``compare`` section; the rest is ``report.validate``'s).
    Fields added after the first version are optional, so older documents still pass."""
    section = doc.get("compare")
    if not isinstance(section, dict):
        return ["missing compare"]
    problems = [f"compare: missing {key}" for key in COMPARE_KEYS if key not in section]
    for i, row in enumerate(section.get("ratios", [])):
        for key in ("scenario", "client", "associations", "appliance", "vs_storescp", "vs_orthanc"):
            if key not in row:
                problems.append(f"compare.ratios[{i}]: missing {key}")
    return problems


# ---- Markdown -----------------------------------------------------------------------------------------

_f = report._f


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _spread(entry: dict[str, Any], other: str) -> str:
    median = entry.get(f"vs_{other}_per_repeat_median")
    if median is None:
        return "-"
    lo, hi = entry[f"vs_{other}_per_repeat_min"], entry[f"vs_{other}_per_repeat_max"]
    return f"{median:.2f} ({lo:.2f}-{hi:.2f})"


def _hardware_lines(c: dict[str, Any]) -> list[str]:
    hw = c.get("hardware")
    if not hw:
        return []
    if hw.get("skipped"):
        return [f"\nDurable ceiling: not measured ({hw['skipped']}).\n"]
    out = [f"\nDurable ceiling of this disk ({hw.get('filesystem') or hw.get('dir')}): bench/hardware.py's probe, "
           f"{hw['threads']} threads creating, writing, fsyncing and closing files of each of the scenario's "
           f"instance sizes for {hw['seconds']:g} s (one fsync per file, no folder fsync, no index: an upper bound "
           "for a receiver that makes every instance durable before Success; a receiver faster than this does "
           "not). A mix of sizes: all instances / the sum of each group's instances / its rate:\n"]
    for scenario, ceiling in hw.get("ceilings", {}).items():
        sizes = ceiling.get("sizes") or []
        detail = "; ".join(f"{g['instances']} x {g['file_bytes'] / 1e3:,.0f} kB at {_f(g['files_per_s'], 0)}/s"
                           for g in sizes) if len(sizes) > 1 else ""
        out.append(f"- {scenario}: {_f(ceiling['files_per_s'], 0)} instances/s "
                   f"(mean {ceiling['file_bytes'] / 1e3:,.0f} kB, {_f(ceiling['mb_per_s'])} MB/s)"
                   + (f": {detail}" if detail else ""))
    return out


def compare_markdown(doc: dict[str, Any]) -> str:
    c, m = doc["compare"], doc["machine"]
    out = [f"## Side by side: {', '.join(c['scenarios'])} ({doc['created']})\n",
           f"Machine: {m['cpu_count']} CPU ({m['cpu_model']}), kernel {m['kernel']}, Python {m['python']}, load "
           f"average at start {', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}; {c.get('dcmtk')}, "
           f"{c.get('orthanc')}; appliance at {doc['versions'].get('git_commit')}. Medians of {c['repeats']} "
           f"repeat(s) (repeats outermost).\n"]
    for label, meta in c["receivers"].items():
        out.append(f"- {label}: durability = {meta['durability']}")
    for name, why in c["skipped"].items():
        out.append(f"- {name}: SKIPPED ({why})")
    out.extend(_hardware_lines(c))
    out.append("\nRatios of instances/s (appliance / receiver; > 1 = the appliance is faster): of the medians, and "
               "per repeat (the ratio within each repeat, where both runs are OK: median (min-max)):\n")
    out.append("| scenario | client | N | appliance | inst/s | vs storescp --fork (no fsync) | per repeat "
               "| vs Orthanc (fsync) | per repeat |")
    out.append("|---|---|---:|---|---:|---:|---:|---:|---:|")
    for r in sorted(c["ratios"], key=lambda r: (r["scenario"], r["client"], r["associations"], r["appliance"])):
        out.append(f"| {r['scenario']} | {r['client']} | {r['associations']} | {r['appliance']} "
                   f"| {_f(r['appliance_instances_per_s'])} | {_ratio(r['vs_storescp'])} | {_spread(r, 'storescp')} "
                   f"| {_ratio(r['vs_orthanc'])} | {_spread(r, 'orthanc')} |")
    out.append("\ninst/s over the wall time (first association started -> last one done), Success only. MB/s: "
               "10^6 bytes of dataset (driver) or of Part-10 files (storescu). p50 / p99: C-STORE latency, request "
               "written -> response decoded (driver only; storescu does not report it). CPU: seconds over the run of "
               "the receiver's process tree, of the client (driver process / the storescu processes) and of the "
               "whole machine (other load included). of ceiling: inst/s / the durable ceiling above. flush/inst, "
               "disk kB/inst: flush requests and bytes written by the disk holding the data, from the start of the "
               "run to the end of a sync() after it (/sys/dev/block/*/stat), per instance.\n")
    out.append("| scenario | client | N | receiver | inst/s | (min-max) | MB/s | p50 ms | p99 ms | wall s | recv CPU s "
               "| client CPU s | machine CPU s | of ceiling | flush/inst | disk kB/inst | ok runs |")
    out.append("|---|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(c["medians"], key=lambda r: (r["scenario"], r["client"], r["associations"], r["receiver"])):
        lat = r.get("latency_ms") or {}
        out.append(f"| {r['scenario']} ({r['instances']}) | {r['client']} | {r['associations']} | {r['receiver']} "
                   f"| {_f(r['instances_per_s'])} | {_f(r['instances_per_s_min'])}-{_f(r['instances_per_s_max'])} "
                   f"| {_f(r['mb_per_s'])} | {_f(lat.get('p50'), 2)} | {_f(lat.get('p99'), 2)} | {_f(r['wall_s'], 2)} "
                   f"| {_f(r['receiver_cpu_s'])} | {_f(r['client_cpu_s'])} | {_f(r['machine_busy_s'])} "
                   f"| {_ratio(r.get('of_durable_ceiling'))} | {_f(r.get('flushes_per_instance'), 2)} "
                   f"| {_f(_kb(r.get('disk_bytes_per_instance')), 0)} | {r['ok_runs']}/{r['runs']} |")
    staged = [r for r in c["medians"] if r.get("stages_ms")]
    if staged:
        out.append("\nThe appliance's stages from its /metrics (`appliance_store_stage_seconds`, scraped before and "
                   "after each run): mean ms per instance, medians over the OK runs; receive = first to last PDV, "
                   "total = last PDV to response; batch = instances per group commit.\n")
        out.append("| scenario | client | N | receiver | receive | fsync | queue | index | total | batch size "
                   "| ok runs |")
        out.append("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in sorted(staged, key=lambda r: (r["scenario"], r["client"], r["associations"], r["receiver"])):
            cells = " | ".join(_f(r["stages_ms"].get(st), 2) for st in STAGES)
            out.append(f"| {r['scenario']} | {r['client']} | {r['associations']} | {r['receiver']} | {cells} "
                       f"| {_f(r.get('batch_size_mean'), 2)} | {r['ok_runs']}/{r['runs']} |")
    failed = [s for s in c["samples"] if not s["ok"]]
    if failed:
        out.append("\nFailed runs:\n")
        out.extend(f"- {s['receiver']} {s['client']} {s['scenario']} N={s['associations']} rep {s['repeat']}: "
                   + "; ".join(s["errors"])[:500].replace("\n", " | ") for s in failed)
    return "\n".join(out) + "\n"


# ---- plot and files -----------------------------------------------------------------------------------


def compare_plot(doc: dict[str, Any], path: Path) -> Path:
    """Median instances/s versus associations, one line per receiver and client, one panel per scenario; the
    durable ceiling (when measured) as a dotted horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    c = doc["compare"]
    scenarios = list(c["scenarios"])
    ceilings = (c.get("hardware") or {}).get("ceilings") or {}
    fig, axes = plt.subplots(1, len(scenarios), figsize=(6.5 * len(scenarios), 4.5), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios, strict=True):
        series: dict[str, list[tuple[int, float]]] = {}
        for r in c["medians"]:
            if r["scenario"] == scenario and r["instances_per_s"] is not None:
                series.setdefault(f"{r['receiver']} ({r['client']})", []).append((r["associations"],
                                                                                   r["instances_per_s"]))
        for label, points in sorted(series.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                    linestyle="--" if "storescu" in label else "-", label=label)
        if scenario in ceilings:
            ax.axhline(ceilings[scenario]["files_per_s"], color="grey", linestyle=":",
                       label="durable ceiling (fsync'd files, 8 threads)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("associations (N)")
        ax.set_ylabel("instances/s (median)")
        ax.set_title(scenario)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return report.save_figure(fig, path)


def compare_latency_plot(doc: dict[str, Any], path: Path) -> Path | None:
    """C-STORE latency CDF per receiver, sent by our driver (storescu reports no per-C-STORE time), one panel per
    scenario and N, every repeat's Success latencies pooled. None when no driver run was made."""
    runs = [r for r in doc.get("runs", []) if r.get("client") == "driver"]
    cells = sorted({(r["scenario"], r["associations"]) for r in runs})
    if not cells:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = sorted({s for s, _ in cells})
    ns = sorted({n for _, n in cells})
    fig, axes = plt.subplots(len(scenarios), len(ns), figsize=(5.5 * len(ns), 4 * len(scenarios)), squeeze=False)
    for i, scenario in enumerate(scenarios):
        for j, n in enumerate(ns):
            ax = axes[i][j]
            pooled: dict[str, list[float]] = {}
            for r in runs:
                if (r["scenario"], r["associations"]) == (scenario, n):
                    stores = r["samples"]["stores"]
                    pooled.setdefault(r["system"], []).extend(
                        1000.0 * x for x, st in zip(stores["latency_s"], stores["status"], strict=True) if st == 0)
            for system, lat in sorted(pooled.items()):
                if lat:
                    lat.sort()
                    ax.step(lat, [(k + 1) / len(lat) for k in range(len(lat))], where="post", label=system)
            ax.set_xscale("log")
            ax.set_xlabel("C-STORE latency (ms, log scale)")
            ax.set_ylabel("fraction of C-STOREs")
            ax.set_title(f"{scenario}, N={n} (driver)")
            ax.set_ylim(0, 1.0)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    return report.save_figure(fig, path)


def write_compare(doc: dict[str, Any], json_path: Path) -> dict[str, Any]:
    """JSON at ``json_path``; beside it ``<stem>.md`` (ratio, median and stage tables, then the driver runs'
    details), ``<stem>-throughput.png`` and, with driver runs, ``<stem>-latency-cdf.png``. Returns the paths
    written."""
    report.write_json(doc, json_path)
    md_path = json_path.with_suffix(".md")
    text = compare_markdown(doc)
    if doc["runs"]:
        text += "\n### Driver runs (every repeat)\n\n" + report.markdown([doc]).split("\n", 2)[2]
    md_path.write_text(text)
    pngs = [compare_plot(doc, json_path.parent / f"{json_path.stem}-throughput.png")]
    cdf = compare_latency_plot(doc, json_path.parent / f"{json_path.stem}-latency-cdf.png")
    if cdf is not None:
        pngs.append(cdf)
    return {"json": json_path, "markdown": md_path, "plots": pngs}
