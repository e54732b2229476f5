"""One table of error codes: each error the appliance raises carries its DIMSE status and its CLI exit code.

DIMSE statuses (PS3.4 Annex B for C-STORE, PS3.7 Annex C for the general ones):

======  ==================================================  ========================================
status  meaning                                             raised when
======  ==================================================  ========================================
0x0000  Success                                             stored (or an identical re-send)
0x0111  Duplicate SOP Instance                              duplicate_policy = "reject", other bytes
0x0122  Refused: SOP Class not supported                    command names a class we did not accept
0x0124  Refused: Not authorized                             peer not allowed to store
0xA700  Refused: Out of resources                           no volume can take the instance
0xA900  Error: Data Set does not match SOP Class            dataset UIDs differ from the command
0xC000  Error: Cannot understand                            dataset cannot be parsed
0xC001  Error: Cannot understand (missing UIDs)             dataset lacks Study/Series/SOP UIDs
0xC211  Processing failure (index)                          index transaction failed
======  ==================================================  ========================================

Query/Retrieve (PS3.4 C.4) and Storage Commitment (PS3.4 J.3, PS3.7 C):

======  ==================================================  ========================================
0xFF00  Pending                                             a C-FIND match / C-MOVE, C-GET progress
0xFF01  Pending, optional keys not supported                a C-FIND match without some return keys
0xFE00  Cancel                                              C-CANCEL honoured
0xA700  Refused: Out of resources                           C-FIND result limit, no memory/slots
0xA701  Refused: Out of resources (number of matches)       C-MOVE/C-GET cannot count its matches
0xA702  Refused: Out of resources (sub-operations)          C-MOVE/C-GET cannot start sub-operations, or
                                                            its study is on tape (recall queued)
0xA801  Refused: Move Destination unknown                   not under [peers], or no right to receive
0xA900  Identifier does not match SOP Class                 C-FIND/C-MOVE/C-GET identifier invalid
0xB000  Warning: sub-operations complete, some failed       C-MOVE/C-GET with failures
0xC000  Unable to process                                   identifier cannot be parsed
0x0110  Processing failure                                  Storage Commitment: bytes do not re-hash
0x0112  No such object instance                             Storage Commitment: instance not indexed
0x0119  Class-instance conflict                             Storage Commitment: other SOP class stored
0x0112  No such object instance (N-ACTION)                  N-ACTION not on the well-known instance
0x0115  Invalid argument value                              N-ACTION dataset unreadable, or without its
                                                            Transaction UID or references
0x0123  No such action                                      N-ACTION with an unknown Action Type ID
0x0213  Resource limitation                                 N-ACTION beyond [commitment] bounds
0x0211  Unrecognized operation                              a command this SOP class does not have
======  ==================================================  ========================================
"""

from __future__ import annotations

SUCCESS = 0x0000
DUPLICATE_SOP_INSTANCE = 0x0111
SOP_CLASS_NOT_SUPPORTED = 0x0122
NOT_AUTHORIZED = 0x0124
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
CANNOT_UNDERSTAND_MISSING_UIDS = 0xC001
PROCESSING_FAILURE = 0xC211

PENDING = 0xFF00
PENDING_WARNING = 0xFF01
CANCEL = 0xFE00
OUT_OF_RESOURCES_MATCHES = 0xA701
OUT_OF_RESOURCES_SUB_OPERATIONS = 0xA702
MOVE_DESTINATION_UNKNOWN = 0xA801
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
SUB_OPERATIONS_WITH_FAILURES = 0xB000
UNABLE_TO_PROCESS = 0xC000
N_PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
NO_SUCH_ACTION = 0x0123
INVALID_ARGUMENT_VALUE = 0x0115
RESOURCE_LIMITATION = 0x0213
UNRECOGNIZED_OPERATION = 0x0211

# CLI exit codes (sysexits-like, so scripts can branch on them).
EXIT_OK = 0
EXIT_FAILURE = 1  # generic, or `verify` found mismatches
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_CONFIG = 78  # EX_CONFIG
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: volume detached, index locked, ...
# EX_NOINPUT: a configured volume is missing, not marked (an unmounted mount point) or marked as another volume.
# Only a person can fix it, so systemd does not restart on it (RestartPreventExitStatus in appliance.service).
EXIT_VOLUME_REFUSED = 66
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: what was confirmed changed meanwhile; run the command again


class ApplianceError(Exception):
    """Base class. ``status`` is the DIMSE status to answer with, ``exit_code`` the CLI's."""

    status: int = PROCESSING_FAILURE
    exit_code: int = EXIT_FAILURE


class ConfigError(ApplianceError):
    exit_code = EXIT_CONFIG


