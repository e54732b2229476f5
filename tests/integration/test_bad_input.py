"""Bad input gets its proper answer, the server keeps serving the other associations, and nothing partial is
left behind: no partial file in the volume's tmp/, no new blob, no new index entry.

Peers are real: pynetdicom as SCU (its DIMSE layer directly where a well-formed but wrong C-STORE is needed),
DCMTK's echoscu/storescu, and raw sockets only for deliberately malformed PDUs. Valid PDU bytes for the raw
sockets are built with pynetdicom's PDU classes; only the malformation is done by hand.
"""

from __future__ import annotations

import copy
import io
import os
import random
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_items import MaximumLengthSubItem
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

from tests.conftest import ServerHandle, dataset_bytes, dcmtk, wait_for

CT = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
MR = Path(get_testdata_file("MR_small.dcm"))  # type: ignore[arg-type]
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
HEADER = struct.Struct(">BxL")

MakeServer = Callable[..., ServerHandle]


# ---- building valid PDUs with pynetdicom -------------------------------------------------------------


def associate_rq(calling: str = "RAWSCU", called: str = "APPLIANCE", max_pdu: int = 16384,
                 abstract_syntaxes: tuple[str, ...] = (Verification, CTImageStorage)) -> bytes:
    """A valid A-ASSOCIATE-RQ; presentation context IDs 1, 3, 5... in the order of ``abstract_syntaxes``."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    contexts = []
    for i, uid in enumerate(abstract_syntaxes):
        cx = build_context(uid, [ExplicitVRLittleEndian])
        cx.context_id = 2 * i + 1
        contexts.append(cx)
    primitive.presentation_context_definition_list = contexts
    max_len = MaximumLengthNotification()
    max_len.maximum_length_received = max_pdu
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.1"
    primitive.user_information = [max_len, impl]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def c_store_request(message_id: int, sop_class: str, sop_instance: str, dataset: bytes) -> C_STORE:
    """A C-STORE-RQ primitive whose command says ``sop_class``/``sop_instance`` whatever the dataset says."""
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Priority = 0
    primitive.DataSet = io.BytesIO(dataset)
    return primitive


def c_store_pdus(context_id: int, sop_class: str, sop_instance: str, dataset: bytes, max_pdu: int) -> list[bytes]:
    """The P-DATA-TF PDUs pynetdicom sends for one C-STORE-RQ (command first, then the dataset fragments)."""
    message = C_STORE_RQ()
    message.primitive_to_message(c_store_request(1, sop_class, sop_instance, dataset))
    out = []
    for p_data in message.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(p_data)
        out.append(bytes(pdu.encode()))
    return out


# ---- raw sockets -------------------------------------------------------------------------------------


def connect(server: ServerHandle) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """``n`` bytes, or None if the peer closed (or reset) the connection first."""
    data = bytearray()
    while len(data) < n:
        try:
            chunk = sock.recv(n - len(data))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def read_pdu(sock: socket.socket) -> tuple[int, bytes] | None:
    """(PDU type, body) of the next PDU, or None on EOF/reset. The socket's timeout bounds the wait."""
    header = recv_exact(sock, 6)
    if header is None:
        return None
    pdu_type, length = HEADER.unpack(header)
    body = recv_exact(sock, length)
    assert body is not None, f"connection closed inside a PDU of type 0x{pdu_type:02x}"
    return pdu_type, body


def wait_eof(sock: socket.socket, timeout: float = 15.0) -> bytes:
    """Read until the server closes the connection; return everything it sent before. Fails on timeout."""
    sock.settimeout(timeout)
    received = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(received)
        except TimeoutError:
            break
        if not chunk:
            return bytes(received)
        received += chunk
    raise AssertionError(f"server did not close the connection within {timeout}s (got {bytes(received[:32])!r})")


def raw_associate(server: ServerHandle, max_pdu: int = 16384, **kwargs: Any) -> tuple[socket.socket, A_ASSOCIATE_AC]:
    sock = connect(server)
    sock.sendall(associate_rq(max_pdu=max_pdu, **kwargs))
    pdu = read_pdu(sock)
    assert pdu is not None and pdu[0] == 0x02, f"expected A-ASSOCIATE-AC, got {pdu!r}"
    ac = A_ASSOCIATE_AC()
    ac.decode(HEADER.pack(0x02, len(pdu[1])) + pdu[1])
    return sock, ac


