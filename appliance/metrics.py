"""Prometheus metrics. Workers write to prometheus-client's multi-process files; the supervisor serves /metrics.

prometheus-client picks its value storage when first imported, so ``PROMETHEUS_MULTIPROC_DIR`` must be set
(server.py does it) before this module is imported by a serving process.

The per-instance metrics (instances and bytes stored, the stage histograms, the commit batch size) are added up
in the worker and written to the multi-process files by ``flush()``, which the worker calls every
``FLUSH_SECONDS`` and at shutdown: in multi-process mode every ``inc`` takes prometheus-client's one global lock
and writes an mmap, and the 12 of them per instance held the GIL for ~10% of a busy worker's Python time
(py-spy --gil). A scrape therefore lags by up to ``FLUSH_SECONDS``. Rare events (associations, failures,
aborts, duplicates) are written at once.
"""

from __future__ import annotations

import os
import threading
from bisect import bisect_left
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from pynetdicom.sop_class import _STORAGE_CLASSES

from appliance.errors import CANCEL, STATUS_NAMES, SUCCESS

_SOP_NAMES = {str(uid): name for name, uid in _STORAGE_CLASSES.items()}
FLUSH_SECONDS = 0.5
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class _LocalHistogram:
    """Observations of one histogram child, bucketed here and added to the child in one go by ``flush``."""

    __slots__ = ("child", "bounds", "counts", "total")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.bounds = tuple(child._upper_bounds)  # ends with +Inf, like the child's buckets
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # first bound >= value: prometheus's "le"
        self.total += value

    def take(self) -> tuple[list[int], float]:
        counts, total = self.counts, self.total
        self.counts, self.total = [0] * len(self.bounds), 0.0
        return counts, total

    def apply(self, counts: list[int], total: float) -> None:
        if not any(counts):
            return
        self.child._sum.inc(total)
        for bucket, count in zip(self.child._buckets, counts, strict=True):
            if count:
                bucket.inc(count)


def _batchable(child: Any) -> bool:
    """prometheus-client keeps a histogram's bucket and sum values in these (private) attributes; if a future
    version does not, every observation goes straight to the child, as before."""
    return hasattr(child, "_buckets") and hasattr(child, "_sum") and hasattr(child, "_upper_bounds")


def sop_class_label(uid: str) -> str:
    """Keyword for a storage SOP class (bounded label cardinality); other UIDs are reported as 'other'."""
    return _SOP_NAMES.get(uid, "other")


# Outcome label of a C-FIND / C-MOVE / C-GET from its final status (bounded: four values).
def _outcome(status: int) -> str:
    if status == SUCCESS:
        return "success"
    if status == CANCEL:
        return "cancel"
    if status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF:  # PS3.7 C.4: the Warning statuses
        return "warning"
    return "failure"


