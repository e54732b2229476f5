"""Storage Service Class SCP (PS3.4 Annex B): one ``StoreOperation`` per C-STORE request.

The dataset streams from the PDVs into an InstanceSpool (memory up to ``storage.spool_memory_bytes``, a spill
file beyond; SHA-256 as it arrives); once it is complete, its first ``HEAD_LIMIT`` bytes are read back from the
spool for the header attributes the index needs. The complete instance goes to the group commit, which appends
it to a segment. Every exit returns a DIMSE status; a refused instance leaves nothing behind (memory, spill file
or index entry).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from appliance import errors
from appliance.audit import Session
from appliance.config import PeerConfig
from appliance.errors import ApplianceError
from appliance.index.db import Outcome
from appliance.index.records import HEAD_LIMIT, read_header, read_header_beyond_head
from appliance.net.dimse import Command
from appliance.net.service import peer_label
from appliance.store.blobs import file_meta
from appliance.store.commit import Submission
from appliance.store.segments import SegmentBackend
from appliance.store.spool import InstanceSpool

if TYPE_CHECKING:
    from appliance.services.context import WorkerContext

log = logging.getLogger(__name__)

# Space a new instance is assumed to need when picking a volume (the size is unknown until the last PDV).
SIZE_HINT = 4 * 1024 * 1024


_last_received_ns = 0


def receive_time_ns() -> int:
    """Wall-clock receive time that never steps back within a worker (an NTP step would otherwise make a later
    instance look older; receive time decides which version of a SOP instance wins). One event loop per worker
    process calls it: no lock."""
    global _last_received_ns
    now = time.time_ns()
    _last_received_ns = now if now > _last_received_ns else _last_received_ns + 1
    return _last_received_ns


@dataclass
class StoreResult:
    status: int
    comment: str = ""


class StoreOperation:
    """Receives one C-STORE dataset. ``feed`` per dataset PDV, then ``finish`` once."""

    def __init__(
        self, ctx: WorkerContext, command: Command, abstract_syntax: str, transfer_syntax: str, calling_ae: str,
        peer: PeerConfig | None = None, session: Session | None = None,
    ) -> None:
        self.ctx = ctx
        self.command = command
        self.transfer_syntax = transfer_syntax
        self.calling_ae = calling_ae
        self.started = time.perf_counter()
        self.spool: InstanceSpool | None = None
        self.backend: SegmentBackend | None = None
        self.result: StoreResult | None = None  # set early when the instance is refused
        self.dataset_bytes = 0
        self.max_bytes = ctx.config.storage.max_instance_bytes  # looked up once, not per PDV
        self.peer = peer
        self.ae_label = peer_label(peer)  # the metrics' calling_ae: configured peers only (bounded cardinality)
        self.session = session  # the association's audit counts (one dict increment per instance)
        self.study_uid = ""  # known once the header is read
        self.replaced = False  # it superseded a stored version (the audit line counts it)
        self.duplicate = ""  # the index's outcome when the SOP Instance UID was stored already (counted at the end)
        sop_class = command.affected_sop_class_uid
        # The peer's store right is checked once, by the dispatch (services/application.py), before this exists.
        if sop_class not in ctx.accepted_sop_classes or sop_class != abstract_syntax:
            self.result = StoreResult(errors.SOP_CLASS_NOT_SUPPORTED, "SOP class not accepted on this context")
            return
        volume = ctx.volumes.pick(SIZE_HINT)
        if volume is None:
            self.result = StoreResult(errors.OUT_OF_RESOURCES, "no volume has space")
            return
        self.backend = ctx.blobstore.segment_backend(volume.name)
        self.spool = InstanceSpool(ctx.spool_budget, volume.tmp,
                                   file_meta(sop_class, command.affected_sop_instance_uid, transfer_syntax))
        ctx.committer.receiving += 1

    def feed(self, data: memoryview) -> None:
        self.dataset_bytes += len(data)
        if self.result is not None or self.spool is None:
            return  # refused: read and drop the rest of the dataset
        if self.dataset_bytes > self.max_bytes:
            # Refused as soon as it is known, not after the disk filled: the rest of the dataset is read and dropped.
            self._refuse(errors.OUT_OF_RESOURCES, "instance larger than storage.max_instance_bytes")
            return
        try:
            self.spool.write(data)
        except ApplianceError as exc:
            self._refuse(exc.status, str(exc))

    def _refuse(self, status: int, comment: str) -> None:
        if self.spool is not None:
            self.spool.discard()
            self.spool = None
            self.ctx.committer.receiving -= 1
        self.result = StoreResult(status, comment)

    def abandon(self) -> None:
        """The association went away mid-dataset."""
        self._refuse(errors.PROCESSING_FAILURE, "association ended")

    async def finish(self) -> StoreResult:
        ctx = self.ctx
        received_at = time.perf_counter()
        result = await self._finish()
        if result.status == errors.SUCCESS:
            ctx.metrics.stored(self.command.affected_sop_class_uid, self.ae_label, self.dataset_bytes,
                               received_at - self.started, time.perf_counter() - received_at)
            if self.session is not None:
                self.session.instance_stored(self.study_uid, self.dataset_bytes, self.replaced, self.duplicate)
        else:
            ctx.metrics.failure(result.status)
            # The first failure of an association at info (why), the others at debug: a flood of bad instances must
            # not flood the log; the association's end line counts them, its audit line by status.
            first = self.session is None or self.session.failed == 0
            if self.session is not None:
                self.session.instance_failed(self.study_uid, result.status)
            log.log(logging.INFO if first else logging.DEBUG, "C-STORE from %s failed with 0x%04X: %s%s",
                    self.calling_ae, result.status, result.comment, "" if self.session is None else
                    " (further failures of this association at debug level)")
            log.debug("the failed C-STORE was %s", self.command.affected_sop_instance_uid)
        return result

    async def _finish(self) -> StoreResult:
        if self.result is not None:
            return self.result
        spool, backend = self.spool, self.backend
        assert spool is not None and backend is not None
        self.spool = None
        self.ctx.committer.receiving -= 1
        cmd = self.command
        try:
            header = read_header(spool.dataset_head(HEAD_LIMIT), self.transfer_syntax,
                                 complete=self.dataset_bytes <= HEAD_LIMIT)
            if header is None:
                with spool.reader() as stream:
                    header = read_header_beyond_head(stream)
        except ApplianceError as exc:
            spool.discard()
            return StoreResult(exc.status, str(exc))
        if header.sop_instance_uid != cmd.affected_sop_instance_uid or header.sop_class_uid != cmd.affected_sop_class_uid:
            spool.discard()
            return StoreResult(errors.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                               "SOP Class/Instance UID in dataset differ from the command")
        self.study_uid = header.study.get("StudyInstanceUID", "")
        log.debug("received %s (%d bytes) from %s", cmd.affected_sop_instance_uid, spool.size, self.calling_ae)
        # Overwrite is a right given per peer ([peers.X] allow_overwrite); everyone else keeps the first instance.
        policy = self.ctx.config.duplicate_policy_for(self.peer)
        result = await self.ctx.committer.submit(Submission(
            spool, backend, header, self.transfer_syntax, receive_time_ns(), self.calling_ae, policy))
        self.replaced = result.outcome == Outcome.REPLACED
        if result.outcome in (Outcome.IDENTICAL, Outcome.KEPT_FIRST, Outcome.SUPERSEDED, Outcome.REPLACED):
            self.duplicate = result.outcome.value
        if result.outcome in (Outcome.IDENTICAL, Outcome.KEPT_FIRST, Outcome.SUPERSEDED, Outcome.REJECTED):
            self.ctx.metrics.duplicates.labels(result.outcome.value).inc()
        return StoreResult(result.status, result.comment)
