"""What every CLI command shares (cli.py, cli_scu.py): finding the config file and printing a result, human or
JSON. Kept apart so that the command modules do not import each other."""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from typer.core import TyperGroup

from appliance import errors
from appliance.config import Config, load_config

if TYPE_CHECKING:
    from appliance.index.db import StudyIndex


@contextmanager
def open_index(cfg: Config) -> Iterator[StudyIndex]:
    """The existing index (NotFound if the appliance never ran), closed on the way out. Opened read-write: LMDB
    lets a second process read while the server writes, and a read-only open cannot create the lock file. Synced
    as the config says (the commands that write: delete, hold, tier run)."""
    from appliance.index.db import StudyIndex

    if not (cfg.storage.index_path / "data.mdb").exists():
        raise errors.NotFound(f"no index at {cfg.storage.index_path} (has the appliance run yet?)")
    index = StudyIndex(cfg.storage.index_path, cfg.storage.index_map_size, sync=cfg.storage.fsync)
    try:
        yield index
    finally:
        index.close()


def load_cli_config(path: Path | None) -> Config:
    """``-c FILE``, else $APPLIANCE_CONFIG, else ./appliance.toml, else the built-in defaults."""
    if path is None:
        env = os.environ.get("APPLIANCE_CONFIG")
        if env:
            path = Path(env)
        elif Path("appliance.toml").is_file():
            path = Path("appliance.toml")
    return load_config(path)


def emit(data: Any, as_json: bool, human: str) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else human)


def human_bytes(n: float) -> str:
    """Decimal units (1 KB = 1000 B), as disks, NAS and LTO cartridges are sold (LTO-6: 2.5 TB): the one format of
    every byte count the CLI prints for people."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"  # pragma: no cover


# ---- one way to fail, for every command (issue 13) ------------------------------------------------------------

def error_line(message: str, exit_code: int, as_json: bool) -> None:
    """A failure as one line: ``error: ...`` on stderr, or with ``--json`` ``{"error": ..., "exit": N}`` on stdout
    (where a script reading ``--json`` output already looks), nothing on stderr."""
    if as_json:
        typer.echo(json.dumps({"error": message, "exit": exit_code}, ensure_ascii=False))
    else:
        typer.echo(f"error: {message}", err=True)


def os_error_message(exc: OSError) -> str:
    """``[Errno 13] Permission denied: 'x'`` as a person reads it: ``x: permission denied``."""
    what = (exc.strerror or str(exc)).rstrip(".")
    what = what[:1].lower() + what[1:]
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    return f"{' -> '.join(names)}: {what}" if names else what


def os_error_exit(exc: OSError) -> int:
    return errors.EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else errors.EXIT_FAILURE


# click's UsageError, whichever click typer runs on (recent typer vendors its own copy as a private module).
_USAGE_ERROR: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class RootGroup(TyperGroup):
    """The safety net of the whole console: an ApplianceError or OSError that a command did not turn into its own
    message ends as one line and the error's exit code (errors.py), never a traceback; with ``--json`` anywhere on
    the command line, as JSON. A usage error (exit 2) keeps click's text, or is JSON too with ``--json``. Any
    other exception is a bug: its traceback is kept, to be reported."""

    def invoke(self, ctx: Any) -> Any:  # click.Context of the click typer runs on (vendored or not)
        as_json = "--json" in (*ctx._protected_args, *ctx.args)
        try:
            return super().invoke(ctx)
        except errors.ApplianceError as exc:
            error_line(str(exc), exc.exit_code, as_json)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                raise  # `appliance ls | head`: click leaves quietly, as a pipe's reader expects
            error_line(os_error_message(exc), os_error_exit(exc), as_json)
            raise typer.Exit(os_error_exit(exc)) from None
        except _USAGE_ERROR as exc:
            if not as_json:
                raise
            error_line(exc.format_message(), errors.EXIT_USAGE, True)  # type: ignore[attr-defined]
            raise typer.Exit(errors.EXIT_USAGE) from None


# ---- arguments --------------------------------------------------------------------------------------------------

UID_MAX = 256  # PS3.5 9.1 says 64; what a broken modality sent is still found, up to what the index can key


def check_uid(value: Any) -> Any:
    """A typer callback for UID arguments and options (one or a list): an empty or absurdly long value is refused
    as a usage error, before it reaches the index (whose keys it cannot be)."""
    for uid in value if isinstance(value, list) else [value]:
        if uid is not None and (not uid.strip() or len(uid.encode()) > UID_MAX):
            raise typer.BadParameter(f"{uid[:70]!r}{'...' if len(uid) > 70 else ''} is not a UID")
    return value


# ---- human units and times --------------------------------------------------------------------------------------

def human_ns(ns: int) -> str:
    """A time stamp in nanoseconds since the epoch as local ISO time to the second (0: never)."""
    if not ns:
        return "never"
    return datetime.fromtimestamp(ns / 1e9).astimezone().isoformat(timespec="seconds")


def human_key(key: str) -> str:
    """The label of a humanized field: ``received_ns`` shows as ``received``."""
    return key[:-3] if key.endswith("_ns") else key


def humanize(key: str, value: Any) -> Any:
    """One record field as people read it: ``*_ns`` times as local ISO time, ``size``/``*_bytes`` in decimal units.
    Raw values stay in ``--json``."""
    if isinstance(value, int) and not isinstance(value, bool):
        if key.endswith("_ns"):
            return human_ns(value)
        if key in ("size", "Size") or key.endswith("_bytes") or key.endswith("Bytes"):
            return human_bytes(value)
    return value


# ---- DICOM date filters -----------------------------------------------------------------------------------------

_DATE_PART = re.compile(r"^\d{4}(\d{2}(\d{2})?)?$")


def date_range(text: str) -> tuple[str, str]:
    """``--date`` as an inclusive (start, end) of YYYYMMDD strings. DICOM range matching (PS3.4 C.2.2.2.5):
    ``A``, ``A-B``, ``A-``, ``-B``, where each of A and B may also be a year (YYYY) or a month (YYYYMM), taken
    as the whole year or month. Anything else is refused (a usage error), never answered with nothing."""
    start, dash, end = text.strip().partition("-")
    if not dash:
        end = start
    if not (start or end) or any(p and not _DATE_PART.match(p) for p in (start, end)):
        raise typer.BadParameter(f"{text!r}: YYYY, YYYYMM or YYYYMMDD, or a range of them (A-B, A-, -B)",
                                 param_hint="--date")
    first = (start + "0101"[len(start) - 4:]) if start else "00000000"
    last = (end + "1231"[len(end) - 4:]) if end else "99999999"
    for part in (start, end):
        try:
            if part:
                datetime.strptime(part, {4: "%Y", 6: "%Y%m", 8: "%Y%m%d"}[len(part)])
        except ValueError:
            raise typer.BadParameter(f"{text!r}: {part} is not a date", param_hint="--date") from None
    return first, last
