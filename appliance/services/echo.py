"""Verification Service Class SCP (PS3.4 Annex A): C-ECHO."""

from __future__ import annotations

from collections.abc import AsyncIterator

from appliance import errors
from appliance.config import Config
from appliance.net.service import Request, Response
from appliance.services.rights import refusal


class EchoHandler:
    """Success, or Not Authorized for a peer without the echo right."""

    def __init__(self, config: Config, request: Request) -> None:
        self.response = refusal(config, request, "echo") or Response(errors.SUCCESS)

    def feed(self, data: memoryview) -> None:
        pass  # a C-ECHO-RQ has no dataset; one that says otherwise gets its bytes dropped

    async def responses(self) -> AsyncIterator[Response]:
        yield self.response

    def cancel(self) -> None:
        pass

    def abandon(self) -> None:
        pass
