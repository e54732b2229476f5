"""`appliance verify` across every tier: re-hash each copy the index names, and hold each tier's contents against
the index.

- Every copy of the selected tiers is read back and hashed (nearline and tape: the original bytes, after
  decompression) and compared with the blob's name; the result is recorded per copy in the index
  (``mark_verified``: ok, or suspect), so that reads try a suspect copy last and never serve a wrong byte.
- Reads are rate-limited per tier (``tiering.scrub_bytes_per_s``) so that a scrub does not starve ingest or a
  retrieve; tape copies are read in tape order (cartridge, file, offset) within batches of SCRUB_BATCH copies, so
  that a cartridge is read forward instead of shuttling.
- Online volumes: segment files the index does not know, and the reverse (store/rebuild.py). Other tiers: what the
  backend lists (for tape, the catalogs written on the cartridges) against the copies the index names on it: a copy
  the tier does not list is missing; a blob the tier lists and the index does not name is reported as unnamed
  (space a mover's interrupted run left, not an error on append-only media).
- Findings (never patient data: digests, containers, tiers) go to the tiering audit log and to
  ``appliance_scrub_errors_total``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from appliance.config import Config
from appliance.config_tiering import ONLINE_TIER
from appliance.errors import ApplianceError, ConfigError, VolumeError
from appliance.index.db import StudyIndex
from appliance.index.schema import COPY_OK, COPY_SUSPECT, BlobRecord, Copy
from appliance.store.backend import BlobBackend
from appliance.store.online import BlobStore
from appliance.store.rebuild import VerifyReport, segment_orphans
from tiering.recall import tape_position
from tiering.tiers import tier_of_backend, tier_order

# Copies gathered (and sorted into tape order) before they are read; bounds memory whatever the index holds.
SCRUB_BATCH = 4096
# Index marks written per transaction.
MARK_BATCH = 512


FINDINGS_LISTED_MAX = 1000  # missing / corrupt copies listed per tier (all are counted), as in the audit log


@dataclass
class TierReport:
    tier: str
    checked: int = 0
    bytes_read: int = 0
    missing: list[str] = field(default_factory=list)  # the first FINDINGS_LISTED_MAX of each kind
    corrupt: list[str] = field(default_factory=list)
    missing_count: int = 0
    corrupt_count: int = 0
    orphans: list[str] = field(default_factory=list)  # online: segment files unknown to the index and the reverse
    unnamed: int = 0  # blobs a tier lists that no index copy names (not an error)
    dead_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing_count or self.corrupt_count or self.orphans)

    def note(self, kind: str, where: str) -> None:
        """Count a missing or corrupt copy; list it while the list is short (a lost volume of a million copies
        must not hold a million strings: the counts say how many)."""
        if kind == "missing":
            self.missing_count += 1
            found = self.missing
        else:
            self.corrupt_count += 1
            found = self.corrupt
        if len(found) < FINDINGS_LISTED_MAX:
            found.append(where)


@dataclass
class ScrubReport:
    tiers: dict[str, TierReport] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.tiers.values())


class _Budget:
    """Bytes per second for one tier's reads (a sleep when ahead of the budget)."""

    def __init__(self, bytes_per_s: int) -> None:
        self.bytes_per_s, self.started, self.done = bytes_per_s, time.monotonic(), 0

    def spend(self, nbytes: int) -> None:
        self.done += nbytes
        ahead = self.done / self.bytes_per_s - (time.monotonic() - self.started)
        if ahead > 0:
            time.sleep(min(ahead, 5.0))


def scrub(config: Config, index: StudyIndex, store: BlobStore, tiers: set[str] | None = None,
          bytes_per_s: int | None = None) -> ScrubReport:
    """Verify the copies on ``tiers`` (None: every tier, online included). ``store`` has the tiers opened."""
    order = tier_order(config)
    wanted = [t for t in order if tiers is None or t in tiers]
    unknown = (tiers or set()) - set(order)
    if unknown:
        # 78, not 1: exit 1 means "problems found", which a typo must not look like to a monitoring script.
        raise ConfigError(f"no tier named {', '.join(sorted(unknown))} (tiers: {', '.join(order)})")
    _require_mounted(store, wanted)
    report = ScrubReport({t: TierReport(t) for t in wanted})
    rate = bytes_per_s or config.tiering.scrub_bytes_per_s
    budgets = {t: _Budget(rate) for t in wanted}
    marks: list[tuple[str, Copy, str]] = []
    for batch in _batches(config, index, set(wanted)):
        for digest, blob, copy in sorted(batch, key=lambda item: _read_order(item[2])):
            tier = tier_of_backend(config, copy.backend)
            rep = report.tiers[tier]
            state = store.check(digest, copy)
            rep.checked += 1
            rep.bytes_read += blob.size
            budgets[tier].spend(blob.size)
            where = f"{copy.backend}/{copy.container} {digest}"
            if state == "missing":
                rep.note("missing", where)
            elif state == "corrupt":
                rep.note("corrupt", where)
            marks.append((digest, copy, COPY_OK if state == "ok" else COPY_SUSPECT))
            if len(marks) >= MARK_BATCH:
                index.mark_verified(marks, time.time_ns())
                marks = []
    if marks:
        index.mark_verified(marks, time.time_ns())
    if ONLINE_TIER in report.tiers:
        online = VerifyReport()
        segment_orphans(store, index, online)
        report.tiers[ONLINE_TIER].orphans += online.orphans
        report.tiers[ONLINE_TIER].dead_bytes = online.dead_bytes
    for tier in wanted:
        if tier != ONLINE_TIER:
            _against_listing(index, store, tier, report.tiers[tier])
    _record(config, report)
    write_summary(config, report, wanted)
    return report


