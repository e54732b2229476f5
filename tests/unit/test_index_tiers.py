"""Schema 4 (tiering): placement, access times, the move journal, recalls and switch_study's one transaction with
its container accounting, compare-and-swap and availability."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest

from appliance.index import schema
from appliance.index.db import SEP, StudyIndex
from appliance.index.schema import NEARLINE, OFFLINE, ONLINE, Copy, MoveRecord
from tests.unit.test_index import entry, header


@pytest.fixture
def index(tmp_path: Path) -> Iterator[StudyIndex]:
    idx = StudyIndex(tmp_path / "index")
    yield idx
    idx.close()


STUDY = f"P{SEP}1.1"


def fill(index: StudyIndex, n: int = 3, study: str = "1.1", t: int = 10, ae: str = "SCU") -> None:
    index.apply([entry(header("P", study, f"{study}.1", f"{study}.1.{i}", "CT"), size=100, t=t + i, ae=ae)
                 for i in range(n)], "keep-first")
    index.seal_containers("vol0", ["seg"])


def tier_copy(digest: str, container: str = "nl0/a.tar") -> Copy:
    return Copy("nl", container, f"{container}:0:512:90:100", 90, 1)


def move_all(index: StudyIndex, study_key: str = STUDY, container: str = "nl0/a.tar") -> dict[str, int]:
    blobs = index.study_blobs(study_key)
    return index.switch_study(study_key, {d: tier_copy(d, container) for _s, d, _b, _i in blobs}, {"vol0"},
                              {sop: NEARLINE for sop, *_ in blobs}, "nl", 1000, move_done=True)


def test_facts_of_a_study_never_moved(index: StudyIndex) -> None:
    fill(index, 3, ae="CT1")
    index.apply([entry(header("P", "1.1", "1.1.2", "1.1.2.1", "MR"), size=50, t=99, ae="MR1")], "keep-first")
    (facts,) = list(index.study_facts())
    assert (facts.key, facts.uid, facts.bytes, facts.instances, facts.latest_ns) == (STUDY, "1.1", 350, 4, 99)
    assert facts.modalities == ("CT", "MR") and facts.calling_aes == ("CT1", "MR1")
    assert (facts.tier, facts.since_ns, facts.last_access_ns, facts.partly_online) == ("online", 0, 0, False)
    assert not facts.moving and not facts.recall_queued


def test_study_facts_batches_cover_every_study(index: StudyIndex) -> None:
    for s in range(600):  # more than FACTS_BATCH
        index.apply([entry(header(f"P{s % 7}", f"2.{s}", f"2.{s}.1", f"2.{s}.1.1"), size=10, t=s)], "keep-first")
    assert sorted(f.uid for f in index.study_facts()) == sorted(f"2.{s}" for s in range(600))


def test_record_access_only_moves_forward(index: StudyIndex) -> None:
    fill(index)
    assert index.record_access({"1.1": 500, "no.such.study": 1, "1.1.1.0": 7}) == 1
    assert index.record_access({"1.1": 400}) == 0
    assert index.placement(STUDY).last_access_ns == 500
    assert next(index.study_facts()).last_access_ns == 500


def test_move_journal(index: StudyIndex) -> None:
    fill(index)
    move = MoveRecord("old-ct", "online", "nl", "nl0/a.tar", "copy", 5)
    index.begin_move(STUDY, move)
    assert index.moves() == [(STUDY, move)]
    assert next(index.study_facts()).moving
    index.forget_move(STUDY)
    assert index.moves() == []


def test_switch_moves_copies_accounts_containers_and_sets_availability(index: StudyIndex) -> None:
    fill(index)
    index.record_access({"1.1": 700})
    index.begin_move(STUDY, MoveRecord("p", "online", "nl", "nl0/a.tar", "copy", 5))
    counts = move_all(index)
    assert counts == {"added": 3, "dropped": 3, "kept": 0, "skipped": 0}
    for _sop, _d, blob, inst in index.study_blobs(STUDY):
        assert [c.backend for c in blob.copies] == ["nl"] and inst.availability == NEARLINE
    nl = index.container("nl", "nl0/a.tar")
    assert nl is not None and (nl.live_records, nl.live_bytes) == (3, 270)
    assert index.container("vol0", "seg") is None and index.pending_gc() == [("vol0", "seg")]
    assert index.moves() == []
    place = index.placement(STUDY)
    assert (place.tier, place.since_ns, place.last_access_ns) == ("nl", 1000, 700)
    facts = next(index.study_facts())
    assert facts.tier == "nl" and not facts.partly_online and not facts.moving
    # A redo of the same switch changes nothing.
    assert move_all(index) == {"added": 0, "dropped": 0, "kept": 0, "skipped": 0}
    nl = index.container("nl", "nl0/a.tar")
    assert nl is not None and nl.live_records == 3


def test_active_segment_is_not_queued_for_deletion(index: StudyIndex) -> None:
    index.apply([entry(header("P", "1.1", "1.1.1", f"1.1.1.{i}"), size=100) for i in range(2)], "keep-first")
    move_all(index)  # "seg" is not sealed: a writer may still append to it
    rec = index.container("vol0", "seg")
    assert rec is not None and rec.live_records == 0 and index.pending_gc() == []


def test_instance_received_after_the_copy_stays_online(index: StudyIndex) -> None:
    fill(index, 2)
    blobs = index.study_blobs(STUDY)  # what the mover copied
    index.apply([entry(header("P", "1.1", "1.1.1", "1.1.1.9"), size=100, t=50)], "keep-first")
    counts = index.switch_study(STUDY, {d: tier_copy(d) for _s, d, _b, _i in blobs}, {"vol0"},
                                {sop: NEARLINE for sop, *_ in blobs}, "nl", 1000, move_done=True)
    assert counts["kept"] == 1
    by_sop = {sop: (blob, inst) for sop, _d, blob, inst in index.study_blobs(STUDY)}
    assert [c.backend for c in by_sop["1.1.1.9"][0].copies] == ["vol0"] and by_sop["1.1.1.9"][1].availability == ONLINE
    assert by_sop["1.1.1.0"][1].availability == NEARLINE
    assert next(index.study_facts()).partly_online
    rec = index.container("vol0", "seg")
    assert rec is not None and rec.live_records == 1 and index.pending_gc() == []


def test_blob_freed_meanwhile_is_skipped(index: StudyIndex) -> None:
    fill(index, 2)
    blobs = index.study_blobs(STUDY)
    # The first instance is overwritten by other bytes while the mover copies: its old blob is freed.
    index.apply([entry(header("P", "1.1", "1.1.1", "1.1.1.0"), content="new bytes", size=100, t=60)], "overwrite")
    counts = index.switch_study(STUDY, {d: tier_copy(d) for _s, d, _b, _i in blobs}, {"vol0"},
                                {sop: NEARLINE for sop, *_ in blobs}, "nl", 1000, move_done=True)
    assert counts["skipped"] == 1 and counts["kept"] == 1
    nl = index.container("nl", "nl0/a.tar")
    assert nl is not None and nl.live_records == 1
    by_sop = {sop: inst.availability for sop, _d, _b, inst in index.study_blobs(STUDY)}
    assert by_sop == {"1.1.1.0": ONLINE, "1.1.1.1": NEARLINE}


def test_shared_bytes_with_another_study_keep_their_online_copy(index: StudyIndex) -> None:
    index.apply([entry(header("P", "1.1", "1.1.1", "1.1.1.1"), content="same", size=100),
                 entry(header("P", "3.1", "3.1.1", "3.1.1.1"), content="same", size=100)], "keep-first")
    counts = move_all(index)
    assert counts["kept"] == 1 and counts["dropped"] == 0
    ((_sop, _d, blob, inst),) = index.study_blobs(STUDY)
    assert sorted(c.backend for c in blob.copies) == ["nl", "vol0"] and inst.availability == ONLINE


def test_recall_queue_and_recall_switch(index: StudyIndex) -> None:
    fill(index)
    move_all(index)
    assert index.request_recall(STUDY, "cli", queue_max=1)
    assert index.request_recall(STUDY, "c-move", queue_max=1)  # already queued: stays as it was
    assert not index.request_recall(f"P{SEP}9.9", "cli", queue_max=1)
    index.recall_failed(STUDY, "drive busy")
    ((key, rec),) = index.recalls()
    assert (key, rec.requested_by, rec.attempts, rec.error) == (STUDY, "cli", 1, "drive busy")
    assert next(index.study_facts()).recall_queued
    blobs = index.study_blobs(STUDY)
    online = {d: Copy("vol0", "seg2", f"seg2:{d}", 100, 1) for _s, d, _b, _i in blobs}
    index.switch_study(STUDY, online, set(), {sop: ONLINE for sop, *_ in blobs}, "online", 2000, move_done=False)
    assert index.recalls() == []
    for _sop, _d, blob, inst in index.study_blobs(STUDY):
        assert sorted(c.backend for c in blob.copies) == ["nl", "vol0"] and inst.availability == ONLINE
    place = index.placement(STUDY)
    assert (place.tier, place.last_access_ns) == ("online", 2000)


def test_offline_availability_is_stored(index: StudyIndex) -> None:
    fill(index, 1)
    blobs = index.study_blobs(STUDY)
    index.switch_study(STUDY, {d: Copy("tape", "L1/3", "L1/3:0:0:1:1", 1, 1) for _s, d, _b, _i in blobs},
                       {"vol0"}, {sop: OFFLINE for sop, *_ in blobs}, "tape", 5, move_done=True)
    assert index.study_blobs(STUDY)[0][3].availability == OFFLINE


def test_schema_3_is_upgraded_to_4(tmp_path: Path) -> None:
    index = StudyIndex(tmp_path / "index")
    fill(index)
    expected = index.dump()
    index.close()
    env = lmdb.open(str(tmp_path / "index"), max_dbs=32)
    with env.begin(write=True) as txn:
        for name in (b"placement", b"moves", b"recalls"):
            txn.drop(env.open_db(name, txn=txn), delete=True)
        txn.put(b"schema", b"3", db=env.open_db(b"meta", txn=txn))
    env.close()
    index = StudyIndex(tmp_path / "index")
    try:
        assert index.dump() == expected
        with index.env.begin() as txn:
            assert bytes(txn.get(b"schema", db=index.dbs["meta"])) == schema.SCHEMA_VERSION
        assert next(index.study_facts()).tier == "online"
    finally:
        index.close()


def test_iter_containers_walks_in_batches_what_containers_lists(index: StudyIndex) -> None:
    for i in range(30):
        index.register_container("nl", f"nl0/{i:03}.tar", i)
        index.register_container("nl2", f"v/{i:03}.tar", i)
    index.register_container("n", "x.tar", 1)  # a backend name that is a prefix of another
    for backend in ("nl", "nl2", "n", None):
        assert list(index.iter_containers(backend, batch=7)) == index.containers(backend)
    assert len(list(index.iter_containers("nl", batch=7))) == 30
