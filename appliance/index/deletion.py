"""Deleting on purpose (`appliance delete`, the retention rule) and the legal holds that forbid it.

A delete removes index entries only, in ONE write transaction that is synced before it returns (invariant 4: the
index stops naming the bytes before anything deletes them). The records become dead bytes: an online segment's
live bytes drop as an overwrite's do and compaction reclaims them; a tier archive (nearline, S3) left with nothing
live gets a ``gc`` row and the next `tier run` removes it; an archive that still holds other studies keeps the
dead members until it is emptied; a tape cartridge keeps them until it is recycled (never read again: the index
no longer names them).

``holds`` (schema 5): Study Instance UID -> HoldRecord. Checked inside the deleting transaction, so a hold placed
by another process is never raced past.

``tombstones`` (schema 5): SOP Instance UID -> when it was deleted. The dead records stay in the segments (and
archives) until compaction, and `index rebuild` replays every record: it skips each record of a tombstoned
instance received before its delete (whatever version: an older overwritten one too), so a delete sticks; an
instance sent again after the delete is received later and stored again. One small row per deleted instance,
kept for good (which records are gone from every segment and tier is not known cheaply).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

import lmdb
import msgspec

from appliance.errors import Changed, OnHold
from appliance.index import schema
from appliance.index.env import SEP, container_key
from appliance.index.schema import InstanceRecord
from appliance.index.tiers import TierIndex

LEVEL_NAMES = {"S": "study", "R": "series", "I": "instance"}


class HoldRecord(msgspec.Struct):
    since_ns: int
    by: str  # the OS user who placed it
    reason: str = ""


@dataclass
class Deletion:
    """What a delete of one UID removes (or would remove): counts and bytes, and the copies per backend."""

    uid: str
    level: str  # "study", "series" or "instance"
    study_uid: str
    instances: int = 0
    bytes: int = 0
    copies: dict[str, int] = field(default_factory=dict)  # backend (volume or tier name) -> copies named
    # The instances it names and their content (a digest of their keys and blob digests): a preview and the delete
    # after its confirmation compare it, so that "yes" never deletes instances the person was not shown.
    members: str = ""

    def public(self) -> dict[str, object]:
        return {"uid": self.uid, "level": self.level, "study_uid": self.study_uid, "instances": self.instances,
                "bytes": self.bytes, "copies": dict(sorted(self.copies.items()))}


class DeletionIndex(TierIndex):
    """A mixin of StudyIndex (which provides ``_remove_instance``)."""

    def _remove_instance(self, txn: lmdb.Transaction, inst_key: str, old: InstanceRecord) -> None:
        raise NotImplementedError  # pragma: no cover (StudyIndex's)

    def _deletion(self, txn: lmdb.Transaction, uid: str) -> tuple[Deletion, list[tuple[str, InstanceRecord]]] | None:
        found = txn.get(uid.encode(), db=self.dbs["uids"])
        if found is None:
            return None
        letter, key = chr(found[0]), bytes(found[1:]).decode()
        if letter == "I":
            rec = self._instance(txn, key)
            rows = [(key, rec)] if rec is not None else []
        else:
            rows = [(k, schema.decode(InstanceRecord, v)) for k, v in self._scan(txn, "instances", key + SEP)]
        result = Deletion(uid, LEVEL_NAMES[letter], key.split(SEP)[1])
        members = hashlib.sha256()
        for inst_key, inst in sorted(rows, key=lambda row: row[0]):
            members.update(f"{inst_key}\0{inst.digest}\n".encode())
        result.members = members.hexdigest()
        for _key, inst in rows:
            result.instances += 1
            result.bytes += inst.size
            blob = self._blob(txn, inst.digest)
            for copy in blob.copies if blob is not None else ():
                result.copies[copy.backend] = result.copies.get(copy.backend, 0) + 1
        return result, rows

    def preview_delete(self, uid: str) -> Deletion | None:
        """What ``delete(uid)`` would remove now (None: the UID names nothing)."""
        with self.env.begin() as txn:
            found = self._deletion(txn, uid)
            return None if found is None else found[0]

    def delete(self, uid: str, online_backends: Collection[str], expect: Deletion | None = None) -> Deletion | None:
        """Remove a study, series or instance from the index in one durable transaction (None: nothing by that UID).
        Raises OnHold for a study under legal hold, and Changed when ``expect`` (a preview a person confirmed) no
        longer names the same instances. Emptied sealed containers of tiers (not in ``online_backends``, which
        compaction handles) are forgotten and queued in ``gc`` for the next `tier run`, as a move's are."""

        def body(txn: lmdb.Transaction) -> Deletion | None:
            found = self._deletion(txn, uid)
            if found is None:
                if expect is not None:
                    raise Changed(f"{uid} is no longer in the index (deleted meanwhile?): nothing deleted")
                return None
            result, rows = found
            if expect is not None and result.members != expect.members:
                raise Changed(f"{result.level} {uid} changed since the preview ({expect.instances} -> "
                              f"{result.instances} instance(s)): nothing deleted; run the command again")
            if txn.get(result.study_uid.encode(), db=self.dbs["holds"]) is not None:
                raise OnHold(f"study {result.study_uid} is under legal hold (appliance hold --release first)")
            emptied: set[tuple[str, str]] = set()
            # After every deleted record's receive time even if the clock stepped back since (NTP): rebuild skips
            # exactly the records received before it.
            deleted_ns = str(max(time.time_ns(), *(inst.received_ns + 1 for _key, inst in rows))).encode()
            for key, inst in rows:
                txn.put(key.rsplit(SEP, 1)[1].encode(), deleted_ns, db=self.dbs["tombstones"])
                blob = self._blob(txn, inst.digest)
                if blob is not None and blob.refs == 1:
                    emptied.update((c.backend, c.container) for c in blob.copies)
                self._remove_instance(txn, key, inst)
            for backend, name in sorted(emptied):
                rec = self._container(txn, backend, name)
                if backend not in online_backends and rec is not None and rec.live_records == 0 and rec.sealed:
                    txn.delete(container_key(backend, name), db=self.dbs["containers"])
                    txn.put(container_key(backend, name), b"", db=self.dbs["gc"])
            study_key = rows[0][0].rsplit(SEP, 2)[0] if rows else ""
            if study_key and txn.get(study_key.encode(), db=self.dbs["studies"]) is None:
                # The study is gone: its placement and a queued recall go with it. A journaled move stays: the
                # mover's redo finds the study vanished and forgets it (removing its partial container).
                txn.delete(study_key.encode(), db=self.dbs["placement"])
                txn.delete(study_key.encode(), db=self.dbs["recalls"])
            return result

        result: Deletion | None = self._write(body)
        self.sync()  # durable (meta page included) before compaction or a tier run may delete the bytes
        return result

    # ---- legal holds -----------------------------------------------------------------------------------

    def hold(self, study_uid: str, record: HoldRecord) -> bool:
        """Place a hold (False: already held; the first hold is kept). The study need not be indexed yet: a hold
        may precede the images (a litigation notice names a study still to come)."""

        def body(txn: lmdb.Transaction) -> bool:
            put: bool = txn.put(study_uid.encode(), schema.encode(record), db=self.dbs["holds"], overwrite=False)
            return put

        placed: bool = self._write(body)
        self.sync()
        return placed

    def release(self, study_uid: str) -> bool:
        """Release a hold (False: there was none)."""
        released: bool = self._write(lambda txn: txn.delete(study_uid.encode(), db=self.dbs["holds"]))
        self.sync()
        return released

    def holds(self) -> list[tuple[str, HoldRecord]]:
        with self.env.begin() as txn:
            return [(bytes(k).decode(), schema.decode(HoldRecord, v)) for k, v in txn.cursor(db=self.dbs["holds"])]

    def held(self, study_uid: str) -> bool:
        with self.env.begin() as txn:
            return txn.get(study_uid.encode(), db=self.dbs["holds"]) is not None

    # ---- tombstones ------------------------------------------------------------------------------------

    def tombstones(self) -> list[tuple[str, int]]:
        with self.env.begin() as txn:
            return [(bytes(k).decode(), int(bytes(v))) for k, v in txn.cursor(db=self.dbs["tombstones"])]

    def put_tombstones(self, rows: Iterable[tuple[str, int]]) -> None:
        """`index rebuild`: the live index's tombstones, carried over before the replay."""

        def body(txn: lmdb.Transaction) -> None:
            for sop_uid, deleted_ns in rows:
                txn.put(sop_uid.encode(), str(deleted_ns).encode(), db=self.dbs["tombstones"])

        self._write(body)
