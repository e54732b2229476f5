"""What every CLI command shares (cli.py, cli_scu.py): finding the config file and printing a result, human or
JSON. Kept apart so that the command modules do not import each other."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer

from appliance.config import Config, load_config


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
