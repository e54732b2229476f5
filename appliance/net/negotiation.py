"""Association negotiation, acceptor side (PS3.8 7.1, PS3.7 Annex D): A-ASSOCIATE-RQ in, A-ASSOCIATE-AC out.

pynetdicom does the PDU decoding/encoding and the presentation-context negotiation. That costs ~10 ms for a
typical storescu request (120 contexts: tens of thousands of UID objects), which capped "one instance per
association" modalities at a few hundred associations/s. A modality sends the very same A-ASSOCIATE-RQ bytes
every time it connects, so each worker keeps the outcome per request bytes (an LRU of ``cache_size``): the
configuration cannot change under a running worker, so the outcome cannot either. Checks that depend on the
moment (association slots) are not part of it.
"""

from __future__ import annotations

import logging
import struct
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC
from pynetdicom.pdu import A_ASSOCIATE_RQ as RQ_PDU
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from appliance.config import Config, all_storage_sop_classes
from appliance.dicom.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from appliance.net import pdu

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

# A-ASSOCIATE-RQ layout (PS3.8 9.3.2): header (6), protocol version (2), reserved (2), called AE (16),
# calling AE (16), reserved (32), then variable items: type (1), reserved (1), length (2), value.
_RQ_FIXED = 74
_ITEM = struct.Struct(">BxH")
ITEM_PRESENTATION_CONTEXT = 0x20
ITEM_USER_INFORMATION = 0x50
SUB_ITEM_MAXIMUM_LENGTH = 0x51
# A peer's undecodable request is answered with an A-ABORT and one WARNING line quoting this much of the reason.
MAX_REASON_CHARS = 200


def _reason(exc: Exception) -> str:
    reason = f"{type(exc).__name__}: {exc}"
    return reason if len(reason) <= MAX_REASON_CHARS else reason[:MAX_REASON_CHARS] + "..."


