"""Storage Service Class SCP (PS3.4 Annex B): one ``StoreOperation`` per C-STORE request.

The dataset streams from the PDVs straight into a BlobWriter (temp file + SHA-256); only the first
``HEAD_LIMIT`` bytes are kept in memory, to read the header attributes the index needs. Every exit returns a
DIMSE status; a refused instance leaves nothing on disk.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from appliance import errors
from appliance.config import PeerConfig
from appliance.errors import ApplianceError
from appliance.index.db import IndexEntry, Outcome
from appliance.index.records import HEAD_LIMIT, read_header, read_header_beyond_head
from appliance.net.dimse import Command
from appliance.store.blobs import BlobWriter, file_meta, set_calling_ae

if TYPE_CHECKING:
    from appliance.services.context import WorkerContext

log = logging.getLogger(__name__)

# Space a new instance is assumed to need when picking a volume (the size is unknown until the last PDV).
SIZE_HINT = 4 * 1024 * 1024


@dataclass
class StoreResult:
    status: int
    comment: str = ""


class StoreOperation:
    """Receives one C-STORE dataset. ``feed`` per dataset PDV, then ``finish`` once."""

    def __init__(
        self, ctx: WorkerContext, command: Command, abstract_syntax: str, transfer_syntax: str, calling_ae: str,
        peer: PeerConfig | None = None,
    ) -> None:
        self.ctx = ctx
        self.command = command
        self.transfer_syntax = transfer_syntax
        self.calling_ae = calling_ae
        self.started = time.perf_counter()
        self.head = bytearray()
        self.writer: BlobWriter | None = None
        self.result: StoreResult | None = None  # set early when the instance is refused
        self.dataset_bytes = 0
        sop_class = command.affected_sop_class_uid
        if sop_class not in ctx.accepted_sop_classes or sop_class != abstract_syntax:
            self.result = StoreResult(errors.SOP_CLASS_NOT_SUPPORTED, "SOP class not accepted on this context")
            return
        if peer is not None and not peer.allow_store:
            self.result = StoreResult(errors.NOT_AUTHORIZED, "peer is not allowed to store")
            return
        volume = ctx.volumes.pick(SIZE_HINT)
        if volume is None:
            self.result = StoreResult(errors.OUT_OF_RESOURCES, "no volume has space")
            return
        try:
            self.writer = BlobWriter(volume, file_meta(sop_class, command.affected_sop_instance_uid,
                                                       transfer_syntax), ctx.tmp_reserves.get(volume.name))
        except ApplianceError as exc:
            self.result = StoreResult(exc.status, str(exc))
            return
        ctx.committer.receiving += 1

    def feed(self, data: memoryview) -> None:
        self.dataset_bytes += len(data)
        if self.result is not None or self.writer is None:
            return  # refused: read and drop the rest of the dataset
        if len(self.head) < HEAD_LIMIT:
            self.head += data[: HEAD_LIMIT - len(self.head)]
        try:
            self.writer.write(data)
        except ApplianceError as exc:
            self._refuse(exc.status, str(exc))

    def _refuse(self, status: int, comment: str) -> None:
        if self.writer is not None:
            self.writer.discard()
            self.writer = None
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
            ctx.metrics.stored(self.command.affected_sop_class_uid, self.calling_ae, self.dataset_bytes,
                               received_at - self.started, time.perf_counter() - received_at)
        else:
            ctx.metrics.failure(result.status)
            log.info("C-STORE failed with 0x%04X: %s", result.status, result.comment)
        return result

    async def _finish(self) -> StoreResult:
        if self.result is not None:
            return self.result
        writer = self.writer
        assert writer is not None
        self.writer = None
        self.ctx.committer.receiving -= 1
        cmd = self.command
        try:
            writer.flush_prefix()
            header = read_header(self.head, self.transfer_syntax, complete=self.dataset_bytes <= HEAD_LIMIT)
            if header is None:
                header = read_header_beyond_head(writer.tmp_path)
        except ApplianceError as exc:
            writer.discard()
            return StoreResult(exc.status, str(exc))
        if header.sop_instance_uid != cmd.affected_sop_instance_uid or header.sop_class_uid != cmd.affected_sop_class_uid:
            writer.discard()
            return StoreResult(errors.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                               "SOP Class/Instance UID in dataset differ from the command")
        received_ns = time.time_ns()
        try:
            # Provenance kept with the blob, for `index rebuild`: mtime = receive time, xattr = calling AE.
            # Set here on the open descriptor (cheap), made durable by the group commit's fsync.
            os.utime(writer.fd, ns=(received_ns, received_ns))
            set_calling_ae(writer.fd, self.calling_ae)
        except OSError as exc:
            writer.discard()
            return StoreResult(errors.OUT_OF_RESOURCES, f"volume write failed: {exc.strerror}")
        entry = IndexEntry(
            header=header, digest=writer.digest(), volume=writer.volume.name, size=writer.size,
            transfer_syntax=self.transfer_syntax, received_ns=received_ns, calling_ae=self.calling_ae,
        )
        log.debug("received %s (%d bytes) from %s", cmd.affected_sop_instance_uid, writer.size, self.calling_ae)
        result = await self.ctx.committer.submit(writer, entry)
        if result.outcome in (Outcome.IDENTICAL, Outcome.KEPT_FIRST, Outcome.REJECTED):
            self.ctx.metrics.duplicates.labels(result.outcome.value).inc()
        return StoreResult(result.status, result.comment)
