"""A small site for the recall and scrub tests: one online volume, an index, and a tape-like tier.

The tape-like tier is a real segment store on its own folder declared OFFLINE (the recaller and BlobStore look only
at ``capabilities.latency``), so that these tests run without the tape branch; tests/integration/test_tiering_e2e.py
runs the whole chain on the real nearline and virtual-tape tiers. ``to_tier`` does what the mover does: copy,
sync, then ``switch_study`` dropping the online copies."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from appliance.config import Config, StorageConfig, VolumeConfig
from appliance.config_ops import AuditConfig
from appliance.config_tiering import TierConfig, TieringConfig, TierVolumeConfig
from appliance.index.db import IndexEntry, StudyIndex
from appliance.index.records import read_header_blob
from appliance.index.schema import NEARLINE, OFFLINE
from appliance.store.backend import BlobBackend, BlobMeta, BlobSource, Capabilities, LatencyClass
from appliance.store.online import BlobStore
from appliance.store.segments import SegmentBackend, committed_ends, segment_copy
from appliance.store.volumes import init_volume, open_volume
from tests.peers import ct_instances


class BytesSource(BlobSource):
    def __init__(self, data: bytes) -> None:
        self.data, self.size = data, len(data)

    def chunks(self, chunk_bytes: int) -> Iterator[bytes]:
        for i in range(0, len(self.data), chunk_bytes):
            yield self.data[i : i + chunk_bytes]


def tier_backend(root: Path, name: str, latency: LatencyClass) -> SegmentBackend:
    if not (root / name).exists():
        init_volume(root / name, name)
    backend = SegmentBackend(open_volume(VolumeConfig(name, root / name, 0.999), create_missing=False))
    backend.capabilities = Capabilities(True, True, latency, False)  # type: ignore[misc]
    return backend


def make_config(root: Path, **tiering: object) -> Config:
    storage = StorageConfig(index_path=root / "index", segment_bytes_max=1 << 20)
    # The tiers are declared (their names and kinds give the read order and the scrub's tiers); their backends
    # are the segment stores Site.open injects.
    tiers = (TierConfig("nas", "nearline", volumes=(TierVolumeConfig("nas", root / "nas"),)),
             TierConfig("lto", "tape", path=root / "lto"))
    return Config(storage=storage, volumes=(VolumeConfig("vol0", root / "vol0", 0.999),), tiers=tiers,
                  audit=AuditConfig(path=root / "var/audit/audit.jsonl"),  # not the default, relative to the cwd
                  tiering=replace(TieringConfig(audit_log=root / "audit.jsonl"), **tiering))  # type: ignore[arg-type]


@dataclass
class Site:
    root: Path
    config: Config
    index: StudyIndex
    store: BlobStore

    @classmethod
    def open(cls, root: Path, **tiering: object) -> Site:
        if not (root / "vol0").exists():
            init_volume(root / "vol0", "vol0")
        config = make_config(root, **tiering)
        index = StudyIndex(root / "index")
        tiers: dict[str, BlobBackend] = {"nas": tier_backend(root, "nas", LatencyClass.NEARLINE),
                                         "lto": tier_backend(root, "lto", LatencyClass.OFFLINE)}
        return cls(root, config, index, BlobStore.open(config, index=index, tiers=tiers))

    def close(self) -> None:
        self.store.close()
        self.index.close()

    def ingest(self, count: int, study_uid: str | None = None) -> tuple[str, dict[str, bytes]]:
        """``count`` CT instances of one new study, indexed online; (study UID, SOP UID -> bytes)."""
        files = ct_instances(self.root / "incoming", count, study_uid=study_uid)
        backend = self.store.segment_backend("vol0")
        entries, data = [], {}
        for n, path in enumerate(files):
            raw = path.read_bytes()
            digest = hashlib.sha256(raw).hexdigest()
            location = backend.put(BlobMeta(digest, len(raw), 1_700_000_000_000_000_000 + n, "CT1"), BytesSource(raw))
            header, ts = read_header_blob(lambda raw=raw: io.BytesIO(raw), len(raw))  # type: ignore[misc]
            entries.append(IndexEntry(header, digest, len(raw), ts, 1_700_000_000_000_000_000 + n, "CT1",
                                      segment_copy("vol0", location, 1_700_000_000_000_000_000 + n)))
            data[header.sop_instance_uid] = raw
            path.unlink()
        backend.sync()
        self.index.apply(entries, "keep-first", committed_ends(e.copy for e in entries),
                         [("vol0", s) for s in backend.take_sealed()])
        return entries[0].header.study["StudyInstanceUID"], data

    def to_tier(self, study_uid: str, tier: str) -> None:
        """Copy the study to ``tier`` and drop its faster copies, as the mover does."""
        key = self.index.study_key(study_uid)
        assert key is not None
        backend = self.store.tiers[tier]
        added = {}
        for _sop, digest, blob, inst in self.index.study_blobs(key):
            raw = self.store.read_all(digest, blob, allow_offline=True)
            location = backend.put(BlobMeta(digest, len(raw), inst.received_ns, inst.calling_ae), BytesSource(raw))
            added[digest] = segment_copy(tier, location, inst.received_ns)
        backend.sync()
        self.index.register_container(tier, next(iter(added.values())).container, 1)
        faster = {"vol0"} | ({"nas"} if tier == "lto" else set())
        availability = NEARLINE if tier == "nas" else OFFLINE
        self.index.switch_study(key, added, faster, {s: availability for s, *_ in self.index.study_blobs(key)},
                                tier, 1, move_done=True)

    def availability(self, study_uid: str) -> set[str]:
        return {rec.availability for _k, rec in self.index.instances_under(study_uid)}

    def read_study(self, study_uid: str) -> dict[str, bytes]:
        out = {}
        for key, rec in self.index.instances_under(study_uid):
            blob = self.index.blob(rec.digest)
            assert blob is not None
            out[key.rsplit("\x00", 1)[1]] = self.store.read_all(rec.digest, blob)
        return out