def rj_fields(pdu: tuple[int, bytes] | None) -> tuple[int, int, int]:
    """(result, source, reason) of an A-ASSOCIATE-RJ (PS3.8 9.3.4: reserved, result, source, reason)."""
    assert pdu is not None, "connection closed without an A-ASSOCIATE-RJ"
    pdu_type, body = pdu
    assert pdu_type == 0x03 and len(body) == 4, f"expected A-ASSOCIATE-RJ, got type 0x{pdu_type:02x} {body!r}"
    return body[1], body[2], body[3]


def abort_fields(pdu: tuple[int, bytes] | None) -> tuple[int, int]:
    """(source, reason) of an A-ABORT (PS3.8 9.3.8: two reserved bytes, source, reason)."""
    assert pdu is not None, "connection closed without an A-ABORT"
    pdu_type, body = pdu
    assert pdu_type == 0x07 and len(body) == 4, f"expected A-ABORT, got type 0x{pdu_type:02x} {body!r}"
    return body[2], body[3]


# ---- pynetdicom peers ----------------------------------------------------------------------------------


def make_ae(ae_title: str = "GOODSCU") -> AE:
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = 15
    ae.dimse_timeout = 30
    ae.network_timeout = 60
    for uid in (Verification, CTImageStorage, MRImageStorage):
        ae.add_requested_context(uid, ExplicitVRLittleEndian)
    return ae


@contextmanager
def association(server: ServerHandle, ae_title: str = "GOODSCU", called: str = "APPLIANCE") -> Iterator[Association]:
    assoc = make_ae(ae_title).associate("127.0.0.1", server.port, ae_title=called)
    assert assoc.is_established, f"association refused:\n{server.log()[-3000:]}"
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def new_instance(path: Path = CT, **changes: Any) -> pydicom.Dataset:
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = generate_uid()
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


def wire_bytes(ds: pydicom.Dataset) -> bytes:
    """The dataset exactly as pynetdicom puts it on the wire for Explicit VR Little Endian."""
    data = encode(ds, False, True)
    assert data is not None
    return bytes(data)


def store_status(assoc: Association, ds: pydicom.Dataset) -> int:
    rsp = assoc.send_c_store(ds)
    assert "Status" in rsp, "no C-STORE response (association aborted?)"
    return int(rsp.Status)


def send_store(assoc: Association, sop_class: str, sop_instance: str, dataset: bytes,
               context_class: str | None = None) -> int:
    """A C-STORE whose command says ``sop_class``/``sop_instance`` whatever the dataset says, sent through
    pynetdicom's DIMSE layer on the accepted context of ``context_class`` (default: ``sop_class``)."""
    context_class = context_class or sop_class
    context = next(cx for cx in assoc.accepted_contexts if cx.abstract_syntax == context_class)
    request = c_store_request(7, sop_class, sop_instance, dataset)
    # As in Association.send_c_store: pause the association's reactor thread, or it takes the response off the
    # DIMSE queue first (and drops it as unexpected).
    assoc._reactor_checkpoint.clear()
    wait_for(lambda: assoc._is_paused, 10, interval=0.0005, what="pynetdicom's reactor to pause")
    try:
        assoc.dimse.send_msg(request, context.context_id)
        _context_id, response = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    assert response is not None, "no C-STORE response within the DIMSE timeout"
    return int(response.Status)


# ---- what must stay untouched --------------------------------------------------------------------------


def blob_files(server: ServerHandle, volume: Path | None = None) -> set[str]:
    """Digests of the blobs the index names with a copy on ``volume`` (dead records awaiting compaction, such as
    a duplicate's bytes, are not stored instances)."""
    from appliance.index.db import StudyIndex

    name = "vol0"
    index = StudyIndex(server.root / "var/index")
    try:
        return {d for d, blob in index.blobs() if any(c.backend == name for c in blob.copies)}
    finally:
        index.close()


def segment_bytes(volume: Path) -> int:
    return sum(p.stat().st_size for p in (volume / "segments").glob("*.tar"))


def partial_files(volume: Path) -> list[str]:
    """Non-empty files in the volume's tmp/: instances being received, or left behind. (The server keeps a few
    empty tmp files created ahead of time; those are not instances.)"""
    tmp = volume / "tmp"
    return sorted(p.name for p in tmp.iterdir() if p.is_file() and p.stat().st_size > 0) if tmp.exists() else []


