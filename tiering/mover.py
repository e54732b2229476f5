"""The mover: one study at a time from one tier to a slower one, copy -> verify -> switch -> delete.

Per study (docs/tiering-internals.md, "Movers"):

1. journal: the target's new container (``begin_container``) is registered in the index and the move is journaled
   (``begin_move``, durable) before the first byte is written, so a crash never leaves a container the index
   cannot name;
2. copy every blob not yet on the target from its fastest readable copy (hashed on the way: a corrupt source is
   never copied), rate-limited by a token bucket on bytes read + written;
3. ``sync`` + ``publish`` on the target, then re-read and hash each new copy from the target;
4. ``switch_study``: one durable index transaction adds the new copies and drops those on the source tier and
   every faster one;
5. delete the source containers the switch left empty (``collect_garbage``; online segments are removed only once
   sealed, otherwise compaction reclaims their dead bytes).

A crash anywhere before 4 leaves the journal: ``resume`` removes the journaled container and redoes the move.
A crash after 4 leaves ``gc`` rows: ``resume`` deletes those containers. Nothing is indexed twice, because the
switch is one transaction and a redo of it is a no-op.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from appliance.audit import MINOR_FAILURE, SERIOUS_FAILURE, SUCCESS, write_once
from appliance.config import Config
from appliance.config_tiering import ONLINE_TIER
from appliance.errors import ApplianceError, BlobMissing, StorageFault, TierUnavailable
from appliance.index.db import StudyIndex
from appliance.index.schema import COPY_OK, BlobRecord, Copy, InstanceRecord, MoveRecord
from appliance.store.backend import BlobBackend, BlobMeta, BlobSource, LatencyClass, Location
from appliance.store.segments import SegmentBackend, segment_copy
from tiering.archive import BLOCK, parse_location
from tiering.audit import AuditLog
from tiering.policy import PlannedMove
from tiering.tiers import availability_of, tier_order

log = logging.getLogger(__name__)

COPY_CHUNK_BYTES = 1 << 20
# Test-only: the mover kills itself (SIGKILL) when it reaches this phase (journaled, copying, synced, switched), so
# the crash tests can stop it at each step. Unset in production.
CRASH_ENV = "APPLIANCE_TIER_CRASH_AT"
PHASES = ("journaled", "copying", "synced", "switched")


class CopyCorrupt(ApplianceError):
    """A copy read for a move (source or new) does not hash to its digest: the move fails, nothing is switched."""


class TokenBucket:
    """A byte budget per second with one second of burst. ``clock`` and ``sleep`` are injected for tests."""

    def __init__(self, rate_bytes_per_s: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        assert rate_bytes_per_s > 0
        self.rate = float(rate_bytes_per_s)
        self.clock, self.sleep = clock, sleep
        self.tokens = self.rate
        self.stamp = clock()

    def take(self, nbytes: int) -> None:
        """Wait until ``nbytes`` fit in the budget (a request above the burst waits for its share, then passes)."""
        now = self.clock()
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= nbytes
        if self.tokens < 0:
            self.sleep(-self.tokens / self.rate)


def copy_of(backend: BlobBackend, location: Location, received_ns: int) -> Copy:
    """The index Copy of a blob just put: segments know their own record size; an archive location is
    ``container:record_offset:data_offset:stored_bytes:size`` (tiering-internals.md) and the copy occupies its headers
    and its data padded to 512."""
    if isinstance(backend, SegmentBackend):
        return segment_copy(backend.name, location, received_ns)
    container, record, data, stored, _size = location.rsplit(":", 4)
    padded = -(-int(stored) // BLOCK) * BLOCK
    return Copy(backend.name, container, location, int(data) - int(record) + padded, received_ns)


@dataclass
class MoveResult:
    study_uid: str
    policy: str
    source: str
    target: str
    instances: int = 0
    bytes: int = 0  # bytes copied (blobs already on the target are not copied again)
    seconds: float = 0.0
    # moved, failed, refused, vanished, skipped (the plan is stale: next run), paused (a tier it needs cannot be
    # used now: an object store down; the move stays journaled when it had begun, and the next run finishes it)
    outcome: str = "failed"
    error: str = ""
    resumed: bool = False


@dataclass
class Mover:
    """Moves studies for one run. ``tiers``: the opened tier backends by name; online copies are read through
    ``volumes`` (the online SegmentBackends by volume name)."""

    config: Config
    index: StudyIndex
    volumes: dict[str, BlobBackend]
    tiers: dict[str, BlobBackend]
    audit: AuditLog
    bucket: TokenBucket
    clock_ns: Callable[[], int] = time.time_ns
    on_bytes: Callable[[int], None] = lambda _n: None  # progress (bytes copied)
    crash_at: str = field(default_factory=lambda: os.environ.get(CRASH_ENV, ""))
    # Tiers found unusable during this run (name -> why): moves to or from them are paused for the rest of the run
    # instead of each waiting out the store's timeouts in turn.
    unavailable: dict[str, str] = field(default_factory=dict)

    def _mark_unavailable(self, exc: TierUnavailable, default_tier: str) -> str:
        tier = exc.tier if exc.tier in self.tiers else default_tier
        self.unavailable.setdefault(tier, str(exc))
        log.warning("tier run: tier %s cannot be used now, its moves wait for the next run: %s", tier, exc)
        return tier

    def _phase(self, name: str) -> None:
        if self.crash_at == name:
            os.kill(os.getpid(), signal.SIGKILL)

    def _backend(self, name: str) -> BlobBackend | None:
        return self.volumes.get(name) or self.tiers.get(name)

    def _tier_backends(self, tier: str) -> set[str]:
        return set(self.volumes) if tier == ONLINE_TIER else {tier}

    def drop_backends(self, source: str) -> set[str]:
        """The source tier and every faster one, as backend names."""
        order = tier_order(self.config)
        out: set[str] = set()
        for tier in order[: order.index(source) + 1]:
            out |= self._tier_backends(tier)
        return out

    # ---- resume --------------------------------------------------------------------------------------

    def resume(self) -> list[MoveResult]:
        """Finish what a crashed mover left: delete the containers its switches emptied, then redo every
        journaled move from the copy (its container removed first: nothing in it is named)."""
        for name, backend in self.tiers.items():
            # Before any put of this run, under tiering.lock (the only writer of the tiers): what an interrupted
            # put left (a partial archive, an unfinished multipart upload) goes.
            try:
                backend.recover(functools.partial(self._committed_end, name))
            except TierUnavailable as exc:
                self._mark_unavailable(exc, name)
        # Containers a volume that is not mounted still holds wait for it: this run's moves go on without them.
        self._collect_after_switch()
        self._sweep_unnamed()
        results = []
        for study_key, rec in self.index.moves():
            target = self.tiers.get(rec.target)
            if target is None:
                raise ApplianceError(f"a journaled move goes to tier {rec.target!r}, which is not configured: "
                                     "restore its [[tiers]] entry to let the move finish")
            uid = study_key.split("\x00", 1)[1]
            planned = PlannedMove(study_key, uid, rec.source, rec.target, 0, 0, rec.policy, "resumed after a crash")
            try:
                for tier in (rec.target, rec.source):
                    if tier in self.unavailable:
                        raise TierUnavailable(self.unavailable[tier], tier)
                if rec.container:
                    target.remove_container(rec.container)
                    self.index.forget_container(rec.target, rec.container)
            except TierUnavailable as exc:
                self._mark_unavailable(exc, rec.target)
                results.append(MoveResult(uid, rec.policy, rec.source, rec.target, outcome="paused", error=str(exc),
                                          resumed=True))
                continue  # still journaled: the next run finishes it
            result = self.move(planned)
            result.resumed = True
            results.append(result)
        return results

    def _committed_end(self, backend: str, container: str) -> int | None:
        rec = self.index.container(backend, container)
        return None if rec is None else rec.end

    def collect_garbage(self) -> int:
        pending = [(b, n) for b, n in self.index.pending_gc() if self._backend(b) is not None]
        return self.index.collect_garbage(pending, self._remove)

    def _collect_after_switch(self) -> None:
        """The switch is durable: a container that cannot be deleted now (a volume gone) keeps its gc row, and the
        next run deletes it; the move itself is done."""
        try:
            self.collect_garbage()
        except (ApplianceError, OSError) as exc:
            if isinstance(exc, StorageFault):
                raise
            log.warning("tier run: deleting emptied containers left for the next run: %s", exc)

    def _remove(self, backend: str, container: str) -> None:
        target = self._backend(backend)
        if target is not None:
            target.remove_container(container)

    # ---- one study -----------------------------------------------------------------------------------

    def move(self, planned: PlannedMove) -> MoveResult:
        started = time.monotonic()
        result = MoveResult(planned.study_uid, planned.policy, planned.source, planned.target)
        target = self.tiers[planned.target]
        blobs = self.index.study_blobs(planned.study_key)
        result.instances = len(blobs)
        # Until the switch, the move has not happened: an exception of any kind is audited as a failure.
        result.outcome, result.error = "failed", "stopped before the switch"
        container = ""
        switched = False
        waiting = self.unavailable.get(planned.target) or self.unavailable.get(planned.source)
        if waiting:
            result.outcome, result.error = "paused", waiting
            return result  # not journaled (or journaled by a run that crashed: resume skipped it and keeps it)
        try:
            if not blobs:
                result.outcome, result.error = "vanished", ""
                self.index.forget_move(planned.study_key)
                return result
            stale = self._stale(planned)
            if stale:
                # The plan is older than the study's state: moving it now would undo a recall a retrieve waits for
                # (or has just had). Left for the next run's plan.
                result.outcome, result.error = "skipped", stale
                self.index.forget_move(planned.study_key)
                return result
            if len(blobs) > self.config.tiering.study_instances_max:
                result.outcome = "refused"  # its error follows
                result.error = (f"{len(blobs)} instances, more than tiering.study_instances_max "
                                f"({self.config.tiering.study_instances_max})")
                self.index.forget_move(planned.study_key)
                return result
            hint = hashlib.sha256(planned.study_uid.encode()).hexdigest()[:16]
            container = target.begin_container(hint)
            now = self.clock_ns()
            if container:
                self.index.register_container(target.name, container, now)
            self.index.begin_move(planned.study_key, MoveRecord(planned.policy, planned.source, planned.target,
                                                               container, "copy", now))
            self._phase("journaled")
            added = self._copy(planned, target, blobs, result)
            if container and added:
                # Complete and durable: once a later move empties it, the switch may queue it for deletion.
                self.index.seal_containers(target.name, [container])
            elif container:  # nothing to copy (every blob already on the target): the container stays unused
                target.remove_container(container)
                self.index.forget_container(target.name, container)
            self._phase("synced")
            drop = self.drop_backends(planned.source)
            # Availability from the copies the switch leaves, decided inside its transaction: the recaller may
            # have switched the same study since it was read here.
            counts = self.index.switch_study(planned.study_key, added, drop,
                                             functools.partial(availability_of, self.config), planned.target,
                                             self.clock_ns(), move_done=True)
            switched = True
            result.outcome, result.error = "moved", ""
            # The move is decided by the switch: its audit line goes out now, not after the deletes (a crash
            # there would lose the line of a completed move).
            self._audit(planned, result, started)
            self._phase("switched")
            if counts["skipped"] and container:
                self._drop_if_unnamed(target, container)
            self._collect_after_switch()
        except StorageFault as exc:
            result.error = str(exc)
            raise  # fail-stop: the journal stays, the next run redoes the move
        except TierUnavailable as exc:
            if switched:  # the move is done; only its cleanup met the store down (its gc row stays)
                log.warning("tier run: cleanup after moving %s left for the next run: %s", planned.study_uid, exc)
            else:
                # Nothing is wrong with the study: the store cannot be used now. The journal stays (cleaning up
                # would need the store too); the next run's resume removes what was uploaded and redoes the move.
                tier = self._mark_unavailable(exc, planned.target)
                result.outcome, result.error = "paused", f"tier {tier}: {exc}"
                self._drop_paused_container(target, container)
        except (ApplianceError, OSError) as exc:
            result.outcome, result.error = "failed", str(exc)
            if not switched:
                self._abandon(planned, target, container)
        finally:
            if not switched:
                self._audit(planned, result, started)
        return result

    def _drop_paused_container(self, target: BlobBackend, container: str) -> None:
        """A paused move's half-written container must not stay pending in the target backend: the next move's
        sync would finish it first and fail on its error (pausing a healthy target when the source was the tier
        down, or a broken archive writer's ValueError ending the run). Removed best effort (the store may be the
        one down); the journal and the container's index row stay, and the next run's resume removes it again."""
        if not container:
            return
        try:
            target.remove_container(container)
        except (ApplianceError, OSError) as exc:
            if isinstance(exc, StorageFault):
                raise
            log.info("tier run: the paused move's container %s/%s is left to the next run: %s", target.name,
                     container, exc)

    def _sweep_unnamed(self) -> None:
        """Remove the tiers' sealed archives the index names nothing in: an overwrite (duplicate_policy overwrite)
        frees a moved blob without a switch, so no gc row comes for its archive. Only here, at the start of a run
        under tiering.lock: no move of this run has a container yet. Tape is append-only: left alone."""
        for name, backend in self.tiers.items():
            if backend.capabilities.latency == LatencyClass.OFFLINE or name in self.unavailable:
                continue
            unnamed = [rec.name for rec in self.index.iter_containers(name) if rec.sealed and rec.live_records == 0]
            for container in unnamed:
                self._drop_if_unnamed(backend, container)

    def _drop_if_unnamed(self, target: BlobBackend, container: str) -> None:
        """Every blob copied into ``container`` was freed before the switch (overwritten by other bytes): nothing
        will ever name it, and no gc row would come for it. Removed now (a crash first leaves it to `verify`'s
        orphans). Tape is left alone: its archive is shared by the run's studies and never removed."""
        if target.capabilities.latency == LatencyClass.OFFLINE:
            return
        rec = self.index.container(target.name, container)
        if rec is None or rec.live_records:
            return
        try:
            target.remove_container(container)
            self.index.forget_container(target.name, container)
        except (ApplianceError, OSError) as exc:
            if isinstance(exc, StorageFault):
                raise
            log.warning("tier run: an unused archive %s/%s is left: %s", target.name, container, exc)

    def _stale(self, planned: PlannedMove) -> str:
        """Why the planned move must not be done now ("" when it may): a recall is queued for the study (the
        recaller runs under its own lock and would race this move), or a switch changed its placement since the
        plan was made."""
        if self.index.recall_queued(planned.study_key):
            return "a recall of the study is queued"
        if planned.placed_since_ns is not None and \
                self.index.placement(planned.study_key).since_ns != planned.placed_since_ns:
            return "the study was switched (recalled) since the plan"
        return ""

    def _audit(self, planned: PlannedMove, result: MoveResult, started: float) -> None:
        result.seconds = time.monotonic() - started
        tiers = {"from": planned.source, "to": planned.target}  # keys as an admin reads them ("from" is a keyword)
        self.audit.write("move", study=planned.study_uid, policy=planned.policy, **tiers, instances=result.instances,
                         bytes=result.bytes, seconds=round(result.seconds, 3), outcome=result.outcome,
                         error=result.error, resumed=planned.reason.startswith("resumed"))
        # The appliance's audit trail too (appliance/audit.py): a migrate line, and a delete line for the source
        # copies the switch dropped (their containers go now or at the next run's garbage collection).
        moved = result.outcome == "moved"
        outcome = SUCCESS if moved or result.outcome in ("vanished", "skipped") else \
            (MINOR_FAILURE if result.outcome == "paused" else SERIOUS_FAILURE)
        node = self.config.server.ae_title
        write_once(self.config.audit, node, "migrate", outcome, study_uid=planned.study_uid,
                   instances=result.instances, bytes=result.bytes, from_tier=planned.source, to_tier=planned.target,
                   policy=planned.policy, result=result.outcome, reason=result.error or None,
                   duration_s=round(result.seconds, 3))
        if moved:
            write_once(self.config.audit, node, "delete", SUCCESS, study_uid=planned.study_uid,
                       instances=result.instances, tier=planned.source, scope="copies", why="migrated")

    def _abandon(self, planned: PlannedMove, target: BlobBackend, container: str) -> None:
        """A failed move: its container holds nothing named; remove it and the journal (the study stays where it
        was, and the next run plans it again)."""
        try:
            if container:
                target.remove_container(container)
                self.index.forget_container(target.name, container)
            self.index.forget_move(planned.study_key)
        except OSError as exc:  # the journal stays: the next run's resume cleans up
            log.warning("tier run: cleanup of a failed move left for the next run: %s", exc)

    def _copy(self, planned: PlannedMove, target: BlobBackend,
              blobs: list[tuple[str, str, BlobRecord, InstanceRecord]], result: MoveResult) -> dict[str, Copy]:
        """Put every blob not yet on the target, sync, publish, then re-read and hash each new copy."""
        put: dict[str, tuple[Location, InstanceRecord]] = {}
        for _sop, digest, blob, inst in blobs:
            # A copy already on the target counts only if `verify` has not found it missing or corrupt: the switch
            # drops the faster copies, and they may be the only good ones.
            if digest in put or any(c.backend == target.name and c.state == COPY_OK for c in blob.copies):
                continue
            # BlobMeta.policy is the duplicate policy the instance was stored under (a rebuild from this tier
            # replays it), not the tiering policy that moves it: carried over from the source copy.
            meta = BlobMeta(digest, blob.size, inst.received_ns, inst.calling_ae, self._stored_policy(blob))
            put[digest] = (target.put(meta, _CopySource(self, digest, blob)), inst)
            result.bytes += blob.size
            self._phase("copying")
        if not put:
            return {}
        target.sync()
        locations = [loc for loc, _inst in put.values()]
        target.publish(locations)
        self._commit_ends(target, locations)
        added = {}
        for digest, (location, inst) in put.items():
            self.bucket.take(inst.size)
            if target.sha256(location) != digest:
                raise CopyCorrupt(f"the copy of {digest} on {target.name} does not hash to its digest after sync")
            added[digest] = copy_of(target, location, inst.received_ns)
        return added

    def _stored_policy(self, blob: BlobRecord) -> str:
        """The duplicate policy recorded with the blob's bytes on its first readable copy ("" when none says)."""
        for copy in blob.copies:
            backend = self._backend(copy.backend)
            if backend is None:
                continue
            try:
                return backend.stat(copy.location).policy
            except (BlobMissing, OSError):
                continue
        return ""

    def _commit_ends(self, target: BlobBackend, locations: list[Location]) -> None:
        """Record, per container, the end of the last member this copy made durable: a tape archive left open by a
        crash is then never cut back before a member the index may name (recover keeps up to the committed end).
        A cartridge that filled mid-study opened a container of its own: registered here."""
        if isinstance(target, SegmentBackend):
            return  # (tests move between online volumes: the segment writer's own ends apply)
        ends: dict[tuple[str, str], int] = {}
        for location in locations:
            try:
                container, _record, data, stored, _size = parse_location(location)
            except BlobMissing:
                continue  # not an archive (a backend with locations of its own): no end to keep
            end = data + stored + (-stored) % BLOCK
            ends[(target.name, container)] = max(ends.get((target.name, container), 0), end)
        now = self.clock_ns()
        for backend, container in ends:
            self.index.register_container(backend, container, now)
        self.index.apply([], self.config.storage.duplicate_policy, ends)

    def read_best(self, digest: str, blob: BlobRecord) -> Iterator[bytes]:
        """The blob's bytes from its fastest readable copy (tier order), in chunks, hashed: a copy that does not
        hash to its digest raises CopyCorrupt at its end (before the target is synced)."""
        rank = {name: i for i, name in enumerate(tier_order(self.config))}

        def speed(copy: Copy) -> int:
            return rank.get(ONLINE_TIER if copy.backend in self.volumes else copy.backend, len(rank))

        errors = []
        unavailable: list[TierUnavailable] = []
        for copy in sorted(blob.copies, key=speed):
            backend = self._backend(copy.backend)
            if backend is None:
                errors.append(f"{copy.backend}: not configured here")
                continue
            chunks = backend.iter_read(copy.location, COPY_CHUNK_BYTES)
            try:
                first = next(chunks, b"")
            except BlobMissing as exc:
                errors.append(str(exc))
                if isinstance(exc, TierUnavailable):
                    unavailable.append(TierUnavailable(str(exc), exc.tier or copy.backend))
                continue
            return _hashed(digest, copy.backend, first, chunks)
        if unavailable and len(unavailable) == len(errors):
            raise unavailable[0]  # the source tier is down, nothing is lost: the run pauses the moves from it
        raise BlobMissing(f"blob {digest}: no readable copy ({'; '.join(errors) or 'no copies'})")


def _hashed(digest: str, where: str, first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    hasher = hashlib.sha256(first)
    if first:
        yield first
    for chunk in rest:
        hasher.update(chunk)
        yield chunk
    if hasher.hexdigest() != digest:
        raise CopyCorrupt(f"the copy of {digest} on {where} does not hash to its digest: not copied")


class _CopySource(BlobSource):
    """A blob being moved, streamed from its best copy through the rate limit."""

    def __init__(self, mover: Mover, digest: str, blob: BlobRecord) -> None:
        self.mover, self.digest, self.blob = mover, digest, blob
        self.size = blob.size

    def chunks(self, chunk_bytes: int) -> Iterator[bytes | memoryview]:
        for chunk in self.mover.read_best(self.digest, self.blob):
            self.mover.bucket.take(2 * len(chunk))  # read + written
            self.mover.on_bytes(len(chunk))
            for start in range(0, len(chunk), chunk_bytes):
                yield chunk[start : start + chunk_bytes]
