"""Deleting on purpose and legal holds in the index (appliance/index/deletion.py): one transaction removes the
tree, the secondary indexes and the blob references, container accounting follows, emptied tier archives are
queued for the next tier run, a held study is refused inside the transaction; schema 4 -> 5 adds the table."""

from __future__ import annotations

from pathlib import Path

import lmdb
import pytest

from appliance.errors import OnHold
from appliance.index import schema
from appliance.index.db import SEP, StudyIndex
from appliance.index.deletion import HoldRecord
from tests.unit.test_index import entry, header
from tests.unit.test_index_tiers import STUDY, fill, index, move_all  # noqa: F401  (index: the fixture)


def test_delete_an_instance_a_series_and_a_study(index: StudyIndex) -> None:  # noqa: F811
    fill(index, n=3)
    index.apply([entry(header("P", "1.1", "1.1.2", "1.1.2.0", "MR"), size=100, t=20)], "keep-first")
    assert index.preview_delete("9.9") is None and index.delete("9.9", {"vol0"}) is None
    plan = index.preview_delete("1.1.1.0")
    assert plan is not None and (plan.level, plan.study_uid, plan.instances, plan.bytes) == ("instance", "1.1", 1, 100)
    assert plan.copies == {"vol0": 1}
    before = index.container("vol0", "seg")
    done = index.delete("1.1.1.0", {"vol0"})
    assert done is not None and done.public() == plan.public()
    assert index.lookup("1.1.1.0") is None and len(index.instances_under("1.1")) == 3
    after = index.container("vol0", "seg")
    assert before is not None and after is not None
    assert (after.live_records, after.live_bytes) == (before.live_records - 1, before.live_bytes - 100)
    series = index.delete("1.1.2", {"vol0"})  # the MR series: the study loses its modality
    assert series is not None and (series.level, series.instances) == ("series", 1)
    assert index.lookup("1.1")[2]["ModalitiesInStudy"] == ["CT"]  # type: ignore[index]
    assert index.studies_by("idx_modality", "MR") == []
    study = index.delete("1.1", {"vol0"})
    assert study is not None and (study.level, study.instances, study.bytes) == ("study", 2, 200)
    assert index.counts() == {"patients": 0, "studies": 0, "series": 0, "instances": 0}
    assert index.studies_by("idx_patientid", "P") == []
    assert index.container("vol0", "seg").live_records == 0  # type: ignore[union-attr]
    # An online segment is compaction's to reclaim: no gc row for it here.
    assert index.pending_gc() == []


def test_identical_bytes_of_two_instances_stay_named_until_the_last_goes(index: StudyIndex) -> None:  # noqa: F811
    index.apply([entry(header("P", "1.1", "1.1.1", f"1.1.1.{i}"), content="same", size=100, t=10 + i)
                 for i in range(2)], "keep-first")
    index.delete("1.1.1.0", {"vol0"})
    digest = index.instances_under("1.1")[0][1].digest
    assert index.blob(digest) is not None
    index.delete("1.1.1.1", {"vol0"})
    assert index.blob(digest) is None


def test_a_study_on_a_tier_queues_its_emptied_archive(index: StudyIndex) -> None:  # noqa: F811
    fill(index, n=2)
    move_all(index)  # the online segment is queued for gc by the move; the archive is sealed once synced
    index.seal_containers("nl", ["nl0/a.tar"])
    index.request_recall(STUDY, "cli")
    done = index.delete("1.1", {"vol0"})
    assert done is not None and done.copies == {"nl": 2}
    assert ("nl", "nl0/a.tar") in index.pending_gc() and index.container("nl", "nl0/a.tar") is None
    assert index.recalls() == [] and index.placement(STUDY).tier == schema.ONLINE_TIER


def test_a_held_study_is_refused_inside_the_transaction(index: StudyIndex) -> None:  # noqa: F811
    fill(index, n=2)
    assert index.hold("1.1", HoldRecord(5, "alice", "litigation"))
    assert not index.hold("1.1", HoldRecord(6, "bob"))  # the first hold is kept
    assert [(uid, h.by) for uid, h in index.holds()] == [("1.1", "alice")] and index.held("1.1")
    with pytest.raises(OnHold):
        index.delete("1.1.1.0", {"vol0"})
    assert len(index.instances_under("1.1")) == 2
    assert index.release("1.1") and not index.release("1.1")
    assert index.delete("1.1", {"vol0"}) is not None


def test_schema_4_is_upgraded_to_5(tmp_path: Path) -> None:
    idx = StudyIndex(tmp_path / "index")
    fill(idx, n=1)
    with idx.env.begin(write=True) as txn:
        txn.put(b"schema", b"4", db=idx.dbs["meta"])
    idx.close()
    env = lmdb.open(str(tmp_path / "index"), max_dbs=32)  # a version 4 index had no holds table
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(b"holds", txn=txn), delete=True)
    env.close()
    idx = StudyIndex(tmp_path / "index")
    try:
        with idx.env.begin() as txn:
            assert bytes(txn.get(b"schema", db=idx.dbs["meta"])) == schema.SCHEMA_VERSION == b"5"
        assert idx.holds() == [] and idx.lookup("1.1") is not None
        assert idx.dump()["holds"] == []
    finally:
        idx.close()
    assert SEP == "\x00"


def test_a_record_received_before_a_delete_and_indexed_after_it_is_kept_by_rebuild_too(
        index: StudyIndex) -> None:  # noqa: F811
    """A worker took an instance in (its receive time), a delete of it committed, then the worker's group commit
    indexed it and acknowledged it: the live index keeps it, so the tombstone moves back to its receive time and a
    rebuild, which skips what was received before a tombstone, keeps it as well (invariant 5)."""
    index.apply([entry(header("P", "1.1", "1.1.1", "1.1.1.0"), content="first", size=100, t=10)], "keep-first")
    index.delete("1.1.1.0", {"vol0"})
    tomb = dict(index.tombstones())["1.1.1.0"]
    assert tomb > 10  # after the deleted record's receive time, whatever the clock says
    index.apply([entry(header("P", "1.1", "1.1.1", "1.1.1.0"), content="late", size=100, t=20)], "keep-first")
    assert index.lookup("1.1.1.0") is not None  # acknowledged, so indexed
    assert dict(index.tombstones())["1.1.1.0"] == 20  # rebuild keeps t=20 and skips the deleted t=10 record