def _require_mounted(store: BlobStore, tiers: list[str]) -> None:
    """Stop (VolumeError, exit 69) when a nearline volume of a tier to check is not mounted, rather than report
    every copy on it missing and mark them all suspect (docs/tiering.md, "Preparing the volumes")."""
    from tiering.nearline import NearlineBackend

    for tier in tiers:
        backend = store.tiers.get(tier)
        if not isinstance(backend, NearlineBackend):
            continue
        for volume in backend.volumes.values():
            try:
                volume.check()
            except VolumeError as exc:
                others = [t for t in tiers if t != tier]
                hint = f", or check the other tiers with {' '.join('--tier ' + t for t in others)}" if others else ""
                raise VolumeError(f"{exc}. Nothing was checked: mount it and run verify again{hint}") from None


def _batches(config: Config, index: StudyIndex, tiers: set[str]) -> Iterator[list[tuple[str, BlobRecord, Copy]]]:
    batch: list[tuple[str, BlobRecord, Copy]] = []
    for digest, blob in index.blobs():
        for copy in blob.copies:
            if tier_of_backend(config, copy.backend) in tiers:
                batch.append((digest, blob, copy))
        if len(batch) >= SCRUB_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _read_order(copy: Copy) -> tuple[str, str, int, int]:
    cartridge, tape_file, offset = tape_position(copy.location)
    return copy.backend, cartridge, tape_file, offset


def _against_listing(index: StudyIndex, store: BlobStore, tier: str, rep: TierReport) -> None:
    """The tier's own listing (tape: its on-cartridge catalogs) against the copies the index names there, one
    container at a time (memory bounded by the largest container, whatever the tier holds; listings come container
    by container, as archives are written)."""
    backend = store.tiers.get(tier)
    if backend is None:
        rep.note("missing", f"{tier}: the tier cannot be opened")
        return
    seen: set[str] = set()
    current: str | None = None
    listed: set[str] = set()

    def settle(container: str, listed: set[str]) -> None:
        named = {c.location for _digest, blob in index.container_contents(tier, container) for c in blob.copies
                 if c.backend == tier and c.container == container}
        rep.orphans += [f"{tier}: the index names {loc}, which the tier's catalog does not list"
                        for loc in sorted(named - listed)]
        rep.unnamed += len(listed - named)

    try:
        for stored in backend.list():
            container = _container_of(backend, stored.location)
            if container != current:
                if current is not None:
                    settle(current, listed)
                current, listed = container, set()
                seen.add(container)
            listed.add(stored.location)
    except (ApplianceError, OSError) as exc:
        rep.note("missing", f"{tier}: its contents cannot be listed: {exc}")
        return
    if current is not None:
        settle(current, listed)
    for rec in index.iter_containers(tier):
        if rec.live_records and rec.name not in seen:
            rep.orphans.append(f"{tier}: the index names container {rec.name} ({rec.live_records} copies), "
                               "which the tier does not list")


def _container_of(backend: BlobBackend, location: str) -> str:
    try:
        return backend.container_of(location)
    except NotImplementedError:
        return location.partition(":")[0]


def _record(config: Config, report: ScrubReport) -> None:
    from appliance.metrics import tiering_metrics
    from tiering.audit import AuditLog

    metrics = tiering_metrics()
    with AuditLog(config.tiering.audit_log) as audit:
        for tier, rep in report.tiers.items():
            for kind, found, count in (("missing", rep.missing, rep.missing_count),
                                       ("corrupt", rep.corrupt, rep.corrupt_count),
                                       ("orphan", rep.orphans, len(rep.orphans))):
                if count:
                    metrics.scrub_errors.labels(tier, kind).inc(count)
                for finding in found[:1000]:  # bounded: a lost volume must not write a million lines
                    audit.write("scrub", tier=tier, finding=kind, what=finding)
            audit.write("scrub", tier=tier, checked=rep.checked, bytes=rep.bytes_read,
                        outcome="ok" if rep.ok else "problems")


SUMMARY_FILE = "scrub-summary.json"  # in the index folder; read at scrape time by appliance/metrics.py


def write_summary(config: Config, report: ScrubReport, tiers: list[str]) -> None:
    """The counts of this scrub, for /metrics: `appliance verify` runs as its own process (a timer), whose
    counters nobody scrapes, so the server reads this file at scrape time instead (ScrubCollector). Per tier
    checked: the time it ended and the findings of each kind (0 included, so that a clean scrub is visible)."""
    import json
    import os

    path = config.storage.index_path / SUMMARY_FILE
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        previous = {}
    tiers_done = dict(previous.get("tiers", {})) if isinstance(previous, dict) else {}
    for tier in tiers:
        rep = report.tiers[tier]
        tiers_done[tier] = {"ended": time.time(), "missing": rep.missing_count, "corrupt": rep.corrupt_count,
                            "orphan": len(rep.orphans)}
    tmp = path.with_name(SUMMARY_FILE + ".tmp")
    tmp.write_text(json.dumps({"tiers": tiers_done}))
    os.replace(tmp, path)  # whole or not at all: the scraper never reads half a file
