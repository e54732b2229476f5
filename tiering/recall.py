"""Recalls: bring studies whose only copies are on tape back onto the online volumes.

A recall is queued in the index (``request_recall``: by `appliance tier recall`, by a C-MOVE / C-GET / export of
an offline study). The recaller (a process the server's supervisor starts while recalls are queued, or the CLI
when no server runs) works in batches of ``tiering.recall_batch_max`` studies, ordered by where their tape copies
lie (cartridge, tape file, offset), so that one pass over a cartridge serves many requests:

1. copy every blob of the batch that has no online copy to the online volumes: its own segment writer, whose
   segments register themselves in the index before their first byte (as a worker's do), each blob hashed on
   the way (a tape copy that does not hash to its name is never brought online);
2. ``sync`` (StorageFault: stop, never retry), then one index transaction records how far its segments are
   committed (recovery keeps those bytes), then each new copy is re-read and re-hashed from the volume;
3. per study, ``switch_study`` (one durable transaction): the online copies added, the tape copies kept, every
   instance ONLINE, the recall request deleted, last access = now (the policies take the study down again later).

Crash anywhere: before 3, the copies are dead bytes in a segment (compaction reclaims them) and the request is still
queued, so the next run redoes the study; after 3, it is done. Nothing is indexed twice: the switch is one
transaction and names each new copy once. One recaller at a time (flock ``recall.lock`` beside the index).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from appliance.config import Config
from appliance.errors import ApplianceError, BlobMissing, OutOfSpace, StorageFault
from appliance.index.db import SERVE_LOCK, StudyIndex
from appliance.index.schema import COPY_OK, ONLINE_TIER, BlobRecord, Copy, InstanceRecord
from appliance.store.backend import BlobBackend, BlobMeta, BlobSource
from appliance.store.online import BlobStore
from appliance.store.segments import SegmentBackend, committed_ends, segment_copy
from tiering.tiers import availability_of

log = logging.getLogger(__name__)

RECALL_LOCK = "recall.lock"
EXIT_STORAGE_FAULT = 74  # as a worker's (appliance/server.py): the supervisor stops the appliance
# A study whose recall failed this many times is left queued (with its error, for `tier status`) but no longer
# retried by the server's recaller: a damaged cartridge must not keep a drive busy forever. `appliance tier recall
# UID` retries it.
RECALL_ATTEMPTS_MAX = 3
# Instances one recall batch holds at most (beyond one study, which always goes alone): the batch keeps every new
# copy until its sync and switch (~300 bytes each), so recall_batch_max studies of tiering.study_instances_max
# instances must not be held at once (64 x 100,000 would be gigabytes). Large enough that a batch of ordinary
# studies (hundreds of instances each) fills recall_batch_max.
RECALL_BATCH_INSTANCES_MAX = 200_000
# Test-only: kill -9 the recaller at one phase (tests/crash/test_recall_crash.py).
CRASH_ENV = "APPLIANCE_TEST_RECALL_CRASH_AT"
PHASES = ("copying", "copy", "synced", "committed", "switched")  # copying: after the first put, mid-batch

StudyBlobs = list[tuple[str, str, BlobRecord, InstanceRecord]]


@dataclass
class RecallReport:
    studies: int = 0  # switched online
    instances: int = 0
    bytes_copied: int = 0
    bytes_from: dict[str, int] = field(default_factory=dict)  # source tier -> bytes (the metric's from_tier)
    failed: dict[str, str] = field(default_factory=dict)  # study UID -> error
    latencies_s: list[float] = field(default_factory=list)  # request -> online, per study
    busy: bool = False  # another recaller holds the lock


def _crash_point(phase: str) -> None:
    if os.environ.get(CRASH_ENV) == phase:
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def recall_lock(index_path: Path) -> Iterator[bool]:
    """Yields True when this process holds the lock, False when another recaller runs."""
    fd = os.open(index_path / RECALL_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def tape_position(location: str) -> tuple[str, int, int]:
    """(cartridge, tape file, record offset) of a tape location ``<cartridge>/<file>:<record>:<data>:<stored>:<size>``
    (docs/tiering-internals.md); a location of another form sorts by its text."""
    container, _, rest = location.partition(":")
    cartridge, _, tape_file = container.rpartition("/")
    try:
        return cartridge, int(tape_file), int(rest.split(":", 1)[0])
    except ValueError:
        return location, 0, 0


class _HashingSource(BlobSource):
    """The blob's bytes from its best copy (tape allowed), hashed on the way."""

    def __init__(self, store: BlobStore, digest: str, blob: BlobRecord) -> None:
        self.store, self.digest, self.blob, self.size = store, digest, blob, blob.size
        self.hasher = hashlib.sha256()

    def chunks(self, chunk_bytes: int) -> Iterator[bytes]:
        for chunk in self.store.open_blob(self.digest, self.blob, allow_offline=True):
            self.hasher.update(chunk)
            yield chunk


