"""StudyIndex.apply on synthetic entries: the hierarchy, aggregates, secondary indexes, duplicate policies,
blob reference counting, map growth and commit-order independence."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.index.db import SEP, IndexEntry, Outcome, StudyIndex
from appliance.index.records import Header
from appliance.index.schema import Copy

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
SR = "1.2.840.10008.5.1.4.1.1.88.11"
CLASS_OF = {"CT": CT, "MR": MR, "SR": SR}


def digest(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def header(pid: str, study: str, series: str, sop: str, modality: str = "CT", *, accession: str = "",
           date: str = "", name: str = "", description: str = "", issuer: str = "") -> Header:
    h = Header()
    h.patient = {"PatientID": pid}
    if issuer:
        h.patient["IssuerOfPatientID"] = issuer
    if name:
        h.patient["PatientName"] = name
    h.study = {"StudyInstanceUID": study}
    if accession:
        h.study["AccessionNumber"] = accession
    if date:
        h.study["StudyDate"] = date
    if description:
        h.study["StudyDescription"] = description
    h.series = {"SeriesInstanceUID": series, "Modality": modality}
    h.instance = {"SOPInstanceUID": sop, "SOPClassUID": CLASS_OF[modality]}
    return h


def entry(h: Header, content: str | None = None, size: int = 1000, t: int = 1, volume: str = "vol0",
          ae: str = "SCU") -> IndexEntry:
    d = digest(content or h.sop_instance_uid)
    return IndexEntry(header=h, digest=d, size=size, transfer_syntax="1.2.840.10008.1.2.1", received_ns=t,
                      calling_ae=ae, copy=Copy(volume, "seg", f"seg:{d}:{t}", size, t))


def live(index: StudyIndex, volume: str = "vol0") -> tuple[int, int]:
    """(live records, live bytes) of the test's one container."""
    rec = index.container(volume, "seg")
    return (0, 0) if rec is None else (rec.live_records, rec.live_bytes)


@pytest.fixture
def index(tmp_path: Path) -> Iterator[StudyIndex]:
    idx = StudyIndex(tmp_path / "index", map_size=1 << 20, sync=False)
    yield idx
    idx.close()


def record(index: StudyIndex, level: str, key: str) -> dict:
    rows = dict(index.items(level, key))
    assert key in rows, f"{level} {key!r} missing"
    return rows[key]


def keys(index: StudyIndex, level: str, prefix: str = "") -> list[str]:
    return [k for k, _ in index.items(level, prefix)]


# ---- hierarchy and aggregates -----------------------------------------------------------------------


def build_tree(index: StudyIndex) -> None:
    entries = [
        # P1: study S1 (CT series with 3, SR series with 1), study S2 (MR series with 2)
        entry(header("P1", "S1", "S1.CT", "I1", "CT", accession="A1", date="20200115"), size=100, t=1),
        entry(header("P1", "S1", "S1.CT", "I2", "CT", accession="A1", date="20200115"), size=200, t=2),
        entry(header("P1", "S1", "S1.CT", "I3", "CT", accession="A1", date="20200115"), size=300, t=3),
        entry(header("P1", "S1", "S1.SR", "I4", "SR", accession="A1", date="20200115"), size=50, t=4),
        entry(header("P1", "S2", "S2.MR", "I5", "MR", accession="A2", date="20210610"), size=1000, t=5),
        entry(header("P1", "S2", "S2.MR", "I6", "MR", accession="A2", date="20210610"), size=2000, t=6),
        # P10 shares a prefix with P1: prefix scans must still separate them
        entry(header("P10", "S3", "S3.CT", "I7", "CT", accession="A3", date="20200301"), size=7, t=7),
        # Same PatientID with an issuer: another patient
        entry(header("P1", "S4", "S4.MR", "I8", "MR", issuer="HOSP2", date="19991231"), size=8, t=8),
    ]
    results = index.apply(entries[:3], "overwrite") + index.apply(entries[3:], "overwrite")
    assert [r.outcome for r in results] == [Outcome.STORED] * len(entries)
    assert all(r.blob_is_new for r in results)


