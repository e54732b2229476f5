"""The PeerChannel seam (net/service.py): a handler sending requests of its own on the association its request came
on (C-GET sub-operations, N-EVENT-REPORT), on a fake transport."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification, SCP_SCU_RoleSelectionNegotiation
from pynetdicom.presentation import build_context

from appliance.dicom.uids import STUDY_ROOT_GET
from appliance.net import dimse, pdu
from appliance.net.service import AnswerOnce, ChannelClosed, Request, Response
from tests.protocol.fakes import CT, EXPLICIT, VERIFICATION, connect, echo_pdu, endpoint, receive, statuses
from tests.protocol.test_states import in_loop


def associate_rq(role: tuple[bool, bool] | None) -> bytes:
    """Verification, the Study Root GET model and CT Image Storage, with an optional role selection for CT."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "GETSCU"
    primitive.called_ae_title = "APPLIANCE"
    contexts = []
    for i, uid in enumerate((VERIFICATION, STUDY_ROOT_GET, CT)):
        cx = build_context(uid, [EXPLICIT])
        cx.context_id = 2 * i + 1
        contexts.append(cx)
    primitive.presentation_context_definition_list = contexts
    max_len = MaximumLengthNotification()
    max_len.maximum_length_received = 16384
    items: list[Any] = [max_len]
    if role is not None:
        item = SCP_SCU_RoleSelectionNegotiation()
        item.sop_class_uid = CT
        item.scu_role, item.scp_role = role
        items.append(item)
    primitive.user_information = items
    out = A_ASSOCIATE_RQ()
    out.from_primitive(primitive)
    return bytes(out.encode())


