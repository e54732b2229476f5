"""The C-FIND fast response encoder (appliance/query/encoding.py) writes exactly what pydicom writes, on generated
records, in both little-endian syntaxes, with and without a Specific Character Set; and steps aside when it must."""

from __future__ import annotations

import random
import string

import pytest
from pynetdicom.dsutils import decode

from appliance.dicom.uids import PATIENT_ROOT_FIND, STUDY_ROOT_FIND
from appliance.query.encoding import encode_match, fast_response
from appliance.query.identifier import Query, QueryKey, _tag_of, encode_response, response_dataset

KEYS = {
    "STUDY": [("StudyInstanceUID", "UI"), ("PatientID", "LO"), ("PatientName", "PN"), ("PatientBirthDate", "DA"),
              ("StudyDate", "DA"), ("StudyTime", "TM"), ("AccessionNumber", "SH"), ("StudyDescription", "LO"),
              ("ModalitiesInStudy", "CS"), ("NumberOfStudyRelatedInstances", "IS"), ("RetrieveAETitle", "AE"),
              ("InstanceAvailability", "CS"), ("ReferringPhysicianName", "PN"), ("SOPClassesInStudy", "UI")],
    "SERIES": [("SeriesInstanceUID", "UI"), ("Modality", "CS"), ("SeriesNumber", "IS"), ("SeriesDescription", "LO"),
               ("NumberOfSeriesRelatedInstances", "IS")],
}


def text(rng: random.Random, alphabet: str, most: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, most)))


def record_for(rng: random.Random, keys: list[tuple[str, str]]) -> dict[str, str]:
    values = {
        "UI": lambda: ".".join(str(rng.randint(0, 99999)) for _ in range(rng.randint(1, 9))),
        "DA": lambda: f"{rng.randint(1900, 2100)}{rng.randint(1, 12):02}{rng.randint(1, 28):02}",
        "TM": lambda: rng.choice(["", "12", "1230", "123045", "123045.5", "123045.123456"]),
        "IS": lambda: str(rng.randint(-5, 100000)),
        "CS": lambda: "\\".join(text(rng, string.ascii_uppercase + "_ ", 8).strip() or "CT" for _ in range(
            rng.randint(1, 3))),
        "AE": lambda: text(rng, string.ascii_uppercase, 16) or "AE",
    }
    out = {}
    for keyword, vr in keys:
        if rng.random() < 0.2:
            continue  # not in the record: returned empty
        make = values.get(vr, lambda: text(rng, string.ascii_letters + string.digits + " ^-.'", 40).strip())
        out[keyword] = make()
    return out


@pytest.mark.parametrize("implicit", [True, False])
@pytest.mark.parametrize("charsets", [[], ["ISO_IR 100"], ["ISO_IR 192"], ["", "ISO 2022 IR 87"]])
@pytest.mark.parametrize("level", ["STUDY", "SERIES"])
def test_fast_path_writes_what_pydicom_writes(implicit: bool, charsets: list[str], level: str) -> None:
    rng = random.Random(f"{implicit}{charsets}{level}")
    for _ in range(200):
        keys = rng.sample(KEYS[level], rng.randint(1, len(KEYS[level])))
        query = Query(STUDY_ROOT_FIND if rng.random() < 0.5 else PATIENT_ROOT_FIND, level,
                      [QueryKey(k, _tag_of(k), vr, "") for k, vr in keys], charsets)
        record = record_for(rng, KEYS[level])
        fast = fast_response(query, record, implicit)
        assert fast is not None
        assert fast == encode_response(response_dataset(query, record), query, implicit, True, False), record


def test_what_the_fast_path_leaves_to_pydicom() -> None:
    keys = [QueryKey(k, _tag_of(k), vr, "") for k, vr in KEYS["STUDY"]]
    query = Query(STUDY_ROOT_FIND, "STUDY", keys, [])
    assert fast_response(query, {"PatientName": "MÜLLER^HANS"}, True) is None  # needs a character set
    assert fast_response(query, {"NumberOfStudyRelatedInstances": "abc"}, True) is None  # not an IS
    sequence = Query(STUDY_ROOT_FIND, "STUDY", [QueryKey("", 0x00081110, "SQ", "", sequence=True)], [])
    assert fast_response(sequence, {}, True) is None
    # ... and the answer is then pydicom's, decodable, in UTF-8 for a name the default repertoire lacks.
    encoded = encode_match(query, {"PatientName": "MÜLLER^HANS", "StudyInstanceUID": "1.2.3"}, False, True, False)
    ds = decode(__import__("io").BytesIO(encoded), False, True)
    assert str(ds.PatientName) == "MÜLLER^HANS" and ds.SpecificCharacterSet == "ISO_IR 192"
