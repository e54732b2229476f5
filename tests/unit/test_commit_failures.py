"""Every failure branch of the group commit answers every waiting submission, and leaves the committer serving, or
fail-stopped where the contract (store/commit.py) says so: a failed fdatasync or an LMDB I/O error stops
everything (nothing of the group acknowledged, every later submission refused, ``on_fault`` called once); an
ordinary index error refuses its batch with 0xC211 and the next batch succeeds; a volume that cannot take one
instance (ENOSPC mid-append, a segment that cannot be created) refuses that instance with 0xA700, leaves nothing
half-written, and the rest of the group succeeds. Faults are injected with monkeypatch.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import tarfile
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import lmdb
import pytest

from appliance import errors
from appliance.config import VolumeConfig
from appliance.errors import OutOfSpace
from appliance.index.db import StudyIndex
from appliance.store.commit import CommitResult, GroupCommitter, Submission
from appliance.store.segments import SegmentBackend
from appliance.store.spool import InstanceSpool, SpoolBudget
from appliance.store.volumes import init_volume, open_volume
from tests.unit.test_index import header

SUCCESS, REFUSED, FAILED = errors.SUCCESS, errors.OUT_OF_RESOURCES, errors.PROCESSING_FAILURE


class Rig:
    """A real committer on a temp volume. Groups are formed deterministically: with ``receiving`` set, the writer
    waits (up to max_wait_ms) until ``max_batch`` instances are queued."""

    def __init__(self, tmp_path: Path, loop: asyncio.AbstractEventLoop, group: int = 3,
                 on_create: Callable[[str, int], None] | None = None) -> None:
        init_volume(tmp_path / "vol0", "vol0")
        self.volume = open_volume(VolumeConfig("vol0", tmp_path / "vol0", 0.999), create_missing=False)
        self.index = StudyIndex(tmp_path / "index")
        self.faults: list[str] = []
        self.backend = SegmentBackend(self.volume, 1 << 20, on_create=on_create or self.register)
        self.budget = SpoolBudget(1 << 20, 8 << 20)
        self.committer = GroupCommitter(self.index, "keep-first", loop, max_batch=group, max_wait_ms=10_000,
                                        on_fault=self.faults.append)
        self.payloads: dict[int, bytes] = {}
        self.sizes: dict[int, int] = {}  # per-instance payload size, where it matters

    def register(self, name: str, ns: int) -> None:
        self.index.register_container("vol0", name, ns)

    def submission(self, n: int, size: int = 3000) -> Submission:
        size = self.sizes.get(n, size)
        payload = (f"dataset {n} ".encode() * (size // 8 + 1))[:size]
        self.payloads[n] = payload
        spool = InstanceSpool(self.budget, self.volume.tmp, b"")
        spool.write(payload)
        return Submission(spool, self.backend, header("P", "1.2.3", "1.2.3.4", f"1.2.3.4.{n}"),
                          "1.2.840.10008.1.2.1", n, "SCU")

    def submit_group(self, numbers: list[int], **kw: Any) -> list[asyncio.Future[CommitResult]]:
        """Hand over ``numbers`` as one group (the writer takes them together)."""
        self.committer.receiving = 1
        futures = [self.committer.submit(self.submission(n, **kw)) for n in numbers]
        self.committer.receiving = 0
        return futures

    async def group(self, numbers: list[int], **kw: Any) -> list[int]:
        results = await asyncio.wait_for(asyncio.gather(*self.submit_group(numbers, **kw)), 10)
        return [r.status for r in results]

    async def one(self, n: int) -> int:
        self.committer.receiving = 0
        return (await asyncio.wait_for(self.committer.submit(self.submission(n)), 10)).status

    def stored(self, n: int) -> bytes | None:
        found = self.index.instances_under(f"1.2.3.4.{n}")
        if not found:
            return None
        blob = self.index.blob(found[0][1].digest)
        assert blob is not None
        return self.backend.read(blob.copies[0].location)

    def segment_files(self) -> list[Path]:
        return sorted(Path(self.backend.dir).glob("*.tar"))

    async def close(self) -> None:
        await asyncio.to_thread(self.committer.close)
        self.backend.close()
        self.index.close()


def run(tmp_path: Path, scenario: Callable[[Rig], Awaitable[None]], **kw: Any) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, asyncio.get_running_loop(), **kw)
        try:
            await scenario(rig)
        finally:
            await rig.close()

    asyncio.run(main())


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def segment_fd(fd: int, rig: Rig) -> bool:
    return os.readlink(f"/proc/self/fd/{fd}").startswith(os.path.realpath(rig.backend.dir))


# ---- index errors ---------------------------------------------------------------------------------------


def test_an_ordinary_index_error_refuses_the_batch_with_c211_and_the_next_batch_succeeds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(rig: Rig) -> None:
        real_apply, calls = rig.index.apply, []

        def apply(*args: Any, **kw: Any) -> Any:
            calls.append(1)
            if len(calls) == 1:
                raise ValueError("an index bug")
            return real_apply(*args, **kw)

        monkeypatch.setattr(rig.index, "apply", apply)
        assert await rig.group([1, 2, 3]) == [FAILED] * 3
        assert await rig.group([4, 5, 6]) == [SUCCESS] * 3
        assert [rig.stored(n) for n in (1, 2, 3)] == [None] * 3
        assert [rig.stored(n) for n in (4, 5, 6)] == [rig.payloads[n] for n in (4, 5, 6)]
        assert rig.faults == [] and rig.committer.fault is None

    run(tmp_path, scenario)


def test_an_lmdb_disk_error_fail_stops_the_batch_the_queued_groups_and_every_later_submission(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(rig: Rig) -> None:
        entered, release, calls = threading.Event(), threading.Event(), []

        def apply(*args: Any, **kw: Any) -> Any:
            calls.append(1)
            entered.set()
            release.wait(10)
            raise lmdb.DiskError("disk gone")

        monkeypatch.setattr(rig.index, "apply", apply)
        first = rig.submit_group([1, 2, 3])
        await until(entered.is_set, "the first commit")
        second = rig.submit_group([4, 5, 6])  # appended and synced while the first commit hangs
        await until(lambda: bool(rig.committer._durable), "the second group to be durable")
        release.set()
        results = await asyncio.wait_for(asyncio.gather(*first, *second), 10)
        assert [r.status for r in results] == [REFUSED] * 6
        assert await rig.one(7) == REFUSED
        await asyncio.to_thread(rig.committer.close)  # both threads done: every on_fault call has been scheduled
        await asyncio.sleep(0)
        assert len(rig.faults) == 1
        assert len(calls) == 1, "after a fatal LMDB error the index must not be written again"

    run(tmp_path, scenario)


# ---- sync errors ------------------------------------------------------------------------------------------


def test_a_failed_fdatasync_acknowledges_nothing_and_writes_nothing_more(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Group 1's fdatasync fails while group 2 waits behind it: both are refused, group 2 is never appended
    (after a failed flush nothing more is written to that disk), the index is never written, on_fault once."""

    async def scenario(rig: Rig) -> None:
        real_sync, real_pwritev = os.fdatasync, os.pwritev
        entered, release = threading.Event(), threading.Event()
        applied: list[int] = []
        writes: list[int] = []

        def apply(entries: Any, *args: Any, **kw: Any) -> Any:
            applied.append(len(entries))
            raise AssertionError("the index must not be written")

        def pwritev(fd: int, buffers: Any, offset: int, *rest: Any) -> int:
            writes.append(offset)
            return int(real_pwritev(fd, buffers, offset, *rest))

        def fdatasync(fd: int) -> None:
            if segment_fd(fd, rig):
                entered.set()
                release.wait(10)
                raise OSError(errno.EIO, "Input/output error")
            real_sync(fd)

        monkeypatch.setattr(rig.index, "apply", apply)
        monkeypatch.setattr(os, "fdatasync", fdatasync)
        monkeypatch.setattr(os, "pwritev", pwritev)
        first = rig.submit_group([1, 2, 3])
        await until(entered.is_set, "the first sync")
        written_before_fault = len(writes)
        second = rig.submit_group([4, 5, 6])
        release.set()
        results = await asyncio.wait_for(asyncio.gather(*first, *second), 10)
        assert [r.status for r in results] == [REFUSED] * 6
        assert await rig.one(7) == REFUSED
        await asyncio.to_thread(rig.committer.close)
        await asyncio.sleep(0)
        assert len(rig.faults) == 1 and "fdatasync" in rig.faults[0]
        assert applied == []
        assert len(writes) == written_before_fault, "instances were appended after the storage fault"
        assert rig.budget.in_memory == 0
        monkeypatch.undo()
        assert [rig.stored(n) for n in range(1, 8)] == [None] * 7

    run(tmp_path, scenario)


