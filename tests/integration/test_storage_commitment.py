"""Storage Commitment Push Model SCP (appliance/services/commitment.py) against real SCUs: pynetdicom (the report
on the same association, and on a new one after the SCU released) and Orthanc through its REST API (slow)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification  # type: ignore[attr-defined]

from appliance.dicom.uids import STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_PUSH_INSTANCE
from appliance.net import dimse, pdu
from appliance.net.client import ClientAssociation
from tests.conftest import ServerHandle, free_port, wait_for
from tests.peers import CT_IMAGE_STORAGE, MR_IMAGE_STORAGE, Orthanc, ct_instances, sop_uids, store

SCU_AE = "COMMITSCU"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
FAST_REPORTS = {"report_timeout_s": 5.0, "connect_timeout_s": 5.0, "report_attempts_max": 2,
                "report_retry_wait_s": 0.2}


def action_information(references: list[tuple[str, str]], transaction_uid: str | None = None) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction_uid or generate_uid()
    items = []
    for sop_class, sop_instance in references:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


class Reports:
    """N-EVENT-REPORTs a pynetdicom SCU received (on its own association or as SCP on a new one)."""

    def __init__(self) -> None:
        self.events: list[tuple[int, Dataset, str]] = []  # (event type, event information, calling AE)
        self.arrived = threading.Event()

    def handler(self, event: Any) -> tuple[int, None]:
        info = event.event_information
        self.events.append((int(event.request.EventTypeID), info, event.assoc.requestor.ae_title))
        self.arrived.set()
        return 0x0000, None

    def wait(self, timeout: float = 30) -> tuple[int, Dataset, str]:
        assert self.arrived.wait(timeout), "no N-EVENT-REPORT arrived"
        return self.events[0]


def n_action(port: int, dataset: Dataset | None, reports: Reports | None = None, action_type: int = 1,
             instance: str = STORAGE_COMMITMENT_PUSH_INSTANCE, calling_ae: str = SCU_AE,
             wait_report: bool = True) -> int:
    """Send one N-ACTION with pynetdicom; with ``wait_report``, keep the association until the report came."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(StorageCommitmentPushModel)
    ae.add_requested_context(Verification)
    handlers = [(evt.EVT_N_EVENT_REPORT, reports.handler)] if reports is not None else []
    assoc = ae.associate("127.0.0.1", port, ae_title="APPLIANCE", evt_handlers=handlers)
    assert assoc.is_established
    try:
        status, _reply = assoc.send_n_action(dataset, action_type, StorageCommitmentPushModel, instance)
        if wait_report and reports is not None and int(status.Status) == 0:
            reports.wait()
        echo = assoc.send_c_echo()
        assert int(echo.Status) == 0  # the association (and the server) still serves
        return int(status.Status)
    finally:
        assoc.release()


async def raw_n_action(port: int, dataset: bytes, calling_ae: str = SCU_AE, release_at_once: bool = True) -> int:
    """An N-ACTION-RQ from our own client (net/client.py), for what pynetdicom will not send: bytes that are not a
    dataset, and an A-RELEASE-RQ in the same write as the request, so that the association is certainly released
    before the report can be sent on it. Returns the N-ACTION-RSP status."""
    assoc = await ClientAssociation.open("127.0.0.1", port, "APPLIANCE", calling_ae,
                                         [(STORAGE_COMMITMENT_PUSH, [EXPLICIT_LE])])
    context_id = assoc.context_for(STORAGE_COMMITMENT_PUSH, EXPLICIT_LE)
    assert context_id is not None
    command = dimse.encode_command([
        (dimse.REQUESTED_SOP_CLASS_UID, dimse.ui(STORAGE_COMMITMENT_PUSH)),
        (dimse.COMMAND_FIELD, dimse.us(dimse.N_ACTION_RQ)),
        (dimse.MESSAGE_ID, dimse.us(assoc.next_message_id())),
        (dimse.COMMAND_DATA_SET_TYPE, dimse.us(dimse.HAS_DATASET)),
        (dimse.REQUESTED_SOP_INSTANCE_UID, dimse.ui(STORAGE_COMMITMENT_PUSH_INSTANCE)),
        (dimse.ACTION_TYPE_ID, dimse.us(1)),
    ])
    if not release_at_once:
        rsp = await assoc.request(context_id, command, dataset, 30)
        await assoc.release()
        return int(rsp.status or 0)
    assert assoc.transport is not None
    assoc.transport.write(b"".join([*pdu.p_data_pdus(context_id, command, True, assoc.peer_max_pdu),
                                    *pdu.p_data_pdus(context_id, dataset, False, assoc.peer_max_pdu),
                                    pdu.RELEASE_RQ_PDU]))
    rsp = await asyncio.wait_for(assoc._expect(), 30)  # the N-ACTION-RSP, then the A-RELEASE-RP
    await asyncio.wait_for(assoc.closed, 30)
    assert isinstance(rsp, dimse.Command)
    # PS3.7 10.1.4.1: the N-ACTION-RSP names the Requested SOP Class and Instance as Affected, with the Action Type.
    assert (rsp.command_field, rsp.affected_sop_class_uid, rsp.affected_sop_instance_uid, rsp.action_type_id) == (
        dimse.N_ACTION_RSP, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_PUSH_INSTANCE, 1)
    return int(rsp.status or 0)


