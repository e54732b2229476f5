"""The C-MOVE SCP (PS3.4 C.4.2): the C-STORE sub-operations go to the Move Destination, a peer under [peers]
with ``allow_receive``, on associations we open to its host and port.

One presentation context per (SOP class, stored transfer syntax) of the selection, plus Explicit and Implicit VR
Little Endian per SOP class for what must be converted, each with a single transfer syntax so that we know
exactly what was accepted, at most 128 (PS3.8). A large move is shared by up to ``retrieve.move_associations``
associations, one per ``move_instances_per_association_min`` instances, taking instances from one queue.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter, deque
from contextlib import aclosing

from appliance import errors
from appliance.config import PeerConfig
from appliance.dicom.uids import MOVE_MODELS
from appliance.net import dimse
from appliance.net.client import AssociationAborted, AssociationRejected, ClientAssociation
from appliance.net.service import Request
from appliance.services.context import WorkerContext
from appliance.services.registry import register
from appliance.services.retrieve import Match, RetrieveRefused
from appliance.services.sending import UNCOMPRESSED, SubOperationFailed
from appliance.services.suboperations import Counts, RetrieveHandler

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: odd presentation context ids 1..255


def plan_contexts(matches: list[Match], limit: int = MAX_CONTEXTS) -> list[tuple[str, list[str]]]:
    """The presentation contexts to propose for ``matches``: the stored syntaxes first (most instances first),
    then the uncompressed fallbacks, cut at ``limit`` (an instance left without a context fails)."""
    stored = Counter((m.sop_class_uid, m.transfer_syntax) for m in matches)
    wanted = [key for key, _n in stored.most_common()]
    classes = list(dict.fromkeys(m.sop_class_uid for m in matches))
    seen = set(wanted)
    for sop_class in classes:
        for ts in UNCOMPRESSED:
            if (sop_class, ts) not in seen:
                seen.add((sop_class, ts))
                wanted.append((sop_class, ts))
    return [(sop_class, [ts]) for sop_class, ts in wanted[:limit]]


class MoveHandler(RetrieveHandler):
    operation = "C-MOVE"

    def __init__(self, ctx: WorkerContext, request: Request) -> None:
        super().__init__(ctx, request)
        self.destination: PeerConfig | None = None

    def destination_ae(self) -> str | None:
        return self.request.command.move_destination or None

    def check(self) -> None:
        ae = self.request.command.move_destination
        peer = self.ctx.config.peer_by_ae(ae)
        if peer is None or not peer.allow_receive:
            why = "not under [peers]" if peer is None else "not allowed to receive"
            log.warning("C-MOVE from %s to %r refused: the destination is %s", self.request.calling_ae, ae, why)
            raise RetrieveRefused(errors.MOVE_DESTINATION_UNKNOWN, f"move destination {ae!r} is {why}")
        self.destination = peer

    async def run(self, matches: list[Match], counts: Counts) -> None:
        assert self.destination is not None
        cfg = self.cfg
        associations = max(1, min(cfg.move_associations, math.ceil(len(matches) / cfg.move_instances_per_association_min)))
        queue = deque(matches)
        contexts = plan_contexts(matches)
        opened: list[bool] = []
        refusals: list[str] = []
        async with asyncio.TaskGroup() as workers:  # one failing unexpectedly cancels the others
            for _ in range(associations):
                workers.create_task(self._worker(queue, contexts, counts, opened, refusals))
        if self.cancelled:
            return  # what is left in the queue is reported as Remaining
        if not opened:
            for match in queue:
                counts.fail(match)
            raise RetrieveRefused(errors.OUT_OF_RESOURCES_SUB_OPERATIONS, refusals[0] if refusals else "no association")
        if queue:  # every association stopped early (the destination went away)
            for match in queue:
                counts.fail(match)
            queue.clear()

    async def _worker(self, queue: deque[Match], contexts: list[tuple[str, list[str]]], counts: Counts,
                      opened: list[bool], refusals: list[str]) -> None:
        dest = self.destination
        assert dest is not None
        cfg = self.cfg
        if self.cancelled:
            return
        try:
            assoc = await ClientAssociation.open(
                dest.host, dest.port, dest.ae_title, self.ctx.config.server.ae_title, contexts,
                max_pdu=self.ctx.config.server.max_pdu, connect_timeout=cfg.connect_timeout_s,
                associate_timeout=cfg.association_timeout_s, ssl=self.ctx.ssl_for(dest))
        except AssociationRejected as exc:
            refusals.append(f"{dest.ae_title} rejected the association ({exc.result}, {exc.source}, {exc.reason})")
        except TimeoutError:
            refusals.append(f"{dest.ae_title} did not accept an association within "
                            f"{cfg.connect_timeout_s + cfg.association_timeout_s}s")
        except (OSError, AssociationAborted) as exc:
            refusals.append(f"cannot associate with {dest.ae_title} at {dest.host}:{dest.port}: "
                            f"{getattr(exc, 'strerror', None) or exc}")
        else:
            opened.append(True)
            await self._send_queue(assoc, queue, counts)
            return
        log.warning("C-MOVE from %s: %s", self.request.calling_ae, refusals[-1])

    async def _send_queue(self, assoc: ClientAssociation, queue: deque[Match], counts: Counts) -> None:
        clean = False
        try:
            while queue and not self.cancelled:
                if not await self._send(assoc, queue.popleft(), counts):
                    return
            clean = True
        finally:
            if clean:
                try:
                    await assoc.release()
                except (TimeoutError, AssociationAborted, OSError):
                    assoc.abort()
            else:  # stopped by an error or cancelled (the requester's association died): no release handshake
                assoc.abort()

    async def _send(self, assoc: ClientAssociation, match: Match, counts: Counts) -> bool:
        assert self.destination is not None
        dest_ae = self.destination.ae_title
        accepted = {ts: cid for (abstract, ts), cid in assoc.accepted.items() if abstract == match.sop_class_uid}
        outgoing = await self.prepare(match, accepted, f"move destination {dest_ae}", counts)
        if outgoing is None:
            return True
        rq = self.request.command
        command = dimse.store_request(assoc.next_message_id(), match.sop_class_uid, match.sop_instance_uid,
                                      rq.priority, move_originator_ae=self.request.calling_ae,
                                      move_originator_message_id=rq.message_id)
        timeout = self.cfg.sub_operation_timeout_s
        log.debug("C-MOVE: sending %s to %s", match.sop_instance_uid, dest_ae)
        try:
            async with asyncio.timeout(timeout), aclosing(outgoing.chunks):
                response = await assoc.request(outgoing.context_id, command, outgoing.chunks, timeout)
        except TimeoutError:
            self.comment = f"{dest_ae} did not answer a C-STORE within {timeout}s"
        except (AssociationAborted, OSError) as exc:
            self.comment = f"{dest_ae} ended the association: {exc}"
        except SubOperationFailed as exc:  # the read failed half-way: this association is aborted
            self.comment = str(exc)
        else:
            status = response.status if response.status is not None else errors.PROCESSING_FAILURE
            if status != errors.SUCCESS and status & 0xF000 != 0xB000:
                self.comment = f"{dest_ae} answered a C-STORE with 0x{status:04X}"
            counts.done(match, status)
            return True
        log.warning("C-MOVE from %s: %s", self.request.calling_ae, self.comment)
        counts.fail(match)
        return False


def _factory(ctx: WorkerContext, request: Request) -> MoveHandler:
    return MoveHandler(ctx, request)


register(dimse.C_MOVE_RQ, MOVE_MODELS, "move", _factory)
