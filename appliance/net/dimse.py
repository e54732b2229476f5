"""DIMSE command sets (PS3.7 section 9/10): group 0000, always Implicit VR Little Endian.

Command sets are a dozen small elements, decoded and encoded here directly: going through pydicom's
Dataset for every C-STORE would cost more than the rest of the command handling together.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

ELEMENT = struct.Struct("<HHL")
US = struct.Struct("<H")
UL = struct.Struct("<L")

# Command Field values
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_GET_RQ = 0x0010
C_GET_RSP = 0x8010
C_FIND_RQ = 0x0020
C_FIND_RSP = 0x8020
C_MOVE_RQ = 0x0021
C_MOVE_RSP = 0x8021
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
N_EVENT_REPORT_RQ = 0x0100
N_EVENT_REPORT_RSP = 0x8100
N_ACTION_RQ = 0x0130
N_ACTION_RSP = 0x8130
C_CANCEL_RQ = 0x0FFF
RESPONSE_BIT = 0x8000
NO_DATASET = 0x0101
HAS_DATASET = 0x0000  # any value other than 0x0101 means a dataset follows; 0x0000 is what we send

# Element numbers in group 0000
AFFECTED_SOP_CLASS_UID = 0x0002
REQUESTED_SOP_CLASS_UID = 0x0003
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
MESSAGE_ID_BEING_RESPONDED_TO = 0x0120
MOVE_DESTINATION = 0x0600
PRIORITY = 0x0700
COMMAND_DATA_SET_TYPE = 0x0800
STATUS = 0x0900
ERROR_COMMENT = 0x0902
AFFECTED_SOP_INSTANCE_UID = 0x1000
REQUESTED_SOP_INSTANCE_UID = 0x1001
EVENT_TYPE_ID = 0x1002
ACTION_TYPE_ID = 0x1008
NUMBER_OF_REMAINING_SUB_OPERATIONS = 0x1020
NUMBER_OF_COMPLETED_SUB_OPERATIONS = 0x1021
NUMBER_OF_FAILED_SUB_OPERATIONS = 0x1022
NUMBER_OF_WARNING_SUB_OPERATIONS = 0x1023
MOVE_ORIGINATOR_AE = 0x1030
MOVE_ORIGINATOR_MESSAGE_ID = 0x1031

_US_ELEMENTS = frozenset(
    {COMMAND_FIELD, MESSAGE_ID, MESSAGE_ID_BEING_RESPONDED_TO, PRIORITY, COMMAND_DATA_SET_TYPE, STATUS,
     MOVE_ORIGINATOR_MESSAGE_ID, EVENT_TYPE_ID, ACTION_TYPE_ID, NUMBER_OF_REMAINING_SUB_OPERATIONS,
     NUMBER_OF_COMPLETED_SUB_OPERATIONS, NUMBER_OF_FAILED_SUB_OPERATIONS, NUMBER_OF_WARNING_SUB_OPERATIONS}
)
_UI_ELEMENTS = frozenset({AFFECTED_SOP_CLASS_UID, AFFECTED_SOP_INSTANCE_UID, REQUESTED_SOP_CLASS_UID,
                          REQUESTED_SOP_INSTANCE_UID})
_AE_ELEMENTS = frozenset({MOVE_ORIGINATOR_AE, MOVE_DESTINATION})


class CommandError(Exception):
    """A command set that cannot be decoded."""


@dataclass
class Command:
    command_field: int
    message_id: int = 0
    affected_sop_class_uid: str = ""
    affected_sop_instance_uid: str = ""
    has_dataset: bool = False
    priority: int = 0
    move_originator_ae: str = ""
    move_originator_message_id: int | None = None
    status: int | None = None
    message_id_responded_to: int | None = None
    requested_sop_class_uid: str = ""  # N-ACTION, N-GET, ... name their object with these
    requested_sop_instance_uid: str = ""
    move_destination: str = ""
    action_type_id: int | None = None
    event_type_id: int | None = None
    # (remaining, completed, failed, warning) of a C-MOVE/C-GET response; None where a count is absent
    sub_operations: tuple[int | None, int | None, int | None, int | None] = (None, None, None, None)
    other: dict[int, bytes] = field(default_factory=dict)

    @property
    def is_response(self) -> bool:
        return bool(self.command_field & RESPONSE_BIT)

    @property
    def sop_class_uid(self) -> str:
        """The SOP class the message is about (Affected for C- and N-EVENT-REPORT, Requested for N-ACTION)."""
        return self.affected_sop_class_uid or self.requested_sop_class_uid

    @property
    def sop_instance_uid(self) -> str:
        return self.affected_sop_instance_uid or self.requested_sop_instance_uid


def decode_command(data: bytes) -> Command:
    """Decode an Implicit VR Little Endian group-0000 command set."""
    values: dict[int, int | str] = {}
    other: dict[int, bytes] = {}
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < 8:
            raise CommandError("truncated command element header")
        group, element, length = ELEMENT.unpack_from(data, offset)
        offset += 8
        if group != 0x0000:
            raise CommandError(f"element ({group:04x},{element:04x}) outside group 0000 in a command set")
        if length == 0xFFFFFFFF or offset + length > end:
            raise CommandError(f"command element (0000,{element:04x}) overruns the command set")
        raw = data[offset : offset + length]
        offset += length
        if element in _US_ELEMENTS:
            if length != 2:
                raise CommandError(f"(0000,{element:04x}) must be 2 bytes, is {length}")
            values[element] = US.unpack(raw)[0]
        elif element in _UI_ELEMENTS or element in _AE_ELEMENTS:
            values[element] = bytes(raw).rstrip(b"\x00 ").decode("ascii", "replace").strip()
        elif element != 0x0000:
            other[element] = bytes(raw)
    if COMMAND_FIELD not in values:
        raise CommandError("command set has no Command Field (0000,0100)")
    dataset_type = values.get(COMMAND_DATA_SET_TYPE, NO_DATASET)

    def optional(element: int) -> int | None:
        return int(values[element]) if element in values else None

    return Command(
        command_field=int(values[COMMAND_FIELD]),
        message_id=int(values.get(MESSAGE_ID, 0)),
        affected_sop_class_uid=str(values.get(AFFECTED_SOP_CLASS_UID, "")),
        affected_sop_instance_uid=str(values.get(AFFECTED_SOP_INSTANCE_UID, "")),
        has_dataset=dataset_type != NO_DATASET,
        priority=int(values.get(PRIORITY, 0)),
        move_originator_ae=str(values.get(MOVE_ORIGINATOR_AE, "")),
        move_originator_message_id=(
            int(values[MOVE_ORIGINATOR_MESSAGE_ID]) if MOVE_ORIGINATOR_MESSAGE_ID in values else None
        ),
        status=int(values[STATUS]) if STATUS in values else None,
        message_id_responded_to=optional(MESSAGE_ID_BEING_RESPONDED_TO),
        requested_sop_class_uid=str(values.get(REQUESTED_SOP_CLASS_UID, "")),
        requested_sop_instance_uid=str(values.get(REQUESTED_SOP_INSTANCE_UID, "")),
        move_destination=str(values.get(MOVE_DESTINATION, "")),
        action_type_id=optional(ACTION_TYPE_ID),
        event_type_id=optional(EVENT_TYPE_ID),
        sub_operations=(optional(NUMBER_OF_REMAINING_SUB_OPERATIONS), optional(NUMBER_OF_COMPLETED_SUB_OPERATIONS),
                        optional(NUMBER_OF_FAILED_SUB_OPERATIONS), optional(NUMBER_OF_WARNING_SUB_OPERATIONS)),
        other=other,
    )


def us(value: int) -> bytes:
    """An US command element's value bytes."""
    return US.pack(value)


