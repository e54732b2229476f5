"""The profiles of bench/synth.py (what each kind of synthetic instance looks like) and the header of each
instance: patient, study and series attributes, the modality-specific modules, the private tags, the File Meta.

Every value comes from the seeded RNG that ``bench.synth.iter_instances`` passes in, so the same parameters always
give identical headers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import uuid
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
DX_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
MG_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.2"
US_MULTIFRAME_STORAGE = "1.2.840.10008.5.1.4.1.1.3.1"
# Bumped whenever the generator's output changes, so stale caches are never reused.
GENERATOR_VERSION = 2
PRIVATE_GROUP = 0x0029
PRIVATE_CREATOR = "BENCH SYNTH"
# Our own implementation class UID (not pydicom's, which changes with its version): files stay identical.
IMPLEMENTATION_CLASS_UID = "2.25." + str(uuid.uuid5(uuid.NAMESPACE_OID, "dicom-appliance bench synth").int)
IMPLEMENTATION_VERSION = f"BENCHSYNTH_{GENERATOR_VERSION}"

# Transfer syntax names of the command line -> UIDs.
TRANSFER_SYNTAXES: dict[str, str] = {
    "none": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "rle": RLELossless,
    "jpegls": JPEGLSLossless,
    "j2k": JPEG2000Lossless,
}
_TS_NAMES = {uid: name for name, uid in TRANSFER_SYNTAXES.items()}


@dataclass(frozen=True)
class Profile:
    """What one kind of synthetic instance looks like. ``series_size``/``study_size`` 0 = all in one."""

    name: str
    modality: str
    sop_class_uid: str
    rows: int
    cols: int
    bits_allocated: int
    bits_stored: int
    samples: int  # samples per pixel: 1 (MONOCHROME2) or 3 (RGB)
    frames: int  # 1 = single-frame SOP class; >1 = multi-frame (NumberOfFrames)
    series_size: int
    study_size: int
    default_count: int
    noise: float  # standard deviation of the additive noise, in stored values
    study_description: str
    body_part: str

    @property
    def frame_bytes(self) -> int:
        return self.rows * self.cols * self.samples * self.bits_allocated // 8

    @property
    def pixel_bytes(self) -> int:
        return self.frame_bytes * self.frames


PROFILES: dict[str, Profile] = {
    "ct": Profile("ct", "CT", CT_IMAGE_STORAGE, 512, 512, 16, 12, 1, 1, 0, 0, 600, 12.0, "CT CHEST ABDOMEN", "CHEST"),
    "mr": Profile("mr", "MR", MR_IMAGE_STORAGE, 256, 256, 16, 12, 1, 1, 200, 0, 2000, 25.0, "MR BRAIN", "HEAD"),
    "mr320": Profile("mr320", "MR", MR_IMAGE_STORAGE, 320, 320, 16, 12, 1, 1, 200, 0, 1000, 25.0, "MR BRAIN", "HEAD"),
    "dx": Profile("dx", "DX", DX_PRESENTATION_STORAGE, 2048, 2048, 16, 12, 1, 1, 1, 2, 40, 20.0,
                  "XR CHEST 2 VIEWS", "CHEST"),
    "mg": Profile("mg", "MG", MG_PRESENTATION_STORAGE, 4280, 2560, 16, 12, 1, 1, 4, 4, 16, 18.0,
                  "MG SCREENING BILATERAL", "BREAST"),
    "us": Profile("us", "US", US_MULTIFRAME_STORAGE, 480, 640, 8, 8, 3, 30, 0, 0, 10, 14.0, "US ABDOMEN",
                  "ABDOMEN"),
}


def get_profile(profile: str | Profile, *, frames: int | None = None, size: int | None = None) -> Profile:
    """The profile (by name, or as given), with the number of frames (multi-frame only) or rows = columns changed."""
    p = PROFILES[profile] if isinstance(profile, str) else profile
    if frames is not None:
        if p.frames == 1 and frames != 1:
            raise ValueError(f"profile {p.name} is single-frame")
        p = dataclasses.replace(p, frames=frames)
    if size is not None:
        p = dataclasses.replace(p, rows=size, cols=size)
    return p


def ts_uid(ts: str | None) -> str:
    """The transfer syntax UID for a name of ``TRANSFER_SYNTAXES`` (None = Explicit VR Little Endian) or a UID."""
    if ts is None:
        return ExplicitVRLittleEndian
    if ts in TRANSFER_SYNTAXES:
        return TRANSFER_SYNTAXES[ts]
    if ts in _TS_NAMES:
        return ts
    raise ValueError(f"unknown transfer syntax {ts!r}: one of {', '.join(TRANSFER_SYNTAXES)} or its UID")


def available_transfer_syntaxes() -> dict[str, bool]:
    """Whether an encoder is installed for each transfer syntax name."""
    return {name: _plugin(uid) is not None for name, uid in TRANSFER_SYNTAXES.items()}


def _plugin(uid: str) -> str | None:
    """The encoding plugin to use: "" for uncompressed, None when no encoder is installed."""
    if uid in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        return ""
    from pydicom.pixels import get_encoder

    available = get_encoder(uid).available_plugins
    for preferred in ("pylibjpeg", "pyjpegls", "pydicom", "gdcm"):  # pylibjpeg-rle is ~10x pydicom's RLE
        if preferred in available:
            return preferred
    return None


# ---- UIDs and header values ---------------------------------------------------------------------------


class _Uids:
    """2.25.<int> UIDs from a seeded RNG: deterministic, unique, no registered root needed."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def __call__(self) -> str:
        return "2.25." + str(uuid.UUID(int=self.rng.getrandbits(128), version=4).int)


