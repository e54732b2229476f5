"""The supervisor's side of the lifecycle (issue 12): signals, SIGHUP reload, the heartbeat and systemd's watchdog,
and what /readyz reports. A mixin of server.Supervisor, kept apart so the process management stays readable.

Signals only set flags (or forward a signal): the supervisor's loop does the work, so a handler never reads a file
or writes a pipe in the middle of whatever the loop was doing.
"""

from __future__ import annotations

import fcntl
import logging
import os
import pickle
import signal
import struct
import termios
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.context import ForkProcess
from typing import Any

from appliance import notify
from appliance.config import Config
from appliance.health import volume_reasons
from appliance.store.volumes import VolumeSet

log = logging.getLogger("appliance")
# A worker exits with this code after a storage fault (failed fsync or LMDB I/O error): the supervisor then stops
# the whole appliance instead of restarting the worker (sysexits' EX_IOERR).
EXIT_STORAGE_FAULT = 74


class Lifecycle:
    config: Config
    workers: list[ForkProcess]
    port: int
    stopping: bool
    exit_code: int
    next_tier_run: float
    # The write end of each worker's config pipe (created before its fork): a reload sends the new Config there.
    updates: list[Connection | None]
    ready_pids: set[int]  # workers that reported they listen
    reload_requested: bool
    config_behind: set[int]  # workers the config in force has yet to be sent to
    hurried: bool  # a second SIGTERM/SIGINT: the drain is cut short
    heartbeat: float  # the supervisor loop's last turn (/healthz)
    watchdog_s: float
    watchdog_at: float
    volumes: VolumeSet | None  # the supervisor's own view of the volumes, for /readyz
    _volumes_lock: threading.Lock

    def _init_lifecycle(self) -> None:
        self.updates = []
        self.ready_pids = set()
        self.reload_requested = False
        self.config_behind = set()
        self.hurried = False
        self.heartbeat = time.monotonic()
        self.watchdog_s = notify.watchdog_interval_s()
        self.watchdog_at = 0.0
        self.volumes = None
        self._volumes_lock = threading.Lock()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGHUP:
            self.reload_requested = True  # done by the loop: a handler must not read files or write pipes
        elif self.stopping:
            self._hurry()
        else:
            self.stopping = True

    def _hurry(self) -> None:
        """A second SIGTERM/SIGINT during the drain: the workers abort what is still open at once (SIGUSR2: a
        worker takes any SIGTERM as "drain", since it may get several copies of one stop)."""
        if self.hurried:
            return
        self.hurried = True
        for proc in self.workers:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGUSR2)

    def _beat(self) -> None:
        """One turn of the supervisor loop: the heartbeat /healthz reads, and WATCHDOG=1 when it is due. Only from
        the loop (never from a thread), so that a stuck loop stops both and systemd restarts the service."""
        now = time.monotonic()
        self.heartbeat = now
        if self.watchdog_s and now - self.watchdog_at >= self.watchdog_s:
            self.watchdog_at = now
            notify.watchdog()

    def _status(self) -> str:
        alive = sum(1 for p in self.workers if p.is_alive())
        return f"serving: {alive}/{len(self.workers)} worker(s) on port {self.port}"

    def _reload(self) -> None:
        """SIGHUP: re-read and validate the config file; apply what can change live, name what needs a restart."""
        from appliance.reload import reread

        notify.reloading()
        try:
            change = reread(self.config)
        except Exception as exc:  # whatever goes wrong in a reload must not stop a serving appliance
            log.exception("reload refused, the configuration in force stays")
            change = f"{type(exc).__name__}: {exc}"
        if isinstance(change, str):
            notify.ready(f"reload refused: {change[:200]}")
            return
        if change.applied:
            self.config = change.config
            logging.getLogger().setLevel(getattr(logging, self.config.server.log_level.upper()))
            if self.config.tiering.schedule_s:
                self.next_tier_run = min(self.next_tier_run, time.monotonic() + self.config.tiering.schedule_s)
            self.config_behind = set(range(len(self.updates)))
            self._push_config()
        notify.ready(self._status() + (f"; restart needed for {len(change.needs_restart)} setting(s)"
                                       if change.needs_restart else ""))

    def _push_config(self) -> None:
        """Send the config in force to the workers that do not have it yet, with at most one Config waiting in a
        pipe: a worker that has not read the previous one (two SIGHUPs in a row, a busy loop) gets the latest at a
        later turn of the loop, and a stuck worker can never block the supervisor on a full pipe."""
        for i in sorted(self.config_behind):
            send = self.updates[i] if i < len(self.updates) else None
            if send is not None:
                unread = struct.unpack("i", fcntl.ioctl(send.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
                if unread:
                    continue
                data = pickle.dumps(self.config)
                # Connection.send adds a 4-byte length (8 beyond 2 GiB); into an empty pipe at least this big the
                # write completes at once, so a stuck worker can never block the supervisor (and its watchdog).
                if len(data) + 8 > fcntl.fcntl(send.fileno(), fcntl.F_GETPIPE_SZ):
                    log.error("reload: the configuration (%d bytes pickled) is larger than the pipe to worker %d: "
                              "restart the appliance to apply it", len(data), i)
                    self.config_behind.discard(i)
                    continue
                try:
                    send.send_bytes(data)
                except OSError as exc:  # that worker is dying: its restart takes self.config anyway
                    log.warning("reload: worker %d did not take the new configuration: %s", i, exc)
            self.config_behind.discard(i)

    def readiness(self) -> list[str]:
        """Why the appliance would not take work now ([] when it would). Called from the HTTP threads."""
        reasons: list[str] = []
        if self.stopping:
            reasons.append("draining: the appliance is stopping")
        if self.exit_code == EXIT_STORAGE_FAULT:
            reasons.append("storage fault")
        for i, proc in enumerate(list(self.workers)):
            if proc.pid not in self.ready_pids or not proc.is_alive():
                reasons.append(f"worker {i} is not listening")
        if not (self.config.storage.index_path / "data.mdb").is_file():
            reasons.append("index: no data.mdb")
        if self.volumes is None:
            return [*reasons, "volumes not open yet"]
        with self._volumes_lock:  # Volume caches its statvfs: one reader at a time
            return reasons + volume_reasons(self.volumes)

