"""SIGHUP: which parts of a re-read configuration take effect in a running appliance, and which need a restart.

The supervisor re-reads ``config.source`` with ``load_config`` (full validation), then ``split_reload`` compares the
new Config with the one in force, field by field, one level into each section. What can change while associations
run is applied (the config in force gets exactly those fields from the new file); everything else is named so the
operator knows a restart is still due. What is live and why:

- ``peers`` (their AE titles, hosts, rights), ``server.unknown_peer_rights``, ``refuse_unknown_calling_ae``,
  ``check_peer_host``: read per association / per request from the worker's config; the peer host cache is
  resolved again by the worker.
- ``server`` timeouts and per-AE / per-host association limits, ``log_level``, ``drain_timeout_s``: read each time
  they are used.
- ``query`` and ``retrieve`` limits (not ``retrieve.read_threads``: a thread pool sized once per worker).
- ``tiering`` run limits and schedule, and ``policies``: the supervisor hands its config to every new policy run.

Ports, volumes, storage, TLS files, workers, tiers, DICOM SOP classes, commitment and audit are opened once at start:
changing them live would need the listeners, LMDB, journals or certificates reopened under running associations.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from appliance.config import Config, load_config
from appliance.errors import ApplianceError

if TYPE_CHECKING:
    from appliance.net.association import Endpoint
    from appliance.services.context import WorkerContext

log = logging.getLogger("appliance")

# Whole top-level fields of Config that are live.
LIVE_TOP = frozenset({"peers", "policies"})
# section -> its live fields ("*": every field but the ones in LIVE_EXCEPT).
LIVE_FIELDS: dict[str, frozenset[str]] = {
    "server": frozenset({
        "unknown_peer_rights", "refuse_unknown_calling_ae", "check_peer_host", "log_level", "drain_timeout_s",
        "acse_timeout", "idle_timeout", "message_timeout", "write_timeout", "max_associations_per_ae",
        "max_associations_per_host",
    }),
    "query": frozenset({"*"}),
    "retrieve": frozenset({"*"}),
    "tiering": frozenset({"schedule_s", "rate_bytes_per_s", "run_studies_max", "study_instances_max",
                          "scrub_bytes_per_s"}),
}
# Thread pools sized once per worker.
LIVE_EXCEPT = frozenset({"retrieve.read_threads", "query.threads_max"})
IGNORED = frozenset({"source", "volumes_builtin"})  # the same file by construction; "volumes" names the other


@dataclasses.dataclass(frozen=True)
class Reload:
    config: Config  # the config in force after the reload (the old one with the live changes)
    applied: tuple[str, ...]  # dotted names of what changed and is now in force
    needs_restart: tuple[str, ...]  # dotted names of what changed but only a restart applies


def _is_live(section: str, name: str) -> bool:
    dotted = f"{section}.{name}"
    fields = LIVE_FIELDS.get(section, frozenset())
    return dotted not in LIVE_EXCEPT and ("*" in fields or name in fields)


def split_reload(old: Config, new: Config) -> Reload:
    applied: list[str] = []
    restart: list[str] = []
    top_changes: dict[str, Any] = {}
    for top in dataclasses.fields(Config):
        name = top.name
        before, after = getattr(old, name), getattr(new, name)
        if name in IGNORED or before == after:
            continue
        if name in LIVE_TOP:
            applied.append(name)
            top_changes[name] = after
            continue
        if not dataclasses.is_dataclass(before):
            restart.append(name)  # tuples of tables (volumes, tiers): a restart
            continue
        section_changes: dict[str, Any] = {}
        for sub in dataclasses.fields(before):
            value = getattr(after, sub.name)
            if getattr(before, sub.name) == value:
                continue
            if _is_live(name, sub.name):
                applied.append(f"{name}.{sub.name}")
                section_changes[sub.name] = value
            else:
                restart.append(f"{name}.{sub.name}")
        if section_changes:
            top_changes[name] = dataclasses.replace(before, **section_changes)  # type: ignore[type-var]
    config = dataclasses.replace(old, **top_changes) if top_changes else old
    return Reload(config, tuple(applied), tuple(restart))


def reread(current: Config) -> Reload | str:
    """Load ``current.source`` again. Returns what to apply, or the reason the new file is refused (logged at error:
    the config in force stays). What needs a restart is logged as a warning, what is applied at info."""
    try:
        if current.source is None:
            raise ApplianceError("no config file to re-read (serve was started with the built-in defaults)")
        new = load_config(current.source)
        change = split_reload(current, new)
        check_in_force(change.config)
    except ApplianceError as exc:
        log.error("reload refused, the configuration in force stays: %s", exc)
        return str(exc)
    if change.needs_restart:
        log.warning("reload: changed but not applied, needs a restart: %s", ", ".join(change.needs_restart))
    log.info("configuration reloaded: %s", ", ".join(change.applied) if change.applied else "nothing changed")
    return change


def check_in_force(config: Config) -> None:
    """The config that would be in force after a reload is the old one's restart-only parts with the new file's live
    parts: validate that combination as a whole (a policy naming a tier the file adds, which only a restart opens,
    must be refused, not handed to the next policy run), and check the client certificates when a peer uses TLS
    (the workers build their client context from them at the reload)."""
    from appliance.config import validate
    from appliance.config_tiering import TieringSections, validate_tiering

    validate(config)
    validate_tiering(TieringSections(config.tiering, config.tiers, config.policies),
                     tuple(v.name for v in config.volumes))
    if any(peer.tls for peer in config.peers):
        from appliance.net.tls import client_context

        client_context(config.tls)


class ConfigFollower:
    """The worker's side: the supervisor writes each reloaded Config (a picklable frozen dataclass) to a pipe made
    before the fork; the worker's event loop reads it (add_reader: no signal, so no race between a signal and the
    data behind it) and swaps the config its associations read. Nothing is closed or re-bound, so no association
    is dropped. A new association takes the new config; one already open keeps the [peers] entry (and so the
    rights) it was accepted with, as DICOM authorises at A-ASSOCIATE time, and reads the rest (timeouts, limits,
    unknown-peer rights) from the new config at its next use."""

    def __init__(self, updates: Connection, endpoint: Endpoint, ctx: WorkerContext) -> None:
        self.updates = updates
        self.endpoint = endpoint
        self.ctx = ctx
        self.generation = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(updates.fileno(), self._on_readable)

    def close(self) -> None:
        self.loop.remove_reader(self.updates.fileno())

    def _on_readable(self) -> None:
        latest: Config | None = None
        try:
            while self.updates.poll():
                latest = self.updates.recv()  # two reloads in a row: the last one counts
        except (EOFError, OSError):  # the supervisor is gone: nothing more will come
            self.close()
        if latest is not None:
            self.generation += 1
            task = asyncio.create_task(self._apply(latest, self.generation))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _apply(self, new: Config, mine: int) -> None:
        from appliance.net.association import resolve_peer_hosts

        # Resolve the peers' hosts off the loop (a slow DNS server must not stall the associations), then swap
        # everything between two callbacks of the loop: an association sees the old config or the new, never half.
        addresses = await asyncio.to_thread(resolve_peer_hosts, new) if new.server.check_peer_host else {}
        client_tls = self.ctx.client_tls
        if client_tls is None and any(peer.tls for peer in new.peers):
            from appliance.net.tls import client_context

            # A peer that gained tls = true: our outgoing associations to it (C-MOVE, Storage Commitment reports)
            # need the client context a worker builds at start only when some peer had TLS. The supervisor checked
            # the files before sending this config.
            try:
                client_tls = await asyncio.to_thread(client_context, new.tls)
            except Exception as exc:  # the files changed since the supervisor's check: keep the old config
                log.error("reload not applied in this worker: TLS client certificates: %s", exc)
                return
        if mine != self.generation:
            return  # a later reload arrived meanwhile: it wins
        self.ctx.client_tls = client_tls
        self.endpoint.config = new
        self.endpoint.negotiator.config = new
        self.endpoint.peer_addresses = addresses
        self.ctx.config = new
        logging.getLogger().setLevel(getattr(logging, new.server.log_level.upper()))
        # What an operator (and the tests) wait for: the supervisor's "configuration reloaded" says the file was
        # accepted; this line, one per worker, says new associations on that worker now get it.
        log.info("configuration in force in worker %d", os.getpid())
