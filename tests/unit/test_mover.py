"""tiering/mover.py on real online segments and an index, against a file-per-blob tier (tests/tier_rig.py): copy,
verify, switch, delete; failures leave the study where it was; resume after an interrupted move; the rate limit;
the lock; the audit log."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.config import Config
from appliance.index.db import SEP, StudyIndex
from appliance.index.schema import NEARLINE, OFFLINE, ONLINE, MoveRecord
from appliance.store.backend import BlobBackend, BlobMeta
from appliance.store.online import BlobStore
from appliance.store.segments import parse_location
from tests.tier_rig import DirTier, MemorySource, ingest, make_config, read_instance
from tiering.audit import AuditLog, read_audit
from tiering.mover import Mover, TokenBucket
from tiering.policy import PlannedMove
from tiering.run import TierBusy, tiering_lock
from tiering.tiers import init_tier, open_tier


@dataclass
class Rig:
    config: Config
    index: StudyIndex
    store: BlobStore
    nl: BlobBackend
    tape: BlobBackend
    audit: AuditLog
    mover: Mover
    data: dict[str, bytes]

    def planned(self, study: str, source: str = "online", target: str = "nl") -> PlannedMove:
        return PlannedMove(f"P{SEP}{study}", study, source, target, 0, 0, "test-policy", "test")

    def read(self, sop: str) -> bytes:
        return read_instance(self.config, self.index, {"nl": self.nl, "tape": self.tape}, sop)

    def availability(self, study: str) -> set[str]:
        return {inst.availability for _s, _d, _b, inst in self.index.study_blobs(f"P{SEP}{study}")}


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    config = make_config(tmp_path, tiering="study_instances_max = 5")
    index = StudyIndex(config.storage.index_path)
    data = ingest(config, index, {"1.1": 3, "1.2": 2})
    store = BlobStore.open(config)
    nl_tier = config.tier("nl")
    assert nl_tier is not None
    init_tier(nl_tier)
    tape_tier = config.tier("tape")
    assert tape_tier is not None
    init_tier(tape_tier)
    nl, tape = open_tier(nl_tier), open_tier(tape_tier)
    audit = AuditLog(config.tiering.audit_log)
    mover = Mover(config, index, dict(store.backends), {"nl": nl, "tape": tape}, audit, TokenBucket(1 << 40))
    yield Rig(config, index, store, nl, tape, audit, mover, data)
    audit.close()
    nl.close()
    tape.close()
    store.close()
    index.close()


def archives(rig: Rig) -> list[str]:
    """Every archive file on the nearline volume, finished or partial."""
    root = rig.config.tiers[0].volumes[0].path
    return sorted(p.name for p in [*root.glob("archives/*/*"), *root.glob("tmp/*")] if p.is_file())


def segments(rig: Rig) -> list[str]:
    return sorted(p.name for p in (rig.config.volumes[0].path / "segments").iterdir())


def test_move_online_to_nearline_then_tape(rig: Rig) -> None:
    before = rig.index.counts()
    online_segments = segments(rig)
    result = rig.mover.move(rig.planned("1.1"))
    assert (result.outcome, result.instances, result.bytes) == ("moved", 3, 9000)
    assert rig.availability("1.1") == {NEARLINE} and rig.availability("1.2") == {ONLINE}
    for sop in ("1.1.1.0", "1.1.1.1", "1.1.1.2"):
        assert rig.read(sop) == rig.data[sop]
    for _s, _d, blob, _i in rig.index.study_blobs(f"P{SEP}1.1"):
        assert [c.backend for c in blob.copies] == ["nl"]
    assert rig.index.placement(f"P{SEP}1.1").tier == "nl" and rig.index.moves() == []
    assert len(archives(rig)) == 1
    ((nl_container, _c),) = {(c.container, 0) for _s, _d, b, _i in rig.index.study_blobs(f"P{SEP}1.1")
                             for c in b.copies}
    rec = rig.index.container("nl", nl_container)
    assert rec is not None and rec.live_records == 3 and rec.sealed
    assert segments(rig) == online_segments  # the segment still holds study 1.2: dead bytes for compaction
    assert rig.index.counts() == before

    result = rig.mover.move(rig.planned("1.1", "nl", "tape"))
    assert result.outcome == "moved" and rig.availability("1.1") == {OFFLINE}
    assert archives(rig) == [] and rig.index.container("nl", nl_container) is None
    assert rig.index.pending_gc() == []
    assert rig.read("1.1.1.1") == rig.data["1.1.1.1"]
    lines = read_audit(rig.config.tiering.audit_log)
    assert [(ln["study"], ln["from"], ln["to"], ln["outcome"], ln["instances"]) for ln in lines] == [
        ("1.1", "online", "nl", "moved", 3), ("1.1", "nl", "tape", "moved", 3)]
    assert lines[0]["bytes"] == 9000 and lines[0]["policy"] == "test-policy"


def test_emptied_online_segment_is_deleted(rig: Rig) -> None:
    rig.mover.move(rig.planned("1.1"))
    rig.mover.move(rig.planned("1.2"))
    assert segments(rig) == [] and rig.index.containers("vol0") == []
    assert rig.index.pending_gc() == []


def test_online_to_tape_directly_drops_every_faster_copy(rig: Rig) -> None:
    rig.mover.move(rig.planned("1.2", "online", "tape"))
    assert rig.availability("1.2") == {OFFLINE}
    for _s, _d, blob, _i in rig.index.study_blobs(f"P{SEP}1.2"):
        assert [c.backend for c in blob.copies] == ["tape"]


def test_study_with_a_copy_on_the_target_is_only_switched(rig: Rig) -> None:
    rig.mover.move(rig.planned("1.2", "online", "tape"))
    # As a recall does: the study comes back online, its tape copies stay.
    key = f"P{SEP}1.2"
    ingest_online = {d: c for _s, d, b, _i in rig.index.study_blobs(key) for c in b.copies}
    assert ingest_online
    blobs = rig.index.study_blobs(key)
    store = BlobStore.open(rig.config, index=rig.index)
    try:
        seg = store.segment_backend("vol0")
        added = {}
        from appliance.store.backend import BlobMeta
        from appliance.store.segments import segment_copy
        from tests.tier_rig import MemorySource

        for sop, digest, blob, inst in blobs:
            loc = seg.put(BlobMeta(digest, blob.size, inst.received_ns, inst.calling_ae), MemorySource(rig.data[sop]))
            added[digest] = segment_copy("vol0", loc, inst.received_ns)
        seg.sync()
    finally:
        store.close()
    rig.index.switch_study(key, added, set(), {sop: ONLINE for sop, *_ in blobs}, "online", 5, move_done=False)
    assert rig.availability("1.2") == {ONLINE}
    result = rig.mover.move(rig.planned("1.2", "online", "tape"))
    assert (result.outcome, result.bytes) == ("moved", 0)  # nothing copied: only the online copies dropped
    assert rig.availability("1.2") == {OFFLINE}


def test_corrupt_source_fails_the_move_and_leaves_the_study_online(rig: Rig) -> None:
    _sop, _digest, blob, _inst = rig.index.study_blobs(f"P{SEP}1.1")[1]
    segment, _rec, data_offset, _size = parse_location(blob.copies[0].location)
    path = rig.config.volumes[0].path / "segments" / segment
    with path.open("r+b") as fh:
        fh.seek(data_offset + 10)
        fh.write(b"\xff\xfe")
    result = rig.mover.move(rig.planned("1.1"))
    assert result.outcome == "failed" and "does not hash to its digest" in result.error
    assert rig.availability("1.1") == {ONLINE} and archives(rig) == []
    assert rig.index.moves() == [] and rig.index.containers("nl") == []
    assert read_audit(rig.config.tiering.audit_log)[-1]["outcome"] == "failed"


def test_target_that_corrupts_is_caught_by_the_verify(rig: Rig) -> None:
    bad = rig.mover.tiers["nl"] = DirTier("nl", rig.config.tiers[0].volumes[0].path / "bad")
    bad.corrupt_puts = True
    result = rig.mover.move(rig.planned("1.1"))
    assert result.outcome == "failed" and "after sync" in result.error
    assert rig.availability("1.1") == {ONLINE} and bad.containers() == []
    assert rig.read("1.1.1.0") == rig.data["1.1.1.0"]


def test_too_large_study_is_refused(tmp_path: Path) -> None:
    config = make_config(tmp_path, tiering="study_instances_max = 2")
    index = StudyIndex(config.storage.index_path)
    try:
        ingest(config, index, {"1.1": 3})
        store = BlobStore.open(config)
        with AuditLog(config.tiering.audit_log) as audit:
            mover = Mover(config, index, dict(store.backends), {"nl": DirTier("nl", tmp_path / "nl0")}, audit,
                          TokenBucket(1 << 40))
            result = mover.move(PlannedMove(f"P{SEP}1.1", "1.1", "online", "nl", 0, 0, "p", "r"))
        store.close()
        assert result.outcome == "refused" and "study_instances_max" in result.error
        assert index.moves() == []
    finally:
        index.close()


def test_resume_redoes_a_journaled_move_and_removes_its_container(rig: Rig) -> None:
    # What a mover killed mid-copy leaves: a journal, a registered container with bytes nobody names.
    container = rig.nl.begin_container("crashed")
    rig.nl.put(BlobMeta("0" * 64, 7, 1, "SCU"), MemorySource(b"partial"))
    rig.index.register_container("nl", container, 1)
    assert archives(rig)
    rig.index.begin_move(f"P{SEP}1.1", MoveRecord("old-ct", "online", "nl", container, "copy", 1))
    (result,) = rig.mover.resume()
    assert result.outcome == "moved" and result.resumed and result.policy == "old-ct"
    assert len(archives(rig)) == 1 and rig.index.container("nl", container) is None
    assert rig.availability("1.1") == {NEARLINE} and rig.index.moves() == []
    assert rig.read("1.1.1.2") == rig.data["1.1.1.2"]
    assert rig.mover.resume() == []


def test_resume_deletes_what_a_switch_left_in_gc(rig: Rig) -> None:
    rig.mover.collect_garbage = lambda: 0  # type: ignore[method-assign]  # killed right after the switch
    rig.mover.move(rig.planned("1.1"))
    rig.mover.move(rig.planned("1.2"))
    assert rig.index.pending_gc() and segments(rig)
    del rig.mover.collect_garbage
    rig.mover.resume()
    assert rig.index.pending_gc() == [] and segments(rig) == []


def test_vanished_study(rig: Rig) -> None:
    result = rig.mover.move(rig.planned("9.9"))
    assert result.outcome == "vanished"


def test_token_bucket_waits_for_its_rate() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    bucket = TokenBucket(100, clock=lambda: now[0], sleep=sleep)
    bucket.take(100)  # the first second's burst
    assert slept == []
    bucket.take(50)
    assert slept == [0.5]
    now[0] += 10  # idle: the burst refills to one second, not more
    bucket.take(100)
    bucket.take(100)
    assert slept == [0.5, 1.0]


def test_the_mover_is_rate_limited(rig: Rig) -> None:
    slept: list[float] = []
    rig.mover.bucket = TokenBucket(4000, sleep=slept.append)
    rig.mover.move(rig.planned("1.1"))  # 9000 bytes read + 9000 written + 9000 re-read for the verify
    assert sum(slept) >= (27000 - 4000) / 4000 * 0.9


def test_one_mover_at_a_time(tmp_path: Path) -> None:
    with tiering_lock(tmp_path, "appliance tier run"):
        with pytest.raises(TierBusy, match=r"another mover is running \(appliance tier run, pid \d+"):
            with tiering_lock(tmp_path, "scheduled run"):
                pass
    with tiering_lock(tmp_path, "scheduled run"):
        pass


def test_unmounted_target_fails_the_move_and_leaves_the_study_online(rig: Rig) -> None:
    marker = rig.config.tiers[0].volumes[0].path / ".appliance-nearline"
    saved = marker.read_bytes()
    marker.unlink()  # what an unmounted NAS looks like
    result = rig.mover.move(rig.planned("1.1"))
    assert result.outcome == "failed" and "no volume takes new archives" in result.error
    assert rig.availability("1.1") == {ONLINE} and rig.index.moves() == []
    assert rig.read("1.1.1.0") == rig.data["1.1.1.0"]
    marker.write_bytes(saved)
    assert rig.mover.move(rig.planned("1.1")).outcome == "moved"


def test_a_delete_that_fails_after_the_switch_is_done_by_the_next_run(rig: Rig) -> None:
    from appliance.errors import VolumeError

    rig.mover.move(rig.planned("1.1"))
    real_remove = rig.nl.remove_container

    def unmounted(name: str) -> None:
        raise VolumeError("nearline volume nl0 is not mounted")

    rig.nl.remove_container = unmounted  # type: ignore[method-assign]
    result = rig.mover.move(rig.planned("1.1", "nl", "tape"))
    assert result.outcome == "moved" and rig.availability("1.1") == {OFFLINE}  # the switch stands
    assert [b for b, _n in rig.index.pending_gc()] == ["nl"] and len(archives(rig)) == 1
    rig.nl.remove_container = real_remove  # type: ignore[method-assign]
    assert rig.mover.resume() == []
    assert rig.index.pending_gc() == [] and archives(rig) == []
    assert rig.read("1.1.1.1") == rig.data["1.1.1.1"]


def test_a_stale_plan_is_skipped_not_moved(rig: Rig) -> None:
    """The recaller works under its own lock: a study whose recall was queued, or which a recall switched, after
    the plan was made is left for the next run's plan (moving it would undo the recall a retrieve waits for)."""
    key = f"P{SEP}1.1"
    assert rig.index.request_recall(key, "c-move")
    result = rig.mover.move(rig.planned("1.1"))
    assert (result.outcome, result.error) == ("skipped", "a recall of the study is queued")
    assert rig.availability("1.1") == {ONLINE} and rig.index.moves() == []
    rig.index.forget_recall(key)
    # Planned when placed "since 0" (never moved); a switch since then changed that.
    planned = rig.planned("1.2")
    stale = PlannedMove(planned.study_key, planned.study_uid, "online", "nl", 0, 0, "p", "r", placed_since_ns=7)
    assert rig.mover.move(stale).outcome == "skipped"
    assert rig.availability("1.2") == {ONLINE}
    fresh = PlannedMove(planned.study_key, planned.study_uid, "online", "nl", 0, 0, "p", "r", placed_since_ns=0)
    assert rig.mover.move(fresh).outcome == "moved"
    assert rig.availability("1.2") == {NEARLINE}