def snapshot(server: ServerHandle, volume: Path | None = None) -> dict[str, Any]:
    volume = volume or server.volume
    # Segment bytes too: a refused instance must not even leave a dead record behind.
    return {"blobs": blob_files(server, volume), "counts": server.cli_json("status")["counts"],
            "segment_bytes": segment_bytes(volume)}


def assert_nothing_left(server: ServerHandle, before: dict[str, Any], volume: Path | None = None) -> None:
    """No partial file in tmp/ (a refused or broken instance is discarded when its association ends, so poll),
    no new blob, no new index entry."""
    volume = volume or server.volume
    wait_for(lambda: not partial_files(volume), 15, what=f"no partial file in {volume / 'tmp'}")
    assert snapshot(server, volume) == before


def assert_serving(server: ServerHandle, keeper: Association | None = None, store: bool = True) -> None:
    """The association kept open through the bad case still works, and new associations are accepted: DCMTK's
    echoscu, and a pynetdicom C-STORE that must be Success and indexed."""
    if keeper is not None:
        assert keeper.is_established, "the good association was dropped"
        assert keeper.send_c_echo().Status == 0
    result = dcmtk("echoscu", "-aec", "APPLIANCE", "127.0.0.1", str(server.port))
    assert result.returncode == 0, result.stderr + server.log()[-3000:]
    if store:
        ds = new_instance()
        if keeper is not None:
            assert store_status(keeper, ds) == 0
        else:
            with association(server) as assoc:
                assert store_status(assoc, ds) == 0
        assert server.cli_json("show", ds.SOPInstanceUID)["level"] == "instances"


# ---- malformed PDUs ------------------------------------------------------------------------------------


GARBAGE = {
    **{f"random-{seed}": random.Random(seed).randbytes(4096) for seed in range(4)},
    "http": b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "tls-hello": bytes.fromhex("160301020001000200fc0303") + random.Random(9).randbytes(500),
    "rq-garbage-body": HEADER.pack(0x01, 64) + random.Random(7).randbytes(64),
    "p-data-first": HEADER.pack(0x04, 16) + random.Random(8).randbytes(16),
}
# A-ABORT reasons (source 2, service provider), PS3.8 9.3.8
GARBAGE_ABORT_REASON = {
    "http": 0x01,  # 'G' is no PDU type: unrecognized PDU
    "tls-hello": 0x01,  # nor is 0x16
    "rq-garbage-body": 0x06,  # an A-ASSOCIATE-RQ that does not decode: invalid PDU parameter value
    "p-data-first": 0x02,  # P-DATA-TF before any A-ASSOCIATE-RQ: unexpected PDU
}


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_garbage_on_the_port_is_aborted(make_server: MakeServer, name: str) -> None:
    server = make_server(server={"acse_timeout": 3.0})
    with association(server) as keeper:
        before = snapshot(server)
        with connect(server) as sock:
            sock.sendall(GARBAGE[name])
            answer = wait_eof(sock)
        # An A-ABORT if the server got to answer, or just the close (random bytes may also look like the start
        # of a long PDU, which ARTIM then ends). Never anything else.
        assert answer == b"" or answer[0] == 0x07, answer[:16]
        if name in GARBAGE_ABORT_REASON:  # small enough to be read whole: the A-ABORT always arrives
            assert answer == HEADER.pack(0x07, 4) + bytes([0, 0, 2, GARBAGE_ABORT_REASON[name]]), answer
        assert_nothing_left(server, before)
        assert_serving(server, keeper)


def test_garbage_on_an_established_association_is_aborted(server: ServerHandle) -> None:
    with association(server) as keeper:
        before = snapshot(server)
        sock, _ac = raw_associate(server)
        with sock:
            sock.sendall(bytes([0x09, 0]) + random.Random(3).randbytes(1000))
            assert abort_fields(read_pdu(sock)) == (2, 1)  # provider, unrecognized PDU
            assert wait_eof(sock) == b""
        assert_nothing_left(server, before)
        assert_serving(server, keeper)


