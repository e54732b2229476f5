"""Real peers for the service tests, reusable by the Query/Retrieve and CLI tests: CT instances with fresh UIDs,
storing them with pynetdicom, and an Orthanc started on free ports with a generated configuration and driven
through its REST API (as bench/receivers.py starts it for the benchmark)."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from bench.receivers import free_port, orthanc_binary, wait_for
from tests.conftest import DCMTK_ENV

CT = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def ct_instances(folder: Path, count: int, patient_id: str = "PID1", patient_name: str = "DOE^JOHN",
                 study_uid: str | None = None, series_uid: str | None = None) -> list[Path]:
    """``count`` Part-10 CT files of one series with fresh UIDs (CT_small.dcm's pixels), written to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    paths = []
    for i in range(count):
        ds = pydicom.dcmread(CT)
        del ds[0xFFFCFFFC]  # Data Set Trailing Padding: DCMTK-based peers drop it when they send, so without it
        # what a peer sends back is byte for byte what was uploaded
        ds.PatientID, ds.PatientName = patient_id, patient_name
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def sop_uids(path: Path) -> tuple[str, str]:
    """(SOP Class UID, SOP Instance UID) of a Part-10 file."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.SOPClassUID), str(ds.SOPInstanceUID)


def store(port: int, files: list[Path], called_ae: str = "APPLIANCE", calling_ae: str = "STORESCU") -> list[int]:
    """C-STORE ``files`` with pynetdicom on one association; the statuses."""
    from pynetdicom import AE

    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title=calling_ae)
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, [str(ds.file_meta.TransferSyntaxUID) for ds in datasets][:1])
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    assert assoc.is_established, "association for C-STORE refused"
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


class Orthanc:
    """One Orthanc process (/usr/sbin/Orthanc) with its own folder, DICOM and HTTP on free ports, and
    ``modalities`` as its DicomModalities: name -> [AE title, host, port]. ``Orthanc(...).start()``, ``stop()``."""

    ae = "ORTHANC"

    def __init__(self, workdir: Path, modalities: dict[str, list[Any]] | None = None, port: int = 0) -> None:
        self.workdir = workdir
        self.modalities = modalities or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = port  # 0: a free one (give one when a peer must know it before Orthanc starts)
        self.http_port = 0
        self.log_path = workdir / "orthanc.log"

    def start(self) -> Orthanc:
        binary = orthanc_binary()
        assert binary is not None, "Orthanc is not installed (make installs it beside DCMTK)"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port, self.http_port = self.port or free_port(), free_port()
        config = {
            "Name": "test", "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"), "DicomAet": self.ae, "DicomPort": self.port,
            "DicomCheckCalledAet": False, "HttpPort": self.http_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "Plugins": [], "SaveJobs": False,
            "DicomModalities": self.modalities,
            # Orthanc answers C-MOVE only to modalities it knows; C-GET needs nothing more.
            "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True, "DicomAlwaysAllowMove": True,
        }
        (self.workdir / "orthanc.json").write_text(json.dumps(config, indent=2))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([binary, "--verbose", str(self.workdir / "orthanc.json")], cwd=self.workdir,
                                         stdout=log, stderr=subprocess.STDOUT, env=DCMTK_ENV, start_new_session=True)

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"Orthanc exited {self.proc.returncode}:\n{self.log()}")
            try:
                self.rest("GET", "/system")
                return True
            except (urllib.error.URLError, ConnectionError):
                return False

        wait_for(ready, 60, what="Orthanc's REST API")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def rest(self, method: str, path: str, body: Any = None, raw: bytes | None = None, timeout: float = 60) -> Any:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            text = resp.read()
        return json.loads(text) if text else None

    def upload(self, files: list[Path]) -> None:
        for path in files:
            self.rest("POST", "/instances", raw=path.read_bytes())

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
