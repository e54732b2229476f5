"""``appliance tier init|status|plan|run``: the storage admin's view of the tiers and the policy runs.

Human tables by default, ``--json`` for scripts; exit codes as in cli.py (0 ok, 1 a move failed, 3 not found,
69 another mover runs or a tier is unavailable, 78 configuration error).

``APPLIANCE_TIER_NOW`` (an ISO date/time in UTC, or nanoseconds since the epoch) makes `tier plan` and `tier run`
plan as if it were that time: a what-if aid ("what will move next month?") and the tests' clock. It changes only
the policies' ages, never what is recorded."""

from __future__ import annotations

import datetime
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from appliance import errors
from appliance.cli_common import emit, human_bytes, human_ns, load_cli_config, open_index
from appliance.config import Config

if TYPE_CHECKING:
    from appliance.index.db import StudyIndex
    from tiering.policy import PlannedMove

NOW_ENV = "APPLIANCE_TIER_NOW"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C


class UsageError(errors.ApplianceError):
    exit_code = errors.EXIT_USAGE

tier_app = typer.Typer(no_args_is_help=True, help="Storage tiers: status, policy plans and runs.")


@tier_app.callback()
def _private_files() -> None:
    """What these commands write (archives, cartridges, online copies of recalled studies) holds patient data:
    0600 files and 0700 folders whatever the shell's umask, as the server does."""
    os.umask(0o077)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config (default: $APPLIANCE_CONFIG, ./appliance.toml, built-in)"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output")]

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15,
          "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40, "PIB": 1 << 50}


def parse_size(text: str) -> int:
    """``20GB``, ``1.5 TiB``, ``500MB`` -> bytes (decimal units, and binary ones with an i)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGTP]I?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise UsageError(f"not a size: {text!r} (e.g. 500MB, 20GB, 1.5TiB)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


def parse_limit(text: str | None) -> tuple[int | None, int]:
    """--limit: a plain number is a count of studies, a size (with a unit) a byte budget."""
    if text is None:
        return None, 0
    if text.strip().isdigit():
        count = int(text)
        if count < 1:
            raise UsageError("--limit: at least 1 study")
        return count, 0
    return None, parse_size(text)


def now_ns() -> int:
    """The planner's clock: APPLIANCE_TIER_NOW when set, else the real time."""
    raw = os.environ.get(NOW_ENV, "").strip()
    if not raw:
        return time.time_ns()
    if raw.isdigit():
        return int(raw)
    try:
        when = datetime.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"{NOW_ENV}={raw!r}: an ISO date (2027-03-01, 2027-03-01T12:00:00) or ns") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return int(when.timestamp()) * 1_000_000_000 + when.microsecond * 1000


def _fail(exc: errors.ApplianceError) -> errors.ApplianceError:
    """Raised as is: cli_common.RootGroup prints it (one line, or JSON with --json) and exits with its code."""
    return exc


def _table(headers: list[str], rows: list[list[str]]) -> str:
    from rich.console import Console
    from rich.table import Table

    table = Table(*headers, box=None, pad_edge=False)
    for row in rows:
        table.add_row(*row)
    # One line per row, never wrapped (a reason is long): `tier plan | grep CT` keeps whole rows.
    console = Console(width=1000, record=True, file=open(os.devnull, "w"))  # noqa: SIM115 - closed with console
    console.print(table)
    text = console.export_text()
    console.file.close()
    return "\n".join(line.rstrip() for line in text.rstrip().splitlines())


@tier_app.command("init")
def init(name: Annotated[str, typer.Argument(help="A tier's name from [[tiers]]")], config: ConfigOpt = None,
         as_json: JsonOpt = False,
         adopt: Annotated[bool, typer.Option("--adopt", help="s3: take over a prefix another appliance owns (this "
                                                             "node replaces it)")] = False) -> None:
    """Prepare a tier's media (volume markers, virtual cartridges, an s3 bucket prefix's marker)."""
    from tiering.tiers import init_tier

    try:
        cfg = load_cli_config(config)
        tier = cfg.tier(name)
        if tier is None:
            raise errors.ConfigError(f"no tier named {name!r} in [[tiers]] "
                                     f"(configured: {', '.join(t.name for t in cfg.tiers) or 'none'})")
        done = init_tier(tier, adopt=adopt)
        warnings = same_filesystem_warnings(cfg, name)
        for warning in warnings:
            typer.echo(f"warning: {warning}", err=True)
        emit({"tier": name, "kind": tier.kind, "done": done.splitlines(), "warnings": warnings}, as_json, done)
    except errors.ApplianceError as exc:
        raise _fail(exc) from None