@pytest.mark.parametrize("how", ["truncated-pdu", "peer-a-abort", "pdv-on-unknown-context", "release-mid-dataset"])
def test_broken_off_mid_dataset_leaves_nothing(make_server: MakeServer, how: str) -> None:
    # A small spool, so that the instance being received spills to a file in tmp/ that can be watched.
    server = make_server(storage={"spool_memory_bytes": 65536})
    ds = big_instance(200_000)
    pdus = c_store_pdus(3, CTImageStorage, ds.SOPInstanceUID, wire_bytes(ds), 16384)
    assert len(pdus) >= 8  # command, dataset fragments
    with association(server) as keeper:
        before = snapshot(server)
        sock, _ac = raw_associate(server)
        with sock:
            sock.sendall(b"".join(pdus[:7]))  # the command and 96 KiB of dataset...
            # ...past the 64 KiB spool: spilled to a file in the volume's tmp/,
            wait_for(lambda: partial_files(server.volume), 15, what="the partial instance in tmp/")
            if how == "truncated-pdu":  # a P-DATA-TF whose header announces more bytes than come; peer gone
                sock.sendall(pdus[7][: len(pdus[7]) // 2])
            elif how == "peer-a-abort":  # A-ABORT from the service user
                sock.sendall(HEADER.pack(0x07, 4) + bytes(4))
                assert wait_eof(sock) == b""
            elif how == "release-mid-dataset":  # A-RELEASE-RQ before the last fragment: unexpected PDU
                sock.sendall(HEADER.pack(0x05, 4) + bytes(4))
                assert abort_fields(read_pdu(sock)) == (2, 2)  # provider, unexpected PDU
                assert wait_eof(sock) == b""
            else:  # the next fragment on presentation context 5, which was never proposed
                sock.sendall(c_store_pdus(5, CTImageStorage, ds.SOPInstanceUID, wire_bytes(ds), 16384)[7])
                assert abort_fields(read_pdu(sock))[0] == 2
                assert wait_eof(sock) == b""
        assert_nothing_left(server, before)
        assert server.cli("show", ds.SOPInstanceUID, check=False).returncode == 3  # not in the index
        assert_serving(server, keeper)


def test_command_fragments_on_two_contexts_are_aborted(server: ServerHandle) -> None:
    ds = new_instance()
    command = c_store_pdus(3, CTImageStorage, ds.SOPInstanceUID, wire_bytes(ds), 16384)[0][12:]  # the bare set

    def pdv(context_id: int, data: bytes, last: bool) -> bytes:
        item = struct.pack(">LBB", len(data) + 2, context_id, 0x01 | (0x02 if last else 0)) + data
        return HEADER.pack(0x04, len(item)) + item

    with association(server) as keeper:
        before = snapshot(server)
        sock, _ac = raw_associate(server)
        with sock:
            # First half of the command on the CT context (3), the rest on the Verification context (1).
            sock.sendall(pdv(3, command[:40], False) + pdv(1, command[40:], True))
            assert abort_fields(read_pdu(sock)) == (2, 5)  # provider, unexpected PDU parameter
            assert wait_eof(sock) == b""
        assert_nothing_left(server, before)
        assert_serving(server, keeper)


def test_truncated_associate_rq_leaves_nothing(server: ServerHandle) -> None:
    with association(server) as keeper:
        before = snapshot(server)
        rq = associate_rq()
        with connect(server) as sock:
            sock.sendall(rq[: len(rq) // 2])
        assert_nothing_left(server, before)
        assert_serving(server, keeper)


def test_p_data_longer_than_max_pdu_is_aborted(make_server: MakeServer) -> None:
    server = make_server(server={"max_pdu": 16384})
    with association(server) as keeper:
        before = snapshot(server)
        sock, ac = raw_associate(server)
        with sock:
            # The server told us its limit in the A-ASSOCIATE-AC...
            assert [i.maximum_length_received for i in ac.user_information.user_data
                    if isinstance(i, MaximumLengthSubItem)] == [16384]
            # ...and a P-DATA-TF announcing one byte more is refused before its body is read.
            ds = new_instance()
            command = c_store_pdus(3, CTImageStorage, ds.SOPInstanceUID, wire_bytes(ds), 16384)[0]
            sock.sendall(command + HEADER.pack(0x04, 16385) + b"\x00" * 8192)
            assert abort_fields(read_pdu(sock)) == (2, 6)  # provider, invalid PDU parameter value
            assert wait_eof(sock) == b""
        assert_nothing_left(server, before)
        # A PDU of exactly the limit is fine (pynetdicom fills PDUs to the peer's maximum).
        assert_serving(server, keeper)


# ---- well-formed but wrong requests ------------------------------------------------------------------


@pytest.mark.parametrize("what", ["instance", "class"])
def test_dataset_not_matching_the_command_is_refused(server: ServerHandle, what: str) -> None:
    with association(server) as keeper:
        before = snapshot(server)
        if what == "instance":  # command: CT, a new UID; dataset: CT, another UID
            ds = new_instance()
            status = send_store(keeper, CTImageStorage, generate_uid(), wire_bytes(ds))
        else:  # command: CT with the MR dataset's UID; dataset: MR
            ds = new_instance(MR)
            status = send_store(keeper, CTImageStorage, ds.SOPInstanceUID, wire_bytes(ds))
        assert status == 0xA900
        assert_nothing_left(server, before)
        assert_serving(server, keeper)


@pytest.mark.parametrize(("keyword", "value"), [
    ("SOPInstanceUID", "1.2.3\x004.5"), ("SOPInstanceUID", "1.2/../3"), ("SOPInstanceUID", "1.2..3"),
    ("StudyInstanceUID", "1.2.3/4"), ("StudyInstanceUID", "1.2.3.abc"), ("SeriesInstanceUID", "1." + "2" * 70),
    ("PatientID", "ID\x00WITH\x01NUL"),
])
def test_invalid_uids_and_key_attributes_are_refused(server: ServerHandle, keyword: str, value: str) -> None:
    """PS3.5 9.1: a UID is digits and dots (at most 64); a NUL, '/' or '..' would break the index's keys or a
    path. Key attributes with control characters likewise. Refused with 0xC000, nothing stored, still serving."""
    with association(server) as keeper:
        before = snapshot(server)
        ds = new_instance()
        setattr(ds, keyword, value)
        status = send_store(keeper, CTImageStorage, str(ds.SOPInstanceUID), wire_bytes(ds))
        assert status == 0xC000
        assert_nothing_left(server, before)
        assert_serving(server, keeper)


def test_an_instance_above_max_instance_bytes_is_refused_as_it_arrives(make_server: MakeServer) -> None:
    server = make_server(storage={"max_instance_bytes": 1 << 20, "spool_memory_bytes": 65536})
    with association(server) as keeper:
        before = snapshot(server)
        assert store_status(keeper, big_instance(3 << 20)) == 0xA700
        assert_nothing_left(server, before)
        assert "max_instance_bytes" in server.log()
        assert store_status(keeper, new_instance()) == 0  # the association goes on


def test_a_uid_naming_another_level_is_refused_alone(server: ServerHandle) -> None:
    """A Study Instance UID that is already a SOP Instance UID elsewhere: that instance is refused, the next one of
    the same association stored."""
    with association(server) as keeper:
        first = new_instance()
        assert store_status(keeper, first) == 0
        clash = new_instance(StudyInstanceUID=first.SOPInstanceUID, SeriesInstanceUID=generate_uid())
        assert store_status(keeper, clash) == 0xC000
        assert store_status(keeper, new_instance()) == 0
    assert server.cli_json("status")["counts"]["instances"] == 2


def test_unaccepted_sop_class(make_server: MakeServer) -> None:
    server = make_server(dicom={"sop_classes": [Verification, CTImageStorage]})
    with association(server) as keeper:
        # (a) negotiation: the MR context is rejected (0x03: abstract syntax not supported), CT accepted
        accepted = {cx.abstract_syntax for cx in keeper.accepted_contexts}
        assert accepted == {Verification, CTImageStorage}
        assert [(cx.abstract_syntax, cx.result) for cx in keeper.rejected_contexts] == [(MRImageStorage, 0x03)]
        before = snapshot(server)
        # (b) a C-STORE naming MR Image Storage on the CT context: Refused, SOP class not supported
        ds = new_instance(MR)
        assert send_store(keeper, MRImageStorage, ds.SOPInstanceUID, wire_bytes(ds), CTImageStorage) == 0x0122
        assert_nothing_left(server, before)
        # DCMTK cannot store an MR instance here either (no accepted context), and says so.
        result = dcmtk("storescu", "-aec", "APPLIANCE", "127.0.0.1", str(server.port), str(MR))
        assert "no presentation context" in (result.stdout + result.stderr).lower()
        assert_nothing_left(server, before)
        assert_serving(server, keeper)


# ---- association negotiation ---------------------------------------------------------------------------


def test_calling_and_called_ae_titles(make_server: MakeServer) -> None:
    server = make_server(server={"refuse_unknown_calling_ae": True}, peers={"ct": {"ae_title": "CT01"}})
    with association(server, ae_title="CT01") as keeper:  # the known peer is accepted
        before = snapshot(server)
        with connect(server) as sock:  # unknown calling AE: rejected-permanent, service user, calling AE
            sock.sendall(associate_rq(calling="INTRUDER"))
            assert rj_fields(read_pdu(sock)) == (1, 1, 3)
            assert wait_eof(sock) == b""
        with connect(server) as sock:  # the known peer calling another title: called AE not recognized
            sock.sendall(associate_rq(calling="CT01", called="NOTME"))
            assert rj_fields(read_pdu(sock)) == (1, 1, 7)
            assert wait_eof(sock) == b""
        # DCMTK sees the same: rejected under its default title, accepted as CT01.
        refused = dcmtk("echoscu", "-aec", "APPLIANCE", "127.0.0.1", str(server.port))
        assert refused.returncode != 0
        accepted = dcmtk("echoscu", "-aet", "CT01", "-aec", "APPLIANCE", "127.0.0.1", str(server.port))
        assert accepted.returncode == 0, accepted.stderr
        assert_nothing_left(server, before)
        assert keeper.send_c_echo().Status == 0
        assert store_status(keeper, new_instance()) == 0


def test_max_associations_rejects_transient(make_server: MakeServer) -> None:
    # Two workers: the limit holds over all of them, whichever worker the kernel hands a connection to.
    server = make_server(server={"max_associations": 2, "workers": 2})
    with association(server, "FIRST") as first:
        with association(server, "SECOND") as second:
            for _ in range(4):
                with connect(server) as sock:
                    sock.sendall(associate_rq())
                    assert rj_fields(read_pdu(sock)) == (2, 3, 2)  # transient, provider (presentation), limit
            assert make_ae().associate("127.0.0.1", server.port, ae_title="APPLIANCE").is_rejected
            assert first.send_c_echo().Status == 0 and second.send_c_echo().Status == 0
            assert store_status(second, new_instance()) == 0
        # The released slot comes back (once the server has seen the connection close).

        def third_accepted() -> bool:
            assoc = make_ae().associate("127.0.0.1", server.port, ae_title="APPLIANCE")
            if not assoc.is_established:
                return False
            assoc.release()
            return True

        wait_for(third_accepted, 15, interval=0.1, what="a freed association slot")
        assert first.send_c_echo().Status == 0
    # All slots free again: both of two new associations are accepted at once.
    with association(server, "A"), association(server, "B"):
        pass


def test_artim_closes_a_silent_connection(make_server: MakeServer) -> None:
    server = make_server(server={"acse_timeout": 1.0})
    with association(server) as keeper:
        before = snapshot(server)
        started = time.monotonic()  # before the connections: the server's ARTIM starts when it accepts them
        with connect(server) as silent, connect(server) as half:
            half.sendall(associate_rq()[:10])  # a header and a little: ARTIM must end this one too
            assert wait_eof(silent, 15) == b""
            assert wait_eof(half, 15) == b""
            assert time.monotonic() - started >= 1.0  # not closed at once: the timer did it
        # The established association is not subject to ARTIM.
        assert_nothing_left(server, before)
        assert_serving(server, keeper)


# ---- full volumes -----------------------------------------------------------------------------------


def test_volume_over_high_watermark_refuses(make_server: MakeServer) -> None:
    from appliance.store.volumes import init_volume

    server = make_server(start=False, volumes=[{"name": "vol0", "path": "var/volumes/vol0", "high_watermark": 0.0001}])
    init_volume(server.volume, "vol0")  # a configured volume is never created by serve (issue 13)
    server.start()
    with association(server) as keeper:
        before = snapshot(server)
        ds = new_instance()
        assert store_status(keeper, ds) == 0xA700
        result = dcmtk("storescu", "-v", "-aec", "APPLIANCE", "127.0.0.1", str(server.port), str(MR))
        assert result.returncode != 0 and "Refused: OutOfResources" in result.stdout + result.stderr, result
        assert_nothing_left(server, before)
        assert_serving(server, keeper, store=False)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """mount_tmpfs(options) -> a new small tmpfs, unmounted at teardown. Skips the test where mounting is not
    permitted (it needs root or CAP_SYS_ADMIN)."""
    mounted: list[Path] = []

    def mount_tmpfs(options: str) -> Path:
        mount = shutil.which("mount")
        if mount is None:
            pytest.skip("no mount(8) on this machine: cannot make a small filesystem to fill")
        target = tmp_path / f"tmpfs{len(mounted)}"
        target.mkdir()
        result = subprocess.run([mount, "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True,
                                text=True)
        if result.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not permitted here ({result.stderr.strip()}): no real ENOSPC test")
        mounted.append(target)
        return target

    yield mount_tmpfs
    for target in reversed(mounted):
        if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(target)], capture_output=True)


def full_volume_server(make_server: MakeServer, volume: Path) -> ServerHandle:
    from appliance.store.volumes import init_volume

    init_volume(volume, "vol0")
    # Index on the ordinary disk; only the volume is small. Watermark 1.0: the filesystem really fills up.
    return make_server(volumes=[{"name": "vol0", "path": str(volume), "high_watermark": 1.0}])


def assert_stored_exactly(server: ServerHandle, volume: Path, sent: dict[str, bytes], out: Path) -> None:
    """Every Success'd instance exports byte-exact, nothing else is indexed, verify is clean, no partial file in tmp/."""
    assert server.cli_json("status")["counts"]["instances"] == len(sent)
    for uid, data in sent.items():
        server.cli("export", uid, str(out))
        assert dataset_bytes(out / f"{uid}.dcm") == data
    assert server.cli("verify").returncode == 0
    assert partial_files(volume) == []
    assert len(blob_files(server, volume)) == len(sent)


def big_instance(nbytes: int) -> pydicom.Dataset:
    """A CT instance with ``nbytes`` of (incompressible) pixel data."""
    side = int((nbytes // 2) ** 0.5)
    return new_instance(Rows=side, Columns=side, PixelData=random.Random(side).randbytes(side * side * 2))


def test_real_enospc(make_server: MakeServer, tmpfs: Callable[[str], Path], tmp_path: Path) -> None:
    volume = tmpfs("size=20m") / "vol0"
    server = full_volume_server(make_server, volume)
    sent: dict[str, bytes] = {}
    failed: list[tuple[str, int]] = []
    try:
        with association(server) as keeper:
            # 7 MiB instances into 20 MiB. Larger than the 4 MiB spool, each waits in a spill file before it is
            # appended to the segment, so it needs twice its size for a moment: the second one passes the
            # placement check (more than the 4 MiB size hint is free), spills, and hits ENOSPC in the append.
            for _ in range(5):
                ds = big_instance(7 << 20)
                rsp = keeper.send_c_store(ds)
                if rsp.Status == 0:
                    sent[ds.SOPInstanceUID] = wire_bytes(ds)
                else:
                    failed.append((ds.SOPInstanceUID, int(rsp.Status)))
                    break
            assert sent and failed, (list(sent), failed)
            assert failed[0][1] == 0xA700, failed
            assert "No space left" in server.log(), "0xA700 was not caused by a real ENOSPC"
            wait_for(lambda: not partial_files(volume), 15, what="the partial instance removed from tmp/")
            # The volume still takes what fits.
            for _ in range(3):
                ds = new_instance()
                assert store_status(keeper, ds) == 0
                sent[ds.SOPInstanceUID] = wire_bytes(ds)
        assert server.cli("show", failed[0][0], check=False).returncode == 3  # not in the index
        assert_stored_exactly(server, volume, sent, tmp_path / "out")
    finally:
        server.stop()  # before the tmpfs fixture unmounts the volume


def test_no_inode_left(make_server: MakeServer, tmpfs: Callable[[str], Path], tmp_path: Path) -> None:
    """Out of inodes: instances that fit the spool need none (they are appended to the open segment), so they are
    still stored; one that must spill to a file is refused cleanly (0xA700), never indexed without its bytes."""
    mnt = tmpfs("size=24m")
    volume = mnt / "vol0"
    server = full_volume_server(make_server, volume)
    try:
        sent: dict[str, bytes] = {}
        with association(server) as keeper:
            ds = new_instance()
            assert store_status(keeper, ds) == 0  # the worker's segment exists from here on
            sent[ds.SOPInstanceUID] = wire_bytes(ds)
            remount: list[subprocess.CompletedProcess[str]] = []

            def limit_inodes() -> bool:
                st = os.statvfs(mnt)
                remount.append(subprocess.run(["mount", "-o", f"remount,nr_inodes={st.f_files - st.f_ffree}",
                                               str(mnt)], capture_output=True, text=True))
                return remount[-1].returncode == 0

            try:
                wait_for(limit_inodes, 10, interval=0.05, what="a remount with an inode limit")
            except TimeoutError:
                pytest.skip(f"cannot limit the tmpfs inodes: {remount[-1].stderr.strip()}")
            for _ in range(3):
                ds = new_instance()
                assert store_status(keeper, ds) == 0  # no inode per instance
                sent[ds.SOPInstanceUID] = wire_bytes(ds)
            large = big_instance(6 << 20)  # past the 4 MiB spool: needs a spill file, so an inode
            assert store_status(keeper, large) == 0xA700
            assert "No space left on device" in server.log()
            assert_serving(server, keeper, store=False)
            ds = new_instance()
            assert store_status(keeper, ds) == 0
            sent[ds.SOPInstanceUID] = wire_bytes(ds)
        assert server.cli("show", large.SOPInstanceUID, check=False).returncode == 3  # not in the index
        assert_stored_exactly(server, volume, sent, tmp_path / "out")
    finally:
        server.stop()  # before the tmpfs fixture unmounts the volume


# ---- duplicates ---------------------------------------------------------------------------------------


def test_same_file_twice_is_one_blob(server: ServerHandle) -> None:
    result = dcmtk("storescu", "-aec", "APPLIANCE", "127.0.0.1", str(server.port), str(CT), str(CT))
    assert result.returncode == 0, result.stderr
    ds = new_instance()
    with association(server) as assoc:
        assert store_status(assoc, ds) == 0
        assert store_status(assoc, ds) == 0
    assert server.cli_json("status")["counts"]["instances"] == 2
    assert len(blob_files(server)) == 2
    assert server.cli("verify").returncode == 0


@pytest.mark.parametrize("policy", ["overwrite", "keep-first", "reject"])
def test_duplicate_policy(make_server: MakeServer, tmp_path: Path, policy: str) -> None:
    # Overwrite is a right granted per peer: GOODSCU has it (and under the other policies it changes nothing).
    server = make_server(storage={"duplicate_policy": policy},
                         peers={"good": {"ae_title": "GOODSCU", "allow_overwrite": policy == "overwrite"}})
    first = new_instance()
    second = copy.deepcopy(first)  # Dataset.copy() is shallow: it would change ``first`` too
    second.ImageComments = "the same SOP Instance UID with other bytes"
    with association(server) as assoc:
        assert store_status(assoc, first) == 0
        assert store_status(assoc, first) == 0  # identical re-send: Success under every policy
        first_blobs = blob_files(server)
        assert len(first_blobs) == 1
        expected_status = {"overwrite": 0x0000, "keep-first": 0x0000, "reject": 0x0111}[policy]
        assert store_status(assoc, second) == expected_status

    def exported() -> bytes:
        out = tmp_path / f"out{time.monotonic_ns()}"
        server.cli("export", first.SOPInstanceUID, str(out))
        return dataset_bytes(out / f"{first.SOPInstanceUID}.dcm")

    blobs = blob_files(server)
    assert len(blobs) == 1  # the replaced blob is deleted, the refused one never kept
    if policy == "overwrite":
        assert blobs != first_blobs
        assert exported() == wire_bytes(second)
    else:
        assert blobs == first_blobs
        assert exported() == wire_bytes(first)
    assert partial_files(server.volume) == []
    assert server.cli_json("status")["counts"] == {"patients": 1, "studies": 1, "series": 1, "instances": 1}
    assert server.cli("verify").returncode == 0
    if policy == "overwrite":  # and back: A -> B -> A brings the first blob back
        with association(server) as assoc:
            assert store_status(assoc, first) == 0
        assert blob_files(server) == first_blobs
        assert exported() == wire_bytes(first)
        assert server.cli_json("status")["counts"]["instances"] == 1
        assert server.cli("verify").returncode == 0