def test_hierarchy_and_prefix_scans(index: StudyIndex) -> None:
    build_tree(index)
    assert keys(index, "patients") == ["P1", "P10", "P1^^HOSP2"]
    assert keys(index, "studies", "P1" + SEP) == ["P1\x00S1", "P1\x00S2"]
    assert keys(index, "studies", "P10" + SEP) == ["P10\x00S3"]
    assert keys(index, "series", "P1\x00S1" + SEP) == ["P1\x00S1\x00S1.CT", "P1\x00S1\x00S1.SR"]
    assert keys(index, "instances", "P1\x00S1\x00S1.CT" + SEP) == [f"P1\x00S1\x00S1.CT\x00I{i}" for i in (1, 2, 3)]
    assert len(keys(index, "instances", "P1\x00S1" + SEP)) == 4
    assert index.counts() == {"patients": 3, "studies": 4, "series": 5, "instances": 8}
    assert index.lookup("S1") == ("studies", "P1\x00S1", record(index, "studies", "P1\x00S1"))
    assert index.lookup("S1.SR")[:2] == ("series", "P1\x00S1\x00S1.SR")  # type: ignore[index]
    assert index.lookup("I7")[:2] == ("instances", "P10\x00S3\x00S3.CT\x00I7")  # type: ignore[index]
    assert index.lookup("nope") is None
    assert [k.rsplit(SEP, 1)[1] for k, _ in index.instances_under("S1")] == ["I1", "I2", "I3", "I4"]
    assert [k.rsplit(SEP, 1)[1] for k, _ in index.instances_under("S2.MR")] == ["I5", "I6"]
    assert [k.rsplit(SEP, 1)[1] for k, _ in index.instances_under("I4")] == ["I4"]
    assert index.instances_under("nope") == []


def test_counts_and_sizes_at_every_level(index: StudyIndex) -> None:
    build_tree(index)
    p1 = record(index, "patients", "P1")
    assert (p1["NumberOfStudies"], p1["NumberOfInstances"], p1["Size"]) == (2, 6, 3650)
    assert p1["PatientID"] == "P1"
    p2 = record(index, "patients", "P1^^HOSP2")
    assert (p2["NumberOfStudies"], p2["NumberOfInstances"], p2["Size"], p2["IssuerOfPatientID"]) == (1, 1, 8, "HOSP2")
    s1 = record(index, "studies", "P1\x00S1")
    assert (s1["NumberOfSeries"], s1["NumberOfInstances"], s1["Size"]) == (2, 4, 650)
    assert s1["ModalitiesInStudy"] == ["CT", "SR"]
    assert s1["PatientID"] == "P1" and s1["AccessionNumber"] == "A1" and s1["StudyDate"] == "20200115"
    s2 = record(index, "studies", "P1\x00S2")
    assert (s2["NumberOfSeries"], s2["NumberOfInstances"], s2["Size"], s2["ModalitiesInStudy"]) == (1, 2, 3000, ["MR"])
    ct = record(index, "series", "P1\x00S1\x00S1.CT")
    assert (ct["NumberOfInstances"], ct["Size"], ct["Modality"]) == (3, 600, "CT")
    sr = record(index, "series", "P1\x00S1\x00S1.SR")
    assert (sr["NumberOfInstances"], sr["Size"]) == (1, 50)
    inst = record(index, "instances", "P1\x00S1\x00S1.CT\x00I2")
    assert inst["size"] == 200 and inst["digest"] == digest("I2")
    assert inst["SOPClassUID"] == CT and inst["received_ns"] == 2 and inst["calling_ae"] == "SCU"
    assert inst["TransferSyntaxUID"] == "1.2.840.10008.1.2.1" and inst["InstanceAvailability"] == "ONLINE"
    # Sums agree between levels.
    for pk, patient in index.items("patients"):
        studies = index.items("studies", pk + SEP)
        assert patient["NumberOfStudies"] == len(studies)
        assert patient["Size"] == sum(s["Size"] for _, s in studies)
        for sk, study in studies:
            series = index.items("series", sk + SEP)
            assert study["NumberOfSeries"] == len(series)
            assert study["NumberOfInstances"] == sum(r["NumberOfInstances"] for _, r in series)


def test_modalities_in_study_sorted_and_unique(index: StudyIndex) -> None:
    index.apply([entry(header("P", "S", "R1", "I1", "MR")), entry(header("P", "S", "R2", "I2", "CT")),
                 entry(header("P", "S", "R3", "I3", "MR")), entry(header("P", "S", "R4", "I4", "SR"))], "overwrite")
    assert record(index, "studies", "P\x00S")["ModalitiesInStudy"] == ["CT", "MR", "SR"]


