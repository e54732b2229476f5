"""The audit trail (issue 12 item 5): one JSON line per association and per study stored, queried, retrieved,
moved, migrated, recalled or deleted, plus security alerts, in the spirit of DICOM PS3.15 A.5 (event names and
codes of A.5.3, participants of A.5.2): who (peer AE title and address), what (Study Instance UID and counts),
when, and the outcome (0 success, 4 minor failure, 8 serious failure, 12 major failure). Never a patient name or
patient ID, never a query's key values (they can hold names): docs/operations.md "Audit trail".

Cost on the hot path: a C-STORE adds one dict increment to its association's ``Session``; the study lines are
built when the association ends. Lines go through a bounded queue to a writer thread, so that writing can neither
block nor fail a C-STORE: a full queue drops the line and counts it (appliance_audit_dropped_total).

A bottom-level module: it imports only config_ops, the standard library and (lazily) prometheus_client, so the
network layer, the services and tiering may all use it (pyproject.toml import-linter contracts).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import queue
import socket
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.config_ops import AuditConfig
from appliance.errors import ConfigError

log = logging.getLogger(__name__)

# event -> (PS3.15 A.5.3 EventID code, its name, EventActionCode). The association itself has no A.5.3 message:
# its line is ours (the Active Participants it names are those PS3.15 would put in each transfer's message).
EVENTS: dict[str, tuple[str, str, str]] = {
    "association": ("", "Association", "E"),
    "store": ("DCM 110104", "DICOM Instances Transferred", "C"),
    "query": ("DCM 110112", "Query", "E"),
    "retrieve": ("DCM 110104", "DICOM Instances Transferred", "R"),  # C-GET: sent back to the requester
    "move": ("DCM 110104", "DICOM Instances Transferred", "R"),  # C-MOVE: sent to destination_ae
    "commitment": ("DCM 110103", "DICOM Instances Accessed", "R"),  # Storage Commitment request answered
    "migrate": ("DCM 110103", "DICOM Instances Accessed", "U"),  # tiering mover: the study's copies changed tier
    "recall": ("DCM 110103", "DICOM Instances Accessed", "U"),  # back online from a tier
    "delete": ("DCM 110103", "DICOM Instances Accessed", "D"),  # after a migrate, `appliance delete`, retention
    "security_alert": ("DCM 110113", "Security Alert", "E"),
    "hold": ("DCM 110103", "DICOM Instances Accessed", "U"),  # a legal hold placed or released (cli_delete.py)
}
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = 0, 4, 8, 12

# Security Alert EventTypeCodes (PS3.16 CID 403) used here.
NODE_AUTHENTICATION = "DCM 110126"  # association refused for its AE titles or host, TLS handshake failed
RESTRICTED_FUNCTION = "DCM 110132"  # "Use of Restricted Function": a peer without the right asked for it

# Studies counted per association: beyond it, one "other studies" aggregate line (study_uid null, "studies": n).
STUDIES_PER_ASSOCIATION_MAX = 1000
WARN_INTERVAL_S = 60.0
_counters: tuple[Any, Any] | None = None


def _metrics() -> tuple[Any, Any]:
    """appliance_audit_events_total{event}, appliance_audit_dropped_total{reason}: created on first use, after
    the server set PROMETHEUS_MULTIPROC_DIR (prometheus_client picks its storage when first imported)."""
    global _counters
    if _counters is None:
        from prometheus_client import Counter

        _counters = (Counter("appliance_audit_events", "Audit lines emitted", ["event"]),
                     Counter("appliance_audit_dropped", "Audit lines lost (queue full or write failed)", ["reason"]))
    return _counters


def utc_now() -> str:
    """UTC ISO 8601 with milliseconds: 2026-11-26T17:26:28.123Z."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def record(event: str, outcome: int, node: str, **fields: Any) -> dict[str, Any]:
    """One audit line as a dict, the common fields first. ``fields`` with the value None are left out."""
    event_id, event_name, action = EVENTS[event]
    out: dict[str, Any] = {"time": utc_now(), "event": event, "event_id": event_id, "event_name": event_name,
                           "action": fields.pop("action", action), "outcome": outcome, "node": node}
    for key in ("peer_ae", "peer_address", "tls", "study_uid", "instances", "bytes"):
        out[key] = fields.pop(key, None)
    out.update((k, v) for k, v in fields.items() if v is not None)
    return out


