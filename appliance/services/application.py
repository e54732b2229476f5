"""The storage appliance's Application (net/service.py): dispatch of DIMSE requests to the service handlers by
command field and SOP class, as pynetdicom dispatches by SOP class."""

from __future__ import annotations

from collections.abc import AsyncIterator

from appliance import errors
from appliance.net import dimse
from appliance.net.service import AnswerOnce, Handler, Request, Response
from appliance.services import commitment, find, get, move  # noqa: F401  (they register in SERVICES on import)
from appliance.services.context import WorkerContext
from appliance.services.echo import echo_handler
from appliance.services.registry import SERVICES
from appliance.services.rights import refusal
from appliance.services.store import StoreOperation


class StoreHandler:
    """Adapter from the Handler interface to StoreOperation (feed / finish -> StoreResult / abandon)."""

    def __init__(self, ctx: WorkerContext, request: Request) -> None:
        self.op = StoreOperation(ctx, request.command, request.abstract_syntax, request.transfer_syntax,
                                 request.calling_ae, request.peer, request.session)
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
        command = request.command
        field = command.command_field
        if field == dimse.C_ECHO_RQ:
            return echo_handler(self.ctx.config, request)
        if field == dimse.C_STORE_RQ:
            if not command.has_dataset:
                # Refused before a StoreOperation (and its spool) exists.
                return AnswerOnce(Response(errors.CANNOT_UNDERSTAND, "C-STORE without a dataset"))
            # Checked here like every other right, so that the refusal is logged (StoreOperation only answers it)
            # and costs no spool; AnswerOnce drops the dataset as it arrives.
            refused = refusal(self.ctx.config, request, "store")
            if refused is not None:
                return AnswerOnce(refused)
            return StoreHandler(self.ctx, request)
        service = SERVICES.get((field, request.abstract_syntax))
        if service is None:
            if any(f == field for f, _ in SERVICES):
                # A known operation on a context of another SOP class (a C-FIND on a storage context).
                return AnswerOnce(Response(errors.SOP_CLASS_NOT_SUPPORTED, "operation not served for this SOP class"))
            return None
        if command.sop_class_uid and command.sop_class_uid != request.abstract_syntax:
            return AnswerOnce(Response(errors.SOP_CLASS_NOT_SUPPORTED, "SOP class differs from the context's"))
        right, factory = service
        refused = refusal(self.ctx.config, request, right)
        if refused is not None:
            return AnswerOnce(refused)
        return factory(self.ctx, request)