def test_secondary_indexes(index: StudyIndex) -> None:
    build_tree(index)
    assert index.studies_by("idx_patientid", "P1") == ["P1\x00S1", "P1\x00S2", "P1^^HOSP2\x00S4"]
    assert index.studies_by("idx_patientid", "P10") == ["P10\x00S3"]
    assert index.studies_by("idx_patientid", "P") == []
    assert index.studies_by("idx_accession", "A2") == ["P1\x00S2"]
    assert index.studies_by("idx_accession", "A") == []
    assert index.studies_by("idx_studydate", "20200301") == ["P10\x00S3"]
    assert index.studies_in_date_range("20200101", "20201231") == ["P1\x00S1", "P10\x00S3"]
    assert index.studies_in_date_range("20200115", "20200115") == ["P1\x00S1"]  # inclusive at both ends
    assert index.studies_in_date_range("20200116", "20200301") == ["P10\x00S3"]
    assert index.studies_in_date_range("19000101", "20991231") == ["P1^^HOSP2\x00S4", "P1\x00S1", "P10\x00S3",
                                                                    "P1\x00S2"]
    assert index.studies_in_date_range("20220101", "20991231") == []


def test_secondary_indexes_follow_the_latest_attributes(index: StudyIndex) -> None:
    index.apply([entry(header("P", "S", "R", "I1", accession="OLD", date="20200101"), t=10)], "overwrite")
    # An instance received later carries corrected study attributes: the indexes move.
    index.apply([entry(header("P", "S", "R", "I2", accession="NEW", date="20200202"), t=20)], "overwrite")
    assert index.studies_by("idx_accession", "OLD") == []
    assert index.studies_by("idx_accession", "NEW") == ["P\x00S"]
    assert index.studies_in_date_range("20200101", "20200101") == []
    # One received earlier (committed late) does not win.
    index.apply([entry(header("P", "S", "R", "I3", accession="OLDEST", date="20190101"), t=5)], "overwrite")
    assert index.studies_by("idx_accession", "OLDEST") == []
    assert index.studies_by("idx_accession", "NEW") == ["P\x00S"]
    assert record(index, "studies", "P\x00S")["AccessionNumber"] == "NEW"
    assert len(index.dump()["idx_accession"]) == 1


# ---- duplicates -------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["overwrite", "reject", "keep-first"])
def test_identical_resend(index: StudyIndex, policy: str) -> None:
    h = header("P", "S", "R", "I")
    index.apply([entry(h, "v1", size=10)], policy)
    before = index.dump()
    (res,) = index.apply([entry(h, "v1", size=10, t=99)], policy)
    assert (res.outcome, res.blob_is_new) == (Outcome.IDENTICAL, False)
    assert [c.backend for c in res.existing] == ["vol0"]  # where the stored copy is
    assert index.dump() == before
    assert index.blob(digest("v1")).refs == 1  # type: ignore[union-attr]


def test_overwrite_replaces_and_frees_the_old_blob(index: StudyIndex) -> None:
    h = header("P", "S", "R", "I")
    index.apply([entry(h, "v1", size=10)], "overwrite")
    (res,) = index.apply([entry(h, "v2", size=25, t=2)], "overwrite")
    assert res.outcome is Outcome.REPLACED and res.blob_is_new
    assert index.blob(digest("v1")) is None
    v2 = index.blob(digest("v2"))
    assert v2 is not None and (v2.size, v2.refs, [c.backend for c in v2.copies]) == (25, 1, ["vol0"])
    assert live(index) == (1, 25)  # v1's 10 bytes are dead in the container now
    inst = record(index, "instances", "P\x00S\x00R\x00I")
    assert (inst["digest"], inst["size"]) == (digest("v2"), 25)
    for level, key in (("patients", "P"), ("studies", "P\x00S"), ("series", "P\x00S\x00R")):
        rec = record(index, level, key)
        assert (rec["NumberOfInstances"], rec["Size"]) == (1, 25), level
    assert record(index, "patients", "P")["NumberOfStudies"] == 1
    assert record(index, "studies", "P\x00S")["NumberOfSeries"] == 1