def test_every_instance_overwritten_during_the_move_leaves_no_archive_behind(rig: Rig) -> None:
    """duplicate_policy overwrite: the study's instances are all replaced by other bytes while the mover copies
    them. The switch skips the freed blobs (the new versions stay online), and the archive the mover wrote, which
    the index now names nothing in, is removed instead of being left on the tier for ever."""
    import hashlib

    from appliance.index.db import IndexEntry
    from appliance.store.segments import segment_copy
    from tests.tier_rig import MemorySource
    from tests.unit.test_index import header

    def overwrite(phase: str) -> None:
        if phase != "synced":
            return
        backend = rig.store.segment_backend("vol0")
        entries = []
        for i in range(2):
            data = b"new version %d " % i * 100
            digest = hashlib.sha256(data).hexdigest()
            loc = backend.put(BlobMeta(digest, len(data), 9_000 + i, "SCU"), MemorySource(data))
            entries.append(IndexEntry(header("P", "1.2", "1.2.1", f"1.2.1.{i}", "CT"), digest, len(data),
                                      "1.2.840.10008.1.2.1", 9_000 + i, "SCU", segment_copy("vol0", loc, 9_000 + i)))
        backend.sync()
        rig.index.apply(entries, "overwrite")

    rig.mover._phase = overwrite  # type: ignore[method-assign]
    result = rig.mover.move(rig.planned("1.2"))
    assert result.outcome == "moved"
    assert rig.availability("1.2") == {ONLINE}
    assert archives(rig) == []
    assert [c for c in rig.index.containers("nl")] == []


