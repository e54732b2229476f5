"""A bounded network fuzzer: real PDU streams, mutated, sent to a running `appliance serve` (issue 8, item 7).

Streams are recorded, not written by hand: pynetdicom and DCMTK's storescu/echoscu talk to the server under test
through a small TCP relay that keeps what the peer sent (A-ASSOCIATE-RQ with several presentation contexts,
C-ECHO, C-STOREs whose dataset is split over several P-DATA-TF PDUs, A-RELEASE-RQ). Each case takes one
recording, gives its SOP Instance UIDs fresh values of the same length, applies one to three seeded mutations
(bit flips, interesting bytes, truncation, whole PDUs dropped/duplicated/swapped/inserted, PDU and PDV length
fields, PDV control bytes and context IDs, command-set elements, item lengths inside the A-ASSOCIATE-RQ) and a
delivery plan (odd TCP chunk sizes with small delays; close, half-close or reset at the end), sends it within a
bounded time and reads whatever comes back.

After each case (``check_every``) the server must: still answer a C-ECHO (pynetdicom), run the same worker
PIDs, get back to its baseline descriptor count per worker (polled: the short timeouts of ``FUZZ_SERVER``
bound how long a case may keep a connection), hold no spill file in tmp/, have logged no ERROR or traceback,
stay under an RSS bound, and its index must hold every instance answered Success and no instance that no
complete C-STORE in the stream could have produced (a broken-off dataset leaves nothing).

Case ``n`` of seed ``s`` depends on (s, n) alone. A failing case is written to ``<out>/fuzz-<seed>-<n>.json``
(the exact bytes and delivery plan) and can be replayed against a fresh server with ``--replay FILE``.

    python -m tests.fuzz.fuzzer --seconds 180 --seed 1       # what `make fuzz` runs
    python -m tests.fuzz.fuzzer --replay var/fuzz/fuzz-1-37.json
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import random
import re
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HEADER = struct.Struct(">BxL")
PDV_HEADER = struct.Struct(">LBB")
ELEMENT = struct.Struct("<HHL")

# The server the fuzzer runs against: short timeouts so that every case settles within seconds, a small max PDU
# so that datasets travel in several P-DATA-TF PDUs (and oversize PDUs are cheap to produce), and a small
# in-memory spool so that the test instance spills to tmp/ (whose cleanup is checked).
FUZZ_SERVER: dict[str, Any] = {
    "acse_timeout": 1.0, "message_timeout": 2.0, "write_timeout": 1.0, "idle_timeout": 2.0, "max_pdu": 16384,
    "workers": 1, "log_level": "info",
    # The query/retrieve recording calls with an AE title not under [peers]: give those the rights it uses.
    "unknown_peer_rights": ["echo", "store", "find", "get"],
}
# A C-GET whose C-STORE sub-operation the mutated stream never answers must end within the settle time.
FUZZ_RETRIEVE: dict[str, Any] = {"sub_operation_timeout_s": 2.0, "pending_interval_ms": 10.0}
FUZZ_STORAGE: dict[str, Any] = {"spool_memory_bytes": 65536}
SETTLE_SECONDS = 8.0  # acse + message + write timeouts, with margin: how long a case may keep descriptors

# Recorded instances carry these SOP Instance UIDs; each case replaces them by fresh UIDs of the same length
# (40 characters, even, so no padding or length field changes).
TEMPLATE_UIDS = ("2.25.9" + "1" * 34, "2.25.9" + "2" * 34)
SUCCESS = frozenset({0x0000, 0xB000, 0xB006, 0xB007})  # C-STORE statuses that mean "stored"
C_STORE_RSP = 0x8001

INTERESTING_8 = (0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x7F, 0x80, 0xFE, 0xFF)
INTERESTING_16 = (0x0000, 0x0001, 0x0002, 0x0004, 0x00FF, 0x0100, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF)
INTERESTING_32 = (0, 1, 2, 4, 6, 0xFF, 0x1000, 0x3FFF, 0x4000, 0x4001, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000,
                  0xFFFFFFFE, 0xFFFFFFFF)

log = logging.getLogger("fuzz")


# ---- recordings ----------------------------------------------------------------------------------------------


class Relay:
    """One TCP connection 127.0.0.1:port -> the server, forwarded both ways; keeps what the client sent."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sent = bytearray()

    def record(self, client: Callable[[int], None]) -> bytes:
        thread = threading.Thread(target=self._pump, daemon=True)
        thread.start()
        try:
            client(self.port)
        finally:
            thread.join(30)
            self.listener.close()
        return bytes(self.sent)

    def _pump(self) -> None:
        self.listener.settimeout(30)
        down, _ = self.listener.accept()
        up = socket.create_connection(("127.0.0.1", self.target_port), timeout=30)
        for s in (down, up):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
        sel = selectors.DefaultSelector()
        sel.register(down, selectors.EVENT_READ, up)
        sel.register(up, selectors.EVENT_READ, down)
        open_sides = 2
        deadline = time.monotonic() + 60
        try:
            while open_sides and time.monotonic() < deadline:
                for key, _ in sel.select(1.0):
                    src: socket.socket = key.fileobj  # type: ignore[assignment]
                    dst: socket.socket = key.data
                    try:
                        data = src.recv(65536)
                    except (ConnectionResetError, BlockingIOError):
                        data = b""
                    if not data:
                        sel.unregister(src)
                        open_sides -= 1
                        try:
                            dst.shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                        continue
                    if src is down:
                        self.sent += data
                    dst.setblocking(True)
                    try:
                        dst.sendall(data)
                    except OSError:
                        pass
                    dst.setblocking(False)
        finally:
            down.close()
            up.close()


def fuzz_instance(path: Path, uid: str, big: bool) -> Path:
    """A CT (pydicom's CT_small) with SOP Instance UID ``uid``; ``big``: 256x256 pixels (128 KiB, more than the
    fuzz server's in-memory spool, in eight 16 KiB P-DATA-TF PDUs)."""
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    if big:
        ds.Rows = ds.Columns = 256
        ds.PixelData = random.Random(uid).randbytes(256 * 256 * 2)
    ds.save_as(path, enforce_file_format=True)
    return path


