"""The C-GET SCP (PS3.4 C.4.3): the C-STORE sub-operations go back on the requester's own association, on the
presentation contexts where SCP/SCU role selection lets it act as Storage SCP (PS3.7 D.3.3.4)."""

from __future__ import annotations

import logging
from contextlib import aclosing

from appliance import errors
from appliance.dicom.uids import GET_MODELS
from appliance.net import dimse
from appliance.net.service import ChannelClosed, Request
from appliance.services.context import WorkerContext
from appliance.services.registry import register
from appliance.services.retrieve import Match
from appliance.services.suboperations import Counts, RetrieveHandler

log = logging.getLogger(__name__)


class GetHandler(RetrieveHandler):
    operation = "C-GET"

    async def run(self, matches: list[Match], counts: Counts) -> None:
        await self.send_each(matches, counts, self._send)

    async def _send(self, match: Match, counts: Counts) -> bool:
        channel = self.request.channel
        if channel is None or not channel.is_open:
            self.comment = "the association ended"
            counts.fail(match)
            return False
        peer = f"C-GET requester {self.request.calling_ae}"
        outgoing = await self.prepare(match, channel.contexts(match.sop_class_uid, peer_scp=True), peer, counts)
        if outgoing is None:
            return True
        originator = self.request.command

        def command(message_id: int) -> bytes:
            return dimse.store_request(message_id, match.sop_class_uid, match.sop_instance_uid, originator.priority)

        log.debug("C-GET: sending %s to %s", match.sop_instance_uid, self.request.calling_ae)
        try:
            async with aclosing(outgoing.chunks):
                response = await channel.request(outgoing.context_id, command, outgoing.chunks,
                                                 self.cfg.sub_operation_timeout_s)
        except ChannelClosed:
            self.comment = "the association ended"
            counts.fail(match)
            return False
        except TimeoutError:
            # The requester does not answer: later sub-operations would wait as long each. Stop here.
            self.comment = f"no C-STORE response within {self.cfg.sub_operation_timeout_s}s"
            log.warning("%s: %s; the remaining sub-operations are not attempted", peer, self.comment)
            counts.fail(match)
            return False
        status = response.status if response.status is not None else errors.PROCESSING_FAILURE
        if status != errors.SUCCESS and status & 0xF000 != 0xB000:
            self.comment = f"C-STORE sub-operation answered 0x{status:04X}"
        counts.done(match, status)
        return True


def _factory(ctx: WorkerContext, request: Request) -> GetHandler:
    return GetHandler(ctx, request)


register(dimse.C_GET_RQ, GET_MODELS, "get", _factory)