@pytest.mark.parametrize(("policy", "outcome"), [("keep-first", Outcome.KEPT_FIRST), ("reject", Outcome.REJECTED)])
def test_keep_first_and_reject(index: StudyIndex, policy: str, outcome: Outcome) -> None:
    h = header("P", "S", "R", "I")
    index.apply([entry(h, "v1", size=10)], policy)
    before = index.dump()
    (res,) = index.apply([entry(h, "v2", size=25, t=2)], policy)
    assert (res.outcome, res.blob_is_new) == (outcome, False)
    assert index.dump() == before
    assert index.blob(digest("v2")) is None


def test_replacement_moving_to_another_series_study_and_patient_cleans_up(index: StudyIndex) -> None:
    index.apply([
        entry(header("P1", "S1", "R1", "I1", "CT", accession="ACC1", date="20200101"), "a", size=10, t=1),
        entry(header("P1", "S1", "R2", "I2", "SR", accession="ACC1", date="20200101"), "b", size=20, t=2),
        entry(header("P2", "S2", "R3", "I3", "MR", accession="ACC2", date="20210101"), "c", size=30, t=3),
    ], "overwrite")
    # I2 is re-sent as part of another series of the same study: its old (SR) series disappears.
    (res,) = index.apply([entry(header("P1", "S1", "R1", "I2", "CT", accession="ACC1", date="20200101"), "b2",
                                size=21, t=4)], "overwrite")
    assert res.outcome is Outcome.REPLACED and index.blob(digest("b")) is None
    assert keys(index, "series", "P1\x00S1\x00") == ["P1\x00S1\x00R1"]
    assert index.lookup("R2") is None
    study = record(index, "studies", "P1\x00S1")
    assert (study["NumberOfSeries"], study["NumberOfInstances"], study["Size"]) == (1, 2, 31)
    assert study["ModalitiesInStudy"] == ["CT"]
    # I1 moves to a study of another patient: study S1 and patient P1 become empty and go away.
    index.apply([entry(header("P1", "S1", "R1", "I2", "CT"), "b2")], "overwrite")  # identical: no-op
    index.apply([entry(header("P2", "S2", "R3", "I1", "MR"), "a2", size=11, t=5),
                 entry(header("P2", "S2", "R3", "I2", "MR"), "b3", size=12, t=6)], "overwrite")
    assert keys(index, "patients") == ["P2"]
    assert keys(index, "studies") == ["P2\x00S2"]
    assert keys(index, "series") == ["P2\x00S2\x00R3"]
    assert index.lookup("S1") is None and index.lookup("R1") is None
    assert index.studies_by("idx_accession", "ACC1") == []
    assert index.studies_by("idx_patientid", "P1") == []
    assert index.studies_in_date_range("20200101", "20200101") == []
    p2 = record(index, "patients", "P2")
    assert (p2["NumberOfStudies"], p2["NumberOfInstances"], p2["Size"]) == (1, 3, 53)
    dump = index.dump()
    assert [k for k, _ in dump["uids"]] == sorted(["I1", "I2", "I3", "R3", "S2"])
    assert {k for k, _ in dump["blobs"]} == {digest("a2"), digest("b3"), digest("c")}
    assert live(index) == (3, 11 + 12 + 30)


def test_identical_content_is_one_blob_with_refcounts(index: StudyIndex) -> None:
    first = entry(header("P", "S", "R", "I1"), "same", size=5, volume="vol0")
    second = entry(header("P", "S", "R", "I2"), "same", size=5, volume="vol1")
    r1, r2 = index.apply([first, second], "overwrite")
    assert (r1.outcome, r1.blob_is_new) == (Outcome.STORED, True)
    assert (r2.outcome, r2.blob_is_new) == (Outcome.STORED, False)  # the bytes are stored already
    same = index.blob(digest("same"))
    assert same is not None and (same.refs, [c.backend for c in same.copies]) == (2, ["vol0"])  # stored once
    assert live(index, "vol1") == (0, 0)  # the second copy's bytes are dead where they were written
    index.apply([entry(header("P", "S", "R", "I1"), "other", t=2)], "overwrite")
    assert index.blob(digest("same")).refs == 1  # type: ignore[union-attr]
    index.apply([entry(header("P", "S", "R", "I2"), "other2", t=3)], "overwrite")
    assert index.blob(digest("same")) is None
    assert live(index) == (2, 2000)


