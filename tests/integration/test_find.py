"""C-FIND SCP against real peers: DCMTK findscu (both models, the four levels, wildcards, ranges, UID lists) and
pynetdicom (character sets, C-CANCEL, the result limit, bad identifiers), on one server holding the archive of
find_data.py, stored over DICOM by storescu."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind as PATIENT_ROOT
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as STUDY_ROOT

from tests.conftest import ServerHandle, dcmtk, write_config
from tests.integration.find_data import JAPANESE, STUDIES, write_archive

PEERS = {"findscu": {"ae_title": "FINDSCU", "port": 104},
         "pynet": {"ae_title": "PYNETSCU", "port": 104},
         "orthanc": {"ae_title": "ORTHANC", "port": 104},
         "limited": {"ae_title": "LIMITED", "port": 104, "allow_find": False}}


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    root = tmp_path_factory.mktemp("find")
    handle = ServerHandle(root, write_config(root, peers=PEERS)).start()
    try:
        files = write_archive(root / "files")
        result = dcmtk("storescu", "-aec", "APPLIANCE", "-aet", "MODALITY", "127.0.0.1", str(handle.port),
                       *map(str, files))
        assert result.returncode == 0, result.stderr + handle.log()
        yield handle
    finally:
        handle.stop()


def findscu(server: ServerHandle, out: Path, model: str, *keys: str, extra: tuple[str, ...] = ()) -> list[Dataset]:
    """Run findscu with ``-k`` keys; the responses it extracted (-X), in order."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rsp*.dcm"):
        old.unlink()
    args = ["-aet", "FINDSCU", "-aec", "APPLIANCE", model, "-X", "-od", str(out), *extra]
    for key in keys:
        args += ["-k", key]
    result = dcmtk("findscu", *args, "127.0.0.1", str(server.port))
    assert result.returncode == 0, result.stderr + server.log()
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def uids(responses: list[Dataset], keyword: str = "StudyInstanceUID") -> set[str]:
    return {str(r.get(keyword, "")) for r in responses}


def study_uid(number: int) -> str:
    return next(s.uid for s in STUDIES if s.number == number)


# ---- DCMTK findscu ---------------------------------------------------------------------------------------------


