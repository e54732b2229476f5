"""The datasheet's three renderings (bench/datasheet.py builds the document): ``datasheet.json``, ``datasheet.md``
and ``datasheet.html``, one self-contained file (its plots embedded as PNG data URIs, no external style or
script) that a vendor can send as it is.

The text is written for a customer, not for us: what was measured, on what, how it compares, and how it was
done; no targets and no pass/fail rows. Every figure is the median of the repeats with its minimum and maximum,
written "median (min-max)". Units: MB = 10^6 bytes, MiB = 2^20 bytes, GiB = 2^30 bytes.

The content is built once as a list of blocks (heading, paragraph, list, table, figure) and rendered twice, so
that the Markdown and the HTML cannot say different things.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import report

SCENARIO_TEXT = {"ct-burst": "CT burst", "mr-burst": "MR burst", "morning-rush": "Morning rush"}
SCENARIO_LONG = {
    "ct-burst": "CT burst: one CT series split over the associations",
    "mr-burst": "MR burst: one MR series split over the associations",
    "morning-rush": "Morning rush: CT, MR and DX rooms sending at once",
}
ORDER_SCENARIO = {name: i for i, name in enumerate(SCENARIO_TEXT)}
ORDER_CLIENT = {"storescu": 0, "driver": 1}
ORDER_RECEIVER = {"appliance": 0, "storescp": 1, "orthanc": 2}
CLIENT_TEXT = {"storescu": "DCMTK storescu", "driver": "asyncio sender"}
DURABILITY_TEXT = {
    "appliance": "each image on disk (fdatasync) and indexed before the modality gets Success",
    "storescp": "writes files without fsync: images acknowledged but still in memory are lost in a power cut",
    "orthanc": "fsync per file (SyncStorageArea), SQLite index",
}


@dataclass
class Block:
    kind: str  # h1 h2 p ul table figure warn
    text: str = ""
    items: list[str] = field(default_factory=list)
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    png: bytes = b""
    name: str = ""


def spread(s: dict[str, Any] | None, digits: int = 0) -> str:
    """'median (min-max)' of a stat; one value when the runs agree or only one ran; '-' when none."""
    if not s or s.get("median") is None:
        return "-"
    med, lo, hi = (f"{s[k]:,.{digits}f}" for k in ("median", "min", "max"))
    return med if s["n"] < 2 or lo == hi else f"{med} ({lo}-{hi})"


def _kind(receiver: str) -> str:
    return "appliance" if receiver.startswith("appliance") else receiver


def _receiver_text(receiver: str) -> str:
    return {"appliance": "the appliance", "storescp": "DCMTK storescp", "orthanc": "Orthanc"}[_kind(receiver)]


def _order(r: dict[str, Any]) -> tuple[int, int, int, int]:
    """Tables and plots in one order: CT, MR, rush; storescu before our sender; appliance, storescp, Orthanc."""
    receiver = r.get("other") or r.get("receiver") or ""
    return (ORDER_SCENARIO.get(r["scenario"], 9), ORDER_CLIENT.get(r["client"], 9), r["associations"],
            ORDER_RECEIVER.get(_kind(receiver), 9))


def _version(text: str | None) -> str:
    """'$dcmtk: storescu v3.6.7 2022-04-22 $' -> '3.6.7'; '/usr/sbin/Orthanc 1.10.1' -> '1.10.1'."""
    found = re.search(r"v?(\d+\.\d+(?:\.\d+)?)", text or "")
    return found.group(1) if found else "version unknown"


def appliance_durable(doc: dict[str, Any]) -> bool | None:
    """Whether the measured appliance made each image durable before Success: the site's ``storage.fsync`` with
    ``-c``, True for the harness's own configuration (fsync on), None (not known here) for a ``--target``."""
    a = doc["appliance"]
    if a["target"] != "started by the benchmark":
        return None
    return bool(a["config"]["storage"]["fsync"]) if a.get("config") else True


def _appliance_durability(doc: dict[str, Any]) -> str:
    durable = appliance_durable(doc)
    if durable is None:
        return "durability as configured on that machine (not read from here)"
    return DURABILITY_TEXT["appliance"] if durable else "storage.fsync = false: images are NOT made durable " \
        "before Success (lost in a power cut, like storescp's)"