def test_a_b_a_in_separate_batches(index: StudyIndex) -> None:
    h = header("P", "S", "R", "I")
    index.apply([entry(h, "A", t=1)], "overwrite")
    index.apply([entry(h, "B", t=2)], "overwrite")
    (res,) = index.apply([entry(h, "A", t=3)], "overwrite")
    assert res.outcome is Outcome.REPLACED and res.blob_is_new
    assert index.blob(digest("B")) is None and index.blob(digest("A")).refs == 1  # type: ignore[union-attr]
    assert live(index) == (1, 1000)


def test_a_b_a_in_one_batch_never_frees_a_named_blob(index: StudyIndex) -> None:
    """Within one group commit, X:A, X:B, X:A: only the transaction's final state decides what is live."""
    h = header("P", "S", "R", "I")
    index.apply([entry(h, "A", t=1), entry(h, "B", t=2), entry(h, "A", t=3)], "overwrite")
    named = {rec["digest"] for _, rec in index.items("instances")}
    assert named == {digest("A")}
    assert index.blob(digest("A")).refs == 1  # type: ignore[union-attr]
    assert index.blob(digest("B")) is None
    assert live(index) == (1, 1000)
    assert index.container_contents("vol0", "seg")[0][0] == digest("A")


def test_shared_blob_freed_and_readded_in_one_batch(index: StudyIndex) -> None:
    """X and Y share content A; X moves to B and Y to C, then a new Z has A again, all in one batch."""
    index.apply([entry(header("P", "S", "R", "X"), "A"), entry(header("P", "S", "R", "Y"), "A")], "overwrite")
    results = index.apply([entry(header("P", "S", "R", "X"), "B", t=2), entry(header("P", "S", "R", "Y"), "C", t=3),
                           entry(header("P", "S", "R", "Z"), "A", t=4)], "overwrite")
    assert [r.outcome for r in results] == [Outcome.REPLACED, Outcome.REPLACED, Outcome.STORED]
    named = {rec["digest"] for _, rec in index.items("instances")}
    assert named == {digest("A"), digest("B"), digest("C")}
    assert all(index.blob(d) is not None for d in named)
    assert live(index) == (3, 3000)


# ---- map growth -------------------------------------------------------------------------------------


def test_map_grows_instead_of_failing(tmp_path: Path) -> None:
    index = StudyIndex(tmp_path / "small", map_size=1 << 20, sync=False)
    try:
        entries = [entry(header(f"P{i % 50}", f"S{i % 200}", f"R{i % 400}", f"1.2.3.{i}", "CT",
                                description="x" * 40, name=f"Name^{i % 50}", accession=f"A{i % 200}",
                                date=f"2020{1 + i % 12:02d}15"), size=i, t=i)
                   for i in range(4000)]
        for start in range(0, 3000, 500):
            index.apply(entries[start : start + 500], "overwrite")
        index.apply(entries[3000:], "overwrite")  # one big transaction too
        assert index.env.info()["map_size"] > 1 << 20
        assert index.counts() == {"patients": 50, "studies": 200, "series": 400, "instances": 4000}
        assert sum(r["Size"] for _, r in index.items("patients")) == sum(range(4000))
    finally:
        index.close()


# ---- commit order -----------------------------------------------------------------------------------


def synthetic_entries(seed: int, count: int) -> list[IndexEntry]:
    """Several studies whose instances disagree on level attributes (names, descriptions, accession numbers),
    each with a distinct receive time; some instances share content."""
    rng = random.Random(seed)
    entries = []
    times = rng.sample(range(1, 10 * count), count)
    for i in range(count):
        study = rng.randrange(6)
        pid = f"P{study % 3}"  # a study's PatientID is the same in all its instances
        series = f"{study}.{rng.randrange(3)}"
        modality = ("CT", "MR", "SR")[int(series[-1])]
        h = header(pid, f"S{study}", series, f"1.2.3.{i}", modality, accession=f"ACC{rng.randrange(3)}",
                   date=f"2020010{rng.randrange(1, 9)}", name=f"Name^{rng.randrange(5)}",
                   description=f"desc {rng.randrange(5)}")
        h.instance["InstanceNumber"] = str(rng.randrange(100))
        n = rng.randrange(count)
        content = f"c{n}"  # repeated contents: shared blobs (same bytes, same size)
        entries.append(entry(h, content, size=100 + n, t=times[i], ae=f"AE{rng.randrange(3)}"))
    return entries


