"""What a blob is: the Part-10 file of one instance, named by its SHA-256.

A blob is a complete DICOM Part-10 file: 128-byte preamble, ``DICM``, a File Meta group built from the
C-STORE command and the negotiated transfer syntax, then the dataset bytes exactly as received. The File Meta
holds nothing that varies between two sends of the same dataset (no time, no calling AE), so an identical
re-send hashes to the same blob. SHA-256: in the standard library, hardware-accelerated (SHA-NI) on current
x86 and ARM servers (1.7 GB/s on one core here, faster than a core can receive DICOM), and it is what
security reviews expect for content addressing.
"""

from __future__ import annotations

import struct

from appliance.dicom.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

_ELEMENT_SHORT = struct.Struct("<HH2sH")
_ELEMENT_LONG = struct.Struct("<HH2s2xL")


def _even(raw: bytes, pad: bytes) -> bytes:
    return raw + pad if len(raw) % 2 else raw


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble + ``DICM`` + File Meta Information group (PS3.10 7.1), Explicit VR Little Endian."""
    elements = [
        _ELEMENT_LONG.pack(0x0002, 0x0001, b"OB", 2) + b"\x00\x01",
    ]
    for element, vr, value, pad in (
        (0x0002, b"UI", sop_class_uid, b"\x00"),
        (0x0003, b"UI", sop_instance_uid, b"\x00"),
        (0x0010, b"UI", transfer_syntax, b"\x00"),
        (0x0012, b"UI", IMPLEMENTATION_CLASS_UID, b"\x00"),
        (0x0013, b"SH", IMPLEMENTATION_VERSION_NAME, b" "),
    ):
        raw = _even(value.encode("ascii"), pad)
        elements.append(_ELEMENT_SHORT.pack(0x0002, element, vr, len(raw)) + raw)
    body = b"".join(elements)
    group_length = _ELEMENT_SHORT.pack(0x0002, 0x0000, b"UL", 4) + struct.pack("<L", len(body))
    return b"\x00" * 128 + b"DICM" + group_length + body
