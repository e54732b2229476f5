"""Header parsing for the index: the fast walk (with its pydicom fallback) must give exactly what pydicom reads,
on every suitable file pydicom ships with."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import encode, split_dataset

from appliance.errors import ApplianceError, CannotUnderstand, MissingUIDs
from appliance.index import records
from appliance.index.records import HEAD_LIMIT, Header, read_header, read_header_file

TEST_FILES = Path(os.path.dirname(pydicom.data.__file__)) / "test_files"
UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def candidates() -> list[str]:
    """Files with a File Meta transfer syntax, the four UIDs, and not deflated."""
    names = []
    for path in sorted(TEST_FILES.iterdir()):
        if not path.is_file():
            continue
        try:
            meta, _offset = split_dataset(path)
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        ts = str(meta.get("TransferSyntaxUID", ""))
        if not ts or ts == records.DEFLATED:
            continue
        if all(ds.get(k) for k in UID_KEYWORDS):
            names.append(path.name)
    return names


CANDIDATES = candidates()


def head_of(path: Path) -> tuple[bytes, str, bool]:
    meta, offset = split_dataset(path)
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read()
    return data[:HEAD_LIMIT], str(meta.TransferSyntaxUID), len(data) <= HEAD_LIMIT


def from_pydicom(path: Path) -> Header:
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=records._SPECIFIC_TAGS)
    return records._from_dataset(ds)


def outcome(fn: object, *args: object) -> Header | type[Exception]:
    try:
        return fn(*args)  # type: ignore[operator]
    except ApplianceError as exc:
        return type(exc)


def test_enough_candidates() -> None:
    # Guards against the selection silently shrinking (e.g. a pydicom upgrade moving the files).
    assert len(CANDIDATES) >= 50
    assert {"CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm"} <= set(CANDIDATES)


@pytest.mark.parametrize("name", CANDIDATES)
def test_read_header_equals_pydicom(name: str) -> None:
    path = TEST_FILES / name
    head, ts, complete = head_of(path)
    expected = outcome(from_pydicom, path)
    got = outcome(read_header, head, ts, complete)
    if got is None:  # the index attributes did not fit the head: the live path then parses the whole file
        got = outcome(lambda p: read_header_file(p)[0], path)
    assert got == expected
    if isinstance(expected, Header):
        for keyword in UID_KEYWORDS[:2]:
            assert getattr(expected, {"StudyInstanceUID": "study", "SeriesInstanceUID": "series"}[keyword])[keyword]
        assert expected.sop_instance_uid and expected.sop_class_uid


@pytest.mark.parametrize("name", CANDIDATES)
def test_pydicom_fallback_equals_fast_path(name: str) -> None:
    """The pydicom path of read_header (used when the fast walk gives up) agrees with the fast walk."""
    path = TEST_FILES / name
    head, ts, complete = head_of(path)
    fast = records._fast_header(head, ts, complete)
    if fast is None:
        pytest.skip("the fast walk defers this file to pydicom")
    assert fast == from_pydicom(path)


def test_read_header_file_matches_live_parse() -> None:
    path = TEST_FILES / "CT_small.dcm"
    header, ts = read_header_file(path)
    assert ts == ExplicitVRLittleEndian
    assert header == from_pydicom(path)
    assert header.patient["PatientName"] == "CompressedSamples^CT1"
    assert header.series["Modality"] == "CT"
    assert header.instance["Rows"] == "128" and header.instance["Columns"] == "128"


def test_deflated_file() -> None:
    path = TEST_FILES / "image_dfl.dcm"
    head, ts, complete = head_of(path)
    assert ts == records.DEFLATED and complete
    header = read_header(head, ts, complete)
    assert header is not None
    assert header == from_pydicom(path)
    assert header.study["StudyInstanceUID"] and header.series["SeriesInstanceUID"]
    assert read_header_file(path) == (header, records.DEFLATED)


def test_deflated_garbage_cannot_be_understood() -> None:
    with pytest.raises(CannotUnderstand):
        read_header(b"\xff" * 64, records.DEFLATED, True)


def test_deflated_encoding_of_a_known_dataset() -> None:
    ds = pydicom.dcmread(TEST_FILES / "MR_small.dcm")
    raw = encode(ds, False, True)
    assert raw is not None
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = compressor.compress(raw) + compressor.flush()
    header = read_header(deflated, records.DEFLATED, True)
    assert header == from_pydicom(TEST_FILES / "MR_small.dcm")


def encoded(ds: Dataset, ts: str) -> bytes:
    raw = encode(ds, ts == ImplicitVRLittleEndian, ts != ExplicitVRBigEndian)
    assert raw is not None
    return raw


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
@pytest.mark.parametrize("missing", ["SeriesInstanceUID", "StudyInstanceUID", "SOPInstanceUID", "SOPClassUID"])
def test_missing_uid_raises(ts: str, missing: str) -> None:
    ds = pydicom.dcmread(TEST_FILES / "MR_small.dcm")
    del ds[missing]
    raw = encoded(ds, ts)
    with pytest.raises(MissingUIDs):
        read_header(raw, ts, True)
    # Also when only the head has arrived: the pixel data shows the attributes are over.
    with pytest.raises(MissingUIDs):
        read_header(raw[:4096], ts, False)


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_each_encoding_reads_the_same(ts: str) -> None:
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    assert read_header(encoded(ds, ts), ts, True) == from_pydicom(TEST_FILES / "CT_small.dcm")


def test_incomplete_head_returns_none() -> None:
    raw = encoded(pydicom.dcmread(TEST_FILES / "CT_small.dcm"), ExplicitVRLittleEndian)
    assert read_header(raw[:300], ExplicitVRLittleEndian, False) is None
    assert read_header(raw[:300], ImplicitVRLittleEndian, False) is None


def test_truncated_complete_dataset_cannot_be_understood() -> None:
    raw = encoded(pydicom.dcmread(TEST_FILES / "CT_small.dcm"), ExplicitVRLittleEndian)
    with pytest.raises((CannotUnderstand, MissingUIDs)):
        read_header(raw[:300], ExplicitVRLittleEndian, True)


def test_character_sets() -> None:
    """Latin-1 and UTF-8 names take the fast path; other character sets go through pydicom's decoders."""
    base = pydicom.dcmread(TEST_FILES / "MR_small.dcm")
    cases = [
        ("ISO_IR 100", "Müller^Jürgen"),
        ("ISO_IR 192", "Γιάννης^Δοκιμή"),
        ("ISO_IR 144", "Иванов^Иван"),  # Cyrillic: not a plain charset, pydicom decodes it
        ("GB18030", "王^小东"),
    ]
    for charset, name in cases:
        ds = base.copy()
        ds.SpecificCharacterSet = charset
        ds.PatientName = name
        ds.StudyDescription = name.replace("^", " ")
        raw = encoded(ds, ExplicitVRLittleEndian)
        header = read_header(raw, ExplicitVRLittleEndian, True)
        assert header is not None
        assert header.patient["PatientName"] == name, charset
        assert header.study["StudyDescription"] == name.replace("^", " "), charset


