"""`appliance audit`: read the audit trail (appliance/audit.py), the rotated files and the current one in time
order, filtered. Streams line by line: memory is bounded by --limit (the last N matches are kept), never by the
size of the trail. ``register(app)`` adds the command (cli.py owns the app)."""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

from appliance import errors
from appliance.cli_common import load_cli_config
from appliance.config import Config

_RELATIVE = re.compile(r"^(\d+)\s*([smhdw])$")
_ALERTS = {"DCM 110126": "node-authentication", "DCM 110132": "restricted-function"}
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """"2h", "7d", "30m" (that long ago) or an ISO 8601 date or time (local time unless it names its zone)."""
    now = now or datetime.now(UTC)
    match = _RELATIVE.match(text.strip())
    if match:
        return now - timedelta(**{_UNITS[match[2]]: int(match[1])})
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r}: an ISO date or time (2026-11-26, 2026-11-26T08:00) or 2h, 7d, 30m") \
            from None
    if when.tzinfo is None:
        when = when.astimezone()  # naive: the operator's local time
    return when.astimezone(UTC)


def trail_files(path: Path) -> list[Path]:
    """The rotated files, oldest first (path.N ... path.1), then the current one."""
    rotated = []
    for candidate in path.parent.glob(path.name + ".*"):
        suffix = candidate.name[len(path.name) + 1:]
        if suffix.isdigit():
            rotated.append((int(suffix), candidate))
    files = [p for _n, p in sorted(rotated, reverse=True)]
    if path.exists():
        files.append(path)
    return files


def read_trail(path: Path, since: datetime | None = None) -> Iterator[dict[str, Any]]:
    """Every line of the trail, oldest file first; files last written before ``since`` are skipped unread. A
    line that is not JSON (a crash cut it short) is skipped."""
    for file in trail_files(path):
        try:
            if since is not None and datetime.fromtimestamp(file.stat().st_mtime, UTC) < since:
                continue
            with file.open("rb") as stream:
                for raw in stream:
                    try:
                        line = json.loads(raw)
                    except ValueError:
                        continue
                    if isinstance(line, dict):
                        yield line
        except FileNotFoundError:  # rotated away while we read: its lines are in the next name
            continue


def line_time(line: dict[str, Any]) -> datetime | None:
    try:
        return datetime.fromisoformat(str(line.get("time", "")))
    except ValueError:
        return None


def select(lines: Iterator[dict[str, Any]], since: datetime | None = None, until: datetime | None = None,
           events: list[str] | None = None, peer: str | None = None, study: str | None = None,
           outcome: str | None = None) -> Iterator[dict[str, Any]]:
    for line in lines:
        if events and line.get("event") not in events:
            continue
        if peer is not None and line.get("peer_ae") != peer and line.get("destination_ae") != peer:
            continue
        if study is not None and line.get("study_uid") != study:
            continue
        if outcome is not None and (line.get("outcome") == 0) != (outcome == "success"):
            continue
        if since is not None or until is not None:
            when = line_time(line)
            if when is None or (since is not None and when < since) or (until is not None and when >= until):
                continue
        yield line


def human(line: dict[str, Any]) -> str:
    when = line_time(line)
    stamp = when.astimezone().isoformat(timespec="seconds") if when else "?"  # as every human time of the CLI
    peer = line.get("peer_ae") or "-"
    if line.get("peer_address"):
        peer += f"@{line['peer_address']}"
    if line.get("destination_ae"):
        peer += f" -> {line['destination_ae']}"
    counts = []
    for key in ("instances", "failed", "matches"):
        if line.get(key) is not None:
            counts.append(f"{key}={line[key]}")
    if line.get("from_tier") or line.get("to_tier"):
        counts.append(f"{line.get('from_tier') or '?'}->{line.get('to_tier') or '?'}")
    detail = line.get("result") or _ALERTS.get(line.get("alert_type") or "", "") or line.get("level") or ""
    if line.get("right"):
        detail += f" ({line['right']})"
    elif line.get("reason"):
        detail += f" ({line['reason']})"
    result = "ok" if line.get("outcome") == 0 else f"FAILED({line.get('outcome')})"
    return (f"{stamp}  {line.get('event', '?'):<14} {peer:<28} {line.get('study_uid') or '-':<40} "
            f"{' '.join(counts):<24} {detail} {result}").rstrip()


def register(app: typer.Typer) -> None:
    @app.command("audit")
    def audit(
        config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML config")] = None,
        since: Annotated[str | None, typer.Option(help="From: ISO date/time (local) or 2h, 7d ago")] = None,
        until: Annotated[str | None, typer.Option(help="Before: ISO date/time (local) or 2h, 7d ago")] = None,
        event: Annotated[list[str] | None, typer.Option(help="Only this event (repeat for several): store, "
                                                        "query, retrieve, move, association, security_alert, ...")]
        = None,
        peer: Annotated[str | None, typer.Option(help="Only lines naming this AE title (requester or destination)")]
        = None,
        study: Annotated[str | None, typer.Option(help="Only this Study Instance UID")] = None,
        outcome: Annotated[str | None, typer.Option(help="success or failure")] = None,
        limit: Annotated[int | None, typer.Option(min=1, help="Only the last N matching lines")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="JSON lines, as written")] = False,
    ) -> None:
        """Show the audit trail (the config's audit section): one line per association, per study stored, queried,
        retrieved, moved, migrated, recalled or deleted, and per security alert."""
        if outcome is not None and outcome not in ("success", "failure"):
            raise typer.BadParameter("success or failure", param_hint="--outcome")
        try:
            cfg: Config = load_cli_config(config)
        except errors.ApplianceError as exc:
            raise exc from None  # cli_common.RootGroup: one line (JSON with --json) and its exit code
        if cfg.audit.destination != "file":
            hint = ("it is in the journal: journalctl -t appliance-audit -o cat"
                    if cfg.audit.destination == "journald" else "nothing is recorded")
            raise errors.NotFound(f"audit.destination is {cfg.audit.destination!r}: {hint}")
        start = parse_when(since) if since else None
        end = parse_when(until) if until else None
        lines = select(read_trail(cfg.audit.path, start), start, end, event, peer, study, outcome)
        out: Iterator[dict[str, Any]] = iter(deque(lines, maxlen=limit)) if limit else lines
        for line in out:
            typer.echo(json.dumps(line, separators=(",", ":"), ensure_ascii=False) if as_json else human(line))
