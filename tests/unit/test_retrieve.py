"""C-MOVE/C-GET selection (services/retrieve.py), the context plan and syntax choice, the final identifier."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from appliance import errors
from appliance.dicom import uids
from appliance.index.db import StudyIndex
from appliance.services.move import plan_contexts
from appliance.services.retrieve import (
    FAILED_LIST_BYTES_MAX,
    Match,
    RetrieveRefused,
    failed_identifier,
    parse_identifier,
    select,
)
from appliance.services.sending import EXPLICIT_LE, choose_syntax
from tests.unit.test_index import CT, entry, header

IMPLICIT = "1.2.840.10008.1.2"
RLE = "1.2.840.10008.1.2.5"


@pytest.fixture
def index(tmp_path: Path) -> Iterator[StudyIndex]:
    idx = StudyIndex(tmp_path / "index", map_size=1 << 20, sync=False)
    # P1: study 1.1 (series 1.1.1: 3 images, series 1.1.2: 1 image), study 1.2 (1 image); P2 with issuer: 2.1.
    entries = [entry(header("P1", "1.1", "1.1.1", f"1.1.1.{i}")) for i in range(1, 4)]
    entries.append(entry(header("P1", "1.1", "1.1.2", "1.1.2.1")))
    entries.append(entry(header("P1", "1.2", "1.2.1", "1.2.1.1")))
    entries.append(entry(header("P2", "2.1", "2.1.1", "2.1.1.1", issuer="HOSP")))
    idx.apply(entries, "keep-first")
    yield idx
    idx.close()


def ident(**keys: str) -> Dataset:
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def sops(index: StudyIndex, model: str, **keys: str) -> list[str]:
    return [m.sop_instance_uid for m in select(index, model, ident(**keys), 1000)]


def refused(index: StudyIndex, model: str, **keys: str) -> int:
    with pytest.raises(RetrieveRefused) as info:
        select(index, model, ident(**keys), 1000)
    return info.value.status


def test_levels_of_both_models(index: StudyIndex) -> None:
    study_root, patient_root = uids.STUDY_ROOT_MOVE, uids.PATIENT_ROOT_GET
    assert sops(index, study_root, QueryRetrieveLevel="STUDY", StudyInstanceUID="1.1") == [
        "1.1.1.1", "1.1.1.2", "1.1.1.3", "1.1.2.1"]
    assert sops(index, study_root, QueryRetrieveLevel="SERIES", StudyInstanceUID="1.1",
                SeriesInstanceUID="1.1.2") == ["1.1.2.1"]
    assert sops(index, study_root, QueryRetrieveLevel="IMAGE", StudyInstanceUID="1.1", SeriesInstanceUID="1.1.1",
                SOPInstanceUID="1.1.1.2") == ["1.1.1.2"]
    assert sops(index, patient_root, QueryRetrieveLevel="PATIENT", PatientID="P1") == [
        "1.1.1.1", "1.1.1.2", "1.1.1.3", "1.1.2.1", "1.2.1.1"]
    assert sops(index, patient_root, QueryRetrieveLevel="PATIENT", PatientID="P2") == ["2.1.1.1"]
    assert sops(index, patient_root, QueryRetrieveLevel="PATIENT", PatientID="P2", IssuerOfPatientID="HOSP") == [
        "2.1.1.1"]
    assert sops(index, patient_root, QueryRetrieveLevel="PATIENT", PatientID="P2", IssuerOfPatientID="OTHER") == []
    assert sops(index, patient_root, QueryRetrieveLevel="STUDY", PatientID="P1", StudyInstanceUID="1.2") == ["1.2.1.1"]


def test_lists_of_uids_at_the_retrieve_level(index: StudyIndex) -> None:
    assert sops(index, uids.STUDY_ROOT_GET, QueryRetrieveLevel="STUDY", StudyInstanceUID="1.2\\2.1\\1.2") == [
        "1.2.1.1", "2.1.1.1"]
    assert sops(index, uids.STUDY_ROOT_GET, QueryRetrieveLevel="IMAGE", SOPInstanceUID="1.1.1.3\\1.2.1.1") == [
        "1.1.1.3", "1.2.1.1"]


def test_keys_above_the_level_must_agree(index: StudyIndex) -> None:
    # A series of another study, a study of another patient, a UID of another level: nothing.
    assert sops(index, uids.STUDY_ROOT_MOVE, QueryRetrieveLevel="SERIES", StudyInstanceUID="1.2",
                SeriesInstanceUID="1.1.1") == []
    assert sops(index, uids.PATIENT_ROOT_MOVE, QueryRetrieveLevel="STUDY", PatientID="P2",
                StudyInstanceUID="1.1") == []
    assert sops(index, uids.STUDY_ROOT_MOVE, QueryRetrieveLevel="STUDY", StudyInstanceUID="1.1.1") == []
    assert sops(index, uids.STUDY_ROOT_MOVE, QueryRetrieveLevel="STUDY", StudyInstanceUID="9.9") == []
    # Missing keys above the level are tolerated (movescu and Orthanc leave PatientID out).
    assert sops(index, uids.PATIENT_ROOT_MOVE, QueryRetrieveLevel="STUDY", StudyInstanceUID="1.2") == ["1.2.1.1"]


def test_bad_identifiers_are_refused(index: StudyIndex) -> None:
    a900 = errors.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    assert refused(index, uids.STUDY_ROOT_MOVE, QueryRetrieveLevel="PATIENT", PatientID="P1") == a900
    assert refused(index, uids.STUDY_ROOT_MOVE, QueryRetrieveLevel="FRAME", StudyInstanceUID="1.1") == a900
    assert refused(index, uids.STUDY_ROOT_MOVE, StudyInstanceUID="1.1") == a900
    assert refused(index, uids.STUDY_ROOT_MOVE, QueryRetrieveLevel="SERIES", StudyInstanceUID="1.1") == a900
    assert refused(index, uids.PATIENT_ROOT_MOVE, QueryRetrieveLevel="PATIENT") == a900
    assert refused(index, uids.STUDY_ROOT_MOVE, QueryRetrieveLevel="SERIES", StudyInstanceUID="1.1\\1.2",
                   SeriesInstanceUID="1.1.1") == a900
    assert refused(index, uids.STUDY_ROOT_MOVE, QueryRetrieveLevel="STUDY", StudyInstanceUID="1.*") == a900


def test_too_many_matches(index: StudyIndex) -> None:
    with pytest.raises(RetrieveRefused) as info:
        select(index, uids.STUDY_ROOT_MOVE, ident(QueryRetrieveLevel="STUDY", StudyInstanceUID="1.1"), 3)
    assert info.value.status == errors.OUT_OF_RESOURCES_MATCHES


def test_identifier_parsing() -> None:
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, True
    write_dataset(out, ident(QueryRetrieveLevel="STUDY", StudyInstanceUID="1.2"))
    assert parse_identifier(out.getvalue(), IMPLICIT).StudyInstanceUID == "1.2"
    for garbage in (b"\x08\x00\x52\x00CS\x20\x00STUDY", b"\x01\x02\x03"):  # a value cut short, no element
        with pytest.raises(RetrieveRefused) as info:
            parse_identifier(garbage, EXPLICIT_LE)
        assert info.value.status == errors.UNABLE_TO_PROCESS


def test_failed_identifier_is_cut_to_fit_explicit_vr() -> None:
    failed = [f"1.2.3.{i}" for i in range(20000)]
    data = failed_identifier(failed, EXPLICIT_LE)
    out = DicomBytesIO(data)
    out.is_little_endian, out.is_implicit_VR = True, False
    ds = read_dataset(out, False, True)
    kept = list(ds.FailedSOPInstanceUIDList)
    assert kept == failed[: len(kept)] and sum(len(u) + 1 for u in kept) <= FAILED_LIST_BYTES_MAX + 1


def match(sop_class: str, ts: str) -> Match:
    return Match(sop_class, "1.2.3", "d", ts, 10, "ONLINE")


def test_context_plan_and_syntax_choice() -> None:
    mr = "1.2.840.10008.5.1.4.1.1.4"
    plan = plan_contexts([match(CT, RLE), match(CT, RLE), match(CT, IMPLICIT), match(mr, EXPLICIT_LE)])
    assert plan[:3] == [(CT, [RLE]), (CT, [IMPLICIT]), (mr, [EXPLICIT_LE])]
    assert sorted(plan[3:]) == [(CT, [EXPLICIT_LE]), (mr, [IMPLICIT])]
    many = [match(f"1.2.{i}", RLE) for i in range(100)]
    assert len(plan_contexts(many)) == 128
    assert choose_syntax(RLE, {RLE: 1, EXPLICIT_LE: 3}) == (RLE, 1)
    assert choose_syntax(RLE, {IMPLICIT: 5, EXPLICIT_LE: 3}) == (EXPLICIT_LE, 3)
    assert choose_syntax(RLE, {IMPLICIT: 5}) == (IMPLICIT, 5)
    assert choose_syntax(EXPLICIT_LE, {RLE: 1}) is None


@pytest.mark.parametrize("table, key", [
    ("move_associations = 0", "retrieve.move_associations"),
    ("pending_interval_ms = 0", "retrieve.pending_interval_ms"),
    ("sub_operation_timeout_s = -1", "retrieve.sub_operation_timeout_s"),
    ("matches_max = 0", "retrieve.matches_max"),
    ("read_threads = 0", "retrieve.read_threads"),
    ("no_such_key = 1", "retrieve.no_such_key"),
])
def test_retrieve_config_is_validated(tmp_path: Path, table: str, key: str) -> None:
    from appliance.config import load_config
    from appliance.errors import ConfigError

    path = tmp_path / "appliance.toml"
    path.write_text(f"[retrieve]\n{table}\n")
    with pytest.raises(ConfigError, match=key):
        load_config(path, environ={})
    path.write_text("[retrieve]\nmove_associations = 4\ntranscode_bytes_max = 0\n")
    config = load_config(path, environ={})
    assert config.retrieve.move_associations == 4 and config.retrieve.transcode_bytes_max == 0
