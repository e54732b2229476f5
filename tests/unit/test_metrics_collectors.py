"""The scrape-time collectors (volumes, TLS certificate, last scrub, build) and the calling_ae label rule."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

import appliance
from appliance.config import PeerConfig
from appliance.metrics import (
    SCRUB_SUMMARY,
    VOLUME_MARKER,
    BuildInfoCollector,
    CertificateCollector,
    Metrics,
    ScrubCollector,
    VolumeCollector,
)
from appliance.net.service import UNKNOWN_AE, peer_label
from appliance.store.volumes import MARKER
from tiering.scrub import SUMMARY_FILE


def _values(collector: object) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in collector.collect() for s in family.samples}  # type: ignore[attr-defined]


def test_the_constants_kept_apart_by_the_layers_agree() -> None:
    assert VOLUME_MARKER == MARKER and SCRUB_SUMMARY == SUMMARY_FILE


def test_calling_ae_label_only_for_configured_peers() -> None:
    assert peer_label(PeerConfig("ct", "CT01")) == "CT01"
    assert peer_label(None) == UNKNOWN_AE == "unknown"


def test_volume_watermark_and_accepting(tmp_path: Path) -> None:
    attached, detached = tmp_path / "a", tmp_path / "b"
    attached.mkdir(), detached.mkdir()
    (attached / VOLUME_MARKER).write_text("{}")
    values = _values(VolumeCollector([("a", str(attached), 0.999999), ("b", str(detached), 0.999999),
                                      ("full", str(attached), 0.0), ("gone", str(tmp_path / "nope"), 0.9)]))
    assert values[("appliance_volume_high_watermark_ratio", (("volume", "a"),))] == 0.999999
    assert values[("appliance_volume_accepting", (("volume", "a"),))] == 1.0
    assert values[("appliance_volume_accepting", (("volume", "b"),))] == 0.0  # no marker: detached
    assert values[("appliance_volume_accepting", (("volume", "full"),))] == 0.0  # above its watermark
    assert values[("appliance_volume_accepting", (("volume", "gone"),))] == 0.0
    assert ("appliance_volume_free_bytes", (("volume", "gone"),)) not in values


def test_certificate_expiry_follows_the_file(tmp_path: Path) -> None:
    cert = tmp_path / "server.crt"

    def make(days: int) -> None:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(tmp_path / "k"), "-out", str(cert), "-days", str(days), "-subj",
                        "/CN=t"], check=True, capture_output=True, timeout=60)

    make(2)
    collector = CertificateCollector(str(cert))
    expiry = _values(collector)[("appliance_tls_certificate_expiry_timestamp_seconds", (("certificate", "server"),))]
    assert abs(expiry - datetime.now(UTC).timestamp() - 2 * 86400) < 120
    make(30)  # renewed: read again (mtime or size changed)
    os.utime(cert, ns=(1, 1))
    renewed = _values(collector)[("appliance_tls_certificate_expiry_timestamp_seconds", (("certificate", "server"),))]
    assert renewed - expiry > 27 * 86400
    cert.unlink()
    assert _values(collector) == {}


def test_scrub_summary(tmp_path: Path) -> None:
    path = tmp_path / SCRUB_SUMMARY
    assert _values(ScrubCollector(str(path))) == {}
    path.write_text(json.dumps({"tiers": {"nl": {"ended": 1000.0, "missing": 0, "corrupt": 2, "orphan": 0},
                                          "bad": {"ended": "x"}}}))
    values = _values(ScrubCollector(str(path)))
    assert values[("appliance_scrub_last_errors", (("kind", "corrupt"), ("tier", "nl")))] == 2
    assert values[("appliance_scrub_last_run_timestamp_seconds", (("tier", "nl"),))] == 1000.0
    assert not any(dict(labels).get("tier") == "bad" for _name, labels in values)


def test_build_info_and_operation_durations() -> None:
    assert _values(BuildInfoCollector())[("appliance_build_info", (("python", __import__("platform").python_version()),
                                                                    ("version", appliance.__version__)))] == 1.0
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.answered("C-FIND", 0x0000, 0.01)
    metrics.answered("C-FIND", 0xFE00, 0.01)
    metrics.answered("C-MOVE", 0xB000, 2.0)
    metrics.answered("C-GET", 0xA702, 1.0)
    text = generate_latest(registry).decode()
    for line in ('appliance_query_duration_seconds_count{outcome="success"} 1.0',
                 'appliance_query_duration_seconds_count{outcome="cancel"} 1.0',
                 'appliance_retrieve_duration_seconds_count{operation="C-MOVE",outcome="warning"} 1.0',
                 'appliance_retrieve_duration_seconds_count{operation="C-GET",outcome="failure"} 1.0'):
        assert line in text, line