class Recaller:
    def __init__(self, config: Config, index: StudyIndex, store: BlobStore,
                 clock: Callable[[], int] = time.time_ns, retry_failed: bool = False) -> None:
        self.config, self.index, self.store, self.clock = config, index, store, clock
        self.retry_failed = retry_failed
        self.online = set(store.backends)
        self.source: dict[str, str] = {}  # digest -> the tier it was recalled from

    def _position(self, blobs: StudyBlobs) -> tuple[str, int, int]:
        positions = [tape_position(c.location) for _s, _d, blob, _i in blobs for c in blob.copies
                     if self.store.is_offline(c)]
        return min(positions) if positions else ("", 0, 0)

    def next_batch(self, seen: set[str]) -> list[tuple[str, int]]:
        """Up to recall_batch_max queued studies not tried in this run, ordered by tape position, and within
        RECALL_BATCH_INSTANCES_MAX instances: (study key, requested_ns). Each study's blobs are read for its
        position and let go (memory: one study's records at a time, not the batch's); ``_recall`` reads them again."""
        found = []
        for key, rec in self.index.recalls():
            if key in seen or (rec.attempts >= RECALL_ATTEMPTS_MAX and not self.retry_failed):
                continue
            blobs = self.index.study_blobs(key)
            if not blobs:  # deleted since it was queued
                seen.add(key)
                self.index.forget_recall(key)
                continue
            found.append((self._position(blobs), key, rec.requested_ns, len(blobs)))
            del blobs
            if len(found) >= self.config.tiering.recall_batch_max * 4:
                break  # enough to order one batch well; bounded memory whatever the queue holds
        found.sort(key=lambda item: (item[0], item[1]))
        batch: list[tuple[str, int]] = []
        instances = 0
        for _pos, key, requested, count in found[: self.config.tiering.recall_batch_max]:
            if batch and instances + count > RECALL_BATCH_INSTANCES_MAX:
                break  # the rest waits for the next batch (not marked seen)
            seen.add(key)
            batch.append((key, requested))
            instances += count
        return batch

    def run(self, batches_max: int = 1 << 30) -> RecallReport:
        report = RecallReport()
        seen: set[str] = set()
        for _ in range(batches_max):
            batch = self.next_batch(seen)
            if not batch:
                break
            self._recall(batch, report)
        self._seal()
        return report

    def _recall(self, batch: list[tuple[str, int]], report: RecallReport) -> None:
        self.source = {}  # per batch: bounded by the batch
        added: dict[str, dict[str, Copy]] = {}
        used: dict[str, SegmentBackend] = {}
        todo: list[tuple[str, int, int]] = []  # study key, requested_ns, instances
        for key, requested_ns in batch:
            try:
                blobs = self.index.study_blobs(key)  # one study's records at a time (next_batch let them go)
                if not blobs:  # deleted since next_batch
                    self.index.forget_recall(key)
                    continue
                added[key] = self._copy_study(blobs, used)
                todo.append((key, requested_ns, len(blobs)))
                del blobs
            except OutOfSpace:
                raise
            except ApplianceError as exc:
                self._failed(key, f"{type(exc).__name__}: {exc}", report)
        _crash_point("copy")
        for backend in used.values():
            backend.sync()  # StorageFault propagates: fail-stop
        _crash_point("synced")
        copies = [c for study in added.values() for c in study.values()]
        for name, backend in used.items():
            backend.publish([c.location for c in copies if c.backend == name])
        sealed = [(b.name, s) for b in used.values() for s in b.take_sealed()]
        if copies or sealed:
            self.index.apply([], self.config.storage.duplicate_policy, committed_ends(copies), sealed)
        _crash_point("committed")
        for key, requested_ns, instances in todo:
            bad = [d for d, c in added[key].items() if self.store.backends[c.backend].sha256(c.location) != d]
            if bad:  # read back wrong from the volume just written: leave the tape copies named, retry later
                self._failed(key, f"{len(bad)} copies did not re-read right from the online volume", report)
                continue
            now = self.clock()
            # Availability from the copies as the switch finds them (a mover may have switched the study since
            # it was read: an instance whose only copy is now on tape stays OFFLINE).
            self.index.switch_study(key, added[key], set(), functools.partial(availability_of, self.config),
                                    ONLINE_TIER, now, move_done=False)
            _crash_point("switched")
            report.studies += 1
            report.instances += instances
            study_bytes = 0
            for digest, copy in added[key].items():
                size = self.store.backends[copy.backend].stat(copy.location).size
                study_bytes += size
                source = self.source.get(digest, "")
                report.bytes_from[source] = report.bytes_from.get(source, 0) + size
            report.bytes_copied += study_bytes
            latency_s = max(0.0, (now - requested_ns) / 1e9)
            report.latencies_s.append(latency_s)
            # One audit line per study, right after its switch (as the movers do): no patient data.
            sources = sorted({self.source.get(d, "") for d in added[key]} - {""})
            append_audit(self.config, {"event": "recall", "study": key.rsplit("\x00", 1)[-1],
                                       "from": ",".join(sources), "to": ONLINE_TIER, "instances": instances,
                                       "bytes": study_bytes, "seconds": round(latency_s, 3),
                                       "outcome": "recalled"})
            log.info("recalled a study online: %d instances", instances)
            log.debug("recalled study %s", key.rsplit("\x00", 1)[-1])

    def _copy_study(self, blobs: StudyBlobs, used: dict[str, SegmentBackend]) -> dict[str, Copy]:
        """Copy each blob of the study without an online copy; its new copies by digest. Blobs in tape order."""
        added: dict[str, Copy] = {}
        order = sorted(((d, b, i) for _s, d, b, i in blobs), key=lambda t: min(
            (tape_position(c.location) for c in t[1].copies), default=("", 0, 0)))
        for digest, blob, inst in order:
            if digest in added or any(c.backend in self.online and c.state == COPY_OK for c in blob.copies):
                continue  # (an online copy verify found missing or corrupt does not count: recalled again)
            volume = self.store.volumes.pick(blob.size)
            if volume is None:
                raise OutOfSpace("no online volume can take a recalled study (all above their watermark)")
            backend = self.store.segment_backend(volume.name)
            meta = self._meta(digest, blob, inst)
            source = _HashingSource(self.store, digest, blob)
            location = backend.put(meta, source)
            if source.hasher.hexdigest() != digest:
                raise BlobMissing("a tape copy does not hash to its name; not recalled (run `appliance verify`)")
            used[backend.name] = backend
            _crash_point("copying")
            self.source[digest] = next((c.backend for c in self.store.read_order(blob)
                                        if c.backend in self.store.tiers), "")
            added[digest] = segment_copy(backend.name, location, meta.received_ns)
        return added

    def _meta(self, digest: str, blob: BlobRecord, inst: InstanceRecord) -> BlobMeta:
        """The provenance the tier stored with the blob (its duplicate policy included), else the index's."""
        for copy in self.store.read_order(blob):
            backend = self.store.backend_of(copy)
            if backend is None:
                continue
            try:
                meta = backend.stat(copy.location)
            except (ApplianceError, OSError):
                continue
            if meta.digest == digest and meta.size == blob.size:
                return meta
        received = min((c.received_ns for c in blob.copies if c.received_ns), default=inst.received_ns)
        return BlobMeta(digest, blob.size, received, inst.calling_ae)

    def _failed(self, key: str, error: str, report: RecallReport) -> None:
        uid = key.rsplit("\x00", 1)[-1]
        log.error("a recall failed (it stays queued): %s", error)
        report.failed[uid] = error
        self.index.recall_failed(key, error)

    def _seal(self) -> None:
        """Seal the recaller's own segments when it is done with them, so that compaction can take them."""
        for name in self.online:
            backend = self.store.segment_backend(name)
            if backend.active is None:
                continue
            backend.seal_active()
            backend.sync()
            self.index.apply([], self.config.storage.duplicate_policy, None,
                             [(name, s) for s in backend.take_sealed()])


