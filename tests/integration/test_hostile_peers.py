"""Issue 8 against a real `appliance serve`: each hostile-peer class gets its answer (A-ASSOCIATE-RJ, A-ABORT,
DIMSE status or a reset), nothing leaks (descriptors, tmp files, slots) and the worker goes on serving."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from appliance import errors
from appliance.net import dimse, pdu
from tests.conftest import ServerHandle, dcmtk, free_port, wait_for
from tests.integration.test_bad_input import (
    MakeServer,
    abort_fields,
    assert_serving,
    association,
    connect,
    new_instance,
    partial_files,
    raw_associate,
    read_pdu,
    rj_fields,
    store_status,
)
from tests.protocol.fakes import associate_rq


def worker_fds(server: ServerHandle) -> int:
    (pid,) = server.worker_pids()
    return len(os.listdir(f"/proc/{pid}/fd"))


def metric(server: ServerHandle, line: str) -> bool:
    return any(m.startswith(line) for m in server.metrics().splitlines())


def test_tiny_peer_max_pdu_is_rejected_and_zero_means_unlimited(server: ServerHandle) -> None:
    with connect(server) as sock:
        sock.sendall(associate_rq(max_pdu=16))
        assert rj_fields(read_pdu(sock)) == (1, 1, 1)
    sock, _ac = raw_associate(server, max_pdu=0)
    with sock:
        sock.sendall(b"".join(pdu.p_data_pdus(1, dimse.echo_request(1), True, 0)))
        got = read_pdu(sock)
        assert got is not None and got[0] == pdu.P_DATA_TF
    assert_serving(server)


def test_oversized_and_overcrowded_requests_are_rejected(make_server: MakeServer) -> None:
    server = make_server(server={"max_associate_rq_bytes": 4096, "max_presentation_contexts": 8})
    with connect(server) as sock:
        sock.sendall(associate_rq(extra_contexts=6))  # 8 contexts: fine
        assert read_pdu(sock) is not None
    for rq in (associate_rq(extra_contexts=7), associate_rq(extra_contexts=100)):  # 9 contexts; > 4096 bytes
        with connect(server) as sock:
            sock.sendall(rq)
            assert rj_fields(read_pdu(sock)) == (1, 1, 1)
    assert_serving(server)


def test_c_store_without_a_dataset_leaks_no_descriptor(server: ServerHandle) -> None:
    command = dimse.encode_command([
        (dimse.AFFECTED_SOP_CLASS_UID, b"1.2.840.10008.5.1.4.1.1.2\x00"),
        (dimse.COMMAND_FIELD, dimse.US.pack(dimse.C_STORE_RQ)),
        (dimse.MESSAGE_ID, dimse.US.pack(1)),
        (dimse.PRIORITY, dimse.US.pack(0)),
        (dimse.COMMAND_DATA_SET_TYPE, dimse.US.pack(dimse.NO_DATASET)),
        (dimse.AFFECTED_SOP_INSTANCE_UID, b"1.2.3.4"),
    ])
    message = b"".join(pdu.p_data_pdus(3, command, True, 0))
    sock, _ac = raw_associate(server)
    with sock:
        sock.sendall(message)
        assert read_pdu(sock) is not None
        before = worker_fds(server)
        for _ in range(100):
            sock.sendall(message)
            got = read_pdu(sock)
            assert got is not None and got[0] == pdu.P_DATA_TF
            (pdv,) = pdu.iter_pdvs(memoryview(got[1]))
            assert dimse.decode_command(bytes(pdv.data)).status == errors.CANNOT_UNDERSTAND
        # The tmp-file reserve may refill meanwhile; the old leak was one descriptor per request.
        assert worker_fds(server) - before < 10
    assert partial_files(server.volume) == []


def test_associations_per_host_and_per_ae(make_server: MakeServer) -> None:
    server = make_server(server={"max_associations_per_host": 2, "max_associations_per_ae": 1})
    ae = AE(ae_title="SAME")
    ae.add_requested_context(Verification)
    first = ae.associate("127.0.0.1", server.port, ae_title="APPLIANCE")
    assert first.is_established
    second = ae.associate("127.0.0.1", server.port, ae_title="APPLIANCE")
    assert second.is_rejected  # per calling AE
    with association(server, "OTHER"):
        third = AE(ae_title="THIRD")
        third.add_requested_context(Verification)
        refused = third.associate("127.0.0.1", server.port, ae_title="APPLIANCE")
        assert refused.is_rejected  # per source host: two already from 127.0.0.1
    first.release()
    wait_for(lambda: dcmtk("echoscu", "-aec", "APPLIANCE", "127.0.0.1", str(server.port)).returncode == 0, 10,
             interval=0.1, what="a freed per-host slot")


def test_a_peer_that_never_reads_is_reset_and_its_slot_freed(make_server: MakeServer) -> None:
    server = make_server(server={"write_buffer_high": 65536, "write_timeout": 1.0, "max_associations": 1})
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # so that the server's output backs up soon
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(associate_rq())
    assert read_pdu(sock) is not None
    echo = b"".join(pdu.p_data_pdus(1, dimse.echo_request(1), True, 0))
    outcome: list[BaseException] = []

    def flood() -> None:
        try:
            sock.settimeout(60)
            # Up to ~80 MB of requests whose responses are never read: the kernel buffers on loopback (receive
            # buffers autotune up to tcp_rmem, 32 MiB here) take tens of MB before the sender blocks.
            for _ in range(1000):
                sock.sendall(echo * 1000)
        except OSError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    thread.join(90)
    assert outcome and isinstance(outcome[0], ConnectionResetError | BrokenPipeError), outcome
    sock.close()
    wait_for(lambda: metric(server, 'appliance_aborts_total{reason="write_timeout"} 1.0'), 10, what="the metric")
    assert_serving(server)  # the only slot is free again


def test_slow_drip_message_is_aborted(make_server: MakeServer) -> None:
    server = make_server(server={"message_timeout": 1.0})
    sock, _ac = raw_associate(server)
    message = b"".join(pdu.p_data_pdus(1, dimse.echo_request(1), True, 0))
    stop = threading.Event()

    def drip() -> None:
        for byte in message[:-1]:
            if stop.wait(0.2):
                return
            try:
                sock.send(bytes([byte]))
            except OSError:
                return

    thread = threading.Thread(target=drip, daemon=True)
    started = time.monotonic()
    thread.start()
    with sock:
        sock.settimeout(15)
        assert abort_fields(read_pdu(sock)) == (2, 0)
        stop.set()
    assert time.monotonic() - started < 10
    assert_serving(server)


def test_restart_on_the_same_port_after_a_burst_and_after_kill_9(make_server: MakeServer) -> None:
    port = free_port()
    server = make_server(server={"port": port})
    for _ in range(2):
        for _ in range(20):  # connections the server closes first leave TIME_WAIT entries on its port
            assert dcmtk("echoscu", "-aec", "APPLIANCE", "127.0.0.1", str(port)).returncode == 0
        server.stop()
        server.start()
        assert server.port == port
        assert dcmtk("echoscu", "-aec", "APPLIANCE", "127.0.0.1", str(port)).returncode == 0
    with association(server) as assoc:
        assert store_status(assoc, new_instance()) == 0
    server.kill()
    server.start()
    assert_serving(server)


def test_a_dead_workers_slots_are_released(make_server: MakeServer) -> None:
    server = make_server(server={"max_associations": 2})
    held = []
    for name in ("ONE", "TWO"):
        ae = AE(ae_title=name)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="APPLIANCE")
        assert assoc.is_established
        held.append(assoc)
    (pid,) = server.worker_pids()
    os.kill(pid, 9)
    wait_for(lambda: server.worker_pids() not in ([], [pid]), 30, what="a restarted worker")
    wait_for(lambda: "2 association slot(s) released" in server.log(), 10, what="the log line")
    wait_for(lambda: dcmtk("echoscu", "-aec", "APPLIANCE", "127.0.0.1", str(server.port)).returncode == 0, 30,
             interval=0.1, what="the restarted worker to listen")
    with association(server, "A"), association(server, "B"):  # both slots usable again
        pass


def test_data_and_index_are_private(server: ServerHandle) -> None:
    with association(server) as assoc:
        assert store_status(assoc, new_instance()) == 0
    paths = [server.root / "var", *(server.root / "var").rglob("*")]
    assert any(p.name == "data.mdb" for p in paths) and any(p.parent.name == "segments" for p in paths)
    public = [f"{p.relative_to(server.root)} {stat.filemode(p.stat().st_mode)}" for p in paths
              if p.stat().st_mode & 0o077]
    assert public == []