# store/volumes.py's MARKER (a volume without it is detached), not imported: metrics sits below the storage layer
# (lint-imports); tests/unit/test_metrics_names.py checks that the two agree.
VOLUME_MARKER = ".appliance-volume"
SCRUB_SUMMARY = "scrub-summary.json"  # tiering/scrub.py SUMMARY_FILE (tiering sits above metrics: not imported)
TIER_RUN_SUMMARY = "tier-run-summary.json"  # tiering/run.py RUN_SUMMARY_FILE
# C-FIND answers in milliseconds to seconds; a retrieve sends whole studies (and may wait for a recall): longer.
_QUERY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
_RETRIEVE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        kw: dict[str, Any] = {"registry": registry} if registry is not None else {}
        self.associations_active = Gauge(
            "appliance_associations_active", "Associations open now", ["calling_ae"],
            multiprocess_mode="livesum", **kw,
        )
        self.associations_total = Counter(
            "appliance_associations", "Associations requested, by outcome", ["calling_ae", "result"], **kw
        )
        self.instances_stored = Counter(
            "appliance_instances_stored", "Instances acknowledged with Success", ["sop_class", "calling_ae"], **kw
        )
        self.bytes_stored = Counter(
            "appliance_stored_bytes", "Bytes of acknowledged instances (Part-10 size)", ["sop_class", "calling_ae"],
            **kw,
        )
        self.store_seconds = Histogram(
            "appliance_store_stage_seconds",
            "C-STORE latency by stage, per instance: receive (first to last PDV), fsync (its blob made "
            "durable), queue (waiting for the next index commit), index (its batch's LMDB commit), total (last "
            "PDV to response)",
            ["stage"], buckets=_LATENCY_BUCKETS, **kw,
        )
        self.batch_size = Histogram(
            "appliance_commit_batch_size", "Instances per group commit (one fsync batch, one LMDB transaction)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), **kw,
        )
        self.failures = Counter(
            "appliance_store_failures", "C-STORE responses other than Success, by DIMSE status", ["status", "name"],
            **kw,
        )
        self.duplicates = Counter(
            "appliance_duplicates", "Re-sent SOP Instance UIDs, by outcome", ["outcome"], **kw
        )
        self.aborts = Counter("appliance_aborts", "Associations aborted, by reason", ["reason"], **kw)
        self.tls_handshakes = Counter(
            "appliance_tls_handshakes", "Handshakes on the TLS port, by outcome (ok, failed, timeout, limit)",
            ["result"], **kw,
        )
        self.retrieve_suboperations = Counter(
            "appliance_retrieve_suboperations",
            "C-STORE sub-operations of C-MOVE and C-GET (counted once per retrieve, at its end), by result: "
            "completed, failed, warning, not_sent (cancelled or stopped)", ["operation", "result"], **kw,
        )
        self.query_seconds = Histogram(
            "appliance_query_duration_seconds",
            "C-FIND duration, from its identifier received to its final response, by outcome (success, warning, "
            "failure, cancel)", ["outcome"], buckets=_QUERY_BUCKETS, **kw,
        )
        self.retrieve_seconds = Histogram(
            "appliance_retrieve_duration_seconds",
            "C-MOVE and C-GET duration, from the request to the final response (sub-operations and any recall "
            "wait included), by operation (C-MOVE, C-GET) and outcome (success, warning, failure, cancel)",
            ["operation", "outcome"], buckets=_RETRIEVE_BUCKETS, **kw,
        )
        self.commitments = Counter(
            "appliance_storage_commitment",
            "Storage Commitment: referenced instances (committed, failed) and reports (same_association, "
            "new_association, undelivered)", ["outcome"], **kw,
        )

        # Children of labelled metrics, cached: .labels() takes a lock and builds a key on every call.
        stages = {stage: self.store_seconds.labels(stage) for stage in ("receive", "fsync", "queue", "index", "total")}
        self._batched = all(_batchable(child) for child in (*stages.values(), self.batch_size))
        self._stage: dict[str, Any] = (
            {stage: _LocalHistogram(child) for stage, child in stages.items()} if self._batched else stages)
        self._batch: Any = _LocalHistogram(self.batch_size) if self._batched else self.batch_size
        # (sop class, calling AE) -> [instances, bytes, instances child, bytes child]
        self._stored: dict[tuple[str, str], list[Any]] = {}
        self._lock = threading.Lock()  # stored() runs on the event loop, commit() on the index thread

    def stored(self, sop_class_uid: str, calling_ae: str, nbytes: int, receive_s: float, total_s: float) -> None:
        key = (sop_class_uid, calling_ae)
        with self._lock:
            entry = self._stored.get(key)
            if entry is None:
                label = sop_class_label(sop_class_uid)
                entry = [0, 0, self.instances_stored.labels(label, calling_ae),
                         self.bytes_stored.labels(label, calling_ae)]
                self._stored[key] = entry
            entry[0] += 1
            entry[1] += nbytes
            self._stage["receive"].observe(receive_s)
            self._stage["total"].observe(total_s)
        if not self._batched:
            self.flush()

    def commit(self, batch: int, index_s: float, per_item: list[tuple[float, float]]) -> None:
        """One group commit: its size, its LMDB time, and (fsync, queue) seconds of each of its instances."""
        fsync, queue, index = self._stage["fsync"], self._stage["queue"], self._stage["index"]
        with self._lock:
            self._batch.observe(batch)
            for fsync_s, queue_s in per_item:
                fsync.observe(fsync_s)
                queue.observe(queue_s)
                index.observe(index_s)

    def flush(self) -> None:
        """Write what was added up since the last flush to the multi-process files (called by the worker every
        FLUSH_SECONDS and when it stops)."""
        with self._lock:
            counters = [(e[2], e[3], e[0], e[1]) for e in self._stored.values() if e[0]]
            for e in self._stored.values():
                e[0] = e[1] = 0
            hists = ([(h, *h.take()) for h in (*self._stage.values(), self._batch)] if self._batched else [])
        for n_child, b_child, n, nbytes in counters:
            n_child.inc(n)
            b_child.inc(nbytes)
        for hist, counts, total in hists:
            hist.apply(counts, total)

    def failure(self, status: int) -> None:
        self.failures.labels(f"0x{status:04X}", STATUS_NAMES.get(status, "unknown")).inc()

    def answered(self, operation: str, status: int, seconds: float) -> None:
        """The final response of a ``operation`` ("C-FIND", "C-MOVE" or "C-GET", the operation label of
        appliance_retrieve_suboperations_total too) was sent ``seconds`` after the request: one observation per
        request, never per instance."""
        if operation == "C-FIND":
            self.query_seconds.labels(_outcome(status)).observe(seconds)
        else:
            self.retrieve_seconds.labels(operation, _outcome(status)).observe(seconds)