def append_audit(config: Config, record: dict[str, object]) -> None:
    """One line in the tiering audit log (tiering/audit.py: fsynced, no patient data)."""
    from tiering.audit import AuditLog

    fields = dict(record)
    event = str(fields.pop("event"))
    with AuditLog(config.tiering.audit_log) as audit:
        audit.write(event, **fields)
    # The appliance's audit trail (appliance/audit.py) gets the same recall, in its own fields.
    from appliance.audit import SERIOUS_FAILURE, SUCCESS, write_once

    ok = fields.get("outcome") == "recalled"
    write_once(config.audit, config.server.ae_title, "recall", SUCCESS if ok else SERIOUS_FAILURE,
               study_uid=fields.get("study"), instances=fields.get("instances"), bytes=fields.get("bytes"),
               from_tier=fields.get("from"), to_tier=fields.get("to"), duration_s=fields.get("seconds"),
               reason=fields.get("error"))


def recall_queued(config: Config, index: StudyIndex, store: BlobStore, retry_failed: bool = False,
                  clock: Callable[[], int] = time.time_ns, batches_max: int = 1 << 30) -> RecallReport:
    """Run the queued recalls under ``recall.lock`` (report.busy when another recaller holds it). ``store`` must
    have been opened with ``index`` (its segments register themselves) and with the tiers."""
    with recall_lock(config.storage.index_path) as held:
        if not held:
            return RecallReport(busy=True)
        report = Recaller(config, index, store, clock, retry_failed).run(batches_max)
    for uid, error in report.failed.items():
        append_audit(config, {"event": "recall", "study": uid, "outcome": "failed", "error": error})
    return report


