"""Association lifecycle against pynetdicom and DCMTK: idle timeout, and graceful drain on SIGTERM."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from tests.conftest import APPLIANCE, ServerHandle, dcmtk, wait_for

CT = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]


def _associate(port: int) -> object:
    ae = AE(ae_title="LIFECYCLE")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="APPLIANCE")
    assert assoc.is_established
    return assoc


def test_idle_association_is_aborted_and_the_server_goes_on(make_server: Callable[..., ServerHandle]) -> None:
    server = make_server(server={"idle_timeout": 1.0})
    assoc = _associate(server.port)
    assert assoc.send_c_echo().Status == 0  # type: ignore[attr-defined]
    # No traffic now: the server must abort it after about a second.
    wait_for(lambda: assoc.is_aborted or not assoc.is_alive(), timeout=15, what="idle abort")  # type: ignore[attr-defined]
    assert dcmtk("echoscu", "-aec", "APPLIANCE", "127.0.0.1", str(server.port)).returncode == 0
    metrics = server.metrics()
    assert 'appliance_aborts_total{reason="idle"} 1.0' in metrics


def test_sigterm_drains_open_associations(make_server: Callable[..., ServerHandle]) -> None:
    server = make_server()
    assoc = _associate(server.port)
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    # New associations are refused once the workers stop listening ...
    wait_for(lambda: dcmtk("echoscu", "-to", "2", "-aec", "APPLIANCE", "127.0.0.1", str(server.port)).returncode != 0,
             timeout=20, interval=0.1, what="listener closed")
    # ... while the open one is still served to the end.
    ds = pydicom.dcmread(CT)
    ds.SOPInstanceUID = generate_uid()
    assert assoc.send_c_store(ds).Status == 0  # type: ignore[attr-defined]
    assoc.release()  # type: ignore[attr-defined]
    assert server.proc.wait(40) == 0
    shown = server.cli_json("show", str(ds.SOPInstanceUID))
    assert shown["calling_ae"] == "LIFECYCLE"


def test_start_up_failure_leaves_no_worker_behind(make_server: Callable[..., ServerHandle]) -> None:
    import subprocess

    first = make_server()
    second = make_server(start=False, server={"metrics_port": first.metrics_port})  # that port is taken
    result = subprocess.run([*APPLIANCE, "serve", "-c", str(second.config_path)], cwd=second.root,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"server.metrics_port {first.metrics_port}" in result.stderr
    leftovers = subprocess.run(["pgrep", "-f", str(second.config_path)], capture_output=True, text=True).stdout
    assert leftovers.split() == []
    assert dcmtk("echoscu", "-aec", "APPLIANCE", "127.0.0.1", str(first.port)).returncode == 0
