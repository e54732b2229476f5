"""Acceptor negotiation (appliance/net/negotiation.py) on requests built with pynetdicom's own encoder."""

from __future__ import annotations

import logging

import pytest
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import PresentationContext

from appliance.config import load_config
from appliance.net.negotiation import Negotiator
from appliance.net.pdu import PDUError

CT = "1.2.840.10008.5.1.4.1.1.2"
UNKNOWN = "1.2.3.4.5.6"
EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"


def request(calling: str = "CT01", contexts: list[tuple[str, list[str]]] | None = None) -> bytes:
    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title = calling
    prim.called_ae_title = "APPLIANCE"
    proposed = []
    for i, (abstract, syntaxes) in enumerate(contexts or [(CT, [EXPLICIT_LE]), (CT, [EXPLICIT_BE, IMPLICIT_LE]),
                                                          (UNKNOWN, [EXPLICIT_LE])]):
        cx = PresentationContext()
        cx.context_id = 2 * i + 1
        cx.abstract_syntax = abstract
        cx.transfer_syntax = syntaxes
        proposed.append(cx)
    prim.presentation_context_definition_list = proposed
    max_len = MaximumLengthNotification()
    max_len.maximum_length_received = 32768
    prim.user_information = [max_len]
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(prim)
    return bytes(rq.encode())


def test_requestor_first_choice_wins_and_unknown_classes_are_refused() -> None:
    neg = Negotiator(load_config(None)).negotiate(request())
    assert neg.calling_ae == "CT01" and neg.called_ae == "APPLIANCE" and neg.peer_max_pdu == 32768
    assert neg.contexts == {1: (CT, EXPLICIT_LE), 3: (CT, EXPLICIT_BE)}
    ac = A_ASSOCIATE_AC()
    ac.decode(neg.ac_pdu)
    results = {cx.context_id: cx.result for cx in ac.to_primitive().presentation_context_definition_results_list}
    assert results == {1: 0, 3: 0, 5: 3}  # 3 = abstract syntax not supported


def test_outcomes_are_cached_per_request_bytes_with_a_bound() -> None:
    negotiator = Negotiator(load_config(None), cache_size=2)
    first = negotiator.negotiate(request("CT01"))
    assert negotiator.negotiate(request("CT01")) is first  # the same modality re-associating
    other = negotiator.negotiate(request("CT02"))
    assert other is not first and other.calling_ae == "CT02"
    negotiator.negotiate(request("CT03"))  # evicts CT01, the least recently used
    assert negotiator.negotiate(request("CT01")) is not first


def test_an_undecodable_request_logs_one_short_line_not_pynetdicom_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    # Found by the network fuzzer (tests/fuzz): an abstract syntax item whose type byte was changed to 0x10 made
    # pynetdicom log an ERROR with a traceback for a peer's bytes, and the abort message quoted the whole item.
    raw = bytearray(request(contexts=[(CT, [EXPLICIT_LE])] * 3))
    at = raw.index(CT.encode()) - 4  # the abstract syntax sub-item of the first presentation context
    assert raw[at] == 0x30
    raw[at] = 0x10  # now an application context item whose value is ... not ASCII either:
    raw[at + 4 : at + 8] = b"\xd3\x00\xff\x00"
    caplog.set_level(logging.DEBUG)
    with pytest.raises(PDUError) as info:
        Negotiator(load_config(None)).negotiate(bytes(raw) + b"\xd3" * 5000)
    assert len(str(info.value)) < 300
    assert [r for r in caplog.records if r.name.startswith("pynetdicom") and r.levelno >= logging.WARNING] == []
    assert logging.getLogger("pynetdicom").level == logging.NOTSET  # restored


def test_a_context_without_transfer_syntax_is_refused_alone() -> None:
    # Found by the network fuzzer: a presentation context item with no transfer syntax sub-item made pynetdicom's
    # negotiation raise IndexError out of the protocol callback (no A-ABORT, uvloop's "Fatal error on transport").
    raw = bytearray(request(contexts=[("1.2.840.10008.1.1", [EXPLICIT_LE]), (CT, [EXPLICIT_LE])]))
    ts = EXPLICIT_LE.encode()
    at = raw.index(ts) - 4  # the transfer syntax sub-item of the first context
    assert raw[at] == 0x40
    del raw[at : at + 4 + len(ts)]
    raw[2:6] = (len(raw) - 6).to_bytes(4, "big")
    pc = raw.rindex(b"\x20\x00", 0, at)  # the first presentation context item
    raw[pc + 2 : pc + 4] = (int.from_bytes(raw[pc + 2 : pc + 4], "big") - 4 - len(ts)).to_bytes(2, "big")
    neg = Negotiator(load_config(None)).negotiate(bytes(raw))
    assert neg.contexts == {3: (CT, EXPLICIT_LE)}
    ac = A_ASSOCIATE_AC()
    ac.decode(neg.ac_pdu)
    assert {cx.context_id: cx.result for cx in ac.to_primitive().presentation_context_definition_results_list} == {
        1: 4, 3: 0}
