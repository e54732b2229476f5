"""bench/synth.py: deterministic, realistic, decodable synthetic instances for every profile and transfer syntax."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from bench import synth

# One instance per profile; US with a few frames only, to keep the tests fast.
SMALL = {"ct": {}, "mr": {}, "mr320": {}, "dx": {}, "mg": {}, "us": {"frames": 3}}
EXPECTED = {  # SOP class, rows, columns, frames, bits allocated, bits stored, samples per pixel
    "ct": ("1.2.840.10008.5.1.4.1.1.2", 512, 512, 1, 16, 12, 1),
    "mr": ("1.2.840.10008.5.1.4.1.1.4", 256, 256, 1, 16, 12, 1),
    "mr320": ("1.2.840.10008.5.1.4.1.1.4", 320, 320, 1, 16, 12, 1),
    "dx": ("1.2.840.10008.5.1.4.1.1.1.1", 2048, 2048, 1, 16, 12, 1),
    "mg": ("1.2.840.10008.5.1.4.1.1.1.2", 4280, 2560, 1, 16, 12, 1),
    "us": ("1.2.840.10008.5.1.4.1.1.3.1", 480, 640, 3, 8, 8, 3),
}
COMPRESSED = ["rle", "jpegls", "j2k"]


def one(profile: str, seed: int = 1, ts: str | None = None, **kw: int) -> synth.SynthInstance:
    return next(synth.iter_instances(profile, 1, seed, ts, **{**SMALL[profile], **kw}))


@pytest.fixture(scope="module")
def firsts() -> dict[str, synth.SynthInstance]:
    return {profile: one(profile) for profile in SMALL}


def dataset_offset(part10: bytes) -> int:
    """Where the dataset starts in a Part-10 file: after preamble, DICM and the (0002,0000)-announced group."""
    assert part10[128:132] == b"DICM"
    assert part10[132:136] == b"\x02\x00\x00\x00" and part10[136:138] == b"UL"
    (group_length,) = struct.unpack("<I", part10[140:144])
    return 144 + group_length


def test_profiles_in_one_table() -> None:
    assert set(synth.PROFILES) == set(EXPECTED)
    for name, p in synth.PROFILES.items():
        assert p.name == name


@pytest.mark.parametrize("profile", list(EXPECTED))
def test_each_profile_parses_with_expected_header(firsts: dict[str, synth.SynthInstance], profile: str) -> None:
    inst = firsts[profile]
    sop_class, rows, cols, frames, bits_allocated, bits_stored, samples = EXPECTED[profile]
    ds = dcmread(DicomBytesIO(inst.part10_bytes()))
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian == inst.transfer_syntax_uid
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == inst.sop_instance_uid
    assert ds.SOPClassUID == sop_class == inst.sop_class_uid
    assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.SamplesPerPixel) == (
        rows, cols, bits_allocated, bits_stored, samples)
    assert int(ds.get("NumberOfFrames", 1)) == frames
    assert ds.HighBit == bits_stored - 1 and ds.PixelRepresentation == 0
    # the hierarchy, and UIDs under 2.25
    assert ds.PatientID == inst.patient_id and ds.PatientName
    assert ds.StudyInstanceUID == inst.study_instance_uid and ds.SeriesInstanceUID == inst.series_instance_uid
    for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
        assert uid.startswith("2.25.") and len(uid) <= 64 and uid.is_valid
    assert ds.InstanceNumber == 1 and ds.SeriesNumber >= 1 and ds.StudyDate and ds.AccessionNumber
    # private tags under their creator
    block = ds.private_block(synth.PRIVATE_GROUP, synth.PRIVATE_CREATOR)
    assert block[0x10].value == profile and block[0x11].value == 0
    # modality-specific geometry / presentation
    if profile in ("ct", "mr", "mr320"):
        assert len(ds.ImagePositionPatient) == 3 and list(map(float, ds.ImageOrientationPatient)) == [1, 0, 0, 0, 1, 0]
        assert len(ds.PixelSpacing) == 2 and ds.WindowCenter is not None
        if profile == "ct":
            assert float(ds.RescaleIntercept) == -1024 and ds.RescaleType == "HU"
    elif profile in ("dx", "mg"):
        assert ds.PresentationIntentType == "FOR PRESENTATION"
        assert len(ds.ImagerPixelSpacing) == 2 and len(ds.PatientOrientation) == 2 and ds.ViewPosition
        assert float(ds.RescaleSlope) == 1 and ds.WindowWidth is not None
    else:
        assert ds.PhotometricInterpretation == "RGB" and ds.FrameIncrementPointer == 0x00181063
    # pixel data: the right shape and not constant, within the stored bits
    arr = ds.pixel_array
    expected_shape: tuple[int, ...] = (rows, cols) if frames == 1 else (frames, rows, cols, samples)
    assert arr.shape == expected_shape
    assert arr.std() > 10 and int(arr.max()) <= (1 << bits_stored) - 1
    assert len(np.unique(arr[..., ::7, ::7] if arr.ndim == 2 else arr[0, ::7, ::7, 0])) > 50


@pytest.mark.parametrize("profile", list(EXPECTED))
def test_same_seed_same_bytes(firsts: dict[str, synth.SynthInstance], profile: str) -> None:
    synth.clear_caches()  # regenerate the phantoms and noise too, not only the headers
    assert one(profile) == firsts[profile]


def test_same_seed_same_bytes_over_a_burst() -> None:
    a = [i.dataset_bytes for i in synth.iter_instances("mr", 5, 7, "rle")]
    b = [i.dataset_bytes for i in synth.iter_instances("mr", 5, 7, "rle")]
    assert a == b and len(set(a)) == 5  # and every instance differs from the others


@pytest.mark.parametrize("profile", ["ct", "mr", "dx", "us"])
def test_different_seed_differs(firsts: dict[str, synth.SynthInstance], profile: str) -> None:
    a, b = firsts[profile], one(profile, seed=2)
    assert a.dataset_bytes != b.dataset_bytes
    assert a.sop_instance_uid != b.sop_instance_uid and a.study_instance_uid != b.study_instance_uid
    assert not np.array_equal(a.dataset().pixel_array, b.dataset().pixel_array)


@pytest.mark.parametrize("ts", COMPRESSED + ["implicit"])
@pytest.mark.parametrize("profile", list(EXPECTED))
def test_compressed_decodes_to_the_uncompressed_pixels(profile: str, ts: str) -> None:
    if not synth.available_transfer_syntaxes()[ts]:
        pytest.skip(f"no encoder for {ts} installed")
    # DX and MG at a smaller matrix: the codec round trip does not need 20 MB images
    kw = {"size": 256} if profile in ("dx", "mg") else {}
    plain, packed = one(profile, **kw), one(profile, ts=ts, **kw)
    assert packed.transfer_syntax_uid == synth.TRANSFER_SYNTAXES[ts] != plain.transfer_syntax_uid
    ds = packed.dataset()
    assert ds.file_meta.TransferSyntaxUID == synth.TRANSFER_SYNTAXES[ts]
    if ts != "implicit":
        assert ds["PixelData"].is_undefined_length  # encapsulated
        assert len(packed.dataset_bytes) < len(plain.dataset_bytes)
    np.testing.assert_array_equal(ds.pixel_array, plain.dataset().pixel_array)
    # the header is the same apart from the UIDs and the pixel data
    reference = plain.dataset()
    for keyword in ("Rows", "Columns", "BitsStored", "PhotometricInterpretation", "Modality", "PatientName"):
        assert ds.get(keyword) is not None and (keyword == "PatientName" or ds.get(keyword) == reference.get(keyword))


def test_dx_and_mg_full_size_rle_roundtrip(firsts: dict[str, synth.SynthInstance]) -> None:
    for profile in ("dx",):  # one big image through the real matrix (MG's is covered by the header test)
        packed = one(profile, ts="rle")
        np.testing.assert_array_equal(packed.dataset().pixel_array, firsts[profile].dataset().pixel_array)


def test_stream_equals_the_dataset_of_the_written_files(tmp_path: Path) -> None:
    for profile, count, ts, kw in (("ct", 3, None, {}), ("mr", 2, "rle", {}), ("us", 1, "jpegls", {"frames": 2})):
        if ts and not synth.available_transfer_syntaxes()[ts]:
            continue
        folder = tmp_path / profile
        paths = synth.write_folder(profile, count, 5, ts, folder, **kw)
        streamed = list(synth.iter_instances(profile, count, 5, ts, **kw))
        assert len(paths) == len(streamed) == count
        for path, inst in zip(paths, streamed, strict=True):
            raw = path.read_bytes()
            assert raw[dataset_offset(raw):] == inst.dataset_bytes
            assert raw == inst.part10_bytes()
            ds = dcmread(path)
            assert ds.SOPInstanceUID == inst.sop_instance_uid
            assert ds.file_meta.TransferSyntaxUID == inst.transfer_syntax_uid


def test_dataset_bytes_have_no_file_meta(firsts: dict[str, synth.SynthInstance]) -> None:
    data = firsts["ct"].dataset_bytes
    assert b"DICM" not in data[:200]
    (group,) = struct.unpack("<H", data[:2])
    assert group == 0x0008  # Explicit VR LE dataset starting at (0008,0005) Specific Character Set
    implicit = one("ct", ts="implicit")
    assert implicit.transfer_syntax_uid == ImplicitVRLittleEndian
    assert implicit.dataset_bytes[4:8] == struct.pack("<I", len("ISO_IR 100"))  # implicit: 4-byte length, no VR


def test_hierarchy_studies_and_series() -> None:
    mr = synth.get_profile("mr")
    insts = list(synth.iter_instances(dataclasses.replace(mr, series_size=2), 5, 1))
    assert len({i.study_instance_uid for i in insts}) == 1
    assert [i.series_instance_uid for i in insts].count(insts[0].series_instance_uid) == 2
    assert len({i.series_instance_uid for i in insts}) == 3
    assert len({i.sop_instance_uid for i in insts}) == 5
    numbers = [(ds.SeriesNumber, ds.InstanceNumber) for ds in (i.dataset() for i in insts)]
    assert numbers == [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1)]
    dx = list(synth.iter_instances("dx", 4, 1, size=256))  # two views per study, a new patient per study
    assert len({i.study_instance_uid for i in dx}) == 2 and len({i.patient_id for i in dx}) == 2
    assert len({i.series_instance_uid for i in dx}) == 4
    assert [i.dataset().ViewPosition for i in dx] == ["PA", "LL", "PA", "LL"]
    mg = [i.dataset() for i in synth.iter_instances("mg", 4, 1, size=256)]
    assert [(ds.ImageLaterality, ds.ViewPosition) for ds in mg] == [("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO")]
    # CT slices along z
    zs = [float(i.dataset().ImagePositionPatient[2]) for i in synth.iter_instances("ct", 3, 1)]
    assert zs == [0.0, -1.0, -2.0]


def test_cache_keys_load_or_generate_and_split(tmp_path: Path) -> None:
    assert synth.ct_spec().key == f"ct-n600-512x512-ser600-s1-v{synth.GENERATOR_VERSION}"
    assert synth.mr_spec(ts="rle").key == f"mr-n2000-256x256-ser200-s1-v{synth.GENERATOR_VERSION}-rle"
    spec = synth.ct_spec(count=4, size=64, seed=3)
    burst = synth.load_or_generate(spec, tmp_path, log=False)
    assert len(burst.files) == 4 and burst.total_bytes == sum(f.stat().st_size for f in burst.files)
    streamed = list(synth.iter_instances(spec.profile, 4, 3))
    assert [f.read_bytes() for f in burst.files] == [i.part10_bytes() for i in streamed]
    folders = synth.split(burst, 2)
    assert [sorted(p.name for p in f.iterdir()) for f in folders] == [["ct1.dcm", "ct2.dcm"], ["ct3.dcm", "ct4.dcm"]]
    again = synth.load_or_generate(spec, tmp_path, log=False)  # from the cache
    assert again.files == burst.files
    us = synth.profile_spec("us", 1, ts="rle", frames=2)
    assert us.key.endswith("-rle-f2") and us.profile.frames == 2


def test_cli_out_and_kind_alias(tmp_path: Path) -> None:
    assert synth.main(["--kind", "mr", "--count", "2", "--size", "64", "--out", str(tmp_path / "a")]) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["mr1.dcm", "mr2.dcm"]
    assert synth.main(["--profile", "us", "--count", "1", "--frames", "2", "--ts", "rle", "--seed", "4",
                       "--out", str(tmp_path / "b")]) == 0
    ds = dcmread(tmp_path / "b" / "us1.dcm")
    assert ds.NumberOfFrames == 2 and ds.file_meta.TransferSyntaxUID == synth.TRANSFER_SYNTAXES["rle"]
    assert synth.main(["--list"]) == 0


def test_unknown_transfer_syntax_is_refused() -> None:
    with pytest.raises(ValueError):
        synth.ts_uid("jpeg-xl")
    with pytest.raises(ValueError):
        synth.get_profile("ct", frames=3)


def test_same_bytes_in_another_process(firsts: dict[str, synth.SynthInstance]) -> None:
    """Nothing depends on the process (hash randomisation, import order, caches)."""
    import hashlib
    import os
    import subprocess
    import sys

    code = ("import hashlib; from bench import synth; "
            "print(hashlib.sha256(next(synth.iter_instances('us', 1, 1, None, frames=3)).part10_bytes()).hexdigest())")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout.strip()
    assert out == hashlib.sha256(firsts["us"].part10_bytes()).hexdigest()
