"""``appliance bench ...``: the benchmark harness (bench/) as typer commands with the console's conventions
(issue 13): ``--json`` a flag (the report as JSON on stdout, progress and tables on stderr), ``--out DIR`` a folder
(the report files go inside), one name per option (``--associations/-a``), typer's usage errors (exit 2, as
every command; JSON with ``--json``).

Each command builds an argv from its typed options and calls the tool's ``main`` (bench/*.py): ``python -m bench.X``
keeps its own argparse options for the docs and CI that call it, and the measuring code is not touched.
``-c/--config FILE`` (run, compare, datasheet, soak): the appliance under test runs that configuration, its
volumes, workers and storage settings, with only what a benchmark must change (bench/bench_config.py). find,
retrieve, migrate and recall build configurations of their own (a C-MOVE destination peer, the tiers under test),
which a site's file would not have, so they do not take it.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from appliance import errors
from appliance.cli_common import human_bytes

bench_app = typer.Typer(no_args_is_help=True, help="Benchmark harness (bench/): synth, run, compare, datasheet, ...")

JsonFlag = Annotated[bool, typer.Option("--json", help="The report as JSON on stdout (progress and tables: stderr)")]
OutDir = Annotated[Path | None, typer.Option("--out", "-o", file_okay=False, help="Folder the report files go into")]
CacheOpt = Annotated[Path | None, typer.Option(
    "--cache", file_okay=False, help="Burst cache (default $BENCH_CACHE, else $XDG_CACHE_HOME/appliance/bench)")]
BenchConfigOpt = Annotated[Path | None, typer.Option(
    "--config", "-c", exists=True, dir_okay=False,
    help="The appliance under test runs this configuration: its volumes (a fresh folder in each), workers, storage")]
TmpOpt = Annotated[Path | None, typer.Option(
    "--tmp", file_okay=False, help="Where the receivers' data folders go (default $TMPDIR)")]


def _ints(text: str | None) -> str | None:
    """A comma list of positive integers (``4,8``), checked here so that a bad one is a usage error naming the
    option, not argparse's ``invalid <lambda> value``; handed on as text."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise typer.BadParameter(f"{text!r}: a comma list of positive integers, e.g. 4,8")
    return ",".join(parts)


def _target(text: str | None) -> str | None:
    host, _, port = (text or ":0").rpartition(":")
    if text is not None and (not host or not port.isdigit()):
        raise typer.BadParameter(f"{text!r}: HOST:PORT")
    return text


AssocOpt = Annotated[str | None, typer.Option("--associations", "-a", callback=_ints,
                                              help="Concurrent associations: N, or a comma list N,M,...")]
# The spellings of `python -m bench.X` (--k, -n), still taken from scripts written for them, not shown in --help.
OldKOpt = Annotated[str | None, typer.Option("--k", hidden=True, callback=_ints)]
OldNOpt = Annotated[str | None, typer.Option("-n", hidden=True, callback=_ints)]


def _argv(**options: Any) -> list[str]:
    """Keyword options as an argparse argv: None left out, True a bare flag, False nothing."""
    argv: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is None or value is False:
            continue
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def _run(module: str, argv: list[str], as_json: bool) -> None:
    """The tool's main, its exit code kept. With --json its human output goes to stderr: stdout is the JSON."""
    main = importlib.import_module(f"bench.{module}").main
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        code = main(argv)
    if code:
        raise typer.Exit(code)