def encoded(ds: Dataset) -> bytes:
    data = encode(ds, False, True)
    assert data is not None
    return data


def referenced(info: Dataset) -> set[str]:
    return {str(item.ReferencedSOPInstanceUID) for item in info.get("ReferencedSOPSequence", [])}


def failed(info: Dataset) -> dict[str, int]:
    return {str(item.ReferencedSOPInstanceUID): int(item.FailureReason) for item in info.get("FailedSOPSequence", [])}


@pytest.fixture
def stored(server_with_peer: ServerHandle, tmp_path: Path) -> list[Path]:
    files = ct_instances(tmp_path / "ct", 3)
    assert store(server_with_peer.port, files) == [0, 0, 0]
    return files


@pytest.fixture
def scu_scp_port() -> int:
    return free_port()


@pytest.fixture
def server_with_peer(make_server: Callable[..., ServerHandle], scu_scp_port: int) -> ServerHandle:
    return make_server(peers={"scu": {"ae_title": SCU_AE, "port": scu_scp_port},
                              "noright": {"ae_title": "NORIGHT", "allow_storage_commitment": False}},
                       commitment=FAST_REPORTS)


def test_report_on_the_same_association(server_with_peer: ServerHandle, stored: list[Path]) -> None:
    references = [sop_uids(f) for f in stored]
    unknown = (CT_IMAGE_STORAGE, generate_uid())
    wrong_class = (MR_IMAGE_STORAGE, references[0][1])
    transaction = generate_uid()
    reports = Reports()
    status = n_action(server_with_peer.port, action_information([*references, unknown, wrong_class], transaction),
                      reports)
    assert status == 0
    event_type, info, _ = reports.wait()
    assert event_type == 2
    assert info.TransactionUID == transaction
    assert info.RetrieveAETitle == "APPLIANCE"
    assert referenced(info) == {uid for _, uid in references}
    assert failed(info) == {unknown[1]: 0x0112, wrong_class[1]: 0x0119}
    expected = ['appliance_storage_commitment_total{outcome="committed"} 3.0',
                'appliance_storage_commitment_total{outcome="failed"} 2.0',
                'appliance_storage_commitment_total{outcome="same_association"} 1.0']
    wait_for(lambda: all(line in server_with_peer.metrics() for line in expected), 10, what="the metrics")


def test_all_committed_is_event_type_1(server_with_peer: ServerHandle, stored: list[Path]) -> None:
    reports = Reports()
    assert n_action(server_with_peer.port, action_information([sop_uids(f) for f in stored]), reports) == 0
    event_type, info, _ = reports.wait()
    assert event_type == 1 and "FailedSOPSequence" not in info
    assert len(referenced(info)) == 3


@pytest.fixture
def scu_as_scp(scu_scp_port: int) -> Iterator[Reports]:
    """The SCU's own listener, where a report on a new association arrives (pynetdicom as a test peer)."""
    reports = Reports()
    ae = AE(ae_title=SCU_AE)
    ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    server = ae.start_server(("127.0.0.1", scu_scp_port), block=False,
                             evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler)])
    yield reports
    server.shutdown()