def encode(line: dict[str, Any]) -> bytes:
    return (json.dumps(line, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


# ---- destinations: where encoded lines go ------------------------------------------------------------------


class FileDestination:
    """JSON lines appended to ``path`` (0600, folder 0700) by any number of processes. Each line is one write()
    on an O_APPEND descriptor, so lines of two processes never interleave. Rotation at ``bytes_max`` keeps
    ``files_max`` files in all (path, path.1 ... path.N-1) and runs under an flock on ``path.lock``; the other
    processes see that ``path`` is another inode (as logging.handlers.WatchedFileHandler does) and reopen. A line
    a process wrote to its old descriptor after the rename lands at the end of path.1: nothing is lost."""

    def __init__(self, path: Path, bytes_max: int, files_max: int) -> None:
        self.path = path
        self.bytes_max = bytes_max
        self.files_max = files_max
        self.lock_path = path.with_name(path.name + ".lock")
        if not path.parent.is_dir():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.fd = -1
        self.inode = (0, 0)
        self._open()

    def _open(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        st = os.fstat(self.fd)
        self.inode = (st.st_dev, st.st_ino)

    def _moved(self) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        return (st.st_dev, st.st_ino) != self.inode

    def write(self, data: bytes) -> None:
        if self._moved():
            self._open()
        if os.fstat(self.fd).st_size + len(data) > self.bytes_max:
            self._rotate(len(data))
        view = memoryview(data)
        while view:  # one write() for a line in practice; a short write (disk full) finishes or raises
            view = view[os.write(self.fd, view):]

    def _rotate(self, incoming: int) -> None:
        lock = os.open(self.lock_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self._moved():  # another process rotated while we waited for the lock
                self._open()
                if os.fstat(self.fd).st_size + incoming <= self.bytes_max:
                    return
            for n in range(self.files_max - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{n}")
                if n == self.files_max - 1:
                    older.unlink(missing_ok=True)
                elif older.exists():
                    older.rename(self.path.with_name(f"{self.path.name}.{n + 1}"))
            if self.files_max > 1:
                self.path.rename(self.path.with_name(f"{self.path.name}.1"))
            else:
                self.path.unlink(missing_ok=True)
            self._open()
        finally:
            os.close(lock)  # releases the flock

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


JOURNAL_SOCKET = "/run/systemd/journal/socket"


class JournalDestination:
    """journald's native protocol (systemd.io/JOURNAL_NATIVE_PROTOCOL): one datagram per line with
    SYSLOG_IDENTIFIER=appliance-audit, so `journalctl -t appliance-audit -o cat` prints the JSON lines. A few lines
    of the documented protocol instead of systemd-python, a C extension that needs libsystemd-dev to build. Our
    lines hold no newline and stay far below the datagram limit, so the simple KEY=value form is enough."""

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        self.address = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def write(self, data: bytes) -> None:
        self.sock.sendto(b"SYSLOG_IDENTIFIER=appliance-audit\nPRIORITY=6\nMESSAGE=" + data, self.address)

    def close(self) -> None:
        self.sock.close()


# ---- sinks: what the code emits to ----------------------------------------------------------------------------


class Sink:
    """Where a process's audit lines go. This base drops everything (destination "off", unit tests)."""

    def __init__(self, node: str = "") -> None:
        self.node = node
        self.last_warning = 0.0
        self.unwarned = 0
        self.lost_why: str | None = None  # why the last line was lost (write_once reports it to its caller)

    def emit(self, event: str, outcome: int = SUCCESS, **fields: Any) -> None:
        """Never raises, never blocks."""

    def close(self, timeout: float = 5.0) -> None:
        pass

    def rejected(self, peer_ae: str, peer_address: str, tls: bool, why: str, alert: bool) -> None:
        """An association rejected; ``alert``: for who the peer is (AE titles, host), not for a limit, so a
        Security Alert (Node Authentication) too."""
        peer = {"peer_ae": peer_ae, "peer_address": peer_address, "tls": tls}
        if alert:
            self.emit("security_alert", MINOR_FAILURE, alert_type=NODE_AUTHENTICATION, reason=why, **peer)
        self.emit("association", MINOR_FAILURE, result="rejected", reason=why, **peer)

    def _lost(self, reason: str, why: str) -> None:
        self.lost_why = why
        _metrics()[1].labels(reason).inc()
        self.unwarned += 1
        now = time.monotonic()
        if now - self.last_warning >= WARN_INTERVAL_S:  # rate-limited: a full disk must not flood the log too
            log.warning("audit: %d line(s) lost (%s)", self.unwarned, why)
            self.last_warning, self.unwarned = now, 0


class WriterSink(Sink):
    """Lines queued (bounded by ``queue_max``) and written by one daemon thread; with ``threaded=False`` written
    at once by the caller (batch commands: the mover, the recaller, the CLI, where the line must be out before the
    process exits and there is no event loop to protect)."""

    def __init__(self, destination: FileDestination | JournalDestination, node: str, queue_max: int,
                 threaded: bool = True) -> None:
        super().__init__(node)
        self.destination = destination
        self.queue: queue.Queue[dict[str, Any] | None] | None = None
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()
        if threaded:
            self.queue = queue.Queue(queue_max)
            self.thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
            self.thread.start()

    def emit(self, event: str, outcome: int = SUCCESS, **fields: Any) -> None:
        try:
            line = record(event, outcome, self.node, **fields)
            _metrics()[0].labels(event).inc()
        except Exception:  # a bug here must not fail the operation being audited
            log.exception("audit: building a %s line", event)
            return
        if self.queue is None:
            self._write(line)
            return
        try:
            self.queue.put_nowait(line)
        except queue.Full:
            self._lost("queue_full", "audit.queue_max lines waiting: the writer cannot keep up")

    def _write(self, line: dict[str, Any]) -> None:
        try:
            with self.lock:
                self.destination.write(encode(line))
        except Exception as exc:  # disk full, journald gone: counted and warned, never raised
            self._lost("write_error", f"{type(exc).__name__}: {exc}")

    def _run(self) -> None:
        assert self.queue is not None
        while True:
            line = self.queue.get()
            if line is None:
                return
            self._write(line)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (up to ``timeout`` seconds), then close the destination."""
        if self.queue is not None and self.thread is not None:
            try:
                self.queue.put(None, timeout=timeout)
            except queue.Full:
                pass
            self.thread.join(timeout)
        with self.lock:
            self.destination.close()


def open_sink(config: AuditConfig, node: str, threaded: bool = True) -> Sink:
    """The sink for ``config``; "off", or a destination that cannot be opened (logged), gives one that drops."""
    try:
        if config.destination == "file":
            return WriterSink(FileDestination(config.path, config.file_bytes_max, config.files_max), node,
                              config.queue_max, threaded)
        if config.destination == "journald":
            return WriterSink(JournalDestination(), node, config.queue_max, threaded)
    except OSError as exc:
        log.error("audit: cannot open %s (%s): audit lines will be lost", config.path, exc)
        return UnavailableSink(node, f"destination unavailable: {exc.strerror or exc}")
    return Sink(node)


class UnavailableSink(Sink):
    """A destination that could not be opened: every line is counted as dropped (reason "unavailable"), so the
    loss shows on /metrics and in a rate-limited warning instead of a silent trail."""

    def __init__(self, node: str, why: str) -> None:
        super().__init__(node)
        self.why = why

    def emit(self, event: str, outcome: int = SUCCESS, **fields: Any) -> None:
        self._lost("unavailable", self.why)


def check_destination(config: AuditConfig) -> None:
    """At start, before any worker: a trail that cannot be written is a configuration for a person to fix (a path
    under the read-only /etc of the systemd unit, a missing folder permission), not a loss to find out later."""
    if config.destination != "file":
        return
    try:
        FileDestination(config.path, config.file_bytes_max, config.files_max).close()
    except OSError as exc:
        raise ConfigError(f"audit.path {config.path}: {exc.strerror or exc} (destination = \"off\" runs without "
                          "an audit trail)") from None


def write_once(config: AuditConfig, node: str, event: str, outcome: int = SUCCESS, **fields: Any) -> str | None:
    """One line from a batch command (recall, migrate, delete): written before returning, never raising. Returns
    None when the line was written (or the trail is off), else why it was lost (counted in
    appliance_audit_dropped_total and logged): a caller whose operation already happened reports it and goes on."""
    try:
        sink = open_sink(config, node, threaded=False)
        try:
            sink.emit(event, outcome, **fields)
        finally:
            sink.close()
    except Exception as exc:  # the operation audited is done: a failure here must not undo or hide it
        log.error("audit: writing a %s line: %s: %s", event, type(exc).__name__, exc)
        return f"{type(exc).__name__}: {exc}"
    return sink.lost_why


# ---- one association ----------------------------------------------------------------------------------------


class Session:
    """What one association did, counted as it goes and written when it ends: one "store" line per study (not
    per instance: a CT is thousands of them) and one "association" line. The services reach it through
    net/service.py Request.session; the association (net/association.py) opens and ends it."""

    __slots__ = ("sink", "peer_ae", "peer_address", "tls", "started", "studies", "other",
                 "stored", "failed", "statuses", "requests", "refusals", "duplicates", "ended")

    def __init__(self, sink: Sink, peer_ae: str, peer_address: str, tls: bool) -> None:
        self.sink = sink
        self.peer_ae = peer_ae
        self.peer_address = peer_address
        self.tls = tls
        self.started = time.monotonic()
        self.studies: dict[str, list[int]] = {}  # study UID ("" unknown) -> [stored, failed, bytes, replaced]
        self.other = [0, 0, 0, 0]  # the studies beyond STUDIES_PER_ASSOCIATION_MAX, added up
        self.stored = 0
        self.failed = 0
        self.statuses: dict[str, int] = {}  # failure status "0xA700" -> count (a handful of distinct values)
        self.requests: dict[str, int] = {}  # "C-FIND" -> count
        self.refusals: dict[str, int] = {}  # right refused ("store") -> count
        # Re-sent SOP Instance UIDs answered Success without storing new bytes ("kept-first", "identical",
        # "superseded") or replacing the stored ones ("replaced"): never silent (issue 13), in the end line and the
        # association's audit line.
        self.duplicates: dict[str, int] = {}
        self.ended = False

    def _study(self, study_uid: str) -> list[int]:
        counts = self.studies.get(study_uid)
        if counts is None:
            if len(self.studies) < STUDIES_PER_ASSOCIATION_MAX:
                counts = self.studies[study_uid] = [0, 0, 0, 0]
            else:
                counts = self.other  # how many studies it holds is not kept: a set of them would be unbounded
        return counts

    def instance_stored(self, study_uid: str, nbytes: int, replaced: bool = False, duplicate: str = "") -> None:
        """``replaced``: it overwrote a stored instance with other bytes (a peer with allow_overwrite): the old
        version is deleted (compaction reclaims it), so the store line counts it. ``duplicate``: the index's
        outcome for a re-sent instance ("" for a new one)."""
        counts = self._study(study_uid)
        counts[0] += 1
        counts[2] += nbytes
        counts[3] += replaced
        self.stored += 1
        if duplicate:
            self.duplicates[duplicate] = self.duplicates.get(duplicate, 0) + 1

    def instance_failed(self, study_uid: str, status: int) -> None:
        self._study(study_uid)[1] += 1
        self.failed += 1
        key = f"0x{status:04X}"
        if key in self.statuses or len(self.statuses) < 32:
            self.statuses[key] = self.statuses.get(key, 0) + 1

    def refused(self, right: str, status: int) -> None:
        """A request refused for want of ``right``: one Security Alert per right and association (a peer without
        the store right sending a 3000-instance CT is one alert, not 3000), all counted in the association line."""
        seen = self.refusals.get(right, 0)
        if seen == 0 and len(self.refusals) >= 16:
            return
        self.refusals[right] = seen + 1
        if not seen:
            self.emit("security_alert", MINOR_FAILURE, alert_type=RESTRICTED_FUNCTION, right=right,
                      status=f"0x{status:04X}")

    def request(self, kind: str) -> None:
        self.requests[kind] = self.requests.get(kind, 0) + 1

    def emit(self, event: str, outcome: int = SUCCESS, **fields: Any) -> None:
        """A line naming this association's peer (query, retrieve, move, commitment, security alert)."""
        self.sink.emit(event, outcome, peer_ae=self.peer_ae, peer_address=self.peer_address, tls=self.tls, **fields)

    @property
    def duration_s(self) -> float:
        return time.monotonic() - self.started

    async def end_after(self, tasks: list[asyncio.Task[None]], how: str) -> None:
        """``end`` once the association's handlers still running (stores in the group commit) are done."""
        await asyncio.wait(tasks, timeout=60)
        self.end(how)

    def end(self, how: str) -> None:
        """``how``: "released" or "aborted". The log line, the store lines, then the association line; once."""
        if self.ended:
            return
        self.ended = True
        # One info line per association, never one per instance, and no UIDs at info (docs/operations.md "Logs").
        dups = "".join(f", {n} {kind}" for kind, n in sorted(self.duplicates.items()))
        log.info("association from %s (%s): %d stored, %d failed, %.1f s, %s%s", self.peer_ae, self.peer_address,
                 self.stored, self.failed, self.duration_s, how, f"; re-sent:{dups[1:]}" if dups else "")
        for study_uid, (stored, failed, nbytes, replaced) in self.studies.items():
            self.emit("store", _outcome(stored, failed), study_uid=study_uid or None, instances=stored, bytes=nbytes,
                      failed=failed or None, replaced=replaced or None)
        stored, failed, nbytes, replaced = self.other
        if stored or failed:
            self.emit("store", _outcome(stored, failed), instances=stored, bytes=nbytes, failed=failed or None,
                      replaced=replaced or None, other_studies=True)
        self.emit("association", SUCCESS if how == "released" else MINOR_FAILURE, result=how,
                  instances=self.stored, failed=self.failed, studies=len(self.studies),
                  bytes=sum(c[2] for c in self.studies.values()) + self.other[2],
                  requests=self.requests or None, statuses=self.statuses or None, refused=self.refusals or None,
                  duplicates=self.duplicates or None,
                  duration_s=round(self.duration_s, 3))


def _outcome(done: int, failed: int) -> int:
    if not failed:
        return SUCCESS
    return MINOR_FAILURE if done else SERIOUS_FAILURE
