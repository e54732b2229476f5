"""The acceptor's state machine on a fake transport: every state x every PDU type, and each limit of issue 8.
No sockets, no processes: the whole file runs in well under a second."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from appliance.net import dimse, pdu
from appliance.net.association import CLOSED, ESTABLISHED, REJECTED
from tests.protocol.fakes import (
    Recorder,
    associate_rq,
    associated,
    connect,
    echo_pdu,
    endpoint,
    receive,
    simple_pdu,
    statuses,
)


def in_loop(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return wrapper


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


ALL_TYPES = [0x00, *range(1, 8), 0x08, 0xFF]


def pdu_of_type(pdu_type: int) -> bytes:
    if pdu_type == pdu.A_ASSOCIATE_RQ:
        return associate_rq()
    if pdu_type == pdu.P_DATA_TF:
        return echo_pdu()
    return simple_pdu(pdu_type)


# ---- every state x every PDU type -------------------------------------------------------------------


@pytest.mark.parametrize("pdu_type", ALL_TYPES)
@in_loop
async def test_awaiting_rq(pdu_type: int) -> None:
    ep = endpoint()
    proto, transport = connect(ep)
    receive(proto, pdu_of_type(pdu_type))
    got = transport.pdus()
    if pdu_type == pdu.A_ASSOCIATE_RQ:
        assert [t for t, _ in got] == [pdu.A_ASSOCIATE_AC] and proto.state == ESTABLISHED
        assert ep.slots.in_use() == 1
        return
    # Anything else before the request: A-ABORT (unrecognized or unexpected PDU), and nothing held.
    assert [t for t, _ in got] == [pdu.A_ABORT] and transport.closed and proto.state == CLOSED
    expected = pdu.ABORT_UNRECOGNIZED_PDU if pdu_type not in pdu.PDU_TYPES else pdu.ABORT_UNEXPECTED_PDU
    assert got[0][1][3] == expected
    assert ep.slots.in_use() == 0


@pytest.mark.parametrize("pdu_type", ALL_TYPES)
@in_loop
async def test_established(pdu_type: int) -> None:
    ep = endpoint()
    proto, transport = associated(ep)
    receive(proto, pdu_of_type(pdu_type))
    await settle()
    got = transport.pdus()
    types = [t for t, _ in got]
    if pdu_type == pdu.P_DATA_TF:
        assert statuses(got) == [0] and not transport.closed
    elif pdu_type == pdu.A_RELEASE_RQ:
        assert types == [pdu.A_RELEASE_RP] and transport.closed
    elif pdu_type == pdu.A_ABORT:
        assert types == [] and transport.closed  # the peer aborted: nothing to answer
    else:
        assert types == [pdu.A_ABORT] and transport.closed
    if transport.closed:
        proto.connection_lost(None)
        assert ep.slots.in_use() == 0 and not ep.connections


@pytest.mark.parametrize("pdu_type", ALL_TYPES)
@in_loop
async def test_rejected_drops_everything_until_the_peer_closes(pdu_type: int) -> None:
    ep = endpoint()
    proto, transport = connect(ep)
    receive(proto, associate_rq(called="SOMEONE"))
    assert [t for t, _ in transport.pdus()] == [pdu.A_ASSOCIATE_RJ]
    assert proto.state == REJECTED and transport.eof_written and not transport.closed
    receive(proto, pdu_of_type(pdu_type))
    assert transport.pdus() == [] and proto.state == REJECTED
    proto.connection_lost(None)
    assert ep.slots.in_use() == 0 and not ep.connections


@pytest.mark.parametrize("pdu_type", ALL_TYPES)
@in_loop
async def test_closed_ignores_whatever_is_still_buffered(pdu_type: int) -> None:
    ep = endpoint()
    proto, transport = associated(ep)
    # A release and then more bytes in the same read: nothing after the release is acted upon.
    receive(proto, simple_pdu(pdu.A_RELEASE_RQ) + pdu_of_type(pdu_type))
    await settle()
    assert [t for t, _ in transport.pdus()][:1] == [pdu.A_RELEASE_RP]
    assert proto.state == CLOSED and ep.slots.in_use() == 0


# ---- A-ASSOCIATE-RQ pre-checks ---------------------------------------------------------------------


def rj(transport: Any) -> tuple[int, int, int]:
    got = transport.pdus()
    assert [t for t, _ in got] == [pdu.A_ASSOCIATE_RJ], got
    body = got[0][1]
    return body[1], body[2], body[3]


@in_loop
async def test_unknown_called_ae_is_rejected_before_any_decode() -> None:
    ep = endpoint()
    calls: list[bytes] = []
    real = ep.negotiator.negotiate
    ep.negotiator.negotiate = lambda raw: calls.append(raw) or real(raw)  # type: ignore[method-assign]
    proto, transport = connect(ep)
    receive(proto, associate_rq(called="OTHER"))
    assert rj(transport) == (1, 1, 7) and calls == []


@in_loop
async def test_unknown_calling_ae_is_rejected_when_configured() -> None:
    ep = endpoint(refuse_unknown_calling_ae=True)
    proto, transport = connect(ep)
    receive(proto, associate_rq(calling="STRANGER"))
    assert rj(transport) == (1, 1, 3)


@pytest.mark.parametrize("max_pdu,accepted", [(None, True), (0, True), (1, False), (6, False), (4095, False),
                                              (4096, True), (16384, True)])
@in_loop
async def test_peer_max_pdu(max_pdu: int | None, accepted: bool) -> None:
    ep = endpoint()
    proto, transport = connect(ep)
    receive(proto, associate_rq(max_pdu=max_pdu))
    if accepted:
        assert proto.state == ESTABLISHED
        receive(proto, echo_pdu())
        await settle()
        assert statuses(transport.pdus()[1:]) == [0]
    else:
        assert rj(transport) == (1, 1, 1) and ep.slots.in_use() == 0


@in_loop
async def test_too_many_presentation_contexts() -> None:
    ep = endpoint(max_presentation_contexts=4)
    proto, transport = connect(ep)
    receive(proto, associate_rq(extra_contexts=3))
    assert rj(transport) == (1, 1, 1)
    proto2, transport2 = connect(ep)
    receive(proto2, associate_rq(extra_contexts=2))
    assert proto2.state == ESTABLISHED


@in_loop
async def test_oversized_associate_rq_gets_an_rj_from_its_header_alone() -> None:
    ep = endpoint(max_associate_rq_bytes=1024)
    proto, transport = connect(ep)
    raw = associate_rq(extra_contexts=60)
    assert len(raw) > 1024
    receive(proto, raw[:6])  # the header is enough
    assert rj(transport) == (1, 1, 1) and proto.state == REJECTED
    receive(proto, raw[6:], chunk=100)  # the rest is read and dropped
    assert transport.pdus() == []


@in_loop
async def test_receive_buffer_is_small_until_the_association_is_accepted() -> None:
    ep = endpoint(max_associate_rq_bytes=8192, max_pdu=1 << 20)
    proto, _transport = connect(ep)
    assert len(proto.framer.buf) < 9000
    receive(proto, associate_rq())
    assert len(proto.framer.buf) > 1 << 20


@in_loop
async def test_request_and_pipelined_echo_in_one_read() -> None:
    ep = endpoint()
    proto, transport = connect(ep)
    receive(proto, associate_rq() + echo_pdu(7))  # the buffer grows with the echo already in it
    await settle()
    got = transport.pdus()
    assert got[0][0] == pdu.A_ASSOCIATE_AC and statuses(got[1:]) == [0]


# ---- slots and connections -------------------------------------------------------------------------


@in_loop
async def test_connections_per_worker_counts_unassociated_ones() -> None:
    ep = endpoint(max_connections_per_worker=2)
    connect(ep)
    connect(ep)
    proto, transport = connect(ep)
    assert transport.aborted and proto.state == CLOSED and len(ep.connections) == 2


@pytest.mark.parametrize("key,peers", [("max_associations_per_ae", [("A", "h1"), ("A", "h2")]),
                                       ("max_associations_per_host", [("A", "h1"), ("B", "h1")]),
                                       ("max_associations", [("A", "h1"), ("B", "h2")])])
@in_loop
async def test_association_limits(key: str, peers: list[tuple[str, str]]) -> None:
    ep = endpoint(**{key: 1})
    first, _ = connect(ep, (peers[0][1], 1))
    receive(first, associate_rq(calling=peers[0][0]))
    assert first.state == ESTABLISHED
    second, transport = connect(ep, (peers[1][1], 2))
    receive(second, associate_rq(calling=peers[1][0]))
    assert rj(transport) == (2, 3, 2)  # transient, local limit exceeded
    receive(first, simple_pdu(pdu.A_RELEASE_RQ))
    await settle()
    third, _ = connect(ep, (peers[1][1], 3))
    receive(third, associate_rq(calling=peers[1][0]))
    assert third.state == ESTABLISHED


@in_loop
async def test_reap_frees_a_dead_workers_rows() -> None:
    ep = endpoint(max_associations=2)
    ep.worker = 1
    for port in (1, 2):
        proto, _ = connect(ep, ("h", port))
        receive(proto, associate_rq(calling=f"AE{port}"))
    assert ep.slots.in_use(1) == 2 and ep.slots.take(0, "X", "y", 9, 9) == "max_associations"
    assert ep.slots.reap(1) == 2 and ep.slots.in_use() == 0


# ---- timers and backpressure -----------------------------------------------------------------------


@in_loop
async def test_artim() -> None:
    ep = endpoint(acse_timeout=0.02)
    proto, transport = connect(ep)
    receive(proto, associate_rq()[:10])
    await asyncio.sleep(0.1)
    assert transport.closed and proto.state == CLOSED


@in_loop
async def test_slow_drip_message_is_aborted_at_its_deadline() -> None:
    ep = endpoint(message_timeout=0.1, idle_timeout=100.0)
    proto, transport = associated(ep)
    message = echo_pdu()
    for i in range(len(message) - 1):  # one byte at a time, each well within the idle timeout
        receive(proto, message[i : i + 1])
        await asyncio.sleep(0.01)
        if transport.closed:
            break
    got = transport.pdus()
    assert transport.closed and [t for t, _ in got] == [pdu.A_ABORT]
    assert ep.metrics.aborts.labels("message_timeout")._value.get() == 1


@in_loop
async def test_complete_messages_do_not_run_the_message_clock() -> None:
    ep = endpoint(message_timeout=0.05, idle_timeout=100.0)
    proto, transport = associated(ep)
    for i in range(5):
        receive(proto, echo_pdu(i))
        await asyncio.sleep(0.03)
    assert not transport.closed and statuses(transport.pdus()) == [0] * 5


@in_loop
async def test_a_peer_that_does_not_read_is_paused_then_reset() -> None:
    ep = endpoint(write_timeout=0.05)
    proto, transport = associated(ep)
    assert transport.high == ep.config.server.write_buffer_high
    transport.buffered = 2 * transport.high
    proto.pause_writing()
    assert transport.reading_paused
    await asyncio.sleep(0.2)
    assert transport.aborted and ep.slots.in_use() == 0


@in_loop
async def test_a_peer_that_reads_again_is_resumed() -> None:
    ep = endpoint(write_timeout=0.05)
    proto, transport = associated(ep)
    proto.pause_writing()
    proto.resume_writing()
    await asyncio.sleep(0.15)
    assert not transport.reading_paused and not transport.closed


@in_loop
async def test_close_with_unsent_output_is_reset_after_write_timeout() -> None:
    ep = endpoint(write_timeout=0.05)
    proto, transport = associated(ep)
    transport.buffered = 100
    receive(proto, simple_pdu(pdu.A_RELEASE_RQ))
    await settle()
    assert transport.closed and not transport.aborted and ep.slots.in_use() == 0  # slot free at once
    await asyncio.sleep(0.15)
    assert transport.aborted


# ---- the service seam ------------------------------------------------------------------------------


@in_loop
async def test_dataset_fragments_reach_the_handler_and_the_request_carries_the_peer() -> None:
    app = Recorder()
    ep = endpoint(app)
    proto, transport = associated(ep, calling="CT1")
    command = dimse.store_request(3, "1.2.840.10008.5.1.4.1.1.2", "1.2.3")
    data = b"".join([*pdu.p_data_pdus(3, command, True, 0), *pdu.p_data_pdus(3, b"abcd" * 10, False, 16)])
    receive(proto, data)
    await settle()
    assert statuses(transport.pdus()) == [0]
    assert b"".join(app.fed) == b"abcd" * 10
    request = app.requests[0]
    assert (request.calling_ae, request.address, request.context_id) == ("CT1", "10.0.0.7", 3)


@in_loop
async def test_unknown_operation_with_a_dataset_is_answered_and_its_dataset_dropped() -> None:
    ep = endpoint()
    proto, transport = associated(ep)
    command = dimse.encode_command([(dimse.COMMAND_FIELD, dimse.US.pack(dimse.C_MOVE_RQ)),
                                    (dimse.MESSAGE_ID, dimse.US.pack(5)),
                                    (dimse.COMMAND_DATA_SET_TYPE, dimse.US.pack(0))])
    receive(proto, b"".join([*pdu.p_data_pdus(1, command, True, 0), *pdu.p_data_pdus(1, b"xx", False, 0)]))
    await settle()
    assert statuses(transport.pdus()) == [0x0211] and not transport.closed


@in_loop
async def test_c_cancel_reaches_the_running_handler() -> None:
    app = Recorder()
    app.gate = asyncio.Event()
    ep = endpoint(app)
    proto, transport = associated(ep)
    command = dimse.encode_command([(dimse.COMMAND_FIELD, dimse.US.pack(dimse.C_FIND_RQ)),
                                    (dimse.MESSAGE_ID, dimse.US.pack(9)),
                                    (dimse.COMMAND_DATA_SET_TYPE, dimse.US.pack(dimse.NO_DATASET))])
    receive(proto, b"".join(pdu.p_data_pdus(1, command, True, 0)))
    await asyncio.sleep(0.01)
    cancel = dimse.encode_command([(dimse.COMMAND_FIELD, dimse.US.pack(dimse.C_CANCEL_RQ)),
                                   (dimse.MESSAGE_ID_BEING_RESPONDED_TO, dimse.US.pack(9)),
                                   (dimse.COMMAND_DATA_SET_TYPE, dimse.US.pack(dimse.NO_DATASET))])
    receive(proto, b"".join(pdu.p_data_pdus(1, cancel, True, 0)))
    await settle()
    await asyncio.sleep(0.01)
    got = statuses(transport.pdus())
    assert app.cancelled == 1 and got[-1] == 0xFE00 and set(got[:-1]) == {0xFF00} and len(got) >= 2
    assert not proto.running and not proto.tasks


@in_loop
async def test_abort_mid_dataset_abandons_the_handler() -> None:
    app = Recorder()
    ep = endpoint(app)
    proto, transport = associated(ep)
    command = dimse.store_request(3, "1.2.840.10008.5.1.4.1.1.2", "1.2.3")
    first_fragment = simple_pdu(pdu.P_DATA_TF, b"\x00\x00\x00\x04\x03\x00ab")  # not the last one
    receive(proto, b"".join([*pdu.p_data_pdus(3, command, True, 0), first_fragment]))
    receive(proto, simple_pdu(pdu.A_ABORT))
    assert app.abandoned == 1 and transport.closed and ep.slots.in_use() == 0