def _ds(value: float) -> str:
    """A DS value within 16 characters."""
    text = f"{value:.6g}"
    return text if len(text) <= 16 else f"{value:.8e}"[:16]


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


# ---- acquisition protocols and views ------------------------------------------------------------------

MR_PROTOCOLS = [("T1 SE AX", "500", "12", 1.0), ("T2 SE AX", "4000", "100", 1.6), ("PD SE AX", "2500", "20", 1.2),
                ("FLAIR AX", "9000", "120", 0.7)]

DX_VIEWS = [("PA", ["L", "F"], "CHEST PA"), ("LL", ["P", "F"], "CHEST LAT")]

MG_VIEWS = [("R", "CC", ["P", "L"]), ("L", "CC", ["A", "R"]), ("R", "MLO", ["P", "F"]), ("L", "MLO", ["A", "F"])]


# ---- datasets -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthInstance:
    """One generated instance. ``dataset_bytes`` is the dataset encoded in ``transfer_syntax_uid`` without File
    Meta (what a C-STORE carries); ``part10_bytes()`` is the file."""

    profile: str
    index: int  # 0-based position in the burst
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    patient_id: str
    study_instance_uid: str
    series_instance_uid: str
    dataset_bytes: bytes

    def file_meta_bytes(self) -> bytes:
        return _file_meta(self.sop_class_uid, self.sop_instance_uid, self.transfer_syntax_uid)

    def part10_bytes(self) -> bytes:
        return self.file_meta_bytes() + self.dataset_bytes

    def dataset(self) -> Dataset:
        """The parsed dataset (with its File Meta)."""
        from pydicom import dcmread

        return dcmread(DicomBytesIO(self.part10_bytes()))


def _file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, "DICM" and the File Meta Information group of a Part-10 file."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    return fp.getvalue()