def _element(element: int, value: bytes) -> bytes:
    return ELEMENT.pack(0x0000, element, len(value)) + value


def ui(value: str) -> bytes:
    """A UI command element's value bytes (NUL-padded to even length)."""
    return _ui(value)


def ae(value: str) -> bytes:
    """An AE command element's value bytes (space-padded to 16)."""
    return value.encode("ascii", "replace")[:16].ljust(16)


def _ui(value: str) -> bytes:
    # A response echoes the request's UIDs, which decode_command read with errors="replace": never fail on them.
    raw = value.encode("ascii", "replace")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def encode_command(elements: list[tuple[int, bytes]]) -> bytes:
    """Encode (element, value-bytes) pairs, sorted, with the Command Group Length first."""
    body = b"".join(_element(el, value) for el, value in sorted(elements))
    return _element(0x0000, UL.pack(len(body))) + body


def response(
    command_field: int,
    message_id: int,
    status: int,
    sop_class_uid: str = "",
    sop_instance_uid: str = "",
    error_comment: str = "",
    has_dataset: bool = False,
    extra: tuple[tuple[int, bytes], ...] = (),
) -> bytes:
    """A response command set. ``extra`` adds elements as (element, value bytes): sub-operation counts, Action or
    Event Type ID."""
    elements: list[tuple[int, bytes]] = [
        (COMMAND_FIELD, US.pack(command_field)),
        (MESSAGE_ID_BEING_RESPONDED_TO, US.pack(message_id)),
        (COMMAND_DATA_SET_TYPE, US.pack(HAS_DATASET if has_dataset else NO_DATASET)),
        (STATUS, US.pack(status)),
    ]
    if sop_class_uid:
        elements.append((AFFECTED_SOP_CLASS_UID, _ui(sop_class_uid)))
    if sop_instance_uid:
        elements.append((AFFECTED_SOP_INSTANCE_UID, _ui(sop_instance_uid)))
    if error_comment and status != 0:
        elements.append((ERROR_COMMENT, _text(error_comment[:64])))
    elements.extend(extra)
    return encode_command(elements)