def _others_durability(doc: dict[str, Any], name: str) -> str:
    if doc["appliance"]["target"] == "started by the benchmark":
        return DURABILITY_TEXT[name]
    return f"started by the vendor on that machine; as docs/benchmarks.md starts it: {DURABILITY_TEXT[name]}"


def gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:,.1f} GiB"


# ---- the content --------------------------------------------------------------------------------------------


def blocks(doc: dict[str, Any], steps: Path | None) -> list[Block]:
    v, m = doc["versions"], doc["machine"]
    b: list[Block] = [Block("h1", doc.get("title") or "DICOM storage appliance: ingest datasheet")]
    runs = (f"Every figure is the median of {doc['repeats']} runs, with the lowest and highest run in brackets."
            if doc["repeats"] > 1 else "Every figure is from a single run.")
    b.append(Block("p", f"Measured {doc['created'][:16].replace('T', ' ')} with appliance {v.get('appliance')} "
                        f"(build {v.get('git_commit') or '-'}). {runs} MB = 10^6 bytes, MiB = 2^20 bytes, "
                        "GiB = 2^30 bytes."))
    if doc["quick"] or doc["repeats"] < 3:
        b.append(Block("warn", "Smoke run: fewer than 3 repeats and small bursts. These figures are not for quoting."))
    if doc["problems"]:
        b.append(Block("warn", "Some runs did not complete; their figures are left out: "
                               + " | ".join(doc["problems"][:5])))
    b += _summary(doc)
    b.append(Block("h2", "1. The hardware"))
    remote = doc["sender"]["where"] != "this machine"
    rows = [["Machine described", "the sender's (the appliance ran on another machine)"]] if remote else []
    rows += [["Processor", f"{m['cpu_count']} CPU, {m['cpu_model']}"], ["Memory", gib(m["memory_bytes"])],
            ["Operating system", f"{m['os'] or '-'}, kernel {m['kernel']}"]]
    for d in doc["disks"]:
        r = d["results"]
        rows.append([f"Disk of {d['path']}" + (f" ({d['holds']})" if d.get("holds") else ""),
                     f"{d['filesystem'] or '-'}: "
                     f"{spread(r.get('fsync_512kib_t8_files_per_s'))} durable 512 KiB writes/s (8 threads), "
                     f"sequential {spread(r.get('seq_fdatasync_mb_per_s'))} MB/s with fdatasync"])
    if doc["loopback_mb_per_s"]:
        rows.append(["Loopback TCP (sender to receiver)", f"{spread(doc['loopback_mb_per_s'])} MB/s"])
    s = doc["sender"]
    local = doc["appliance"]["target"] == "started by the benchmark"  # else the receivers are not pinned from here
    pinned = (f", on CPU {','.join(map(str, s['cpus']))}" + (f" (receivers on CPU "
              f"{','.join(map(str, s['receiver_cpus'] or []))})" if local else "") if s["cpus"] else "")
    rows.append(["Sender", s["where"] + (" (the receivers' machine)" if s["where"] == "this machine" else "") + pinned])
    if not doc["disks"]:
        rows.append(["Disks", "not measured: the appliance was already running (`appliance bench hardware --dir "
                              "VOLUME` on its machine measures them)"])
    b.append(Block("table", header=["", ""], rows=rows))

    b.append(Block("h2", "2. The configuration"))
    a = doc["appliance"]
    cfg = a.get("config")
    items = [f"The appliance: {a['target']}; "
             + (f"workers: {a['workers'] or 'one per CPU'}; " if a.get("workers") is not None else "")
             + f"{_appliance_durability(doc)}."]
    if cfg:
        st = cfg["storage"]
        items.append(f"Configuration {cfg['file']}: volumes "
                     + ", ".join(f"{x['name']} ({x['path']})" for x in cfg["volumes"])
                     + f"; group commit up to {st['commit_max_batch']} images or {st['commit_max_wait_ms']:g} ms; "
                       f"fsync {'on' if st['fsync'] else 'OFF'}; audit trail {cfg['audit']}"
                     + (" (a file during the benchmark)" if cfg["audit"] == "journald" else "")
                     + (f"; not used by the benchmark: {', '.join(cfg['dropped_sections'])}"
                        if cfg["dropped_sections"] else "")
                     + (f"; with the environment's {', '.join(cfg['environment'])}" if cfg.get("environment") else "")
                     + ".")
    if "storescp" not in doc["skipped"]:
        items.append(f"DCMTK storescp --fork {_version(doc.get('dcmtk'))}: {_others_durability(doc, 'storescp')}.")
    if "orthanc" not in doc["skipped"]:
        items.append(f"Orthanc {_version(doc.get('orthanc'))}: {_others_durability(doc, 'orthanc')}.")
    for name, why in doc["skipped"].items():
        items.append(f"{_receiver_text(name)}: not measured ({why}).")
    b.append(Block("ul", items=items))
    b.append(Block("p", "Workload: synthetic studies with realistic headers and pixel data, explicit VR little "
                        "endian, new UIDs for every run; every receiver gets the same images in the same split."))
    b.append(Block("table", header=["scenario", "images", "mean size", "associations"],
                   rows=_workload_rows(doc)))

    b += _throughput(doc)
    b += _comparison(doc)
    b += _latency(doc, steps)
    b += _method(doc)
    return b