@contextlib.contextmanager
def _report_dir(out: Path | None, as_json: bool) -> Iterator[Path | None]:
    """The folder a report goes into: --out (created), else with --json a temporary one (the JSON is printed, the
    files are not wanted), else None (the tool's default under bench/results)."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        yield out
    elif as_json:
        with tempfile.TemporaryDirectory(prefix="appliance-bench-") as tmp:
            yield Path(tmp)
    else:
        yield None


def _print_json(path: Path) -> None:
    typer.echo(json.dumps(json.loads(path.read_text()), indent=2, sort_keys=True))


# ---- the cache -------------------------------------------------------------------------------------------------

@bench_app.command("clean")
def clean(yes: Annotated[bool, typer.Option("--yes", "-y", help="Remove without asking")] = False,
          cache: CacheOpt = None) -> None:
    """Remove the burst cache (regenerated on the next run) and say how much it frees."""
    from bench import synth

    folder = cache or synth.default_cache()
    if not folder.exists():
        typer.echo(f"{folder}: nothing to remove")
        return
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    if not yes and not typer.confirm(f"remove {folder} ({human_bytes(size)})?"):
        raise typer.Exit(errors.EXIT_FAILURE)
    shutil.rmtree(folder)
    typer.echo(f"removed {folder}: {size / 1e6:.1f} MB freed")


# ---- data ------------------------------------------------------------------------------------------------------

@bench_app.command("synth")
def synth_cmd(
    profile: Annotated[str, typer.Option(help="ct, mr, dx, mg, us (see --list)")] = "ct",
    count: Annotated[int | None, typer.Option(min=1, help="Instances (default: the profile's)")] = None,
    size: Annotated[int | None, typer.Option(min=8, help="Rows = columns (default: the profile's)")] = None,
    frames: Annotated[int | None, typer.Option(min=1, help="Frames per instance (multi-frame profiles: us)")] = None,
    seed: int = 1,
    ts: Annotated[str, typer.Option(help="Transfer syntax: none (Explicit VR LE), rle, jpegls, j2k...")] = "none",
    out: OutDir = None,
    associations: Annotated[int, typer.Option("--associations", "-a", min=1,
                                              help="Split the cached burst into one folder per association")] = 1,
    cache: CacheOpt = None,
    old_k: Annotated[int | None, typer.Option("--k", hidden=True, min=1)] = None,
    list_: Annotated[bool, typer.Option("--list", help="Print the profiles and the encoders installed")] = False,
) -> None:
    """Generate deterministic synthetic studies: into --out DIR, else into the cache (the folders are printed)."""
    from bench import synth

    if profile not in synth.PROFILES:
        raise typer.BadParameter(f"{profile!r}: one of {', '.join(synth.PROFILES)}", param_hint="--profile")
    if ts not in synth.TRANSFER_SYNTAXES:
        raise typer.BadParameter(f"{ts!r}: one of {', '.join(synth.TRANSFER_SYNTAXES)}", param_hint="--ts")
    _run("synth", _argv(profile=profile, count=count, size=size, frames=frames, seed=seed, ts=ts, out=out,
                        k=old_k or associations, cache=cache, list=list_), False)


@bench_app.command("hardware")
def hardware_cmd(
    dir_: Annotated[Path, typer.Option("--dir", exists=True, file_okay=False,
                                       help="Where to write: on the filesystem to measure")] = Path("."),
    seconds: Annotated[float, typer.Option(min=0.1, help="Time budget")] = 10.0,
    out: OutDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Probe the machine: fsync'd file rate, sequential write, loopback (report: hardware.json in --out)."""
    with _report_dir(out, as_json) as folder:
        report = folder / "hardware.json" if folder else None
        _run("hardware", _argv(dir=dir_, seconds=seconds, json=report), as_json)
        if as_json and report:
            _print_json(report)


# ---- ingest ----------------------------------------------------------------------------------------------------

