"""Property-based tests (hypothesis) of the PDU framer and the A-ASSOCIATE-RQ pre-checks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.net import pdu
from appliance.net.negotiation import read_request_header
from tests.protocol.fakes import HEADER, associate_rq

pdu_bodies = st.lists(st.tuples(st.sampled_from(sorted(pdu.PDU_TYPES)), st.binary(max_size=300)), max_size=12)


@settings(max_examples=300, deadline=None)
@given(pdus=pdu_bodies, cuts=st.lists(st.integers(min_value=1, max_value=400), max_size=40))
def test_framer_yields_exactly_what_was_sent_whatever_the_reads(pdus: list[tuple[int, bytes]], cuts: list[int]) -> None:
    stream = b"".join(HEADER.pack(t, len(b)) + b for t, b in pdus)
    framer = pdu.PDUFramer(512, max_other=512)
    capacity = len(framer.buf)
    got: list[tuple[int, bytes]] = []
    offset, cuts_iter = 0, iter(cuts)
    while offset < len(stream):
        n = next(cuts_iter, len(stream))
        space = framer.get_buffer()
        part = stream[offset : offset + min(n, len(space))]
        space[: len(part)] = part
        framer.advance(len(part))
        offset += len(part)
        got.extend((t, bytes(body)) for t, body in framer.pdus())
    assert got == pdus
    assert len(framer.buf) == capacity  # never grows by itself


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2000), limit=st.integers(min_value=16, max_value=1024))
def test_framer_on_garbage_raises_only_pduerror_and_respects_limits(data: bytes, limit: int) -> None:
    framer = pdu.PDUFramer(limit, max_other=limit)
    try:
        for i in range(0, len(data), 64):
            framer.feed(data[i : i + 64])
            for _t, body in framer.pdus():
                assert len(body) <= limit
    except pdu.PDUError:
        pass


@settings(max_examples=200, deadline=None)
@given(pre=st.binary(max_size=200), grow_to=st.integers(min_value=1024, max_value=8192))
def test_grow_keeps_the_pending_bytes(pre: bytes, grow_to: int) -> None:
    framer = pdu.PDUFramer(256, max_other=256)
    framer.feed(pre)
    framer.grow(grow_to, grow_to)
    assert bytes(framer.view[framer.start : framer.end]) == pre


@settings(max_examples=100, deadline=None)
@given(max_pdu=st.integers(min_value=7, max_value=5000), payload=st.binary(max_size=3000))
def test_p_data_pdus_respect_any_usable_limit(max_pdu: int, payload: bytes) -> None:
    out = list(pdu.p_data_pdus(1, payload, False, max_pdu))
    assert all(len(p) - 6 <= max_pdu for p in out)
    assert b"".join(p[12:] for p in out) == payload


@pytest.mark.parametrize("max_pdu", [1, 2, 6])
def test_p_data_pdus_refuse_a_limit_that_cannot_carry_data(max_pdu: int) -> None:
    with pytest.raises(ValueError):
        next(pdu.p_data_pdus(1, b"x", False, max_pdu))


ae_titles = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters="\\"),
                    min_size=1, max_size=16)


@settings(max_examples=100, deadline=None)
@given(calling=ae_titles, called=ae_titles, extra=st.integers(min_value=0, max_value=40),
       max_pdu=st.one_of(st.none(), st.integers(min_value=0, max_value=2**32 - 1)))
def test_header_walk_agrees_with_pynetdicom(calling: str, called: str, extra: int, max_pdu: int | None) -> None:
    raw = associate_rq(calling=calling, called=called, max_pdu=max_pdu, extra_contexts=extra)
    head = read_request_header(raw)
    assert (head.calling_ae, head.called_ae) == (calling.strip(), called.strip())
    assert head.presentation_contexts == 2 + extra
    assert head.peer_max_pdu == max_pdu
    assert head.protocol_version == 1


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=600), keep=st.integers(min_value=0, max_value=400))
def test_header_walk_on_garbage_raises_only_pduerror(raw: bytes, keep: int) -> None:
    valid = associate_rq()
    for candidate in (raw, valid[:keep] + raw, valid[:74] + raw):
        try:
            read_request_header(candidate)
        except pdu.PDUError:
            pass
