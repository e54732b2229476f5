"""The one interface between the network layer and the services (issue 8 item 6).

The association (net/association.py) knows PDUs, DIMSE command sets and association state; it knows nothing
about storage. For every DIMSE request it asks the ``Application`` for a ``Handler`` (dispatch by command field
and SOP class is the application's business, as in pynetdicom), feeds it the request's dataset fragments as
they arrive, then sends every ``Response`` the handler yields: zero or more Pending, then one final. A C-CANCEL
for the request reaches ``Handler.cancel``; an association that ends early calls ``Handler.abandon``.
Modelled on the protocol/app split of ASGI servers: the protocol owns the socket, the app owns the meaning.

Only ``appliance.net`` and ``appliance.config`` types appear here, so services import the network layer and
never the other way round (checked by the import-linter contracts in pyproject.toml).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from appliance.audit import Session
from appliance.config import PeerConfig
from appliance.net.dimse import Command


class ChannelClosed(Exception):
    """The association ended (or is ending) before the peer answered a request we sent on it."""


class PeerChannel(Protocol):
    """The association a request came on, as its handler may use it to send requests of its own to the peer and
    await their responses: C-GET's C-STORE sub-operations, Storage Commitment's N-EVENT-REPORT. One message is sent
    at a time (fragments of two messages never interleave); responses to the peer's own requests wait their turn."""

    @property
    def is_open(self) -> bool:
        """True while requests can still be sent (associated, not aborted or closed)."""
        ...

    def contexts(self, abstract_syntax: str, peer_scp: bool = False) -> dict[str, int]:
        """Transfer syntax -> presentation context id of the accepted contexts for ``abstract_syntax``. With
        ``peer_scp``, only those on which SCP/SCU role selection lets the peer act as SCP (PS3.7 D.3.3.4): the
        contexts a C-GET may send C-STORE-RQs on."""
        ...

    async def request(self, context_id: int, command: Callable[[int], bytes],
                      dataset: AsyncIterator[bytes] | None, timeout: float) -> Command:
        """Send a request (``command(message_id)`` -> encoded command set) and its dataset, streamed chunk by chunk
        with the association's flow control, then wait up to ``timeout`` seconds for the peer's response command
        (any response dataset is read and dropped). Raises ChannelClosed if the association ends first and
        TimeoutError if the peer does not answer in time (the association stays up: the caller decides)."""
        ...


UNKNOWN_AE = "unknown"  # the calling_ae metric label of every AE title that is not a configured [peers] ae_title


def peer_label(peer: PeerConfig | None) -> str:
    """The calling_ae metric label of an association: its [peers] entry's AE title, else "unknown". A calling AE
    title is whatever the peer sends (16 bytes of its choosing): as a label it would grow the series without bound,
    so only titles the operator configured become labels. ``peer`` is looked up in the config the association
    uses, so a reload (SIGHUP) changes the label of the next association, never of a running one."""
    return peer.ae_title if peer is not None else UNKNOWN_AE


@dataclass(frozen=True)
class Request:
    """One DIMSE request as the association received it."""

    command: Command
    context_id: int
    abstract_syntax: str  # of the presentation context the command came on
    transfer_syntax: str  # negotiated for that context: the encoding of any dataset
    calling_ae: str
    peer: PeerConfig | None  # the calling AE's [peers] entry, if any
    address: str  # source host of the connection (no port)
    channel: PeerChannel | None = None  # the association itself, for requests to the peer (None in unit tests)
    session: Session | None = None  # the association's audit counts and lines (appliance/audit.py)

    @property
    def ae_label(self) -> str:
        return peer_label(self.peer)


@dataclass
class Response:
    """One response to a request; ``status`` in the Pending range (0xFF00, 0xFF01) means more will follow."""

    status: int
    comment: str = ""
    dataset: bytes | None = None  # an identifier (C-FIND) or other response dataset, in the context's syntax
    affected_sop_instance_uid: str | None = None  # None: the request's
    extra: tuple[tuple[int, bytes], ...] = ()  # more command elements: sub-operation counts, Action Type ID

    @property
    def is_pending(self) -> bool:
        return self.status in (0xFF00, 0xFF01)


class Handler(Protocol):
    """One request in progress. ``feed`` is called for each dataset fragment (a view into the receive buffer:
    copy what must outlive the call), then ``responses`` once. ``cancel`` and ``abandon`` may come at any
    time, also before ``responses``, and must be cheap and idempotent."""

    def feed(self, data: memoryview) -> None: ...

    def responses(self) -> AsyncIterator[Response]: ...

    def cancel(self) -> None: ...

    def abandon(self) -> None: ...


class Application(Protocol):
    def handler(self, request: Request) -> Handler | None:
        """The handler for ``request``, or None when this application does not know the operation (the
        association answers 0x0211, Unrecognized Operation)."""
        ...


async def single(response: Response) -> AsyncIterator[Response]:
    """``responses`` for a handler that answers once, from a value it already has."""
    yield response


class AnswerOnce:
    """A handler that answers once with a response known up front and drops any dataset (a refusal decided from the
    command alone, an unrecognized operation)."""

    def __init__(self, response: Response) -> None:
        self.response = response

    def feed(self, data: memoryview) -> None:
        pass

    async def responses(self) -> AsyncIterator[Response]:
        yield self.response

    def cancel(self) -> None:
        pass

    def abandon(self) -> None:
        pass
