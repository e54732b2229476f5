"""``appliance tape list|label|load|eject|verify``: the cartridges of a tape tier (docs/tiering.md "Tape tier").

Exit codes as in cli.py: 0 ok, 1 failure (verify found problems, label refused), 3 no such cartridge or tier,
69 the drive or library unavailable, 78 configuration error."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from appliance import errors
from appliance.cli_common import emit, human_bytes, load_cli_config
from appliance.config import Config
from appliance.config_tiering import TierConfig

if TYPE_CHECKING:
    from tiering.tape.backend import TapeBackend

tape_app = typer.Typer(no_args_is_help=True, help="Tape cartridges: list, label, load, eject, verify.")


@tape_app.callback()
def _private_files() -> None:
    """Cartridge files hold patient data: 0600/0700 whatever the shell's umask, as the server does."""
    os.umask(0o077)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config (default: $APPLIANCE_CONFIG, ./appliance.toml, built-in)"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output")]
TierOpt = Annotated[str | None, typer.Option("--tier", help="The tape tier (needed when several are configured)")]


def _fail(exc: errors.ApplianceError) -> errors.ApplianceError:
    """Raised as is: cli_common.RootGroup prints it (one line, or JSON with --json) and exits with its code."""
    return exc


def _tape_tier(cfg: Config, name: str | None) -> TierConfig:
    tapes = [t for t in cfg.tiers if t.kind == "tape"]
    if name is not None:
        tier = cfg.tier(name)
        if tier is None or tier.kind != "tape":
            raise errors.NotFound(f"no tape tier {name!r} (tape tiers: {', '.join(t.name for t in tapes) or 'none'})")
        return tier
    if not tapes:
        raise errors.NotFound("no tape tier configured ([[tiers]] kind = \"tape\")")
    if len(tapes) > 1:
        raise errors.ConfigError(f"several tape tiers ({', '.join(t.name for t in tapes)}): choose one with --tier")
    return tapes[0]


def _backend(config: Path | None, tier_name: str | None) -> tuple[Config, TapeBackend]:
    from tiering.tape.backend import open_tape

    cfg = load_cli_config(config)
    return cfg, open_tape(_tape_tier(cfg, tier_name))


def _size(n: int) -> str:
    return "?" if n < 0 else human_bytes(n)


@tape_app.command("list")
def list_cartridges(config: ConfigOpt = None, tier: TierOpt = None, as_json: JsonOpt = False) -> None:
    """Cartridges with label, slot, whether loaded, used/capacity and archives."""
    try:
        _cfg, backend = _backend(config, tier)
        cartridges = backend.library.cartridges()
    except errors.ApplianceError as exc:
        raise _fail(exc) from None
    rows = [{"label": c.label, "slot": c.slot, "loaded": c.loaded, "used_bytes": c.used_bytes,
             "capacity_bytes": c.capacity_bytes, "archives": c.archives, "labelled": c.labelled}
            for c in cartridges]
    lines = [f"{'LABEL':<10} {'SLOT':>4} {'DRIVE':<6} {'USED':>10} {'CAPACITY':>10} {'ARCHIVES':>8}"]
    for c in cartridges:
        lines.append(f"{c.label:<10} {'-' if c.slot is None else c.slot:>4} {'loaded' if c.loaded else '':<6} "
                     f"{_size(c.used_bytes):>10} {_size(c.capacity_bytes):>10} "
                     f"{c.archives if c.archives >= 0 else '?':>8}{'' if c.labelled else '  (blank)'}")
    emit({"tier": backend.name, "cartridges": rows}, as_json, "\n".join(lines))