def apply_in_batches(path: Path, entries: list[IndexEntry], rng: random.Random) -> dict:
    index = StudyIndex(path, sync=False)
    try:
        start = 0
        while start < len(entries):
            size = rng.randrange(1, 40)
            index.apply(entries[start : start + size], "overwrite")
            start += size
        return index.dump()
    finally:
        index.close()


def test_commit_order_does_not_matter(tmp_path: Path) -> None:
    entries = synthetic_entries(1, 300)
    in_order = sorted(entries, key=lambda e: e.received_ns)
    reference = apply_in_batches(tmp_path / "ordered", in_order, random.Random(0))
    assert len(reference["instances"]) == 300 and len(reference["studies"]) == 6
    for seed in range(3):
        rng = random.Random(seed)
        shuffled = [entry(e.header, None, e.size, e.received_ns, e.copy.backend, e.calling_ae) for e in entries]
        for new, old in zip(shuffled, entries, strict=True):
            new.digest, new.copy = old.digest, old.copy
        rng.shuffle(shuffled)
        assert apply_in_batches(tmp_path / f"shuffled{seed}", shuffled, rng) == reference, seed


# ---- keys LMDB must accept --------------------------------------------------------------------------


def test_instance_without_patient_id(index: StudyIndex) -> None:
    """PatientID is Type 2: an empty one must index (LMDB refuses empty keys), beside other instances."""
    anonymous = header("", "S", "R", "I1", accession="ACC")
    anonymous.patient = {}  # records drop empty values
    results = index.apply([entry(anonymous), entry(header("P", "S2", "R2", "I2"))], "overwrite")
    assert [r.outcome for r in results] == [Outcome.STORED, Outcome.STORED]
    (pk,) = [k for k in keys(index, "patients") if k != "P"]
    assert pk and record(index, "patients", pk)["NumberOfInstances"] == 1
    assert index.studies_by("idx_accession", "ACC") == [f"{pk}\x00S"]
    assert index.studies_by("idx_patientid", "") == [f"{pk}\x00S"]
    (res,) = index.apply([entry(anonymous, "other", t=2)], "overwrite")
    assert res.outcome is Outcome.REPLACED
    index.apply([entry(header("P", "S2", "R2", "I1"), "moved", t=3)], "overwrite")  # leaves the patient empty
    assert keys(index, "patients") == ["P"]


def test_largest_valid_keys_fit(index: StudyIndex) -> None:
    """Keys the records check lets through (64-character UIDs, long IDs) are accepted by LMDB."""
    uid = "1." + "2" * 62
    h = header("P" * 64, uid, uid[:-1] + "3", uid[:-1] + "4", accession="A" * 64, date="D" * 64, issuer="I" * 64)
    from appliance.index.records import _check_uids

    _check_uids(h)
    (res,) = index.apply([entry(h)], "overwrite")
    assert res.outcome is Outcome.STORED


def test_compaction_switch_moves_live_copies_and_queues_the_empty_container(index: StudyIndex) -> None:
    """move_copies is a compare-and-swap: a blob freed since the copy was made stays unnamed, the others are
    repointed, and the emptied container is replaced by a gc row; collect_garbage removes it once."""
    h1, h2 = header("P", "S", "R", "I1"), header("P", "S", "R", "I2")
    index.register_container("vol0", "seg", 1)
    index.register_container("vol0", "new", 2)
    index.apply([entry(h1, "v1", size=10), entry(h2, "v2", size=20)], "overwrite", {("vol0", "seg"): 30})
    index.apply([entry(h2, "v3", size=5, t=2)], "overwrite")  # v2 is freed before the switch
    moves = {d: Copy("vol0", "new", f"new:{d}", size) for d, size in ((digest("v1"), 10), (digest("v2"), 20))}
    assert index.move_copies("vol0", "seg", moves) == 1
    assert index.blob(digest("v1")).copies == [moves[digest("v1")]]  # type: ignore[union-attr]
    assert index.blob(digest("v2")) is None
    assert live(index) == (1, 5)  # v3 still lives in "seg": it is not queued
    assert index.pending_gc() == []
    assert index.move_copies("vol0", "seg", {digest("v3"): Copy("vol0", "new", "new:v3", 5)}) == 1
    assert index.container("vol0", "seg") is None and index.pending_gc() == [("vol0", "seg")]
    removed: list[tuple[str, str]] = []
    assert index.collect_garbage(index.pending_gc(), lambda b, n: removed.append((b, n))) == 1
    assert removed == [("vol0", "seg")] and index.pending_gc() == []
    new = index.container("vol0", "new")
    assert new is not None and (new.live_records, new.live_bytes) == (2, 15)


