"""DICOM over TLS on the second port ([tls], docs/security.md) with real peers: DCMTK's echoscu/storescu with
+tls, pynetdicom with tls_args, `openssl s_client` for what a DICOM tool will not do (TLS 1.1), and raw sockets
for plaintext DICOM sent to the TLS port. Certificates are made with the openssl CLI (tests/tls_pki.py)."""

from __future__ import annotations

import copy
import re
import socket
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification

from tests.conftest import ServerHandle, dataset_bytes, dcmtk, wait_for
from tests.integration.test_bad_input import associate_rq
from tests.tls_pki import Pki, make_pki

CT = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
MakeServer = Callable[..., ServerHandle]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_section(pki: Pki, **changes: Any) -> dict[str, Any]:
    return {"enabled": True, "port": 0, "certificate": str(pki.server_cert), "private_key": str(pki.server_key),
            "ca_certificates": str(pki.ca), **changes}


def dcmtk_tls(pki: Pki, key: Path | None = None, cert: Path | None = None) -> list[str]:
    """DCMTK's TLS options: our client key and certificate (default: the trusted client's), the CA that signed the
    server's certificate, no passphrase prompt."""
    return ["+tls", str(key or pki.client_key), str(cert or pki.client_cert), "-pw", "+cf", str(pki.ca)]