def build_registry(config: Any) -> CollectorRegistry:
    """The registry the supervisor serves on /metrics: the workers' and helpers' multi-process files, summed, plus
    what is read at scrape time (volumes, the TLS certificate, the build). ``config`` is the appliance Config (typed
    Any: config imports nothing above it, and this module must not import the composition root)."""
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    registry.register(VolumeCollector([(v.name, str(v.path), float(v.high_watermark)) for v in config.volumes]))
    tls = getattr(config, "tls", None)
    if tls is not None and tls.enabled and tls.certificate is not None:
        registry.register(CertificateCollector(str(tls.certificate)))
    registry.register(ScrubCollector(os.path.join(str(config.storage.index_path), SCRUB_SUMMARY)))
    registry.register(TierRunCollector(os.path.join(str(config.storage.index_path), TIER_RUN_SUMMARY)))
    registry.register(BuildInfoCollector())
    return registry


class VolumeCollector:
    """Free and total bytes per volume, its high watermark and whether it takes writes, read at scrape time by the
    supervisor (one statvfs per volume per scrape)."""

    def __init__(self, volumes: list[tuple[str, str, float]]) -> None:
        self.volumes = volumes

    def collect(self) -> Any:
        free = GaugeMetricFamily("appliance_volume_free_bytes", "Bytes available on the volume", labels=["volume"])
        total = GaugeMetricFamily("appliance_volume_size_bytes", "Size of the volume's filesystem", labels=["volume"])
        mark = GaugeMetricFamily("appliance_volume_high_watermark_ratio",
                                 "Fraction of the filesystem in use above which the volume takes no new writes "
                                 "([[volumes]] high_watermark)", labels=["volume"])
        accepting = GaugeMetricFamily("appliance_volume_accepting",
                                      "1 when the volume takes new writes (mounted, marker present, under its high "
                                      "watermark), else 0", labels=["volume"])
        for name, root, watermark in self.volumes:
            mark.add_metric([name], watermark)
            try:
                st = os.statvfs(root)
                attached = os.path.isfile(os.path.join(root, VOLUME_MARKER))
            except OSError:
                accepting.add_metric([name], 0.0)  # detached or unreadable: it takes nothing
                continue
            size = st.f_blocks * st.f_frsize
            free.add_metric([name], st.f_bavail * st.f_frsize)
            total.add_metric([name], size)
            used = 1.0 - st.f_bavail / st.f_blocks if st.f_blocks else 1.0  # as the store's Volume.fill()
            accepting.add_metric([name], 1.0 if attached and used < watermark else 0.0)
        yield free
        yield total
        yield mark
        yield accepting