class SubOperations:
    """An Application whose C-GET handler stores ``chunks`` on the requester's association as one C-STORE, then
    answers with the counts; what happened is kept for the test."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.sent: list[dimse.Command] = []
        self.errors: list[BaseException] = []
        self.abandoned = 0

    def handler(self, request: Request) -> Any:
        if request.command.command_field == dimse.C_ECHO_RQ:
            return AnswerOnce(Response(0x0000))
        return _Get(self, request)


class _Get(AnswerOnce):
    def __init__(self, app: SubOperations, request: Request) -> None:
        super().__init__(Response(0x0000))
        self.app, self.request = app, request

    async def chunks(self) -> AsyncIterator[bytes]:
        for chunk in self.app.chunks:
            await asyncio.sleep(0)
            yield chunk

    async def responses(self) -> AsyncIterator[Response]:
        channel = self.request.channel
        assert channel is not None
        contexts = channel.contexts(CT, peer_scp=True)
        if not contexts:
            yield Response(0xA702, "no context on which the requester is a Storage SCP")
            return
        try:
            rsp = await channel.request(contexts[EXPLICIT],
                                        lambda mid: dimse.store_request(mid, CT, "1.2.3.4", 0, "GETSCU", 7),
                                        self.chunks(), timeout=5)
        except (ChannelClosed, TimeoutError) as exc:
            self.app.errors.append(exc)
            raise
        self.app.sent.append(rsp)
        yield Response(0xFF00, extra=dimse.sub_operation_counts(0, 1, 0, 0))
        yield Response(0x0000, extra=dimse.sub_operation_counts(None, 1, 0, 0))

    def abandon(self) -> None:
        self.app.abandoned += 1


def get_rq(message_id: int = 1) -> bytes:
    command = dimse.encode_command([
        (dimse.AFFECTED_SOP_CLASS_UID, dimse.ui(STUDY_ROOT_GET)),
        (dimse.COMMAND_FIELD, dimse.us(dimse.C_GET_RQ)),
        (dimse.MESSAGE_ID, dimse.us(message_id)),
        (dimse.PRIORITY, dimse.us(0)),
        (dimse.COMMAND_DATA_SET_TYPE, dimse.us(dimse.HAS_DATASET)),
    ])
    return (b"".join(pdu.p_data_pdus(3, command, True, 0))
            + b"".join(pdu.p_data_pdus(3, b"\x08\x00\x52\x00\x06\x00STUDY ", False, 0)))


def store_rsp(message_id: int, with_dataset: bool = False) -> bytes:
    command = dimse.response(dimse.C_STORE_RSP, message_id, 0x0000, CT, "1.2.3.4", has_dataset=with_dataset)
    out = b"".join(pdu.p_data_pdus(5, command, True, 0))
    if with_dataset:
        out += b"".join(pdu.p_data_pdus(5, b"\x00" * 100, False, 0))
    return out


def messages(pdus: list[tuple[int, bytes]]) -> list[tuple[bool, bool, int, bytes]]:
    """Every PDV written: (is_command, is_last, context id, data)."""
    out = []
    for pdu_type, body in pdus:
        if pdu_type == pdu.P_DATA_TF:
            out.extend((p.is_command, p.is_last, p.context_id, bytes(p.data)) for p in pdu.iter_pdvs(memoryview(body)))
    return out


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def accepted(role: tuple[bool, bool] | None, app: Any) -> tuple[Any, Any]:
    proto, transport = connect(endpoint(app))
    receive(proto, associate_rq(role))
    out = transport.pdus()
    assert [t for t, _ in out] == [pdu.A_ASSOCIATE_AC]
    return proto, transport


@in_loop
async def test_role_selection_marks_the_contexts_a_get_may_store_on() -> None:
    proto, transport = connect(endpoint(SubOperations([])))
    receive(proto, associate_rq((False, True)))
    (_t, body), = transport.pdus()
    ac = A_ASSOCIATE_AC()
    ac.decode(bytes([pdu.A_ASSOCIATE_AC, 0]) + len(body).to_bytes(4, "big") + body)
    roles = [i for i in ac.to_primitive().user_information if isinstance(i, SCP_SCU_RoleSelectionNegotiation)]
    assert [(str(r.sop_class_uid), r.scu_role, r.scp_role) for r in roles] == [(CT, False, True)]
    assert proto.contexts(CT, peer_scp=True) == {EXPLICIT: 5}
    assert proto.contexts(CT) == {EXPLICIT: 5}
    assert proto.contexts(STUDY_ROOT_GET, peer_scp=True) == {}


@in_loop
async def test_without_role_selection_the_peer_is_no_storage_scp() -> None:
    app = SubOperations([b"x" * 10])
    proto, transport = accepted(None, app)
    assert proto.contexts(CT, peer_scp=True) == {}
    receive(proto, get_rq())
    await settle()
    assert statuses(transport.pdus()) == [0xA702]


@in_loop
async def test_a_sub_operation_is_streamed_on_the_same_association_and_its_response_routed_back() -> None:
    app = SubOperations([b"a" * 10_000, b"b" * 30_000, b"c" * 5])
    proto, transport = accepted((False, True), app)
    receive(proto, get_rq(message_id=9))
    await settle()
    sent = messages(transport.pdus())
    command = dimse.decode_command(sent[0][3])
    assert sent[0][:3] == (True, True, 5) and command.command_field == dimse.C_STORE_RQ
    assert command.move_originator_ae == "GETSCU" and command.move_originator_message_id == 7
    data = sent[1:]
    assert all(not is_command and context == 5 for is_command, _, context, _ in data)
    assert [last for _, last, _, _ in data] == [False] * (len(data) - 1) + [True]  # only the very last fragment
    assert b"".join(d for *_, d in data) == b"a" * 10_000 + b"b" * 30_000 + b"c" * 5
    assert all(len(d) <= 16384 - 6 for *_, d in data)  # within the peer's maximum PDU length

    receive(proto, store_rsp(command.message_id, with_dataset=True))  # a response dataset is read and dropped
    await settle()
    out = transport.pdus()
    assert statuses(out) == [0xFF00, 0x0000]
    final = dimse.decode_command(messages(out)[-1][3])
    assert final.message_id_responded_to == 9 and final.sub_operations == (None, 1, 0, 0)
    assert app.sent[0].status == 0 and not app.errors
    receive(proto, echo_pdu(message_id=10))  # the association goes on normally
    await settle()
    assert statuses(transport.pdus()) == [0x0000]


@in_loop
async def test_a_response_nobody_waits_for_is_dropped_not_answered() -> None:
    proto, transport = accepted((False, True), SubOperations([]))
    receive(proto, store_rsp(4242))
    await settle()
    assert transport.pdus() == [] and not transport.closed


@in_loop
async def test_the_peer_leaving_fails_the_waiting_request() -> None:
    app = SubOperations([b"z" * 100])
    proto, transport = accepted((False, True), app)
    receive(proto, get_rq())
    await settle()
    assert transport.pdus()  # the C-STORE-RQ went out; no response comes
    proto.connection_lost(None)
    await settle()
    assert len(app.errors) == 1 and isinstance(app.errors[0], ChannelClosed)
    assert app.abandoned == 1 and not proto.awaiting


@in_loop
async def test_no_response_is_written_between_the_fragments_of_a_request() -> None:
    app = SubOperations([b"a" * 20_000, b"b" * 20_000])
    proto, transport = accepted((False, True), app)
    proto.pause_writing()  # the peer does not read: the C-STORE waits before its first fragment
    receive(proto, get_rq())
    await settle()
    receive(proto, echo_pdu(message_id=2, context_id=1))  # still readable in the test: answered only after
    await settle()
    assert messages(transport.pdus()) == []
    proto.resume_writing()
    await settle()
    sent = messages(transport.pdus())
    kinds = [(is_command, context) for is_command, _, context, _ in sent]
    store_end = max(i for i, (is_command, context) in enumerate(kinds) if context == 5)
    echo_at = next(i for i, (is_command, context) in enumerate(kinds) if is_command and context == 1)
    assert echo_at > store_end  # the C-ECHO-RSP came after the last fragment of the C-STORE-RQ


class _Silent(AnswerOnce):
    """A handler that yields Pending responses and then ends without a final one (a bug the association covers)."""

    def __init__(self, pending: int) -> None:
        super().__init__(Response(0xFF00))
        self.pending = pending

    async def responses(self) -> AsyncIterator[Response]:
        for _ in range(self.pending):
            yield Response(0xFF00, dataset=b"\x08\x00\x52\x00\x06\x00STUDY ")


class Streams:
    def __init__(self, pending: int) -> None:
        self.pending = pending

    def handler(self, request: Request) -> Any:
        return _Silent(self.pending)


@in_loop
async def test_a_handler_without_a_final_response_still_answers_the_peer() -> None:
    proto, transport = accepted(None, Streams(2))
    receive(proto, get_rq(message_id=3))
    await settle()
    assert statuses(transport.pdus()) == [0xFF00, 0xFF00, 0xC211]


@in_loop
async def test_pending_responses_wait_for_a_peer_that_does_not_read() -> None:
    proto, transport = accepted(None, Streams(50))
    proto.pause_writing()
    receive(proto, get_rq(message_id=3))
    await settle()
    assert statuses(transport.pdus()) == []  # nothing piles up in the output while the peer does not read
    proto.resume_writing()
    await settle()
    assert statuses(transport.pdus()) == [0xFF00] * 50 + [0xC211]
