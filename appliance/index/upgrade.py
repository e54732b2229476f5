"""In-place upgrades. Schema 4 -> 5 (deletes, legal holds) only adds the empty ``holds`` and ``tombstones``
tables.

Schema 3 -> 4 (tiering) only adds the empty ``placement``, ``moves`` and ``recalls`` tables
(opening the index creates them) and writes the version: every study is then online and never moved, which is
what an absent placement row means.

Schema 2 -> 3 (C-FIND's needs): each study gets the PatientName of its
patient and the count of its instances per SOP class, and the new secondary indexes (idx_patientname,
idx_modality) are built. It runs once, in one write transaction, when the index is first opened for writing
by this version (`appliance serve` opens it so before any worker starts); a crash in the middle leaves the
version 2 index as it was, and the next start upgrades again.

Cost: one pass over the studies and one over the instances (the SOP classes), so about as long as reading the
index once: seconds for 100,000 instances, a minute or two at 1,000,000 on a disk-backed index.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lmdb

from appliance.index import schema
from appliance.index.schema import InstanceRecord, LevelRecord

SEP = "\x00"


def upgrade_from_2(dbs: dict[str, Any], txn: lmdb.Transaction,
                   secondary: Callable[[str, LevelRecord], list[tuple[str, str]]]) -> int:
    """Upgrade every study in ``txn``; returns how many studies were upgraded. Idempotent: a study already holding
    its SOP classes is rewritten to the same record. ``secondary`` gives a study's secondary index rows (the index's
    own rule, passed in so that this module does not import the index)."""
    sop_classes: dict[str, dict[str, int]] = {}
    for raw_key, value in txn.cursor(db=dbs["instances"]):
        pk, study_uid, _series, _sop = bytes(raw_key).decode().split(SEP)
        counts = sop_classes.setdefault(f"{pk}{SEP}{study_uid}", {})
        sop_class = schema.decode(InstanceRecord, value).attrs.get("SOPClassUID", "")
        counts[sop_class] = counts.get(sop_class, 0) + 1
    studies = [(bytes(k).decode(), schema.decode(LevelRecord, v)) for k, v in txn.cursor(db=dbs["studies"])]
    names: dict[str, str] = {}
    for study_key, study in studies:
        pk = study_key.split(SEP, 1)[0]
        if pk not in names:
            raw = txn.get(pk.encode(), db=dbs["patients"])
            names[pk] = schema.decode(LevelRecord, raw).attrs.get("PatientName", "") if raw is not None else ""
        study.attrs.setdefault("PatientName", names[pk])
        study.sop_classes = sop_classes.get(study_key, {})
        txn.put(study_key.encode(), schema.encode(study), db=dbs["studies"])
        for db, key in secondary(study_key, study):
            txn.put(key.encode(), study_key.encode(), db=dbs[db])
    txn.put(b"schema", schema.SCHEMA_VERSION, db=dbs["meta"])
    return len(studies)


def upgrade_from_3(dbs: dict[str, Any], txn: lmdb.Transaction) -> None:
    """The tiering tables exist (created empty when the environment opened them) and stay empty."""
    for name in ("placement", "moves", "recalls", "holds", "tombstones"):
        assert txn.stat(dbs[name])["entries"] == 0, f"a schema 3 index with a non-empty {name} table"
    txn.put(b"schema", schema.SCHEMA_VERSION, db=dbs["meta"])


def upgrade_from_4(dbs: dict[str, Any], txn: lmdb.Transaction) -> None:
    """Schema 4 -> 5 only adds the empty ``holds`` and ``tombstones`` tables (created when the environment opened
    them)."""
    for name in ("holds", "tombstones"):
        assert txn.stat(dbs[name])["entries"] == 0, f"a schema 4 index with a non-empty {name} table"
    txn.put(b"schema", schema.SCHEMA_VERSION, db=dbs["meta"])
