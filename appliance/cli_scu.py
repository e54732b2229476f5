"""``appliance echo|find|move|get``: one-shot SCU commands for admins (issue 9 item 7), on pynetdicom as a client.

PEER is a [peers] name from the config, or given with ``--host/--port/--aet``; the calling AE title is ours
(server.ae_title) unless ``--calling-aet`` says otherwise. Matching keys as DCMTK's ``-k``: ``-k PatientName=DOE*``,
``-k 0010,0020=123``, ``-k StudyDate`` (a return key), ``-k QueryRetrieveLevel=SERIES``. Human table by default,
``--json`` for scripts. Exit codes (errors.py): 0 success, 1 a failure status or failed sub-operations, 2 bad
usage (a key that is no DICOM attribute), 3 PEER is no [peers] name, 69 peer unreachable or association refused.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from appliance import errors
from appliance.cli_common import emit, load_cli_config
from appliance.config import Config, PeerConfig

ECHO = "1.2.840.10008.1.1"
MODELS = {  # --model -> (FIND, MOVE, GET) SOP classes (PS3.4 C.6)
    "patient": ("1.2.840.10008.5.1.4.1.2.1.1", "1.2.840.10008.5.1.4.1.2.1.2", "1.2.840.10008.5.1.4.1.2.1.3"),
    "study": ("1.2.840.10008.5.1.4.1.2.2.1", "1.2.840.10008.5.1.4.1.2.2.2", "1.2.840.10008.5.1.4.1.2.2.3"),
}
LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
# Return keys a find asks for at each level unless given (what an admin wants to see to choose what to move).
DEFAULT_RETURN_KEYS = {
    "PATIENT": ("PatientID", "PatientName", "PatientBirthDate", "NumberOfPatientRelatedStudies"),
    "STUDY": ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "AccessionNumber", "ModalitiesInStudy",
              "NumberOfStudyRelatedInstances", "StudyDescription"),
    "SERIES": ("SeriesInstanceUID", "Modality", "SeriesNumber", "NumberOfSeriesRelatedInstances",
               "SeriesDescription"),
    "IMAGE": ("SOPInstanceUID", "SOPClassUID", "InstanceNumber"),
}
UNCOMPRESSED = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"]
PENDING = (0xFF00, 0xFF01)
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class ScuError(errors.ApplianceError):
    """A failure status, or failed sub-operations."""


class PeerUnavailable(errors.ApplianceError):
    """The peer cannot be reached, refused the association, or accepts none of the contexts we need."""

    exit_code = errors.EXIT_UNAVAILABLE


class UsageError(errors.ApplianceError):
    exit_code = errors.EXIT_USAGE


@dataclass(frozen=True)
class Target:
    label: str
    ae_title: str
    host: str
    port: int


def resolve_peer(cfg: Config, peer: str | None, host: str | None, port: int | None, aet: str | None) -> Target:
    """A [peers] entry (``--host/--port/--aet`` override its fields), or a peer given by those three alone."""
    if peer is not None:
        found = next((p for p in cfg.peers if p.name == peer), None)
        if found is None:
            names = ", ".join(p.name for p in cfg.peers) or "none configured"
            raise errors.NotFound(f"no peer {peer!r} under [peers] ({names})")
        return Target(peer, aet or found.ae_title, host or found.host, port or found.port)
    if not (host and port and aet):
        raise UsageError("give PEER (a [peers] name) or all of --host, --port and --aet")
    return Target(f"{aet}@{host}:{port}", aet, host, port)


def parse_key(key: str) -> tuple[int, str, str | None]:
    """One DCMTK-style ``-k``: ``Keyword=value``, ``gggg,eeee=value``, ``(gggg,eeee)=value``; without ``=value``
    the attribute is a return key (zero length). Returns (tag, VR, value)."""
    name, _, value = key.partition("=")
    name = name.strip().strip("()")
    tag: int | None
    if re.fullmatch(r"[0-9A-Fa-f]{4},[0-9A-Fa-f]{4}", name):
        tag = int(name.replace(",", ""), 16)
    else:
        tag = tag_for_keyword(name)
    if tag is None:
        raise UsageError(f"-k {key}: {name!r} is not a DICOM keyword or gggg,eeee tag")
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        raise UsageError(f"-k {key}: ({tag >> 16:04X},{tag & 0xFFFF:04X}) is not in the DICOM dictionary") from None
    if vr == "SQ":
        raise UsageError(f"-k {key}: sequence keys are not supported")
    return tag, vr, value if value else None


def parse_keys(keys: list[str]) -> Dataset:
    ds = Dataset()
    for key in keys:
        ds.add_new(*parse_key(key))
    return ds


def key_names(keys: list[str]) -> list[str]:
    """The attributes of ``keys`` in the order given (the table's first columns)."""
    names = []
    for key in keys:
        tag = parse_key(key)[0]
        names.append(keyword_for_tag(tag) or f"{tag >> 16:04X},{tag & 0xFFFF:04X}")
    return names


def identifier(keys: list[str], level: str, defaults: bool) -> Dataset:
    ds = parse_keys(keys)
    if "QueryRetrieveLevel" not in ds:
        ds.QueryRetrieveLevel = level.upper()
    qr_level = str(ds.QueryRetrieveLevel).upper()
    if qr_level not in LEVELS:
        raise UsageError(f"query/retrieve level {qr_level!r}: one of {', '.join(LEVELS)}")
    if defaults:
        for keyword in DEFAULT_RETURN_KEYS[qr_level]:
            if keyword not in ds:
                setattr(ds, keyword, None)
    return ds


def _quiet_pynetdicom(verbose: bool) -> None:
    # pynetdicom logs every failure at ERROR with its own wording; the CLI says it once, in its own words.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if verbose else logging.CRITICAL)


@contextmanager
def associate(target: Target, calling_ae: str, contexts: list[tuple[str, list[str]]], timeout: float,
              roles: tuple[str, ...] | list[str] = (), handlers: tuple[Any, ...] | list[Any] = ()) -> Iterator[Any]:
    """A pynetdicom association to ``target``, released on the way out; PeerUnavailable with what went wrong."""
    from pynetdicom import AE, build_role, evt

    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = ae.acse_timeout = ae.network_timeout = timeout
    ae.dimse_timeout = timeout
    ae.maximum_associations = 1
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
    opened: list[bool] = []
    rejected: list[str] = []

    def on_acse(event: Any) -> None:
        primitive = event.primitive
        result = getattr(primitive, "result", None)
        if result not in (None, 0) and hasattr(primitive, "reason_str"):
            rejected.append(str(primitive.reason_str))

    all_handlers: list[Any] = [(evt.EVT_CONN_OPEN, lambda _e: opened.append(True)), (evt.EVT_ACSE_RECV, on_acse), *handlers]
    assoc = ae.associate(target.host, target.port, ae_title=target.ae_title,
                         ext_neg=[build_role(uid, scp_role=True) for uid in roles], evt_handlers=all_handlers)
    if not assoc.is_established:
        if assoc.is_rejected:
            why = f": {rejected[0]}" if rejected else ""
            raise PeerUnavailable(f"{target.label} rejected the association from {calling_ae}{why}")
        if not opened:
            raise PeerUnavailable(f"cannot connect to {target.label} ({target.host}:{target.port})")
        raise PeerUnavailable(f"{target.label} ({target.host}:{target.port}) aborted or did not answer the "
                              "association request")
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def _accepted(assoc: Any, sop_class: str, what: str, target: Target) -> None:
    if not any(str(cx.abstract_syntax) == sop_class for cx in assoc.accepted_contexts):
        raise PeerUnavailable(f"{target.label} does not accept {what}")


def _status(status: Dataset | None) -> int:
    if status is None or "Status" not in status:
        raise ScuError("no response from the peer (DIMSE timeout or association aborted)")
    return int(status.Status)


def _describe(code: int) -> str:
    return f"0x{code:04X}" + (f" ({errors.STATUS_NAMES[code]})" if code in errors.STATUS_NAMES else "")


def _value(element: Any) -> Any:
    value = element.value
    if isinstance(value, MultiValue):
        return [str(v) for v in value]
    if element.VR == "SQ":
        return None
    if isinstance(value, bytes):
        return value.hex()
    return "" if value is None else str(value)


def flatten(ds: Dataset) -> dict[str, Any]:
    """An identifier as {keyword (or gggg,eeee): value}, for the table and --json."""
    out: dict[str, Any] = {}
    for element in ds:
        if element.tag.group in (0x0000, 0x0002):
            continue
        name = keyword_for_tag(element.tag) or f"{element.tag.group:04X},{element.tag.element:04X}"
        out[name] = _value(element)
    return out


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[", ".join(v) if isinstance(v := row.get(c, ""), list) else str(v) for c in columns] for row in rows]
    widths = [min(64, max([len(c), *(len(r[i]) for r in cells)])) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(cell[:64].ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


# ---- the operations (no typer here: the integrator's tests call them too) -------------------------------------

def echo(target: Target, calling_ae: str, timeout: float) -> dict[str, Any]:
    started = time.monotonic()
    with associate(target, calling_ae, [(ECHO, UNCOMPRESSED[:2])], timeout) as assoc:
        status = _status(assoc.send_c_echo())
    if status != 0:
        raise ScuError(f"{target.label}: C-ECHO answered {_describe(status)}")
    return {"peer": target.label, "status": status, "ms": round((time.monotonic() - started) * 1000, 1)}


def find(target: Target, calling_ae: str, query: Dataset, model: str, timeout: float,
         limit: int = 0) -> list[dict[str, Any]]:
    sop_class = MODELS[model][0]
    matches: list[dict[str, Any]] = []
    with associate(target, calling_ae, [(sop_class, UNCOMPRESSED)], timeout) as assoc:
        _accepted(assoc, sop_class, f"{model} root C-FIND", target)
        final = None
        for status, ident in assoc.send_c_find(query, sop_class):
            code = _status(status)
            if code in PENDING:
                if ident is not None:
                    matches.append(flatten(ident))
                if limit and len(matches) == limit:  # once: the matches already under way are dropped below
                    assoc.send_c_cancel(1, query_model=sop_class)  # the C-FIND's message ID (pynetdicom's default)
                continue
            final = code
        if final not in (0x0000, 0xFE00):
            raise ScuError(f"{target.label}: C-FIND answered {_describe(final or 0)} after {len(matches)} matches")
    return matches[:limit] if limit else matches


def _counts(status: Dataset) -> dict[str, int]:
    return {name: int(status.get(f"NumberOf{key}Suboperations", 0) or 0)
            for name, key in (("completed", "Completed"), ("failed", "Failed"), ("warning", "Warning"))}


def move(target: Target, calling_ae: str, query: Dataset, model: str, dest: str, timeout: float) -> dict[str, Any]:
    sop_class = MODELS[model][1]
    with associate(target, calling_ae, [(sop_class, UNCOMPRESSED)], timeout) as assoc:
        _accepted(assoc, sop_class, f"{model} root C-MOVE", target)
        final: Dataset | None = None
        for status, _ident in assoc.send_c_move(query, dest, sop_class):
            if _status(status) not in PENDING:
                final = status
    if final is None:
        raise ScuError(f"{target.label}: no final response")
    code = _status(final)
    result = {"peer": target.label, "destination": dest, "status": code, **_counts(final)}
    if code not in (0x0000, 0xB000) or result["failed"]:
        raise ScuError(f"{target.label}: C-MOVE to {dest} answered {_describe(code)} "
                       f"({result['completed']} completed, {result['failed']} failed)")
    return result


def get(target: Target, calling_ae: str, query: Dataset, model: str, out: Path, timeout: float,
        transfer_syntaxes: list[str], storage_classes: list[str]) -> dict[str, Any]:
    """C-GET into ``out``: each instance written as a Part-10 file, the dataset byte for byte as received."""
    from pynetdicom import evt

    sop_class = MODELS[model][2]
    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []

    def on_store(event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID or "")
        name = uid if _UID.match(uid) and len(uid) <= 64 else f"instance-{len(written) + 1}"
        try:
            path = out / f"{name}.dcm"
            path.write_bytes(event.encoded_dataset(include_meta=True))
        except OSError:
            return 0xA700  # Out of resources: the peer counts it as a failed sub-operation
        written.append(str(path))
        return 0x0000

    contexts = [(sop_class, UNCOMPRESSED), *((uid, transfer_syntaxes) for uid in storage_classes)]
    with associate(target, calling_ae, contexts, timeout, roles=storage_classes,
                   handlers=[(evt.EVT_C_STORE, on_store)]) as assoc:
        _accepted(assoc, sop_class, f"{model} root C-GET", target)
        final: Dataset | None = None
        for status, _ident in assoc.send_c_get(query, sop_class):
            if _status(status) not in PENDING:
                final = status
    if final is None:
        raise ScuError(f"{target.label}: no final response")
    code = _status(final)
    result = {"peer": target.label, "status": code, **_counts(final), "files": written}
    if code not in (0x0000, 0xB000) or result["failed"]:
        raise ScuError(f"{target.label}: C-GET answered {_describe(code)} ({result['completed']} completed, "
                       f"{result['failed']} failed; {len(written)} files in {out})")
    return result


def default_storage_classes() -> list[str]:
    """The storage SOP classes a C-GET proposes: pynetdicom's 120 most common (PS3.8 allows 128 contexts)."""
    from pynetdicom import StoragePresentationContexts

    return [str(cx.abstract_syntax) for cx in StoragePresentationContexts]


# ---- typer commands ------------------------------------------------------------------------------------------

PeerArg = Annotated[str | None, typer.Argument(help="A [peers] name (or use --host/--port/--aet)")]
HostOpt = Annotated[str | None, typer.Option("--host", help="Peer host (overrides the [peers] entry)")]
PortOpt = Annotated[int | None, typer.Option("--port", min=1, max=65535, help="Peer port")]
AetOpt = Annotated[str | None, typer.Option("--aet", help="Peer (called) AE title")]
CallingOpt = Annotated[str | None, typer.Option("--calling-aet", help="Our AE title (default: server.ae_title)")]
KeysOpt = Annotated[list[str] | None, typer.Option("--key", "-k", help="Keyword=value or gggg,eeee=value (DCMTK -k)")]
LevelOpt = Annotated[str, typer.Option("--level", "-L", help="PATIENT | STUDY | SERIES | IMAGE")]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="patient | study (root information model)")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", min=0.001,
                                           help="Seconds for connect, association and each response")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="pynetdicom's debug log on stderr")]


ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config (default: $APPLIANCE_CONFIG, ./appliance.toml, built-in)"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output")]
OutOpt = Annotated[Path, typer.Option(help="Folder for the received Part-10 files")]
DestOpt = Annotated[str | None, typer.Option(help="Move destination AE (default: ours, server.ae_title)")]
LimitOpt = Annotated[int, typer.Option(min=0, help="Cancel after this many matches (0 = all)")]
SyntaxOpt = Annotated[list[str] | None, typer.Option("--transfer-syntax", "-x",
                                                     help="Accepted for the instances (default: uncompressed)")]


