"""Per-peer rights (issue 9 item 5), checked by every service handler in the same way: a peer without the right
gets Refused: Not Authorized (0x0124) and one log line naming the AE title, the address and the service, never
patient data. The association-level checks (called AE title, unknown calling AE, the peer's host) are in
net/association.py; a refusal here leaves the association open for what the peer may do."""

from __future__ import annotations

import logging

from appliance import errors
from appliance.config import Config
from appliance.net.service import Request, Response

log = logging.getLogger(__name__)


def refusal(config: Config, request: Request, right: str) -> Response | None:
    """None when ``request``'s peer has ``right``; else the response to send (and the refusal is logged)."""
    if config.allows(request.peer, right):
        return None
    who = f"peer {request.peer.name!r}" if request.peer is not None else "an AE title not under [peers]"
    session = request.session
    # Once per right and association at warning: a peer without the store right sending a CT is one line.
    first = session is None or right not in session.refusals
    log.log(logging.WARNING if first else logging.DEBUG, "%s (%s, %s) is not allowed to %s: refused",
            request.calling_ae, who, request.address, right.replace("_", " "))
    if session is not None:
        session.refused(right, errors.NOT_AUTHORIZED)
    return Response(errors.NOT_AUTHORIZED, f"{request.calling_ae} may not {right.replace('_', ' ')}")