def test_an_archive_emptied_by_overwrites_after_the_move_is_removed_by_the_next_run(rig: Rig) -> None:
    """A study on nearline whose instances are all overwritten by new bytes (duplicate_policy overwrite): its
    archive holds nothing the index names. The next run's resume removes it (no gc row is ever queued for it)."""
    import hashlib

    from appliance.index.db import IndexEntry
    from appliance.store.segments import segment_copy
    from tests.tier_rig import MemorySource
    from tests.unit.test_index import header

    assert rig.mover.move(rig.planned("1.2")).outcome == "moved"
    assert len(archives(rig)) == 1
    backend = rig.store.segment_backend("vol0")
    entries = []
    for i in range(2):
        data = b"new version %d " % i * 100
        digest = hashlib.sha256(data).hexdigest()
        loc = backend.put(BlobMeta(digest, len(data), 9_000 + i, "SCU"), MemorySource(data))
        entries.append(IndexEntry(header("P", "1.2", "1.2.1", f"1.2.1.{i}", "CT"), digest, len(data),
                                  "1.2.840.10008.1.2.1", 9_000 + i, "SCU", segment_copy("vol0", loc, 9_000 + i)))
    backend.sync()
    rig.index.apply(entries, "overwrite")
    assert rig.availability("1.2") == {ONLINE}
    rig.mover.resume()
    assert archives(rig) == [] and rig.index.containers("nl") == []