def _workload_rows(doc: dict[str, Any]) -> list[list[str]]:
    seen: dict[str, list[str]] = {}
    for r in sorted(doc["throughput"], key=_order):
        if r["client"] == "driver" and r["scenario"] not in seen:
            seen[r["scenario"]] = [SCENARIO_LONG.get(r["scenario"], r["scenario"]), f"{r['instances']:,}",
                                   f"{r['mean_kb']:,.0f} kB" if r["mean_kb"] else "-",
                                   ", ".join(str(n) for n in doc["associations"])]
    return list(seen.values())


def _pick(doc: dict[str, Any], scenario: str, client: str, kind: str) -> dict[str, Any] | None:
    n = max(doc["associations"])
    return next((r for r in doc["throughput"] if r["scenario"] == scenario and r["client"] == client
                 and _kind(r["receiver"]) == kind and r["associations"] == n), None)


def _ratio(doc: dict[str, Any], scenario: str, client: str, other: str) -> dict[str, Any] | None:
    n = max(doc["associations"])
    row = next((r for r in doc["ratios"] if r["scenario"] == scenario and r["client"] == client
                and r["other"] == other and r["associations"] == n), None)
    return row["ratio"] if row else None


def _summary(doc: dict[str, Any]) -> list[Block]:
    items = []
    stored = {True: "stored durably", False: "stored WITHOUT fsync", None: "stored"}[appliance_durable(doc)]
    for scenario in ("ct-burst", "mr-burst", "morning-rush"):
        row = _pick(doc, scenario, "storescu", "appliance") or _pick(doc, scenario, "driver", "appliance")
        if row is None:
            continue
        text = (f"{SCENARIO_TEXT[scenario]}: {spread(row['instances_per_s'])} images/s, "
                f"{spread(row['mb_per_s'])} MB/s, {stored} ({row['associations']} associations from "
                f"{CLIENT_TEXT[row['client']]})")
        versus = [f"{spread(r, 2)} times {_receiver_text(o)}'s rate" for o in ("storescp", "orthanc")
                  if (r := _ratio(doc, scenario, row["client"], o)) and r.get("median") is not None]
        items.append(text + (": " + ", ".join(versus) if versus else "") + ".")
    sus = doc["sustained"]
    # The maximum the rate is based on is the asyncio sender's (bench/datasheet.py _mr_max), not the storescu
    # figure quoted above it: named with its value, so that 412 is not read as 50% of 722.
    mr_max = doc.get("mr_max_instances_per_s") or 0.0
    if sus["latency_ms"]["p99"]["median"] is not None:
        items.append(f"At a steady {sus['offered_rate']:,.0f} MR images/s ({doc['load']:.0%} of the "
                     f"{mr_max:,.0f} images/s our sender reached in the MR burst): "
                     f"99% of images acknowledged within {spread(sus['latency_ms']['p99'], 1)} ms.")
    sm = doc["many_small_associations"]
    if sm["instances_per_s"]["median"] is not None:
        items.append(f"One image per association: {spread(sm['instances_per_s'])} associations/s.")
    return [Block("h2", "Key figures"), Block("ul", items=items)] if items else []


