"""What C-MOVE and C-GET share (PS3.4 C.4.2, C.4.3): the identifier, the selection, the sub-operation counts, the
Pending responses, C-CANCEL and the final status. move.py and get.py only say where the C-STOREs go.

The sub-operations run in one task while ``responses`` reports progress: at most one Pending per
``retrieve.pending_interval_ms`` and only when a count changed. C-CANCEL lets the sub-operation in flight finish
and starts no other (final 0xFE00 with the counts, Remaining included); an association that dies cancels the
task, which releases whatever it holds (readers, the destination's associations).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from appliance import errors
from appliance.audit import MINOR_FAILURE, SERIOUS_FAILURE, SUCCESS
from appliance.net import dimse
from appliance.net.service import Request, Response
from appliance.services.context import WorkerContext
from appliance.services.retrieve import (
    Match,
    RetrieveRefused,
    await_recalls,
    failed_identifier,
    offline_studies,
    parse_identifier,
    select,
)
from appliance.services.sending import Outgoing, SubOperationFailed, pool, prepare

log = logging.getLogger(__name__)


@dataclass
class Counts:
    remaining: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)
    # Study UID -> [completed, failed, warning, bytes], for the audit lines (the matches are bounded by
    # retrieve.matches_max, so are the studies).
    by_study: dict[str, list[int]] = field(default_factory=dict)

    def snapshot(self) -> tuple[int, int, int, int]:
        return self.remaining, self.completed, self.failed, self.warning

    def done(self, match: Match, status: int) -> None:
        """One sub-operation answered with ``status`` (a C-STORE response status)."""
        self.remaining -= 1
        study = self.by_study.get(match.study_key)
        if study is None:
            study = self.by_study[match.study_key] = [0, 0, 0, 0]
        if status == errors.SUCCESS:
            self.completed += 1
            study[0] += 1
            study[3] += match.size
        elif status & 0xF000 == 0xB000:  # C-STORE warnings (coercion, elements discarded): stored all the same
            self.warning += 1
            study[2] += 1
            study[3] += match.size
        else:
            self.failed += 1
            study[1] += 1
            self.failed_uids.append(match.sop_instance_uid)

    def fail(self, match: Match) -> None:
        self.done(match, errors.PROCESSING_FAILURE)


# Sends one instance, counts it, and says whether to go on (False: stop, e.g. the association is gone).
SendOne = Callable[[Match, Counts], Awaitable[bool]]


class RetrieveHandler:
    """Base of the C-MOVE and C-GET handlers (net/service.py Handler). Subclasses implement ``check`` (refusals
    decided from the command alone) and ``run`` (the sub-operations)."""

    operation = "retrieve"
    running = 0  # retrieves of this worker in progress (retrieve.concurrent_max)

    def __init__(self, ctx: WorkerContext, request: Request) -> None:
        self.ctx = ctx
        self.request = request
        self.cfg = ctx.config.retrieve
        self.identifier = bytearray()
        self.identifier_too_large = False
        self.cancelled = False
        self.task: asyncio.Task[None] | None = None
        self.level = ""  # the identifier's QueryRetrieveLevel, for the audit line
        self.comment = ""  # why sub-operations failed or stopped: goes into the final response's Error Comment

    # ---- Handler ----

    def feed(self, data: memoryview) -> None:
        if len(self.identifier) + len(data) > self.cfg.identifier_bytes_max:
            self.identifier_too_large = True
            self.identifier.clear()
        elif not self.identifier_too_large:
            self.identifier += data

    def cancel(self) -> None:
        self.cancelled = True

    def abandon(self) -> None:
        self.cancelled = True
        if self.task is not None and not self.task.done():
            self.task.cancel()

    async def responses(self) -> AsyncIterator[Response]:
        limit = self.cfg.concurrent_max
        if RetrieveHandler.running >= limit:
            log.warning("%s from %s refused: %d retrieves running (retrieve.concurrent_max)", self.operation,
                        self.request.calling_ae, limit)
            yield Response(errors.OUT_OF_RESOURCES_SUB_OPERATIONS, f"{limit} retrieves running, try later")
            return
        RetrieveHandler.running += 1
        try:
            async with aclosing(self._responses()) as responses:
                async for response in responses:
                    yield response
        finally:
            RetrieveHandler.running -= 1

    async def _responses(self) -> AsyncGenerator[Response, None]:
        try:
            matches = await self._matches()
        except RetrieveRefused as exc:
            log.info("%s from %s refused: %s", self.operation, self.request.calling_ae, exc.comment)
            self._audit(Counts(0), exc.status)
            yield Response(exc.status, exc.comment)
            return
        counts = Counts(len(matches))
        log.info("%s from %s: %d instances", self.operation, self.request.calling_ae, len(matches))
        if not matches:
            self._audit(counts, errors.SUCCESS)
            yield Response(errors.SUCCESS, extra=dimse.sub_operation_counts(None, 0, 0, 0))
            return
        if self.ctx.access is not None:  # last access, for the policies (batched: appliance/services/access.py)
            self.ctx.access.note({m.study_key.rpartition("\x00")[2] for m in matches if m.study_key})
        if offline_studies(matches):
            # A study on tape: its recall is queued and waited for (tiering.recall_wait_s), with one Pending
            # response so that the requester knows the retrieve is under way.
            yield Response(errors.PENDING, extra=dimse.sub_operation_counts(len(matches), 0, 0, 0))
            tiering = self.ctx.config.tiering
            try:
                matches = await await_recalls(self.ctx.index, matches, self.operation.lower(), tiering.recall_wait_s,
                                              tiering.recall_queue_max, lambda: self.cancelled, self._run)
            except RetrieveRefused as exc:
                log.info("%s from %s: %s", self.operation, self.request.calling_ae, exc.comment)
                self._audit(counts, exc.status)
                yield Response(exc.status, exc.comment)
                return
        refused: RetrieveRefused | None = None
        if self.cancelled:  # C-CANCEL, or the association ended, while the selection ran
            yield self._final(counts, None)
            return
        self.task = asyncio.get_running_loop().create_task(self.run(matches, counts))
        try:
            last = counts.snapshot()
            interval = self.cfg.pending_interval_ms / 1000
            while not self.task.done():
                await asyncio.wait({self.task}, timeout=interval)
                now = counts.snapshot()
                if not self.task.done() and now != last:
                    last = now
                    yield Response(errors.PENDING, extra=dimse.sub_operation_counts(*now))
            try:
                if not self.task.cancelled():  # cancelled by abandon(): what was not sent counts as not sent
                    self.task.result()
            except RetrieveRefused as exc:
                refused = exc
        finally:
            if not self.task.done():  # the association ended while we were reporting: stop the sub-operations
                self.task.cancel()
        yield self._final(counts, refused)

    # ---- for the subclasses ----

    async def prepare(self, match: Match, accepted: dict[str, int], peer: str, counts: Counts) -> Outgoing | None:
        """The instance opened (or converted) for a destination that accepted ``accepted``; None when it cannot be
        sent, counted as a failed sub-operation with its reason as the final Error Comment."""
        try:
            return await prepare(self.ctx, match, accepted, peer)
        except SubOperationFailed as exc:
            # The first at warning, the rest at debug: the final line counts them (no line per instance).
            log.log(logging.DEBUG if self.comment else logging.WARNING, "%s to %s: a sub-operation failed: %s",
                    self.operation, peer, exc)
            self.comment = str(exc)
            counts.fail(match)
            return None

    def check(self) -> None:
        """Raise RetrieveRefused for what the command alone decides (the move destination)."""

    async def run(self, matches: list[Match], counts: Counts) -> None:
        raise NotImplementedError

    async def send_each(self, matches: list[Match], counts: Counts, send: SendOne) -> None:
        """Send ``matches`` one after the other with ``send`` until done, cancelled, or ``send`` says stop; what was
        not attempted after a stop counts as failed (comment: ``self.comment``)."""
        index = 0
        while index < len(matches) and not self.cancelled:
            match = matches[index]
            index += 1
            if not await send(match, counts):
                break
        if not self.cancelled:
            for match in matches[index:]:
                counts.fail(match)

    # ---- internals ----

    async def _run(self, func: Callable[..., Any], *args: Any) -> Any:
        """An index call on the retrieve readers' threads (LMDB transactions must not block the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(pool(self.ctx.config), func, *args)

    async def _matches(self) -> list[Match]:
        command = self.request.command
        self.check()
        if not command.has_dataset:
            raise RetrieveRefused(errors.UNABLE_TO_PROCESS, "no identifier")
        if self.identifier_too_large:
            raise RetrieveRefused(errors.UNABLE_TO_PROCESS,
                                  f"identifier larger than {self.cfg.identifier_bytes_max} bytes")
        # Parsing (up to identifier_bytes_max of UIDs) and the index reads (short LMDB read transactions, but a
        # 100,000-instance study is 100,000 records) run off the event loop, so that the other associations of
        # this worker go on meanwhile.
        identifier, self.identifier = bytes(self.identifier), bytearray()
        loop = asyncio.get_running_loop()
        ds = await loop.run_in_executor(pool(self.ctx.config), parse_identifier, identifier,
                                        self.request.transfer_syntax)
        self.level = str(ds.get("QueryRetrieveLevel", "") or "")[:16]
        return await loop.run_in_executor(pool(self.ctx.config), select, self.ctx.index, self.request.abstract_syntax,
                                          ds, self.cfg.matches_max)

    def destination_ae(self) -> str | None:
        """Where the sub-operations go when it is not the requester (C-MOVE)."""
        return None

    def _audit(self, counts: Counts, status: int) -> None:
        """One line per study retrieved (C-GET) or moved (C-MOVE), with its counts; one without a study when the
        request was refused or matched nothing."""
        session = self.request.session
        if session is None:
            return
        session.request(self.operation)
        event = "move" if self.operation == "C-MOVE" else "retrieve"
        common = {"destination_ae": self.destination_ae(), "status": f"0x{status:04X}", "level": self.level or None}
        if not counts.by_study:
            session.emit(event, SUCCESS if status == errors.SUCCESS else SERIOUS_FAILURE, instances=0, **common)
        for key, (completed, failed, warning, nbytes) in counts.by_study.items():
            outcome = SUCCESS if not failed else (MINOR_FAILURE if completed + warning else SERIOUS_FAILURE)
            session.emit(event, outcome, study_uid=key.rpartition("\x00")[2] or None, instances=completed + warning,
                         bytes=nbytes, failed=failed or None, warning=warning or None, **common)

    def _final(self, counts: Counts, refused: RetrieveRefused | None) -> Response:
        remaining = counts.remaining if self.cancelled else None
        if refused is not None:
            status, comment = refused.status, refused.comment
        elif self.cancelled:
            status, comment = errors.CANCEL, "cancelled"
        elif counts.failed or counts.warning:
            status, comment = errors.SUB_OPERATIONS_WITH_FAILURES, self.comment or "some sub-operations failed"
        else:
            status, comment = errors.SUCCESS, ""
        log.info("%s from %s: status 0x%04X, %d completed, %d failed, %d warning, %d not sent%s", self.operation,
                 self.request.calling_ae, status, counts.completed, counts.failed, counts.warning, counts.remaining,
                 f" ({comment})" if comment else "")
        for result, n in (("completed", counts.completed), ("failed", counts.failed), ("warning", counts.warning),
                          ("not_sent", counts.remaining)):
            if n:
                self.ctx.metrics.retrieve_suboperations.labels(self.operation, result).inc(n)
        self._audit(counts, status)
        dataset = failed_identifier(counts.failed_uids, self.request.transfer_syntax) if counts.failed_uids else None
        return Response(status, comment, dataset=dataset,
                        extra=dimse.sub_operation_counts(remaining, counts.completed, counts.failed, counts.warning))
