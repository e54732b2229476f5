"""Verification Service Class SCP (PS3.4 Annex A): C-ECHO."""

from __future__ import annotations

from collections.abc import AsyncIterator

from appliance import errors
from appliance.net.service import Request, Response


class EchoHandler:
    """Success, or Not Authorized for a known peer with ``allow_echo = false``."""

    def __init__(self, request: Request) -> None:
        peer = request.peer
        self.status = errors.NOT_AUTHORIZED if peer is not None and not peer.allow_echo else errors.SUCCESS

    def feed(self, data: memoryview) -> None:
        pass  # a C-ECHO-RQ has no dataset; one that says otherwise gets its bytes dropped

    async def responses(self) -> AsyncIterator[Response]:
        yield Response(self.status)

    def cancel(self) -> None:
        pass

    def abandon(self) -> None:
        pass