def client_context(pki: Pki, cert: bool = True, rogue: bool = False,
                   maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    if rogue:
        context.load_cert_chain(pki.rogue_cert, pki.rogue_key)
    elif cert:
        context.load_cert_chain(pki.client_cert, pki.client_key)
    if maximum is not None:
        context.maximum_version = maximum
    return context


def tls_associate(server: ServerHandle, context: ssl.SSLContext, ae_title: str = "PYNTLS") -> Association:
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.network_timeout = 15
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    return ae.associate("127.0.0.1", server.tls_port, ae_title="APPLIANCE", tls_args=(context, "localhost"))


def new_ct() -> pydicom.Dataset:
    ds = copy.deepcopy(pydicom.dcmread(CT))
    ds.SOPInstanceUID = generate_uid()
    return ds


def handshakes(server: ServerHandle, result: str) -> float:
    match = re.search(rf'^appliance_tls_handshakes_total\{{result="{result}"\}} (\S+)$', server.metrics(), re.M)
    return float(match.group(1)) if match else 0.0


def log_lines(server: ServerHandle, text: str) -> list[str]:
    return [line for line in server.log().splitlines() if text in line]


def open_descriptors(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def assert_refused_and_logged(server: ServerHandle, reason: str, before: int) -> None:
    """One more 'TLS handshake failed' line, naming ``reason``; the worker logs it as the handshake fails, which may
    be just after the client gave up."""
    wait_for(lambda: len(log_lines(server, "TLS handshake failed")) > before, 10, what=f"the log line for {reason}")
    assert reason in log_lines(server, "TLS handshake failed")[-1], server.log()[-2000:]


def test_dcmtk_echo_and_store_over_tls_beside_the_plain_port(make_server: MakeServer, pki: Pki,
                                                           tmp_path: Path) -> None:
    # Two workers: both listen on the TLS port too (SO_REUSEPORT, as the plain one).
    server = make_server(server={"workers": 2}, tls=tls_section(pki))
    assert server.tls_port and server.tls_port != server.port
    echo = dcmtk("echoscu", *dcmtk_tls(pki), "-aec", "APPLIANCE", "127.0.0.1", str(server.tls_port))
    assert echo.returncode == 0, echo.stderr + server.log()
    store = dcmtk("storescu", *dcmtk_tls(pki), "-aet", "CT01", "-aec", "APPLIANCE", "127.0.0.1",
                  str(server.tls_port), str(CT))
    assert store.returncode == 0, store.stderr + server.log()
    # Stored like any other instance: readable afterwards.
    uid = str(pydicom.dcmread(CT, stop_before_pixels=True).SOPInstanceUID)
    assert server.cli_json("show", uid)["calling_ae"] == "CT01"
    server.cli("export", uid, str(tmp_path / "out"))
    assert pydicom.dcmread(tmp_path / "out" / f"{uid}.dcm").SOPInstanceUID == uid
    # The association says it came over TLS, and from whom (the client certificate's subject).
    accepted = log_lines(server, "accepted over TLS")
    assert len(accepted) == 2 and all("client certificate O=Test Hospital,CN=CT01" in line for line in accepted)
    # The plain port serves beside it, and the two do not mix: plaintext on it, TLS not.
    plain = dcmtk("echoscu", "-aec", "APPLIANCE", "127.0.0.1", str(server.port))
    assert plain.returncode == 0, plain.stderr
    assert dcmtk("echoscu", *dcmtk_tls(pki), "-aec", "APPLIANCE", "127.0.0.1", str(server.port)).returncode != 0
    # The association-level checks hold over TLS too: the A-ASSOCIATE-RJ travels inside the TLS connection.
    wrong = dcmtk("echoscu", *dcmtk_tls(pki), "-aec", "NOTME", "127.0.0.1", str(server.tls_port))
    assert wrong.returncode != 0 and "Called AE Title Not Recognized" in wrong.stdout + wrong.stderr
    assert handshakes(server, "ok") == 3


def test_dcmtk_query_and_retrieve_over_tls(make_server: MakeServer, pki: Pki, tmp_path: Path) -> None:
    """findscu +tls and a C-GET over TLS: the Query/Retrieve handlers serve the TLS port as they serve the plain one."""
    server = make_server(tls=tls_section(pki), peers={"ws": {"ae_title": "WS1", "port": 1}})
    store = dcmtk("storescu", *dcmtk_tls(pki), "-aet", "CT01", "-aec", "APPLIANCE", "127.0.0.1",
                  str(server.tls_port), str(CT))
    assert store.returncode == 0, store.stderr + server.log()
    ds = pydicom.dcmread(CT, stop_before_pixels=True)
    find = dcmtk("findscu", *dcmtk_tls(pki), "-S", "-aet", "WS1", "-aec", "APPLIANCE", "-k", "QueryRetrieveLevel=STUDY",
                 "-k", f"PatientID={ds.PatientID}", "-k", "StudyInstanceUID", "127.0.0.1", str(server.tls_port))
    assert find.returncode == 0, find.stderr
    assert str(ds.StudyInstanceUID) in find.stdout + find.stderr
    # C-GET over TLS with pynetdicom (DCMTK 3.6.7's getscu and movescu have no TLS options): byte for byte.
    from pynetdicom import build_role, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

    received: list[bytes] = []

    def on_store(event: Any) -> int:
        received.append(bytes(event.request.DataSet.getvalue()))
        return 0

    ae = AE(ae_title="WS1")
    ae.acse_timeout = ae.network_timeout = 15
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, [str(pydicom.dcmread(CT).file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", server.tls_port, ae_title="APPLIANCE", tls_args=(client_context(pki), "localhost"),
                         ext_neg=[build_role(CTImageStorage, scp_role=True)], evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        identifier = pydicom.Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = ds.StudyInstanceUID
        statuses = [int(st.Status) for st, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)]
    finally:
        assoc.release()
    server.cli("export", str(ds.SOPInstanceUID), str(tmp_path / "stored"))
    assert statuses[-1] == 0 and received == [dataset_bytes(tmp_path / "stored" / f"{ds.SOPInstanceUID}.dcm")]
    # Without the find right (an AE title not under [peers]) the refusal travels inside TLS too.
    refused = dcmtk("findscu", *dcmtk_tls(pki), "-v", "-S", "-aet", "OTHER", "-aec", "APPLIANCE",
                    "-k", "QueryRetrieveLevel=STUDY", "127.0.0.1", str(server.tls_port))
    assert "Final Find Response (Unknown Status: 0x124)" in refused.stdout + refused.stderr  # DCMTK's wording
    assert len(log_lines(server, "is not allowed to find")) == 1


@pytest.mark.parametrize("maximum,protocol", [(None, "TLSv1.3"), (ssl.TLSVersion.TLSv1_2, "TLSv1.2")])
def test_pynetdicom_over_tls(make_server: MakeServer, pki: Pki, maximum: ssl.TLSVersion | None,
                             protocol: str, tmp_path: Path) -> None:
    # Small PDUs on our side: the 6 MiB instance crosses many P-DATA PDUs and TLS records, both ways of flow control.
    server = make_server(server={"max_pdu": 65536, "write_buffer_high": 65536}, tls=tls_section(pki))
    assoc = tls_associate(server, client_context(pki, maximum=maximum))
    assert assoc.is_established, server.log()
    big = new_ct()
    big.Rows, big.Columns = 1536, 2048
    big.PixelData = bytes(range(256)) * (1536 * 2048 * 2 // 256)
    try:
        assert assoc.send_c_echo().Status == 0
        ds = new_ct()
        assert assoc.send_c_store(ds).Status == 0
        assert assoc.send_c_store(big).Status == 0
    finally:
        assoc.release()
    assert server.cli_json("show", str(ds.SOPInstanceUID))["calling_ae"] == "PYNTLS"
    server.cli("export", str(big.SOPInstanceUID), str(tmp_path))
    assert pydicom.dcmread(tmp_path / f"{big.SOPInstanceUID}.dcm").PixelData == big.PixelData
    line = log_lines(server, "accepted over TLS")[-1]
    assert protocol in line
    if protocol == "TLSv1.2":  # a suite of the BCP 195 list
        assert re.search(r"TLSv1\.2 ECDHE-ECDSA-(AES(128|256)-GCM-SHA(256|384)|CHACHA20-POLY1305)", line), line


def test_refused_handshakes_leak_nothing_and_the_server_keeps_serving(make_server: MakeServer, pki: Pki) -> None:
    # One association slot: a refused handshake that held one would make the last echo fail.
    server = make_server(server={"max_associations": 1}, tls=tls_section(pki))
    failed = 0

    def refused(reason: str) -> None:
        nonlocal failed
        assert_refused_and_logged(server, reason, failed)
        failed += 1

    # One good association and one refusal first, so that every file the worker opens lazily (the metrics files)
    # is open: from then on its descriptors must come back to the same count after each refusal.
    assoc = tls_associate(server, client_context(pki))
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    assoc.release()
    (worker,) = server.worker_pids()
    # No client certificate although one is required: DCMTK's anonymous TLS, then pynetdicom.
    result = dcmtk("echoscu", "+tla", "+cf", str(pki.ca), "-aec", "APPLIANCE", "127.0.0.1", str(server.tls_port))
    assert result.returncode != 0
    refused("PEER_DID_NOT_RETURN_A_CERTIFICATE")
    descriptors = open_descriptors(worker)
    assoc = tls_associate(server, client_context(pki, cert=False))
    assert not assoc.is_established
    refused("PEER_DID_NOT_RETURN_A_CERTIFICATE")
    # A client certificate from a CA we do not trust.
    result = dcmtk("echoscu", *dcmtk_tls(pki, pki.rogue_key, pki.rogue_cert), "-aec", "APPLIANCE", "127.0.0.1",
                   str(server.tls_port))
    assert result.returncode != 0
    refused("client certificate not accepted")
    assert not tls_associate(server, client_context(pki, rogue=True)).is_established
    refused("client certificate not accepted")
    # TLS 1.1 (SECLEVEL=0 so that the client really offers it; OpenSSL 3 would not by default).
    s_client = subprocess.run(["openssl", "s_client", "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0", "-connect",
                               f"127.0.0.1:{server.tls_port}"], input="", capture_output=True, text=True, timeout=30)
    assert "Cipher is (NONE)" in s_client.stdout or s_client.returncode != 0, s_client.stdout
    refused("UNSUPPORTED_PROTOCOL")
    # TLS 1.2 with a suite outside BCP 195 only (CBC, RSA key transport, SHA-1 MAC), a valid client certificate.
    s_client = subprocess.run(["openssl", "s_client", "-tls1_2", "-cipher", "AES128-SHA", "-cert", str(pki.client_cert),
                               "-key", str(pki.client_key), "-CAfile", str(pki.ca), "-connect",
                               f"127.0.0.1:{server.tls_port}"], input="", capture_output=True, text=True, timeout=30)
    assert "Cipher is (NONE)" in s_client.stdout or s_client.returncode != 0, s_client.stdout
    refused("NO_SHARED_CIPHER")
    # Plaintext DICOM to the TLS port: DCMTK without +tls, then a raw A-ASSOCIATE-RQ. Whatever comes back is a TLS
    # alert at most (record type 0x15), never a DICOM PDU.
    assert dcmtk("echoscu", "-aec", "APPLIANCE", "127.0.0.1", str(server.tls_port)).returncode != 0
    refused("WRONG_VERSION_NUMBER")
    with socket.create_connection(("127.0.0.1", server.tls_port), timeout=15) as sock:
        sock.sendall(associate_rq())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer[:1] in (b"", b"\x15"), answer[:16]
    refused("WRONG_VERSION_NUMBER")
    assert handshakes(server, "failed") == failed
    wait_for(lambda: open_descriptors(worker) == descriptors, 10, what="the worker's descriptors back to their count")
    # Nothing held: the one association slot is free on both ports.
    assoc = tls_associate(server, client_context(pki))
    assert assoc.is_established, server.log()[-2000:]
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    assert dcmtk("echoscu", "-aec", "APPLIANCE", "127.0.0.1", str(server.port)).returncode == 0
    # Refusals are logged by address and OpenSSL's reason: no association was made, so there is nothing else.
    assert not log_lines(server, "rejected") and not log_lines(server, "aborting")


def test_abandoned_handshakes_time_out_and_are_bounded(make_server: MakeServer, pki: Pki) -> None:
    server = make_server(server={"max_associations": 1},
                         tls=tls_section(pki, handshake_timeout_s=1.0, handshakes_pending_max=2))
    silent = [socket.create_connection(("127.0.0.1", server.tls_port), timeout=15) for _ in range(2)]
    try:
        # Both places taken: the next connection is reset at once, and counted.
        wait_for(lambda: not tls_associate(server, client_context(pki)).is_established
                 and handshakes(server, "limit") >= 1, 10, what="a connection over tls.handshakes_pending_max reset")
        # The silent ones are dropped after handshake_timeout_s...
        for sock in silent:
            assert sock.recv(1) == b""
        wait_for(lambda: handshakes(server, "timeout") == 2, 10, what="two handshake timeouts counted")
        assert len(log_lines(server, "TLS handshake timed out")) == 2
        # ... and never held the only association slot: a plain association was possible all along.
        assert dcmtk("echoscu", "-aec", "APPLIANCE", "127.0.0.1", str(server.port)).returncode == 0
        assoc = tls_associate(server, client_context(pki))
        assert assoc.is_established
        assoc.release()
    finally:
        for sock in silent:
            sock.close()


def test_client_certificate_optional(make_server: MakeServer, pki: Pki) -> None:
    server = make_server(tls=tls_section(pki, require_client_certificate=False))
    anonymous = dcmtk("echoscu", "+tla", "+cf", str(pki.ca), "-aec", "APPLIANCE", "127.0.0.1", str(server.tls_port))
    assert anonymous.returncode == 0, anonymous.stderr
    with_cert = dcmtk("echoscu", *dcmtk_tls(pki), "-aec", "APPLIANCE", "127.0.0.1", str(server.tls_port))
    assert with_cert.returncode == 0, with_cert.stderr
    lines = log_lines(server, "accepted over TLS")
    assert "client certificate none" in lines[0] and "CN=CT01" in lines[1]
    # A certificate that is offered is still verified.
    assert not tls_associate(server, client_context(pki, rogue=True)).is_established


@pytest.mark.parametrize("problem,message", [
    ("world-readable key", "is accessible to every user"),
    ("key of another certificate", "is not the key of tls.certificate"),
    ("missing certificate", "does not exist"),
])
def test_serve_refuses_bad_tls_files(make_server: MakeServer, pki: Pki, tmp_path: Path, problem: str,
                                     message: str) -> None:
    key, cert = tmp_path / "server.key", pki.server_cert
    key.write_bytes(pki.server_key.read_bytes())
    key.chmod(0o600)
    if problem == "world-readable key":
        key.chmod(0o644)
    elif problem == "key of another certificate":
        key.write_bytes(pki.client_key.read_bytes())
    else:
        cert = tmp_path / "missing.crt"
    server = make_server(start=False, tls=tls_section(pki, private_key=str(key), certificate=str(cert)))
    result = subprocess.run([*server_command(server)], capture_output=True, text=True, timeout=60, cwd=server.root)
    assert result.returncode == 78, result.stderr
    assert message in result.stderr, result.stderr


def server_command(server: ServerHandle) -> list[str]:
    from tests.conftest import APPLIANCE

    return [*APPLIANCE, "serve", "-c", str(server.config_path)]


def test_c_move_to_a_peer_over_tls(make_server: MakeServer, pki: Pki) -> None:
    """A [peers] entry with tls = true: the C-MOVE sub-operations travel over DICOM TLS, with our client certificate,
    to a destination that requires one; the same destination's TLS port refuses a plain association."""
    destination = make_server(server={"ae_title": "DEST"}, tls=tls_section(pki))
    client = {"client_certificate": str(pki.client_cert), "client_private_key": str(pki.client_key)}
    archive = make_server(tls=tls_section(pki, enabled=False, **client), peers={
        "ws": {"ae_title": "WS1", "port": 1},
        "dest": {"ae_title": "DEST", "port": destination.tls_port, "tls": True},
        "plain": {"ae_title": "PLAINDEST", "port": destination.tls_port},  # tls = false: plain DICOM to a TLS port
    })
    assert dcmtk("storescu", "-aet", "CT01", "-aec", "APPLIANCE", "127.0.0.1", str(archive.port), str(CT)).returncode == 0
    ds = pydicom.dcmread(CT, stop_before_pixels=True)
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

    ae = AE(ae_title="WS1")
    ae.acse_timeout = ae.network_timeout = 15
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", archive.port, ae_title="APPLIANCE")
    assert assoc.is_established
    identifier = pydicom.Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ds.StudyInstanceUID
    try:
        over_tls = [int(st.Status) for st, _ in assoc.send_c_move(identifier, "DEST",
                                                                  StudyRootQueryRetrieveInformationModelMove)]
        plain = [int(st.Status) for st, _ in assoc.send_c_move(identifier, "PLAINDEST",
                                                               StudyRootQueryRetrieveInformationModelMove)]
    finally:
        assoc.release()
    assert over_tls[-1] == 0, over_tls
    assert destination.cli_json("show", str(ds.SOPInstanceUID))["calling_ae"] == "APPLIANCE"
    accepted = log_lines(destination, "accepted over TLS")
    assert accepted and "client certificate O=Test Hospital,CN=CT01" in accepted[-1]
    assert plain[-1] == 0xA702, plain  # plain DICOM to a TLS port: the destination cannot be reached ...
    wait_for(lambda: handshakes(destination, "failed") >= 1, 10, what="the destination's failed handshake")