def test_a_suspect_copy_on_the_target_is_not_trusted(rig: Rig) -> None:
    """A recalled study (online + tape copies) goes back down to tape; `verify` found its tape copies corrupt in
    between (state suspect). The mover must copy it to tape again, not switch onto the corrupt copies and drop the
    only good ones."""
    from appliance.index.schema import COPY_OK, COPY_SUSPECT
    from appliance.store.segments import segment_copy
    from tests.tier_rig import MemorySource

    key = f"P{SEP}1.2"
    rig.mover.move(rig.planned("1.2", "online", "tape"))
    blobs = rig.index.study_blobs(key)
    seg = rig.store.segment_backend("vol0")
    added = {}
    for sop, digest, blob, inst in blobs:
        loc = seg.put(BlobMeta(digest, blob.size, inst.received_ns, inst.calling_ae), MemorySource(rig.data[sop]))
        added[digest] = segment_copy("vol0", loc, inst.received_ns)
    seg.sync()
    rig.index.register_container("vol0", next(iter(added.values())).container, 1)
    rig.index.switch_study(key, added, set(), {sop: ONLINE for sop, *_ in blobs}, "online", 5, move_done=False)
    rig.index.mark_verified([(d, c, COPY_SUSPECT) for _s, d, b, _i in blobs for c in b.copies], 6)
    result = rig.mover.move(rig.planned("1.2", "online", "tape"))
    assert result.outcome == "moved" and result.bytes == sum(b.size for _s, _d, b, _i in blobs)
    for sop, _d, blob, _i in rig.index.study_blobs(key):
        assert [c.backend for c in blob.copies if c.state == COPY_OK] == ["tape"], blob.copies
        assert rig.read(sop) == rig.data[sop]


