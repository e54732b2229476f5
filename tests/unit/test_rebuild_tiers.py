"""The pieces of `index rebuild --from-tier` (appliance/store/rebuild_tiers.py, StudyIndex.apply(tier_of=...),
place_rebuilt_studies) without a tier backend: the replay order through spilled runs, one copy per tier, the
availability and placement that follow the copies, and the bounded list of unreadable members. The whole path on
real tiers is tests/integration/test_rebuild_from_tier.py and test_rebuild_s3.py."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

from appliance.index.db import IndexEntry, Outcome, StudyIndex
from appliance.index.schema import NEARLINE, OFFLINE, ONLINE, ONLINE_TIER, Copy
from appliance.store.online import replay_order
from appliance.store.rebuild_tiers import UNREADABLE_LISTED_MAX, ReplaySpill, Unreadable
from tests.unit.test_index import entry, header

TIER_OF = {"vol0": ONLINE_TIER, "vol1": ONLINE_TIER, "nl": "nl", "tape": "tape"}
KIND = {ONLINE_TIER: ONLINE, "nl": NEARLINE, "tape": OFFLINE}
ORDER = [ONLINE_TIER, "nl", "tape"]


def tier_of(backend: str) -> str:
    return TIER_OF[backend]


def availability(backends: list[str]) -> str:
    return min((KIND[tier_of(b)] for b in backends), key=[ONLINE, NEARLINE, OFFLINE].index, default=OFFLINE)


def on(e: IndexEntry, backend: str, container: str = "arch") -> IndexEntry:
    """The same record (same bytes, same reception) as a copy on another backend."""
    return replace(e, copy=Copy(backend, container, f"{container}:{e.copy.location}", e.size, e.received_ns))


def test_spilled_runs_come_back_in_replay_order(tmp_path: Path) -> None:
    rng = random.Random(11)
    entries = [entry(header("P", f"1.{i % 7}", f"1.{i % 7}.1", f"1.{i % 7}.1.{i}"), t=rng.randrange(50))
               for i in range(100)]
    spill = ReplaySpill(tmp_path, run_entries=8)  # 12 runs on disk and one in memory
    for e in entries:
        spill.add(e)
    assert len(spill.files) == 12
    assert [replay_order(e) for e in spill] == sorted(replay_order(e) for e in entries)


def test_a_blob_on_several_tiers_keeps_one_copy_per_tier(tmp_path: Path) -> None:
    index = StudyIndex(tmp_path / "index")
    try:
        online = entry(header("P", "1.1", "1.1.1", "1.1.1.1"), t=5)
        resent = replace(on(online, "vol1", "seg2"), received_ns=9)  # an identical re-send on the other volume
        replay = sorted([online, on(online, "nl"), on(online, "tape"), on(online, "nl", "arch2"), resent],
                        key=replay_order)
        results = index.apply(replay, "keep-first", tier_of=tier_of)
        assert [r.outcome for r in results] == [Outcome.STORED] + [Outcome.IDENTICAL] * 4
        blob = index.blob(online.digest)
        assert blob is not None and blob.refs == 1
        # One per tier, the earliest record of each: two online volumes are alternatives, as live.
        assert sorted((c.backend, c.container) for c in blob.copies) == [("nl", "arch"), ("tape", "arch"),
                                                                         ("vol0", "seg")]
        assert index.container("nl", "arch") is not None and index.container("nl", "arch2") is None
        without = StudyIndex(tmp_path / "plain")
        try:
            without.apply(replay, "keep-first")  # a live ingest never adds copies this way
            plain = without.blob(online.digest)
            assert plain is not None and len(plain.copies) == 1
        finally:
            without.close()
    finally:
        index.close()


def test_placement_and_availability_follow_the_copies(tmp_path: Path) -> None:
    index = StudyIndex(tmp_path / "index")
    try:
        both = entry(header("P", "2.1", "2.1.1", "2.1.1.1"), t=1)  # online (a dead record) and on nearline
        near = [entry(header("P", "2.2", "2.2.1", f"2.2.1.{i}"), t=10 + i) for i in range(2)]
        taped = entry(header("P", "2.3", "2.3.1", "2.3.1.1"), t=20)
        later = entry(header("P", "2.3", "2.3.1", "2.3.1.2"), t=30)  # received after the move: online only
        replay = [both, on(both, "nl"), *(on(e, "nl") for e in near), on(taped, "tape"), later]
        index.apply(sorted(replay, key=replay_order), "keep-first", tier_of=tier_of)
        placed = index.place_rebuilt_studies(availability, tier_of, ORDER)
        assert placed == {ONLINE_TIER: 1, "nl": 1, "tape": 1}
        assert {r.availability for _k, r in index.instances_under("2.1")} == {ONLINE}
        assert {r.availability for _k, r in index.instances_under("2.2")} == {NEARLINE}
        assert {k.rsplit("\x00", 1)[1]: r.availability for k, r in index.instances_under("2.3")} == {
            "2.3.1.1": OFFLINE, "2.3.1.2": ONLINE}
        facts = {f.uid: f for f in index.study_facts()}
        assert (facts["2.1"].tier, facts["2.2"].tier, facts["2.3"].tier) == (ONLINE_TIER, "nl", "tape")
        assert facts["2.2"].since_ns == 11 and facts["2.3"].partly_online
        again = index.place_rebuilt_studies(availability, tier_of, ORDER)
        assert again == placed  # idempotent
    finally:
        index.close()


def test_unreadable_members_are_all_counted_and_a_bounded_number_listed() -> None:
    unreadable = Unreadable()
    for i in range(UNREADABLE_LISTED_MAX + 5):
        unreadable.add(f"nl:arch:{i}: unreadable")
    assert unreadable.count == UNREADABLE_LISTED_MAX + 5 and len(unreadable.listed) == UNREADABLE_LISTED_MAX