def _throughput(doc: dict[str, Any]) -> list[Block]:
    out = [Block("h2", "3. Ingest throughput"),
           Block("p", "Images per second acknowledged with Success, from the first association opened to the "
                      "last released; MB/s of the images' bytes (DCMTK storescu: the Part-10 files', about 200 bytes "
                      "of File Meta more per image than our sender's datasets); CPU: all processes of the receiver, "
                      "user and system, per image.")]
    for client in ("storescu", "driver"):
        rows = [[SCENARIO_TEXT.get(r["scenario"], r["scenario"]), str(r["associations"]), _receiver_text(r["receiver"]),
                 spread(r["instances_per_s"]), spread(r["mb_per_s"]), spread(r["cpu_ms_per_instance"], 2)]
                for r in sorted(doc["throughput"], key=_order) if r["client"] == client]
        if rows:
            out.append(Block("p", f"Sent by {CLIENT_TEXT[client]}:"))
            out.append(Block("table", header=["scenario", "associations", "receiver", "images/s", "MB/s",
                                              "CPU ms per image"], rows=rows))
    out.append(Block("figure", text="Images/s per run (dots), median (bar) and range (line)",
                     png=_png(plot_throughput, doc), name="throughput"))
    return out


def _comparison(doc: dict[str, Any]) -> list[Block]:
    if not doc["ratios"]:
        return [Block("h2", "4. Compared with DCMTK and Orthanc"),
                Block("p", "Not measured: no other receiver ran beside the appliance.")]
    rows = []
    for r in sorted(doc["ratios"], key=_order):
        rows.append([SCENARIO_TEXT.get(r["scenario"], r["scenario"]), CLIENT_TEXT[r["client"]], str(r["associations"]),
                     _receiver_text(r["other"]), spread(r["ratio"], 2)])
    return [Block("h2", "4. Compared with DCMTK and Orthanc on the same machine"),
            Block("p", "The appliance's images/s divided by the other receiver's, run by run (the two runs of a "
                       "ratio follow each other); above 1 the appliance is faster. storescp does not make images "
                       "durable before it answers; Orthanc does"
                       + {True: ", and so does the appliance.", False: "; this appliance's configuration does not "
                          "(storage.fsync = false).", None: "."}[appliance_durable(doc)]),
            Block("table", header=["scenario", "sender", "associations", "compared with", "ratio"], rows=rows),
            Block("figure", text="Ratio per run (dots) and median (line); 1 = the same rate",
                  png=_png(plot_ratios, doc), name="ratios")]


def _latency(doc: dict[str, Any], steps: Path | None) -> list[Block]:
    sus, sm = doc["sustained"], doc["many_small_associations"]
    lat = sus["latency_ms"]
    out = [Block("h2", "5. Latency at a steady load, and association rate"),
           Block("p", f"MR images offered at {sus['offered_rate']:,.1f}/s over 8 associations for "
                      f"{doc['sustained_seconds']:g} s ({doc['load']:.0%} of the median "
                      f"{doc.get('mr_max_instances_per_s') or 0:,.0f} images/s the appliance reached in the MR burst "
                      f"from our asyncio sender, {max(doc['associations'])} "
                      "associations). Latency: request sent to Success received, per image."),
           Block("table", header=["achieved images/s", "median ms", "95% ms", "99% ms", "slowest ms", "failed"],
                 rows=[[spread(sus["instances_per_s"], 1), spread(lat["p50"], 2), spread(lat["p95"], 2),
                        spread(lat["p99"], 2), spread(lat["max"], 1), f"{sus['failures']:,}"]])]
    if (sus.get("peak_rss_mib") or {}).get("median") is not None:
        out.append(Block("p", f"The appliance at this load: {spread(sus['cpu_ms_per_instance'], 2)} ms of CPU per "
                              f"image, all processes; memory {spread(sus['peak_rss_mib'])} MiB at its peak (resident "
                              "set of all its processes)."))
    if steps is not None:
        png = _png(plot_latency, steps)
        if png:
            out.append(Block("figure", text="Latency distribution at the steady load, one curve per run",
                             png=png, name="latency"))
    out.append(Block("p", f"One image per association, {sm['associations'] or 8} associations at a time: "
                          f"{spread(sm['instances_per_s'])} associations/s; association set-up (connect to "
                          f"accept) {spread(sm['setup_ms_p50'], 2)} ms (median of each run)."))
    return out