def open_tiers(config: Config) -> dict[str, BlobBackend]:
    """Every configured tier's backend, fastest first (what BlobStore reads after the online volumes). A tier that
    cannot be opened (its NAS unmounted, the library gone) is left out with a warning: its copies read as missing,
    and reads fall back to the other copies."""
    from tiering.tiers import open_tier, tier_order

    tiers: dict[str, BlobBackend] = {}
    for name in tier_order(config)[1:]:
        tier = config.tier(name)
        assert tier is not None
        try:
            tiers[name] = open_tier(tier)
        except (ApplianceError, OSError) as exc:
            log.warning("tier %s cannot be opened, its copies are not readable: %s", name, exc)
    return tiers


def serving(config: Config) -> bool:
    """Does a server hold this index (serve.lock taken)?"""
    path = config.storage.index_path / SERVE_LOCK
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the lock if we got it
    return False


def run_recaller(config: Config, index: StudyIndex, retry_failed: bool = False,
                 standalone: bool = False) -> RecallReport:
    """One recaller run in this process, on ``index`` (this process's one environment: LMDB must not be opened
    twice in a process), with its own store and tiers. ``standalone`` (the CLI with no server running): also holds
    the compaction lock, so that a server starting meanwhile waits for the run instead of recovering the segment
    it writes."""
    from appliance.store.compact import compaction_lock

    store = BlobStore.open(config, index=index, tiers=open_tiers(config))
    try:
        guard = (compaction_lock(config.storage.index_path, wait=True) if standalone
                 else contextlib.nullcontext())
        with guard:
            report = recall_queued(config, index, store, retry_failed)
    finally:
        store.close()
    _observe(report)
    return report