def same_filesystem_warnings(cfg: Config, name: str) -> list[str]:
    """A nearline volume on the filesystem of an online volume or of the index is most often a NAS that is not
    mounted (its empty mount point lies on the local disk): say so, since the appliance would fill that disk."""
    tier = cfg.tier(name)
    if tier is None or tier.kind != "nearline":
        return []
    local = {"the index": cfg.storage.index_path, **{f"online volume {v.name}": v.path for v in cfg.volumes}}
    devices: dict[int, str] = {}
    for what, path in local.items():
        try:
            devices.setdefault(os.stat(path).st_dev, what)
        except OSError:
            continue
    out = []
    for vc in tier.volumes:
        try:
            dev = os.stat(vc.path).st_dev
        except OSError:
            continue
        if dev in devices:
            out.append(f"nearline volume {vc.name} ({vc.path}) is on the same filesystem as {devices[dev]}. If a NAS "
                       f"should be mounted there, it is not (check `findmnt --target {vc.path}`): unmounted, the "
                       "tier would fill the local disk")
    return out


def _nearline_volume_errors(cfg: Config) -> dict[tuple[str, str], str]:
    """(tier, volume) -> why a nearline volume cannot be used (not mounted, another tier's), for `tier status`."""
    from tiering.nearline import NearlineVolume

    out = {}
    for tier in cfg.tiers:
        for vc in tier.volumes if tier.kind == "nearline" else ():
            try:
                NearlineVolume(tier.name, vc).check()
            except errors.VolumeError as exc:
                out[(tier.name, vc.name)] = str(exc)
    return out


def status_data(cfg: Config, index: StudyIndex) -> dict[str, Any]:
    from appliance.config_tiering import ONLINE_TIER
    from tiering.run import Tiers

    per_tier: dict[str, dict[str, int]] = {}
    for facts in index.study_facts():
        row = per_tier.setdefault(facts.tier, {"studies": 0, "instances": 0, "bytes": 0, "partly_online": 0})
        row["studies"] += 1
        row["instances"] += facts.instances
        row["bytes"] += facts.bytes
        row["partly_online"] += facts.partly_online
    tiers = Tiers.open(cfg)
    try:
        usage = tiers.usage()
    finally:
        tiers.close()
    kinds = {ONLINE_TIER: "online", **{t.name: t.kind for t in cfg.tiers}}
    volume_errors = _nearline_volume_errors(cfg)
    out_tiers = []
    for name, kind in kinds.items():
        counts = per_tier.get(name, {"studies": 0, "instances": 0, "bytes": 0, "partly_online": 0})
        # capacity 0 = no quota (an s3 tier without capacity_bytes): no fill, not "full"
        vols: list[dict[str, Any]] = [{"name": u.name, "used_bytes": u.used_bytes, "capacity_bytes": u.capacity_bytes,
                 "fill": round(u.fill, 4) if u.capacity_bytes else None, "accepting": u.accepting,
                 "error": volume_errors.get((name, u.name), "")} for u in usage.get(name, ())]
        used = sum(u.used_bytes for u in usage.get(name, ()))
        capacity = sum(u.capacity_bytes for u in usage.get(name, ()))
        out_tiers.append({"name": name, "kind": kind, **counts, "used_bytes": used, "capacity_bytes": capacity,
                          "fill": round(used / capacity, 4) if capacity else None, "volumes": vols,
                          "error": tiers.errors.get(name, "")})
    moves = [{"study": k.split("\x00", 1)[1], "policy": m.policy, "from": m.source, "to": m.target,
              "phase": m.phase, "started_ns": m.started_ns} for k, m in index.moves()]
    recalls = [{"study": k.split("\x00", 1)[1], "requested_ns": r.requested_ns, "requested_by": r.requested_by,
                "attempts": r.attempts, "error": r.error} for k, r in index.recalls()]
    return {"tiers": out_tiers, "moves_in_progress": moves, "recalls_queued": recalls}