class CertificateCollector:
    """The notAfter of the TLS port's certificate (the first in [tls] certificate), read at scrape time so that a
    renewed file shows without a restart; parsed again only when the file changes (mtime, size)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._seen: tuple[int, int] | None = None
        self._expiry: float | None = None

    def expiry(self) -> float | None:
        try:
            from cryptography import x509
        except ImportError:  # a dependency (pyproject.toml), but an install without it must still serve /metrics
            return None
        try:
            st = os.stat(self.path)
            key = (st.st_mtime_ns, st.st_size)
            if key != self._seen:
                with open(self.path, "rb") as fh:
                    cert = x509.load_pem_x509_certificate(fh.read())  # the first PEM block: ours
                self._expiry, self._seen = cert.not_valid_after_utc.timestamp(), key
        except (OSError, ValueError):
            self._expiry, self._seen = None, None  # unreadable now: no sample, and "absent" alerts can fire
        return self._expiry

    def collect(self) -> Any:
        family = GaugeMetricFamily("appliance_tls_certificate_expiry_timestamp_seconds",
                                   "Unix time after which the TLS port's certificate is no longer valid (notAfter)",
                                   labels=["certificate"])
        expiry = self.expiry()
        if expiry is not None:
            family.add_metric(["server"], expiry)
        yield family


class TierRunCollector:
    """When the last policy run ended and which tiers it paused, from the summary every run writes (tiering/run.py
    write_run_summary): `appliance tier run` from a timer and the server's scheduled run alike, and it outlives a
    restart (a gauge in a run's own process would be lost with it, and a timer's run is never scraped). No file
    (no run yet): no samples."""

    def __init__(self, path: str) -> None:
        self.path = path

    def collect(self) -> Any:
        import json

        ended = GaugeMetricFamily("appliance_tier_policy_run_last_success_timestamp_seconds",
                                  "Unix time at which the last policy run (`appliance tier run` or the server's "
                                  "schedule) ended without error")
        paused = GaugeMetricFamily("appliance_tier_paused",
                                   "1 when the last policy run paused moves to and from the tier (it did not "
                                   "answer), else 0", labels=["tier"])
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            ended.add_metric([], float(data["ended"]))
            for tier, flag in dict(data.get("paused", {})).items():
                paused.add_metric([str(tier)], 1.0 if flag else 0.0)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # no run yet, or a file from elsewhere: no samples rather than a failed scrape
        yield ended
        yield paused


class ScrubCollector:
    """The last scrub's findings per tier and kind, and when it ended, from the summary `appliance verify` writes
    (tiering/scrub.py write_summary): the scrub runs in its own process, whose counters nobody scrapes. No file (no
    scrub yet): no samples."""

    def __init__(self, path: str) -> None:
        self.path = path

    def collect(self) -> Any:
        import json

        ended = GaugeMetricFamily("appliance_scrub_last_run_timestamp_seconds",
                                  "Unix time at which the last `appliance verify` of the tier ended", labels=["tier"])
        found = GaugeMetricFamily("appliance_scrub_last_errors",
                                  "Copies the last `appliance verify` of the tier found missing or corrupt, and "
                                  "orphan files (online), by kind", labels=["tier", "kind"])
        try:
            with open(self.path, encoding="utf-8") as fh:
                tiers = json.load(fh).get("tiers", {})
        except (OSError, ValueError, AttributeError):
            tiers = {}
        for tier, summary in sorted(tiers.items())[:64]:  # bounded: tiers are config entries, few
            try:
                ended.add_metric([tier], float(summary["ended"]))
                for kind in ("missing", "corrupt", "orphan"):
                    found.add_metric([tier, kind], float(summary.get(kind, 0)))
            except (KeyError, TypeError, ValueError):
                continue  # a summary from another version: skipped, not a failed scrape
        yield ended
        yield found


class BuildInfoCollector:
    """appliance_build_info: constant 1, labelled with the version (the usual way to chart upgrades)."""

    def collect(self) -> Any:
        import platform

        from appliance import __version__

        info = GaugeMetricFamily("appliance_build_info", "The appliance's version and Python version (always 1)",
                                 labels=["version", "python"])
        info.add_metric([__version__, platform.python_version()], 1.0)
        yield info


# Recall latency (request to online): from seconds (a recall already running) to hours (a cartridge to load).
_RECALL_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 4 * 3600.0, 24 * 3600.0)


class TieringMetrics:
    """Tiering's metrics, written by the processes that do the work (recaller, movers, verify under the server) and
    summed over processes by the supervisor. Labels are tier names, never UIDs."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        kw: dict[str, Any] = {"registry": registry} if registry is not None else {}
        self.tier_bytes = Gauge("appliance_tier_bytes", "Bytes of live copies per tier (refreshed from the index)",
                                ["tier"], multiprocess_mode="mostrecent", **kw)
        self.tier_studies = Gauge("appliance_tier_studies", "Studies placed on each tier (refreshed from the index)",
                                  ["tier"], multiprocess_mode="mostrecent", **kw)
        self.recall_queue = Gauge("appliance_recall_queue_depth", "Studies queued for recall",
                                  multiprocess_mode="mostrecent", **kw)
        self.migration_bytes = Counter("appliance_tier_migration_bytes",
                                       "Bytes copied between tiers, by source and target tier (moves and recalls)",
                                       ["from_tier", "to_tier"], **kw)
        self.recall_seconds = Histogram("appliance_recall_duration_seconds",
                                        "Time from a recall's request to its study online", buckets=_RECALL_BUCKETS,
                                        **kw)
        self.recall_oldest = Gauge("appliance_recall_oldest_request_timestamp_seconds",
                                   "Unix time of the oldest recall request still queued (0: the queue is empty)",
                                   multiprocess_mode="mostrecent", **kw)
        self.scrub_errors = Counter("appliance_scrub_errors", "Copies `verify` found missing or corrupt, by tier",
                                    ["tier", "kind"], **kw)


_tiering: TieringMetrics | None = None


def tiering_metrics() -> TieringMetrics:
    """This process's TieringMetrics (created on first use, in the default registry)."""
    global _tiering
    if _tiering is None:
        _tiering = TieringMetrics()
    return _tiering