def _study(rng: random.Random, uids: _Uids, p: Profile) -> dict[str, Any]:
    """Patient and study attributes shared by every image of a study."""
    day = 1 + rng.randrange(28)
    return {
        "PatientName": f"BENCH^{p.modality}{rng.randrange(10**6):06d}",
        "PatientID": f"BENCH{rng.randrange(10**8):08d}",
        "PatientBirthDate": f"19{50 + rng.randrange(45)}0{1 + rng.randrange(9)}{day:02d}",
        "PatientSex": "F" if p.modality == "MG" else rng.choice(["F", "M"]),
        "StudyInstanceUID": uids(),
        "StudyDate": f"202403{day:02d}",
        "StudyTime": f"{8 + rng.randrange(10):02d}{rng.randrange(60):02d}00",
        "AccessionNumber": f"A{rng.randrange(10**9):09d}",
        "StudyID": str(1 + rng.randrange(9999)),
        "ReferringPhysicianName": "REF^BENCH",
        "StudyDescription": p.study_description,
        "FrameOfReferenceUID": uids(),
    }


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _header(p: Profile, study: dict[str, Any], series: dict[str, Any], number: int, view: int, sop_uid: str,
            index: int, seed: int) -> Dataset:
    """Everything but the pixel data of one instance."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = UID(p.sop_class_uid)
    ds.SOPInstanceUID = UID(sop_uid)
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study["StudyDate"]
    ds.StudyTime = study["StudyTime"]
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = series["SeriesTime"]
    ds.AccessionNumber = study["AccessionNumber"]
    ds.Modality = p.modality
    ds.Manufacturer = "BENCH SYNTHETIC"
    ds.InstitutionName = "BENCH HOSPITAL"
    ds.ReferringPhysicianName = study["ReferringPhysicianName"]
    ds.StationName = f"SYNTH{p.modality}01"
    ds.StudyDescription = study["StudyDescription"]
    ds.SeriesDescription = series["SeriesDescription"]
    ds.ManufacturerModelName = f"SYNTH-{p.modality}"
    ds.DeviceSerialNumber = f"{_stable_int(p.name) % 10**6:06d}"
    ds.SoftwareVersions = IMPLEMENTATION_VERSION
    ds.PatientName = study["PatientName"]
    ds.PatientID = study["PatientID"]
    ds.PatientBirthDate = study["PatientBirthDate"]
    ds.PatientSex = study["PatientSex"]
    ds.BodyPartExamined = p.body_part
    ds.StudyInstanceUID = study["StudyInstanceUID"]
    ds.SeriesInstanceUID = series["SeriesInstanceUID"]
    ds.StudyID = study["StudyID"]
    ds.SeriesNumber = series["SeriesNumber"]
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = number
    ds.SamplesPerPixel = p.samples
    ds.PhotometricInterpretation = "RGB" if p.samples == 3 else "MONOCHROME2"
    if p.samples == 3:
        ds.PlanarConfiguration = 0
    ds.Rows = p.rows
    ds.Columns = p.cols
    ds.BitsAllocated = p.bits_allocated
    ds.BitsStored = p.bits_stored
    ds.HighBit = p.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "00"
    if p.modality in ("CT", "MR"):
        _cross_sectional(ds, p, study, series, number)
    elif p.modality in ("DX", "MG"):
        _projection(ds, p, view)
    else:
        _ultrasound(ds, p)
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "LO", p.name)
    block.add_new(0x11, "UL", index)
    block.add_new(0x12, "LO", str(seed))
    block.add_new(0x13, "US", GENERATOR_VERSION)
    block.add_new(0x14, "DS", _ds((number - 1) / max(1, series["size"] - 1)))
    return ds


def _cross_sectional(ds: Dataset, p: Profile, study: dict[str, Any], series: dict[str, Any], number: int) -> None:
    ct = p.modality == "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    thickness = 1.0 if ct else 4.0
    z_mm = -(number - 1) * thickness
    ds.SliceThickness = _ds(thickness)
    if ct:
        ds.KVP = "120"
        ds.XRayTubeCurrent = 200
        ds.ExposureTime = 500
        ds.ConvolutionKernel = "STANDARD"
        ds.PatientPosition = "FFS"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = ["40", "-600"]
        ds.WindowWidth = ["400", "1500"]
        ds.WindowCenterWidthExplanation = ["SOFT TISSUE", "LUNG"]
    else:
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = series["RepetitionTime"]
        ds.EchoTime = series["EchoTime"]
        ds.EchoTrainLength = 1
        ds.MagneticFieldStrength = "3"
        ds.ImagingFrequency = "127.74"
        ds.SpacingBetweenSlices = _ds(thickness)
        ds.PatientPosition = "HFS"
        ds.WindowCenter = "900"
        ds.WindowWidth = "1800"
    spacing = (500.0 if ct else 230.0) / p.cols
    x0 = -spacing * p.cols / 2
    ds.ImagePositionPatient = [_ds(x0), _ds(x0), _ds(z_mm)]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = study["FrameOfReferenceUID"]
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(z_mm)
    ds.PixelSpacing = [_ds(spacing), _ds(spacing)]


def _projection(ds: Dataset, p: Profile, view: int) -> None:
    """DX / MG for presentation: DX Series, DX Image, DX Detector, DX Positioning, Mammography Image."""
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.BurnedInAnnotation = "NO"
    ds.DetectorType = "DIRECT" if p.modality == "MG" else "SCINTILLATOR"
    ds.KVP = "28" if p.modality == "MG" else "125"
    ds.ExposureInuAs = 80000 if p.modality == "MG" else 2500
    ds.DistanceSourceToDetector = "660" if p.modality == "MG" else "1800"
    pitch = 0.07 if p.modality == "MG" else 0.2
    ds.ImagerPixelSpacing = [_ds(pitch), _ds(pitch)]
    ds.PixelSpacing = [_ds(pitch), _ds(pitch)]
    ds.WindowCenter = "2048"
    ds.WindowWidth = "4096"
    if p.modality == "DX":
        name, orientation, _ = DX_VIEWS[view]
        ds.ViewPosition = name
        ds.PatientOrientation = orientation
        ds.AnatomicRegionSequence = [_code("T-D3000", "SRT", "Chest")]
        ds.ImageLaterality = "U"
    else:
        laterality, position, orientation = MG_VIEWS[view]
        ds.ImageLaterality = laterality
        ds.ViewPosition = position
        ds.PatientOrientation = orientation
        ds.PositionerType = "MAMMOGRAPHIC"
        ds.OrganExposed = "BREAST"
        ds.BreastImplantPresent = "NO"
        ds.PartialView = "NO"
        ds.BodyPartThickness = "52"
        ds.CompressionForce = "110"
        ds.AnatomicRegionSequence = [_code("T-04000", "SRT", "Breast")]
        ds.ViewCodeSequence = [_code("R-10242", "SRT", "cranio-caudal") if position == "CC"
                               else _code("R-10226", "SRT", "medio-lateral oblique")]


def _ultrasound(ds: Dataset, p: Profile) -> None:
    """US Image, Cine and Multi-frame modules, and a US region (for calibrated measurements)."""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL", "0001"]
    ds.NumberOfFrames = p.frames
    ds.FrameTime = "33.3"
    ds.CineRate = 30
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.TransducerData = ["C5-1", "", ""]
    ds.ProcessingFunction = "ABDOMEN"
    ds.MechanicalIndex = "1.1"
    ds.PatientOrientation = ""
    region = Dataset()
    region.RegionSpatialFormat = 1  # 2D
    region.RegionDataType = 1  # tissue
    region.RegionFlags = 0
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 0, 20
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = p.cols - 1, p.rows - 1
    region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3  # cm
    region.PhysicalDeltaX = region.PhysicalDeltaY = 0.025
    region.ReferencePixelX0, region.ReferencePixelY0 = p.cols // 2, 0
    ds.SequenceOfUltrasoundRegions = [region]


def _series(p: Profile, uids: _Uids, s: int, size: int, view: int) -> dict[str, Any]:
    name, tr, te, contrast = MR_PROTOCOLS[s % len(MR_PROTOCOLS)]
    description = {
        "CT": "AXIAL 1MM STANDARD",
        "MR": f"{name} {s + 1}",
        "DX": DX_VIEWS[view % len(DX_VIEWS)][2] if size == 1 else "CHEST",
        "MG": " ".join(MG_VIEWS[view][:2]) if size == 1 else "SCREENING MAMMOGRAPHY",
        "US": "ABDOMEN 2D",
    }[p.modality]
    return {
        "SeriesInstanceUID": uids(),
        "SeriesNumber": s + 1,
        "SeriesTime": f"{8 + s // 6:02d}{(s * 10) % 60:02d}00",
        "SeriesDescription": description,
        "RepetitionTime": tr,
        "EchoTime": te,
        "contrast": contrast,
        "size": size,
        "z": lambda i: i / max(1, size - 1),
    }
