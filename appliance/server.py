"""Composition root: the supervisor process and its workers.

The supervisor opens the volumes and the index, runs crash recovery, reserves the port, starts ``workers``
processes and serves /metrics (aggregated over the workers with prometheus-client's multi-process mode), /healthz
and /readyz (health.py). Each worker has its own uvloop event loop, its own listening socket on the shared port
(SO_REUSEPORT, so the kernel spreads connections), its own LMDB handle and group committer. SIGTERM drains: workers
stop accepting, finish the associations in progress (up to ``server.drain_timeout_s``), abort the rest, commit,
close LMDB and exit; a second SIGTERM aborts at once. SIGHUP reloads what can change live (reload.py) through a
pipe per worker. A worker that dies is restarted, with the config in force. Signals, the reload, the heartbeat and
systemd notifications are the supervisor's Lifecycle mixin (lifecycle.py).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import multiprocessing
import os
import queue
import shutil
import signal
import socket
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from multiprocessing.context import ForkProcess
from pathlib import Path
from typing import Any

from appliance import notify
from appliance.config import Config
from appliance.errors import ApplianceError, IndexInUse
from appliance.index.db import SERVE_LOCK, StudyIndex
from appliance.lifecycle import EXIT_STORAGE_FAULT, Lifecycle
from appliance.store.online import BlobStore, recover
from appliance.store.volumes import VolumeSet

log = logging.getLogger("appliance")


def setup_logging(level: str, log_format: str = "text") -> None:
    from appliance.logs import configure  # text (syslog priorities under journald) or JSON: appliance/logs.py

    configure(level, log_format)
    quiet_pydicom()


def quiet_pydicom() -> None:
    """pydicom's value validation logs (and warns) with the offending value in the message, e.g. a stored
    PatientBirthDate in a non-DICOM format while C-FIND builds a response: patient data in the log. The server
    reads values as they are and never needs those messages, so validation is off and pydicom's logger shows
    errors only. Set once in the supervisor, before the workers fork: a warnings filter changed later from the
    worker threads would be process-wide and racy (warnings.catch_warnings is not thread-safe)."""
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.ERROR)


def _listen_socket(host: str, port: int, listen: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(1024)
        sock.setblocking(False)
    return sock


# ---- worker -----------------------------------------------------------------------------------------


CONFIG_PIPE_BYTES = 1 << 20  # Linux's default /proc/sys/fs/pipe-max-size: what an unprivileged process may ask


def _widen_pipe(conn: Connection) -> None:
    """A reloaded Config is written to an empty pipe only if it fits whole (lifecycle._push_config), so that the
    write never blocks the supervisor: 1 MiB holds a config with thousands of peers (~110 bytes each pickled)."""
    try:
        fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, CONFIG_PIPE_BYTES)
    except OSError:  # a lower pipe-max-size: the 64 KiB default stays, and a larger config needs a restart
        pass


# After its drain, a worker has this long to finish its handlers, audit lines and last-access notes (the group
# commit's close is waited for in full: it holds acknowledged instances). The supervisor kills a worker still
# alive at drain_timeout_s + WORKER_TAIL_S + 8 s; the unit's TimeoutStopSec must stay above that (60 s: 30 + 20).
WORKER_TAIL_S = 12.0


def _worker_main(config: Config, port: int, ready: Any, slots: Any, worker: int = 0, tls_port: int = 0,
                 updates: Connection | None = None) -> None:
    # SIGTERM (drain) and SIGUSR2 (the supervisor's "abort the drain now") stay blocked, so pending, until the event
    # loop's handlers are in place: a stop during start-up is then taken by the loop, not lost to the supervisor's
    # handler inherited through fork (nor discarded, as SIG_IGN would). The threads started meanwhile inherit the
    # mask, so these signals go to the loop's thread only.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR2})
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides; SIGTERM drains
    # A `kill -HUP` to the whole process group must not kill a worker (the default action): reloads reach the worker
    # through ``updates``.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # The event loop hands work to the commit and fsync threads many times per instance; with the default 5 ms
    # GIL switch interval a thread woken from a syscall can wait that long for the interpreter.
    sys.setswitchinterval(float(os.environ.get("APPLIANCE_SWITCH_INTERVAL", "0.0005")))
    # An archive takes what it is sent (and stores it bit for bit): pydicom's value validation only costs time
    # here (tens of thousands of UID regex checks per association negotiation) and fills logs with warnings.
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency; asyncio's loop works too
        pass
    asyncio.run(_worker(config, port, ready, slots, worker, tls_port, updates))


async def _worker(config: Config, port: int, ready: Any, slots: Any, worker: int = 0, tls_port: int = 0,
                  updates: Connection | None = None) -> None:
    from appliance.metrics import FLUSH_SECONDS, Metrics
    from appliance.net.association import AssociationProtocol, Endpoint
    from appliance.net.tls import client_context
    from appliance.reload import ConfigFollower
    from appliance.services.access import AccessRecorder, flush_periodically
    from appliance.services.application import StorageApplication
    from appliance.services.commitment import resume_commitments
    from appliance.services.context import WorkerContext
    from appliance.store.commit import GroupCommitter
    from appliance.store.spool import SpoolBudget
    from tiering.recall import open_tiers

    loop = asyncio.get_running_loop()
    st = config.storage
    # Lazy meta page: one flush per group commit; startup recovery redoes a lost last transaction from the segments.
    index = StudyIndex(st.index_path, st.index_map_size, sync=st.fsync, lazy_meta=True)
    # Tiers (nearline, tape) are read through the same BlobStore: a retrieve of a nearline instance streams it back.
    blobstore = BlobStore.open(config, index=index, tiers=open_tiers(config) if config.tiers else None)
    access = AccessRecorder(index)  # last access of the studies retrieved, flushed in batches
    metrics = Metrics()
    stop = asyncio.Event()
    hurry = asyncio.Event()  # the supervisor's SIGUSR2 (it got a second SIGTERM): abort what the drain waits for
    faults: list[str] = []

    def on_fault(reason: str) -> None:
        faults.append(reason)
        stop.set()

    committer = GroupCommitter(index, st.duplicate_policy, loop, st.commit_max_batch, st.commit_max_wait_ms,
                               metrics, on_fault=on_fault, queue_max=st.commit_queue_max,
                               copy_exists=blobstore.copy_exists, lanes=st.writer_lanes)
    ctx = WorkerContext.build(config, volumes=blobstore.volumes, committer=committer, metrics=metrics,
                              blobstore=blobstore, index=index, access=access,
                              spool_budget=SpoolBudget(st.spool_memory_bytes, st.spool_memory_total_bytes),
                              client_tls=client_context(config.tls) if any(p.tls for p in config.peers) else None)
    from appliance.audit import open_sink

    audit = open_sink(config.audit, config.server.ae_title)  # its writer thread; closed after the drain (issue 12)
    endpoint = Endpoint(config, StorageApplication(ctx), metrics, slots=slots, worker=worker, audit=audit)
    resume_commitments(ctx, worker, config.effective_workers())  # reports a previous run answered but never sent
    sock = _listen_socket(config.server.host, port, listen=True)
    server = await loop.create_server(lambda: AssociationProtocol(endpoint), sock=sock)
    tls_server, tls_gate = None, None
    if tls_port:
        from appliance.net.tls import TlsGate, server_context

        # The same Endpoint and Application as the plain port: only the handshake in front differs.
        tls_gate = TlsGate(config.tls, server_context(config.tls), lambda: AssociationProtocol(endpoint), metrics,
                           early_bytes_max=config.server.max_associate_rq_bytes, audit=audit)
        tls_server = await loop.create_server(tls_gate.protocol,
                                              sock=_listen_socket(config.server.host, tls_port, listen=True))
    def on_hurry() -> None:
        if not hurry.is_set():
            log.warning("second stop request: aborting the associations still open")
        hurry.set()
        stop.set()

    # SIGTERM only ever means "drain", however many arrive: a systemd stop with the default KillMode=control-group
    # sends it to every process of the unit and the supervisor forwards its own, so a worker gets two copies of one
    # stop. The supervisor counts the stop requests it gets and sends SIGUSR2 for "abort now".
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGUSR2, on_hurry)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGUSR2})  # pending ones arrive now
    follower = ConfigFollower(updates, endpoint, ctx) if updates is not None else None
    ready.put(os.getpid())

    async def flush_metrics() -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            try:
                metrics.flush()
            except Exception:  # metrics must never stop the worker, nor stop being written
                log.exception("writing metrics")

    flusher = asyncio.create_task(flush_metrics())
    access_flusher = asyncio.create_task(flush_periodically(access, config.tiering.access_flush_s, stop))
    await stop.wait()

    server.close()  # stop accepting; associations in progress go on (not after a storage fault: stop now)
    if tls_server is not None and tls_gate is not None:
        tls_server.close()
        tls_gate.close()
    if follower is not None:
        follower.close()
    deadline = time.monotonic() + (0.0 if faults else endpoint.config.server.drain_timeout_s)
    while endpoint.connections and time.monotonic() < deadline and not hurry.is_set():
        try:
            await asyncio.wait_for(hurry.wait(), 0.05)
        except TimeoutError:
            pass
    if endpoint.connections:
        log.warning("drain: %d connection(s) still open, aborting them", len(endpoint.connections))
    for assoc in list(endpoint.connections):
        assoc.abort(0x00, "shutting down", metric="shutdown")
    # Everything after the drain shares one budget (WORKER_TAIL_S), so the supervisor knows when to give up on us.
    tail_end = time.monotonic() + WORKER_TAIL_S

    def left(most: float) -> float:
        return max(0.1, min(most, tail_end - time.monotonic()))

    pending = [t for a in endpoint.connections for t in a.tasks]
    if pending:
        await asyncio.wait(pending, timeout=left(5))
    await asyncio.to_thread(committer.close)  # the last acknowledged instances' commit: never cut short
    if endpoint.ending:  # associations whose last stores were in the commit: their log and audit lines
        await asyncio.wait(endpoint.ending, timeout=left(3))
    await asyncio.to_thread(audit.close, left(3))
    flusher.cancel()
    metrics.flush()
    try:
        await asyncio.wait_for(access_flusher, left(5))  # the last notes, after the last retrieve
    except Exception:  # last access is a hint for the policies: never a reason to fail a shutdown
        log.exception("writing the last access notes")
    blobstore.close()
    index.close()
    if faults:
        # Fail-stop: after a failed fsync the page cache cannot be trusted; nothing more is acknowledged.
        log.critical("worker stopped after a storage fault: %s", faults[0])
        os._exit(EXIT_STORAGE_FAULT)


def _compact_main(config: Config) -> None:
    """A scheduled compaction, in its own process (an LMDB environment must not cross fork(), and a crash of the
    compactor must not take a worker with it). Crash-safe at every step, so the supervisor may kill it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from appliance.store.compact import compact

    index = StudyIndex(config.storage.index_path, config.storage.index_map_size, sync=config.storage.fsync)
    try:
        report = compact(config, index)
        if report.segments_compacted:
            log.info("compaction: %d segment(s) rewritten, %d records moved, %d bytes reclaimed",
                     report.segments_compacted, report.records_moved, report.bytes_reclaimed)
    except ApplianceError as exc:
        log.warning("compaction skipped: %s", exc)
    finally:
        index.close()


