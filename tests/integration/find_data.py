"""The small archive the C-FIND tests query: five patients, names in ISO_IR 100, ISO_IR 192 and ISO 2022 IR 87,
studies with one or two series, written as Part-10 files with pydicom and stored over DICOM by storescu."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
SC = "1.2.840.10008.5.1.4.1.1.7"
ROOT = "1.2.826.0.1.3680043.9.7779"


@dataclass(frozen=True)
class Study:
    patient_id: str
    name: str
    charset: list[str]
    number: int
    date: str
    time: str
    accession: str
    series: tuple[tuple[str, str, int], ...]  # (modality, SOP class, instances)

    @property
    def uid(self) -> str:
        return f"{ROOT}.{self.number}"

    def series_uid(self, i: int) -> str:
        return f"{self.uid}.{i + 1}"


JAPANESE = "Yamada^Tarou=山田^太郎=やまだ^たろう"
STUDIES = (
    Study("PID001", "DOE^JOHN", [], 1, "20200115", "101500", "ACC1", (("CT", CT, 2), ("MR", MR, 1))),
    Study("PID001", "DOE^JOHN", [], 2, "20210301", "230000", "ACC2", (("MR", MR, 1),)),
    Study("PID002", "Müller^Jürgen", ["ISO_IR 100"], 3, "20190607", "080000", "ACC3", (("CT", CT, 1),)),
    Study("PID003", "Nguyễn^Văn^An", ["ISO_IR 192"], 4, "20220202", "120000", "ACC4", (("CT", CT, 1),)),
    Study("PID004", JAPANESE, ["ISO 2022 IR 6", "ISO 2022 IR 87"], 5, "20230303", "090000", "ACC5",
          (("OT", SC, 1),)),
    Study("PID005", "DOEBLER^ANNA", [], 6, "20200116", "000500", "ACC6", (("US", SC, 1),)),
)


def write_archive(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for study in STUDIES:
        for s, (modality, sop_class, count) in enumerate(study.series):
            for n in range(count):
                ds = Dataset()
                if study.charset:
                    ds.SpecificCharacterSet = study.charset if len(study.charset) > 1 else study.charset[0]
                ds.SOPClassUID = sop_class
                ds.SOPInstanceUID = f"{study.series_uid(s)}.{n + 1}"
                ds.StudyDate, ds.StudyTime = study.date, study.time
                ds.AccessionNumber = study.accession
                ds.Modality = modality
                ds.ReferringPhysicianName = ""
                ds.StudyDescription = f"study {study.number}"
                ds.PatientName = study.name
                ds.PatientID = study.patient_id
                ds.PatientBirthDate = "19700101"
                ds.PatientSex = "O"
                ds.StudyInstanceUID = study.uid
                ds.SeriesInstanceUID = study.series_uid(s)
                ds.StudyID = str(study.number)
                ds.SeriesNumber = s + 1
                ds.InstanceNumber = n + 1
                ds.Rows = ds.Columns = 2
                ds.SamplesPerPixel = 1
                ds.PhotometricInterpretation = "MONOCHROME2"
                ds.BitsAllocated = ds.BitsStored = 8
                ds.HighBit = 7
                ds.PixelRepresentation = 0
                ds.PixelData = b"\x00\x01\x02\x03"
                ds.file_meta = FileMetaDataset()
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                ds.file_meta.MediaStorageSOPClassUID = sop_class
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                path = folder / f"{ds.SOPInstanceUID}.dcm"
                ds.save_as(path, enforce_file_format=True)
                paths.append(path)
    return paths
