"""The one console command: ``appliance serve|init|status|ls|show|export|verify|compact|index|volume``, and the SCU
commands ``echo|find|move|get`` (cli_scu.py).

Human output by default, ``--json`` for scripts. Exit codes (appliance/errors.py): 0 ok, 1 failure (or
verify found problems), 2 usage, 3 not found, 66 a configured volume refused (missing, no marker, another's),
69 unavailable (the index locked...), 78 configuration error.
A failure is one line (``error: ...`` on stderr; with ``--json`` ``{"error": ..., "exit": N}`` on stdout): see
cli_common.RootGroup, the safety net every command runs under.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from appliance import cli_audit, cli_bench, cli_delete, cli_recall, cli_scu, cli_tape, errors
from appliance.cli_common import (
    RootGroup,
    check_uid,
    date_range,
    emit,
    human_bytes,
    human_key,
    humanize,
    load_cli_config,
    open_index,
)
from appliance.cli_tier import tier_app
from appliance.config import DEFAULT_CONFIG_TOML, Config, load_config

if TYPE_CHECKING:
    from appliance.index.db import StudyIndex
    from appliance.store.online import BlobStore
    from appliance.store.rebuild import RebuildStats

# A bug's traceback shows no local variables: they could hold patient data (a dataset, a C-FIND identifier).
app = typer.Typer(cls=RootGroup, add_completion=False, no_args_is_help=True, help="DICOM storage appliance.",
                  pretty_exceptions_show_locals=False)
index_app = typer.Typer(no_args_is_help=True, help="Index maintenance.")
volume_app = typer.Typer(no_args_is_help=True, help="Volume maintenance.")
app.add_typer(index_app, name="index")
app.add_typer(volume_app, name="volume")
app.add_typer(cli_bench.bench_app, name="bench")  # appliance/cli_bench.py
app.add_typer(tier_app, name="tier")
app.add_typer(cli_tape.tape_app, name="tape")

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config (default: $APPLIANCE_CONFIG, ./appliance.toml, built-in)"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output")]


_config = load_cli_config


def _fail(exc: errors.ApplianceError) -> errors.ApplianceError:
    """Raised as is: RootGroup prints it (one line, or JSON with --json) and exits with its code."""
    return exc


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"appliance {version('dicom-appliance')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit")] = False,
) -> None:
    """DICOM storage appliance."""


_emit = emit


@app.command()
def serve(
    config: ConfigOpt = None,
    port_file: Annotated[Path | None, typer.Option(help="Write {port, tls_port, metrics_port, pid} here once ready")] = None,
) -> None:
    """Run the DICOM storage SCP (and /metrics) until SIGTERM/SIGINT."""
    from appliance.server import serve as run

    try:
        cfg = _config(config)
        raise typer.Exit(run(cfg, port_file))
    except errors.ApplianceError as exc:
        raise _fail(exc) from None


@app.command()
def init(
    path: Annotated[Path, typer.Option("--config", "-c", help="Where to write the config")] = Path("appliance.toml"),
    force: Annotated[bool, typer.Option(help="Overwrite an existing config file")] = False,
    data_dir: Annotated[Path | None, typer.Option(
        help="Put every data path (index, volume, commitments, audit) under this folder, absolute; "
             "default: ./var beside the config (refused for a config under /etc)")] = None,
    config_only: Annotated[bool, typer.Option(
        help="Write the config only; create no volume or index (make install: the service user does that)")] = False,
) -> None:
    """Write a commented default config, and initialise its volumes and index."""
    from appliance.config_template import config_for_data_dir
    from appliance.index.db import StudyIndex
    from appliance.store.volumes import init_volume

    if path.exists() and not force:
        typer.echo(f"error: {path} exists (use --force to overwrite)", err=True)
        raise typer.Exit(errors.EXIT_USAGE)
    if data_dir is None and path.resolve().is_relative_to("/etc"):
        # Relative data paths are taken from the config's folder: /etc/appliance/var/... is not where data goes
        # (and the unit makes /etc read-only for the service).
        typer.echo(f"error: {path} is under /etc: give --data-dir (e.g. --data-dir /var/lib/appliance) so that the "
                   "data does not go next to the config", err=True)
        raise typer.Exit(errors.EXIT_USAGE)
    text = DEFAULT_CONFIG_TOML if data_dir is None else config_for_data_dir(str(data_dir.absolute()))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        cfg = load_config(path)
        if not config_only:
            for vc in cfg.volumes:
                init_volume(vc.path, vc.name)
            StudyIndex(cfg.storage.index_path, cfg.storage.index_map_size).close()
    except OSError as exc:
        raise _fail(errors.ApplianceError(f"{path}: {exc.strerror or exc}")) from None
    except errors.ApplianceError as exc:
        raise _fail(exc) from None
    if config_only:
        typer.echo(f"wrote {path} (data under {cfg.storage.index_path.parent}); nothing else created")
        return
    typer.echo(f"wrote {path}; volumes and index initialised. Start with: appliance serve -c {path}")


@volume_app.command("init")
def volume_init(
    path: Path,
    name: Annotated[str | None, typer.Option(
        help="Volume name; default: the [[volumes]] name of PATH in the config (required when PATH is not in it)")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Mark a folder (a mounted filesystem) as a volume, so the appliance will write into it."""
    from appliance.store.volumes import init_volume

    try:
        cfg = _config(config)
        target = path.absolute().resolve()
        configured = [vc.name for vc in cfg.volumes if vc.path.absolute().resolve() == target]
        if configured and name is not None and name != configured[0]:
            raise errors.ConfigError(f"{path} is volume {configured[0]!r} in the config, not {name!r}: drop --name "
                                     "or change [[volumes]]")
        if not configured and name is None:
            raise errors.ConfigError(f"{path} is not a [[volumes]] path of the config: give -c CONFIG (the one "
                                     "that lists it) or --name")
        name = name or configured[0]
        volume_id = init_volume(path, name)
    except errors.ApplianceError as exc:
        raise _fail(exc) from None
    typer.echo(f"{path}: volume {name} ({volume_id})")


