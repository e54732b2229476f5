"""Verification Service Class SCP (PS3.4 Annex A): C-ECHO, answered once from the command alone."""

from __future__ import annotations

from appliance import errors
from appliance.config import Config
from appliance.net.service import AnswerOnce, Request, Response
from appliance.services.rights import refusal


def echo_handler(config: Config, request: Request) -> AnswerOnce:
    """Success, or Not Authorized (logged) for a peer without the echo right."""
    return AnswerOnce(refusal(config, request, "echo") or Response(errors.SUCCESS))