def sub_operation_counts(remaining: int | None, completed: int, failed: int, warning: int) -> tuple[tuple[int, bytes], ...]:
    """``extra`` elements for a C-MOVE/C-GET response (PS3.7 9.3.3/9.3.4: Remaining is absent in a final one)."""
    counts = [(NUMBER_OF_COMPLETED_SUB_OPERATIONS, us(completed)), (NUMBER_OF_FAILED_SUB_OPERATIONS, us(failed)),
              (NUMBER_OF_WARNING_SUB_OPERATIONS, us(warning))]
    if remaining is not None:
        counts.append((NUMBER_OF_REMAINING_SUB_OPERATIONS, us(remaining)))
    return tuple(counts)


def store_request(message_id: int, sop_class_uid: str, sop_instance_uid: str, priority: int = 0,
                  move_originator_ae: str = "", move_originator_message_id: int | None = None) -> bytes:
    """A C-STORE-RQ; a C-MOVE sub-operation names the C-MOVE's requestor and message (PS3.7 9.1.1.1)."""
    elements = [
        (AFFECTED_SOP_CLASS_UID, _ui(sop_class_uid)),
        (COMMAND_FIELD, US.pack(C_STORE_RQ)),
        (MESSAGE_ID, US.pack(message_id)),
        (PRIORITY, US.pack(priority)),
        (COMMAND_DATA_SET_TYPE, US.pack(HAS_DATASET)),
        (AFFECTED_SOP_INSTANCE_UID, _ui(sop_instance_uid)),
    ]
    if move_originator_ae:
        elements.append((MOVE_ORIGINATOR_AE, ae(move_originator_ae)))
    if move_originator_message_id is not None:
        elements.append((MOVE_ORIGINATOR_MESSAGE_ID, US.pack(move_originator_message_id)))
    return encode_command(elements)


def event_report_request(message_id: int, sop_class_uid: str, sop_instance_uid: str, event_type_id: int) -> bytes:
    """An N-EVENT-REPORT-RQ with its Event Information dataset to follow (Storage Commitment results)."""
    return encode_command(
        [
            (AFFECTED_SOP_CLASS_UID, _ui(sop_class_uid)),
            (COMMAND_FIELD, US.pack(N_EVENT_REPORT_RQ)),
            (MESSAGE_ID, US.pack(message_id)),
            (COMMAND_DATA_SET_TYPE, US.pack(HAS_DATASET)),
            (AFFECTED_SOP_INSTANCE_UID, _ui(sop_instance_uid)),
            (EVENT_TYPE_ID, US.pack(event_type_id)),
        ]
    )


def echo_request(message_id: int) -> bytes:
    return encode_command(
        [
            (AFFECTED_SOP_CLASS_UID, _ui("1.2.840.10008.1.1")),
            (COMMAND_FIELD, US.pack(C_ECHO_RQ)),
            (MESSAGE_ID, US.pack(message_id)),
            (COMMAND_DATA_SET_TYPE, US.pack(NO_DATASET)),
        ]
    )
