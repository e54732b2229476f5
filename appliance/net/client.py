"""The requestor role on the same Upper Layer code: used by the benchmark driver (and later C-MOVE
sub-operations and forwarding).

A-ASSOCIATE-RQ/AC/RJ go through pynetdicom's PDU codecs; P-DATA is framed by net/pdu.py. One outstanding
DIMSE request at a time (no asynchronous operations window), as modalities do.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from ssl import SSLContext

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ
from pynetdicom.pdu import A_ASSOCIATE_RQ as RQ_PDU
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext

from appliance.dicom.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from appliance.net import dimse, pdu

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"


class AssociationRejected(Exception):
    def __init__(self, result: int, source: int, reason: int) -> None:
        super().__init__(f"association rejected (result {result}, source {source}, reason {reason})")
        self.result, self.source, self.reason = result, source, reason


class AssociationAborted(Exception):
    pass


@dataclass
class Accepted:
    context_id: int
    abstract_syntax: str
    transfer_syntax: str


class ClientAssociation(asyncio.BufferedProtocol):
    """One association we requested. Use ``await ClientAssociation.open(...)``."""

    def __init__(self, max_pdu: int) -> None:
        self.framer = pdu.PDUFramer(max_pdu, max_other=max(65536, max_pdu))
        self.transport: asyncio.Transport | None = None
        self.max_pdu = max_pdu
        self.peer_max_pdu = 0
        self.accepted: dict[tuple[str, str], int] = {}  # (abstract syntax, transfer syntax) -> context id
        self._waiter: asyncio.Future[object] | None = None
        self._command = bytearray()
        self._message_id = 0
        self.closed = asyncio.get_running_loop().create_future()
        self._writable: asyncio.Future[None] | None = None  # set while the transport's buffer is above its limit
        self.send_lock = asyncio.Lock()

    # ---- asyncio callbacks ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.framer.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.framer.advance(nbytes)
        try:
            for pdu_type, body in self.framer.pdus():
                self._on_pdu(pdu_type, body)
        except (pdu.PDUError, dimse.CommandError) as exc:
            self._fail(AssociationAborted(f"bad PDU from the peer: {exc}"))
            self.abort()

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    async def _drain(self) -> None:
        while self._writable is not None and not self._writable.done():
            await asyncio.shield(self._writable)

    def connection_lost(self, exc: Exception | None) -> None:
        self.resume_writing()
        self._fail(AssociationAborted("connection closed by the peer"))
        if not self.closed.done():
            self.closed.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)

    def _resolve(self, value: object) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(value)

    def _on_pdu(self, pdu_type: int, body: memoryview) -> None:
        raw = pdu.HEADER.pack(pdu_type, len(body)) + body
        if pdu_type == pdu.A_ASSOCIATE_AC:
            ac = A_ASSOCIATE_AC()
            ac.decode(raw)
            self._resolve(ac.to_primitive())
        elif pdu_type == pdu.A_ASSOCIATE_RJ:
            rj = A_ASSOCIATE_RJ()
            rj.decode(raw)
            self._fail(AssociationRejected(int(rj.result or 0), int(rj.source or 0), int(rj.reason_diagnostic or 0)))
        elif pdu_type == pdu.P_DATA_TF:
            for pdv in pdu.iter_pdvs(body):
                if not pdv.is_command:
                    continue  # responses we use carry no dataset
                self._command += pdv.data
                if pdv.is_last:
                    command = dimse.decode_command(bytes(self._command))
                    self._command.clear()
                    self._resolve(command)
        elif pdu_type == pdu.A_RELEASE_RP:
            self._resolve(None)
        elif pdu_type == pdu.A_ABORT:
            self._fail(AssociationAborted("peer sent A-ABORT"))
        elif pdu_type == pdu.A_RELEASE_RQ:
            self._send(pdu.RELEASE_RP_PDU)

    def _send(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise AssociationAborted("connection is closed")
        self.transport.write(data)

    async def _expect(self) -> object:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            return await self._waiter
        finally:
            self._waiter = None

    # ---- API ----

    @classmethod
    async def open(
        cls, host: str, port: int, called_ae: str, calling_ae: str,
        contexts: list[tuple[str, list[str]]], max_pdu: int = 1 << 20,
        roles: tuple[tuple[str, bool, bool], ...] = (),
        connect_timeout: float | None = None, associate_timeout: float | None = None,
        ssl: SSLContext | None = None,
    ) -> ClientAssociation:
        """Request an association. ``roles``: SCP/SCU role selection items (SOP class, SCU role, SCP role), e.g. to
        report Storage Commitment results as its SCP on an association we request. The timeouts (seconds, None:
        none) bound the TCP connect (with the TLS handshake when ``ssl`` is given: DICOM over TLS, the peer's
        certificate checked against ``host``) and then the wait for A-ASSOCIATE-AC/RJ; TimeoutError when exceeded."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(connect_timeout):
            _transport, assoc = await loop.create_connection(lambda: cls(max_pdu), host, port, ssl=ssl,
                                                             server_hostname=host if ssl is not None else None)
        try:
            async with asyncio.timeout(associate_timeout):
                await assoc._request(called_ae, calling_ae, contexts, list(roles))
        except BaseException:
            assoc.abort()
            raise
        return assoc

    async def _request(self, called_ae: str, calling_ae: str, contexts: list[tuple[str, list[str]]],
                       roles: list[tuple[str, bool, bool]]) -> None:
        rq = A_ASSOCIATE()
        rq.application_context_name = APPLICATION_CONTEXT
        rq.calling_ae_title = calling_ae
        rq.called_ae_title = called_ae
        proposed = []
        for i, (abstract, syntaxes) in enumerate(contexts):
            cx = PresentationContext()
            cx.context_id = 2 * i + 1
            cx.abstract_syntax = abstract
            cx.transfer_syntax = [UID(ts) for ts in syntaxes]
            proposed.append(cx)
        rq.presentation_context_definition_list = proposed
        max_len = MaximumLengthNotification()
        max_len.maximum_length_received = self.max_pdu
        impl_uid = ImplementationClassUIDNotification()
        impl_uid.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        impl_name = ImplementationVersionNameNotification()
        impl_name.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        role_items = []
        for sop_class, scu_role, scp_role in roles:
            role = SCP_SCU_RoleSelectionNegotiation()
            role.sop_class_uid = sop_class
            role.scu_role, role.scp_role = scu_role, scp_role
            role_items.append(role)
        rq.user_information = [max_len, impl_uid, impl_name, *role_items]
        out = RQ_PDU()
        out.from_primitive(rq)
        self._send(out.encode())
        ac = await self._expect()
        assert isinstance(ac, A_ASSOCIATE)
        by_id = {cx.context_id: cx for cx in proposed}
        for cx in ac.presentation_context_definition_results_list:
            if cx.result == 0x00 and cx.context_id in by_id:
                self.accepted[(str(by_id[cx.context_id].abstract_syntax), str(cx.transfer_syntax[0]))] = int(
                    cx.context_id or 0)
        for item in ac.user_information:
            if isinstance(item, MaximumLengthNotification):
                self.peer_max_pdu = int(item.maximum_length_received or 0)

    def context_for(self, sop_class: str, transfer_syntax: str) -> int | None:
        return self.accepted.get((sop_class, transfer_syntax))

    async def _request_response(self, context_id: int, command: bytes, dataset: bytes | memoryview | None) -> int:
        data = b"".join(pdu.p_data_pdus(context_id, command, True, self.peer_max_pdu))
        if dataset is not None:
            data += b"".join(pdu.p_data_pdus(context_id, dataset, False, self.peer_max_pdu))
        self._send(data)
        response = await self._expect()
        assert isinstance(response, dimse.Command)
        return int(response.status if response.status is not None else -1)

    async def request(self, context_id: int, command: bytes, dataset: AsyncIterator[bytes] | bytes | None,
                      timeout: float) -> dimse.Command:
        """Send one request and its dataset (bytes, or streamed chunk by chunk with flow control so memory stays
        bounded for any size), then wait up to ``timeout`` seconds for the response command. Build ``command``
        with ``next_message_id()``."""
        async with self.send_lock:
            self._send(b"".join(pdu.p_data_pdus(context_id, command, True, self.peer_max_pdu)))
            if isinstance(dataset, bytes | bytearray | memoryview):
                self._send(b"".join(pdu.p_data_pdus(context_id, dataset, False, self.peer_max_pdu)))
            elif dataset is not None:
                held: bytes | None = None
                async for chunk in dataset:
                    if not chunk:
                        continue
                    if held is not None:
                        await self._drain()
                        self._send(b"".join(pdu.p_data_pdus(context_id, held, False, self.peer_max_pdu, final=False)))
                    held = chunk
                await self._drain()
                self._send(b"".join(pdu.p_data_pdus(context_id, held or b"", False, self.peer_max_pdu)))
            async with asyncio.timeout(timeout):
                response = await self._expect()
        assert isinstance(response, dimse.Command)
        return response

    def next_message_id(self) -> int:
        return self._next_id()

    def _next_id(self) -> int:
        self._message_id = self._message_id % 65535 + 1
        return self._message_id

    async def echo(self) -> int:
        context_id = self.context_for("1.2.840.10008.1.1", "1.2.840.10008.1.2")
        if context_id is None:
            context_id = next(cid for (abstract, _ts), cid in self.accepted.items() if abstract == "1.2.840.10008.1.1")
        return await self._request_response(context_id, dimse.echo_request(self._next_id()), None)

    async def store(self, sop_class: str, sop_instance: str, transfer_syntax: str, dataset: bytes | memoryview) -> int:
        """C-STORE ``dataset`` (the encoded dataset, no File Meta); returns the response status."""
        context_id = self.context_for(sop_class, transfer_syntax)
        if context_id is None:
            raise ValueError(f"no accepted presentation context for {sop_class} in {transfer_syntax}")
        command = dimse.store_request(self._next_id(), sop_class, sop_instance)
        return await self._request_response(context_id, command, dataset)

    async def release(self) -> None:
        self._send(pdu.RELEASE_RQ_PDU)
        try:
            # Awaited directly, so the waiter exists before the loop runs again: wait_for() would start _expect()
            # in a new task, and under uvloop an A-RELEASE-RP (and the close) could arrive before it, be dropped,
            # and turn a clean release into "connection closed by the peer".
            async with asyncio.timeout(30):
                await self._expect()
        finally:
            if self.transport is not None:
                self.transport.close()
            await self.closed

    def abort(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(pdu.abort_pdu(0x00))
            self.transport.close()
