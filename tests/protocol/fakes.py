"""An AssociationProtocol on a fake transport: whole association exchanges in-process, in milliseconds."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CollectorRegistry
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context

from appliance.config import Config, ServerConfig
from appliance.metrics import Metrics
from appliance.net import dimse, pdu
from appliance.net.association import AssociationProtocol, Endpoint
from appliance.net.service import Request, Response

VERIFICATION = "1.2.840.10008.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
HEADER = struct.Struct(">BxL")


class FakeTransport:
    def __init__(self, peer: tuple[str, int] = ("10.0.0.7", 40000)) -> None:
        self.peer = peer
        self.out = bytearray()
        self.closed = self.aborted = self.eof_written = self.reading_paused = False
        self.buffered = 0  # what get_write_buffer_size reports
        self.high = 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        assert not self.eof_written, "write after write_eof"  # uvloop raises RuntimeError
        self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high = high or 0

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        self.reading_paused = False

    def pdus(self) -> list[tuple[int, bytes]]:
        """Everything written so far, as (type, body); consumes it."""
        out, data = [], bytes(self.out)
        self.out.clear()
        while data:
            pdu_type, length = HEADER.unpack_from(data)
            out.append((pdu_type, data[6 : 6 + length]))
            data = data[6 + length :]
        return out


class Recorder:
    """An Application whose handlers record what they got; ``script`` maps a command field to responses."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.fed: list[bytes] = []
        self.cancelled = 0
        self.abandoned = 0
        self.gate: asyncio.Event | None = None  # when set, handlers answer Pending until cancelled

    def handler(self, request: Request) -> Any:
        if request.command.command_field not in (dimse.C_ECHO_RQ, dimse.C_STORE_RQ, dimse.C_FIND_RQ):
            return None
        self.requests.append(request)
        return _Handler(self)


class _Handler:
    def __init__(self, app: Recorder) -> None:
        self.app = app
        self.cancelled = asyncio.Event()

    def feed(self, data: memoryview) -> None:
        self.app.fed.append(bytes(data))

    async def responses(self) -> AsyncIterator[Response]:
        if self.app.gate is not None:
            while not self.cancelled.is_set():
                yield Response(0xFF00)
                await asyncio.sleep(0.001)
            yield Response(0xFE00)
            return
        yield Response(0x0000)

    def cancel(self) -> None:
        self.app.cancelled += 1
        self.cancelled.set()

    def abandon(self) -> None:
        self.app.abandoned += 1


def endpoint(app: Any = None, **server: Any) -> Endpoint:
    cfg = Config(server=ServerConfig(**{"host": "127.0.0.1", "port": 0, **server}))
    return Endpoint(cfg, app or Recorder(), Metrics(CollectorRegistry()))


def associate_rq(calling: str = "SCU", called: str = "APPLIANCE", max_pdu: int | None = 16384,
                 syntaxes: tuple[str, ...] = (VERIFICATION, CT), extra_contexts: int = 0) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    contexts = []
    for i, uid in enumerate(syntaxes + (CT,) * extra_contexts):
        cx = build_context(uid, [EXPLICIT])
        cx.context_id = (2 * i + 1) % 256
        contexts.append(cx)
    primitive.presentation_context_definition_list = contexts
    items = []
    if max_pdu is not None:
        item = MaximumLengthNotification()
        item.maximum_length_received = max_pdu
        items.append(item)
    primitive.user_information = items
    out = A_ASSOCIATE_RQ()
    out.from_primitive(primitive)
    return bytes(out.encode())


def connect(ep: Endpoint, peer: tuple[str, int] = ("10.0.0.7", 40000)) -> tuple[AssociationProtocol, FakeTransport]:
    proto = AssociationProtocol(ep)
    transport = FakeTransport(peer)
    proto.connection_made(transport)  # type: ignore[arg-type]
    return proto, transport


def receive(proto: AssociationProtocol, data: bytes, chunk: int = 0) -> None:
    """What the event loop does with bytes from the socket (in chunks of ``chunk``, 0 = all at once)."""
    step = chunk or len(data) or 1
    for i in range(0, len(data), step):
        part = data[i : i + step]
        buf = proto.get_buffer(len(part))
        buf[: len(part)] = part
        proto.buffer_updated(len(part))


def associated(ep: Endpoint, **kwargs: Any) -> tuple[AssociationProtocol, FakeTransport]:
    proto, transport = connect(ep)
    receive(proto, associate_rq(**kwargs))
    got = transport.pdus()
    assert [t for t, _ in got] == [pdu.A_ASSOCIATE_AC], got
    return proto, transport


def echo_pdu(message_id: int = 1, context_id: int = 1) -> bytes:
    return b"".join(pdu.p_data_pdus(context_id, dimse.echo_request(message_id), True, 0))


def simple_pdu(pdu_type: int, body: bytes = b"\x00" * 4) -> bytes:
    return HEADER.pack(pdu_type, len(body)) + body


def statuses(pdus: list[tuple[int, bytes]]) -> list[int]:
    """The Status of every DIMSE response in these P-DATA-TF PDUs (one command per PDU)."""
    out = []
    for pdu_type, body in pdus:
        if pdu_type != pdu.P_DATA_TF:
            continue
        for pdv in pdu.iter_pdvs(memoryview(body)):
            if pdv.is_command:
                command = dimse.decode_command(bytes(pdv.data))
                assert command.status is not None
                out.append(command.status)
    return out
