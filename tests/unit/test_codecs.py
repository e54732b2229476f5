"""The hot-path codecs: PDU framing (net/pdu.py) and DIMSE command sets (net/dimse.py).

The reference for both is pynetdicom: its P-DATA fragmentation and its C-STORE-RQ / C-STORE-RSP messages,
encoded with pydicom's Implicit VR Little Endian writer, are what a real peer sends and expects.
"""

from __future__ import annotations

import struct
from io import BytesIO

import pytest
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import P_DATA_TF

from appliance.net import dimse, pdu
from appliance.net.pdu import PDUError, PDUFramer, iter_pdvs, p_data_pdus

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ODD_UID = "1.2.826.0.1.3680043.8.498.12345"  # odd length: padded with NUL on the wire
EVEN_UID = "1.2.826.0.1.3680043.8.498.1234"


# ---- PDU framing ------------------------------------------------------------------------------------


def raw_pdu(pdu_type: int, body: bytes) -> bytes:
    return pdu.HEADER.pack(pdu_type, len(body)) + body


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    return pdu.PDV_HEADER.pack(len(data) + 2, context_id, control) + data


def sample_stream(max_pdu: int) -> list[tuple[int, bytes]]:
    """A mix of PDU types and sizes, including one P-DATA-TF of exactly ``max_pdu`` and empty-ish ones."""
    pattern = bytes(range(256)) * (max_pdu // 256 + 1)
    return [
        (pdu.A_ASSOCIATE_RQ, b"\x00\x01" + b"\x00" * 66),
        (pdu.P_DATA_TF, pdv(1, 3, b"command")),
        (pdu.P_DATA_TF, pdv(1, 0, pattern[: max_pdu - 6])),  # length field == max_pdu exactly
        (pdu.P_DATA_TF, pdv(3, 0, pattern[:100]) + pdv(3, 2, pattern[100:101])),
        (pdu.P_DATA_TF, pdv(1, 2, b"")),
        (pdu.A_RELEASE_RQ, b"\x00" * 4),
        (pdu.P_DATA_TF, pdv(5, 0, pattern[7 : max_pdu // 2 + 7])),
        (pdu.A_ABORT, b"\x00\x00\x02\x01"),
    ]


def frame(framer: PDUFramer, stream: bytes, chunk: int) -> list[tuple[int, bytes]]:
    """Deliver ``stream`` the way asyncio.BufferedProtocol does: at most ``chunk`` bytes per call into
    whatever get_buffer() offers, draining pdus() after each delivery."""
    out: list[tuple[int, bytes]] = []
    offset = 0
    while offset < len(stream):
        space = framer.get_buffer()
        assert len(space) > 0, "the framer offered an empty buffer: the transport could never deliver again"
        n = min(chunk, len(space), len(stream) - offset)
        space[:n] = stream[offset : offset + n]
        framer.advance(n)
        offset += n
        out.extend((t, bytes(body)) for t, body in framer.pdus())
    return out


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 6, 7, 13, 64, 1000, 4095, 4096, 4097, 4102, 9999, 1 << 20])
def test_framer_any_chunk_boundaries(chunk: int) -> None:
    max_pdu = 4096
    pdus = sample_stream(max_pdu)
    stream = b"".join(raw_pdu(t, b) for t, b in pdus)
    framer = PDUFramer(max_pdu, max_other=4096)
    assert frame(framer, stream, chunk) == pdus
    assert framer.start == framer.end  # nothing left over


def test_framer_every_split_point_of_two_pdus() -> None:
    first = raw_pdu(pdu.P_DATA_TF, pdv(1, 3, b"x" * 41))
    second = raw_pdu(pdu.A_RELEASE_RQ, b"\x00" * 4)
    stream = first + second
    for cut in range(len(stream) + 1):
        framer = PDUFramer(4096)
        got: list[tuple[int, bytes]] = []
        for part in (stream[:cut], stream[cut:]):
            framer.feed(part)
            got.extend((t, bytes(b)) for t, b in framer.pdus())
        assert got == [(pdu.P_DATA_TF, first[6:]), (pdu.A_RELEASE_RQ, second[6:])], cut


def test_framer_buffer_never_grows() -> None:
    framer = PDUFramer(4096, max_other=4096)
    capacity = len(framer.buf)
    stream = b"".join(raw_pdu(t, b) for t, b in sample_stream(4096)) * 20
    assert len(frame(framer, stream, 3001)) == 8 * 20
    assert len(framer.buf) == capacity == 4096 + 6


def test_framer_feed_refuses_more_than_fits() -> None:
    framer = PDUFramer(4096, max_other=4096)
    with pytest.raises(PDUError):
        framer.feed(b"\x04" * (4096 + 7))


@pytest.mark.parametrize(
    ("pdu_type", "length", "max_pdu", "max_other"),
    [
        (pdu.P_DATA_TF, 4097, 4096, 65536),  # P-DATA-TF is bounded by max_pdu...
        (pdu.P_DATA_TF, 0xFFFFFFFF, 4096, 65536),
        (pdu.A_ASSOCIATE_RQ, 8193, 65536, 8192),  # ...the others by max_other
        (pdu.A_RELEASE_RQ, 8193, 65536, 8192),
    ],
)
def test_framer_rejects_oversized_pdus(pdu_type: int, length: int, max_pdu: int, max_other: int) -> None:
    framer = PDUFramer(max_pdu, max_other)
    framer.feed(pdu.HEADER.pack(pdu_type, length))  # the header alone is enough to refuse it
    with pytest.raises(PDUError, match="exceeds the maximum") as info:
        list(framer.pdus())
    assert info.value.reason == pdu.ABORT_INVALID_PARAMETER


def test_framer_accepts_the_largest_allowed_pdu() -> None:
    framer = PDUFramer(4096, max_other=4096)
    body = pdv(1, 0, b"\xab" * (4096 - 6))
    assert frame(framer, raw_pdu(pdu.P_DATA_TF, body), 1 << 20) == [(pdu.P_DATA_TF, body)]


@pytest.mark.parametrize("pdu_type", [0x00, 0x08, 0x09, 0x10, 0x80, 0xFF])
def test_framer_rejects_unknown_pdu_types(pdu_type: int) -> None:
    framer = PDUFramer(4096)
    framer.feed(raw_pdu(pdu.P_DATA_TF, pdv(1, 3, b"ok")) + raw_pdu(pdu_type, b"\x00" * 4))
    pdus = framer.pdus()
    assert next(pdus)[0] == pdu.P_DATA_TF  # the valid one before it is still delivered
    with pytest.raises(PDUError, match="unknown PDU type") as info:
        next(pdus)
    assert info.value.reason == pdu.ABORT_UNRECOGNIZED_PDU


# ---- PDVs -------------------------------------------------------------------------------------------


def test_iter_pdvs_splits_items_and_flags() -> None:
    body = pdv(1, 0b01, b"cmd-part") + pdv(1, 0b11, b"") + pdv(3, 0b00, b"data") + pdv(255, 0b10, b"end")
    got = [(p.context_id, p.is_command, p.is_last, bytes(p.data)) for p in iter_pdvs(memoryview(body))]
    assert got == [(1, True, False, b"cmd-part"), (1, True, True, b""), (3, False, False, b"data"),
                   (255, False, True, b"end")]


def test_iter_pdvs_yields_views_not_copies() -> None:
    buf = bytearray(pdv(1, 0, b"abcd"))
    (item,) = iter_pdvs(memoryview(buf))
    buf[6] = ord("z")
    assert bytes(item.data) == b"zbcd"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "without any PDV"),
        (b"\x00\x00\x00", "truncated PDV item header"),
        (pdv(1, 0, b"abc") + b"\x00\x00\x00\x05\x01", "truncated PDV item header"),
        (struct.pack(">LBB", 1, 1, 0), "overruns"),  # length 1 cannot even hold context ID + control
        (struct.pack(">LBB", 0, 1, 0), "overruns"),
        (struct.pack(">LBB", 10, 1, 0) + b"abc", "overruns"),  # longer than the PDU
        (struct.pack(">LBB", 0xFFFFFFFF, 1, 0) + b"abc", "overruns"),
        (pdv(1, 0, b"ok") + struct.pack(">LBB", 9, 1, 0) + b"abc", "overruns"),
        (pdv(2, 0, b"data"), "is even"),
        (pdv(0, 0, b"data"), "is even"),
        (pdv(1, 0, b"data") + pdv(4, 0, b"data"), "is even"),
    ],
)
def test_iter_pdvs_rejects_malformed_items(body: bytes, message: str) -> None:
    with pytest.raises(PDUError, match=message):
        list(iter_pdvs(memoryview(body)))