def test_report_on_a_new_association_after_release(server_with_peer: ServerHandle, stored: list[Path],
                                                   scu_as_scp: Reports) -> None:
    references = [sop_uids(f) for f in stored]
    transaction = generate_uid()
    # The SCU releases with its request: the report must come on an association we request.
    assert asyncio.run(raw_n_action(server_with_peer.port, encoded(action_information(references, transaction)))) == 0
    event_type, info, calling_ae = scu_as_scp.wait()
    assert (event_type, str(info.TransactionUID), calling_ae) == (1, transaction, "APPLIANCE")
    assert referenced(info) == {uid for _, uid in references}
    wait_for(lambda: 'appliance_storage_commitment_total{outcome="new_association"} 1.0' in server_with_peer.metrics(),
             10, what="the metrics")


def test_pynetdicom_scu_releasing_at_once_gets_its_report(server_with_peer: ServerHandle, stored: list[Path],
                                                          scu_as_scp: Reports) -> None:
    """A pynetdicom SCU that releases right after the N-ACTION-RSP: the report goes on its association if it is
    still open when the verification ends, else on a new one to its listener; either way it arrives."""
    ae = AE(ae_title=SCU_AE)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", server_with_peer.port, ae_title="APPLIANCE",
                         evt_handlers=[(evt.EVT_N_EVENT_REPORT, scu_as_scp.handler)])
    assert assoc.is_established
    status, _ = assoc.send_n_action(action_information([sop_uids(f) for f in stored]), 1, StorageCommitmentPushModel,
                                    STORAGE_COMMITMENT_PUSH_INSTANCE)
    assoc.release()
    assert int(status.Status) == 0
    assert scu_as_scp.wait()[0] == 1


def test_corrupted_blob_is_a_processing_failure(server_with_peer: ServerHandle, stored: list[Path]) -> None:
    victim = stored[1]
    pixels = pydicom.dcmread(victim).PixelData
    pattern = bytes(pixels[-256:])
    uid = sop_uids(victim)[1].encode()
    hits = []
    for seg in (server_with_peer.volume / "segments").glob("*.tar"):
        data = seg.read_bytes()
        start = data.find(uid)  # the instances share their pixels: the victim's are the ones after its UID
        if start >= 0 and data.find(pattern, start) >= 0:
            hits.append((seg, data.find(pattern, start)))
    assert hits, "the instance's pixel data is not in any segment"
    segment, at = hits[0]
    with open(segment, "r+b") as fh:  # flip bytes inside the record: same length, other content
        fh.seek(at)
        fh.write(bytes(b ^ 0xFF for b in pattern[:64]))
    reports = Reports()
    assert n_action(server_with_peer.port, action_information([sop_uids(f) for f in stored]), reports) == 0
    event_type, info, _ = reports.wait()
    assert event_type == 2
    assert failed(info) == {sop_uids(victim)[1]: 0x0110}
    assert referenced(info) == {sop_uids(f)[1] for f in stored if f != victim}


@pytest.mark.parametrize(
    ("case", "expected"),
    [("action type 2", 0x0123), ("other instance", 0x0112), ("no transaction", 0x0115), ("no references", 0x0115),
     ("garbage", 0x0115), ("peer without the right", 0x0124)],
)
def test_bad_requests_get_their_status(server_with_peer: ServerHandle, case: str, expected: int) -> None:
    good = action_information([(CT_IMAGE_STORAGE, generate_uid())])
    kwargs: dict[str, Any] = {}
    dataset: Dataset | None = good
    if case == "action type 2":
        kwargs["action_type"] = 2
    elif case == "other instance":
        kwargs["instance"] = generate_uid()
    elif case == "no transaction":
        del good.TransactionUID
    elif case == "no references":
        good.ReferencedSOPSequence = []
    elif case == "garbage":
        # An element whose length overruns the dataset: pynetdicom would not encode it, so our own client sends it.
        garbage = b"\x08\x00\x95\x11UI\xff\x7f1.2"
        assert asyncio.run(raw_n_action(server_with_peer.port, garbage, release_at_once=False)) == expected
        assert n_action(server_with_peer.port, action_information([(CT_IMAGE_STORAGE, generate_uid())]),
                        Reports()) == 0  # and the server goes on serving
        return
    elif case == "peer without the right":
        kwargs["calling_ae"] = "NORIGHT"
    assert n_action(server_with_peer.port, dataset, Reports(), **kwargs) == expected