class NotFound(ApplianceError):
    exit_code = EXIT_NOT_FOUND


class VolumeError(ApplianceError):
    """A volume cannot be used: detached mount, not initialised, unwritable."""

    status = OUT_OF_RESOURCES
    exit_code = EXIT_UNAVAILABLE


class VolumeRefused(VolumeError):
    """A configured volume is not there as configured (no folder, no marker, another volume's marker): never created
    or written into by ``serve``; a person mounts it or runs ``appliance volume init``."""

    exit_code = EXIT_VOLUME_REFUSED


class OutOfSpace(ApplianceError):
    status = OUT_OF_RESOURCES
    exit_code = EXIT_UNAVAILABLE


class DatasetMismatch(ApplianceError):
    status = DATASET_DOES_NOT_MATCH_SOP_CLASS


class CannotUnderstand(ApplianceError):
    status = CANNOT_UNDERSTAND


class MissingUIDs(ApplianceError):
    status = CANNOT_UNDERSTAND_MISSING_UIDS


class DuplicateRejected(ApplianceError):
    status = DUPLICATE_SOP_INSTANCE


class IndexInUse(ApplianceError):
    exit_code = EXIT_UNAVAILABLE


class IndexFailure(ApplianceError):
    status = PROCESSING_FAILURE


class BlobMissing(ApplianceError):
    """A location names nothing readable (deleted, its segment compacted away, the medium gone)."""

    exit_code = EXIT_NOT_FOUND


class Offline(BlobMissing):
    """The only readable copies of a blob are on an offline tier (tape): it must be recalled first. A retrieve that
    cannot wait for the recall answers with this status (PS3.4 C.4.2.1.5: Refused, Out of resources - Unable to
    perform sub-operations, a condition that passes: the recall is queued) and this message as its Error Comment."""

    status = OUT_OF_RESOURCES_SUB_OPERATIONS
    exit_code = EXIT_UNAVAILABLE

    def __init__(self, message: str = "study is on tape; recall queued") -> None:
        super().__init__(message)


class TierUnavailable(BlobMissing):
    """A tier's storage cannot be used now (an object store down, slower than its timeouts, throttling beyond its
    retries, or a bucket that refuses writes): nothing is known to be lost. A read falls back to other copies as
    for a lost one; a retrieve that has none fails its sub-operation with this message as the Error Comment (keep
    it short: 64 characters); the mover pauses its run (the journaled move is finished by the next run) instead
    of failing study after study. ``tier`` names the tier ("" when the raiser does not know it)."""

    exit_code = EXIT_UNAVAILABLE

    def __init__(self, message: str, tier: str = "") -> None:
        super().__init__(message)
        self.tier = tier


class BlobCorrupt(BlobMissing):
    """A blob's stored bytes fail their own check (a zstd frame checksum, a digest, an archive header that does
    not parse): it is not served. A BlobMissing, so that a reader falls back to another copy as for a lost one."""


class StorageFault(ApplianceError):
    """An I/O error after which the page cache or a backend's state cannot be trusted (a failed fsync or LMDB
    commit): the process stops (fail-stop) instead of retrying, and acknowledges nothing more."""

    exit_code = EXIT_UNAVAILABLE


STATUS_NAMES = {
    SUCCESS: "Success",
    DUPLICATE_SOP_INSTANCE: "Duplicate SOP Instance",
    SOP_CLASS_NOT_SUPPORTED: "SOP Class not supported",
    NOT_AUTHORIZED: "Not authorized",
    OUT_OF_RESOURCES: "Out of resources",
    DATASET_DOES_NOT_MATCH_SOP_CLASS: "Data Set does not match SOP Class",
    CANNOT_UNDERSTAND: "Cannot understand",
    CANNOT_UNDERSTAND_MISSING_UIDS: "Cannot understand (missing UIDs)",
    PROCESSING_FAILURE: "Processing failure",
    N_PROCESSING_FAILURE: "Processing failure",
    NO_SUCH_OBJECT_INSTANCE: "No such object instance",
    CLASS_INSTANCE_CONFLICT: "Class-instance conflict",
    INVALID_ARGUMENT_VALUE: "Invalid argument value",
    NO_SUCH_ACTION: "No such action",
    RESOURCE_LIMITATION: "Resource limitation",
    UNRECOGNIZED_OPERATION: "Unrecognized operation",
}


class OnHold(ApplianceError):
    """A study under legal hold: no delete and no retention rule removes it (`appliance hold --release` first)."""

    exit_code = EXIT_FAILURE


class Changed(ApplianceError):
    """What a person confirmed is no longer what the command would do (a delete whose set of instances changed
    between its preview and the confirmation): nothing done, run it again to see the new preview."""

    exit_code = EXIT_TEMPFAIL
