"""The storage appliance's Application (net/service.py): dispatch of DIMSE requests to the service handlers by
command field, as pynetdicom dispatches by SOP class. Query/Retrieve and Storage Commitment add entries here."""

from __future__ import annotations

from collections.abc import AsyncIterator

from appliance import errors
from appliance.net import dimse
from appliance.net.service import AnswerOnce, Handler, Request, Response
from appliance.services.context import WorkerContext
from appliance.services.echo import EchoHandler
from appliance.services.store import StoreOperation


class StoreHandler:
    """Adapter from the Handler interface to StoreOperation (feed / finish -> StoreResult / abandon)."""

    def __init__(self, ctx: WorkerContext, request: Request) -> None:
        self.op = StoreOperation(ctx, request.command, request.abstract_syntax, request.transfer_syntax,
                                 request.calling_ae, request.peer)
        self.finishing = False

    def feed(self, data: memoryview) -> None:
        self.op.feed(data)

    async def responses(self) -> AsyncIterator[Response]:
        self.finishing = True
        result = await self.op.finish()
        yield Response(result.status, result.comment)

    def cancel(self) -> None:
        pass  # PS3.7 9.3.1: C-STORE has no cancel; the instance is stored or refused whole

    def abandon(self) -> None:
        if not self.finishing:  # once finishing, the group commit owns the spool and answers for it
            self.op.abandon()


class StorageApplication:
    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx

    def handler(self, request: Request) -> Handler | None:
        field = request.command.command_field
        if field == dimse.C_ECHO_RQ:
            return EchoHandler(request)
        if field == dimse.C_STORE_RQ:
            if not request.command.has_dataset:
                # Refused before a StoreOperation (and its spool) exists.
                return AnswerOnce(Response(errors.CANNOT_UNDERSTAND, "C-STORE without a dataset"))
            return StoreHandler(self.ctx, request)
        return None