@bench_app.command("run")
def run_cmd(
    scenario: Annotated[str, typer.Option(help="ct-burst, morning-rush, sustained, many-small-associations")],
    target: Annotated[str | None, typer.Option(callback=_target, help="HOST:PORT of the receiver")] = None,
    start_appliance: Annotated[bool, typer.Option(help="Start an appliance of our own to drive")] = False,
    config: BenchConfigOpt = None,
    ae: Annotated[str, typer.Option(help="Called AE title")] = "APPLIANCE",
    associations: AssocOpt = None,
    count: Annotated[int | None, typer.Option(min=1, help="Instances (default: the scenario's)")] = None,
    rate: Annotated[float | None, typer.Option(min=0.1, help="sustained: offered instances/s")] = None,
    duration: Annotated[float | None, typer.Option(min=0.1, help="sustained: seconds")] = None,
    seed: int = 1,
    workers: Annotated[int | None, typer.Option(min=0, help="Appliance workers (0: one per CPU)")] = None,
    no_fsync: Annotated[bool, typer.Option(help="--start-appliance: storage.fsync = false")] = False,
    no_ceiling: Annotated[bool, typer.Option(help="Skip the driver-ceiling run")] = False,
    ceiling_seconds: Annotated[float | None, typer.Option(min=0.1, help="Sustained ceiling run length")] = None,
    timeout: Annotated[float | None, typer.Option(min=1, help="Longest one run may take (seconds)")] = None,
    calling_ae: Annotated[str | None, typer.Option(help="Calling AE (default CT01, MR01, US01)")] = None,
    profile: Annotated[str | None, typer.Option(help="Data profile of single-modality scenarios")] = None,
    transfer_syntax: Annotated[str | None, typer.Option(help="Transfer syntax UID of the data sent")] = None,
    keep_uids: Annotated[bool, typer.Option(help="Send the generated UIDs as they are")] = False,
    server_pid: Annotated[int | None, typer.Option(min=1, help="A local receiver's pid: its CPU and RSS")] = None,
    metrics_url: Annotated[str | None, typer.Option(help="The appliance's /metrics, scraped around each run")
                           ] = None,
    label: Annotated[str | None, typer.Option(help="Name of the target in the report")] = None,
    keep: Annotated[bool, typer.Option(help="--start-appliance: keep its data folder")] = False,
    no_plots: Annotated[bool, typer.Option(help="No PNG plots")] = False,
    old_n: OldNOpt = None,
    cache: CacheOpt = None,
    tmp: TmpOpt = None,
    out: OutDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Drive a scenario against a receiver with our asyncio SCU (report: run-SCENARIO.json/.md in --out)."""
    from bench import driver

    if scenario not in driver.SCENARIOS:
        raise typer.BadParameter(f"{scenario!r}: one of {', '.join(driver.SCENARIOS)}", param_hint="--scenario")
    if (target is None) == (not start_appliance):
        raise typer.BadParameter("give --target HOST:PORT or --start-appliance", param_hint="--target")
    if config is not None and not start_appliance:
        raise typer.BadParameter("configures the appliance --start-appliance starts", param_hint="--config")
    with _report_dir(out, as_json) as folder:
        report = folder / f"run-{scenario}.json" if folder else None
        _run("driver", _argv(scenario=scenario, target=target, start_appliance=start_appliance, config=config, ae=ae,
                             associations=associations or old_n, count=count, rate=rate, duration=duration, seed=seed,
                             workers=workers, no_fsync=no_fsync, no_ceiling=no_ceiling, ceiling_seconds=ceiling_seconds,
                             timeout=timeout, calling_ae=calling_ae, profile=profile,
                             transfer_syntax=transfer_syntax, keep_uids=keep_uids, server_pid=server_pid,
                             metrics_url=metrics_url, label=label, keep=keep, no_plots=no_plots, cache=cache,
                             tmp=tmp, json=report, quiet=as_json), as_json)
        if as_json and report:
            _print_json(report)


def _names(option: str, allowed: tuple[str, ...], text: str | None) -> None:
    """A comma list of known names, refused here (a usage error) rather than as argparse's ``invalid <lambda>``."""
    if text is None:
        return
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or any(p not in allowed for p in parts):
        raise typer.BadParameter(f"{text!r}: a comma list of {', '.join(allowed)}", param_hint=option)


@bench_app.command("compare")
def compare_cmd(
    scenarios: Annotated[str, typer.Option(help="Bursts: comma list of ct, mr")] = "ct,mr",
    associations: AssocOpt = None,
    repeats: Annotated[int | None, typer.Option(min=1, help="Runs per cell; medians are reported")] = None,
    receivers: Annotated[str | None, typer.Option(help="Comma list of appliance, storescp, orthanc...")] = None,
    workers: Annotated[str | None, typer.Option(callback=_ints, help="Appliance worker counts, comma list")] = None,
    config: BenchConfigOpt = None,
    appliance_nofsync: Annotated[bool, typer.Option(help="Also run the appliance with storage.fsync = false")
                                 ] = False,
    quick: Annotated[bool, typer.Option(help="Small bursts and 1 repeat: a smoke run")] = False,
    ct_count: Annotated[int | None, typer.Option(min=1)] = None,
    mr_count: Annotated[int | None, typer.Option(min=1)] = None,
    seed: int = 1,
    timeout: Annotated[float | None, typer.Option(min=1, help="Longest one run may take (seconds)")] = None,
    keep: Annotated[bool, typer.Option(help="Keep the receivers' data folders")] = False,
    scenario: Annotated[str | None, typer.Option(
        help="Side by side: these driver scenarios (comma list) instead of the bursts")] = None,
    clients: Annotated[str | None, typer.Option(help="Side by side: driver, storescu (comma list)")] = None,
    count: Annotated[int | None, typer.Option(min=1, help="Side by side: instances")] = None,
    no_hardware: Annotated[bool, typer.Option(help="Side by side: skip the fsync'd-file probe")] = False,
    hardware_seconds: Annotated[float | None, typer.Option(min=0.1, help="Side by side: probe budget")] = None,
    old_k: OldKOpt = None,
    cache: CacheOpt = None,
    tmp: TmpOpt = None,
    out: OutDir = None,
    as_json: JsonFlag = False,
) -> None:
    """The appliance, DCMTK storescp and Orthanc side by side (report: compare.json in --out)."""
    from bench import compare, sidebyside

    _names("--scenarios", ("ct", "mr"), scenarios)
    _names("--receivers", (*compare.RECEIVERS, "appliance-base"), receivers)
    _names("--scenario", tuple(sidebyside.SCENARIOS), scenario)
    _names("--clients", tuple(sidebyside.CLIENTS), clients)
    with _report_dir(out, as_json) as folder:
        report = folder / "compare.json" if folder else None
        _run("compare", _argv(scenarios=scenarios, associations=associations or old_k, repeats=repeats, receivers=receivers,
                              workers=workers, config=config, appliance_nofsync=appliance_nofsync, quick=quick,
                              ct_count=ct_count, mr_count=mr_count, seed=seed, timeout=timeout, keep=keep, scenario=scenario,
                              clients=clients, count=count, no_hardware=no_hardware,
                              hardware_seconds=hardware_seconds, cache=cache, tmp=tmp, out=report), as_json)
        if as_json and report:
            _print_json(report)


@bench_app.command("datasheet")
def datasheet_cmd(
    config: BenchConfigOpt = None,
    target: Annotated[str | None, typer.Option(callback=_target, help=(
        "HOST:PORT of an appliance already running (another machine: the sender runs here)"))] = None,
    called_ae: Annotated[str, typer.Option(help="--target's AE title")] = "APPLIANCE",
    storescp: Annotated[str | None, typer.Option(callback=_target, help=(
        "With --target: HOST:PORT of a storescp --fork started on that machine"))] = None,
    orthanc: Annotated[str | None, typer.Option(callback=_target, help=(
        "With --target: HOST:PORT of an Orthanc started on that machine"))] = None,
    repeats: Annotated[int | None, typer.Option(min=1, help="Runs of everything (default and minimum 3)")] = None,
    quick: Annotated[bool, typer.Option(help="Smoke run: small bursts, 1 repeat, marked not for quoting")] = False,
    associations: AssocOpt = None,
    scenarios: Annotated[str | None, typer.Option(help="Comma list of ct-burst, mr-burst, morning-rush")] = None,
    count: Annotated[int | None, typer.Option(min=1, help="Instances per burst (default: the scenario's)")] = None,
    load: Annotated[float | None, typer.Option(min=0.01, max=1.0, help="Sustained rate, share of the MR maximum")
                    ] = None,
    sustained_seconds: Annotated[float | None, typer.Option(min=1, help="Sustained run (default 30; 10 quick)")
                                 ] = None,
    hardware_seconds: Annotated[float | None, typer.Option(min=0.1, help="Disk probe per disk (default 10)")
                                ] = None,
    workers: Annotated[int | None, typer.Option(min=0, help="Appliance workers (0: one per CPU; default: -c's)")
                       ] = None,
    sender_cpus: Annotated[str | None, typer.Option(help="Pin the sender to these CPUs (0 or 0-1,3), receivers to "
                                                         "the others")] = None,
    title: Annotated[str | None, typer.Option(help="The datasheet's heading, e.g. the box's model")] = None,
    keep: Annotated[bool, typer.Option(help="Keep the receivers' data folders")] = False,
    cache: CacheOpt = None,
    tmp: Annotated[Path | None, typer.Option(
        "--tmp", file_okay=False, help="Where the receivers' data folders go (default: -c's first volume, else "
                                       "$TMPDIR)")] = None,
    out: OutDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Hardware, side by side with storescp and Orthanc, latency, association rate: datasheet.html/.md/.json."""
    if target is None and (storescp or orthanc):
        raise typer.BadParameter("names a receiver beside --target", param_hint="--storescp/--orthanc")
    if target is not None and config is not None:
        raise typer.BadParameter("configures an appliance this command starts; --target measures one already running",
                                 param_hint="--config")
    if repeats is not None and repeats < 3 and not quick:
        raise typer.BadParameter("at least 3 (a median and its spread); --quick for a smoke run",
                                 param_hint="--repeats")
    if scenarios is not None:
        _names("--scenarios", ("ct-burst", "mr-burst", "morning-rush"), scenarios)
        if "mr-burst" not in scenarios.split(","):
            raise typer.BadParameter("must include mr-burst (the sustained rate is based on it)",
                                     param_hint="--scenarios")
    if sender_cpus is not None:
        from bench.datasheet import parse_cpus

        try:
            parse_cpus(sender_cpus)
        except Exception as exc:
            raise typer.BadParameter(str(exc), param_hint="--sender-cpus") from None
    with _report_dir(out, as_json) as folder:
        try:
            _run("datasheet", _argv(out=folder, config=config, target=target, called_ae=called_ae,
                                    storescp=storescp, orthanc=orthanc, tmp=tmp, cache=cache, quick=quick,
                                    repeats=repeats, associations=associations, scenarios=scenarios, count=count,
                                    load=load, sustained_seconds=sustained_seconds,
                                    hardware_seconds=hardware_seconds, workers=workers, sender_cpus=sender_cpus,
                                    title=title, keep=keep), as_json)
        finally:
            # Exit 1 (a run failed) still wrote the report, which lists the failed runs: --json prints it then
            # too. The tool removes an earlier run's datasheet.json first, so one that exists is this run's.
            if as_json and folder and (folder / "datasheet.json").exists():
                _print_json(folder / "datasheet.json")


# ---- query and retrieve ----------------------------------------------------------------------------------------

@bench_app.command("find")
def find_cmd(
    instances: Annotated[int, typer.Option(min=1, help="Synthetic instances")] = 1_000_000,
    per_study: Annotated[int, typer.Option(min=1, help="Instances per study")] = 100,
    queries: Annotated[int, typer.Option(min=1, help="Queries of each kind")] = 100,
    workdir: Annotated[Path | None, typer.Option(file_okay=False, help="Build the index here (default: temp)")
                       ] = None,
    keep: Annotated[bool, typer.Option(help="Keep the work folder")] = False,
    orthanc_instances: Annotated[int, typer.Option(min=0, help="Also query Orthanc with this many instances")] = 0,
    out: OutDir = None,
    as_json: JsonFlag = False,
) -> None:
    """C-FIND latency on a synthetic index of N instances (results.json/.md in --out)."""
    with _report_dir(out, as_json) as folder:
        _run("find", _argv(instances=instances, per_study=per_study, queries=queries, workdir=workdir, keep=keep,
                           orthanc_instances=orthanc_instances or None, out=folder), as_json)
        if as_json and folder:
            _print_json(folder / "results.json")


@bench_app.command("retrieve")
def retrieve_cmd(
    profile: Annotated[str, typer.Option(help="Synthetic profile")] = "ct",
    count: Annotated[int, typer.Option(min=1, help="Instances in the series")] = 1000,
    size: Annotated[int | None, typer.Option(min=8, help="Rows = columns (default: the profile's)")] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Runs per cell; medians are reported")] = 3,
    targets: Annotated[str, typer.Option(help="Comma list of appliance, orthanc")] = "appliance,orthanc",
    operations: Annotated[str, typer.Option(help="Comma list of move, get")] = "move,get",
    workers: Annotated[int, typer.Option(min=0, help="Appliance workers (0: one per CPU)")] = 0,
    associations: Annotated[int, typer.Option("--associations", "-a", min=1,
                                              help="The appliance's retrieve.move_associations")] = 2,
    old_move: Annotated[int | None, typer.Option("--move-associations", hidden=True, min=1)] = None,
    timeout: Annotated[float, typer.Option(min=1, help="Longest one run may take (seconds)")] = 900.0,
    cache: CacheOpt = None,
    tmp: TmpOpt = None,
    out: OutDir = None,
    as_json: JsonFlag = False,
) -> None:
    """C-MOVE and C-GET of one series, the appliance next to Orthanc (retrieve.json in --out)."""
    with _report_dir(out, as_json) as folder:
        report = folder / "retrieve.json" if folder else None
        _run("retrieve", _argv(profile=profile, count=count, size=size, repeats=repeats, targets=targets,
                               operations=operations, workers=workers, move_associations=old_move or associations,
                               timeout=timeout, cache=cache, tmp=tmp, out=report), as_json)
        if as_json and report:
            _print_json(report)


# ---- the other tools (docs/benchmarks.md: soak, tiering, tape recall, compression) --------------------------------

@bench_app.command("soak")
def soak_cmd(
    associations: Annotated[int, typer.Option("--associations", "-a", min=1, help="Concurrent associations")] = 64,
    rate: Annotated[float, typer.Option(min=0.1, help="Offered instances/s over all associations")] = 300.0,
    duration: Annotated[float, typer.Option(min=1, help="Seconds of load")] = 600.0,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between samples")] = 5.0,
    workers: Annotated[int | None, typer.Option(min=0, help="Appliance workers (0: one per CPU; default: -c's)")
                       ] = None,
    config: BenchConfigOpt = None,
    tmp: TmpOpt = None,
    out: OutDir = None,
    as_json: JsonFlag = False,
) -> None:
    """N associations storing for minutes: RSS, descriptors and rate, first vs last minute (soak.json in --out)."""
    with _report_dir(out, as_json) as folder:
        _run("soak", _argv(associations=associations, rate=rate, duration=duration, interval=interval,
                           workers=workers, config=config, tmp=tmp, out=folder), as_json)
        if as_json and folder:
            _print_json(folder / "soak.json")


@bench_app.command("migrate")
def migrate_cmd(
    tier: Annotated[str, typer.Option(help="nearline or s3")] = "nearline",
    studies: Annotated[int, typer.Option(min=1, help="CT studies loaded")] = 12,
    slices: Annotated[int, typer.Option(min=1, help="512x512 CT slices per study")] = 100,
    mr: Annotated[int, typer.Option(min=1, help="MR instances per ingest burst")] = 1000,
    repeats: Annotated[int, typer.Option(min=1)] = 3,
    level: Annotated[int, typer.Option(min=1, max=22, help="The tiers' zstd level")] = 3,
    rate: Annotated[float, typer.Option(min=0.1, help="tier run --rate (MB/s)")] = 1000.0,
    reads: Annotated[int, typer.Option(min=1, help="Single-instance reads from each tier and online")] = 20,
    cache: CacheOpt = None,
    tmp: TmpOpt = None,
    out: OutDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Migration throughput, and ingest's rate while a migration runs (migrate.json in --out)."""
    _names("--tier", ("nearline", "s3"), tier)
    with _report_dir(out, as_json) as folder:
        _run("migrate", _argv(tier=tier, studies=studies, slices=slices, mr=mr, repeats=repeats, level=level,
                              rate=rate, reads=reads, cache=cache, tmp=tmp, out=folder), as_json)
        if as_json and folder:
            _print_json(folder / "migrate.json")


@bench_app.command("recall")
def recall_cmd(
    profile: Annotated[str, typer.Option(help="Synthetic profile")] = "ct",
    instances: Annotated[int, typer.Option(min=1)] = 100,
    reads: Annotated[int, typer.Option(min=1)] = 50,
    load_s: Annotated[float, typer.Option(min=0, help="Simulated tape load time (s; an LTO drive: ~15)")] = 0.0,
    seek_s_per_gib: Annotated[float, typer.Option(min=0, help="Simulated seek (s per GiB skipped; LTO: ~0.3)")] = 0.0,
    out: OutDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Reads across tiers and recall time from the virtual tape library (recall.json in --out)."""
    with _report_dir(out, as_json) as folder:
        report = folder / "recall.json" if folder else None
        _run("recall", _argv(profile=profile, instances=instances, reads=reads, load_s=load_s,
                             seek_s_per_gib=seek_s_per_gib, json=report), as_json)
        if as_json and report:
            _print_json(report)


@bench_app.command("compress")
def compress_cmd(
    ct: Annotated[int, typer.Option(min=0, help="Synthetic CT instances")] = 60,
    mr: Annotated[int, typer.Option(min=0, help="Synthetic MR instances")] = 150,
    extra_dir: Annotated[Path | None, typer.Option(exists=True, file_okay=False,
                                                   help="The pydicom-data files (data_store/data)")] = None,
    repeats: Annotated[int, typer.Option(min=1)] = 3,
    quick: Annotated[bool, typer.Option(help="A few files, one run each")] = False,
    work_dir: Annotated[Path | None, typer.Option(file_okay=False, help="Where the nearline measurement writes")
                        ] = None,
    out: OutDir = None,
    as_json: JsonFlag = False,
) -> None:
    """zstd on DICOM as the nearline tier stores it: ratio and MB/s per core (compress.json in --out)."""
    with _report_dir(out, as_json) as folder:
        report = folder / "compress.json" if folder else None
        _run("compress", _argv(ct=ct, mr=mr, extra_dir=extra_dir, repeats=repeats, quick=quick, work_dir=work_dir,
                               json=report), as_json)
        if as_json and report:
            _print_json(report)