@contextmanager
def _pynetdicom_quiet() -> Iterator[None]:
    """pynetdicom logs an ERROR, often with a traceback and a hex dump of the item, for every field of a request it
    cannot decode: any peer could fill the log with them (one per connection, each up to three times the
    request's size). The association layer reports the failure itself, in one line."""
    logger = logging.getLogger("pynetdicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


@dataclass(frozen=True)
class RequestHeader:
    """What the fixed-position fields and the item headers of an A-ASSOCIATE-RQ say. Read without pynetdicom in
    a few microseconds, so that AE titles and limits are checked before the expensive decode."""

    protocol_version: int
    called_ae: str
    calling_ae: str
    presentation_contexts: int
    peer_max_pdu: int | None  # None: no Maximum Length sub-item (pynetdicom then assumes unlimited)


def _ae(raw: bytes | memoryview) -> str:
    # PS3.8 9.3.2: leading and trailing spaces are not significant. Non-ASCII cannot match any configured title.
    return bytes(raw).decode("ascii", "replace").strip(" \x00")


def read_request_header(raw: bytes | memoryview) -> RequestHeader:
    """Walk an A-ASSOCIATE-RQ (whole PDU). Raises PDUError when its items do not tile its length exactly."""
    view = memoryview(raw)
    if len(view) < _RQ_FIXED:
        raise pdu.PDUError(f"A-ASSOCIATE-RQ of {len(view)} bytes is shorter than its fixed fields")
    version = struct.unpack_from(">H", view, 6)[0]
    contexts, max_pdu = 0, None
    offset = _RQ_FIXED
    while offset < len(view):
        if len(view) - offset < _ITEM.size:
            raise pdu.PDUError("truncated item header in A-ASSOCIATE-RQ")
        item_type, length = _ITEM.unpack_from(view, offset)
        end = offset + _ITEM.size + length
        if end > len(view):
            raise pdu.PDUError(f"item 0x{item_type:02x} overruns the A-ASSOCIATE-RQ")
        if item_type == ITEM_PRESENTATION_CONTEXT:
            contexts += 1
        elif item_type == ITEM_USER_INFORMATION:
            sub = offset + _ITEM.size
            while sub + _ITEM.size <= end:
                sub_type, sub_length = _ITEM.unpack_from(view, sub)
                if sub_type == SUB_ITEM_MAXIMUM_LENGTH and sub_length == 4 and sub + 8 <= end:
                    max_pdu = struct.unpack_from(">L", view, sub + 4)[0]
                sub += _ITEM.size + sub_length
        offset = end
    return RequestHeader(version, _ae(view[10:26]), _ae(view[26:42]), contexts, max_pdu)


@dataclass(frozen=True)
class Negotiated:
    """What an A-ASSOCIATE-RQ asks for and what we would answer if we accept it."""

    calling_ae: str
    called_ae: str
    protocol_version: int
    application_context: str
    peer_max_pdu: int  # 0 = unlimited
    contexts: dict[int, tuple[str, str]]  # accepted context id -> (abstract syntax, transfer syntax)
    ac_pdu: bytes
    peer_scp: frozenset[int] = frozenset()  # accepted context ids on which the requestor may act as SCP (C-GET)


class Negotiator:
    def __init__(self, config: Config, cache_size: int = 256) -> None:
        self.config = config
        self.sop_classes = frozenset(config.dicom.sop_classes)
        self.transfer_syntaxes = frozenset(config.dicom.transfer_syntaxes)
        # Storage SOP classes accept SCP/SCU role selection, so that a C-GET requestor can be the Storage SCP of its
        # sub-operations; without a role selection item the default roles stay (the requestor is the SCU).
        self.role_classes = frozenset(all_storage_sop_classes())
        self.cache_size = cache_size
        self._cache: OrderedDict[bytes, Negotiated] = OrderedDict()

    def negotiate(self, raw: bytes) -> Negotiated:
        """Outcome for this A-ASSOCIATE-RQ (whole PDU bytes). Raises PDUError if it cannot be decoded."""
        found = self._cache.get(raw)
        if found is not None:
            self._cache.move_to_end(raw)
            return found
        with _pynetdicom_quiet():
            negotiated = self._negotiate(raw)
        self._cache[raw] = negotiated
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return negotiated

    def _negotiate(self, raw: bytes) -> Negotiated:
        rq = RQ_PDU()
        try:
            rq.decode(raw)
            primitive = rq.to_primitive()
        except Exception as exc:
            raise pdu.PDUError(f"undecodable A-ASSOCIATE-RQ: {_reason(exc)}") from None
        peer_max_pdu = 0
        roles: dict[UID, tuple[bool | None, bool | None]] = {}
        for item in primitive.user_information:
            if isinstance(item, MaximumLengthNotification):
                peer_max_pdu = int(item.maximum_length_received or 0)
            elif isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid:
                roles[UID(str(item.sop_class_uid))] = (item.scu_role, item.scp_role)
        try:
            results, role_items = self._contexts(primitive.presentation_context_definition_list, roles)
            contexts = {
                int(cx.context_id): (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                for cx in results if cx.result == 0x00 and cx.context_id is not None
            }
            ac_pdu = self._accept_pdu(primitive, results, role_items)
            scp_classes = {str(item.sop_class_uid) for item in role_items if item.scp_role}
            peer_scp = frozenset(cid for cid, (abstract, _ts) in contexts.items() if abstract in scp_classes)
        except Exception as exc:  # pynetdicom met a combination of items it does not expect: still the peer's
            raise pdu.PDUError(f"A-ASSOCIATE-RQ cannot be negotiated: {_reason(exc)}") from None
        return Negotiated(
            calling_ae=str(primitive.calling_ae_title).strip(),
            called_ae=str(primitive.called_ae_title).strip(),
            protocol_version=int(rq.protocol_version or 0),
            application_context=str(primitive.application_context_name),
            peer_max_pdu=peer_max_pdu,
            contexts=contexts,
            ac_pdu=ac_pdu,
            peer_scp=peer_scp,
        )

    def _contexts(
        self, proposed: list[PresentationContext], roles: dict[UID, tuple[bool | None, bool | None]]
    ) -> tuple[list[PresentationContext], list[Any]]:
        """pynetdicom's negotiation, one proposed context at a time, so that the transfer syntax chosen is the
        requestor's first choice among those we accept (the encoding the modality holds, so it sends without
        converting), not the first in our own list. That is what DCMTK's storescp does too."""
        results: list[PresentationContext] = []
        role_items: dict[str, Any] = {}
        for rq_cx in proposed:
            if not rq_cx.abstract_syntax or not rq_cx.transfer_syntax:
                # PS3.8 9.3.2.2: one abstract syntax and at least one transfer syntax sub-item. pynetdicom's
                # negotiation indexes the first transfer syntax: refuse the context here (the others go on).
                refused = PresentationContext()
                refused.context_id = rq_cx.context_id
                refused.abstract_syntax = rq_cx.abstract_syntax or UID(APPLICATION_CONTEXT)
                refused.transfer_syntax = [UID(self.config.dicom.transfer_syntaxes[0])]
                refused.result = 0x03 if not rq_cx.abstract_syntax else 0x04
                results.append(refused)
                continue
            offer = [PresentationContext()]
            offer[0].abstract_syntax = rq_cx.abstract_syntax
            if rq_cx.abstract_syntax in self.sop_classes:
                ours = [ts for ts in rq_cx.transfer_syntax if ts in self.transfer_syntaxes]
                offer[0].transfer_syntax = [UID(ts) for ts in ours or self.config.dicom.transfer_syntaxes[:1]]
                if rq_cx.abstract_syntax in self.role_classes:
                    offer[0].scu_role = offer[0].scp_role = True
            else:
                offer = []
            result, items = negotiate_as_acceptor([rq_cx], offer, roles or None)
            results.extend(result)
            for item in items:
                role_items[str(item.sop_class_uid)] = item
        return results, list(role_items.values())

    def _accept_pdu(self, rq: A_ASSOCIATE, results: list[PresentationContext], role_items: list[Any]) -> bytes:
        ac = A_ASSOCIATE()
        ac.application_context_name = APPLICATION_CONTEXT
        ac.calling_ae_title = rq.calling_ae_title
        ac.called_ae_title = rq.called_ae_title
        ac.result = 0x00
        ac.result_source = 0x01
        ac.presentation_context_definition_results_list = results
        max_len = MaximumLengthNotification()
        max_len.maximum_length_received = self.config.server.max_pdu
        impl_uid = ImplementationClassUIDNotification()
        impl_uid.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        impl_name = ImplementationVersionNameNotification()
        impl_name.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ac.user_information = [max_len, impl_uid, impl_name, *role_items]
        out = A_ASSOCIATE_AC()
        out.from_primitive(ac)
        return bytes(out.encode())
