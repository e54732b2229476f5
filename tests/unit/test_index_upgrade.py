"""Schema 3 (C-FIND's secondary indexes): kept exact on the write path, and a schema 2 index upgraded in place."""

from __future__ import annotations

from pathlib import Path

import lmdb

from appliance.index import schema
from appliance.index.db import StudyIndex, name_key, name_keys
from appliance.index.env import SEP
from appliance.index.schema import LevelRecord
from bench.find import build_index


def rows(index: StudyIndex, db: str) -> list[str]:
    with index.env.begin() as txn:
        return [bytes(k).decode() for k, _ in txn.cursor(db=index.dbs[db])]


def test_name_keys() -> None:
    assert name_keys("Yamada^Tarou=山田^太郎=やまだ^たろう") == ["yamada^tarou", "やまだ^たろう", "山田^太郎"]
    assert name_keys("DOE^JOHN^^^") == ["doe^john"]
    assert name_keys("") == []
    assert len(name_key("Ä" * 500).encode()) <= 192


def downgrade_to_2(path: Path) -> None:
    """What a schema 2 index looked like: no PatientName or SOP classes on studies, no name/modality indexes."""
    env = lmdb.open(str(path), max_dbs=32)
    with env.begin(write=True) as txn:
        for name in (b"idx_patientname", b"idx_modality"):
            txn.drop(env.open_db(name, txn=txn), delete=True)
        studies = env.open_db(b"studies", txn=txn)
        for key, value in list(txn.cursor(db=studies)):
            record = schema.decode(LevelRecord, value)
            record.attrs.pop("PatientName", None)
            record.sop_classes = {}
            txn.put(key, schema.encode(record), db=studies)
        txn.put(b"schema", b"2", db=env.open_db(b"meta", txn=txn))
    env.close()


def test_schema_2_is_upgraded_in_place(tmp_path: Path) -> None:
    build_index(tmp_path / "index", 400, 4, progress=lambda _m: None)
    index = StudyIndex(tmp_path / "index")
    expected = index.dump()
    index.close()
    downgrade_to_2(tmp_path / "index")
    index = StudyIndex(tmp_path / "index")
    try:
        assert index.dump() == expected
        with index.env.begin() as txn:
            assert bytes(txn.get(b"schema", db=index.dbs["meta"])) == schema.SCHEMA_VERSION
        assert len(rows(index, "idx_modality")) == 100 and len(rows(index, "idx_patientname")) == 100
    finally:
        index.close()


def test_secondary_keys_follow_replacements(tmp_path: Path) -> None:
    """An instance replaced by one of another modality and SOP class: the study's modality row and SOP class
    count follow, without a rescan."""
    from tests.unit.test_index import entry, header

    index = StudyIndex(tmp_path / "index")
    try:
        index.apply([entry(header("P", "1.1", "1.1.1", "1.1.1.1", "CT"), "a", t=1)], "overwrite")
        assert rows(index, "idx_modality") == [f"CT{SEP}1.1"]
        replaced = header("P", "1.1", "1.1.2", "1.1.1.1", "MR")
        replaced.instance["SOPClassUID"] = "1.2.3"
        index.apply([entry(replaced, "b", t=2)], "overwrite")
        assert rows(index, "idx_modality") == [f"MR{SEP}1.1"]
        study = index.items("studies")[0][1]
        assert study["ModalitiesInStudy"] == ["MR"] and study["SOPClassesInStudy"] == ["1.2.3"]
    finally:
        index.close()