def _run(config: Path | None, verbose: bool, body: Callable[[Config], tuple[Any, str]], as_json: bool) -> None:
    """Load the config as every command does (cli.py), run ``body``, print its result; errors as one line."""
    _quiet_pynetdicom(verbose)
    try:
        data, human = body(load_cli_config(config))
    except errors.ApplianceError as exc:
        raise exc from None  # cli_common.RootGroup: one line (JSON with --json) and its exit code
    emit(data, as_json, human)


def _model(model: str) -> str:
    if model not in MODELS:
        raise UsageError(f"--model: one of {', '.join(MODELS)}")
    return model


def echo_command(peer: PeerArg = None, host: HostOpt = None, port: PortOpt = None, aet: AetOpt = None,
                 calling_aet: CallingOpt = None, timeout: TimeoutOpt = 30.0, config: ConfigOpt = None,
                 as_json: JsonOpt = False, verbose: VerboseOpt = False) -> None:
    """C-ECHO a peer."""
    def body(cfg: Config) -> tuple[Any, str]:
        target = resolve_peer(cfg, peer, host, port, aet)
        result = echo(target, calling_aet or cfg.server.ae_title, timeout)
        return result, f"{target.label}: C-ECHO ok ({result['ms']} ms)"
    _run(config, verbose, body, as_json)


