"""GroupCommitter: every submitted instance gets an answer, whatever breaks inside a commit, and the committer goes on
serving (an unanswered future is an association hanging until its modality times out)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from appliance import errors
from appliance.config import VolumeConfig
from appliance.index.db import StudyIndex
from appliance.store.commit import GroupCommitter, Submission
from appliance.store.segments import SegmentBackend
from appliance.store.spool import InstanceSpool, SpoolBudget
from appliance.store.volumes import init_volume, open_volume
from tests.unit.test_index import header


class BrokenMetrics:
    """Metrics whose commit() raises once: the index thread used to die on it."""

    def __init__(self) -> None:
        self.raised = 0

    def commit(self, *args: Any) -> None:
        if not self.raised:
            self.raised += 1
            raise RuntimeError("metrics backend gone")


class Rig:
    def __init__(self, tmp_path: Path, loop: asyncio.AbstractEventLoop, metrics: Any = None, **kw: Any) -> None:
        init_volume(tmp_path / "vol0", "vol0")
        self.volume = open_volume(VolumeConfig("vol0", tmp_path / "vol0", 0.999), create_missing=False)
        self.index = StudyIndex(tmp_path / "index")
        self.backend = SegmentBackend(self.volume, 1 << 20,
                                      on_create=lambda n, ns: self.index.register_container("vol0", n, ns))
        self.budget = SpoolBudget(1 << 20, 8 << 20)
        self.committer = GroupCommitter(self.index, "keep-first", loop, max_wait_ms=0.0, metrics=metrics, **kw)

    def submission(self, n: int, payload: bytes | None = None) -> Submission:
        spool = InstanceSpool(self.budget, self.volume.tmp, b"prefix")
        spool.write(payload if payload is not None else f"dataset {n}".encode())
        return Submission(spool, self.backend, header("P", "1.2.3", "1.2.3.4", f"1.2.3.4.{n}"),
                          "1.2.840.10008.1.2.1", n, "SCU")

    async def close(self) -> None:
        await asyncio.to_thread(self.committer.close)
        self.backend.close()
        self.index.close()


def test_an_exception_inside_a_commit_answers_the_batch_and_the_committer_goes_on(tmp_path: Path) -> None:
    async def scenario() -> None:
        rig = Rig(tmp_path, asyncio.get_running_loop(), BrokenMetrics())
        try:
            first = await asyncio.wait_for(rig.committer.submit(rig.submission(1)), 10)
            second = await asyncio.wait_for(rig.committer.submit(rig.submission(2)), 10)
        finally:
            await rig.close()
        assert first.status == errors.SUCCESS  # its answer was out before the metrics call failed
        assert second.status == errors.SUCCESS  # the committer is still alive

    asyncio.run(scenario())


def test_submit_after_close_is_refused_at_once_and_leaves_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        rig = Rig(tmp_path, asyncio.get_running_loop())
        ok = await asyncio.wait_for(rig.committer.submit(rig.submission(1)), 10)
        assert ok.status == errors.SUCCESS
        await asyncio.to_thread(rig.committer.close)
        late = await asyncio.wait_for(rig.committer.submit(rig.submission(2)), 10)
        assert late.status == errors.PROCESSING_FAILURE
        assert rig.budget.in_memory == 0  # the spool's memory went back
        rig.backend.close()
        rig.index.close()

    asyncio.run(scenario())


def test_a_full_queue_refuses_with_out_of_resources(tmp_path: Path) -> None:
    """The commit queue is bounded: past queue_max, an instance is refused (0xA700) instead of waiting in memory."""

    async def scenario() -> None:
        rig = Rig(tmp_path, asyncio.get_running_loop(), max_batch=1, queue_max=1)
        rig.committer.receiving = 1  # the writer waits for company: the queue fills
        futures = [rig.committer.submit(rig.submission(n)) for n in range(4)]
        rig.committer.receiving = 0
        results = await asyncio.wait_for(asyncio.gather(*futures), 10)
        await rig.close()
        statuses = [r.status for r in results]
        assert errors.OUT_OF_RESOURCES in statuses and errors.SUCCESS in statuses

    asyncio.run(scenario())


def test_a_large_instance_spills_and_is_appended_byte_exact(tmp_path: Path) -> None:
    async def scenario() -> None:
        rig = Rig(tmp_path, asyncio.get_running_loop())
        rig.budget = SpoolBudget(64 << 10, 1 << 20)
        payload = bytes(range(256)) * 4096  # 1 MiB: spills past 64 KiB
        sub = rig.submission(7, payload)
        assert not sub.spool.in_memory and rig.budget.in_memory == 0
        assert list((tmp_path / "vol0" / "tmp").iterdir())  # the spill file
        result = await asyncio.wait_for(rig.committer.submit(sub), 10)
        assert result.status == errors.SUCCESS
        assert not list((tmp_path / "vol0" / "tmp").iterdir())  # gone once appended
        (_key, rec), = rig.index.instances_under("1.2.3.4.7")
        blob = rig.index.blob(rec.digest)
        assert blob is not None
        assert rig.backend.read(blob.copies[0].location) == b"prefix" + payload
        await rig.close()

    asyncio.run(scenario())


def test_two_writer_lanes_write_two_segments_and_answer_everything(tmp_path: Path) -> None:
    """storage.writer_lanes = 2: each lane appends to a segment of its own; every instance is answered, indexed and
    read back byte-exact, whichever lane wrote it."""

    async def scenario() -> None:
        rig = Rig(tmp_path, asyncio.get_running_loop(), lanes=2)
        payloads = {n: f"lane payload {n}".encode() * 50 for n in range(40)}
        results = await asyncio.wait_for(asyncio.gather(
            *(rig.committer.submit(rig.submission(n, data)) for n, data in payloads.items())), 20)
        assert {r.status for r in results} == {errors.SUCCESS}
        await asyncio.to_thread(rig.committer.close)
        for n, data in payloads.items():
            ((_key, rec),) = rig.index.instances_under(f"1.2.3.4.{n}")
            blob = rig.index.blob(rec.digest)
            assert blob is not None and rig.backend.read(blob.copies[0].location) == b"prefix" + data
        assert list((tmp_path / "vol0" / "segments").glob("*.tar"))  # lane 0 reads what lane 1 wrote, by name
        rig.backend.close()
        rig.index.close()

    asyncio.run(scenario())


def test_receive_time_never_steps_back_within_a_worker(monkeypatch: Any) -> None:
    """An NTP step backwards must not make a later instance look older (receive time decides which version of a SOP
    instance wins)."""
    from appliance.services import store

    clock = iter([5_000, 3_000, 3_000, 9_000])
    monkeypatch.setattr(store, "_last_received_ns", 0)
    monkeypatch.setattr(store.time, "time_ns", lambda: next(clock))
    assert [store.receive_time_ns() for _ in range(4)] == [5_000, 5_001, 5_002, 9_000]