# ---- P-DATA-TF fragmentation ------------------------------------------------------------------------


@pytest.mark.parametrize("max_pdu", [16, 4096, 16384])
@pytest.mark.parametrize("is_command", [True, False])
def test_p_data_pdus_respect_max_pdu_and_round_trip(max_pdu: int, is_command: bool) -> None:
    limit = max_pdu - 6
    for size in (0, 1, limit - 1, limit, limit + 1, 2 * limit, 3 * limit + 5, 50_000):
        payload = bytes((i * 7 + size) % 251 for i in range(size))
        pdus = list(p_data_pdus(7, payload, is_command, max_pdu))
        assert len(pdus) == max(1, -(-size // limit)), size
        for raw in pdus:
            pdu_type, length = pdu.HEADER.unpack_from(raw)
            assert pdu_type == pdu.P_DATA_TF and length == len(raw) - 6 and length <= max_pdu
        framer = PDUFramer(max(max_pdu, 4096))
        items = []
        for chunk in frame(framer, b"".join(pdus), 997):
            assert chunk[0] == pdu.P_DATA_TF
            pdvs = list(iter_pdvs(memoryview(chunk[1])))
            assert len(pdvs) == 1  # one PDV per PDU
            items.append((pdvs[0].context_id, pdvs[0].is_command, pdvs[0].is_last, bytes(pdvs[0].data)))
        assert b"".join(i[3] for i in items) == payload
        assert [i[2] for i in items] == [False] * (len(items) - 1) + [True]  # only the last is "last"
        assert {(i[0], i[1]) for i in items} == {(7, is_command)}


def test_p_data_pdus_unlimited() -> None:
    payload = b"\x01" * 100_000
    (one,) = p_data_pdus(1, payload, False, 0)
    assert len(one) == 6 + 6 + len(payload)


@pytest.mark.parametrize("max_pdu", [16, 1024, 16382])
def test_p_data_pdus_match_pynetdicom_fragmentation(max_pdu: int) -> None:
    """Same PDUs, byte for byte, as pynetdicom produces for a C-STORE-RQ's command and dataset."""
    dataset = bytes(range(256)) * 40 + b"\x07"
    primitive = C_STORE()
    primitive.MessageID = 3
    primitive.AffectedSOPClassUID = CT_IMAGE
    primitive.AffectedSOPInstanceUID = ODD_UID
    primitive.DataSet = BytesIO(dataset)
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    theirs = [bytes(P_DATA_TF(p).encode()) for p in message.encode_msg(5, max_pdu)]
    command = encode(message.command_set, True, True)
    assert command is not None
    ours = [*p_data_pdus(5, command, True, max_pdu), *p_data_pdus(5, dataset, False, max_pdu)]
    assert ours == theirs


# ---- DIMSE command sets -----------------------------------------------------------------------------


def pynetdicom_store_rq(message_id: int, sop_class: str, sop_instance: str, priority: int = 0,
                        move_ae: str | None = None, move_id: int | None = None) -> bytes:
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Priority = priority
    if move_ae is not None:
        primitive.MoveOriginatorApplicationEntityTitle = move_ae
        primitive.MoveOriginatorMessageID = move_id
    primitive.DataSet = BytesIO(b"\x08\x00\x18\x00\x00\x00\x00\x00")
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    raw = encode(message.command_set, True, True)  # pydicom's Implicit VR Little Endian writer
    assert raw is not None
    return raw


@pytest.mark.parametrize("sop_instance", [ODD_UID, EVEN_UID])
@pytest.mark.parametrize("priority", [0, 1, 2])
def test_decode_pynetdicom_c_store_rq(sop_instance: str, priority: int) -> None:
    raw = pynetdicom_store_rq(0xBEEF, CT_IMAGE, sop_instance, priority)
    command = dimse.decode_command(raw)
    assert command.command_field == dimse.C_STORE_RQ
    assert command.message_id == 0xBEEF
    assert command.affected_sop_class_uid == CT_IMAGE
    assert command.affected_sop_instance_uid == sop_instance
    assert command.priority == priority
    assert command.has_dataset is True
    assert command.move_originator_ae == ""
    assert command.move_originator_message_id is None
    assert command.status is None


def test_decode_pynetdicom_c_store_rq_with_move_originator() -> None:
    raw = pynetdicom_store_rq(1, CT_IMAGE, ODD_UID, move_ae="MOVER", move_id=77)
    command = dimse.decode_command(raw)
    assert command.move_originator_ae == "MOVER"
    assert command.move_originator_message_id == 77
    assert command.affected_sop_instance_uid == ODD_UID


def test_decode_pynetdicom_c_echo_rq() -> None:
    from pynetdicom.dimse_primitives import C_ECHO

    primitive = C_ECHO()
    primitive.MessageID = 12
    primitive.AffectedSOPClassUID = "1.2.840.10008.1.1"
    message = C_ECHO_RQ()
    message.primitive_to_message(primitive)
    raw = encode(message.command_set, True, True)
    assert raw is not None
    command = dimse.decode_command(raw)
    assert (command.command_field, command.message_id, command.has_dataset) == (dimse.C_ECHO_RQ, 12, False)
    assert command.affected_sop_class_uid == "1.2.840.10008.1.1"


@pytest.mark.parametrize("sop_instance", [ODD_UID, EVEN_UID])
def test_store_request_encodes_like_pynetdicom(sop_instance: str) -> None:
    ours = dimse.store_request(42, CT_IMAGE, sop_instance, priority=1)
    theirs = pynetdicom_store_rq(42, CT_IMAGE, sop_instance, priority=1)
    ds_ours = decode(BytesIO(ours), True, True)
    ds_theirs = decode(BytesIO(theirs), True, True)
    assert ds_ours.CommandGroupLength == len(ours) - 12  # the group length counts what follows it
    assert ds_ours.CommandGroupLength == ds_theirs.CommandGroupLength
    assert sorted(int(e.tag) for e in ds_ours) == sorted(int(e.tag) for e in ds_theirs)
    for keyword in ("AffectedSOPClassUID", "CommandField", "MessageID", "Priority", "AffectedSOPInstanceUID"):
        assert ds_ours[keyword].value == ds_theirs[keyword].value, keyword
    # Data Set Type: any value but 0x0101 means "a dataset follows" (pynetdicom sends 1, we send 0).
    assert ds_ours.CommandDataSetType != 0x0101 and ds_theirs.CommandDataSetType != 0x0101
    # Only the Data Set Type value differs between the two encodings.
    assert len(ours) == len(theirs)
    assert sum(a != b for a, b in zip(ours, theirs, strict=True)) <= 1


@pytest.mark.parametrize(
    ("status", "comment"),
    [(0x0000, ""), (0x0000, "ignored on success"), (0xA900, "SOP Class/Instance UID differ"), (0xC001, "odd")],
)
def test_response_is_understood_by_pynetdicom(status: int, comment: str) -> None:
    raw = dimse.response(dimse.C_STORE_RSP, 0x1234, status, CT_IMAGE, ODD_UID, comment)
    message = C_STORE_RSP()
    message.command_set = decode(BytesIO(raw), True, True)
    assert message.command_set.CommandGroupLength == len(raw) - 12
    primitive = message.message_to_primitive()
    assert isinstance(primitive, C_STORE)
    assert primitive.Status == status
    assert primitive.MessageIDBeingRespondedTo == 0x1234
    assert primitive.AffectedSOPClassUID == CT_IMAGE
    assert primitive.AffectedSOPInstanceUID == ODD_UID
    assert message.command_set.CommandDataSetType == 0x0101
    if status and comment:
        assert message.command_set.ErrorComment == comment
    else:
        assert "ErrorComment" not in message.command_set


def test_encode_decode_round_trip() -> None:
    for raw, expected in [
        (dimse.store_request(9, CT_IMAGE, ODD_UID, 2),
         dict(command_field=dimse.C_STORE_RQ, message_id=9, affected_sop_class_uid=CT_IMAGE,
              affected_sop_instance_uid=ODD_UID, has_dataset=True, priority=2)),
        (dimse.echo_request(65535),
         dict(command_field=dimse.C_ECHO_RQ, message_id=65535, affected_sop_class_uid="1.2.840.10008.1.1",
              has_dataset=False)),
        (dimse.response(dimse.C_STORE_RSP, 9, 0x0111, CT_IMAGE, EVEN_UID, "dup"),
         dict(command_field=dimse.C_STORE_RSP, message_id_responded_to=9, status=0x0111,
              affected_sop_instance_uid=EVEN_UID, has_dataset=False)),
        (dimse.response(dimse.C_ECHO_RSP, 1, 0),
         dict(command_field=dimse.C_ECHO_RSP, message_id_responded_to=1, status=0, affected_sop_class_uid="")),
    ]:
        command = dimse.decode_command(raw)
        for name, value in expected.items():
            assert getattr(command, name) == value, (name, raw)
        assert len(raw) % 2 == 0


def test_unknown_elements_are_kept() -> None:
    raw = dimse.encode_command([(dimse.COMMAND_FIELD, dimse.US.pack(dimse.C_STORE_RQ)), (0x0999, b"ab")])
    assert dimse.decode_command(raw).other == {0x0999: b"ab"}


def command_bytes(*elements: tuple[int, int, bytes]) -> bytes:
    return b"".join(dimse.ELEMENT.pack(group, element, len(value)) + value for group, element, value in elements)


FIELD = (0x0000, 0x0100, b"\x01\x00")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x00\x00\x00\x00\x04", "truncated"),
        (command_bytes(FIELD) + b"\x00\x00", "truncated"),
        (command_bytes(FIELD) + dimse.ELEMENT.pack(0, 0x1000, 20) + b"1.2", "overruns"),
        (command_bytes(FIELD) + dimse.ELEMENT.pack(0, 0x1000, 0xFFFFFFFF), "overruns"),
        (command_bytes(FIELD, (0x0008, 0x0018, b"1.2\x00")), "outside group 0000"),
        (command_bytes((0x0000, 0x0110, b"\x01\x00")), "no Command Field"),
        (b"", "no Command Field"),
        (command_bytes((0x0000, 0x0100, b"\x01\x00\x00\x00")), "must be 2 bytes"),
        (command_bytes(FIELD, (0x0000, 0x0900, b"\x00")), "must be 2 bytes"),
    ],
)
def test_decode_rejects_malformed_command_sets(raw: bytes, message: str) -> None:
    with pytest.raises(dimse.CommandError, match=message):
        dimse.decode_command(raw)
