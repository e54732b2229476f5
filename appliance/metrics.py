"""Prometheus metrics. Workers write to prometheus-client's multi-process files; the supervisor serves /metrics.

prometheus-client picks its value storage when first imported, so ``PROMETHEUS_MULTIPROC_DIR`` must be set
(server.py does it) before this module is imported by a serving process.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from pynetdicom.sop_class import _STORAGE_CLASSES

from appliance.errors import STATUS_NAMES

_SOP_NAMES = {str(uid): name for name, uid in _STORAGE_CLASSES.items()}
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def sop_class_label(uid: str) -> str:
    """Keyword for a storage SOP class (bounded label cardinality); other UIDs are reported as 'other'."""
    return _SOP_NAMES.get(uid, "other")


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
            "appliance_bytes_stored", "Bytes of acknowledged instances (Part-10 size)", ["sop_class", "calling_ae"],
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

        # Children of labelled metrics, cached: .labels() takes a lock and builds a key on every call.
        self._stage = {stage: self.store_seconds.labels(stage)
                       for stage in ("receive", "fsync", "queue", "index", "total")}
        self._stored: dict[tuple[str, str], tuple[Any, Any]] = {}

    def stored(self, sop_class_uid: str, calling_ae: str, nbytes: int, receive_s: float, total_s: float) -> None:
        key = (sop_class_uid, calling_ae)
        children = self._stored.get(key)
        if children is None:
            label = sop_class_label(sop_class_uid)
            children = (self.instances_stored.labels(label, calling_ae), self.bytes_stored.labels(label, calling_ae))
            self._stored[key] = children
        children[0].inc()
        children[1].inc(nbytes)
        self._stage["receive"].observe(receive_s)
        self._stage["total"].observe(total_s)

    def commit(self, batch: int, index_s: float, per_item: list[tuple[float, float]]) -> None:
        """One group commit: its size, its LMDB time, and (fsync, queue) seconds of each of its instances."""
        self.batch_size.observe(batch)
        fsync, queue, index = self._stage["fsync"], self._stage["queue"], self._stage["index"]
        for fsync_s, queue_s in per_item:
            fsync.observe(fsync_s)
            queue.observe(queue_s)
            index.observe(index_s)

    def failure(self, status: int) -> None:
        self.failures.labels(f"0x{status:04X}", STATUS_NAMES.get(status, "unknown")).inc()


class VolumeCollector:
    """Free and total bytes per volume, read at scrape time by the supervisor."""

    def __init__(self, volumes: list[tuple[str, str]]) -> None:
        self.volumes = volumes

    def collect(self) -> Any:
        free = GaugeMetricFamily("appliance_volume_free_bytes", "Bytes available on the volume", labels=["volume"])
        total = GaugeMetricFamily("appliance_volume_size_bytes", "Size of the volume's filesystem", labels=["volume"])
        for name, root in self.volumes:
            try:
                st = os.statvfs(root)
            except OSError:
                continue
            free.add_metric([name], st.f_bavail * st.f_frsize)
            total.add_metric([name], st.f_blocks * st.f_frsize)
        yield free
        yield total
