"""C-ECHO and C-STORE against DCMTK's echoscu/storescu and pynetdicom, including parallel associations."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pynetdicom import AE, StoragePresentationContexts
from pynetdicom.sop_class import Verification

from tests.conftest import ServerHandle, dataset_bytes, dcmtk, storescp_reference

CT = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
MR = Path(get_testdata_file("MR_small.dcm"))  # type: ignore[arg-type]


def test_echoscu(server: ServerHandle) -> None:
    result = dcmtk("echoscu", "-aec", "APPLIANCE", "127.0.0.1", str(server.port))
    assert result.returncode == 0, result.stderr


def test_storescu_then_export_is_byte_exact(server: ServerHandle, tmp_path: Path) -> None:
    result = dcmtk("storescu", "-aec", "APPLIANCE", "-aet", "CT01", "127.0.0.1", str(server.port), str(CT), str(MR))
    assert result.returncode == 0, result.stderr + server.log()
    # DCMTK re-encodes what it reads, so the oracle is what DCMTK's own storescp receives bit-preserved.
    reference = storescp_reference([CT, MR], tmp_path / "ref")
    assert len(reference) == 2
    for uid, path in reference.items():
        shown = server.cli_json("show", uid)
        assert shown["calling_ae"] == "CT01"
        server.cli("export", uid, str(tmp_path / "out"))
        exported = tmp_path / "out" / f"{uid}.dcm"
        assert dataset_bytes(exported) == dataset_bytes(path)
    assert server.cli_json("status")["counts"]["instances"] == 2


def test_pynetdicom_echo_and_parallel_stores(server: ServerHandle) -> None:
    import pydicom
    from pydicom.uid import generate_uid

    def send(worker: int) -> list[int]:
        # One dataset per thread: Dataset.copy() is shallow, so copies of a shared one share their elements and
        # four threads setting SOPInstanceUID raced on the same DataElement.
        base = pydicom.dcmread(CT)
        ae = AE(ae_title=f"PYN{worker}")
        ae.requested_contexts = StoragePresentationContexts[:120]
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="APPLIANCE")
        assert assoc.is_established
        statuses = [assoc.send_c_echo().Status]
        for i in range(10):
            ds = copy.deepcopy(base)
            ds.SOPInstanceUID = generate_uid()
            ds.InstanceNumber = i
            statuses.append(assoc.send_c_store(ds).Status)
        assoc.release()
        return statuses

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(send, range(4)))
    assert all(s == 0 for statuses in results for s in statuses)
    assert server.cli_json("status")["counts"]["instances"] == 40


def test_parallel_storescu_associations(server: ServerHandle, tmp_path: Path) -> None:
    import pydicom
    from pydicom.uid import generate_uid

    base = pydicom.dcmread(MR)
    folders = []
    for k in range(4):
        folder = tmp_path / f"in{k}"
        folder.mkdir()
        for i in range(15):
            ds = copy.deepcopy(base)
            ds.SOPInstanceUID = generate_uid()
            ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.8.498.{k + 10}"
            ds.save_as(folder / f"{i}.dcm", enforce_file_format=True)
        folders.append(folder)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda f: dcmtk("storescu", "-aec", "APPLIANCE", "+sd", "127.0.0.1",
                                                str(server.port), str(f)), folders))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    counts = server.cli_json("status")["counts"]
    assert counts["instances"] == 60 and counts["series"] == 4
    assert server.cli("verify").returncode == 0


def test_identical_resend_restores_a_lost_blob(server: ServerHandle, tmp_path: Path) -> None:
    """verify reports an instance whose segment was lost from the volume; the modality re-sending the instance
    repairs it, and export gives its bytes back."""
    assert dcmtk("storescu", "-aec", "APPLIANCE", "127.0.0.1", str(server.port), str(CT)).returncode == 0
    server.stop()
    server.start()  # recovery seals the first run's segment: the loss below hits a sealed segment
    segments = list((server.volume / "segments").glob("*.tar"))
    assert len(segments) == 1
    segments[0].unlink()
    assert server.cli("verify", check=False).returncode == 1
    assert dcmtk("storescu", "-aec", "APPLIANCE", "127.0.0.1", str(server.port), str(CT)).returncode == 0
    assert server.cli("verify", check=False).returncode == 0
    uid = pydicom.dcmread(CT).SOPInstanceUID
    server.cli("export", uid, str(tmp_path / "out"))
    assert pydicom.dcmread(tmp_path / "out" / f"{uid}.dcm").PixelData == pydicom.dcmread(CT).PixelData
