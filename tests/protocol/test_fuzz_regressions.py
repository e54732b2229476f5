"""Bugs the network fuzzer (tests/fuzz) found in the association layer, each pinned on the fake transport."""

from __future__ import annotations

import asyncio

import pytest

from appliance.net import dimse, pdu
from appliance.net.association import CLOSED, REJECTED
from tests.protocol.fakes import HEADER, associate_rq, associated, connect, endpoint, receive, simple_pdu, statuses


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_bad_pdu_after_a_rejected_request_in_the_same_read_is_dropped() -> None:
    # The A-ASSOCIATE-RJ half-closes (write_eof); the next PDU header of the same read used to raise PDUError,
    # whose A-ABORT was then written after write_eof: RuntimeError out of buffer_updated ("Fatal error on
    # transport"), no answer logged as a protocol error.
    async def run() -> None:
        proto, transport = connect(endpoint())
        receive(proto, associate_rq(called="SOMEONE") + simple_pdu(0xFF) + HEADER.pack(0x04, 1 << 30))
        assert [t for t, _ in transport.pdus()] == [pdu.A_ASSOCIATE_RJ]
        assert proto.state == REJECTED and transport.eof_written and not transport.closed
    asyncio.run(run())


@pytest.mark.parametrize("chunks", [1, 3])
def test_an_oversized_request_that_fills_the_receive_buffer_is_rejected_and_drained(chunks: int) -> None:
    # A length field over max_associate_rq_bytes with the buffer full behind it: the header stayed in the
    # buffer, get_buffer() then returned an empty buffer ("unhandled error (or an empty buffer) in get_buffer()").
    async def run() -> None:
        proto, transport = connect(endpoint(max_associate_rq_bytes=4096))
        capacity = proto.framer.capacity
        head = bytearray(associate_rq())
        head[2:6] = (1 << 24).to_bytes(4, "big")
        data = bytes(head) + bytes(capacity * chunks - len(head))
        receive(proto, data, chunk=capacity)
        assert len(proto.get_buffer(65536)) > 0
        assert [t for t, _ in transport.pdus()] == [pdu.A_ASSOCIATE_RJ]
    asyncio.run(run())


def test_input_after_an_abort_is_dropped_however_much_comes() -> None:
    async def run() -> None:
        proto, transport = associated(endpoint())
        # A-ABORT for the unknown PDU type; then whole buffers of PDUs that are never framed any more.
        receive(proto, simple_pdu(0xFF) + simple_pdu(pdu.A_RELEASE_RP) * 20000, chunk=proto.framer.capacity)
        assert proto.state == CLOSED and transport.closed
        assert [t for t, _ in transport.pdus()] == [pdu.A_ABORT]
        assert len(proto.get_buffer(65536)) > 0
    asyncio.run(run())


def test_a_request_uid_that_is_not_ascii_is_answered() -> None:
    # decode_command reads UIDs with errors="replace"; the response echoes them and used to fail to encode them
    # (UnicodeEncodeError in the handler task: "DIMSE handler failed", the association aborted).
    async def run() -> None:
        proto, transport = associated(endpoint())
        command = dimse.encode_command([
            (dimse.AFFECTED_SOP_CLASS_UID, b"1.2.840.10008.1.\xff"),
            (dimse.COMMAND_FIELD, dimse.US.pack(dimse.C_ECHO_RQ)),
            (dimse.MESSAGE_ID, dimse.US.pack(1)),
            (dimse.COMMAND_DATA_SET_TYPE, dimse.US.pack(dimse.NO_DATASET)),
        ])
        receive(proto, b"".join(pdu.p_data_pdus(1, command, True, 0)))
        await settle()
        got = transport.pdus()
        assert [t for t, _ in got] == [pdu.P_DATA_TF] and statuses(got) == [0x0000]
        assert not transport.closed
    asyncio.run(run())
