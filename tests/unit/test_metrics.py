"""Per-instance metrics are added up in the worker and flushed: the flushed result must equal what observing
each value directly gives, bucket by bucket."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram

from appliance.metrics import _LATENCY_BUCKETS, Metrics


def _samples(registry: CollectorRegistry, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.startswith(name) and not sample.name.endswith("_created"):
                out[(("name", sample.name), *sorted(sample.labels.items()))] = sample.value
    return out


def test_flushed_metrics_equal_direct_observation() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    direct_registry = CollectorRegistry()
    direct = Histogram("appliance_store_stage_seconds", "x", ["stage"], buckets=_LATENCY_BUCKETS,
                       registry=direct_registry)
    rng = random.Random(7)
    values = [rng.choice([0.0005, 0.001, 0.02, 10.0, 11.0]) if rng.random() < 0.3 else rng.expovariate(300)
              for _ in range(500)]  # bucket bounds themselves included: "le" means <=
    for i, value in enumerate(values):
        metrics.stored("1.2.840.10008.5.1.4.1.1.2", "CT01", 1000 + i, value, value * 2)
        direct.labels("receive").observe(value)
        direct.labels("total").observe(value * 2)
    metrics.commit(3, 0.004, [(0.001, 0.002)] * 3)

    before = _samples(registry, "appliance_instances_stored")
    assert all(v == 0 for v in before.values())  # nothing written before the flush
    metrics.flush()
    got = _samples(registry, "appliance_store_stage_seconds")
    want = _samples(direct_registry, "appliance_store_stage_seconds")
    for key, value in want.items():
        assert abs(got[key] - value) < 1e-9, key
    assert _samples(registry, "appliance_instances_stored_total")[
        (("name", "appliance_instances_stored_total"), ("calling_ae", "CT01"), ("sop_class", "CTImageStorage"))] == 500
    assert sum(v for k, v in _samples(registry, "appliance_stored_bytes_total").items()) == sum(
        1000 + i for i in range(500))
    assert _samples(registry, "appliance_commit_batch_size_count")[(("name", "appliance_commit_batch_size_count"),)] == 1
    stage_count = _samples(registry, "appliance_store_stage_seconds_count")
    assert stage_count[(("name", "appliance_store_stage_seconds_count"), ("stage", "index"))] == 3
    metrics.flush()  # a second flush adds nothing
    assert _samples(registry, "appliance_store_stage_seconds") == got