# ---- supervisor -------------------------------------------------------------------------------------


RECALLER_RESTART_S = 10.0
# /healthz says 503 when the supervisor loop (which turns every 0.2 s, and beats while it waits for workers) has
# not turned for this long.
HEARTBEAT_STALE_S = 5.0


class Supervisor(Lifecycle):
    def __init__(self, config: Config, port_file: Path | None = None) -> None:
        self.config = config
        self.port_file = port_file
        self.mp = multiprocessing.get_context("fork")
        self.ready = self.mp.Queue()
        from appliance.net.slots import SlotTable

        # Rows per association with their owner worker, so a worker that dies can have its slots released.
        self.slots = SlotTable(config.server.max_associations, self.mp)
        self.workers: list[ForkProcess] = []
        self.port = config.server.port
        self.tls_port = 0  # the TLS port once bound (0: TLS is off)
        self.metrics_port = 0
        self.stopping = False
        self.exit_code = 0
        self.metrics_dir = ""
        self.compactor: ForkProcess | None = None
        self.recaller: ForkProcess | None = None  # with [[tiers]]: polls the recall queue and recalls
        self.recaller_started = 0.0
        self.mover: ForkProcess | None = None  # tiering.schedule_s > 0: a policy run every schedule_s
        self.next_tier_run = time.monotonic() + config.tiering.schedule_s
        self.next_compaction = time.monotonic() + config.storage.compaction_interval_s
        self.http: Any = None
        self._init_lifecycle()

    def prepare(self) -> dict[str, int]:
        from appliance.store.compact import compaction_lock

        cfg = self.config
        # Not beside a running `appliance compact`: recovery would cut or delete the segment it is writing.
        with compaction_lock(cfg.storage.index_path, wait=True):
            index = StudyIndex(cfg.storage.index_path, cfg.storage.index_map_size, sync=cfg.storage.fsync)
            try:
                store = BlobStore.open(cfg, index=index, create_missing=cfg.volumes_builtin)
                try:
                    stats = recover(store, index, cfg.storage.duplicate_policy)
                finally:
                    store.close()
            finally:
                index.close()  # an LMDB environment must not cross fork()
        if any(stats.values()):
            log.info("recovery: %(spill_files)d spill files of interrupted receptions removed, %(reindexed)d durable "
                     "records beyond the index's last commit indexed (%(unreadable)d not indexable), "
                     "%(truncated_bytes)d torn bytes truncated, %(sealed)d segments sealed, %(deleted)d compacted "
                     "segments deleted, %(unknown_segments)d segment files unknown to the index left alone", stats)
        return stats

    def _spawn(self, worker: int) -> ForkProcess:
        # Always the config in force: a worker restarted after a reload starts with the reloaded one.
        receive, send = self.mp.Pipe(duplex=False)
        _widen_pipe(send)
        proc = self.mp.Process(target=_worker_main,
                               args=(self.config, self.port, self.ready, self.slots, worker, self.tls_port, receive),
                               name="appliance-worker", daemon=False)
        proc.start()
        receive.close()
        while len(self.updates) <= worker:
            self.updates.append(None)
        old = self.updates[worker]
        if old is not None:
            old.close()
        self.updates[worker] = send
        self.config_behind.discard(worker)  # it starts with self.config
        return proc

    def run(self) -> int:
        cfg = self.config
        # A SIGHUP during recovery (which can take a while) must not kill the supervisor (the default action): it is
        # remembered and done once the loop runs.
        signal.signal(signal.SIGHUP, self._on_signal)
        if not cfg.storage.fsync:
            log.warning("storage.fsync is false: acknowledged instances are NOT durable (benchmarking only)")
        self._check_tls()
        from appliance.audit import check_destination

        check_destination(cfg.audit)
        self._lock_index()
        self.prepare()
        self.metrics_dir = tempfile.mkdtemp(prefix="appliance-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        reserve = _listen_socket(cfg.server.host, cfg.server.port, listen=False)
        self.port = reserve.getsockname()[1]
        reserve_tls = _listen_socket(cfg.server.host, cfg.tls.port, listen=False) if cfg.tls.enabled else None
        self.tls_port = reserve_tls.getsockname()[1] if reserve_tls is not None else 0
        count = cfg.effective_workers()
        # Handlers first: a SIGTERM during start-up must still stop the workers, never orphan them.
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            self.workers = [self._spawn(i) for i in range(count)]
            self._await_ready(count)
            if cfg.server.metrics_enabled:
                try:
                    self._start_metrics()
                except OSError as exc:
                    raise ApplianceError(f"server.metrics_port {cfg.server.metrics_port} on "
                                         f"{cfg.server.metrics_host}: {exc.strerror}") from None
            self._write_port_file()
            self.volumes = VolumeSet.open(cfg)  # prepare() created them: /readyz reads their fill and markers
            notify.ready(self._status())
            log.info("AE %s listening on %s:%d%s with %d worker(s); metrics on %s", cfg.server.ae_title,
                     cfg.server.host, self.port, f" and TLS port {self.tls_port}" if self.tls_port else "", count,
                     f"http://{cfg.server.metrics_host}:{self.metrics_port}/metrics" if self.metrics_port else "off")
            while not self.stopping:
                self._beat()
                if self.reload_requested:
                    self.reload_requested = False
                    self._reload()
                if self.config_behind:
                    self._push_config()
                for i, proc in enumerate(self.workers):
                    if not proc.is_alive() and not self.stopping:
                        if proc.exitcode == EXIT_STORAGE_FAULT:
                            log.critical("worker %d stopped on a storage fault: stopping the appliance", proc.pid)
                            self.stopping = True
                            self.exit_code = EXIT_STORAGE_FAULT
                            break
                        freed = self.slots.reap(i)
                        log.error("worker %d exited with %s; %d association slot(s) released; restarting it",
                                  proc.pid, proc.exitcode, freed)
                        self._release_worker(proc)
                        self.ready_pids.discard(proc.pid or 0)
                        self.workers[i] = self._spawn(i)
                        self._await_ready(1)
                        notify.status(self._status())
                self._maybe_compact()
                self._keep_recaller()
                self._maybe_run_policies()
                time.sleep(0.2)
        finally:
            self._shutdown()
            reserve.close()
            if reserve_tls is not None:
                reserve_tls.close()
        return self.exit_code

    def _keep_recaller(self) -> None:
        """With tiers configured, one recaller process runs beside the workers (restarted if it dies: every step of
        a recall is crash-safe)."""
        if not self.config.tiers or self.stopping or (self.recaller is not None and self.recaller.is_alive()):
            return
        if self.recaller is not None:
            if self.recaller.exitcode == EXIT_STORAGE_FAULT:
                log.critical("the recaller stopped on a storage fault: stopping the appliance")
                self.stopping = True
                self.exit_code = EXIT_STORAGE_FAULT
                return
            if time.monotonic() - self.recaller_started < RECALLER_RESTART_S:
                return  # one that keeps failing (a tier gone) is not restarted in a tight loop
            log.error("the recaller exited with %s; restarting it", self.recaller.exitcode)
            self.recaller.join()
        from tiering.recall import recaller_main

        self.recaller_started = time.monotonic()
        self.recaller = self.mp.Process(target=recaller_main, args=(self.config,), name="appliance-recaller")
        self.recaller.start()

    def _maybe_run_policies(self) -> None:
        """Every tiering.schedule_s, a policy run in its own process (like compaction: an LMDB environment must not
        cross fork(), and the run is crash-safe at every step, so shutdown kills it). One at a time; a run finding
        tiering.lock held (an admin's `tier run`) skips its turn."""
        if self.mover is not None and not self.mover.is_alive() and self.mover.exitcode == EXIT_STORAGE_FAULT:
            log.critical("the scheduled policy run stopped on a storage fault: stopping the appliance")
            self.mover.join()
            self.mover = None
            self.stopping = True
            self.exit_code = EXIT_STORAGE_FAULT
            return
        interval = self.config.tiering.schedule_s
        if not interval or self.stopping or time.monotonic() < self.next_tier_run:
            return
        if self.mover is not None and self.mover.is_alive():
            return
        if self.mover is not None:
            self.mover.join()
        from tiering.run import scheduled_main

        self.next_tier_run = time.monotonic() + interval
        self.mover = self.mp.Process(target=scheduled_main, args=(self.config,), name="appliance-mover")
        self.mover.start()

    def _maybe_compact(self) -> None:
        interval = self.config.storage.compaction_interval_s
        if not interval or time.monotonic() < self.next_compaction:
            return
        if self.compactor is not None and self.compactor.is_alive():
            return  # the previous run is still going: one compactor at a time
        self.next_compaction = time.monotonic() + interval
        self.compactor = self.mp.Process(target=_compact_main, args=(self.config,), name="appliance-compactor")
        self.compactor.start()

    def _release_worker(self, proc: ForkProcess) -> None:
        """What a dead worker held: its spill files (its association slots are the network layer's), and its
        live gauges (associations open): without this a crashed worker's associations stay "active" on /metrics."""
        from appliance.store.spool import clear_tmp

        for vc in self.config.volumes:
            if proc.pid is not None:
                clear_tmp(str(vc.path / "tmp"), pid=proc.pid)
        if proc.pid is not None and self.metrics_dir:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(proc.pid, self.metrics_dir)

    def _await_ready(self, count: int, timeout: float = 60.0) -> None:
        """Wait for ``count`` workers to report that they listen; fail fast if one dies meanwhile."""
        deadline = time.monotonic() + timeout
        while count:
            self._beat()
            try:
                self.ready_pids.add(self.ready.get(timeout=0.2))
                count -= 1
                continue
            except queue.Empty:
                pass
            dead = [p for p in self.workers if not p.is_alive()]
            if dead:
                raise ApplianceError(f"worker {dead[0].pid} exited with {dead[0].exitcode} while starting")
            if self.stopping:
                return
            if time.monotonic() > deadline:
                raise ApplianceError(f"workers did not start within {timeout:.0f} s")

    def _lock_index(self) -> None:
        """One supervisor per index, and no silent port sharing with another program (SO_REUSEPORT would
        let a second process bind the same port and take half of the associations)."""
        cfg = self.config
        cfg.storage.index_path.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(cfg.storage.index_path / SERVE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexInUse(f"another appliance is serving the index {cfg.storage.index_path}") from None
        for port in (cfg.server.port, cfg.tls.port if cfg.tls.enabled else 0):
            if not port:
                continue
            probe = socket.socket(socket.AF_INET6 if ":" in cfg.server.host else socket.AF_INET)
            # SO_REUSEADDR as the real listeners have it: without it the probe fails while the previous run's
            # connections sit in TIME_WAIT (up to a minute after a burst or a kill -9), which is no conflict.
            # A live listener still makes it fail: the workers' sockets set SO_REUSEPORT, the probe does not.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((cfg.server.host, port))
            except OSError as exc:
                raise ApplianceError(f"port {port} on {cfg.server.host}: {exc.strerror}") from None
            finally:
                probe.close()

    def _check_tls(self) -> None:
        """The TLS files, checked before anything starts, so that a wrong path or key stops `serve` with one clear
        message (ConfigError) instead of every worker dying on it. Each worker builds its own context again."""
        from appliance.net.tls import client_context, server_context

        if any(peer.tls for peer in self.config.peers):
            client_context(self.config.tls)  # the files our outgoing TLS associations present and trust
        if self.config.tls.enabled:
            server_context(self.config.tls, warn=log.warning)

    def _shutdown(self) -> None:
        self.stopping = True
        notify.stopping("draining associations")
        log.info("draining associations and stopping workers")
        if self.compactor is not None and self.compactor.is_alive():
            self.compactor.kill()  # crash-safe at every step; the next run finishes its job
            self.compactor.join(10)
        if self.recaller is not None and self.recaller.is_alive():
            self.recaller.kill()  # likewise: a recall cut short is redone by the next one
            self.recaller.join(10)
        if self.mover is not None and self.mover.is_alive():
            self.mover.kill()  # likewise: the next run finishes the journaled move
            self.mover.join(10)
        for proc in self.workers:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        # The workers drain for up to drain_timeout_s, then abort, flush and close LMDB (at most a few seconds).
        # The loop keeps beating meanwhile: the drain is the supervisor working, not stuck.
        deadline = time.monotonic() + self.config.server.drain_timeout_s + WORKER_TAIL_S + 8
        while any(p.is_alive() for p in self.workers) and time.monotonic() < deadline:
            self._beat()
            for proc in self.workers:
                proc.join(0.1)
        for proc in self.workers:
            if proc.is_alive():
                log.error("worker %d did not stop within the drain timeout: killing it", proc.pid)
                proc.kill()
                proc.join(5)
        for send in self.updates:
            if send is not None:
                send.close()
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
        if self.port_file is not None:
            self.port_file.unlink(missing_ok=True)
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        log.info("stopped")

    def _start_metrics(self) -> None:
        from appliance import health
        from appliance.metrics import build_registry

        cfg = self.config.server
        self.http = health.start(cfg.metrics_host, cfg.metrics_port, build_registry(self.config),
                                 alive=lambda: time.monotonic() - self.heartbeat < HEARTBEAT_STALE_S,
                                 readiness=self.readiness)
        self.metrics_port = self.http.server_port

    def _write_port_file(self) -> None:
        if self.port_file is None:
            return
        tmp = self.port_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"port": self.port, "tls_port": self.tls_port, "metrics_port": self.metrics_port,
                                   "pid": os.getpid()}))
        os.rename(tmp, self.port_file)


def serve(config: Config, port_file: Path | None = None) -> int:
    # Blobs, tmp files and the index hold PHI: whatever this process and its workers create is private to the
    # service account (0600 files, 0700 folders), whatever umask the shell or unit had.
    os.umask(0o077)
    setup_logging(config.server.log_level, config.server.log_format)
    return Supervisor(config, port_file).run()
