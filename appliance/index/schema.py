"""Typed index records (schema version 5), encoded with msgspec's MessagePack.

The index never parses a backend's location: a copy carries its container (a segment, an archive, a tape
file set) and the bytes it occupies there, which is all that space accounting and compaction need.
"""

from __future__ import annotations

from typing import Any

import msgspec

# 3: studies carry PatientName and their SOP classes; idx_patientname and idx_modality (C-FIND). A version 2 index
# is upgraded in place when opened for writing (index/upgrade.py).
# 4: tiering: placement, moves and recalls (index/tiers.py); a version 3 index gains the empty tables in place.
# 5: legal holds (index/deletion.py); a version 4 index gains the empty table in place.
SCHEMA_VERSION = b"5"

# Instance Availability (PS3.4 C.4.1.1.3.2): what C-FIND reports and what decides whether a retrieve must recall.
ONLINE, NEARLINE, OFFLINE = "ONLINE", "NEARLINE", "OFFLINE"
AVAILABILITIES = (ONLINE, NEARLINE, OFFLINE)

# State of one copy of a blob.
COPY_OK = "ok"  # durable and named; readable as far as we know
COPY_SUSPECT = "suspect"  # verify found it missing or corrupt


class Copy(msgspec.Struct, frozen=True):
    """One place where a blob's bytes are."""

    backend: str  # the backend's name: a volume name for the online segments, a tier's name otherwise
    container: str  # the segment (or archive) holding it; compaction and space accounting work per container
    location: str  # opaque to the index: the backend's own address of the blob
    stored_bytes: int  # bytes the copy occupies in its container (headers and padding included)
    received_ns: int = 0  # the provenance of the record this copy is (identical bytes: the earliest one is kept)
    state: str = COPY_OK
    verified_ns: int = 0  # last time `verify` re-hashed it (0: never)


class BlobRecord(msgspec.Struct):
    size: int
    refs: int  # instances naming this content (identical bytes are stored once)
    copies: list[Copy]

    def __post_init__(self) -> None:
        assert self.refs >= 0 and self.size >= 0


class InstanceRecord(msgspec.Struct):
    attrs: dict[str, str]  # the instance-level attributes of the header (records.INSTANCE_ATTRS)
    digest: str
    size: int
    transfer_syntax: str
    received_ns: int
    calling_ae: str
    availability: str = ONLINE

    def public(self) -> dict[str, Any]:
        """The flat view the CLI shows (attribute names as in DICOM, provenance beside them)."""
        return {**self.attrs, "digest": self.digest, "size": self.size, "TransferSyntaxUID": self.transfer_syntax,
                "received_ns": self.received_ns, "calling_ae": self.calling_ae,
                "InstanceAvailability": self.availability}


class LevelRecord(msgspec.Struct):
    """A patient, study or series: its attributes (those of its most recently received instance, so the result does
    not depend on commit order) and what lies under it."""

    attrs: dict[str, str]
    instances: int = 0
    size: int = 0
    children: int = 0  # studies of a patient, series of a study (0 for a series)
    modalities: list[str] = msgspec.field(default_factory=list)  # a study's ModalitiesInStudy, sorted
    # A study's SOP classes with how many of its instances have each: SOPClassesInStudy, kept exact when an
    # instance is replaced without scanning the study.
    sop_classes: dict[str, int] = msgspec.field(default_factory=dict)
    latest_ns: int = 0  # receive time of the instance the attributes come from

    def count_in(self, size: int, attrs: dict[str, str], received_ns: int) -> None:
        self.instances += 1
        self.size += size
        if received_ns >= self.latest_ns:
            self.attrs.update(attrs)
            self.latest_ns = received_ns

    def public(self, level: str) -> dict[str, Any]:
        """The flat view the CLI shows (DICOM-like names for the counts)."""
        out: dict[str, Any] = {**self.attrs, "NumberOfInstances": self.instances, "Size": self.size}
        if level == "patients":
            out["NumberOfStudies"] = self.children
        elif level == "studies":
            out["NumberOfSeries"] = self.children
            out["ModalitiesInStudy"] = list(self.modalities)
            out["SOPClassesInStudy"] = sorted(self.sop_classes)
        return out


class ContainerRecord(msgspec.Struct):
    """A segment (or another backend's container) and what of it is still named by the index."""

    backend: str
    name: str
    created_ns: int
    end: int = 0  # bytes committed so far: recovery truncates what lies beyond (never acknowledged)
    live_bytes: int = 0  # bytes of the records the index names; the rest is dead (overwritten, duplicates)
    live_records: int = 0
    sealed: bool = False

    def __post_init__(self) -> None:
        assert self.live_bytes >= 0 and self.live_records >= 0 and self.end >= 0


# The placement of a study that never moved: the online volumes (config_tiering.ONLINE_TIER; not imported, the
# index knows nothing of the config).
ONLINE_TIER = "online"


class StudyPlacement(msgspec.Struct):
    """Where a study was put by the last move or recall, and when it was last read (the policies' inputs)."""

    tier: str  # ONLINE_TIER or a tier's name
    since_ns: int  # when the last move or recall switched it there (0: never moved)
    last_access_ns: int = 0  # last retrieve or export (0: never read since received)


class MoveRecord(msgspec.Struct):
    """The journal of a move in progress: written (durable) before the first byte is copied, deleted by the
    switch that completes it. A crash leaves it, and the next mover redoes the move from the copy."""

    policy: str
    source: str  # tier names
    target: str
    container: str  # the target container the copies go to (removed before a redo)
    phase: str  # "copy" (the only phase journaled: everything up to the switch is redone after a crash)
    started_ns: int


class RecallRecord(msgspec.Struct):
    requested_ns: int
    requested_by: str  # who asked: "cli", "c-move", "c-get", "export" (never a patient's data)
    attempts: int = 0
    error: str = ""  # the last failure, for `tier status`


class StudyFacts(msgspec.Struct, frozen=True):
    """What the planner (tiering/policy.py) knows of one study."""

    key: str  # pk NUL study_uid
    uid: str
    bytes: int
    instances: int
    latest_ns: int  # receive time of its last instance
    modalities: tuple[str, ...]
    calling_aes: tuple[str, ...]
    tier: str  # StudyPlacement.tier (ONLINE_TIER when never moved)
    since_ns: int
    last_access_ns: int  # 0: never read
    partly_online: bool  # placed on a slower tier, but instances received since are online
    moving: bool = False  # a move is journaled
    recall_queued: bool = False


_encoder = msgspec.msgpack.Encoder()
_decoders: dict[type, msgspec.msgpack.Decoder[Any]] = {}


def encode(record: msgspec.Struct) -> bytes:
    return _encoder.encode(record)


def decode(kind: type, raw: bytes | memoryview) -> Any:
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.msgpack.Decoder(kind)
    return decoder.decode(raw)


def to_builtins(record: msgspec.Struct) -> Any:
    return msgspec.to_builtins(record)
