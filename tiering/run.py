"""A policy run: what `appliance tier plan|run|status` and the server's schedule call.

One mover at a time, across processes: the flock ``tiering.lock`` in the index folder (a second run says who holds
it and stops). A run first finishes what a crashed one left (journaled moves, pending deletes), then plans with
the policies and moves the planned studies, bounded by tiering.run_studies_max (or --limit)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.config import Config
from appliance.config_tiering import DELETE, ONLINE_TIER
from appliance.errors import EXIT_UNAVAILABLE, ApplianceError, ConfigError, StorageFault
from appliance.index.db import StudyIndex
from appliance.store.backend import BlobBackend, Usage
from appliance.store.online import BlobStore
from tiering.audit import AuditLog
from tiering.expire import expire
from tiering.mover import Mover, MoveResult, TokenBucket
from tiering.policy import PlannedMove, TierFill, apply_limit, plan, tier_fill
from tiering.tiers import open_tier, tier_order

log = logging.getLogger(__name__)

TIERING_LOCK = "tiering.lock"


class TierBusy(ApplianceError):
    """Another mover (a `tier run`, or the server's scheduled run) holds tiering.lock."""

    exit_code = EXIT_UNAVAILABLE


@contextlib.contextmanager
def tiering_lock(index_path: Path, who: str) -> Iterator[None]:
    """Hold ``tiering.lock`` (never waits). The holder writes who it is into the file, for the next one's message."""
    index_path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = index_path / TIERING_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            raise TierBusy(f"another mover is running ({holder}); try again when it is done") from None
        os.ftruncate(fd, 0)
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        os.pwrite(fd, f"{who}, pid {os.getpid()}, since {since}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


@dataclass
class Tiers:
    """The node's storage as tiering sees it: the online volumes and every configured tier, opened for one run.
    A tier that cannot be opened (a NAS gone) is listed in ``errors`` and left out."""

    store: BlobStore
    backends: dict[str, BlobBackend]
    errors: dict[str, str] = field(default_factory=dict)

    @classmethod
    def open(cls, config: Config) -> Tiers:
        store = BlobStore.open(config)
        backends: dict[str, BlobBackend] = {}
        errors: dict[str, str] = {}
        for tier in config.tiers:
            try:
                backends[tier.name] = open_tier(tier)
            except (ApplianceError, OSError, ImportError) as exc:  # a kind whose code is not installed
                errors[tier.name] = str(exc)
                log.warning("tier %s cannot be opened: %s", tier.name, exc)
        return cls(store, backends, errors)

    def usage(self) -> dict[str, tuple[Usage, ...]]:
        """Per tier, the fill of each volume or cartridge."""
        out = {ONLINE_TIER: tuple(u for b in self.store.backends.values() for u in b.usage())}
        for name, backend in self.backends.items():
            out[name] = backend.usage()
        return out

    def close(self) -> None:
        for backend in self.backends.values():
            backend.close()
        self.store.close()


def fills(usage: dict[str, tuple[Usage, ...]]) -> dict[str, TierFill]:
    return {name: tier_fill(usages) for name, usages in usage.items() if usages}


def make_plan(config: Config, index: StudyIndex, tier_fills: dict[str, TierFill], now_ns: int,
              policy_name: str | None = None) -> list[PlannedMove]:
    policies = [p for p in config.policies if policy_name is None or p.name == policy_name]
    if policy_name is not None and not policies:
        raise ConfigError(f"no policy named {policy_name!r} (configured: "
                          f"{', '.join(p.name for p in config.policies) or 'none'})")
    held = {uid for uid, _hold in index.holds()}  # retention never deletes a held study
    return plan(index.study_facts(), tier_fills, policies, tier_order(config), now_ns, held)


def retention_guard(config: Config, moves: list[PlannedMove]) -> tuple[list[PlannedMove], str]:
    """The plan without its deletes, and why, when it would delete more studies than
    tiering.retention_studies_max. Retention trusts the wall clock: a clock set years ahead (a bad RTC, a wrong NTP
    server) or an age typed as 365 instead of 3650 makes most of the archive look expired, and nothing in the
    index can tell such a clock from a true one (the receive times were written by the same clock). A bound on one
    run's deletes can: the steady state expires a day's worth of studies, a mistake expires years' worth. All of
    them are left out, not the first N: deleting part of a mistake is still a loss."""
    deletes = sum(m.target == DELETE for m in moves)
    cap = config.tiering.retention_studies_max
    if deletes <= cap:
        return moves, ""
    why = (f"retention would delete {deletes} studies in one run, more than tiering.retention_studies_max = {cap}: "
           "none deleted (a clock far ahead, or an age that expires too much?); check `appliance tier run "
           "--dry-run`, then raise the limit if they are due")
    return [m for m in moves if m.target != DELETE], why


@dataclass
class RunReport:
    planned: list[PlannedMove] = field(default_factory=list)
    resumed: list[MoveResult] = field(default_factory=list)
    results: list[MoveResult] = field(default_factory=list)
    dry_run: bool = False
    unavailable: dict[str, str] = field(default_factory=dict)  # tiers that did not open
    paused: dict[str, str] = field(default_factory=dict)  # tiers found unusable during the run: their moves wait
    retention_refused: str = ""  # why the run's retention deletes were all left out (retention_guard)

    def counts(self) -> dict[str, Any]:
        done = self.resumed + self.results
        return {"planned": len(self.planned), "planned_bytes": sum(m.bytes for m in self.planned),
                "moved": sum(r.outcome == "moved" for r in done),
                "deleted": sum(r.outcome == "deleted" for r in done),
                "failed": sum(r.outcome in ("failed", "refused") for r in done),
                "paused": sum(r.outcome == "paused" for r in done),
                "bytes_copied": sum(r.bytes for r in done), "resumed": len(self.resumed),
                "audit_lost": sum(r.outcome == "deleted" and bool(r.error) for r in done)}


@dataclass
class RunHooks:
    """Progress of a run, for the CLI's bar (all optional)."""

    planned: Callable[[list[PlannedMove]], None] = lambda _moves: None
    study_done: Callable[[MoveResult], None] = lambda _result: None
    copied: Callable[[int], None] = lambda _nbytes: None


def run(config: Config, index: StudyIndex, now_ns: int, *, dry_run: bool = False, studies_max: int | None = None,
        bytes_max: int = 0, rate_bytes_per_s: int | None = None, policy_name: str | None = None,
        hooks: RunHooks | None = None, who: str = "appliance tier run") -> RunReport:
    """Resume, plan, move (or only plan, with ``dry_run``). ``now_ns`` is the planner's clock (the audit and the
    placement use the real one)."""
    hooks = hooks or RunHooks()
    report = RunReport(dry_run=dry_run)
    limit = min(studies_max or config.tiering.run_studies_max, config.tiering.run_studies_max)
    lock = contextlib.nullcontext() if dry_run else tiering_lock(config.storage.index_path, who)
    with lock:
        tiers = Tiers.open(config)
        report.unavailable = dict(tiers.errors)
        try:
            if dry_run:
                wanted, report.retention_refused = retention_guard(
                    config, make_plan(config, index, fills(tiers.usage()), now_ns, policy_name))
                report.planned = apply_limit(wanted, limit, bytes_max)
                return report
            with AuditLog(config.tiering.audit_log) as audit:
                mover = Mover(config, index, dict(tiers.store.backends), tiers.backends, audit,
                              TokenBucket(rate_bytes_per_s or config.tiering.rate_bytes_per_s),
                              on_bytes=hooks.copied)
                report.resumed = mover.resume()
                wanted, report.retention_refused = retention_guard(
                    config, make_plan(config, index, fills(tiers.usage()), now_ns, policy_name))
                planned = apply_limit(wanted, limit, bytes_max)
                report.planned = [m for m in planned if m.target in tiers.backends or m.target == DELETE]
                hooks.planned(report.planned)
                for move in report.planned:
                    result = expire(config, index, move, who) if move.target == DELETE else mover.move(move)
                    report.results.append(result)
                    hooks.study_done(result)
                if any(r.outcome == "deleted" for r in report.results):
                    try:
                        mover.collect_garbage()  # the tier archives the deletes emptied
                    except (OSError, ApplianceError) as exc:  # their gc rows stay: the next run deletes them
                        log.warning("tiering: garbage collection after retention deletes: %s", exc)
                report.paused = dict(mover.unavailable)
                for name, backend in tiers.backends.items():
                    # The run's last tape archive gets its catalog now, not at the next run's recovery: until
                    # then the cartridge would not read back with tar and the catalog alone.
                    if name not in report.paused:
                        backend.seal()
            write_run_summary(config, report)
        finally:
            tiers.close()
    return report


RUN_SUMMARY_FILE = "tier-run-summary.json"  # appliance/metrics.py TIER_RUN_SUMMARY reads it at scrape time


def write_run_summary(config: Config, report: RunReport) -> None:
    """When this run ended and which tiers it paused, beside the index, for /metrics (TierRunCollector): a run from
    `appliance tier run` (a timer) has no scraped process, and a gauge would not outlive a restart. Written only by a
    run that got this far without raising; a failed write is logged, never a reason to fail the run."""
    import json

    path = config.storage.index_path / RUN_SUMMARY_FILE
    tmp = path.with_name(RUN_SUMMARY_FILE + ".tmp")
    body = {"ended": time.time(), "paused": {name: name in report.paused for name in tier_order(config)[1:]}}
    try:
        tmp.write_text(json.dumps(body))
        os.replace(tmp, path)  # whole or not at all: the scraper never reads half a file
    except OSError as exc:
        log.warning("tiering: could not write %s: %s", path, exc)


STORAGE_FAULT_EXIT = 74  # the server's EXIT_STORAGE_FAULT (appliance/server.py): the supervisor stops the appliance


def scheduled_main(config: Config) -> None:
    """The server's scheduled policy run, in its own process (appliance/server.py). Logs counts only."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor stops it (SIGKILL: crash-safe at every step)
    index = StudyIndex(config.storage.index_path, config.storage.index_map_size, sync=config.storage.fsync)
    try:
        report = run(config, index, time.time_ns(), who="scheduled run of appliance serve")
        from appliance.metrics import tiering_metrics

        metrics = tiering_metrics()  # the supervisor's /metrics sums the processes it forked
        for result in report.resumed + report.results:
            if result.bytes:
                metrics.migration_bytes.labels(result.source, result.target).inc(result.bytes)
        counts = report.counts()
        if report.retention_refused:  # `appliance tier run` prints it; the server's scheduled run logs it
            log.error("tiering: %s", report.retention_refused)
        if counts["audit_lost"]:
            log.error("tiering: %d retention delete(s) done, but their audit lines were not written",
                      counts["audit_lost"])
        for name, why in report.paused.items():
            log.warning("tiering: moves to and from tier %s paused until the next run (in %.0fs): %s", name,
                        config.tiering.schedule_s, why)
        if counts["moved"] or counts["failed"]:
            log.info("tiering: %(moved)d studies moved (%(bytes_copied)d bytes copied), %(failed)d failed, "
                     "%(resumed)d interrupted moves finished", counts)
    except TierBusy as exc:
        log.info("tiering: scheduled run skipped: %s", exc)
    except StorageFault as exc:
        # Fail-stop, as a worker or the recaller: after a failed fsync the page cache cannot be trusted. The
        # supervisor sees the exit code and stops the appliance; the journaled move is redone after the restart.
        log.critical("tiering: scheduled run stopped on a storage fault: %s", exc)
        raise SystemExit(STORAGE_FAULT_EXIT) from None
    except ApplianceError as exc:
        log.warning("tiering: scheduled run failed: %s", exc)
    finally:
        index.close()