# ---- ENOSPC in the middle of an append ------------------------------------------------------------------------


def torn_pwritev(monkeypatch: pytest.MonkeyPatch, fail_call: int) -> list[int]:
    """pwritev whose ``fail_call``-th call writes half of its bytes, then fails with ENOSPC (a disk filling up in
    the middle of a record)."""
    real, calls = os.pwritev, []

    def pwritev(fd: int, buffers: Any, offset: int, *rest: Any) -> int:
        calls.append(offset)
        if len(calls) == fail_call:
            data = b"".join(bytes(b) for b in buffers)
            real(fd, [data[: len(data) // 2]], offset)
            raise OSError(errno.ENOSPC, "No space left on device")
        return int(real(fd, buffers, offset, *rest))

    monkeypatch.setattr(os, "pwritev", pwritev)
    return calls


def members(path: Path) -> list[str]:
    with tarfile.open(path) as archive:
        return [m.name for m in archive.getmembers()]


def digest_name(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest() + ".dcm"


def test_enospc_mid_append_refuses_that_instance_truncates_it_away_and_the_others_succeed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(rig: Rig) -> None:
        torn_pwritev(monkeypatch, fail_call=2)
        rig.sizes = {2: 20_000}  # the torn half of record 2 reaches beyond record 3, which overwrites its start
        assert await rig.group([1, 2, 3]) == [SUCCESS, REFUSED, SUCCESS]
        assert [rig.stored(n) for n in (1, 3)] == [rig.payloads[1], rig.payloads[3]]
        assert rig.stored(2) is None
        (segment,) = rig.segment_files()
        container = rig.index.container("vol0", segment.name)
        assert container is not None and segment.stat().st_size == container.end  # no torn byte left behind
        assert members(segment) == [digest_name(rig.payloads[1]), digest_name(rig.payloads[3])]
        assert rig.budget.in_memory == 0  # the refused instance's memory went back too
        assert await rig.group([4, 5, 6]) == [SUCCESS] * 3

    run(tmp_path, scenario)


def test_enospc_mid_append_with_a_failing_truncate_still_leaves_every_acknowledged_record_intact(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(rig: Rig) -> None:
        torn_pwritev(monkeypatch, fail_call=2)

        def ftruncate(fd: int, length: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "ftruncate", ftruncate)
        rig.sizes = {2: 20_000, 3: 100}  # the torn half of record 2 reaches beyond record 3, which follows it
        assert await rig.group([1, 2, 3]) == [SUCCESS, REFUSED, SUCCESS]
        assert [rig.stored(n) for n in (1, 3)] == [rig.payloads[1], rig.payloads[3]]
        monkeypatch.undo()
        # The torn bytes beyond the committed end are what recovery removes at the next start.
        (segment,) = rig.segment_files()
        container = rig.index.container("vol0", segment.name)
        assert container is not None and segment.stat().st_size > container.end  # torn bytes left behind
        fresh = SegmentBackend(rig.volume, 1 << 20)
        fresh.recover(lambda name: container.end if name == segment.name else None)
        fresh.close()
        assert members(segment) == [digest_name(rig.payloads[1]), digest_name(rig.payloads[3])]

    run(tmp_path, scenario)


def test_enospc_while_copying_a_spill_file_refuses_that_instance_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(rig: Rig) -> None:
        rig.budget = SpoolBudget(1024, 1024)  # every instance below spills to a file, copied by copy_file_range
        real, calls = os.copy_file_range, []

        def copy_file_range(src: int, dst: int, count: int, offset_src: int | None = None,
                            offset_dst: int | None = None) -> int:
            calls.append(count)
            if len(calls) == 2:
                real(src, dst, count // 2, offset_src, offset_dst)
                raise OSError(errno.ENOSPC, "No space left on device")
            return int(real(src, dst, count, offset_src, offset_dst))

        monkeypatch.setattr(os, "copy_file_range", copy_file_range)
        assert await rig.group([1, 2, 3], size=50_000) == [SUCCESS, REFUSED, SUCCESS]
        assert [rig.stored(n) for n in (1, 2, 3)] == [rig.payloads[1], None, rig.payloads[3]]
        (segment,) = rig.segment_files()
        container = rig.index.container("vol0", segment.name)
        assert container is not None and segment.stat().st_size == container.end
        assert os.listdir(rig.volume.tmp) == []  # every spill file removed, refused or appended

    run(tmp_path, scenario)


# ---- segment creation ----------------------------------------------------------------------------------------


def test_a_segment_that_cannot_be_created_refuses_that_instance_and_the_next_one_retries(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(rig: Rig) -> None:
        real, failed = os.open, list[str]()

        def fake_open(path: Any, flags: int, *args: Any, **kw: Any) -> int:
            if str(path).endswith(".tar") and flags & os.O_CREAT and not failed:
                failed.append(str(path))
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, flags, *args, **kw)

        monkeypatch.setattr(os, "open", fake_open)
        assert await rig.group([1, 2, 3]) == [REFUSED, SUCCESS, SUCCESS]
        assert failed and not os.path.exists(failed[0])
        assert [rig.stored(n) for n in (2, 3)] == [rig.payloads[2], rig.payloads[3]]
        assert rig.budget.in_memory == 0
        assert rig.faults == []

    run(tmp_path, scenario)


def test_a_failing_segment_registration_answers_the_whole_group_and_leaves_no_file(tmp_path: Path) -> None:
    attempts: list[str] = []

    async def scenario(rig: Rig) -> None:
        assert await rig.group([1, 2, 3]) == [FAILED] * 3
        assert rig.segment_files() == []  # the segment the index could not register was removed
        assert await rig.group([4, 5, 6]) == [SUCCESS] * 3
        assert len(rig.segment_files()) == 1
        assert rig.faults == []

    def on_create(name: str, ns: int) -> None:
        attempts.append(name)
        if len(attempts) == 1:
            raise lmdb.MapFullError("cannot register")
        holder[0].register(name, ns)

    holder: list[Rig] = []

    async def wrapped(rig: Rig) -> None:
        holder.append(rig)
        await scenario(rig)

    run(tmp_path, wrapped, on_create=on_create)


def test_a_failing_segment_registration_returns_every_spool_of_the_group(tmp_path: Path) -> None:
    holder: list[Rig] = []
    attempts: list[str] = []

    def on_create(name: str, ns: int) -> None:
        attempts.append(name)
        if len(attempts) == 1:
            raise lmdb.MapFullError("cannot register")
        holder[0].register(name, ns)

    async def scenario(rig: Rig) -> None:
        holder.append(rig)
        assert await rig.group([1, 2, 3]) == [FAILED] * 3
        await until(lambda: rig.budget.in_memory == 0, "the group's spool memory to be returned", timeout=2)

    run(tmp_path, scenario, on_create=on_create)


# ---- spooling ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("when", ["spilling", "after-spill"])
def test_enospc_while_spooling_raises_out_of_space_removes_the_spill_file_and_returns_the_budget(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    budget = SpoolBudget(64 << 10, 1 << 20)
    spool = InstanceSpool(budget, str(tmp_path), b"P" * 1000)
    spool.write(b"x" * 10_000)
    assert budget.in_memory == 11_000
    if when == "after-spill":
        spool.write(b"y" * 100_000)  # spills past 64 KiB
        assert not spool.in_memory and budget.in_memory == 0 and len(os.listdir(tmp_path)) == 1
    real = os.write

    def write(fd: int, data: Any) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path)):
            real(fd, bytes(data)[:100])  # a short write first, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(OutOfSpace) as raised:
        spool.write(b"z" * 200_000)
    monkeypatch.undo()
    assert raised.value.status == errors.OUT_OF_RESOURCES
    assert os.listdir(tmp_path) == []
    assert budget.in_memory == 0
    assert spool.fileno() is None
    spool.discard()  # idempotent after the failure
    assert budget.in_memory == 0


def test_a_refused_spill_file_is_not_left_in_tmp_by_the_committer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    """A spilled instance refused at append time (ENOSPC) loses its spill file like an appended one."""

    async def scenario(rig: Rig) -> None:
        rig.budget = SpoolBudget(1024, 1024)
        torn_pwritev(monkeypatch, fail_call=1)  # the first record's header write fails
        assert await rig.group([1, 2], size=20_000) == [REFUSED, SUCCESS]
        assert os.listdir(rig.volume.tmp) == []
        assert rig.stored(2) == rig.payloads[2]

    run(tmp_path, scenario, group=2)
