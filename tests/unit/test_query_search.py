"""The C-FIND search on a synthetic index: which plan each query gets, that it reads only its candidates (no full
scan for an ID, a name prefix, a date range, a modality or a UID list), and that batches resume correctly."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from appliance.dicom.uids import PATIENT_ROOT_FIND, STUDY_ROOT_FIND
from appliance.index.db import StudyIndex
from appliance.query.identifier import Query, QueryKey, check
from appliance.query.search import Search, SearchOptions
from bench.find import ROOT, build_index, study_shape

STUDIES = 500
VRS = {"PatientID": "LO", "PatientName": "PN", "StudyDate": "DA", "StudyInstanceUID": "UI", "AccessionNumber": "SH",
       "ModalitiesInStudy": "CS", "SeriesInstanceUID": "UI", "SOPInstanceUID": "UI", "StudyDescription": "LO"}


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StudyIndex]:
    path = tmp_path_factory.mktemp("search") / "index"
    build_index(path, STUDIES * 4, 4, progress=lambda _m: None)
    opened = StudyIndex(path)
    yield opened
    opened.close()


def run(index: StudyIndex, level: str, batch: int = 512, model: str = STUDY_ROOT_FIND,
        **keys: str) -> tuple[list[dict[str, str]], Search]:
    query = Query(model, level, [QueryKey(k, 0, VRS[k], v) for k, v in keys.items()], [])
    check(query)
    search = Search(index, query, SearchOptions("APPLIANCE", batch_rows_max=batch))
    found: list[dict[str, str]] = []
    done = False
    while not done:
        matches, done = search.next_batch()
        found += matches
    return found, search


def expected(predicate: object) -> set[str]:
    return {study_shape(n)["StudyInstanceUID"] for n in range(STUDIES) if predicate(study_shape(n))}  # type: ignore[operator]


def test_patient_id_reads_its_rows_only(index: StudyIndex) -> None:
    found, search = run(index, "STUDY", PatientID="P0000007")
    assert {r["StudyInstanceUID"] for r in found} == expected(lambda s: s["PatientID"] == "P0000007")
    assert search.plan.description == "PatientID" and search.rows_examined == 2


def test_name_prefix_uses_the_name_index(index: StudyIndex) -> None:
    surname = study_shape(3)["PatientName"].split("^")[0]
    found, search = run(index, "STUDY", PatientName=surname.lower() + "*")
    want = expected(lambda s: s["PatientName"].startswith(surname + "^"))
    assert {r["StudyInstanceUID"] for r in found} == want
    assert search.plan.description == "name" and search.rows_examined <= len(want) + 5


def test_date_range_and_modality_and_uids(index: StudyIndex) -> None:
    found, search = run(index, "STUDY", StudyDate="20150101-20151231")
    want = expected(lambda s: "20150101" <= s["StudyDate"] <= "20151231")
    assert {r["StudyInstanceUID"] for r in found} == want and search.rows_examined == len(want)
    found, search = run(index, "STUDY", ModalitiesInStudy="MR")
    want = expected(lambda s: s["Modality"] == "MR")
    assert {r["StudyInstanceUID"] for r in found} == want and search.rows_examined == len(want)
    uids = f"{ROOT}.4\\{ROOT}.9\\1.2.3"
    found, search = run(index, "STUDY", StudyInstanceUID=uids)
    assert {r["StudyInstanceUID"] for r in found} == {f"{ROOT}.4", f"{ROOT}.9"} and search.rows_examined == 2


def test_small_batches_give_the_same_matches(index: StudyIndex) -> None:
    whole, _ = run(index, "STUDY", StudyDescription="SYNTH*")
    batched, search = run(index, "STUDY", batch=16, StudyDescription="SYNTH*")
    assert len(whole) == STUDIES and [r["StudyInstanceUID"] for r in batched] == [r["StudyInstanceUID"] for r in whole]
    assert search.plan.description == "all studies"


def test_series_and_image_levels_read_under_their_parent(index: StudyIndex) -> None:
    study = f"{ROOT}.12"
    series, search = run(index, "SERIES", StudyInstanceUID=study)
    assert len(series) == 4 and search.rows_examined == 4
    assert all(r["NumberOfSeriesRelatedInstances"] == "1" for r in series)
    images, search = run(index, "IMAGE", StudyInstanceUID=study, SeriesInstanceUID=f"{study}.2")
    assert [r["SOPInstanceUID"] for r in images] == [f"{study}.2.2"] and search.rows_examined == 1
    shape = study_shape(12)
    patients, search = run(index, "PATIENT", model=PATIENT_ROOT_FIND, PatientID=shape["PatientID"])
    assert [r["NumberOfPatientRelatedStudies"] for r in patients] == ["2"] and search.rows_examined == 1

