"""The SCU commands' pieces without a peer: DCMTK-style keys, the identifier, peer resolution, the table."""

from __future__ import annotations

import pytest

from appliance import errors
from appliance.cli_scu import (
    UsageError,
    flatten,
    identifier,
    key_names,
    parse_keys,
    resolve_peer,
    table,
)
from appliance.config import Config, PeerConfig


def test_keys_as_dcmtk_writes_them() -> None:
    ds = parse_keys(["PatientName=DOE*", "0010,0020=123", "(0008,0020)=20260101-20261231", "StudyInstanceUID"])
    assert str(ds.PatientName) == "DOE*" and ds.PatientID == "123" and ds.StudyDate == "20260101-20261231"
    assert ds["StudyInstanceUID"].is_empty  # a return key
    assert key_names(["StudyDate", "0010,0020=1"]) == ["StudyDate", "PatientID"]


@pytest.mark.parametrize("key", ["NoSuchKeyword=1", "zzzz,0010=1", "0009,0010=1", "ReferencedSOPSequence"])
def test_keys_that_are_no_attribute_are_usage_errors(key: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_keys([key])
    assert caught.value.exit_code == errors.EXIT_USAGE


def test_identifier_level_and_default_return_keys() -> None:
    ds = identifier(["PatientID=1"], "study", defaults=True)
    assert ds.QueryRetrieveLevel == "STUDY" and "StudyInstanceUID" in ds and ds.PatientID == "1"
    ds = identifier(["QueryRetrieveLevel=SERIES", "StudyInstanceUID=1.2"], "STUDY", defaults=False)
    assert ds.QueryRetrieveLevel == "SERIES" and "Modality" not in ds  # a move/get sends only what was given
    with pytest.raises(UsageError):
        identifier([], "FRAME", defaults=False)


def test_resolve_peer() -> None:
    cfg = Config(peers=(PeerConfig("pacs", "PACS", "10.0.0.5", 104),))
    target = resolve_peer(cfg, "pacs", None, 11112, None)
    assert (target.ae_title, target.host, target.port) == ("PACS", "10.0.0.5", 11112)
    assert resolve_peer(cfg, None, "h", 1, "X").label == "X@h:1"
    with pytest.raises(errors.NotFound):
        resolve_peer(cfg, "nosuch", None, None, None)
    with pytest.raises(UsageError):
        resolve_peer(cfg, None, "h", None, "X")


def test_table_and_flatten() -> None:
    ds = parse_keys(["PatientName=DOE^JOHN", "ModalitiesInStudy=CT\\MR"])
    row = flatten(ds)
    assert row == {"PatientName": "DOE^JOHN", "ModalitiesInStudy": ["CT", "MR"]}
    lines = table([row], ["ModalitiesInStudy", "PatientName"]).splitlines()
    assert lines[0].split() == ["ModalitiesInStudy", "PatientName"] and lines[1].split() == ["CT,", "MR", "DOE^JOHN"]
