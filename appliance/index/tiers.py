"""The index's side of tiering (schema 4): where each study is placed, the journal of moves in progress, the queue
of recalls, and the switch that moves a study between tiers in one transaction.

Tables (study key = ``pk NUL study_uid``, as in ``studies``):

- ``placement``: StudyPlacement; absent = online and never moved (and never read since received);
- ``moves``: MoveRecord, from the mover's journal entry (before its first copy) to the switch that completes it;
- ``recalls``: RecallRecord, from a request to the switch that brings the study back online.

The index never decides what moves and knows nothing of the config: tiering/ (the planner, the mover, the recaller)
decides, and tells ``switch_study`` which copies were added, which backends to drop and each instance's
availability."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import lmdb

from appliance.index import schema
from appliance.index.containers import ContainerIndex
from appliance.index.env import SEP, container_key
from appliance.index.schema import (
    ONLINE,
    ONLINE_TIER,
    BlobRecord,
    Copy,
    InstanceRecord,
    LevelRecord,
    MoveRecord,
    RecallRecord,
    StudyFacts,
    StudyPlacement,
)

# Studies read per read transaction by study_facts: a walk over every study must not pin LMDB's old pages for long
# while ingest goes on.
FACTS_BATCH = 256


class TierIndex(ContainerIndex):
    # ---- placement and access --------------------------------------------------------------------------

    def _placement(self, txn: lmdb.Transaction, study_key: str) -> StudyPlacement | None:
        raw = txn.get(study_key.encode(), db=self.dbs["placement"])
        return None if raw is None else schema.decode(StudyPlacement, raw)

    def placement(self, study_key: str) -> StudyPlacement:
        with self.env.begin() as txn:
            return self._placement(txn, study_key) or StudyPlacement(ONLINE_TIER, 0, 0)

    def record_access(self, study_uids_ns: dict[str, int]) -> int:
        """Last-access times of studies (by Study Instance UID), batched by the caller (retrieve, export): one
        transaction for the batch. A time only moves forward; unknown UIDs are ignored. Returns how many rows
        changed."""

        def body(txn: lmdb.Transaction) -> int:
            changed = 0
            for uid, when_ns in study_uids_ns.items():
                found = txn.get(uid.encode(), db=self.dbs["uids"])
                if found is None or bytes(found[:1]) != b"S":
                    continue
                study_key = bytes(found[1:]).decode()
                place = self._placement(txn, study_key) or StudyPlacement(ONLINE_TIER, 0, 0)
                if when_ns > place.last_access_ns:
                    place.last_access_ns = when_ns
                    txn.put(study_key.encode(), schema.encode(place), db=self.dbs["placement"])
                    changed += 1
            return changed

        changed: int = self._write(body) if study_uids_ns else 0
        return changed

    # ---- what the planner reads ------------------------------------------------------------------------

    def study_facts(self) -> Iterator[StudyFacts]:
        """Every study with what the policies filter on, in study-key order, FACTS_BATCH studies per short read
        transaction. Reads each study's instances (calling AEs, availability): one pass over the index."""
        after = b""
        while True:
            batch: list[StudyFacts] = []
            with self.env.begin() as txn:
                cursor = txn.cursor(db=self.dbs["studies"])
                found = cursor.set_range(after) if after else cursor.first()
                while found and len(batch) < FACTS_BATCH:
                    key = bytes(cursor.key())
                    if key != after:
                        batch.append(self._facts(txn, key.decode(), schema.decode(LevelRecord, cursor.value())))
                    found = cursor.next()
            if not batch:
                return
            yield from batch
            after = batch[-1].key.encode()

    def _facts(self, txn: lmdb.Transaction, study_key: str, study: LevelRecord) -> StudyFacts:
        place = self._placement(txn, study_key) or StudyPlacement(ONLINE_TIER, 0, 0)
        aes: set[str] = set()
        online = False
        for _key, raw in self._scan(txn, "instances", study_key + SEP):
            inst = schema.decode(InstanceRecord, raw)
            aes.add(inst.calling_ae)
            online = online or inst.availability == ONLINE
        key = study_key.encode()
        return StudyFacts(
            key=study_key, uid=study_key.split(SEP, 1)[1], bytes=study.size, instances=study.instances,
            latest_ns=study.latest_ns, modalities=tuple(study.modalities), calling_aes=tuple(sorted(aes)),
            tier=place.tier, since_ns=place.since_ns, last_access_ns=place.last_access_ns,
            partly_online=place.tier != ONLINE_TIER and online,
            moving=txn.get(key, db=self.dbs["moves"]) is not None,
            recall_queued=txn.get(key, db=self.dbs["recalls"]) is not None)

    def study_key(self, study_uid: str) -> str | None:
        with self.env.begin() as txn:
            found = txn.get(study_uid.encode(), db=self.dbs["uids"])
            return bytes(found[1:]).decode() if found is not None and bytes(found[:1]) == b"S" else None

    def study_blobs(self, study_key: str) -> list[tuple[str, str, BlobRecord, InstanceRecord]]:
        """(sop_uid, digest, blob record, instance record) of every instance of a study, in one read transaction."""
        with self.env.begin() as txn:
            out = []
            for key, raw in self._scan(txn, "instances", study_key + SEP):
                inst = schema.decode(InstanceRecord, raw)
                blob = self._blob(txn, inst.digest)
                assert blob is not None, f"an instance names a blob without a record: {inst.digest}"
                out.append((key.rsplit(SEP, 1)[1], inst.digest, blob, inst))
            return out

    # ---- the mover's journal ---------------------------------------------------------------------------

    def begin_move(self, study_key: str, move: MoveRecord) -> None:
        """Journal a move before its first copy; durable on return (the index is opened with sync by movers)."""
        self._write(lambda txn: txn.put(study_key.encode(), schema.encode(move), db=self.dbs["moves"]))
        self.sync()

    def moves(self) -> list[tuple[str, MoveRecord]]:
        with self.env.begin() as txn:
            return [(k, schema.decode(MoveRecord, v)) for k, v in self._scan(txn, "moves", "")]

    def forget_move(self, study_key: str) -> None:
        """Drop a journaled move that will not be done (the study vanished, the move was refused)."""
        self._write(lambda txn: txn.delete(study_key.encode(), db=self.dbs["moves"]))
        self.sync()

    def forget_container(self, backend: str, name: str) -> bool:
        """Drop the record of a container that holds nothing live (a failed or redone move's, once its file is
        removed). False, and nothing changes, when something in it is named."""

        def body(txn: lmdb.Transaction) -> bool:
            rec = self._container(txn, backend, name)
            if rec is None:
                return True
            if rec.live_records:
                return False
            txn.delete(container_key(backend, name), db=self.dbs["containers"])
            return True

        forgotten: bool = self._write(body)
        return forgotten

    # ---- the switch ------------------------------------------------------------------------------------

    def switch_study(self, study_key: str, added: dict[str, Copy], drop_backends: set[str],
                     availability: dict[str, str] | Callable[[list[str]], str], tier: str, now_ns: int,
                     move_done: bool) -> dict[str, int]:
        """Move a study between tiers, in ONE durable write transaction:

        - each blob of ``added`` gains its new copy (container accounting follows); a blob freed meanwhile is
          skipped (compare-and-swap: its new bytes stay dead in their container);
        - each blob of the study drops its copies on ``drop_backends``, but only when a copy on another backend
          remains and no other study's instance names the same bytes: an instance received after the mover read
          the study (its only copy online) is left where it is, and stays ONLINE;
        - containers left with nothing live, once sealed, are forgotten and get a ``gc`` row (an active segment
          still being written is left for compaction);
        - each switched instance's availability is set from ``availability``: a function of the backends of its
          blob's copies as this transaction leaves them (what the mover and the recaller pass: another process
          may have switched the study since they read it, e.g. a mover and the recaller on one study), or a
          dict by SOP Instance UID (trusted as given);
        - the placement becomes ``tier`` since ``now_ns``; ``move_done`` (a mover) deletes the move journal and
          keeps the last access; otherwise (a recall) deletes the recall request and sets last access to
          ``now_ns``, so the policies take the study down again only after it has been left alone.

        Returns counts: added, dropped, kept (instances not switched), skipped (blobs freed meanwhile)."""

        def body(txn: lmdb.Transaction) -> dict[str, int]:
            counts = {"added": 0, "dropped": 0, "kept": 0, "skipped": 0}
            for digest, copy in added.items():
                blob = self._blob(txn, digest)
                if blob is None:
                    counts["skipped"] += 1
                    continue
                if any(c.backend == copy.backend and c.location == copy.location for c in blob.copies):
                    continue  # already named (a redo of a switch that happened)
                blob.copies = [*blob.copies, copy]
                self._count_copy(txn, digest, copy, +1)
                self._put_blob(txn, digest, blob)
                counts["added"] += 1
            instances = [(key, schema.decode(InstanceRecord, raw))
                         for key, raw in self._scan(txn, "instances", study_key + SEP)]
            refs_in_study: dict[str, int] = {}
            for _key, inst in instances:
                refs_in_study[inst.digest] = refs_in_study.get(inst.digest, 0) + 1
            emptied: set[tuple[str, str]] = set()
            switched: dict[str, list[str]] = {}  # digest -> the backends of its copies after the switch
            for digest in refs_in_study:
                blob = self._blob(txn, digest)
                assert blob is not None, f"an instance names a blob without a record: {digest}"
                keep = [c for c in blob.copies if c.backend not in drop_backends]
                if not keep or blob.refs > refs_in_study[digest]:
                    continue
                switched[digest] = [c.backend for c in keep]
                if len(keep) == len(blob.copies):
                    continue
                for copy in blob.copies:
                    if copy.backend in drop_backends:
                        self._count_copy(txn, digest, copy, -1)
                        emptied.add((copy.backend, copy.container))
                        counts["dropped"] += 1
                blob.copies = keep
                self._put_blob(txn, digest, blob)
            for backend, name in sorted(emptied):
                rec = self._container(txn, backend, name)
                if rec is not None and rec.live_records == 0 and rec.sealed:
                    txn.delete(container_key(backend, name), db=self.dbs["containers"])
                    txn.put(container_key(backend, name), b"", db=self.dbs["gc"])
            for key, inst in instances:
                sop_uid = key.rsplit(SEP, 1)[1]
                if inst.digest not in switched:
                    counts["kept"] += 1
                    continue
                wanted = (availability(switched[inst.digest]) if callable(availability)
                          else availability.get(sop_uid))
                if wanted is not None and wanted != inst.availability:
                    inst.availability = wanted
                    txn.put(key.encode(), schema.encode(inst), db=self.dbs["instances"])
            if switched:
                old = self._placement(txn, study_key) or StudyPlacement(ONLINE_TIER, 0, 0)
                place = StudyPlacement(tier, now_ns, old.last_access_ns if move_done else now_ns)
                txn.put(study_key.encode(), schema.encode(place), db=self.dbs["placement"])
            elif not instances:  # the study was deleted meanwhile
                txn.delete(study_key.encode(), db=self.dbs["placement"])
            txn.delete(study_key.encode(), db=self.dbs["moves" if move_done else "recalls"])
            return counts

        counts: dict[str, int] = self._write(body)
        self.sync()  # durable before any source container is deleted
        return counts

    # ---- `index rebuild --from-tier` -------------------------------------------------------------------

    def place_rebuilt_studies(self, availability: Callable[[list[str]], str], tier_of: Callable[[str], str],
                              order: list[str]) -> dict[str, int]:
        """After a rebuild's replay (every instance ONLINE by default): each instance's availability from its blob's
        copies, and each study's placement: the fastest tier holding the instances that have no online copy
        (none: the study is online; some online, some not: placed on the tier and ``partly_online``, as a live
        index has a study that received instances after its move). ``since_ns`` is the last reception among
        those instances (the archives do not keep the time of the move). FACTS_BATCH studies per write
        transaction. ``order``: tier names fastest first. Returns studies per tier."""
        rank = {tier: i for i, tier in enumerate(order)}
        placed: dict[str, int] = {}
        after = b""

        def body(txn: lmdb.Transaction) -> tuple[bytes, list[str]]:
            cursor = txn.cursor(db=self.dbs["studies"])
            found = cursor.set_range(after) if after else cursor.first()
            keys: list[bytes] = []
            while found and len(keys) < FACTS_BATCH:
                if bytes(cursor.key()) != after:
                    keys.append(bytes(cursor.key()))
                found = cursor.next()
            tiers = [self._place_rebuilt(txn, key.decode(), availability, tier_of, rank) for key in keys]
            return (keys[-1] if keys else b""), tiers

        while True:
            last, tiers = self._write(body)
            if not last:
                return placed
            for tier in tiers:
                placed[tier] = placed.get(tier, 0) + 1
            after = last

    def _place_rebuilt(self, txn: lmdb.Transaction, study_key: str, availability: Callable[[list[str]], str],
                       tier_of: Callable[[str], str], rank: dict[str, int]) -> str:
        below: str | None = None
        since_ns = 0
        instances = [(key, schema.decode(InstanceRecord, raw))
                     for key, raw in self._scan(txn, "instances", study_key + SEP)]
        for key, inst in instances:
            blob = self._blob(txn, inst.digest)
            assert blob is not None, f"an instance names a blob without a record: {inst.digest}"
            backends = [c.backend for c in blob.copies]
            wanted = availability(backends)
            if wanted != inst.availability:
                inst.availability = wanted
                txn.put(key.encode(), schema.encode(inst), db=self.dbs["instances"])
            tiers = {tier_of(backend) for backend in backends}
            if not tiers or ONLINE_TIER in tiers:
                continue
            fastest = min(tiers, key=lambda t: rank.get(t, len(rank)))
            if below is None or rank.get(fastest, len(rank)) < rank.get(below, len(rank)):
                below = fastest
            since_ns = max(since_ns, inst.received_ns)
        if below is None:
            return ONLINE_TIER
        txn.put(study_key.encode(), schema.encode(StudyPlacement(below, since_ns, 0)), db=self.dbs["placement"])
        return below

    # ---- recalls ---------------------------------------------------------------------------------------

    def request_recall(self, study_key: str, by: str, queue_max: int = 10_000) -> bool:
        """Queue a study for recall (idempotent: a queued study stays queued as it was). False when the queue
        already holds ``queue_max`` studies (tiering.recall_queue_max)."""

        def body(txn: lmdb.Transaction) -> bool:
            key = study_key.encode()
            if txn.get(key, db=self.dbs["recalls"]) is not None:
                return True
            if txn.stat(self.dbs["recalls"])["entries"] >= queue_max:
                return False
            txn.put(key, schema.encode(RecallRecord(time.time_ns(), by)), db=self.dbs["recalls"])
            return True

        queued: bool = self._write(body)
        return queued

    def recall_queued(self, study_key: str) -> bool:
        with self.env.begin() as txn:
            return txn.get(study_key.encode(), db=self.dbs["recalls"]) is not None

    def recalls(self) -> list[tuple[str, RecallRecord]]:
        with self.env.begin() as txn:
            return [(k, schema.decode(RecallRecord, v)) for k, v in self._scan(txn, "recalls", "")]

    def recall_failed(self, study_key: str, error: str) -> None:
        """Count a failed attempt and keep the error for `tier status`; the recall stays queued."""

        def body(txn: lmdb.Transaction) -> None:
            raw = txn.get(study_key.encode(), db=self.dbs["recalls"])
            if raw is None:
                return
            rec = schema.decode(RecallRecord, raw)
            rec.attempts += 1
            rec.error = error
            txn.put(study_key.encode(), schema.encode(rec), db=self.dbs["recalls"])

        self._write(body)

    def forget_recall(self, study_key: str) -> None:
        """Drop a queued recall that cannot be done (the study was deleted)."""
        self._write(lambda txn: txn.delete(study_key.encode(), db=self.dbs["recalls"]))