def _method(doc: dict[str, Any]) -> list[Block]:
    items = [
        f"Each configuration ran {doc['repeats']} times. Within a repeat the receivers took turns on the same "
        "workload, in an order rotated from one workload to the next; every run started its receiver on a fresh, "
        "empty data folder and removed it afterwards.",
        "A run counts only when every image got Success and the receiver holds every image afterwards"
        + (" (for the receivers this command started; those on another machine are not counted from here)."
           if doc["appliance"]["target"] != "started by the benchmark" else "."),
        "Two senders: DCMTK storescu, one process per association, as a modality sends; and our asyncio sender, "
        "which also records each image's latency.",
        "The sustained and association-rate runs measure the appliance alone.",
        "CPU time is read from /proc for the receiver's processes; the sender's CPU is not counted.",
        "Every step's own report (JSON, with each run's raw figures) is in the steps folder beside this file.",
    ]
    return [Block("h2", "6. How it was measured"), Block("ul", items=items)]


# ---- plots --------------------------------------------------------------------------------------------------

def _png(plot: Any, arg: Any) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plot(arg)
    if fig is None:
        return b""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


COLORS = {"appliance": "#1f77b4", "storescp": "#7f7f7f", "orthanc": "#ff7f0e"}


def plot_throughput(doc: dict[str, Any]) -> Any:
    """One panel per scenario (columns) and sender (rows): each receiver's runs as dots, the median as a bar and
    the range as a line."""
    import matplotlib.pyplot as plt

    rows_all = sorted(doc["throughput"], key=_order)
    scenarios = sorted({r["scenario"] for r in rows_all}, key=lambda x: ORDER_SCENARIO.get(x, 9))
    clients = sorted({r["client"] for r in rows_all}, key=lambda x: ORDER_CLIENT.get(x, 9))
    fig, axes = plt.subplots(len(clients), len(scenarios), figsize=(3.3 * len(scenarios), 2.9 * len(clients)),
                             squeeze=False)
    for i, client in enumerate(clients):
        for j, scenario in enumerate(scenarios):
            ax = axes[i][j]
            rows = [r for r in rows_all if r["scenario"] == scenario and r["client"] == client]
            for x, r in enumerate(rows):
                st = r["instances_per_s"]
                color = COLORS[_kind(r["receiver"])]
                if st["median"] is None:
                    continue
                ax.bar(x, st["median"], color=color, alpha=0.35, width=0.6)
                ax.vlines(x, st["min"], st["max"], color=color, linewidth=2)
                ax.plot([x] * len(st["values"]), st["values"], "o", color=color, markersize=4)
            ax.set_xticks(range(len(rows)), [f"{_kind(r['receiver'])}\nN={r['associations']}" for r in rows],
                          fontsize=8)
            ax.set_title(f"{SCENARIO_TEXT.get(scenario, scenario)}, {CLIENT_TEXT[client]}", fontsize=9)
            ax.set_ylim(bottom=0)
            ax.grid(True, axis="y", alpha=0.3)
        axes[i][0].set_ylabel("images/s")
    return fig


def plot_ratios(doc: dict[str, Any]) -> Any:
    import matplotlib.pyplot as plt

    ratios = sorted(doc["ratios"], key=_order)
    fig, ax = plt.subplots(figsize=(min(12.0, max(5.0, 0.8 * len(ratios))), 3.6))
    labels = []
    for x, r in enumerate(ratios):
        st = r["ratio"]
        color = COLORS[r["other"]]
        ax.plot([x] * len(st["values"]), st["values"], "o", color=color, markersize=5)
        if st["median"] is not None:
            ax.hlines(st["median"], x - 0.3, x + 0.3, color=color, linewidth=2)
        sender = "storescu" if r["client"] == "storescu" else "asyncio"
        labels.append(f"{SCENARIO_TEXT.get(r['scenario'], r['scenario'])}\n{sender}\nvs {r['other']}")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("appliance / other (images/s)")
    ax.set_ylim(bottom=0)
    ax.grid(True, axis="y", alpha=0.3)
    return fig