def _pynetdicom_client(files: list[Path]) -> Callable[[int], None]:
    def run(port: int) -> None:
        import pydicom
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import AE
        from pynetdicom.sop_class import CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage, Verification

        ae = AE(ae_title="FUZZSCU")
        ae.maximum_pdu_size = 16384
        ae.add_requested_context(Verification)
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian])
        ae.add_requested_context(SecondaryCaptureImageStorage, [ImplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", port, ae_title="APPLIANCE")
        if not assoc.is_established:
            raise RuntimeError("recording: association refused")
        try:
            assoc.send_c_echo()
            for path in files:
                status = assoc.send_c_store(pydicom.dcmread(path))
                if int(status.Status) not in SUCCESS:
                    raise RuntimeError(f"recording: C-STORE answered 0x{int(status.Status):04x}")
            assoc.send_c_echo()
        finally:
            assoc.release()
    return run


def _query_retrieve_client(study_uid: str) -> Callable[[int], None]:
    """C-FIND in both models (wildcard, range, list, return keys) and a C-GET of one study with role selection:
    the identifiers and the sub-operation responses the query/retrieve handlers parse."""
    def run(port: int) -> None:
        import pydicom
        from pydicom.uid import ExplicitVRLittleEndian
        from pynetdicom import AE, build_role, evt
        from pynetdicom.sop_class import (
            CTImageStorage,
            PatientRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelGet,
        )

        ae = AE(ae_title="FUZZQR")
        ae.maximum_pdu_size = 16384
        for model in (StudyRootQueryRetrieveInformationModelFind, PatientRootQueryRetrieveInformationModelFind,
                      StudyRootQueryRetrieveInformationModelGet):
            ae.add_requested_context(model, [ExplicitVRLittleEndian])
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", port, ae_title="APPLIANCE", ext_neg=[build_role(CTImageStorage, scp_role=True)],
                             evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
        if not assoc.is_established:
            raise RuntimeError("recording: association refused")
        try:
            study = pydicom.Dataset()
            study.QueryRetrieveLevel = "STUDY"
            study.SpecificCharacterSet = "ISO_IR 100"
            study.PatientName = "*"
            study.StudyDate = "19000101-20991231"
            study.StudyInstanceUID = f"{study_uid}\\1.2.3"
            study.ModalitiesInStudy = study.PatientID = study.NumberOfStudyRelatedInstances = ""
            patient = pydicom.Dataset()
            patient.QueryRetrieveLevel = "PATIENT"
            patient.PatientID = "*"
            patient.PatientName = ""
            for identifier, model in ((study, StudyRootQueryRetrieveInformationModelFind),
                                      (patient, PatientRootQueryRetrieveInformationModelFind)):
                statuses = [int(st.Status) for st, _ in assoc.send_c_find(identifier, model) if st]
                if not statuses or statuses[-1] != 0:
                    raise RuntimeError(f"recording: C-FIND answered {statuses}")
            get = pydicom.Dataset()
            get.QueryRetrieveLevel = "STUDY"
            get.StudyInstanceUID = study_uid
            statuses = [int(st.Status) for st, _ in assoc.send_c_get(get, StudyRootQueryRetrieveInformationModelGet)
                        if st]
            if not statuses or statuses[-1] != 0:
                raise RuntimeError(f"recording: C-GET answered {statuses}")
        finally:
            assoc.release()
    return run


def _dcmtk_client(tool: str, *args: str) -> Callable[[int], None]:
    def run(port: int) -> None:
        env = {**os.environ, "TCP_NODELAY": "1"}
        result = subprocess.run([tool, "-aet", "DCMTKSCU", "-aec", "APPLIANCE", "127.0.0.1", str(port), *args],
                                capture_output=True, text=True, env=env, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"recording with {tool} failed: {result.stderr}")
    return run


def record_streams(port: int, workdir: Path) -> dict[str, bytes]:
    """The seed corpus: what real peers send, recorded against the server on ``port``."""
    big = fuzz_instance(workdir / "big.dcm", TEMPLATE_UIDS[0], big=True)
    small = fuzz_instance(workdir / "small.dcm", TEMPLATE_UIDS[1], big=False)
    streams = {"pynetdicom": Relay(port).record(_pynetdicom_client([big, small]))}
    import pydicom

    study_uid = str(pydicom.dcmread(small, stop_before_pixels=True).StudyInstanceUID)
    streams["query-retrieve"] = Relay(port).record(_query_retrieve_client(study_uid))
    if shutil.which("storescu"):
        # storescu proposes its default contexts (dozens of storage classes, several transfer syntaxes each).
        streams["storescu"] = Relay(port).record(_dcmtk_client("storescu", "--max-pdu", "16384", str(big)))
        streams["echoscu"] = Relay(port).record(_dcmtk_client("echoscu"))
    for name, stream in streams.items():
        if not stream.startswith(b"\x01\x00"):
            raise RuntimeError(f"recording {name}: does not start with an A-ASSOCIATE-RQ")
    return streams


# ---- framing (lenient: for mutating and for reading answers) ---------------------------------------------------


def split_pdus(stream: bytes) -> list[bytes]:
    """Whole PDUs as their length fields say; a trailing partial one is kept as is."""
    out, offset = [], 0
    while offset < len(stream):
        if len(stream) - offset < 6:
            out.append(stream[offset:])
            break
        _type, length = HEADER.unpack_from(stream, offset)
        out.append(stream[offset : offset + 6 + length])
        offset += 6 + length
    return out


def iter_pdvs(body: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(offset in body, context id, control, data) of each well-formed PDV; stops at the first malformed one."""
    offset = 0
    while len(body) - offset >= 6:
        length, context_id, control = PDV_HEADER.unpack_from(body, offset)
        if length < 2 or offset + 4 + length > len(body):
            return
        yield offset, context_id, control, body[offset + 6 : offset + 4 + length]
        offset += 4 + length


def complete_datasets(stream: bytes) -> int:
    """How many dataset PDVs marked last the stream holds in whole PDUs: an upper bound on the instances the
    server may store from it. None means nothing may be stored (a broken-off dataset leaves nothing)."""
    count = 0
    for unit in split_pdus(stream):
        if len(unit) < 6 or unit[0] != 0x04 or HEADER.unpack_from(unit)[1] != len(unit) - 6:
            continue
        count += sum(1 for _o, _c, control, _d in iter_pdvs(unit[6:]) if control & 3 == 2)
    return count


@dataclass
class Answer:
    """What the server sent back in one case."""

    pdu_types: list[int] = field(default_factory=list)
    stores: list[tuple[int, str]] = field(default_factory=list)  # (status, affected SOP instance UID)
    nbytes: int = 0
    eof: bool = False


def parse_answer(data: bytes, eof: bool) -> Answer:
    from appliance.net import dimse

    answer = Answer(nbytes=len(data), eof=eof)
    command: dict[int, bytearray] = {}
    for unit in split_pdus(data):
        if len(unit) < 6 or HEADER.unpack_from(unit)[1] != len(unit) - 6:
            break
        answer.pdu_types.append(unit[0])
        if unit[0] != 0x04:
            continue
        for _o, context_id, control, pdv in iter_pdvs(unit[6:]):
            if not control & 1:
                continue
            buf = command.setdefault(context_id, bytearray())
            buf += pdv
            if control & 2:
                try:
                    rsp = dimse.decode_command(bytes(buf))
                except dimse.CommandError:
                    rsp = None
                buf.clear()
                if rsp is not None and rsp.command_field == C_STORE_RSP and rsp.status is not None:
                    answer.stores.append((rsp.status, rsp.affected_sop_instance_uid))
    return answer


# ---- mutations -----------------------------------------------------------------------------------------------


def _set(data: bytearray, offset: int, fmt: str, value: int) -> None:
    size = struct.calcsize(fmt)
    if 0 <= offset and offset + size <= len(data):
        struct.pack_into(fmt, data, offset, value & ((1 << (8 * size)) - 1))


def _pick(rng: random.Random, units: list[bytes], pdu_type: int | None = None) -> int | None:
    candidates = [i for i, u in enumerate(units) if len(u) >= 6 and (pdu_type is None or u[0] == pdu_type)]
    return rng.choice(candidates) if candidates else None


def _fix_length(unit: bytearray) -> bytes:
    struct.pack_into(">L", unit, 2, len(unit) - 6)
    return bytes(unit)


def m_drop_pdu(rng: random.Random, units: list[bytes]) -> str:
    i = rng.randrange(len(units))
    del units[i]
    return f"drop pdu {i}"


def m_duplicate_pdu(rng: random.Random, units: list[bytes]) -> str:
    i = rng.randrange(len(units))
    j = rng.randrange(len(units) + 1)
    units.insert(j, units[i])
    return f"duplicate pdu {i} at {j}"


def m_swap_pdus(rng: random.Random, units: list[bytes]) -> str:
    i, j = rng.randrange(len(units)), rng.randrange(len(units))
    units[i], units[j] = units[j], units[i]
    return f"swap pdus {i} {j}"


def m_insert_pdu(rng: random.Random, units: list[bytes]) -> str:
    kind = rng.choice(["rq-again", "ac", "rj", "p-data-empty", "p-data-pdv-len0", "release-rp", "release-rq",
                       "abort", "unknown", "zero-len"])
    pdu = {
        "rq-again": units[0],
        "ac": bytes([0x02, 0]) + struct.pack(">L", 68) + bytes(68),
        "rj": bytes([0x03, 0, 0, 0, 0, 4, 0, 1, 1, 1]),
        "p-data-empty": bytes([0x04, 0]) + struct.pack(">L", 0),
        "p-data-pdv-len0": bytes([0x04, 0]) + struct.pack(">L", 6) + PDV_HEADER.pack(0, 1, 3),
        "release-rp": bytes([0x06, 0, 0, 0, 0, 4, 0, 0, 0, 0]),
        "release-rq": bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]),
        "abort": bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0]),
        "unknown": bytes([rng.choice([0x00, 0x08, 0x10, 0x7F, 0xFF]), 0, 0, 0, 0, 4, 1, 2, 3, 4]),
        "zero-len": bytes([rng.randint(1, 7), 0, 0, 0, 0, 0]),
    }[kind]
    j = rng.randrange(len(units) + 1)
    units.insert(j, pdu)
    return f"insert {kind} at {j}"


def m_pdu_length(rng: random.Random, units: list[bytes]) -> str:
    i = rng.randrange(len(units))
    unit = bytearray(units[i])
    if len(unit) < 6:
        return "pdu length: none"
    actual = len(unit) - 6
    value = rng.choice([*INTERESTING_32, actual - 1, actual + 1, actual + rng.randint(2, 64), actual // 2,
                        16384 - 6, 16384, 16385, 65536, 65537])
    _set(unit, 2, ">L", value)
    units[i] = bytes(unit)
    return f"pdu {i} length {value}"


def m_pdu_type(rng: random.Random, units: list[bytes]) -> str:
    i = rng.randrange(len(units))
    unit = bytearray(units[i])
    new = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 0x80, 0xFF])
    unit[0] = new
    if len(unit) > 1 and rng.random() < 0.3:
        unit[1] = rng.choice(INTERESTING_8)  # the reserved byte
    units[i] = bytes(unit)
    return f"pdu {i} type 0x{new:02x}"


def m_pdv(rng: random.Random, units: list[bytes]) -> str:
    i = _pick(rng, units, 0x04)
    if i is None:
        return "pdv: no p-data"
    unit = bytearray(units[i])
    pdvs = list(iter_pdvs(bytes(unit[6:])))
    if not pdvs:
        return "pdv: none"
    offset = 6 + rng.choice(pdvs)[0]
    what = rng.choice(["length", "context", "control", "control-bit"])
    if what == "length":
        actual = struct.unpack_from(">L", unit, offset)[0]
        value = rng.choice([*INTERESTING_32, actual - 1, actual + 1, actual + 2])
        _set(unit, offset, ">L", value)
        return_value = f"pdv in pdu {i} length {value}"
    elif what == "context":
        value = rng.choice([0, 2, 3, 5, 7, 9, 127, 129, 255])
        unit[offset + 4] = value
        return_value = f"pdv in pdu {i} context {value}"
    elif what == "control":
        value = rng.choice([0x00, 0x01, 0x02, 0x03, 0x04, 0xFC, 0xFF])
        unit[offset + 5] = value
        return_value = f"pdv in pdu {i} control 0x{value:02x}"
    else:
        bit = rng.choice([1, 2])
        unit[offset + 5] ^= bit
        return_value = f"pdv in pdu {i} control ^ {bit}"
    units[i] = bytes(unit)
    return return_value


def m_refragment(rng: random.Random, units: list[bytes]) -> str:
    """Valid but unusual framing: one P-DATA-TF's PDVs re-cut into several PDVs (or merged with the next PDU's)."""
    i = _pick(rng, units, 0x04)
    if i is None:
        return "refragment: no p-data"
    pdvs = list(iter_pdvs(units[i][6:]))
    if len(pdvs) != 1:
        return "refragment: not one pdv"
    _o, context_id, control, data = pdvs[0]
    if rng.random() < 0.5 and len(data) > 1:
        cut = rng.randint(1, len(data) - 1)
        body = (PDV_HEADER.pack(cut + 2, context_id, control & ~2 & 0xFF) + data[:cut]
                + PDV_HEADER.pack(len(data) - cut + 2, context_id, control) + data[cut:])
        units[i] = _fix_length(bytearray(HEADER.pack(0x04, 0) + body))
        return f"split pdv of pdu {i} at {cut}"
    if i + 1 < len(units) and units[i + 1][:1] == b"\x04":
        merged = bytearray(units[i] + units[i + 1][6:])
        units[i : i + 2] = [_fix_length(merged)]
        return f"merge pdus {i} {i + 1}"
    return "refragment: nothing"


def m_command(rng: random.Random, units: list[bytes]) -> str:
    """An element of a command set: its length or (for US elements) its value."""
    candidates = [i for i, u in enumerate(units) if u[:1] == b"\x04" and any(c & 1 for _o, _x, c, _d in
                                                                             iter_pdvs(u[6:]))]
    if not candidates:
        return "command: none"
    i = rng.choice(candidates)
    unit = bytearray(units[i])
    pdv_offset, _ctx, _control, data = next(p for p in iter_pdvs(bytes(unit[6:])) if p[2] & 1)
    base = 6 + pdv_offset + 6
    elements, offset = [], 0
    while offset + 8 <= len(data):
        _g, element, length = ELEMENT.unpack_from(data, offset)
        elements.append((offset, element, length))
        offset += 8 + length
    if not elements:
        return "command: no element"
    offset, element, length = rng.choice(elements)
    if length == 2 and rng.random() < 0.6:
        value = rng.choice([0x0000, 0x0001, 0x0030, 0x0020, 0x0FFF, 0x0101, 0x8001, 0x8030, 0xFFFF,
                            rng.randrange(0x10000)])
        _set(unit, base + offset + 8, "<H", value)
        units[i] = bytes(unit)
        return f"command (0000,{element:04x}) = 0x{value:04x}"
    if rng.random() < 0.2:
        _set(unit, base + offset, "<H", rng.choice([0x0002, 0x0008, 0x7FE0, 0xFFFE]))  # the group
        units[i] = bytes(unit)
        return f"command (0000,{element:04x}) group"
    value = rng.choice([*INTERESTING_32, length + 1, length - 1, length + 2])
    _set(unit, base + offset + 4, "<L", value)
    units[i] = bytes(unit)
    return f"command (0000,{element:04x}) length {value}"


LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})


def _dataset_elements(data: bytes) -> list[tuple[int, bytes, int, int]]:
    """(offset, VR, offset of the length field, its width) of the Explicit VR Little Endian elements at the start
    of a dataset fragment, as far as they parse."""
    found, offset = [], 0
    while offset + 8 <= len(data) and len(found) < 200:
        vr = data[offset + 4 : offset + 6]
        if not vr.isalpha() or not vr.isupper():
            break
        if vr in LONG_VRS:
            if offset + 12 > len(data):
                break
            length, at, width, header = struct.unpack_from("<L", data, offset + 8)[0], offset + 8, 4, 12
        else:
            length, at, width, header = struct.unpack_from("<H", data, offset + 6)[0], offset + 6, 2, 8
        found.append((offset, vr, at, width))
        if length == 0xFFFFFFFF:
            break
        offset += header + length
    return found


def m_dataset(rng: random.Random, units: list[bytes]) -> str:
    """An element near the start of a dataset (what the header walk reads): its length, VR or tag."""
    candidates = [(i, p) for i, u in enumerate(units) if u[:1] == b"\x04"
                  for p in iter_pdvs(u[6:]) if not p[2] & 1]
    if not candidates:
        return "dataset: none"
    i, (pdv_offset, _ctx, _control, data) = candidates[0] if rng.random() < 0.7 else rng.choice(candidates)
    elements = _dataset_elements(data)
    if not elements:
        return "dataset: no element"
    unit = bytearray(units[i])
    base = 6 + pdv_offset + 6
    offset, vr, at, width = rng.choice(elements)
    what = rng.choice(["length", "length", "vr", "tag"])
    if what == "length":
        value = rng.choice([*(INTERESTING_32 if width == 4 else INTERESTING_16), 1, 3, 0xFFFFFFFF])
        _set(unit, base + at, "<L" if width == 4 else "<H", value)
        desc = f"dataset element at {offset} ({vr.decode()}) length 0x{value:x}"
    elif what == "vr":
        new = rng.choice([b"SQ", b"UN", b"OB", b"UI", b"US", b"UL", b"DA", b"PN", b"XX", b"\x00\x00"])
        unit[base + offset + 4 : base + offset + 6] = new
        desc = f"dataset element at {offset} VR {vr.decode()} -> {new!r}"
    else:
        group = rng.choice([0x0000, 0x0002, 0x0008, 0x0020, 0x7FE0, 0xFFFE, 0xFFFF])
        _set(unit, base + offset, "<H", group)
        desc = f"dataset element at {offset} group 0x{group:04x}"
    units[i] = bytes(unit)
    return desc


def _rq_items(body: bytes) -> list[tuple[int, int, int]]:
    """(offset in body, item type, length) of the A-ASSOCIATE-RQ's items and of the sub-items of presentation
    context and user information items."""
    found, offset = [], 68
    while offset + 4 <= len(body):
        item_type, length = body[offset], struct.unpack_from(">H", body, offset + 2)[0]
        found.append((offset, item_type, length))
        start, end = offset + 4, min(len(body), offset + 4 + length)
        if item_type in (0x20, 0x50):
            sub = start + (4 if item_type == 0x20 else 0)
            while sub + 4 <= end:
                sub_length = struct.unpack_from(">H", body, sub + 2)[0]
                found.append((sub, body[sub], sub_length))
                sub += 4 + sub_length
        offset += 4 + length
    return found


def m_associate_rq(rng: random.Random, units: list[bytes]) -> str:
    i = _pick(rng, units, 0x01)
    if i is None:
        return "rq: none"
    unit = bytearray(units[i])
    body_at = 6
    items = _rq_items(bytes(unit[6:]))
    what = rng.choice(["item-length", "item-length", "item-type", "duplicate-item", "drop-item", "max-length",
                       "fixed-field", "pc-id"])
    if what == "item-length" and items:
        offset, item_type, length = rng.choice(items)
        value = rng.choice([*INTERESTING_16, length - 1, length + 1, length + 4])
        _set(unit, body_at + offset + 2, ">H", value)
        units[i] = bytes(unit)
        return f"rq item 0x{item_type:02x} length {value}"
    if what == "item-type" and items:
        offset, item_type, _length = rng.choice(items)
        value = rng.choice([0x00, 0x10, 0x20, 0x21, 0x30, 0x40, 0x50, 0x51, 0x52, 0x55, 0x56, 0xFF])
        unit[body_at + offset] = value
        units[i] = bytes(unit)
        return f"rq item 0x{item_type:02x} type 0x{value:02x}"
    if what in ("duplicate-item", "drop-item") and items:
        offset, item_type, length = rng.choice(items)
        raw = bytes(unit[body_at + offset : body_at + offset + 4 + length])
        if what == "duplicate-item":
            unit[body_at + offset : body_at + offset] = raw * rng.choice([1, 2, 50])
        else:
            del unit[body_at + offset : body_at + offset + 4 + length]
        units[i] = _fix_length(unit)  # the enclosing item's length now disagrees (when it was a sub-item)
        return f"rq {what} 0x{item_type:02x}"
    if what == "max-length":
        subs = [o for o, t, n in items if t == 0x51 and n == 4]
        if subs:
            value = rng.choice([*INTERESTING_32, 16, 1023, 1024, 4095, 4096])
            _set(unit, body_at + subs[0] + 4, ">L", value)
            units[i] = bytes(unit)
            return f"rq max length {value}"
    if what == "pc-id":
        pcs = [o for o, t, _n in items if t == 0x20]
        if pcs:
            value = rng.choice([0, 1, 2, 3, 254, 255])
            unit[body_at + rng.choice(pcs) + 4] = value
            units[i] = bytes(unit)
            return f"rq pc id {value}"
    field_at = rng.choice([0, 1, 4, 20, 36, 60])  # protocol version, called/calling AE, reserved
    unit[body_at + field_at : body_at + field_at + 2] = bytes([rng.choice(INTERESTING_8), rng.choice(INTERESTING_8)])
    units[i] = bytes(unit)
    return f"rq fixed field +{field_at}"


def b_bitflip(rng: random.Random, data: bytearray, hot: list[int]) -> str:
    flips = []
    for _ in range(rng.randint(1, 8)):
        offset = _offset(rng, data, hot)
        bit = rng.randrange(8)
        data[offset] ^= 1 << bit
        flips.append(f"{offset}.{bit}")
    return "bitflip " + ",".join(flips)


def b_interesting(rng: random.Random, data: bytearray, hot: list[int]) -> str:
    offset = _offset(rng, data, hot)
    width = rng.choice([1, 2, 4])
    order = rng.choice("<>")
    value = rng.choice({1: INTERESTING_8, 2: INTERESTING_16, 4: INTERESTING_32}[width])
    _set(data, offset, order + {1: "B", 2: "H", 4: "L"}[width], value)
    return f"overwrite {offset} {order}{width} 0x{value:x}"


def b_truncate(rng: random.Random, data: bytearray, hot: list[int]) -> str:
    cut = _offset(rng, data, hot) if rng.random() < 0.5 else rng.randrange(len(data))
    del data[cut:]
    return f"truncate at {cut}"


def b_garbage(rng: random.Random, data: bytearray, hot: list[int]) -> str:
    offset = rng.randrange(len(data) + 1)
    junk = rng.randbytes(rng.choice([1, 3, 6, 64, 4096]))
    data[offset:offset] = junk
    return f"insert {len(junk)} random bytes at {offset}"


def _offset(rng: random.Random, data: bytearray, hot: list[int]) -> int:
    """Half of the time near the start of a PDU (headers, PDV headers, command sets, A-ASSOCIATE-RQ items)."""
    if hot and rng.random() < 0.5:
        return min(len(data) - 1, rng.choice(hot) + min(int(rng.expovariate(1 / 24)), 400))
    return rng.randrange(len(data))


PDU_MUTATIONS: list[tuple[Callable[[random.Random, list[bytes]], str], int]] = [
    (m_drop_pdu, 2), (m_duplicate_pdu, 2), (m_swap_pdus, 2), (m_insert_pdu, 3), (m_pdu_length, 3),
    (m_pdu_type, 1), (m_pdv, 4), (m_refragment, 2), (m_command, 4), (m_associate_rq, 5), (m_dataset, 4),
]
BYTE_MUTATIONS: list[tuple[Callable[[random.Random, bytearray, list[int]], str], int]] = [
    (b_bitflip, 4), (b_interesting, 4), (b_truncate, 2), (b_garbage, 1),
]


# ---- cases ---------------------------------------------------------------------------------------------------


@dataclass
class Case:
    seed: int
    number: int
    source: str
    mutations: list[str]
    stream: bytes
    chunks: list[tuple[int, float]]  # (bytes, delay before sending them); whatever is left goes in one send
    ending: str  # "close", "half-close" (shutdown SHUT_WR after sending) or "reset" (SO_LINGER 0)
    uids: list[str]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["stream"] = base64.b64encode(self.stream).decode()
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Case:
        data = {k: v for k, v in data.items() if k != "problems"}
        data["stream"] = base64.b64decode(data["stream"])
        data["chunks"] = [tuple(c) for c in data["chunks"]]
        return cls(**data)


def case_uids(seed: int, number: int) -> list[str]:
    return [f"2.25.9{k + 1}{seed % 10**9:09d}{number:024d}" for k in range(len(TEMPLATE_UIDS))]


def make_case(seed: int, number: int, corpus: dict[str, bytes]) -> Case:
    rng = random.Random(f"{seed}:{number}")
    source = rng.choice(sorted(corpus))
    stream = corpus[source]
    uids = case_uids(seed, number)
    for template, uid in zip(TEMPLATE_UIDS, uids, strict=True):
        stream = stream.replace(template.encode(), uid.encode())
    units = split_pdus(stream)
    mutations = []
    rounds = rng.choice([1, 1, 1, 2, 2, 3])
    for _ in range(rounds):
        if rng.random() < 0.55:
            mutate = rng.choices([m for m, _ in PDU_MUTATIONS], [w for _, w in PDU_MUTATIONS])[0]
            if units:
                mutations.append(mutate(rng, units))
        else:
            data = bytearray(b"".join(units))
            hot, offset = [], 0
            for unit in units:
                hot.append(offset)
                offset += len(unit)
            if data:
                change = rng.choices([m for m, _ in BYTE_MUTATIONS], [w for _, w in BYTE_MUTATIONS])[0]
                mutations.append(change(rng, data, hot))
            units = split_pdus(bytes(data))
    stream = b"".join(units)
    chunks: list[tuple[int, float]] = []
    if rng.random() < 0.4:
        style = rng.choice(["fixed", "random", "pdu-boundaries"])
        budget, sent = 0.5, 0
        size = rng.choice([1, 2, 3, 5, 7, 13, 61, 1021, 4099])
        delay = rng.choice([0.0, 0.0, 0.001, 0.005, 0.02])
        boundaries = []
        offset = 0
        for unit in units:
            offset += len(unit)
            boundaries.append(offset)
        while sent < len(stream) and len(chunks) < 200:
            if style == "fixed":
                n = size
            elif style == "random":
                n = rng.choice([1, 2, 3, 6, 7, 10, 100, rng.randint(1, 5000)])
            else:
                nxt = next((b for b in boundaries if b > sent), len(stream))
                n = nxt - sent
            n = min(n, len(stream) - sent)
            d = min(delay if style != "random" else rng.choice([0.0, 0.002, 0.01]), budget)
            budget -= d
            chunks.append((n, d))
            sent += n
        mutations.append(f"chunks {style} x{len(chunks)}")
    ending = rng.choices(["close", "half-close", "reset"], [6, 2, 2])[0]
    return Case(seed, number, source, mutations, stream, chunks, ending, uids)


def send_case(port: int, case: Case, budget: float = 2.0, quiet: float = 0.3) -> Answer:
    """Send the case's stream as planned; read until EOF, ``quiet`` seconds without any byte after the stream was
    sent, or ``budget`` seconds in all; then end the connection as planned."""
    start = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", port), timeout=budget)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    received = bytearray()
    eof = False

    def drain(block: float) -> None:
        nonlocal eof
        sock.settimeout(block)
        while not eof:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, BlockingIOError):
                return
            except OSError:  # reset
                eof = True
                return
            if not chunk:
                eof = True
                return
            received.extend(chunk)
            sock.settimeout(0.0 if block == 0 else block)

    try:
        offset = 0
        try:
            for n, delay in case.chunks:
                if delay:
                    time.sleep(delay)
                sock.sendall(case.stream[offset : offset + n])
                offset += n
                drain(0)  # do not let the server's answers back up while we drip
                if eof or time.monotonic() - start > budget:
                    break
            else:
                if offset < len(case.stream):
                    sock.settimeout(max(0.1, budget - (time.monotonic() - start)))
                    sock.sendall(case.stream[offset:])
        except OSError:
            pass  # the server closed or reset while we were sending: its answer may still be readable
        if case.ending == "half-close":
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        last = time.monotonic()
        while not eof and time.monotonic() - start < budget:
            before = len(received)
            drain(min(quiet, max(0.01, budget - (time.monotonic() - start))))
            if len(received) > before:
                last = time.monotonic()
            elif time.monotonic() - last >= quiet:
                break
    finally:
        if case.ending == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    return parse_answer(bytes(received), eof)


# ---- checks --------------------------------------------------------------------------------------------------


def worker_pids(supervisor: int) -> list[int]:
    pids: set[int] = set()
    for task in Path(f"/proc/{supervisor}/task").iterdir():
        try:
            pids.update(int(p) for p in (task / "children").read_text().split())
        except OSError:
            pass
    return sorted(pids)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def index_instances(index_path: Path) -> set[str]:
    from appliance.index.db import SEP, StudyIndex

    index = StudyIndex(index_path, readonly=True)
    try:
        with index.env.begin() as txn:
            return {bytes(k).decode().rsplit(SEP, 1)[-1] for k, _v in txn.cursor(db=index.dbs["instances"])}
    finally:
        index.close()


def echo(port: int) -> int | None:
    """Status of a C-ECHO from a fresh pynetdicom association, or None when there was no answer."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="FUZZECHO")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="APPLIANCE")
    if not assoc.is_established:
        return None
    try:
        rsp = assoc.send_c_echo()
        return int(rsp.Status) if "Status" in rsp else None
    finally:
        assoc.release()


BAD_LOG = re.compile(r" (ERROR|CRITICAL) |Traceback|Fatal error|Unhandled|exception", re.IGNORECASE)


class Target:
    """A running `appliance serve` and what it must keep true: its baseline taken after the recordings."""

    def __init__(self, root: Path, supervisor: int, port: int, log_path: Path, rss_slack: int = 256 << 20) -> None:
        self.root, self.supervisor, self.port, self.log_path = root, supervisor, port, log_path
        self.index_path = root / "var/index"
        self.tmp = root / "var/volumes/vol0/tmp"
        self.rss_slack = rss_slack
        self.workers = worker_pids(supervisor)
        self.fds = {pid: fd_count(pid) for pid in self.workers}
        self.rss = {pid: rss_bytes(pid) for pid in self.workers}
        self.instances = index_instances(self.index_path)
        self.answered: set[str] = set()  # every UID answered Success so far
        self.log_offset = log_path.stat().st_size if log_path.exists() else 0

    def rebaseline_fds(self, seconds: float = 3.0) -> None:
        """The lowest count seen over a short quiet period (a connection may still be closing)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for pid in self.workers:
                self.fds[pid] = min(self.fds[pid], fd_count(pid))
            time.sleep(0.05)  # poll interval

    def check(self, case: Case, answer: Answer) -> list[str]:
        problems: list[str] = []
        pids = worker_pids(self.supervisor)
        if pids != self.workers:
            return [f"worker processes changed: {self.workers} -> {pids} (a crash?)"]
        stored = {uid for status, uid in answer.stores if status in SUCCESS}
        self.answered |= stored
        # Descriptors back to the baseline (the server may need up to its timeouts to let go of the case).
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:
            extra = {pid: fd_count(pid) - self.fds[pid] for pid in self.workers}
            if all(n <= 0 for n in extra.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.02)  # poll interval
        if any(n > 0 for n in extra.values()):
            fds = {pid: sorted(os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
                   for pid in self.workers}
            problems.append(f"descriptors above the baseline after {SETTLE_SECONDS}s: {extra}; now {fds}")
        status = echo(self.port)
        if status != 0:
            problems.append(f"C-ECHO answered {status!r}")
        spills = sorted(p.name for p in self.tmp.iterdir() if p.is_file() and p.stat().st_size > 0) \
            if self.tmp.exists() else []
        if spills:
            # A spill file lives as long as its instance is being received or committed: poll briefly.
            deadline = time.monotonic() + SETTLE_SECONDS
            while spills and time.monotonic() < deadline:
                time.sleep(0.05)  # poll interval
                spills = sorted(p.name for p in self.tmp.iterdir() if p.is_file() and p.stat().st_size > 0)
            if spills:
                problems.append(f"spill files left in tmp/: {spills}")
        instances = index_instances(self.index_path)
        missing = self.answered - instances
        if missing:
            problems.append(f"answered Success but not in the index: {sorted(missing)}")
        new = instances - self.instances
        unexplained = new - stored
        # An answer without an SOP Instance UID is for a command without one: a mutated command turned into a
        # C-STORE-RQ without a dataset (refused 0xC000) answers no complete dataset (seed 12 case 1674: a dataset
        # committed while its association was aborted by a later PDU, its answer never sent, counted as answered).
        answered = len([uid for _status, uid in answer.stores if uid])
        room = complete_datasets(case.stream) - answered
        if len(unexplained) > max(0, room):
            problems.append(f"{len(unexplained)} new instance(s) not answered Success, but the stream held only "
                            f"{complete_datasets(case.stream)} complete dataset(s) and {answered} were "
                            f"answered: {sorted(unexplained)}")
        self.instances = instances
        for pid in self.workers:
            rss = rss_bytes(pid)
            if rss > self.rss[pid] + self.rss_slack:
                problems.append(f"worker {pid} RSS {rss >> 20} MiB, {self.rss[pid] >> 20} MiB at the start")
        problems += self.new_log_problems()
        return problems

    def new_log_problems(self) -> list[str]:
        if not self.log_path.exists():
            return []
        with open(self.log_path, "rb") as fh:
            fh.seek(self.log_offset)
            text = fh.read().decode(errors="replace")
        self.log_offset += len(text.encode(errors="replace"))
        bad = [line for line in text.splitlines() if BAD_LOG.search(line)]
        return [f"server log: {line}" for line in bad[:5]]


# ---- the run -------------------------------------------------------------------------------------------------


@dataclass
class Report:
    seed: int
    cases: int = 0
    seconds: float = 0.0
    failures: list[tuple[int, list[str], str]] = field(default_factory=list)  # (case, problems, saved file)
    answers: dict[str, int] = field(default_factory=dict)  # first PDU type answered -> count
    stored: int = 0
    statuses: dict[str, int] = field(default_factory=dict)  # C-STORE status -> count
    mutations: dict[str, int] = field(default_factory=dict)  # mutation kind (first word) -> count

    def summary(self) -> str:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(self.answers.items()))
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items()))
        mutations = ", ".join(f"{k}: {v}" for k, v in sorted(self.mutations.items()))
        return (f"seed {self.seed}: {self.cases} cases in {self.seconds:.0f}s, {len(self.failures)} failure(s); "
                f"{self.stored} instance(s) stored; first answer {kinds}; C-STORE statuses {statuses}; "
                f"mutations {mutations}")


ANSWER_NAMES = {0x02: "AC", 0x03: "RJ", 0x04: "P-DATA", 0x06: "RELEASE-RP", 0x07: "ABORT"}


def save_case(case: Case, problems: list[str], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"fuzz-{case.seed}-{case.number}.json"
    path.write_text(json.dumps({**case.to_json(), "problems": problems}, indent=1))
    return path


def fuzz(target: Target, corpus: dict[str, bytes], seed: int, cases: int, seconds: float, out: Path,
         check_every: int = 1, stop_on_failure: bool = True, first: int = 0) -> Report:
    report = Report(seed)
    start = time.monotonic()
    number = first
    pending: list[Case] = []
    answers: list[Answer] = []
    while report.cases < cases and time.monotonic() - start < seconds:
        case = make_case(seed, number, corpus)
        answer = send_case(target.port, case)
        report.cases += 1
        kind = ANSWER_NAMES.get(answer.pdu_types[0], hex(answer.pdu_types[0])) if answer.pdu_types else "none"
        report.answers[kind] = report.answers.get(kind, 0) + 1
        report.stored += sum(1 for status, _uid in answer.stores if status in SUCCESS)
        for status, _uid in answer.stores:
            report.statuses[f"0x{status:04X}"] = report.statuses.get(f"0x{status:04X}", 0) + 1
        for mutation in case.mutations:
            kind = " ".join(mutation.split()[:2]) if mutation.startswith(("rq", "pdv", "dataset")) \
                else mutation.split()[0]
            report.mutations[kind] = report.mutations.get(kind, 0) + 1
        pending.append(case)
        answers.append(answer)
        number += 1
        if len(pending) >= check_every or report.cases >= cases:
            merged = Case(seed, pending[-1].number, "+".join(c.source for c in pending), [], b"".join(
                c.stream for c in pending), [], "close", [])
            merged_answer = Answer(stores=[s for a in answers for s in a.stores])
            problems = target.check(pending[0] if len(pending) == 1 else merged, merged_answer)
            if problems:
                for bad in pending:  # with check_every > 1 any of them may be the culprit: keep them all
                    path = save_case(bad, problems, out)
                report.failures.append((pending[-1].number, problems, str(path)))
                log.error("seed %d case %d (%s; %s): %s\n  replay: python -m tests.fuzz.fuzzer --replay %s",
                          seed, pending[-1].number, pending[-1].source, "; ".join(pending[-1].mutations),
                          "\n  ".join(problems), path)
                if stop_on_failure:
                    break
                target.rebaseline_fds()
            pending, answers = [], []
    report.seconds = time.monotonic() - start
    return report


def start_server(root: Path, workers: int = 1) -> Any:
    """A fuzz server (FUZZ_SERVER config) under ``root``: a tests.conftest.ServerHandle."""
    from tests.conftest import ServerHandle, write_config

    root.mkdir(parents=True, exist_ok=True)
    handle = ServerHandle(root, write_config(root, server={**FUZZ_SERVER, "workers": workers}, storage=FUZZ_STORAGE,
                                             retrieve=FUZZ_RETRIEVE))
    return handle.start()


def prepare(handle: Any, workdir: Path) -> tuple[Target, dict[str, bytes]]:
    """Record the corpus against the server, then take the baseline (with the recordings' instances stored and
    their connections closed)."""
    corpus = record_streams(handle.port, workdir)
    status = echo(handle.port)
    if status != 0:
        raise RuntimeError(f"the fuzz server does not answer C-ECHO ({status!r})")
    target = Target(handle.root, handle.proc.pid, handle.port, handle.log_path)
    target.rebaseline_fds(1.0)
    return target, corpus


def replay(path: Path, workdir: Path, workers: int = 1) -> list[str]:
    case = Case.from_json(json.loads(path.read_text()))
    handle = start_server(workdir / "server", workers)
    try:
        target, _corpus = prepare(handle, workdir)
        answer = send_case(handle.port, case)
        print(f"case {case.number} of seed {case.seed} ({case.source}; {'; '.join(case.mutations)}): "
              f"answered {[ANSWER_NAMES.get(t, hex(t)) for t in answer.pdu_types]}, stores {answer.stores}, "
              f"eof {answer.eof}")
        problems = target.check(case, answer)
        if problems:
            print("server log:\n" + handle.log()[-6000:])
        return problems
    finally:
        handle.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.fuzzer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=None, help="default: from the clock (printed)")
    parser.add_argument("--cases", type=int, default=1_000_000, help="most cases to run")
    parser.add_argument("--seconds", type=float, default=180.0, help="most seconds to run")
    parser.add_argument("--first", type=int, default=0, help="number of the first case")
    parser.add_argument("--check-every", type=int, default=1, help="run the checks after every N cases")
    parser.add_argument("--workers", type=int, default=1, help="server worker processes")
    parser.add_argument("--keep-going", action="store_true", help="do not stop at the first failure")
    parser.add_argument("--out", type=Path, default=Path("var/fuzz"), help="where failing cases are saved")
    parser.add_argument("--replay", type=Path, help="send one saved case to a fresh server and check it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    workdir = Path(tempfile.mkdtemp(prefix="appliance-fuzz-"))
    try:
        if args.replay:
            problems = replay(args.replay, workdir, args.workers)
            print("\n".join(problems) if problems else "no problem")
            return 1 if problems else 0
        seed = args.seed if args.seed is not None else int(time.time()) % 1_000_000
        handle = start_server(workdir / "server", args.workers)
        try:
            target, corpus = prepare(handle, workdir)
            print(f"fuzzing seed {seed}: corpus {', '.join(f'{k} ({len(v)} B)' for k, v in corpus.items())}; "
                  f"server pid {handle.proc.pid}, workers {target.workers}, descriptors {target.fds}", flush=True)
            report = fuzz(target, corpus, seed, args.cases, args.seconds, args.out, args.check_every,
                          stop_on_failure=not args.keep_going, first=args.first)
        finally:
            handle.stop()
        print(report.summary())
        for number, problems, saved in report.failures:
            print(f"FAILED seed {seed} case {number}: {'; '.join(problems)}\n  saved: {saved}")
        return 1 if report.failures else 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