def test_attributes_in_sequences_are_not_taken() -> None:
    """A PatientID inside a sequence item (e.g. Other Patient IDs Sequence) must not replace the top-level one."""
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    item = Dataset()
    item.PatientID = "NESTED"
    item.StudyInstanceUID = "1.2.3.999"
    ds.OtherPatientIDsSequence = [item]
    ds.PatientID = "TOP"
    for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        header = read_header(encoded(ds, ts), ts, True)
        assert header is not None
        assert header.patient["PatientID"] == "TOP"
        assert header.study["StudyInstanceUID"] == ds.StudyInstanceUID


def test_file_meta_of_blob_is_readable(tmp_path: Path) -> None:
    """records.read_header_file reads blobs the store writes (store/blobs.file_meta + dataset)."""
    from appliance.store.blobs import file_meta

    source = TEST_FILES / "MR_small_implicit.dcm"
    head, ts, _complete = head_of(source)
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    _meta, offset = split_dataset(source)
    blob = tmp_path / "blob"
    blob.write_bytes(file_meta(ds.SOPClassUID, ds.SOPInstanceUID, ts) + source.read_bytes()[offset:])
    header, blob_ts = read_header_file(blob)
    assert blob_ts == ts == ImplicitVRLittleEndian
    assert header == from_pydicom(source)
    meta = pydicom.dcmread(blob, stop_before_pixels=True).file_meta
    assert isinstance(meta, FileMetaDataset)
    assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert meta.TransferSyntaxUID == ts
    assert blob.read_bytes()[split_dataset(blob)[1]:] == source.read_bytes()[offset:]


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("SeriesInstanceUID", "1.2." + "3" * 61),  # 65 characters: not a UID
        ("SOPInstanceUID", "1.2." + "3" * 400),
        ("PatientID", "X" * 600),
        ("AccessionNumber", "A" * 600),
        ("IssuerOfPatientID", "I" * 500),
        ("Modality", "M" * 600),  # a key of idx_modality since schema 3
    ],
)
@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_values_too_long_to_index_are_refused(keyword: str, value: str, ts: str) -> None:
    """LMDB keys are at most 511 bytes; one oversized key used to fail a whole commit batch. Refuse it alone."""
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    setattr(ds, keyword, value)
    with pytest.raises(CannotUnderstand):
        read_header(encoded(ds, ts), ts, True)


def _deeply_nested(depth: int) -> bytes:
    """Explicit VR LE bytes: the four UIDs, then a sequence nested ``depth`` levels deep (undefined lengths)."""
    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.5"
    head = encode(ds, False, True)
    assert head is not None
    sq_open = struct.pack("<HH2s2xL", 0x0040, 0xA730, b"SQ", 0xFFFFFFFF) + struct.pack("<HHL", 0xFFFE, 0xE000,
                                                                                       0xFFFFFFFF)
    sq_close = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return bytes(head) + sq_open * depth + sq_close * depth


@pytest.mark.parametrize("depth", [3, 2000])
def test_deep_sequence_nesting_never_escapes_as_recursion_error(depth: int) -> None:
    """A peer can nest sequences thousands deep in 64 KiB: the walk is bounded, and the instance is either indexed
    or refused with CannotUnderstand (0xC000), never a RecursionError that would kill the handler."""
    raw = _deeply_nested(depth)
    try:
        header = read_header(raw, ExplicitVRLittleEndian, complete=True)
    except ApplianceError:
        assert depth > records.SEQUENCE_DEPTH_MAX
        return
    assert header is not None and header.sop_instance_uid == "1.2.3.4"


def test_a_deflated_dataset_is_never_inflated_past_the_bound() -> None:
    """The index attributes must be within the bounded inflate of a deflated head; beyond it, refused (no whole
    inflate of a zip bomb on the event loop)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = compressor.compress(b"\x00" * (records.DEFLATED_INFLATE_MAX + (1 << 20))) + compressor.flush()
    with pytest.raises(ApplianceError):  # CannotUnderstand or MissingUIDs: refused, and no None (= read on)
        read_header(bomb[:HEAD_LIMIT], records.DEFLATED, complete=False)