def plot_latency(steps: Path) -> Any:
    import matplotlib.pyplot as plt

    curves = []
    for path in sorted(steps.glob("sustained-*.json")):
        doc = json.loads(path.read_text())
        for run in doc["runs"]:
            if run["role"] != "target":
                continue
            stores = run["samples"]["stores"]
            lat = sorted(1000.0 * x for x, s in zip(stores["latency_s"], stores["status"], strict=True) if s == 0)
            if lat:
                curves.append((path.stem.replace("sustained-", "run "), lat))
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for label, lat in curves:
        ax.step(lat, [(i + 1) / len(lat) for i in range(len(lat))], where="post", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("share of images")
    ax.set_ylim(0, 1.0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


# ---- rendering ----------------------------------------------------------------------------------------------

def to_markdown(bs: list[Block], folder: Path) -> str:
    out: list[str] = []
    for b in bs:
        if b.kind == "h1":
            out += [f"# {b.text}", ""]
        elif b.kind == "h2":
            out += [f"## {b.text}", ""]
        elif b.kind == "p":
            out += [b.text, ""]
        elif b.kind == "warn":
            out += [f"> **{b.text}**", ""]
        elif b.kind == "ul":
            out += [f"- {item}" for item in b.items] + [""]
        elif b.kind == "table":
            out.append("| " + " | ".join(b.header) + " |")
            out.append("|" + "|".join("---" for _ in b.header) + "|")
            out += ["| " + " | ".join(row) + " |" for row in b.rows]
            out.append("")
        elif b.kind == "figure" and b.png:
            name = f"datasheet-{b.name}.png"
            (folder / name).write_bytes(b.png)
            out += [f"![{b.text}]({name})", ""]
    return "\n".join(out)


STYLE = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:60rem;margin:2rem auto;
padding:0 1rem;color:#222;line-height:1.45}h1{font-size:1.6rem;border-bottom:2px solid #1f77b4;padding-bottom:.3rem}
h2{font-size:1.2rem;margin-top:2rem}table{border-collapse:collapse;margin:.5rem 0 1rem}th,td{border:1px solid #ccc;
padding:.25rem .6rem;text-align:left;vertical-align:top}th{background:#f0f4f8}td:not(:first-child){font-variant-numeric:
tabular-nums}.warn{background:#fff4e5;border-left:4px solid #ff7f0e;padding:.5rem .8rem}figure{margin:1rem 0}
figcaption{font-size:.9rem;color:#555}img{max-width:100%}"""


def to_html(bs: list[Block]) -> str:
    e = html.escape
    title = next((b.text for b in bs if b.kind == "h1"), "Datasheet")
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">', f"<title>{e(title)}</title>",
           f"<style>{STYLE}</style></head><body>"]
    for b in bs:
        if b.kind in ("h1", "h2"):
            out.append(f"<{b.kind}>{e(b.text)}</{b.kind}>")
        elif b.kind == "p":
            out.append(f"<p>{e(b.text)}</p>")
        elif b.kind == "warn":
            out.append(f'<p class="warn">{e(b.text)}</p>')
        elif b.kind == "ul":
            out.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in b.items) + "</ul>")
        elif b.kind == "table":
            head = "" if not any(b.header) else "<tr>" + "".join(f"<th>{e(h)}</th>" for h in b.header) + "</tr>"
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            out.append(f"<table>{head}{body}</table>")
        elif b.kind == "figure" and b.png:
            data = base64.b64encode(b.png).decode("ascii")
            out.append(f'<figure><img alt="{e(b.text)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{e(b.text)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_reports(doc: dict[str, Any], out: Path) -> dict[str, Path]:
    """datasheet.json, datasheet.md (+ its PNGs) and datasheet.html in ``out``; the step reports are read from
    ``out/steps``."""
    steps = out / "steps"
    bs = blocks(doc, steps if steps.is_dir() else None)
    paths = {"json": out / "datasheet.json", "markdown": out / "datasheet.md", "html": out / "datasheet.html"}
    report.write_json(doc, paths["json"])
    paths["markdown"].write_text(to_markdown(bs, out))
    paths["html"].write_text(to_html(bs))
    return paths