def test_unknown_peer_gets_no_report_on_a_new_association(make_server: Callable[..., ServerHandle],
                                                          tmp_path: Path) -> None:
    server = make_server(server={"unknown_peer_rights": ["echo", "store", "storage_commitment"]},
                         commitment=FAST_REPORTS)
    files = ct_instances(tmp_path / "ct", 1)
    assert store(server.port, files) == [0]
    assert asyncio.run(raw_n_action(server.port, encoded(action_information([sop_uids(files[0])])),
                                    calling_ae="STRANGER")) == 0
    wait_for(lambda: "dropped" in server.log(), 30, what="the dropped report in the log")
    assert sop_uids(files[0])[1] not in server.log()  # UIDs only at debug level


@pytest.mark.slow
def test_orthanc_as_storage_commitment_scu(make_server: Callable[..., ServerHandle], tmp_path: Path) -> None:
    orthanc_port = free_port()
    server = make_server(peers={"orthanc": {"ae_title": "ORTHANC", "port": orthanc_port}}, commitment=FAST_REPORTS)
    orthanc = Orthanc(tmp_path / "orthanc", {"appliance": ["APPLIANCE", "127.0.0.1", server.port]}, port=orthanc_port)
    try:
        orthanc.start()
        files = ct_instances(tmp_path / "ct", 2)
        orthanc.upload(files)
        # Orthanc stores them to us, then asks us to commit them and one instance we never received.
        assert orthanc.rest("POST", "/modalities/appliance/store", {"Resources": _orthanc_ids(orthanc),
                                                                    "Synchronous": True}) is not None
        missing = generate_uid()
        body = {"DicomInstances": [{"SOPClassUID": c, "SOPInstanceUID": i} for c, i in map(sop_uids, files)]
                + [{"SOPClassUID": CT_IMAGE_STORAGE, "SOPInstanceUID": missing}]}
        job = orthanc.rest("POST", "/modalities/appliance/storage-commitment", body)
        result: dict[str, Any] = {}

        def done() -> bool:
            result.update(orthanc.rest("GET", job["Path"]))
            return result.get("Status") != "Pending"

        wait_for(done, 60, what="Orthanc's storage commitment report")
        assert result["Status"] == "Failure", result
        assert {s["SOPInstanceUID"] for s in result["Success"]} == {sop_uids(f)[1] for f in files}
        assert [(f["SOPInstanceUID"], f["FailureReason"]) for f in result["Failures"]] == [(missing, 0x0112)]
    finally:
        orthanc.stop()


def _orthanc_ids(orthanc: Orthanc) -> list[str]:
    return list(orthanc.rest("GET", "/instances"))


def test_a_report_pending_at_kill_9_is_sent_after_the_restart(make_server: Callable[..., ServerHandle], tmp_path: Path,
                                                               scu_scp_port: int) -> None:
    """The requester's listener is down when the report is due: the report waits between attempts when the server
    is killed. Once restarted (and the listener up), the request is taken up from the journal and reported."""
    server = make_server(peers={"scu": {"ae_title": SCU_AE, "port": scu_scp_port}},
                         commitment={**FAST_REPORTS, "report_attempts_max": 5, "report_retry_wait_s": 60.0})
    files = ct_instances(tmp_path / "ct", 2)
    assert store(server.port, files) == [0, 0]
    transaction = generate_uid()
    assert asyncio.run(raw_n_action(server.port, encoded(action_information([sop_uids(f) for f in files],
                                                                            transaction)))) == 0
    wait_for(lambda: "attempt 1 of 5" in server.log(), 30, what="the first failed report attempt")
    journal = server.root / "var/commitments"
    assert len(list(journal.glob("worker-*/*.json"))) == 1
    server.kill()
    reports = Reports()
    ae = AE(ae_title=SCU_AE)
    ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    listener = ae.start_server(("127.0.0.1", scu_scp_port), block=False,
                               evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler)])
    try:
        server.start()
        event_type, info, _ = reports.wait()
        assert (event_type, str(info.TransactionUID)) == (1, transaction)
        assert referenced(info) == {sop_uids(f)[1] for f in files}
        wait_for(lambda: not list(journal.glob("worker-*/*.json")), 10, what="the journal entry to go")
    finally:
        listener.shutdown()