def _observe(report: RecallReport) -> None:
    from appliance.metrics import tiering_metrics

    metrics = tiering_metrics()
    for seconds in report.latencies_s:
        metrics.recall_seconds.observe(seconds)
    for source, nbytes in report.bytes_from.items():
        metrics.migration_bytes.labels(source, ONLINE_TIER).inc(nbytes)


def refresh_gauges(config: Config, index: StudyIndex) -> None:
    """Bytes and studies per tier, and the recall queue depth, into the tiering gauges. Bytes come from the
    container records (one per segment or archive), studies from the placement table (one row per study that
    ever moved or was read): both far smaller than the instances, read every GAUGES_S at most."""
    from appliance.index.schema import RecallRecord, StudyPlacement, decode
    from appliance.metrics import tiering_metrics
    from tiering.tiers import tier_of_backend, tier_order

    metrics = tiering_metrics()
    tier_bytes = dict.fromkeys(tier_order(config), 0)
    for rec in index.iter_containers():  # batched: one record per nearline archive, millions of them
        tier = tier_of_backend(config, rec.backend)
        tier_bytes[tier] = tier_bytes.get(tier, 0) + rec.live_bytes
    studies = dict.fromkeys(tier_bytes, 0)
    placed = 0
    with index.env.begin() as txn:
        for _key, raw in txn.cursor(db=index.dbs["placement"]):
            tier = decode(StudyPlacement, raw).tier
            studies[tier] = studies.get(tier, 0) + 1
            placed += 1
        total = txn.stat(index.dbs["studies"])["entries"]
        queued = txn.stat(index.dbs["recalls"])["entries"]
        # The oldest request: the queue holds tiering.recall_queue_max entries at most, so this scan is bounded.
        oldest_ns = min((decode(RecallRecord, raw).requested_ns for _key, raw in txn.cursor(db=index.dbs["recalls"])),
                        default=0)
    studies[ONLINE_TIER] += max(0, total - placed)  # never moved nor read: online
    for tier, nbytes in tier_bytes.items():
        metrics.tier_bytes.labels(tier).set(nbytes)
    for tier, count in studies.items():
        metrics.tier_studies.labels(tier).set(count)
    metrics.recall_queue.set(queued)
    metrics.recall_oldest.set(oldest_ns / 1e9)


POLL_S = 1.0  # how often the server's recaller looks at the queue (one short read transaction)
GAUGES_S = 15.0


def recaller_main(config: Config) -> None:
    """The server's recaller process (forked by the supervisor, restarted if it dies, killed at shutdown: every
    step is crash-safe). Polls the recall queue every POLL_S and recalls what is queued, one run at a time; keeps
    the tiering gauges fresh."""
    index = StudyIndex(config.storage.index_path, config.storage.index_map_size, sync=True)
    store = BlobStore.open(config, index=index, tiers=open_tiers(config))
    next_gauges = 0.0
    try:
        while True:
            if time.monotonic() >= next_gauges:
                next_gauges = time.monotonic() + GAUGES_S
                try:
                    refresh_gauges(config, index)
                except Exception:  # metrics must never stop recalls
                    log.exception("refreshing the tiering gauges")
            if recall_pending(index):
                report = recall_queued(config, index, store)
                _observe(report)
                if report.studies or report.failed:
                    log.info("recaller: %d studies online, %d failed", report.studies, len(report.failed))
                if not report.busy and not report.failed:
                    continue
            time.sleep(POLL_S)
    except StorageFault as exc:
        # Fail-stop, as a worker: the page cache of the volume cannot be trusted; the supervisor stops the appliance.
        log.critical("recaller stopped on a storage fault: %s", exc)
        os._exit(EXIT_STORAGE_FAULT)
    except ApplianceError as exc:
        log.error("recaller stopped: %s", exc)
        raise SystemExit(exc.exit_code) from None
    finally:
        store.close()
        index.close()


def recall_pending(index: StudyIndex) -> bool:
    """Is there a queued recall the server's recaller would take (cheap: one read transaction)?"""
    return any(rec.attempts < RECALL_ATTEMPTS_MAX for _key, rec in index.recalls())
