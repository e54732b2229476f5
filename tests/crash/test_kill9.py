"""kill -9 of the whole server (supervisor and workers) while four associations are storing: every instance that
was acknowledged with Success must survive byte-exact, `verify` must be clean, and an index rebuilt from the
blobs alone must equal the live index, table for table (receive times included).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage, Verification

from tests.conftest import ServerHandle, dataset_bytes, wait_for

CT = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
SENDERS = 4
PER_SENDER = 1000  # an upper bound: the kill comes long before

MakeServer = Callable[..., ServerHandle]


class Senders:
    """SENDERS pynetdicom associations in threads, each storing distinct small CT instances of one study.

    ``acked`` maps SOP Instance UID -> the dataset bytes sent, for every C-STORE answered with Success.
    A sender stops when its association goes away (the kill) or after PER_SENDER instances.
    """

    def __init__(self, server: ServerHandle, study_uid: str) -> None:
        self.server = server
        self.study_uid = study_uid
        self.acked: dict[str, bytes] = {}
        self.lock = threading.Lock()
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(SENDERS)]
        self.connected = threading.Barrier(SENDERS + 1, timeout=60)

    def start(self) -> None:
        for thread in self.threads:
            thread.start()
        self.connected.wait()  # every association is established before the caller starts its clock

    def running(self) -> int:
        return sum(t.is_alive() for t in self.threads)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(120)
            assert not thread.is_alive(), "a sender did not notice the server was gone"

    def _run(self, k: int) -> None:
        ae = AE(ae_title=f"CRASH{k}")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", self.server.port, ae_title="APPLIANCE")
        try:
            self.connected.wait()
        except threading.BrokenBarrierError:
            pass
        if not assoc.is_established:
            self.errors.append(f"sender {k}: association refused")
            return
        series_uid = generate_uid()
        ds = pydicom.dcmread(CT)  # one per thread (Dataset.copy() is shallow): changed in place for each send
        try:
            for i in range(PER_SENDER):
                ds.StudyInstanceUID = self.study_uid
                ds.SeriesInstanceUID = series_uid
                ds.SOPInstanceUID = generate_uid()
                ds.InstanceNumber = i + 1
                payload = encode(ds, False, True)
                try:
                    rsp = assoc.send_c_store(ds)
                except RuntimeError:  # the association is no longer established
                    return
                if "Status" not in rsp:  # no response: the association is gone
                    return
                if rsp.Status != 0x0000:
                    self.errors.append(f"sender {k}: status 0x{rsp.Status:04X}")
                    return
                with self.lock:
                    self.acked[ds.SOPInstanceUID] = bytes(payload)
        finally:
            if assoc.is_established:
                assoc.release()


def crash_round(server: ServerHandle, kill_after: int) -> dict[str, bytes]:
    """Start the senders, kill -9 the server once ``kill_after`` instances are acknowledged, restart it.
    Returns what was acknowledged."""
    senders = Senders(server, generate_uid())
    senders.start()
    wait_for(lambda: len(senders.acked) >= kill_after or not senders.running(), 120, interval=0.005,
             what=f"{kill_after} acknowledged instances")
    running = senders.running()
    server.kill()
    assert running == SENDERS, f"senders ended before the kill: {senders.errors}\n{server.log()[-3000:]}"
    senders.join()
    assert not senders.errors, senders.errors
    assert len(senders.acked) >= kill_after
    server.start()  # the same folders: recovery runs before the workers start
    return senders.acked


def assert_recovered(server: ServerHandle, acked: dict[str, bytes], tmp_path: Path) -> None:
    from appliance.index.db import StudyIndex

    volume = server.volume
    # Recovery dropped every unacknowledged partial file (the empty ones are tmp files created ahead of use).
    partial = [p.name for p in (volume / "tmp").iterdir() if p.stat().st_size > 0]
    assert partial == [], f"recovery left partial files in tmp/: {partial}"
    # Every acknowledged instance is there, byte for byte. One export per study (the CLI is a process each).
    out = tmp_path / f"export-{uuid.uuid4().hex}"
    index = StudyIndex(server.root / "var/index", readonly=True)
    try:
        study_of = {rec["SOPInstanceUID"]: key.split("\x00")[1] for key, rec in index.items("instances")}
    finally:
        index.close()
    missing = sorted(set(acked) - set(study_of))
    assert not missing, f"{len(missing)} acknowledged instance(s) lost, e.g. {missing[:3]}"
    for study in sorted({study_of[uid] for uid in acked}):
        server.cli("export", study, str(out))
    for uid, payload in acked.items():
        assert dataset_bytes(out / f"{uid}.dcm") == payload, f"{uid} differs from what was acknowledged"
    assert server.cli("verify").returncode == 0
    # The blobs alone give back the same index.
    rebuilt = tmp_path / f"rebuilt-{uuid.uuid4().hex}"
    server.cli("index", "rebuild", "--into", str(rebuilt))
    live_index = StudyIndex(server.root / "var/index", readonly=True)
    rebuilt_index = StudyIndex(rebuilt, readonly=True)
    try:
        live, again = live_index.dump(), rebuilt_index.dump()
    finally:
        live_index.close()
        rebuilt_index.close()
    assert live.keys() == again.keys()
    for table in live:
        if live[table] != again[table]:
            only_live = [row for row in live[table] if row not in again[table]]
            only_rebuilt = [row for row in again[table] if row not in live[table]]
            pytest.fail(f"table {table}: live has {len(live[table])} rows, rebuilt {len(again[table])}; "
                        f"only live: {only_live[:2]}; only rebuilt: {only_rebuilt[:2]}")


def assert_serving(server: ServerHandle) -> None:
    ae = AE(ae_title="AFTER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="APPLIANCE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def test_kill9_during_parallel_stores(make_server: MakeServer, tmp_path: Path) -> None:
    server = make_server(server={"workers": 2})
    acked = crash_round(server, kill_after=100)
    assert_serving(server)
    assert_recovered(server, acked, tmp_path)


@pytest.mark.slow
def test_kill9_repeatedly(make_server: MakeServer, tmp_path: Path) -> None:
    """Kills at different moments, on the same folders: right after the associations open, after a few
    instances, mid-stream; each restart recovers, and nothing acknowledged in any earlier round is lost."""
    server = make_server(server={"workers": 2})
    acked: dict[str, bytes] = {}
    for kill_after in (0, 1, 7, 60, 250, 500):
        acked.update(crash_round(server, kill_after))
        assert_serving(server)
        assert_recovered(server, acked, tmp_path)
