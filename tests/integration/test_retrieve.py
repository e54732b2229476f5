"""C-MOVE and C-GET with real peers: DCMTK movescu/getscu/storescp, pynetdicom as SCU (C-CANCEL, abort, bad
input), another appliance as move destination. What arrives is compared, dataset for dataset, with the dataset
part of the stored blobs (read back through the appliance's own index and blob store)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from appliance.config import load_config
from appliance.index.db import StudyIndex
from appliance.index.records import part10_dataset_offset
from appliance.store.online import BlobStore
from bench.synth import write_folder
from tests.conftest import DCMTK_ENV, ServerHandle, dataset_bytes, dcmtk, free_port, wait_for

EXPLICIT, IMPLICIT, RLE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.5"
SYNTAX_NAMES = {"explicit": "none", "implicit": "implicit", "rle": "rle"}


@dataclass
class Stored:
    files: dict[str, list[Path]]  # syntax name -> Part-10 files
    studies: dict[str, str]  # syntax name -> Study Instance UID


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Stored:
    root = tmp_path_factory.mktemp("retrieve-data")
    files = {name: write_folder("ct", 3, 7, ts, root / name, size=64) for name, ts in SYNTAX_NAMES.items()}
    files["many"] = write_folder("mr", 24, 7, "none", root / "many", size=32)
    studies = {name: str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
               for name, paths in files.items()}
    return Stored(files, studies)


@dataclass
class Archive:
    server: ServerHandle
    dest_port: int
    data: Stored

    def stored(self) -> dict[str, bytes]:
        """SOP Instance UID -> the dataset part of its stored blob."""
        config = load_config(self.server.config_path)
        index = StudyIndex(config.storage.index_path, readonly=True)
        store = BlobStore.open(config)
        try:
            out = {}
            for key, rec in index.items("instances"):
                blob = index.blob(rec["digest"])
                assert blob is not None
                raw = store.read_all(rec["digest"], blob)
                out[key.rsplit("\x00", 1)[1]] = raw[part10_dataset_offset(raw[:65536])[0]:]
            return out
        finally:
            store.close()
            index.close()


def start_archive(make_server: Callable[..., ServerHandle], data: Stored, retrieve: dict[str, Any] | None = None,
                  dest_port: int | None = None, **peers: dict[str, Any]) -> Archive:
    dest_port = dest_port or free_port()
    handle = make_server(start=False, peers={
        "scu": {"ae_title": "SCU", "port": 1, "allow_receive": False},
        "dest": {"ae_title": "DEST", "port": dest_port},
        "norecv": {"ae_title": "NORECV", "port": dest_port, "allow_receive": False},
        "nobody": {"ae_title": "NOBODY", "port": free_port()},  # nothing listens there
        **peers,
    })
    settings = {"pending_interval_ms": 20, **(retrieve or {})}
    with open(handle.config_path, "a") as fh:
        fh.write("[retrieve]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
    handle.start()
    port = str(handle.port)
    for name, paths in data.files.items():
        extra = {"rle": ["-xr"], "implicit": ["-xi"]}.get(name, [])  # or storescu would send them as Explicit LE
        result = dcmtk("storescu", *extra, "-aec", "APPLIANCE", "127.0.0.1", port, *map(str, paths))
        assert result.returncode == 0, result.stderr
    return Archive(handle, dest_port, data)


@pytest.fixture
def archive(make_server: Callable[..., ServerHandle], data: Stored) -> Archive:
    return start_archive(make_server, data)


@pytest.fixture
def storescp(archive: Archive, tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Factory: start DCMTK storescp as DEST on the archive's destination port with ``options``; returns its
    output folder."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*options: str) -> Path:
        out = tmp_path / f"storescp{len(procs)}"
        out.mkdir()
        procs.append(subprocess.Popen(["storescp", *options, "-od", str(out), "-aet", "DEST", str(archive.dest_port)],
                                      env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(lambda: dcmtk("echoscu", "-aec", "DEST", "127.0.0.1", str(archive.dest_port)).returncode == 0, 30,
                 interval=0.05, what="storescp")
        return out

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def received(folder: Path) -> dict[str, Path]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in folder.iterdir()}


def movescu(archive: Archive, *keys: str, dest: str = "DEST", model: str = "-S") -> subprocess.CompletedProcess[str]:
    args = ["-v", "-aet", "SCU", "-aem", dest, "-aec", "APPLIANCE", model]
    for key in keys:
        args += ["-k", key]
    return dcmtk("movescu", *args, "127.0.0.1", str(archive.server.port))


def test_movescu_to_storescp_is_byte_exact_in_every_syntax(archive: Archive, storescp: Callable[..., Path]) -> None:
    out = storescp("+B", "+xa")  # bit-preserving, every transfer syntax accepted
    studies = "\\".join(archive.data.studies[name] for name in SYNTAX_NAMES)
    result = movescu(archive, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={studies}")
    assert result.returncode == 0 and "Final Move Response (Success)" in result.stderr, result.stderr
    got, stored = received(out), archive.stored()
    expected = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                for name in SYNTAX_NAMES for p in archive.data.files[name]}
    assert set(got) == expected
    for uid, path in got.items():
        assert dataset_bytes(path) == stored[uid], uid
    syntaxes = {str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in got.values()}
    assert syntaxes == {EXPLICIT, IMPLICIT, RLE}


def test_move_decompresses_for_a_destination_that_takes_only_uncompressed(archive: Archive,
                                                                           storescp: Callable[..., Path]) -> None:
    out = storescp()  # DCMTK's default: uncompressed syntaxes only
    result = movescu(archive, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={archive.data.studies['rle']}",
                     model="-P")
    assert result.returncode == 0 and "(Success)" in result.stderr, result.stderr
    got = received(out)
    originals = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, archive.data.files["rle"])}
    assert set(got) == set(originals)
    for uid, path in got.items():
        ds = pydicom.dcmread(path)
        assert not ds.file_meta.TransferSyntaxUID.is_compressed
        assert (ds.pixel_array == originals[uid].pixel_array).all()
        assert ds.StudyInstanceUID == originals[uid].StudyInstanceUID


def test_getscu_is_byte_exact_or_converted(archive: Archive, tmp_path: Path) -> None:
    stored = archive.stored()
    # getscu proposes one context per storage class, and we accept its first syntax: Explicit VR LE by default,
    # RLE with +xr. The implicit study then goes converted (valid, same pixels), the others as stored.
    for name, preference, syntax in (("explicit", "+xe", EXPLICIT), ("rle", "+xr", RLE),
                                     ("implicit", "+xe", EXPLICIT)):
        out = tmp_path / f"get-{name}"
        out.mkdir()
        series = str(pydicom.dcmread(archive.data.files[name][0]).SeriesInstanceUID)
        result = dcmtk("getscu", "-v", preference, "+B", "-aet", "SCU", "-aec", "APPLIANCE", "-S", "-od", str(out),
                       "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={archive.data.studies[name]}",
                       "-k", f"SeriesInstanceUID={series}", "127.0.0.1", str(archive.server.port))
        assert result.returncode == 0 and "Completed Suboperations : 3" in result.stderr, result.stderr
        got = received(out)
        assert len(got) == 3
        originals = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, archive.data.files[name])}
        for uid, path in got.items():
            ds = pydicom.dcmread(path)
            assert ds.file_meta.TransferSyntaxUID == syntax
            if name == "implicit":
                assert (ds.pixel_array == originals[uid].pixel_array).all() and ds.Rows == originals[uid].Rows
            else:
                assert dataset_bytes(path) == stored[uid], (name, uid)


def get_ae() -> AE:
    ae = AE(ae_title="SCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(Verification)
    for ts in (EXPLICIT, IMPLICIT, RLE):
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4", [ts])  # MR Image Storage, one context per syntax
        ae.add_requested_context(CTImageStorage, [ts])
    return ae


def study(uid: str, level: str = "STUDY") -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    ds.StudyInstanceUID = uid
    return ds


def roles() -> list[Any]:
    return [build_role(CTImageStorage, scp_role=True), build_role("1.2.840.10008.5.1.4.1.1.4", scp_role=True)]


def test_pynetdicom_get_and_cancel(archive: Archive) -> None:
    stored = archive.stored()
    got: dict[str, bytes] = {}
    cancel_after = 3
    holder: dict[str, Any] = {}

    def on_store(event: Any) -> int:
        got[str(event.request.AffectedSOPInstanceUID)] = bytes(event.request.DataSet.getvalue())
        if len(got) == cancel_after and "assoc" in holder:
            holder["assoc"].send_c_cancel(7, query_model=StudyRootQueryRetrieveInformationModelGet)
        return 0x0000

    ae = get_ae()
    assoc = ae.associate("127.0.0.1", archive.server.port, ae_title="APPLIANCE", ext_neg=roles(),
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        # Whole studies first: every instance as stored (one context per syntax: nothing converted).
        for name in SYNTAX_NAMES:
            responses = list(assoc.send_c_get(study(archive.data.studies[name]),
                                              StudyRootQueryRetrieveInformationModelGet))
            final = responses[-1][0]
            assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 3
        assert len(got) == 9 and all(got[uid] == stored[uid] for uid in got)
        got.clear()
        holder["assoc"] = assoc
        responses = list(assoc.send_c_get(study(archive.data.studies["many"]),
                                          StudyRootQueryRetrieveInformationModelGet, msg_id=7))
        final = responses[-1][0]
        assert final.Status == 0xFE00
        completed, remaining = final.NumberOfCompletedSuboperations, final.NumberOfRemainingSuboperations
        assert cancel_after <= completed < 24 and completed + remaining == 24 and len(got) == completed
        assert all(got[uid] == stored[uid] for uid in got)
        assert assoc.send_c_echo().Status == 0x0000  # the association is still usable
    finally:
        assoc.release()


def test_pynetdicom_move_with_cancel_to_a_slow_destination(make_server: Callable[..., ServerHandle],
                                                           data: Stored) -> None:
    dest = AE(ae_title="DEST")
    dest.add_supported_context("1.2.840.10008.5.1.4.1.1.4", [EXPLICIT, IMPLICIT])
    stored: list[tuple[str, str, int]] = []

    def on_store(event: Any) -> int:
        time.sleep(0.05)  # a slow destination (50 ms per store, not a wait for anything): the cancel lands mid-move
        rq = event.request
        stored.append((str(rq.AffectedSOPInstanceUID), str(rq.MoveOriginatorApplicationEntityTitle).strip(),
                       int(rq.MoveOriginatorMessageID)))
        return 0x0000

    port = free_port()
    scp = dest.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        archive = start_archive(make_server, data, dest_port=port, retrieve={"concurrent_max": 1})
        ae = AE(ae_title="SCU")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", archive.server.port, ae_title="APPLIANCE")
        statuses = []
        for status, _ident in assoc.send_c_move(study(data.studies["many"]), "DEST",
                                                StudyRootQueryRetrieveInformationModelMove, msg_id=9):
            statuses.append(status)
            if status.Status == 0xFF00 and len(statuses) == 1:
                # One retrieve at a time (retrieve.concurrent_max = 1): a second one meanwhile is refused.
                assert move_status(archive, study(data.studies["explicit"])).Status == 0xA702
                assoc.send_c_cancel(9, query_model=StudyRootQueryRetrieveInformationModelMove)
        assoc.release()
        final = statuses[-1]
        assert final.Status == 0xFE00, statuses
        completed, remaining = final.NumberOfCompletedSuboperations, final.NumberOfRemainingSuboperations
        assert 1 <= completed < 24 and completed + remaining == 24
        wait_for(lambda: len(stored) == completed, 10, what="the destination's last store")
        assert {(ae_title, msg) for _uid, ae_title, msg in stored} == {("SCU", 9)}
    finally:
        scp.shutdown()


def test_get_without_the_scp_role_fails_each_sub_operation(archive: Archive) -> None:
    assoc = get_ae().associate("127.0.0.1", archive.server.port, ae_title="APPLIANCE")  # no role selection
    try:
        final, identifier = list(assoc.send_c_get(study(archive.data.studies["explicit"]),
                                                  StudyRootQueryRetrieveInformationModelGet))[-1]
        assert final.Status == 0xB000 and final.NumberOfFailedSuboperations == 3
        assert final.ErrorComment.startswith("no accepted syntax")
        assert len(identifier.FailedSOPInstanceUIDList) == 3
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def move_status(archive: Archive, identifier: Dataset | bytes, dest: str = "DEST", calling: str = "SCU",
                model: str = StudyRootQueryRetrieveInformationModelMove) -> Dataset:
    ae = AE(ae_title=calling)
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", archive.server.port, ae_title="APPLIANCE")
    assert assoc.is_established
    try:
        return [status for status, _ in assoc.send_c_move(identifier, dest, model)][-1]
    finally:
        assoc.release()


def test_bad_moves_get_their_status_and_the_server_keeps_serving(archive: Archive) -> None:
    uid = archive.data.studies["explicit"]
    assert move_status(archive, study(uid), dest="NOSUCH").Status == 0xA801
    assert move_status(archive, study(uid), dest="NORECV").Status == 0xA801
    assert move_status(archive, study(uid), calling="STRANGER").Status == 0x0124  # no move right by default
    assert move_status(archive, study(uid, level="PATIENT")).Status == 0xA900  # no PATIENT level in Study Root
    assert move_status(archive, study(uid, level="IMAGE")).Status == 0xA900  # no SOPInstanceUID
    ds = Dataset()
    ds.QueryRetrieveLevel = "PATIENT"
    assert move_status(archive, ds, model=PatientRootQueryRetrieveInformationModelMove).Status == 0xA900
    nothing = move_status(archive, study("1.2.3.4.5"))
    assert nothing.Status == 0x0000 and nothing.NumberOfCompletedSuboperations == 0
    refused = move_status(archive, study(uid), dest="NOBODY")  # nothing listens on its port
    assert refused.Status == 0xA702 and "NOBODY" in refused.ErrorComment
    assert refused.NumberOfFailedSuboperations == 3
    log = archive.server.log()
    assert "Traceback" not in log and uid not in log.replace("DEBUG", "")  # no UIDs above debug level
    assert dcmtk("echoscu", "-aec", "APPLIANCE", "127.0.0.1", str(archive.server.port)).returncode == 0


def test_malformed_identifier_is_unable_to_process(archive: Archive) -> None:
    import asyncio

    from appliance.net import dimse
    from appliance.net.client import ClientAssociation

    async def send() -> dimse.Command:
        assoc = await ClientAssociation.open("127.0.0.1", archive.server.port, "APPLIANCE", "SCU",
                                             [(StudyRootQueryRetrieveInformationModelGet, [EXPLICIT])])
        try:
            command = dimse.encode_command([
                (dimse.AFFECTED_SOP_CLASS_UID, dimse.ui(StudyRootQueryRetrieveInformationModelGet)),
                (dimse.COMMAND_FIELD, dimse.us(dimse.C_GET_RQ)), (dimse.MESSAGE_ID, dimse.us(1)),
                (dimse.PRIORITY, dimse.us(0)), (dimse.COMMAND_DATA_SET_TYPE, dimse.us(0))])
            return await assoc.request(1, command, b"\x08\x00\x52\x00CS\x20\x00STUDY", 30)
        finally:
            await assoc.release()

    assert asyncio.run(send()).status == 0xC000


def test_appliance_moves_to_another_appliance(make_server: Callable[..., ServerHandle], data: Stored) -> None:
    other = make_server(server={"ae_title": "OTHER"})
    # One association per 2 instances (up to move_associations = 2): the 3 instances go over two at once.
    archive = start_archive(make_server, data, retrieve={"move_instances_per_association_min": 2},
                            other={"ae_title": "OTHER", "port": other.port},
                            misnamed={"ae_title": "MISNAMED", "port": other.port})
    # A destination that answers A-ASSOCIATE-RJ (the other appliance is not called MISNAMED): 0xA702, and why.
    refused = move_status(archive, study(data.studies["rle"]), dest="MISNAMED")
    assert refused.Status == 0xA702 and refused.NumberOfFailedSuboperations == 3
    assert refused.ErrorComment.startswith("MISNAMED rejected the association (1, 1, 7)")
    status = move_status(archive, study(data.studies["rle"]), dest="OTHER")
    assert status.Status == 0x0000 and status.NumberOfCompletedSuboperations == 3
    theirs = Archive(other, 0, data).stored()
    ours = archive.stored()
    assert len(theirs) == 3 and all(theirs[uid] == ours[uid] for uid in theirs)
    line = 'appliance_retrieve_suboperations_total{operation="C-MOVE",result="completed"} 3.0'
    wait_for(lambda: line in archive.server.metrics(), 10, interval=0.1, what="the retrieve metric")
    # The other appliance has no [peers]: our AE title is no label value there (docs/metrics.md, calling_ae).
    assert 'appliance_associations_total{calling_ae="unknown",result="accepted"} 2.0' in other.metrics()


def test_unreadable_instances_fail_with_their_uids_listed(make_server: Callable[..., ServerHandle],
                                                          data: Stored, tmp_path: Path) -> None:
    archive = start_archive(make_server, data)
    expected = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in data.files["explicit"]}
    for segment in (archive.server.volume / "segments").glob("*.tar"):
        os.truncate(segment, 0)  # every copy gone (as a lost disk would leave them): nothing readable
    ae = AE(ae_title="SCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", archive.server.port, ae_title="APPLIANCE")
    try:
        final, identifier = list(assoc.send_c_move(study(data.studies["explicit"]), "NORECV",
                                                   StudyRootQueryRetrieveInformationModelMove))[-1]
        assert final.Status == 0xA801  # the destination is checked before anything is read
        final, identifier = list(assoc.send_c_move(study(data.studies["explicit"]), "NOBODY",
                                                   StudyRootQueryRetrieveInformationModelMove))[-1]
        assert final.Status == 0xA702 and final.NumberOfFailedSuboperations == 3
    finally:
        assoc.release()
    # C-GET: the association is there, the bytes are not: every sub-operation fails, named in the identifier.
    ae = get_ae()
    assoc = ae.associate("127.0.0.1", archive.server.port, ae_title="APPLIANCE", ext_neg=roles(),
                         evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
    try:
        final, identifier = list(assoc.send_c_get(study(data.studies["explicit"]),
                                                  StudyRootQueryRetrieveInformationModelGet))[-1]
    finally:
        assoc.release()
    assert final.Status == 0xB000 and final.NumberOfFailedSuboperations == 3
    assert "not readable" in final.ErrorComment
    assert set(identifier.FailedSOPInstanceUIDList) == expected
    assert dcmtk("echoscu", "-aec", "APPLIANCE", "127.0.0.1", str(archive.server.port)).returncode == 0


def test_large_instances_stream_and_the_conversion_limit_holds(make_server: Callable[..., ServerHandle],
                                                               data: Stored, tmp_path: Path) -> None:
    big = write_folder("ct", 2, 11, "none", tmp_path / "big", size=1100)  # ~2.4 MB each: three backend reads
    archive = start_archive(make_server, data, retrieve={"transcode_bytes_max": 4096})
    result = dcmtk("storescu", "-aec", "APPLIANCE", "127.0.0.1", str(archive.server.port), *map(str, big))
    assert result.returncode == 0, result.stderr
    stored = archive.stored()
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in big}
    assert all(len(stored[uid]) > 2 << 20 for uid in uids)
    out = tmp_path / "dest"
    out.mkdir()
    proc = subprocess.Popen(["storescp", "+B", "-od", str(out), "-aet", "DEST", str(archive.dest_port)],
                            env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: dcmtk("echoscu", "-aec", "DEST", "127.0.0.1", str(archive.dest_port)).returncode == 0, 30,
                 interval=0.05, what="storescp")
        big_study = str(pydicom.dcmread(big[0], stop_before_pixels=True).StudyInstanceUID)
        assert move_status(archive, study(big_study)).Status == 0x0000
        got = received(out)
        assert set(got) == uids and all(dataset_bytes(got[uid]) == stored[uid] for uid in uids)
        fetched: dict[str, bytes] = {}

        def on_store(event: Any) -> int:
            fetched[str(event.request.AffectedSOPInstanceUID)] = bytes(event.request.DataSet.getvalue())
            return 0x0000

        assoc = get_ae().associate("127.0.0.1", archive.server.port, ae_title="APPLIANCE", ext_neg=roles(),
                                   evt_handlers=[(evt.EVT_C_STORE, on_store)])
        try:
            final = list(assoc.send_c_get(study(big_study), StudyRootQueryRetrieveInformationModelGet))[-1][0]
        finally:
            assoc.release()
        assert final.Status == 0x0000 and fetched == {uid: stored[uid] for uid in uids}
        # The RLE study would need converting for this storescp, and it is above transcode_bytes_max: it fails.
        status = move_status(archive, study(data.studies["rle"]))
        assert status.Status == 0xB000 and status.NumberOfFailedSuboperations == 3
        assert "transcode_bytes_max" in status.ErrorComment
    finally:
        proc.terminate()
        proc.wait(10)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_association_aborted_mid_get_leaks_nothing(archive: Archive) -> None:
    (worker,) = archive.server.worker_pids()
    seen = threading.Event()
    slow = threading.Event()
    aborted = threading.Event()

    def on_store(event: Any) -> int:
        seen.set()
        if slow.is_set():
            slow.clear()
            aborted.wait(10)  # keep the C-GET in the middle until the requester has aborted
        return 0x0000

    def get_then(abort: bool) -> None:
        ae = get_ae()
        ae.dimse_timeout = 2  # pynetdicom's C-GET loop waits this long for a message once the association is gone
        assoc = ae.associate("127.0.0.1", archive.server.port, ae_title="APPLIANCE", ext_neg=roles(),
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
        runner = threading.Thread(target=lambda: list(assoc.send_c_get(
            study(archive.data.studies["many"]), StudyRootQueryRetrieveInformationModelGet)))
        runner.start()
        assert seen.wait(10)
        if abort:
            assoc.abort()
            aborted.set()
        runner.join(10)
        if not abort:
            assoc.release()

    get_then(False)  # warm up: the reader threads exist from now on
    fds, threads = _fds(worker), _threads(worker)
    seen.clear()
    slow.set()
    t0 = time.monotonic()
    get_then(True)
    assert time.monotonic() - t0 < 10
    wait_for(lambda: _fds(worker) <= fds and _threads(worker) <= threads, 10, what="the worker to let go")
    assert dcmtk("echoscu", "-aec", "APPLIANCE", "127.0.0.1", str(archive.server.port)).returncode == 0
    assert "Traceback" not in archive.server.log()


class Orthanc:
    """Orthanc on free ports with a generated config (as bench/receivers.py starts it), driven by its REST API."""

    def __init__(self, workdir: Path, appliance_port: int) -> None:
        import json

        from bench.receivers import orthanc_binary

        binary = orthanc_binary()
        if binary is None:
            pytest.fail("Orthanc is not installed (make peers installs it)")
        self.port, self.http_port = free_port(), free_port()
        config = {
            "Name": "retrieve-test", "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"), "DicomAet": "ORTHANC", "DicomPort": self.port,
            "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "Plugins": [], "SaveJobs": False, "DicomCheckCalledAet": False,
            "DicomModalities": {"appliance": ["APPLIANCE", "127.0.0.1", appliance_port]},
        }
        path = workdir / "orthanc.json"
        path.write_text(json.dumps(config))
        self.log = open(workdir / "orthanc.log", "wb")
        self.proc = subprocess.Popen([binary, str(path)], stdout=self.log, stderr=subprocess.STDOUT, env=DCMTK_ENV)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"Orthanc exited {self.proc.returncode}")
            try:
                self.rest("GET", "/system")
                return True
            except OSError:
                return False

        wait_for(up, 60, interval=0.1, what="Orthanc's REST API")

    def rest(self, method: str, path: str, body: Any = None) -> Any:
        import json
        import urllib.request

        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        with urllib.request.urlopen(request, timeout=60) as response:
            raw = response.read()
        return json.loads(raw) if raw[:1] in (b"{", b"[") else raw

    def instances(self) -> dict[str, bytes]:
        """SOP Instance UID -> the dataset part of the file Orthanc stored."""
        out = {}
        for oid in self.rest("GET", "/instances"):
            raw = self.rest("GET", f"/instances/{oid}/file")
            uid = self.rest("GET", f"/instances/{oid}/simplified-tags")["SOPInstanceUID"]
            out[uid] = raw[part10_dataset_offset(raw[:65536])[0]:]
        return out

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


@pytest.mark.slow
def test_orthanc_pulls_from_us_and_we_move_to_orthanc(make_server: Callable[..., ServerHandle], data: Stored,
                                                      tmp_path: Path) -> None:
    appliance_port = free_port()
    orthanc_dir = tmp_path / "orthanc"
    orthanc_dir.mkdir()
    orthanc = Orthanc(orthanc_dir, appliance_port)
    try:
        handle = make_server(start=False, server={"port": appliance_port}, peers={
            "orthanc": {"ae_title": "ORTHANC", "port": orthanc.port}})
        handle.start()
        archive = Archive(handle, 0, data)
        for name in ("explicit", "rle"):
            extra = ["-xr"] if name == "rle" else []
            result = dcmtk("storescu", *extra, "-aec", "APPLIANCE", "127.0.0.1", str(handle.port),
                           *map(str, data.files[name]))
            assert result.returncode == 0, result.stderr
        stored = archive.stored()
        # Orthanc pulls: its C-MOVE SCU asks us to send the study to itself.
        orthanc.rest("POST", "/modalities/appliance/move", {
            "Level": "Study", "Resources": [{"StudyInstanceUID": data.studies["explicit"]}], "TargetAet": "ORTHANC"})
        theirs = orthanc.instances()
        assert len(theirs) == 3 and all(theirs[uid] == stored[uid] for uid in theirs)
        # We move to Orthanc, driven by DCMTK movescu (the RLE study goes as stored: Orthanc accepts RLE).
        result = dcmtk("movescu", "-v", "-aet", "ORTHANC", "-aem", "ORTHANC", "-aec", "APPLIANCE", "-S",
                       "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={data.studies['rle']}",
                       "127.0.0.1", str(handle.port))
        assert result.returncode == 0 and "(Success)" in result.stderr, result.stderr
        theirs = orthanc.instances()
        assert len(theirs) == 6 and all(theirs[uid] == stored[uid] for uid in theirs)
    finally:
        orthanc.stop()
