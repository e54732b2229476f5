"""The requestor role (appliance/net/client.py) against a peer nobody here wrote: DCMTK's storescp."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from pydicom.data import get_testdata_file

from tests.conftest import DCMTK_ENV, ServerHandle, dataset_bytes, dcmtk, free_port, require_dcmtk, wait_for

CT = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


async def _send(port: int, called: str, dataset: bytes, sop_uid: str) -> tuple[int, int]:
    from appliance.net.client import ClientAssociation

    assoc = await ClientAssociation.open("127.0.0.1", port, called, "BENCH",
                                         [("1.2.840.10008.1.1", ["1.2.840.10008.1.2"]),
                                          (CT_IMAGE_STORAGE, [EXPLICIT_LE])], max_pdu=16384)
    echo = await assoc.echo()
    status = await assoc.store(CT_IMAGE_STORAGE, sop_uid, EXPLICIT_LE, dataset)
    await assoc.release()
    return echo, status


def test_client_stores_bit_exact_into_dcmtk_storescp(tmp_path: Path) -> None:
    import pydicom

    require_dcmtk()
    port = free_port()
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(["storescp", "+B", "-od", str(out), "-aet", "REF", str(port)], env=DCMTK_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: dcmtk("echoscu", "-aec", "REF", "127.0.0.1", str(port)).returncode == 0, 30,
                 interval=0.05, what="storescp")
        sent = dataset_bytes(CT)
        uid = str(pydicom.dcmread(CT, stop_before_pixels=True).SOPInstanceUID)
        assert asyncio.run(_send(port, "REF", sent, uid)) == (0, 0)
        received = list(out.iterdir())
        assert len(received) == 1
        assert dataset_bytes(received[0]) == sent  # fragmented at 16 KiB PDUs and reassembled by DCMTK
    finally:
        proc.terminate()
        proc.wait(10)


def test_client_against_the_appliance(server: ServerHandle) -> None:
    import pydicom

    sent = dataset_bytes(CT)
    uid = str(pydicom.dcmread(CT, stop_before_pixels=True).SOPInstanceUID)
    assert asyncio.run(_send(server.port, "APPLIANCE", sent, uid)) == (0, 0)
    assert server.cli_json("show", uid)["calling_ae"] == "BENCH"