def test_study_root_study_level_by_name_wildcard(archive: ServerHandle, tmp_path: Path) -> None:
    found = findscu(archive, tmp_path, "-S", "QueryRetrieveLevel=STUDY", "PatientName=DOE*", "StudyInstanceUID",
                    "PatientID", "ModalitiesInStudy", "NumberOfStudyRelatedInstances", "NumberOfStudyRelatedSeries",
                    "SOPClassesInStudy", "RetrieveAETitle", "InstanceAvailability", "StudyDescription",
                    "PatientAge")
    assert uids(found) == {study_uid(1), study_uid(2), study_uid(6)}  # DOE^JOHN twice, DOEBLER^ANNA
    first = next(r for r in found if r.StudyInstanceUID == study_uid(1))
    assert list(first.ModalitiesInStudy) == ["CT", "MR"]
    assert (int(first.NumberOfStudyRelatedInstances), int(first.NumberOfStudyRelatedSeries)) == (3, 2)
    assert set(first.SOPClassesInStudy) == {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"}
    assert first.RetrieveAETitle == "APPLIANCE" and first.InstanceAvailability == "ONLINE"
    assert first.QueryRetrieveLevel == "STUDY" and first.PatientID == "PID001"
    assert "PatientAge" in first and first.PatientAge in ("", None)  # not held by the index: returned empty


def test_study_level_case_insensitive_name_and_exact_id(archive: ServerHandle, tmp_path: Path) -> None:
    assert uids(findscu(archive, tmp_path, "-S", "QueryRetrieveLevel=STUDY", "PatientName=doe^john",
                        "StudyInstanceUID")) == {study_uid(1), study_uid(2)}
    assert uids(findscu(archive, tmp_path, "-S", "QueryRetrieveLevel=STUDY", "PatientID=PID002",
                        "StudyInstanceUID")) == {study_uid(3)}
    assert uids(findscu(archive, tmp_path, "-S", "QueryRetrieveLevel=STUDY", "AccessionNumber=ACC?",
                        "StudyInstanceUID")) == {s.uid for s in STUDIES}
    assert findscu(archive, tmp_path, "-S", "QueryRetrieveLevel=STUDY", "PatientID=NOPE", "StudyInstanceUID") == []


@pytest.mark.parametrize(("date", "numbers"), [
    ("20200115", {1}),
    ("20200101-20201231", {1, 6}),
    ("-20191231", {3}),
    ("20220101-", {4, 5}),
])
def test_study_date_ranges(archive: ServerHandle, tmp_path: Path, date: str, numbers: set[int]) -> None:
    found = findscu(archive, tmp_path, "-S", "QueryRetrieveLevel=STUDY", f"StudyDate={date}", "StudyInstanceUID")
    assert uids(found) == {study_uid(n) for n in numbers}


def test_time_range_modality_and_uid_list(archive: ServerHandle, tmp_path: Path) -> None:
    assert uids(findscu(archive, tmp_path, "-S", "QueryRetrieveLevel=STUDY", "StudyTime=0700-1100",
                        "StudyInstanceUID")) == {study_uid(1), study_uid(3), study_uid(5)}
    assert uids(findscu(archive, tmp_path, "-S", "QueryRetrieveLevel=STUDY", "ModalitiesInStudy=MR",
                        "StudyInstanceUID")) == {study_uid(1), study_uid(2)}
    listed = f"StudyInstanceUID={study_uid(2)}\\{study_uid(4)}\\1.2.3.4"
    assert uids(findscu(archive, tmp_path, "-S", "QueryRetrieveLevel=STUDY", listed)) == {study_uid(2), study_uid(4)}


def test_patient_root_all_levels(archive: ServerHandle, tmp_path: Path) -> None:
    patients = findscu(archive, tmp_path, "-P", "QueryRetrieveLevel=PATIENT", "PatientID=PID00*", "PatientName",
                       "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                       "NumberOfPatientRelatedInstances")
    assert uids(patients, "PatientID") == {"PID001", "PID002", "PID003", "PID004", "PID005"}
    doe = next(p for p in patients if p.PatientID == "PID001")
    assert (int(doe.NumberOfPatientRelatedStudies), int(doe.NumberOfPatientRelatedSeries),
            int(doe.NumberOfPatientRelatedInstances)) == (2, 3, 4)
    studies = findscu(archive, tmp_path, "-P", "QueryRetrieveLevel=STUDY", "PatientID=PID001", "StudyInstanceUID",
                      "StudyDate")
    assert uids(studies) == {study_uid(1), study_uid(2)}
    series = findscu(archive, tmp_path, "-P", "QueryRetrieveLevel=SERIES", "PatientID=PID001",
                     f"StudyInstanceUID={study_uid(1)}", "SeriesInstanceUID", "Modality",
                     "NumberOfSeriesRelatedInstances")
    assert {(s.Modality, int(s.NumberOfSeriesRelatedInstances)) for s in series} == {("CT", 2), ("MR", 1)}
    images = findscu(archive, tmp_path, "-P", "QueryRetrieveLevel=IMAGE", "PatientID=PID001",
                     f"StudyInstanceUID={study_uid(1)}", f"SeriesInstanceUID={study_uid(1)}.1", "SOPInstanceUID",
                     "SOPClassUID", "InstanceNumber", "InstanceAvailability", "Rows")
    assert uids(images, "SOPInstanceUID") == {f"{study_uid(1)}.1.1", f"{study_uid(1)}.1.2"}
    assert all(i.InstanceAvailability == "ONLINE" and i.Rows == 2 for i in images)
    # The wrong patient for the study: nothing (the parent unique key is matched too).
    assert findscu(archive, tmp_path, "-P", "QueryRetrieveLevel=SERIES", "PatientID=PID002",
                   f"StudyInstanceUID={study_uid(1)}", "SeriesInstanceUID") == []


def test_study_root_series_and_image_levels(archive: ServerHandle, tmp_path: Path) -> None:
    series = findscu(archive, tmp_path, "-S", "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study_uid(1)}",
                     "SeriesInstanceUID", "Modality=C*")
    assert uids(series, "SeriesInstanceUID") == {f"{study_uid(1)}.1"}
    images = findscu(archive, tmp_path, "-S", "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study_uid(1)}",
                     f"SeriesInstanceUID={study_uid(1)}.1", "SOPInstanceUID", "InstanceNumber=2")
    assert uids(images, "SOPInstanceUID") == {f"{study_uid(1)}.1.2"}


def test_findscu_bad_identifiers_keep_the_server_serving(archive: ServerHandle, tmp_path: Path) -> None:
    for keys in (["QueryRetrieveLevel=IMAGE", "SOPInstanceUID"],  # Patient Root IMAGE without parent keys
                 ["QueryRetrieveLevel=FRAME", "PatientID"],
                 ["PatientID=PID001"]):  # no Query/Retrieve Level
        out = tmp_path / "bad"
        out.mkdir(exist_ok=True)
        args = ["-v", "-aet", "FINDSCU", "-aec", "APPLIANCE", "-P", "-od", str(out)]
        for key in keys:
            args += ["-k", key]
        result = dcmtk("findscu", *args, "127.0.0.1", str(archive.port))
        assert "datasetdoesnotmatchsopclass" in (result.stdout + result.stderr).lower(), result.stderr
    assert uids(findscu(archive, tmp_path, "-S", "QueryRetrieveLevel=STUDY", "PatientID=PID002",
                        "StudyInstanceUID")) == {study_uid(3)}


# ---- pynetdicom ------------------------------------------------------------------------------------------------


def associate(server: ServerHandle, ae_title: str = "PYNETSCU", transfer_syntax: str | None = None) -> object:
    ae = AE(ae_title=ae_title)
    for model in (PATIENT_ROOT, STUDY_ROOT):
        ae.add_requested_context(model, transfer_syntax) if transfer_syntax else ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="APPLIANCE")
    assert assoc.is_established
    # pynetdicom leaves Nagle on, which costs each query a 40 ms delayed ACK (DCMTK runs with TCP_NODELAY=1).
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return assoc


def query(assoc: object, identifier: Dataset, model: object = STUDY_ROOT) -> list[tuple[int, Dataset | None]]:
    return [(int(status.Status), found) for status, found in assoc.send_c_find(identifier, model)]  # type: ignore[attr-defined]


def study_identifier(charset: list[str] | None = None, **keys: str) -> Dataset:
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset if len(charset) > 1 else charset[0]
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    ds.PatientName = ""
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(("charset", "name", "number"), [
    (["ISO_IR 192"], "müller*", 3),  # stored ISO_IR 100, asked in UTF-8
    (["ISO_IR 100"], "MÜLLER^JÜRGEN", 3),
    (["ISO_IR 192"], "Nguyễn*", 4),  # stored UTF-8
    (["ISO_IR 192"], "山田*", 5),  # stored ISO 2022 IR 87, asked in UTF-8
    (["ISO 2022 IR 6", "ISO 2022 IR 87"], "山田^太郎", 5),
    (["ISO_IR 192"], "やまだ^たろう", 5),
])
def test_names_across_character_sets(archive: ServerHandle, charset: list[str], name: str, number: int) -> None:
    assoc = associate(archive)
    try:
        results = query(assoc, study_identifier(charset, PatientName=name))
    finally:
        assoc.release()  # type: ignore[attr-defined]
    pending = [ds for status, ds in results if status == 0xFF00]
    assert results[-1][0] == 0x0000
    assert [str(ds.StudyInstanceUID) for ds in pending if ds is not None] == [study_uid(number)]
    stored = next(s.name for s in STUDIES if s.number == number)
    assert str(pending[0].PatientName) == stored  # decoded with the (0008,0005) of the response


def test_response_charset_falls_back_to_utf8(archive: ServerHandle) -> None:
    """A Latin-1 requester asking for a Japanese name gets it in UTF-8, (0008,0005) saying so; an ASCII one too."""
    assoc = associate(archive)
    try:
        for charset in (["ISO_IR 100"], None):
            results = query(assoc, study_identifier(charset, PatientID="PID004"))
            found = results[0][1]
            assert found is not None and results[0][0] == 0xFF00
            assert found.SpecificCharacterSet == "ISO_IR 192"
            assert str(found.PatientName) == JAPANESE
        results = query(assoc, study_identifier(["ISO_IR 100"], PatientID="PID002"))
        found = results[0][1]
        assert found is not None and found.SpecificCharacterSet == "ISO_IR 100"
        assert str(found.PatientName) == "Müller^Jürgen"
    finally:
        assoc.release()  # type: ignore[attr-defined]


def test_implicit_and_big_endian_contexts(archive: ServerHandle) -> None:
    for ts in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.2"):
        assoc = associate(archive, transfer_syntax=ts)
        try:
            results = query(assoc, study_identifier(PatientID="PID001"))
        finally:
            assoc.release()  # type: ignore[attr-defined]
        assert [s for s, _ in results] == [0xFF00, 0xFF00, 0x0000]


def test_result_limit(make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = make_server(peers=PEERS, query={"results_max": 2})
    files = write_archive(tmp_path / "files")
    assert dcmtk("storescu", "-aec", "APPLIANCE", "127.0.0.1", str(server.port), *map(str, files)).returncode == 0
    assoc = associate(server)
    try:
        results = query(assoc, study_identifier())
        assert [s for s, _ in results] == [0xFF00, 0xFF00, 0xA700]
        small = query(assoc, study_identifier(PatientID="PID001"))
        assert [s for s, _ in small] == [0xFF00, 0xFF00, 0x0000]  # exactly the limit: success
    finally:
        assoc.release()  # type: ignore[attr-defined]


def test_cancel(make_server) -> None:  # type: ignore[no-untyped-def]
    """C-CANCEL after the first match: 0xFE00 long before the 2,000 matching studies are all sent (small batches, so
    the association reads the cancel between two of them), and the association keeps serving."""
    from bench.find import build_index

    server = make_server(start=False, peers=PEERS, query={"batch_rows_max": 16})
    build_index(server.root / "var/index", 8000, 4, progress=lambda _m: None)
    server.start()
    assoc = associate(server)
    try:
        statuses = []
        for status, _ds in assoc.send_c_find(study_identifier(), STUDY_ROOT, msg_id=7):  # type: ignore[attr-defined]
            statuses.append(int(status.Status))
            if len(statuses) == 1:
                assoc.send_c_cancel(7, query_model=STUDY_ROOT)  # type: ignore[attr-defined]
        assert statuses[-1] == 0xFE00, statuses
        assert len(statuses) < 2000
        again = query(assoc, study_identifier(PatientID="P0000001"))
        assert [s for s, _ in again] == [0xFF00, 0xFF00, 0x0000]  # still serving; the index as built
    finally:
        assoc.release()  # type: ignore[attr-defined]


def test_bad_identifiers_get_their_status(archive: ServerHandle) -> None:
    assoc = associate(archive)
    try:
        missing_level = Dataset()
        missing_level.PatientID = "PID001"
        assert query(assoc, missing_level)[-1][0] == 0xA900
        patient_in_study_root = study_identifier()
        patient_in_study_root.QueryRetrieveLevel = "PATIENT"
        assert query(assoc, patient_in_study_root)[-1][0] == 0xA900
        series_without_study = Dataset()
        series_without_study.QueryRetrieveLevel = "SERIES"
        series_without_study.SeriesInstanceUID = ""
        assert query(assoc, series_without_study)[-1][0] == 0xA900
        lower_unique = study_identifier(SeriesInstanceUID="1.2.3")
        assert query(assoc, lower_unique)[-1][0] == 0xA900
        # Malformed bytes: an element whose length runs past the end of the identifier.
        assert query_raw(assoc, b"\x08\x00\x52\x00\x40\x00\x00\x00STUDY ") == 0xC000
        assert query_raw(assoc, b"\x08\x00\x52\x00" + b"\x00" * 3) == 0xC000
        assert query_raw(assoc, b"x" * 70_000) == 0xC000  # over identifier_bytes_max
        assert query(assoc, study_identifier(PatientID="PID003"))[-1][0] == 0x0000  # still serving
    finally:
        assoc.release()  # type: ignore[attr-defined]


def query_raw(assoc: object, identifier: bytes) -> int:
    """A C-FIND with identifier bytes as given (pynetdicom encodes only valid datasets): through a dataset whose
    encoding pynetdicom takes as is."""
    from unittest import mock

    with mock.patch("pynetdicom.association.encode", return_value=identifier):
        results = query(assoc, study_identifier())
    return results[-1][0]


def test_peer_without_the_find_right_is_refused(archive: ServerHandle) -> None:
    assoc = associate(archive, "LIMITED")
    try:
        assert query(assoc, study_identifier())[-1][0] == 0x0124
    finally:
        assoc.release()  # type: ignore[attr-defined]
    assert "PID" not in archive.log() and "DOE" not in archive.log()  # no patient data in the log


# ---- Orthanc as the querying peer --------------------------------------------------------------------------


@pytest.fixture
def orthanc(archive: ServerHandle, tmp_path: Path) -> Iterator[str]:
    """Orthanc on free ports with the appliance in its DicomModalities; yields its REST base URL."""
    import json
    import subprocess

    from bench.receivers import free_port, orthanc_binary, wait_for

    binary = orthanc_binary()
    if binary is None:
        pytest.fail("Orthanc is not installed (make installs it beside DCMTK)")
    http_port = free_port()
    config = {"Name": "find-test", "StorageDirectory": str(tmp_path / "storage"),
              "IndexDirectory": str(tmp_path / "index"), "DicomAet": "ORTHANC", "DicomPort": free_port(),
              "HttpPort": http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
              "DicomModalities": {"appliance": ["APPLIANCE", "127.0.0.1", archive.port]}}
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    log = open(tmp_path / "orthanc.log", "wb")
    proc = subprocess.Popen([binary, str(tmp_path / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http_port}"
    try:
        wait_for(lambda: _get(base + "/system") is not None, 60, what="Orthanc's REST API")
        yield base
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _get(url: str) -> object | None:
    import json
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.loads(resp.read())
    except OSError:
        return None


def _post(url: str, body: object) -> object:
    import json
    import urllib.request

    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        return json.loads(resp.read())


def orthanc_query(base: str, level: str, keys: dict[str, str]) -> list[dict[str, object]]:
    created = _post(f"{base}/modalities/appliance/query", {"Level": level, "Query": keys})
    assert isinstance(created, dict)
    answers = _get(f"{base}/queries/{created['ID']}/answers?expand&simplify")
    assert isinstance(answers, list)
    return answers


def test_orthanc_queries_us_through_its_rest_api(orthanc: str) -> None:
    studies = orthanc_query(orthanc, "Study", {"PatientName": "DOE*", "StudyDate": "20200101-20201231",
                                               "ModalitiesInStudy": "", "StudyInstanceUID": ""})
    assert {a["StudyInstanceUID"] for a in studies} == {study_uid(1), study_uid(6)}
    german = orthanc_query(orthanc, "Study", {"PatientName": "MÜLLER*", "StudyInstanceUID": ""})
    assert [a["StudyInstanceUID"] for a in german] == [study_uid(3)]
    assert german[0]["PatientName"] == "Müller^Jürgen"
    series = orthanc_query(orthanc, "Series", {"StudyInstanceUID": study_uid(1), "Modality": "",
                                               "SeriesInstanceUID": ""})
    assert sorted(str(a["Modality"]) for a in series) == ["CT", "MR"]
    patients = orthanc_query(orthanc, "Patient", {"PatientID": "PID004", "PatientName": ""})
    assert [a["PatientID"] for a in patients] == ["PID004"]


def test_unmatched_keys_give_pending_warning(archive: ServerHandle) -> None:
    """A value for a key the index does not hold (PatientAge), or a sequence item with a value: the matches come
    with 0xFF01, the keys come back empty."""
    assoc = associate(archive)
    try:
        with_age = study_identifier(PatientID="PID002", PatientAge="050Y")
        results = query(assoc, with_age)
        assert [s for s, _ in results] == [0xFF01, 0x0000]
        found = results[0][1]
        assert found is not None and found.PatientAge in ("", None)
        item = Dataset()
        item.CodeValue = "X"
        with_sequence = study_identifier(PatientID="PID002")
        with_sequence.ProcedureCodeSequence = [item]
        results = query(assoc, with_sequence)
        assert [s for s, _ in results] == [0xFF01, 0x0000]
        empty_sequence = study_identifier(PatientID="PID002")
        empty_sequence.ProcedureCodeSequence = []
        results = query(assoc, empty_sequence)
        assert [s for s, _ in results] == [0xFF00, 0x0000]
        assert results[0][1] is not None and len(results[0][1].ProcedureCodeSequence) == 0
    finally:
        assoc.release()  # type: ignore[attr-defined]