def find_command(peer: PeerArg = None, key: KeysOpt = None, level: LevelOpt = "STUDY", model: ModelOpt = "study",
                 limit: LimitOpt = 0, host: HostOpt = None, port: PortOpt = None, aet: AetOpt = None,
                 calling_aet: CallingOpt = None, timeout: TimeoutOpt = 60.0, config: ConfigOpt = None,
                 as_json: JsonOpt = False, verbose: VerboseOpt = False) -> None:
    """C-FIND on a peer: the matches as a table (or --json)."""
    def body(cfg: Config) -> tuple[Any, str]:
        target = resolve_peer(cfg, peer, host, port, aet)
        query = identifier(key or [], level, defaults=True)
        rows = find(target, calling_aet or cfg.server.ae_title, query, _model(model), timeout, limit)
        # The user's keys first, in their order, then the level's defaults.
        columns = list(dict.fromkeys(k for k in [*key_names(key or []), *flatten(query)] if k != "QueryRetrieveLevel"))
        return rows, table(rows, columns) + f"\n({len(rows)} matches)"
    _run(config, verbose, body, as_json)


def move_command(peer: PeerArg = None, key: KeysOpt = None, dest: DestOpt = None, level: LevelOpt = "STUDY",
                 model: ModelOpt = "study", host: HostOpt = None, port: PortOpt = None, aet: AetOpt = None,
                 calling_aet: CallingOpt = None, timeout: TimeoutOpt = 600.0, config: ConfigOpt = None,
                 as_json: JsonOpt = False, verbose: VerboseOpt = False) -> None:
    """C-MOVE what the keys select from a peer to --dest (default: this appliance)."""
    def body(cfg: Config) -> tuple[Any, str]:
        target = resolve_peer(cfg, peer, host, port, aet)
        destination = dest or cfg.server.ae_title
        result = move(target, calling_aet or cfg.server.ae_title, identifier(key or [], level, defaults=False),
                      _model(model), destination, timeout)
        return result, (f"{target.label} -> {destination}: {result['completed']} completed, {result['failed']} "
                        f"failed, {result['warning']} warning")
    _run(config, verbose, body, as_json)