def test_container_end_only_grows_and_sealing_is_recorded(index: StudyIndex) -> None:
    index.register_container("vol0", "seg", 1)
    index.apply([entry(header("P", "S", "R", "I1"))], "overwrite", {("vol0", "seg"): 4096})
    index.apply([], "overwrite", {("vol0", "seg"): 1024}, [("vol0", "seg")])
    rec = index.container("vol0", "seg")
    assert rec is not None and (rec.end, rec.sealed) == (4096, True)


def test_the_named_copy_of_identical_bytes_does_not_depend_on_commit_order(tmp_path: Path) -> None:
    """Two workers store identical bytes (two records); whichever commits first, the earliest received record is
    the one named, as `index rebuild` (which replays in receive order) will name it."""
    early = entry(header("P", "S", "R", "I1"), "same", size=5, t=1)
    late = entry(header("P", "S", "R", "I2"), "same", size=5, t=2)
    late.copy = Copy("vol0", "seg", "seg:late", 5, 2)
    dumps = []
    for name, order in (("a", [early, late]), ("b", [late, early])):
        idx = StudyIndex(tmp_path / name, sync=False)
        for e in order:
            idx.apply([e], "overwrite")
        blob = idx.blob(digest("same"))
        assert blob is not None and blob.copies == [early.copy] and blob.refs == 2
        dumps.append(idx.dump())
        idx.close()
    assert dumps[0] == dumps[1]


def test_an_index_of_another_schema_is_refused(tmp_path: Path) -> None:
    import lmdb

    from appliance.index.env import SchemaMismatch

    env = lmdb.open(str(tmp_path / "old"), max_dbs=4)
    meta = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        txn.put(b"schema", b"1", db=meta)
    env.close()
    with pytest.raises(SchemaMismatch, match="schema version 1"):
        StudyIndex(tmp_path / "old")


@pytest.mark.parametrize(("second", "why"), [
    (header("P", "S", "R2", "S"), "not distinct"),  # the SOP Instance UID is the study's UID
    (header("P", "I1", "R3", "I9"), "names another level"),  # a study UID that is a SOP Instance UID elsewhere
    (header("P", "S2", "R", "I2"), "belongs to another study"),  # a series UID already in study S
    (header("P", "S3", "R4", "R"), "names another level"),  # a SOP Instance UID that is a series UID
])
def test_level_conflicts_fail_alone(index: StudyIndex, second: Header, why: str) -> None:
    """A UID that already names another level (or a series under another study) refuses that one entry; the
    others of the same transaction are stored."""
    index.apply([entry(header("P", "S", "R", "I1"))], "overwrite")
    good = entry(header("P", "S", "R", "I5"), t=2)
    results = index.apply([entry(second, "bad", t=2), good], "overwrite")
    assert results[0].outcome is Outcome.CONFLICT and why in results[0].reason
    assert results[1].outcome is Outcome.STORED
    assert index.counts()["instances"] == 2


def _versions_in_orders(tmp_path: Path, policy: str, first: IndexEntry, second: IndexEntry) -> list[dict]:
    dumps = []
    for name, order in (("in-order", [first, second]), ("swapped", [second, first])):
        idx = StudyIndex(tmp_path / f"{policy}-{name}", sync=False)
        for e in order:
            idx.apply([e], policy)
        dumps.append(idx.dump())
        idx.close()
    return dumps


