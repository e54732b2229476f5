"""PS3.8 Upper Layer PDU framing and the P-DATA-TF hot path.

A-ASSOCIATE-RQ/AC/RJ and A-ABORT bodies are encoded and decoded with pynetdicom's PDU classes (cold path,
once per association). P-DATA-TF and the release PDUs are framed here because they are on the hot path:
PDVs are yielded as memoryviews into the receive buffer, never copied.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import NamedTuple

A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07
PDU_TYPES = frozenset(range(1, 8))

HEADER = struct.Struct(">BxL")
PDV_HEADER = struct.Struct(">LBB")

# A-ABORT reasons (source 0x02, service provider), PS3.8 9.3.8
ABORT_NOT_SPECIFIED = 0x00
ABORT_UNRECOGNIZED_PDU = 0x01
ABORT_UNEXPECTED_PDU = 0x02
ABORT_UNRECOGNIZED_PARAMETER = 0x04
ABORT_UNEXPECTED_PARAMETER = 0x05
ABORT_INVALID_PARAMETER = 0x06

RELEASE_RQ_PDU = bytes([A_RELEASE_RQ, 0]) + struct.pack(">L", 4) + b"\x00" * 4
RELEASE_RP_PDU = bytes([A_RELEASE_RP, 0]) + struct.pack(">L", 4) + b"\x00" * 4


class PDUError(Exception):
    """The peer sent something that is not a valid PDU: the association is aborted with ``reason``."""

    def __init__(self, message: str, reason: int = ABORT_INVALID_PARAMETER) -> None:
        super().__init__(message)
        self.reason = reason


class PDUTooLarge(PDUError):
    """A PDU whose length field exceeds the limit for its type; the header has been read, not the body."""

    def __init__(self, message: str, pdu_type: int, length: int) -> None:
        super().__init__(message)
        self.pdu_type, self.length = pdu_type, length


class PDV(NamedTuple):
    context_id: int
    is_command: bool
    is_last: bool
    data: memoryview


def abort_pdu(source: int = 0x02, reason: int = ABORT_NOT_SPECIFIED) -> bytes:
    """A-ABORT: source 0 = service user, 2 = service provider (then ``reason`` is meaningful)."""
    return bytes([A_ABORT, 0]) + struct.pack(">L", 4) + bytes([0, 0, source, reason if source == 2 else 0])


def iter_pdvs(body: memoryview) -> Iterator[PDV]:
    """Split a P-DATA-TF body into PDVs (PS3.8 9.3.5.1). Raises PDUError on a malformed item."""
    offset = 0
    end = len(body)
    if end == 0:
        raise PDUError("P-DATA-TF without any PDV")
    while offset < end:
        if end - offset < 6:
            raise PDUError("truncated PDV item header")
        length, context_id, control = PDV_HEADER.unpack_from(body, offset)
        if length < 2 or offset + 4 + length > end:
            raise PDUError(f"PDV item length {length} overruns the PDU")
        if context_id % 2 == 0:
            raise PDUError(f"presentation context ID {context_id} is even")
        yield PDV(context_id, bool(control & 1), bool(control & 2), body[offset + 6 : offset + 4 + length])
        offset += 4 + length


def p_data_pdus(context_id: int, payload: bytes | memoryview, is_command: bool, max_pdu: int,
                final: bool = True) -> Iterator[bytes]:
    """Fragment ``payload`` into P-DATA-TF PDUs whose length field is at most ``max_pdu`` (0 = unlimited). With
    ``final`` false the last fragment is not marked last: more of the same message follows (a streamed dataset)."""
    limit = (max_pdu or 1 << 30) - 6  # PDV header (length field excluded from the 4) is 4 + 2 bytes
    if limit < 1:
        # A limit this small would never make progress (or, negative, slice backwards); peers announcing it are
        # refused at association time (server.min_peer_pdu), this is the last line.
        raise ValueError(f"maximum PDU length {max_pdu} cannot carry any data")
    view = memoryview(payload)
    total = len(view)
    offset = 0
    while True:
        chunk = view[offset : offset + limit]
        offset += len(chunk)
        last = offset >= total
        control = (1 if is_command else 0) | (2 if last and final else 0)
        pdv_len = len(chunk) + 2
        yield HEADER.pack(P_DATA_TF, pdv_len + 4) + PDV_HEADER.pack(pdv_len, context_id, control) + chunk
        if last:
            return


class PDUFramer:
    """Frames PDUs out of one fixed receive buffer that the transport writes into (asyncio.BufferedProtocol).

    The buffer never grows: it holds at most one PDU of the largest allowed size, so memory per association
    is bounded by ``max_pdu`` whatever the instance size. PDU bodies are yielded as memoryviews into it; the
    caller must be done with a body before it asks for the next PDU.
    """

    def __init__(self, max_pdu: int, max_other: int = 1 << 16) -> None:
        self.max_pdu = max_pdu
        self.max_other = max_other
        self.capacity = max(max_pdu, max_other) + 6
        self.buf = bytearray(self.capacity)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0

    def get_buffer(self) -> memoryview:
        if self.start == self.end:
            self.start = self.end = 0
        elif self.end == self.capacity:
            self._compact()
        return self.view[self.end :]

    def advance(self, nbytes: int) -> None:
        self.end += nbytes

    def feed(self, data: bytes | memoryview) -> None:
        """Copy ``data`` in (for callers that are not BufferedProtocols); the caller drains pdus() between."""
        space = self.get_buffer()
        if len(data) > len(space):
            raise PDUError(f"{len(data)} bytes do not fit the {len(space)}-byte receive buffer")
        space[: len(data)] = data
        self.advance(len(data))

    def grow(self, max_pdu: int, max_other: int) -> None:
        """Raise the limits (and the buffer) once the association is accepted: before that a connection only
        gets a buffer for its A-ASSOCIATE-RQ, so a connection that never associates costs little memory.
        Bytes already received beyond the current PDU are kept; views handed out earlier stay valid (they keep
        the old buffer alive)."""
        pending = bytes(self.view[self.start : self.end])
        self.max_pdu, self.max_other = max_pdu, max_other
        self.capacity = max(max_pdu, max_other) + 6
        self.buf = bytearray(self.capacity)
        self.view = memoryview(self.buf)
        self.buf[: len(pending)] = pending
        self.start, self.end = 0, len(pending)

    @property
    def partial(self) -> bool:
        """Part of a PDU has been received and not yet framed."""
        return self.end > self.start

    def _compact(self) -> None:
        pending = self.end - self.start
        # Same-size slice assignment: allowed even while memoryviews of the buffer exist.
        self.buf[0:pending] = self.buf[self.start : self.end]
        self.start, self.end = 0, pending

    def pdus(self) -> Iterator[tuple[int, memoryview]]:
        while self.end - self.start >= 6:
            pdu_type, length = HEADER.unpack_from(self.buf, self.start)
            if pdu_type not in PDU_TYPES:
                raise PDUError(f"unknown PDU type 0x{pdu_type:02x}", ABORT_UNRECOGNIZED_PDU)
            limit = self.max_pdu if pdu_type == P_DATA_TF else self.max_other
            if length > limit:
                raise PDUTooLarge(f"PDU length {length} exceeds the maximum {limit}", pdu_type, length)
            total = 6 + length
            if self.end - self.start < total:
                if self.start + total > self.capacity:
                    self._compact()
                return
            body = self.view[self.start + 6 : self.start + total]
            self.start += total
            yield pdu_type, body
        if self.start == self.end:
            self.start = self.end = 0
        elif self.start + 6 > self.capacity:
            self._compact()