@tier_app.command("status")
def status(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Bytes, studies, instances and fill per tier and per volume or cartridge; moves and recalls pending."""
    try:
        cfg = load_cli_config(config)
        with open_index(cfg) as index:
            data = status_data(cfg, index)
    except errors.ApplianceError as exc:
        raise _fail(exc) from None
    rows = []
    for t in data["tiers"]:
        fill = f"{t['fill']:.0%}" if t["fill"] is not None else "-"
        rows.append([t["name"], t["kind"], str(t["studies"]), str(t["instances"]), human_bytes(t["bytes"]),
                     fill, t["error"] or ("" if not t["partly_online"] else f"{t['partly_online']} partly online")])
        for v in t["volumes"]:
            if v["error"]:  # no usage to show: what is there is the empty mount point, not the volume
                rows.append([f"  {v['name']}", "", "", "", "-", "-", "UNAVAILABLE (see below)"])
                continue
            rows.append([f"  {v['name']}", "", "", "", f"{human_bytes(v['used_bytes'])} used",
                         f"{v['fill']:.0%} of {human_bytes(v['capacity_bytes'])}" if v["capacity_bytes"] else "no quota",
                         "" if v["accepting"] else "not accepting"])
    human = _table(["tier", "kind", "studies", "instances", "bytes", "fill", "note"], rows)
    for t in data["tiers"]:
        human += "".join(f"\n{v['error']}" for v in t["volumes"] if v["error"])
    human += f"\nmoves in progress: {len(data['moves_in_progress'])}; recalls queued: {len(data['recalls_queued'])}"
    for m in data["moves_in_progress"]:
        human += (f"\n  move {m['study']} {m['from']} -> {m['to']} ({m['policy']}, since "
                  f"{_utc(m['started_ns'])})")
    for r in data["recalls_queued"]:
        error = f", last error: {r['error']}" if r["error"] else ""
        human += (f"\n  recall {r['study']} (by {r['requested_by']} at {_utc(r['requested_ns'])}, "
                  f"{r['attempts']} attempts{error})")
    emit(data, as_json, human)


def _utc(ns: int) -> str:
    """A time of the index (ns since 1970) as every human output of the CLI writes it: local ISO time to the
    second, with its offset (cli_common.human_ns)."""
    return human_ns(ns)


def _plan_rows(moves: list[PlannedMove]) -> str:
    rows = [[m.policy, m.study_uid, f"{m.source} -> {m.target}", str(m.instances), human_bytes(m.bytes), m.reason]
            for m in moves]
    totals: dict[str, list[int]] = {}
    for m in moves:
        total = totals.setdefault(m.policy, [0, 0])
        total[0] += 1
        total[1] += m.bytes
    lines = [_table(["policy", "study", "move", "instances", "bytes", "reason"], rows)] if rows else []
    for policy, (count, nbytes) in totals.items():
        lines.append(f"{policy}: {count} studies, {human_bytes(nbytes)}")
    lines.append(f"total: {len(moves)} studies, {human_bytes(sum(m.bytes for m in moves))}")
    return "\n".join(lines)


def _move_dict(m: PlannedMove) -> dict[str, Any]:
    return {"study": m.study_uid, "policy": m.policy, "from": m.source, "to": m.target, "instances": m.instances,
            "bytes": m.bytes, "reason": m.reason}


PolicyOpt = Annotated[str | None, typer.Option("--policy", help="Only this policy (by name)")]


@tier_app.command("plan")
def plan(config: ConfigOpt = None, as_json: JsonOpt = False, policy: PolicyOpt = None) -> None:
    """What the policies would move now, per policy, with bytes and the reason."""
    from tiering.run import Tiers, fills, make_plan

    try:
        cfg = load_cli_config(config)
        when = now_ns()
        with open_index(cfg) as index:
            tiers = Tiers.open(cfg)
            try:
                moves = make_plan(cfg, index, fills(tiers.usage()), when, policy)
            finally:
                tiers.close()
    except errors.ApplianceError as exc:
        raise _fail(exc) from None
    data = {"moves": [_move_dict(m) for m in moves], "studies": len(moves), "bytes": sum(m.bytes for m in moves)}
    emit(data, as_json, _plan_rows(moves))


@tier_app.command("run")
def run(
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan with the limits, move nothing")] = False,
    limit: Annotated[str | None, typer.Option(help="At most N studies (500) or this many bytes (20GB)")] = None,
    rate: Annotated[float | None, typer.Option(help="MB/s read+written (overrides tiering.rate_bytes_per_s)")] = None,
    policy: PolicyOpt = None,
) -> None:
    """Finish interrupted moves, then move what the policies plan (whole studies: copy, verify, switch, delete)."""
    from tiering.run import run as run_policies

    try:
        cfg = load_cli_config(config)
        studies_max, bytes_max = parse_limit(limit)
        if rate is not None and rate <= 0:
            raise UsageError("--rate: MB/s, more than 0")
        rate_bytes = int(rate * 1_000_000) if rate is not None else None
        when = now_ns()
        show_bar = not as_json and not dry_run and sys.stdout.isatty()
        with open_index(cfg) as index, _progress(show_bar) as hooks:
            report = run_policies(cfg, index, when, dry_run=dry_run, studies_max=studies_max, bytes_max=bytes_max,
                                  rate_bytes_per_s=rate_bytes, policy_name=policy, hooks=hooks)
    except errors.ApplianceError as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: the studies moved so far are moved (see the audit log); the one being moved stays "
                   "where it was until the next `appliance tier run`, which finishes it first. Nothing is lost.",
                   err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    done = report.resumed + report.results
    data = {**report.counts(), "dry_run": dry_run, "moves": [_move_dict(m) for m in report.planned],
            "results": [{"study": r.study_uid, "policy": r.policy, "from": r.source, "to": r.target,
                         "instances": r.instances, "bytes": r.bytes, "seconds": round(r.seconds, 3),
                         "outcome": r.outcome, "error": r.error, "resumed": r.resumed} for r in done],
            "unavailable_tiers": report.unavailable}
    if dry_run:
        human = "dry run: nothing moved\n" + _plan_rows(report.planned)
    else:
        c = report.counts()
        human = (f"moved {c['moved']} studies ({human_bytes(c['bytes_copied'])} copied), {c['failed']} failed"
                 + (f", {c['resumed']} interrupted moves finished" if c["resumed"] else "")
                 + (f", {c['paused']} paused" if c["paused"] else "")
                 + (f", {c['deleted']} expired studies deleted" if c["deleted"] else ""))
        for r in done:
            if r.outcome not in ("moved", "vanished", "paused", "deleted"):  # paused: one line per tier below
                human += f"\n  {r.outcome}: {r.study_uid} {r.source} -> {r.target}: {r.error}"
    for name, error in report.unavailable.items():
        human += f"\n  tier {name} unavailable: {error}"
    data["retention_refused"] = report.retention_refused
    if report.retention_refused and not as_json:  # --json: in the output (retention_refused), as errors are
        typer.echo(f"error: {report.retention_refused}", err=True)
    if data["audit_lost"]:  # the deletes stand (durable first); their audit lines are missing
        typer.echo(f"warning: {data['audit_lost']} retention delete(s) done, but their audit lines were not written "
                   f"(appliance_audit_dropped_total; see the log)", err=True)
    for name, error in report.paused.items():
        human += (f"\n  paused: tier {name} cannot be used now ({error}); its moves wait, nothing is lost: run "
                  "`appliance tier run` again once it is back (the server's schedule does)")
    data["paused_tiers"] = report.paused
    emit(data, as_json, human)
    if data["failed"] or report.retention_refused:
        raise typer.Exit(errors.EXIT_FAILURE)
    if report.paused:
        raise typer.Exit(errors.EXIT_UNAVAILABLE)


@contextmanager
def _progress(show: bool) -> Iterator[Any]:
    from tiering.run import RunHooks

    if not show:
        yield RunHooks()
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn()) as bar:
        task = bar.add_task("moving", total=None)
        studies = [0, 0]

        def planned(moves: list[PlannedMove]) -> None:
            studies[1] = len(moves)
            bar.update(task, total=sum(m.bytes for m in moves), description=f"moving 0/{len(moves)} studies")

        def study_done(_result: Any) -> None:
            studies[0] += 1
            bar.update(task, description=f"moving {studies[0]}/{studies[1]} studies")

        yield RunHooks(planned=planned, study_done=study_done, copied=lambda n: bar.advance(task, n))
