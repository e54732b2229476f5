"""``appliance bench datasheet``: every measurement a sizing datasheet needs, in one command, one folder and one
summary, so that a vendor or a site runs the same thing we do and gets numbers that can be quoted.

Steps (each writes its own report into ``--out``; the summary quotes them):
  1. ``hardware.json``: bench/hardware.py's probe of the filesystem of ``--tmp`` (fsync'd files, sequential
     writes, loopback);
  2. ``compare.json``: ``bench.compare --scenario ct-burst,morning-rush --clients driver,storescu`` (the appliance,
     DCMTK storescp --fork and Orthanc side by side, ``--repeats`` times, with the disk's durable ceiling);
  3. ``mr-max.json``: the appliance's MR burst maximum with our driver (ct-burst with the MR profile, the highest
     N of ``--associations``);
  4. ``sustained.json``: MR offered open loop at ``--load`` (default 50%) of that maximum for
     ``--sustained-seconds``: the steady-state latency;
  5. ``many-small.json``: one instance per association, 8 at a time;
  6. ``datasheet.md`` and ``datasheet.json``: the key numbers, and the issue's targets, each with its measured
     value and whether it is met on this machine.

    appliance bench datasheet                          # about 10 minutes on a 2-core machine
    appliance bench datasheet --quick                  # small bursts, 1 repeat: a few minutes
    appliance bench datasheet --tmp /srv/vol0 --out /root/datasheet   # measure the volume under test
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import compare, driver, hardware, report, synth

TARGET_STORESCP_RATIO = 1.0  # at least storescp --fork's instances/s, with durable acknowledgements
TARGET_ORTHANC_RATIO = 2.5
TARGET_SUSTAINED_P99_MS = 20.0
TARGET_DRIVER_HEADROOM = 2.0  # the driver's ceiling at least twice the appliance's best rate


def _load(path: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def _target_row(doc: dict[str, Any], n: int | None = None) -> dict[str, Any]:
    rows = [r for r in doc["summary"]["rows"] if r["role"] == "target" and (n is None or r["associations"] == n)]
    if not rows:
        raise ValueError("the driver report has no target run")
    return max(rows, key=lambda r: r["instances_per_s"] or 0.0)


def summarize(out: Path, load: float) -> dict[str, Any]:
    """datasheet.json from the step reports in ``out``."""
    hw = _load(out / "hardware.json")
    cmp_doc = _load(out / "compare.json")
    mr_max, sustained, small = (_load(out / f"{name}.json") for name in ("mr-max", "sustained", "many-small"))
    c = cmp_doc["compare"]
    ratios = [r for r in c["ratios"] if r["scenario"] in ("ct-burst", "morning-rush")]
    mr = _target_row(mr_max)
    sus = _target_row(sustained)
    sm = _target_row(small)
    # The driver's headroom, scenario by scenario: its ceiling (the same scenario against a receiver that
    # discards) over the appliance's rate in that scenario.
    headroom = {name: round(row["driver_ceiling_instances_per_s"] / row["instances_per_s"], 2)
                for name, row in (("mr-burst", mr), ("many-small-associations", sm))
                if row.get("driver_ceiling_instances_per_s") and row["instances_per_s"]}

    def worst(key: str) -> tuple[float | None, bool]:
        """(the worst ratio over the cells that have one, whether every cell has one): a cell without an OK run
        on either side is a cell where the target is not shown to be met."""
        values = [r.get(key) for r in ratios]
        known = [v for v in values if v is not None]
        return (min(known) if known else None), bool(values) and len(known) == len(values)

    (vs_scp, all_scp), (vs_orthanc, all_orthanc) = worst("vs_storescp"), worst("vs_orthanc")
    p99 = (sus["latency_ms"] or {}).get("p99")
    offered = load * (mr["instances_per_s"] or 0.0)
    steady = sus["failures"] == 0 and (sus["instances_per_s"] or 0.0) >= 0.95 * offered  # it kept up
    targets = [
        {"target": "appliance >= storescp --fork on ct-burst and morning-rush (every client and N), durable acks",
         "measured": vs_scp, "unit": "worst ratio",
         "met": all_scp and vs_scp is not None and vs_scp >= TARGET_STORESCP_RATIO},
        {"target": f"appliance >= {TARGET_ORTHANC_RATIO}x Orthanc on the same cells",
         "measured": vs_orthanc, "unit": "worst ratio",
         "met": all_orthanc and vs_orthanc is not None and vs_orthanc >= TARGET_ORTHANC_RATIO},
        {"target": f"sustained p99 < {TARGET_SUSTAINED_P99_MS:g} ms at {load:.0%} of the MR maximum, no failures, "
                   "offered rate achieved",
         "measured": p99, "unit": "ms", "met": steady and p99 is not None and p99 < TARGET_SUSTAINED_P99_MS},
        {"target": f"driver ceiling >= {TARGET_DRIVER_HEADROOM:g}x the appliance's rate (MR burst, many small "
                   "associations)",
         "measured": min(headroom.values()) if headroom else None, "unit": "x (worst)",
         "met": bool(headroom) and min(headroom.values()) >= TARGET_DRIVER_HEADROOM},
    ]
    return {
        "kind": "appliance-bench-datasheet", "schema_version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": report.machine_info(), "versions": report.versions(), "hardware": hw,
        "durable_ceiling": (c.get("hardware") or {}).get("ceilings"),
        "compare": {"medians": c["medians"], "ratios": ratios, "skipped": c.get("skipped"), "ok": c.get("ok")},
        "mr_max": {"associations": mr["associations"], "instances_per_s": mr["instances_per_s"],
                   "latency_ms": mr["latency_ms"],
                   "driver_ceiling_instances_per_s": mr.get("driver_ceiling_instances_per_s")},
        "sustained": {"offered_rate": round(load * (mr["instances_per_s"] or 0.0), 1),
                      "instances_per_s": sus["instances_per_s"], "failures": sus["failures"],
                      "latency_ms": sus["latency_ms"]},
        "many_small_associations": {"associations": sm["associations"], "instances_per_s": sm["instances_per_s"],
                                    "setup_ms": sm["setup_ms"], "latency_ms": sm["latency_ms"]},
        "driver_headroom": headroom,
        "targets": targets,
        "ok": bool(c.get("ok")) and all(d["summary"]["ok"] for d in (mr_max, sustained, small)),
    }


def _f(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown(doc: dict[str, Any]) -> str:
    m, hw = doc["machine"], doc["hardware"]["results"]
    out = [f"# Datasheet: DICOM storage appliance {doc['versions'].get('appliance') or ''}".rstrip(), "",
           f"Measured {doc['created']} on {m['cpu_count']} CPU ({m['cpu_model']}), {m['memory']}, kernel "
           f"{m['kernel']}, Python {m['python']}; data on {doc['hardware']['machine'].get('filesystem')}. "
           f"Every run ok: {'yes' if doc['ok'] else 'NO (see the step reports)'}.", "",
           "## The machine", "",
           "| measurement | value |", "|---|---:|"]
    for key, label, unit in (("fsync_512kib_t8_files_per_s", "fsync'd 512 KiB files, 8 threads", "files/s"),
                             ("fsync_130kib_t8_files_per_s", "fsync'd 130 KiB files, 8 threads", "files/s"),
                             ("seq_fdatasync_mb_per_s", "sequential write, fdatasync", "MB/s"),
                             ("tcp_loopback_mb_per_s", "loopback TCP", "MB/s")):
        out.append(f"| {label} | {_f(hw.get(key), 0)} {unit} |")
    out += ["", "## Ingest side by side (instances/s, medians)", "",
            "| scenario | sender | N | appliance | storescp --fork (no fsync) | Orthanc | ÷ storescp | ÷ Orthanc "
            "| durable ceiling |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    ceilings = doc.get("durable_ceiling") or {}
    for r in sorted(doc["compare"]["ratios"], key=lambda r: (r["scenario"], r["client"], r["associations"])):
        ceiling = (ceilings.get(r["scenario"]) or {}).get("files_per_s")
        out.append(f"| {r['scenario']} | {r['client']} | {r['associations']} | {_f(r['appliance_instances_per_s'], 0)} "
                   f"| {_f(r.get('storescp_instances_per_s'), 0)} | {_f(r.get('orthanc_instances_per_s'), 0)} "
                   f"| {_f(r.get('vs_storescp'), 2)} | {_f(r.get('vs_orthanc'), 2)} | {_f(ceiling, 0)} |")
    sus, sm, mr = doc["sustained"], doc["many_small_associations"], doc["mr_max"]
    lat = sus["latency_ms"] or {}
    out += ["", "## Latency and association rate", "",
            f"- MR burst maximum (our driver, N={mr['associations']}): {_f(mr['instances_per_s'], 0)} instances/s.",
            f"- Sustained MR at {_f(sus['offered_rate'], 0)}/s offered: {_f(sus['instances_per_s'], 1)}/s achieved, "
            f"{sus['failures']} failures, C-STORE latency p50 {_f(lat.get('p50'), 2)} / p95 {_f(lat.get('p95'), 2)} "
            f"/ p99 {_f(lat.get('p99'), 2)} / max {_f(lat.get('max'), 2)} ms.",
            f"- One instance per association, N={sm['associations']}: {_f(sm['instances_per_s'], 0)} instances/s, "
            f"association set-up p50 {_f((sm['setup_ms'] or {}).get('p50'), 2)} ms.",
            "- The driver's own ceiling (the same scenario against a receiver that discards) over the appliance's "
            "rate: " + (", ".join(f"{k} {v:.1f}x" for k, v in doc["driver_headroom"].items()) or "-") + ".",
            "", "## Targets", "", "| target | measured | met |", "|---|---:|---|"]
    for t in doc["targets"]:
        measured = "not measured" if t["measured"] is None else f"{_f(t['measured'], 2)} {t['unit']}"
        out.append(f"| {t['target']} | {measured} | {'yes' if t['met'] else 'no'} |")
    out += ["", "Step reports beside this file: hardware.json, compare.json/.md/-throughput.png, mr-max.json/.md, "
            "sustained.json/.md, many-small.json/.md."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="appliance bench datasheet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for every report (default bench/results/datasheet-<time>)")
    parser.add_argument("--tmp", type=Path, help="where the receivers' data goes: put it on the volume under test")
    parser.add_argument("--cache", type=Path, default=synth.DEFAULT_CACHE, help="bench/synth's burst cache")
    parser.add_argument("--quick", action="store_true", help="small bursts, 1 repeat, short sustained run")
    parser.add_argument("--repeats", type=int, help="side-by-side repeats (default 3; 1 with --quick)")
    parser.add_argument("--associations", default="4,8", help="N for the side by side (default 4,8)")
    parser.add_argument("--count", type=int, help="instances per CT/MR room and burst (default: the scenarios')")
    parser.add_argument("--load", type=float, default=0.5, help="sustained rate as a fraction of the MR maximum")
    parser.add_argument("--sustained-seconds", type=float, help="sustained run length (default 60; 10 with --quick)")
    parser.add_argument("--hardware-seconds", type=float, help="hardware probe budget (default 10; 3 with --quick)")
    parser.add_argument("--workers", type=int, default=0, help="appliance workers (default 0 = one per CPU)")
    args = parser.parse_args(argv)
    out = args.out or Path("bench/results") / time.strftime("datasheet-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    repeats = args.repeats or (1 if args.quick else 3)
    count = args.count or (100 if args.quick else None)
    sustained_s = args.sustained_seconds or (10.0 if args.quick else 60.0)
    hw_s = args.hardware_seconds or (3.0 if args.quick else 10.0)
    top_n = max(int(n) for n in args.associations.split(",") if n)
    tmp = args.tmp or Path(tempfile.gettempdir())
    common = ["--cache", str(args.cache), "--tmp", str(tmp)]
    run_common = [*common, "--start-appliance", "--workers", str(args.workers), "--quiet"]
    steps = ("hardware", "compare", "mr-max", "sustained", "many-small")
    for name in (*steps, "datasheet"):  # a reused --out must not lend an old step's numbers to this summary
        for old in out.glob(f"{name}*"):
            old.unlink()
    if shutil.which("storescu") is None:
        print("error: DCMTK is not installed (make dcmtk, or apt-get install dcmtk): the side by side needs "
              "storescu and storescp", file=sys.stderr)
        return 2

    print(f"[1/5] hardware probe of {tmp} ({hw_s:g} s)", file=sys.stderr, flush=True)
    (out / "hardware.json").write_text(json.dumps(
        {"machine": hardware.machine(tmp), "seconds": hw_s, "results": hardware.probe(tmp, hw_s)}, indent=1))
    print("[2/5] side by side: ct-burst, morning-rush", file=sys.stderr, flush=True)
    rc = compare.main(["--scenario", "ct-burst,morning-rush", "--clients", "driver,storescu", "--associations",
                       args.associations, "--repeats", str(repeats), "--out", str(out / "compare.json"), *common,
                       "--hardware-seconds", str(min(3.0, hw_s)), "--workers", str(args.workers),
                       *(["--count", str(count)] if count else [])])
    print("[3/5] MR burst maximum", file=sys.stderr, flush=True)
    rc |= driver.main(["--scenario", "ct-burst", "--profile", "mr", "--count", str(count or 2000), "--associations",
                       str(top_n), "--json", str(out / "mr-max.json"), "--no-plots", *run_common])
    mr_rate = _target_row(_load(out / "mr-max.json"))["instances_per_s"] or 0.0
    rate = max(1.0, round(args.load * mr_rate, 1))
    print(f"[4/5] sustained MR at {rate:g}/s for {sustained_s:g} s", file=sys.stderr, flush=True)
    rc |= driver.main(["--scenario", "sustained", "--rate", str(rate), "--duration", str(sustained_s),
                       "--associations", "8", "--json", str(out / "sustained.json"), *run_common])
    print("[5/5] many small associations", file=sys.stderr, flush=True)
    rc |= driver.main(["--scenario", "many-small-associations", "--count", str(count * 2 if count else 400),
                       "--associations", "8", "--json", str(out / "many-small.json"), "--no-plots", *run_common])
    missing = [name for name in steps if not (out / f"{name}.json").exists()]
    if missing:
        print(f"error: no report from step(s) {', '.join(missing)}: see the messages above", file=sys.stderr)
        return 1
    doc = summarize(out, args.load)
    (out / "datasheet.json").write_text(json.dumps(doc, indent=1, default=str))
    text = markdown(doc)
    (out / "datasheet.md").write_text(text)
    print(text)
    print(f"datasheet: {out / 'datasheet.md'}", file=sys.stderr)
    return 0 if rc == 0 and doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