def test_a_move_paused_by_its_source_mid_copy_leaves_nothing_pending_for_the_next_move(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """The source tier goes down while a blob is being copied into the target's archive: that move pauses (its
    journal stays) and the target, which is fine, takes the next study; the half-written archive of the paused
    move is not finished by the next sync."""
    from appliance.errors import TierUnavailable

    real = Mover.read_best

    def source_down_mid_blob(self: Mover, digest: str, blob: object) -> Iterator[bytes]:
        yield b"\0" * 100
        raise TierUnavailable("object store tape unreachable (read timeout)", "tape")

    monkeypatch.setattr(Mover, "read_best", source_down_mid_blob)
    paused = rig.mover.move(rig.planned("1.1"))
    assert paused.outcome == "paused" and "tape" in rig.mover.unavailable and "nl" not in rig.mover.unavailable
    assert [m[0] for m in rig.index.moves()] == [f"P{SEP}1.1"]  # journaled: the next run finishes it
    monkeypatch.setattr(Mover, "read_best", real)
    moved = rig.mover.move(rig.planned("1.2"))
    assert moved.outcome == "moved", moved.error
    assert rig.availability("1.2") == {NEARLINE} and rig.availability("1.1") == {ONLINE}
    for sop in ("1.2.1.0", "1.2.1.1"):
        assert rig.read(sop) == rig.data[sop]