@pytest.mark.parametrize(("policy", "winner"), [("overwrite", "v2"), ("keep-first", "v1")])
def test_which_version_wins_depends_on_receive_time_not_commit_order(tmp_path: Path, policy: str,
                                                                     winner: str) -> None:
    """Two workers commit two versions of one SOP instance in either order (and recovery re-applies records): the
    result is what a replay in receive order gives, as `index rebuild` does."""
    h = header("P", "S", "R", "I")
    v1, v2 = entry(h, "v1", t=1), entry(h, "v2", t=2)
    in_order, swapped = _versions_in_orders(tmp_path, policy, v1, v2)
    assert in_order == swapped
    (_key, inst), = in_order["instances"]
    assert inst["digest"] == digest(winner)


def test_an_identical_resend_received_earlier_but_committed_later_keeps_the_earliest_provenance(
        tmp_path: Path) -> None:
    h = header("P", "S", "R", "I")
    early, late = entry(h, "same", t=1, ae="EARLY"), entry(h, "same", t=5, ae="LATE")
    late.copy = Copy("vol0", "seg", "seg:late", 1000, 5)
    in_order, swapped = _versions_in_orders(tmp_path, "keep-first", early, late)
    assert in_order == swapped
    (_key, inst), = in_order["instances"]
    assert (inst["received_ns"], inst["calling_ae"]) == (1, "EARLY")


def test_an_identical_resend_repairs_a_lost_copy_in_the_same_transaction(index: StudyIndex) -> None:
    h = header("P", "S", "R", "I")
    index.apply([entry(h, "same", t=1)], "keep-first")
    resend = entry(h, "same", t=2)
    resend.copy = Copy("vol0", "seg2", "seg2:x", 1000, 2)
    (kept,) = index.apply([resend], "keep-first", copy_exists=lambda c: True)
    assert kept.outcome is Outcome.IDENTICAL and not kept.blob_is_new
    (repaired,) = index.apply([resend], "keep-first", copy_exists=lambda c: c.container != "seg")
    assert repaired.outcome is Outcome.IDENTICAL and repaired.blob_is_new and repaired.reason == "repaired"
    blob = index.blob(digest("same"))
    assert blob is not None and blob.copies == [resend.copy]
    assert live(index) == (0, 0) and index.container("vol0", "seg2").live_records == 1  # type: ignore[union-attr]


def test_blobs_walks_everything_in_short_transactions(index: StudyIndex) -> None:
    index.apply([entry(header("P", "S", "R", f"I{n}"), f"c{n}", t=n) for n in range(25)], "keep-first")
    walked = [d for d, _blob in index.blobs(batch=7)]
    assert walked == sorted(digest(f"c{n}") for n in range(25))


def test_gc_makes_the_index_durable_before_a_container_file_goes(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """With the lazy meta page a power loss can undo the last transaction: the one that stopped naming a container
    must be synced before the container's file is deleted, or the undone index would name deleted bytes."""
    idx = StudyIndex(tmp_path / "lazy", sync=True, lazy_meta=True)
    events: list[str] = []
    real_sync = idx.env.sync

    class SpyEnv:
        def __getattr__(self, name: str) -> Any:
            return getattr(idx_env, name)

        def sync(self, force: bool = False) -> None:
            events.append("sync")
            real_sync(force)

    idx_env = idx.env
    monkeypatch.setattr(idx, "env", SpyEnv())
    idx.register_container("vol0", "seg", 1)
    idx.apply([entry(header("P", "S", "R", "I"), "v1", size=10)], "overwrite", {("vol0", "seg"): 10})
    idx.move_copies("vol0", "seg", {digest("v1"): Copy("vol0", "new", "new:v1", 10)})
    events.clear()
    idx.collect_garbage(idx.pending_gc(), lambda _b, _n: events.append("remove"))
    assert events[:2] == ["sync", "remove"]
    monkeypatch.undo()
    idx.close()


def test_an_over_long_secondary_key_never_fails_the_group(index: StudyIndex) -> None:
    """A Modality too long for an LMDB key (indexed before ingest refused such values) is left out of idx_modality;
    the other instances of the same transaction are indexed (one such key used to fail the whole group)."""
    long_modality = header("P", "S1", "R1", "I1")
    long_modality.series["Modality"] = "X" * 600
    results = index.apply([entry(long_modality), entry(header("P", "S2", "R2", "I2"))], "keep-first")
    assert [r.outcome for r in results] == [Outcome.STORED, Outcome.STORED]
    assert index.counts()["instances"] == 2
    assert index.studies_by("idx_modality", "CT") == [f"P{SEP}S2"]
