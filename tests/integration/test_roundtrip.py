"""Byte-exact round trip for every transfer syntax: what a peer sends is what `appliance export` gives back.

pynetdicom sends each file from its path with STORE_SEND_CHUNKED_DATASET, i.e. the file's dataset bytes as
they are, on a presentation context with exactly the file's transfer syntax; nothing is decoded or re-encoded
on the way. DCMTK's storescu re-encodes what it reads, so its oracle is DCMTK's own bit-preserving storescp.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import UID, generate_uid
from pynetdicom import AE, _config

from appliance.index.db import StudyIndex
from appliance.store.blobs import IMPLEMENTATION_CLASS_UID
from tests.conftest import ServerHandle, dataset_bytes, dcmtk, storescp_reference, write_config


def bundled(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, name
    return Path(path)


# transfer syntax -> bundled file (see the fixups below for the two that need one)
CASES = {
    "implicit-le": ("1.2.840.10008.1.2", "MR_small_implicit.dcm"),
    "explicit-le": ("1.2.840.10008.1.2.1", "CT_small.dcm"),
    "explicit-be": ("1.2.840.10008.1.2.2", "MR_small_bigendian.dcm"),
    "deflated": ("1.2.840.10008.1.2.1.99", "image_dfl.dcm"),
    "jpeg-baseline-50": ("1.2.840.10008.1.2.4.50", "SC_rgb_jpeg_dcmtk.dcm"),
    "jpeg-extended-51": ("1.2.840.10008.1.2.4.51", "JPGExtended.dcm"),
    "jpeg-lossless-57": ("1.2.840.10008.1.2.4.57", "SC_rgb_jpeg_gdcm.dcm"),
    "jpeg-lossless-sv1-70": ("1.2.840.10008.1.2.4.70", "SC_rgb_jpeg_gdcm.dcm"),
    "jpeg-ls-lossless-80": ("1.2.840.10008.1.2.4.80", "MR_small_jpeg_ls_lossless.dcm"),
    "jpeg-ls-near-lossless-81": ("1.2.840.10008.1.2.4.81", "JPEGLSNearLossless_08.dcm"),
    "jpeg2000-lossless-90": ("1.2.840.10008.1.2.4.90", "MR_small_jp2klossless.dcm"),
    "jpeg2000-91": ("1.2.840.10008.1.2.4.91", "JPEG2000.dcm"),
    "rle-5": ("1.2.840.10008.1.2.5", "MR_small_RLE.dcm"),
    "rle-multiframe-5": ("1.2.840.10008.1.2.5", "SC_rgb_rle_2frame.dcm"),
    "implicit-le-sequences": ("1.2.840.10008.1.2", "rtplan.dcm"),
    "explicit-be-sequences-odd": ("1.2.840.10008.1.2.2", "SC_rgb_small_odd_big_endian.dcm"),
    "explicit-le-sr": ("1.2.840.10008.1.2.1", "reportsi.dcm"),
}


def prepare(case: str, folder: Path) -> Path:
    """The file to send for ``case``: the bundled one, or a copy fixed up where the bundle has no usable file."""
    ts, name = CASES[case]
    source = bundled(name)
    if case == "jpeg-lossless-57":
        # pydicom bundles no .57 file. A .70 (Process 14, Selection Value 1) codestream is a valid .57 one
        # (Process 14, any selection value), so relabelling the File Meta gives a conformant .57 instance.
        ds = pydicom.dcmread(source)
        ds.file_meta.TransferSyntaxUID = UID(ts)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    elif case == "implicit-le-sequences":
        # rtplan.dcm's File Meta names another SOP Instance UID than its dataset (the appliance rightly answers
        # 0xA900 to a C-STORE built from it): make them agree.
        ds = pydicom.dcmread(source)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    elif case == "jpeg-ls-near-lossless-81":
        # The bundled .81 files have no Study/Series Instance UIDs, which the appliance rightly refuses (0xC001).
        ds = pydicom.dcmread(source)
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
    else:
        return source
    target = folder / f"{case}.dcm"
    ds.save_as(target, enforce_file_format=True)
    return target


@pytest.fixture(scope="module")
def scp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    root = tmp_path_factory.mktemp("roundtrip")
    # The cases re-send the same SOP Instance UIDs in other encodings and expect the latest to be stored: that
    # is overwrite, which (since keep-first became the default) is granted per peer.
    handle = ServerHandle(root, write_config(root, storage={"duplicate_policy": "overwrite"}, peers={
        "roundtrip": {"ae_title": "ROUNDTRIP", "allow_overwrite": True},
        "storescu": {"ae_title": "STORESCU", "allow_overwrite": True},
        "dcmtkscu": {"ae_title": "DCMTKSCU", "allow_overwrite": True},
    }))
    handle.start()
    yield handle
    handle.stop()


@pytest.fixture
def chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    # Send the file's dataset bytes as they are (monkeypatch restores the setting afterwards).
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def send_file(port: int, path: Path) -> int:
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    ae = AE(ae_title="ROUNDTRIP")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="APPLIANCE")
    assert assoc.is_established
    try:
        accepted = assoc.accepted_contexts
        assert [str(cx.transfer_syntax[0]) for cx in accepted] == [str(meta.TransferSyntaxUID)]
        status = assoc.send_c_store(path)
        return int(status.Status) if "Status" in status else -1
    finally:
        assoc.release()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.usefixtures("chunked")
def test_round_trip_is_byte_exact(scp: ServerHandle, case: str, tmp_path: Path) -> None:
    ts = CASES[case][0]
    path = prepare(case, tmp_path)
    original = pydicom.dcmread(path, stop_before_pixels=True)
    assert original.file_meta.TransferSyntaxUID == ts
    uid = str(original.SOPInstanceUID)

    assert send_file(scp.port, path) == 0x0000, scp.log()[-3000:]

    # The index record, read directly (a second LMDB reader beside the server; `show` is tested elsewhere).
    index = StudyIndex(scp.root / "var/index", readonly=True)
    try:
        found = index.lookup(uid)
    finally:
        index.close()
    assert found is not None and found[0] == "instances"
    shown = found[2]
    assert shown["TransferSyntaxUID"] == ts
    assert shown["SOPClassUID"] == original.SOPClassUID
    assert shown["calling_ae"] == "ROUNDTRIP"
    scp.cli("export", uid, str(tmp_path / "out"))
    exported = tmp_path / "out" / f"{uid}.dcm"
    assert dataset_bytes(exported) == dataset_bytes(path)
    assert shown["size"] == exported.stat().st_size

    meta = pydicom.dcmread(exported, stop_before_pixels=True).file_meta
    assert meta.TransferSyntaxUID == ts
    assert meta.MediaStorageSOPClassUID == original.SOPClassUID
    assert meta.MediaStorageSOPInstanceUID == uid
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.FileMetaInformationVersion == b"\x00\x01"
    # The exported file is a valid Part-10 file whose dataset pydicom reads with that transfer syntax.
    again = pydicom.dcmread(exported)
    assert again.SOPInstanceUID == uid and again.StudyInstanceUID == original.StudyInstanceUID


# Files with distinct SOP Instance UIDs in Explicit LE, Explicit BE and Implicit LE. storescu proposes an
# [Explicit LE] and an [Explicit BE, Implicit LE] context per SOP class; like storescp, the appliance takes the
# requestor's first choice in each, so both receive the same encoding and storescu converts nothing.
DCMTK_FILES = ["CT_small.dcm", "reportsi.dcm", "test-SR.dcm", "waveform_ecg.dcm", "SC_ybr_full_422_uncompressed.dcm",
               "examples_overlay.dcm", "MR_small_bigendian.dcm", "rtdose.dcm"]


def test_storescu_round_trip_matches_dcmtk_storescp(scp: ServerHandle, tmp_path: Path) -> None:
    files = [bundled(n) for n in DCMTK_FILES]
    result = dcmtk("storescu", "-aec", "APPLIANCE", "-aet", "DCMTKSCU", "127.0.0.1", str(scp.port),
                   *map(str, files))
    assert result.returncode == 0, result.stderr + scp.log()[-3000:]
    reference = storescp_reference(files, tmp_path / "ref")
    assert len(reference) == len(files)
    for uid, ref in reference.items():
        scp.cli("export", uid, str(tmp_path / "out"))
        exported = tmp_path / "out" / f"{uid}.dcm"
        assert dataset_bytes(exported) == dataset_bytes(ref), uid
        ref_meta = pydicom.dcmread(ref, stop_before_pixels=True).file_meta
        meta = pydicom.dcmread(exported, stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == ref_meta.TransferSyntaxUID
        assert meta.MediaStorageSOPInstanceUID == uid == ref_meta.MediaStorageSOPInstanceUID
        assert meta.MediaStorageSOPClassUID == ref_meta.MediaStorageSOPClassUID
