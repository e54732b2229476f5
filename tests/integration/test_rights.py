"""Per-peer rights (docs/security.md) with real peers: DCMTK's echoscu/storescu and pynetdicom as SCUs.

Service rights (allow_echo, allow_store, server.unknown_peer_rights) answer 0x0124 Refused: Not Authorized and
leave the association open; the association-level checks (called AE title, refuse_unknown_calling_ae,
check_peer_host) reject the association. Every refusal writes exactly one log line, without patient data. The
rights to find, move, get and request storage commitment go through the same dispatch (services/application.py)
and are tested with those services."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pynetdicom import AE

from tests.conftest import ServerHandle, dcmtk, wait_for
from tests.integration.test_bad_input import make_ae, new_instance, store_status

CT = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
MakeServer = Callable[..., ServerHandle]


def lines(server: ServerHandle, text: str) -> list[str]:
    return [line for line in server.log().splitlines() if text in line]


def one_new_line(server: ServerHandle, text: str, before: int) -> str:
    """The log line a refusal writes (there must be exactly one more containing ``text`` than ``before``)."""
    wait_for(lambda: len(lines(server, text)) > before, 10, what=f"a log line with {text!r}")
    found = lines(server, text)
    assert len(found) == before + 1, found
    return found[-1]


def assert_no_phi(server: ServerHandle) -> None:
    ds = pydicom.dcmread(CT, stop_before_pixels=True)
    log = server.log()
    for value in (ds.PatientName, ds.PatientID, ds.StudyInstanceUID, ds.SOPInstanceUID):
        assert str(value) not in log, f"{value} in the log at info level"


def status_of(result_text: str) -> str:
    """DCMTK prints a status it has no name for as 'Unknown Status: 0x124' (with -v)."""
    return "0x124" if "Status: 0x124" in result_text else result_text


def test_service_rights_per_peer(make_server: MakeServer) -> None:
    server = make_server(server={"unknown_peer_rights": ["echo"]},
                         peers={"noecho": {"ae_title": "NOECHO", "allow_echo": False},
                                "nostore": {"ae_title": "NOSTORE", "allow_store": False},
                                "ct": {"ae_title": "CT01"}})
    port = str(server.port)
    refused = "is not allowed to"

    # allow_echo = false: echoscu gets 0x0124 (and exits 0: the association itself went fine).
    echo = dcmtk("echoscu", "-v", "-aet", "NOECHO", "-aec", "APPLIANCE", "127.0.0.1", port)
    assert status_of(echo.stderr + echo.stdout) == "0x124"
    line = one_new_line(server, refused, 0)
    assert "NOECHO (peer 'noecho', 127.0.0.1) is not allowed to echo" in line
    # allow_store = false: storescu gets 0x0124 and fails; nothing is stored.
    store = dcmtk("storescu", "-v", "-aet", "NOSTORE", "-aec", "APPLIANCE", "127.0.0.1", port, str(CT))
    assert store.returncode != 0 and status_of(store.stderr + store.stdout) == "0x124"
    assert "NOSTORE (peer 'nostore', 127.0.0.1) is not allowed to store" in one_new_line(server, refused, 1)
    # A calling AE title not under [peers] has server.unknown_peer_rights: echo yes, store no.
    echo = dcmtk("echoscu", "-v", "-aet", "STRANGER", "-aec", "APPLIANCE", "127.0.0.1", port)
    assert echo.returncode == 0 and "Status: 0x124" not in echo.stderr + echo.stdout
    store = dcmtk("storescu", "-v", "-aet", "STRANGER", "-aec", "APPLIANCE", "127.0.0.1", port, str(CT))
    assert store.returncode != 0 and status_of(store.stderr + store.stdout) == "0x124"
    assert "STRANGER (an AE title not under [peers], 127.0.0.1) is not allowed to store" in one_new_line(
        server, refused, 2)
    assert server.cli_json("status")["counts"]["instances"] == 0
    # A refusal leaves the association open for what the peer may do: NOSTORE may still echo, then store nothing.
    assoc = make_ae("NOSTORE").associate("127.0.0.1", server.port, ae_title="APPLIANCE")
    assert assoc.is_established
    assert store_status(assoc, new_instance()) == 0x0124
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    one_new_line(server, refused, 3)
    # A peer with the default rights stores.
    store = dcmtk("storescu", "-aet", "CT01", "-aec", "APPLIANCE", "127.0.0.1", port, str(CT))
    assert store.returncode == 0, store.stderr
    assert server.cli_json("status")["counts"]["instances"] == 1
    assert len(lines(server, refused)) == 4
    assert_no_phi(server)


def test_association_level_checks(make_server: MakeServer) -> None:
    server = make_server(server={"refuse_unknown_calling_ae": True}, peers={"ct": {"ae_title": "CT01"}})
    port = str(server.port)
    rejected = "rejected:"
    # refuse_unknown_calling_ae: an AE title not under [peers] cannot associate at all.
    result = dcmtk("echoscu", "-aet", "STRANGER", "-aec", "APPLIANCE", "127.0.0.1", port)
    assert result.returncode != 0 and "Calling AE Title Not Recognized" in result.stderr + result.stdout
    assert "association from 'STRANGER' rejected: calling AE title not in [peers]" in one_new_line(
        server, rejected, 0)
    # The called AE title must be ours, whoever calls.
    result = dcmtk("echoscu", "-aet", "CT01", "-aec", "NOTME", "127.0.0.1", port)
    assert result.returncode != 0 and "Called AE Title Not Recognized" in result.stderr + result.stdout
    assert "called AE title 'NOTME' is not ours" in one_new_line(server, rejected, 1)
    # The known peer calling us is accepted.
    result = dcmtk("echoscu", "-aet", "CT01", "-aec", "APPLIANCE", "127.0.0.1", port)
    assert result.returncode == 0, result.stderr
    assert len(lines(server, rejected)) == 2
    assert_no_phi(server)


def test_check_peer_host(make_server: MakeServer) -> None:
    server = make_server(server={"check_peer_host": True}, peers={"ct": {"ae_title": "CT01", "host": "127.0.0.2"}})
    rejected = "not its configured one"
    # CT01 from 127.0.0.1 is not the configured CT01 (127.0.0.2): rejected, with DCMTK and pynetdicom.
    result = dcmtk("echoscu", "-aet", "CT01", "-aec", "APPLIANCE", "127.0.0.1", str(server.port))
    assert result.returncode != 0 and "Calling AE Title Not Recognized" in result.stderr + result.stdout
    line = one_new_line(server, rejected, 0)
    assert "127.0.0.1" in line and "peer 'ct'" in line
    assert make_ae("CT01").associate("127.0.0.1", server.port, ae_title="APPLIANCE").is_rejected
    one_new_line(server, rejected, 1)
    # From its configured address it is accepted, and stores.
    ae: AE = make_ae("CT01")
    assoc = ae.associate("127.0.0.1", server.port, ae_title="APPLIANCE", bind_address=("127.0.0.2", 0))
    assert assoc.is_established, server.log()[-2000:]
    ds = new_instance()
    assert store_status(assoc, ds) == 0
    assoc.release()
    assert server.cli_json("show", str(ds.SOPInstanceUID))["calling_ae"] == "CT01"
    # The check is about configured peers: an unknown AE title is judged by unknown_peer_rights alone.
    assert dcmtk("echoscu", "-aet", "OTHER", "-aec", "APPLIANCE", "127.0.0.1", str(server.port)).returncode == 0
    assert len(lines(server, rejected)) == 2