@app.command()
def status(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Volumes (attached, free, fill), instance counts, index size, the peers and their rights."""
    from appliance.store.volumes import MARKER, volume_problem

    try:
        cfg = _config(config)
        vols = []
        for vc in cfg.volumes:
            # "why" says what stops a volume from taking writes, so that status never shows a refused one as fine.
            why = volume_problem(vc)
            refused = bool(why)
            if cfg.volumes_builtin and not vc.path.exists():  # `make run` before its first start: not a fault
                why, refused = "not created yet: serve creates the built-in default volume at its first start", False
            entry: dict[str, Any] = {"name": vc.name, "path": str(vc.path), "high_watermark": vc.high_watermark,
                                     "attached": (vc.path / MARKER).is_file(), "refused": refused}
            if vc.path.exists():
                st = os.statvfs(vc.path)
                total = st.f_blocks * st.f_frsize
                entry.update(free_bytes=st.f_bavail * st.f_frsize, size_bytes=total,
                             fill=round(1 - st.f_bavail / max(1, st.f_blocks), 4))
                if not why and entry["fill"] >= vc.high_watermark:
                    why = f"{entry['fill'] * 100:.1f}% full, at or above its high watermark {vc.high_watermark:.0%}"
            entry["accepting"] = not why
            entry["why"] = why
            vols.append(entry)
        counts: dict[str, int] = {}
        if (cfg.storage.index_path / "data.mdb").exists():
            with open_index(cfg) as index:
                counts = index.counts()
        data = {"ae_title": cfg.server.ae_title, "port": cfg.server.port, "volumes": vols, "counts": counts,
                "index_path": str(cfg.storage.index_path), "peers": cli_scu.peer_rows(cfg),
                "unknown_peer_rights": list(cfg.server.unknown_peer_rights),
                "refuse_unknown_calling_ae": cfg.server.refuse_unknown_calling_ae}
    except errors.ApplianceError as exc:
        raise _fail(exc) from None
    lines = [f"AE {cfg.server.ae_title} on port {cfg.server.port}; index {cfg.storage.index_path}"]
    for v in vols:
        state = "accepting" if v["accepting"] else f"NOT ACCEPTING: {v['why']}"
        fill = f"{v['fill'] * 100:.1f}% used, {v['free_bytes'] / 1e9:.1f} GB free" if "fill" in v else "missing"
        lines.append(f"  volume {v['name']:<10} {v['path']}  {fill}  [{state}]")
    lines.append("  " + ", ".join(f"{n} {k}" for k, n in counts.items()) if counts else "  index empty")
    lines += cli_scu.describe_peers(cfg, data["peers"])
    _emit(data, as_json, "\n".join(lines))
    if any(v["refused"] for v in vols):  # serve would refuse to start (missing, detached, another's marker)
        raise typer.Exit(errors.EXIT_UNAVAILABLE)


LS_COLUMNS = {
    "patients": ("PatientID", "PatientName", "PatientBirthDate", "NumberOfStudies", "NumberOfInstances"),
    "studies": ("StudyInstanceUID", "PatientID", "StudyDate", "AccessionNumber", "ModalitiesInStudy",
                "NumberOfSeries", "NumberOfInstances", "StudyDescription"),
    "series": ("SeriesInstanceUID", "Modality", "SeriesNumber", "NumberOfInstances", "SeriesDescription"),
    "instances": ("SOPInstanceUID", "InstanceNumber", "SOPClassUID", "TransferSyntaxUID", "size", "InstanceAvailability"),
}


@app.command("ls")
def ls(
    level: Annotated[str, typer.Argument(help="patients | studies | series | instances")],
    config: ConfigOpt = None,
    patient_id: Annotated[str | None, typer.Option(help="PatientID")] = None,
    accession: Annotated[str | None, typer.Option(help="AccessionNumber")] = None,
    date: Annotated[str | None, typer.Option(help="StudyDate: YYYY, YYYYMM or YYYYMMDD, or a range A-B, A-, -B")]
    = None,
    study: Annotated[str | None, typer.Option(help="Study Instance UID", callback=check_uid)] = None,
    series: Annotated[str | None, typer.Option(help="Series Instance UID (for series and instances)",
                                               callback=check_uid)] = None,
    modality: Annotated[str | None, typer.Option(help="Modality (patients, studies: in a study; series, "
                                                 "instances: of the series)")] = None,
    limit: Annotated[int, typer.Option(min=0, help="At most this many rows (0 = all)")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """List patients, studies, series or instances, with filters that use the secondary indexes."""
    if level not in LS_COLUMNS:
        raise typer.BadParameter(f"level must be one of {', '.join(LS_COLUMNS)}", param_hint="LEVEL")
    if series is not None and level in ("patients", "studies"):
        raise typer.BadParameter(f"applies to series and instances, not {level} (try --study)",
                                 param_hint="--series")
    dates = date_range(date) if date is not None else None
    try:
        cfg = _config(config)
        with open_index(cfg) as index:
            rows = _select(index, level, patient_id, accession, dates, study, series, modality)
    except errors.ApplianceError as exc:
        raise _fail(exc) from None
    if limit:
        rows = rows[:limit]
    if as_json:
        _emit(rows, True, "")
        return
    cols = LS_COLUMNS[level]
    table = [cols] + [tuple(_cell(humanize(c, r.get(c, ""))) for c in cols) for r in rows]
    widths = [min(64, max(len(row[i]) for row in table)) for i in range(len(cols))]
    for row in table:
        typer.echo("  ".join(cell[:64].ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _cell(value: Any) -> str:
    return "\\".join(value) if isinstance(value, list) else str(value)


def _select(index: Any, level: str, patient_id: str | None, accession: str | None, dates: tuple[str, str] | None,
            study: str | None, series: str | None, modality: str | None) -> list[dict[str, Any]]:
    """The rows of ``level`` that pass every filter given (they combine with AND). The study filters go through
    the secondary indexes; patients are those with a matching study; --modality is a study's ModalitiesInStudy
    for patients and studies, the series' Modality for series and instances."""
    from appliance.index.db import SEP

    def public(rec: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in rec.items() if not k.startswith("_")}

    found_sets: list[set[str]] = []
    if patient_id is not None:
        found_sets.append(set(index.studies_by("idx_patientid", patient_id)))
    if accession is not None:
        found_sets.append(set(index.studies_by("idx_accession", accession)))
    if dates is not None:
        found_sets.append(set(index.studies_in_date_range(*dates)))
    if study is not None:
        found = index.lookup(study)
        found_sets.append({found[1]} if found and found[0] == "studies" else set())
    study_keys = set.intersection(*found_sets) if found_sets else None
    if level in ("patients", "studies"):
        pairs = (index.items("studies") if study_keys is None else
                 [p for k in sorted(study_keys) for p in index.items("studies", k) if p[0] == k])
        pairs = [(k, r) for k, r in pairs if modality is None or modality in r.get("ModalitiesInStudy", [])]
        if level == "studies":
            return [public(r) for _, r in pairs]
        if study_keys is None and modality is None:
            return [public(r) for _, r in index.items("patients")]
        wanted = {k.split(SEP, 1)[0] for k, _ in pairs}
        return [public(r) for k, r in index.items("patients") if k in wanted]
    prefixes = [""] if study_keys is None else [k + SEP for k in sorted(study_keys)]
    series_key = None
    if series is not None:
        found = index.lookup(series)
        series_key = found[1] if found and found[0] == "series" else None
        in_studies = series_key is not None and (study_keys is None or series_key.rsplit(SEP, 1)[0] in study_keys)
        prefixes = [series_key + SEP] if series_key is not None and in_studies else []
    if level == "series":
        # The series themselves: the prefix is their study (or the one series' key).
        prefixes = [p[:-len(SEP)] if series_key is not None else p for p in prefixes]
    of_modality: set[str] | None = None
    if level == "instances" and modality is not None:
        # One scan of the series table: it is small next to the instances, and keyed by study, not modality.
        of_modality = {k for k, r in index.items("series") if r.get("Modality") == modality}
    out = []
    for prefix in prefixes:
        for key, rec in index.items("series" if level == "series" else "instances", prefix):
            if level == "series":
                if series_key is not None and key != series_key:
                    continue  # a longer UID that only starts with the one asked for
                if modality is not None and rec.get("Modality") != modality:
                    continue
            elif of_modality is not None and key.rsplit(SEP, 1)[0] not in of_modality:
                continue
            row = public(rec)
            if level == "series":
                row["StudyInstanceUID"] = key.split(SEP)[1]
            out.append(row)
    return out


@app.command()
def show(uid: Annotated[str, typer.Argument(help="Study, Series or SOP Instance UID", callback=check_uid)],
         config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Everything the index holds for a Study, Series or SOP Instance UID."""
    try:
        cfg = _config(config)
        with open_index(cfg) as index:
            found = index.lookup(uid)
        if found is None:
            raise errors.NotFound(f"{uid}: not in the index")
    except errors.ApplianceError as exc:
        raise _fail(exc) from None
    level, _key, record = found
    data = {"level": level, "uid": uid, **{k: v for k, v in record.items() if not k.startswith("_")}}
    _emit(data, as_json, "\n".join(f"{human_key(k):>24}: {_cell(humanize(k, v))}" for k, v in sorted(data.items())))


@app.command()
def export(
    uid: Annotated[str, typer.Argument(help="Study, Series or SOP Instance UID", callback=check_uid)],
    dest: Annotated[Path, typer.Argument(help="Folder to write Part-10 files into")],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Copy the stored Part-10 files (byte for byte) to DEST/<SOPInstanceUID>.dcm.

    Instances on nearline are decompressed on the way; a study on tape is recalled first (waiting up to
    tiering.recall_wait_s; without a running server the recall runs in this process)."""
    from appliance.cli_recall import await_online, queue_recalls
    from appliance.index.db import SEP
    from appliance.index.schema import OFFLINE
    from appliance.store.online import BlobStore
    from tiering.recall import open_tiers

    if dest.exists() and not dest.is_dir():
        raise typer.BadParameter(f"{dest} exists and is not a folder", param_hint="DEST")
    try:
        cfg = _config(config)
        with open_index(cfg) as index:
            instances = index.instances_under(uid)
            if not instances:
                raise errors.NotFound(f"{uid}: not in the index")
            studies = sorted({key.split(SEP)[1] for key, _rec in instances})
            if any(rec.availability == OFFLINE for _key, rec in instances):
                queue_recalls(cfg, index, studies, "export")
                if await_online(cfg, index, studies, cfg.tiering.recall_wait_s):
                    raise errors.Offline()
                instances = index.instances_under(uid)
            index.record_access({study: time.time_ns() for study in studies})
            store = BlobStore.open(cfg, tiers=open_tiers(cfg) if cfg.tiers else None)
            dest.mkdir(parents=True, exist_ok=True)
            written = []
            try:
                for _key, rec in instances:
                    # The file name comes from a UID a peer sent: keep it to what a UID may hold (no path tricks).
                    sop_uid = rec.attrs.get("SOPInstanceUID", rec.digest)
                    safe = sop_uid if sop_uid and all(c.isdigit() or c == "." for c in sop_uid) else rec.digest
                    target = dest / f"{safe}.dcm"
                    _export_one(index, store, rec.digest, target, sop_uid, rec.availability)
                    written.append(str(target))
            finally:
                store.close()
    except errors.ApplianceError as exc:
        raise _fail(exc) from None
    _emit({"exported": written}, as_json, f"exported {len(written)} instance(s) to {dest}")


def _export_one(index: StudyIndex, store: BlobStore, digest: str, target: Path, sop_uid: str = "",
                availability: str = "") -> None:
    """One blob to ``target`` (via a .part file). Its index record is read just before, and once more if its
    copies cannot be read: a `tier run` may have moved the study and deleted the copy the first record named."""
    for attempt in (1, 2):
        blob = index.blob(digest)
        if blob is None:
            raise errors.NotFound(f"blob {digest} is not in the index")
        tmp = target.with_suffix(".dcm.part")
        try:
            with open(tmp, "wb") as fh:
                for chunk in store.open_blob(digest, blob):
                    fh.write(chunk)
        except errors.BlobMissing as exc:
            tmp.unlink(missing_ok=True)  # a copy that failed its digest half-way is never left behind
            if isinstance(exc, errors.Offline) and availability and availability != "OFFLINE":
                # No recall was queued (the index says the study is not on tape): its nearline or online copy
                # cannot be read and what is left is a tape copy.
                raise errors.Offline(f"{sop_uid or digest}: its {availability.lower()} copy cannot be read and its "
                                     "other copy is on tape; nothing was recalled. Is the NAS mounted? (see "
                                     "`appliance tier status`)") from None
            if attempt == 2 or isinstance(exc, errors.Offline) or index.blob(digest) == blob:
                raise
            continue  # the record changed under us (a move switched it): read it again
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, target)
        return


@app.command()
def verify(
    config: ConfigOpt = None,
    tier: Annotated[list[str] | None, typer.Option("--tier", help="Only this tier (repeatable): online or a "
                                                   "[[tiers]] name; default all")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-hash every copy on every tier (nearline and tape: the original bytes, decompressed), rate-limited by
    tiering.scrub_bytes_per_s; check each tier's contents against the index; record each copy's state. Exit 1 if
    anything is missing, corrupt or orphaned."""
    from appliance.store.online import BlobStore
    from tiering.recall import open_tiers
    from tiering.scrub import scrub

    try:
        cfg = _config(config)
        with open_index(cfg) as index:
            store = BlobStore.open(cfg, tiers=open_tiers(cfg) if cfg.tiers else None)
            try:
                report = scrub(cfg, index, store, set(tier) if tier else None)
            finally:
                store.close()
    except errors.ApplianceError as exc:
        raise _fail(exc) from None
    every = list(report.tiers.values())
    # The totals first (the keys `verify --json` always had, for scripts), then per tier.
    data: dict[str, Any] = {
        "ok": report.ok, "checked": sum(t.checked for t in every), "missing": [m for t in every for m in t.missing],
        "corrupt": [c for t in every for c in t.corrupt], "orphans": [o for t in every for o in t.orphans],
        "dead_bytes": sum(t.dead_bytes for t in every), "tiers": {name: {
        "checked": t.checked, "bytes_read": t.bytes_read, "missing": t.missing, "corrupt": t.corrupt,
        "missing_count": t.missing_count, "corrupt_count": t.corrupt_count,
        "orphans": t.orphans, "unnamed": t.unnamed, "dead_bytes": t.dead_bytes, "ok": t.ok}
        for name, t in report.tiers.items()}}
    lines = [f"{'tier':<12} {'copies':>8} {'bytes read':>14} {'missing':>8} {'corrupt':>8} {'orphans':>8}  state"]
    for name, t in report.tiers.items():
        lines.append(f"{name:<12} {t.checked:>8} {human_bytes(t.bytes_read):>14} {t.missing_count:>8} {t.corrupt_count:>8} "
                     f"{len(t.orphans):>8}  {'ok' if t.ok else 'PROBLEMS'}")
    for name, t in report.tiers.items():
        lines += [f"  {name}: missing {m}" for m in t.missing] + [f"  {name}: CORRUPT {c}" for c in t.corrupt]
        lines += [f"  {name}: orphan  {o}" for o in t.orphans]
        if t.dead_bytes:
            lines.append(f"  {name}: {human_bytes(t.dead_bytes)} of dead records awaiting compaction")
    _emit(data, as_json, "\n".join(lines))
    if not report.ok:
        raise typer.Exit(errors.EXIT_FAILURE)


@app.command()
def compact(
    config: ConfigOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the segments that would be compacted")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Reclaim space: rewrite sealed segments whose dead share reaches storage.compaction_dead_ratio.

    Safe while the server runs (copies are rate-limited by storage.compaction_bytes_per_s); a crash at any step
    loses nothing and a later run finishes the job."""
    from appliance.store.compact import compact as run_compact

    try:
        cfg = _config(config)
        with open_index(cfg) as index:
            report = run_compact(cfg, index, dry_run=dry_run)
    except errors.ApplianceError as exc:
        raise _fail(exc) from None
    data = {"dry_run": report.dry_run, "candidates": report.candidates,
            "segments_compacted": report.segments_compacted, "records_moved": report.records_moved,
            "bytes_copied": report.bytes_copied, "bytes_reclaimed": report.bytes_reclaimed}
    lines = [f"  {c['volume']}/{c['segment']}: {human_bytes(int(str(c['size'])))}, {c['live_records']} live records, "
             f"{float(str(c['dead_share'])):.0%} dead" for c in report.candidates]
    head = (f"{len(report.candidates)} segment(s) would be compacted" if dry_run else
            f"compacted {report.segments_compacted} segment(s): {report.records_moved} records moved, "
            f"{human_bytes(report.bytes_copied)} copied, {human_bytes(report.bytes_reclaimed)} reclaimed")
    _emit(data, as_json, "\n".join([head, *lines]))


@index_app.command("rebuild")
def index_rebuild(
    config: ConfigOpt = None,
    into: Annotated[Path | None, typer.Option(help="Build into this new folder instead of replacing the index")]
    = None,
    rehash: Annotated[bool, typer.Option(help="Also check every blob's content against its name")] = False,
    from_tier: Annotated[list[str] | None, typer.Option(
        "--from-tier", help="Also index every blob this tier holds (repeatable): node replacement")] = None,
    online_only: Annotated[bool, typer.Option(help="With [[tiers]] configured: replace the index all the same, "
                                              "knowing that the studies on the tiers not named by --from-tier "
                                              "drop out of it")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Recreate the index from the volumes, and the tiers named by --from-tier (run with the server stopped
    unless --into is given)."""
    try:
        cfg = _config(config)
        named = list(dict.fromkeys(from_tier or []))
        for name in named:
            if cfg.tier(name) is None:
                known = ", ".join(t.name for t in cfg.tiers) or "none"
                raise errors.ConfigError(f"no tier named {name!r} in the config (tiers: {known})")
        left_out = [t.name for t in cfg.tiers if t.name not in named]
        if left_out:
            read = "the online volumes" + "".join(f", {n}" for n in named)
            lost = (f"index rebuild reads {read}, not the tiers {', '.join(left_out)}: the rebuilt index would not "
                    "know the studies moved there (their archives stay, unnamed)"
                    + ("" if named else ", and could list as online moved instances whose dead records compaction "
                       "has not reclaimed yet"))
            if into is None and not online_only:
                raise errors.ConfigError(f"{lost}. Nothing was changed. Rebuild from them too with --from-tier NAME "
                                         "(repeatable), build one to inspect with --into DIR, or replace the index "
                                         "with --online-only if leaving them out is what you want")
            typer.echo(f"warning: {lost}", err=True)
        stats = _rebuild(cfg, into, rehash, named)
    except errors.ApplianceError as exc:
        raise _fail(exc) from None
    tiers = {name: {"blobs": c.blobs, "containers": c.containers, "unreadable": c.unreadable}
             for name, c in stats.tiers.items()}
    data = {"blobs": stats.blobs, "instances": stats.indexed, "unreadable": stats.unreadable,
            "unreadable_count": stats.unreadable_count, "tiers": tiers, "studies_placed": stats.placed,
            "index": str(into or cfg.storage.index_path)}
    more = stats.unreadable_count - len(stats.unreadable)
    _emit(data, as_json, f"indexed {stats.indexed} instance(s) from {stats.blobs} blob(s) into {data['index']}"
          + "".join(f"\n  tier {n}: {c['blobs']} blob(s) in {c['containers']} container(s), "
                    f"{c['unreadable']} unreadable" for n, c in tiers.items())
          + "".join(f"\n  studies on {t}: {n}" for t, n in sorted(stats.placed.items()))
          + "".join(f"\n  unreadable {u}" for u in stats.unreadable)
          + (f"\n  ... and {more} more unreadable" if more > 0 else ""))
    if stats.unreadable_count:
        raise typer.Exit(errors.EXIT_FAILURE)


def _rebuild(cfg: Config, into: Path | None, rehash: bool, from_tiers: list[str]) -> RebuildStats:
    """The rebuild with the named tiers opened (the CLI is the composition root: node layers never import
    tiering). In place, under the mover's lock too: no `tier run` changes the tiers while they are read."""
    from appliance.store.rebuild import rebuild_index, replace_index
    from tiering.run import tiering_lock

    if not from_tiers and not cfg.tiers:
        if into is not None:
            return rebuild_index(cfg, into, rehash)
        # Under tiering.lock as `appliance delete` is: a delete committed into the index being replaced would be
        # lost with it (and the deleted study would come back).
        with tiering_lock(cfg.storage.index_path, "appliance index rebuild"):
            return replace_index(cfg, rehash)
    from tiering.rebuild import close_sources, open_sources

    sources = open_sources(cfg, from_tiers) if from_tiers else None
    try:
        if into is not None:
            return rebuild_index(cfg, into, rehash, sources)
        with tiering_lock(cfg.storage.index_path, "appliance index rebuild"):
            return replace_index(cfg, rehash, sources)
    finally:
        if sources is not None:
            close_sources(sources.backends)


cli_scu.register(app)  # echo, find, move, get: SCU commands towards other AEs

cli_recall.register(tier_app)  # `tier recall` (the rest of `tier` is appliance/cli_tier.py)

cli_audit.register(app)  # `audit`: read the audit trail
cli_delete.register(app)  # `delete`, `hold`: deleting on purpose, legal holds

from appliance import conformance  # noqa: E402  (beside its one use: a hunk of its own when branches merge)

conformance.register(app)  # `conformance`: the DICOM conformance statement (PS3.2)


def main() -> None:
    try:
        app()
    except errors.ApplianceError as exc:  # pragma: no cover - commands convert their own
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