def get_command(peer: PeerArg = None, key: KeysOpt = None, out: OutOpt = Path("."), level: LevelOpt = "STUDY",
                model: ModelOpt = "study", transfer_syntax: SyntaxOpt = None, host: HostOpt = None,
                port: PortOpt = None, aet: AetOpt = None, calling_aet: CallingOpt = None, timeout: TimeoutOpt = 600.0,
                config: ConfigOpt = None, as_json: JsonOpt = False, verbose: VerboseOpt = False) -> None:
    """C-GET what the keys select from a peer into --out, byte-exact as the peer sent it."""
    def body(cfg: Config) -> tuple[Any, str]:
        target = resolve_peer(cfg, peer, host, port, aet)
        result = get(target, calling_aet or cfg.server.ae_title, identifier(key or [], level, defaults=False),
                     _model(model), out, timeout, transfer_syntax or UNCOMPRESSED, default_storage_classes())
        return result, (f"{target.label}: {result['completed']} completed, {result['failed']} failed, "
                        f"{result['warning']} warning; {len(result['files'])} files in {out}")
    _run(config, verbose, body, as_json)


def register(app: typer.Typer) -> None:
    """Add echo, find, move and get to the appliance command."""
    app.command("echo")(echo_command)
    app.command("find")(find_command)
    app.command("move")(move_command)
    app.command("get")(get_command)


def peer_rows(cfg: Config) -> list[dict[str, Any]]:
    """`appliance status`: each configured peer with its rights."""
    from appliance.config import RIGHTS

    def rights(peer: PeerConfig) -> list[str]:
        return [right for right in RIGHTS if cfg.allows(peer, right)]

    return [{"name": p.name, "ae_title": p.ae_title, "host": p.host, "port": p.port, "rights": rights(p),
             "allow_receive": p.allow_receive, "allow_overwrite": p.allow_overwrite} for p in cfg.peers]


def describe_peers(cfg: Config, rows: Any) -> list[str]:
    lines = [f"  peer {r['name']:<10} {r['ae_title']}@{r['host']}:{r['port']}  may: {' '.join(r['rights']) or '-'}"
             + ("; receives" if r["allow_receive"] else "") + ("; may overwrite" if r["allow_overwrite"] else "")
             for r in rows]
    unknown = " ".join(cfg.server.unknown_peer_rights) or "nothing"
    refused = " (refused: server.refuse_unknown_calling_ae)" if cfg.server.refuse_unknown_calling_ae else ""
    return [*lines, f"  other AE titles may: {unknown}{refused}"]