@tape_app.command()
def label(
    cartridge: Annotated[str, typer.Argument(help="The cartridge's barcode, e.g. VTL001L6")],
    config: ConfigOpt = None,
    tier: TierOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Relabel a cartridge that holds archives (they are "
                                                        "erased)")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write the tier's label (tape file 0) on a blank cartridge; one holding archives only with --force."""
    from tiering.tape.library import VolumeLabel, check_barcode

    try:
        cfg, backend = _backend(config, tier)
        check_barcode(cartridge)
        known = {c.label: c for c in backend.library.cartridges()}
        info = known.get(cartridge)
        if info is None and known:
            raise errors.NotFound(f"no cartridge {cartridge} in tape tier {backend.name}")
        # A blank cartridge in a drive (st, LTFS) is known by no label yet: use whatever is loaded.
        with backend.library.session(cartridge if info is not None else None) as drive:
            existing = backend.library.read_label(drive)
            drive.position_file(0)
            foreign = existing is None and bool(drive.read(drive.block_bytes))  # data, but not our label
            try:  # an archive after the label (virtual cartridges also count them; st and LTFS only so)
                drive.position_file(1)
                foreign = foreign or bool(drive.read(drive.block_bytes))
            except errors.ApplianceError:
                pass  # no tape file 1: nothing was written after the label
            has_data = (bool(info and info.archives > 0) or foreign
                        or (existing is not None and existing.tier != backend.name))
            if has_data and not force:
                owner = f" of tier {existing.tier}" if existing else ""
                raise errors.ApplianceError(f"cartridge {cartridge}{owner} holds data; relabelling erases it "
                                            "(use --force)")
            named = _named_copies(cfg, backend.name, cartridge) if has_data else 0
            if named:  # even with --force: a study whose only copy is there would be lost
                raise errors.ApplianceError(f"cartridge {cartridge}: the index names {named} cop(ies) on it; "
                                            "relabelling would lose them (recall or move those studies first)")
            backend.library.write_label(drive, VolumeLabel(cartridge, backend.name))
    except errors.ApplianceError as exc:
        raise _fail(exc) from None
    emit({"label": cartridge, "tier": backend.name, "erased": has_data}, as_json,
         f"{cartridge}: labelled for tape tier {backend.name}" + (" (its archives were erased)" if has_data else ""))


@tape_app.command()
def load(
    cartridge: Annotated[str, typer.Argument(help="The cartridge's barcode")],
    config: ConfigOpt = None,
    tier: TierOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Move a cartridge from its slot into the drive (the one there goes back to its slot)."""
    try:
        _cfg, backend = _backend(config, tier)
        backend.library.load(cartridge)
    except errors.ApplianceError as exc:
        raise _fail(exc) from None
    emit({"loaded": cartridge}, as_json, f"{cartridge} loaded")


@tape_app.command()
def eject(config: ConfigOpt = None, tier: TierOpt = None, as_json: JsonOpt = False) -> None:
    """Rewind and move the cartridge in the drive back to its slot."""
    try:
        _cfg, backend = _backend(config, tier)
        ejected = backend.library.eject()
    except errors.ApplianceError as exc:
        raise _fail(exc) from None
    emit({"ejected": ejected}, as_json, f"{ejected} ejected" if ejected else "the drive was empty")


@tape_app.command()
def verify(
    cartridge: Annotated[str, typer.Argument(help="The cartridge's barcode")],
    config: ConfigOpt = None,
    tier: TierOpt = None,
    index: Annotated[bool, typer.Option("--index", help="Also check every copy the index names on it")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Read every archive of a cartridge, re-hash each member and check it against the catalog on tape (and the
    index). Exit 1 when anything does not match."""
    from tiering.tape.verify import verify_cartridge

    try:
        cfg, backend = _backend(config, tier)
        copies: list[tuple[str, str]] | None = None
        if index:
            copies = _index_copies(cfg, backend.name)
        report = verify_cartridge(backend, cartridge, copies)
    except errors.ApplianceError as exc:
        raise _fail(exc) from None
    data = {"label": report.label, "archives": report.archives, "members": report.members,
            "bytes_read": report.bytes_read, "index_copies": report.index_copies, "ok": report.ok,
            "findings": [{"where": f.where, "problem": f.problem} for f in report.findings]}
    lines = [f"{report.label}: {report.archives} archive(s), {report.members} member(s), "
             f"{_size(report.bytes_read)} read" + (f", {report.index_copies} index cop(ies) checked" if index else "")
             + (": OK" if report.ok else f": {len(report.findings)} problem(s)")]
    lines += [f"  {f.where}: {f.problem}" for f in report.findings]
    emit(data, as_json, "\n".join(lines))
    if not report.ok:
        raise typer.Exit(errors.EXIT_FAILURE)


def _named_copies(cfg: Config, backend_name: str, cartridge: str) -> int:
    """How many copies the index names in the archives of ``cartridge`` (0 without an index)."""
    from appliance.index.db import StudyIndex

    if not (cfg.storage.index_path / "data.mdb").exists():
        return 0
    db = StudyIndex(cfg.storage.index_path, cfg.storage.index_map_size)
    try:
        return sum(c.live_records for c in db.containers(backend_name) if c.name.startswith(cartridge + "/"))
    finally:
        db.close()


def _index_copies(cfg: Config, backend_name: str) -> list[tuple[str, str]]:
    from appliance.index.db import StudyIndex

    if not (cfg.storage.index_path / "data.mdb").exists():
        raise errors.NotFound(f"no index at {cfg.storage.index_path}")
    db = StudyIndex(cfg.storage.index_path, cfg.storage.index_map_size)
    try:
        return [(digest, copy.location) for digest, blob in db.blobs() for copy in blob.copies
                if copy.backend == backend_name]
    finally:
        db.close()
