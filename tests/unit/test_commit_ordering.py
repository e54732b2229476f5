"""The durability order of the group commit, per instance: its bytes are appended, then fdatasync'd (by the
backend's sync), then an index transaction that names it commits, and only then is its future answered Success.

A recorder wraps the three seams (os.fdatasync for the segment files, StudyIndex.apply, the futures' done
callbacks) and stamps every event from one counter, so a missing or misordered step of any instance fails the test,
whatever the thread timing. Several submitters run concurrently, in small groups, so the writer/indexer pipeline
overlaps groups.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from appliance import errors
from appliance.config import VolumeConfig
from appliance.index.db import IndexEntry, StudyIndex
from appliance.store.commit import CommitResult, GroupCommitter, Submission
from appliance.store.segments import SegmentBackend, parse_location
from appliance.store.spool import InstanceSpool, SpoolBudget
from appliance.store.volumes import init_volume, open_volume
from tests.unit.test_index import header


@dataclass
class Recorder:
    seq: Callable[[], int] = field(default_factory=lambda: itertools.count().__next__)
    lock: threading.Lock = field(default_factory=threading.Lock)
    put: dict[str, tuple[int, str]] = field(default_factory=dict)  # digest -> (seq, segment path)
    syncs: list[tuple[int, int, str]] = field(default_factory=list)  # (start seq, end seq, path) per fdatasync
    backend_syncs: list[tuple[int, int]] = field(default_factory=list)
    applies: list[tuple[int, int, set[str]]] = field(default_factory=list)  # (start, end, digests named)
    answers: dict[str, tuple[int, int]] = field(default_factory=dict)  # digest -> (seq, status)

    def stamp(self) -> int:
        with self.lock:
            return self.seq()


def build(tmp_path: Path, loop: asyncio.AbstractEventLoop, rec: Recorder, monkeypatch: pytest.MonkeyPatch
          ) -> tuple[GroupCommitter, SegmentBackend, StudyIndex]:
    init_volume(tmp_path / "vol0", "vol0")
    volume = open_volume(VolumeConfig("vol0", tmp_path / "vol0", 0.999), create_missing=False)
    index = StudyIndex(tmp_path / "index")
    backend = SegmentBackend(volume, 1 << 20, on_create=lambda n, ns: index.register_container("vol0", n, ns))
    seg_dir = os.path.realpath(backend.dir)

    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        start = rec.stamp()
        real_fdatasync(fd)
        if path.startswith(seg_dir):
            rec.syncs.append((start, rec.stamp(), path))

    # os.fdatasync is looked up at call time by segments.py: the recorder sees the flush itself, so a sync()
    # that skips it (or flushes another file) leaves the instance without a covering sync.
    monkeypatch.setattr(os, "fdatasync", fdatasync)

    real_put, real_sync = backend.put, backend.sync

    def put(meta: Any, source: Any) -> str:
        location = real_put(meta, source)
        rec.put[meta.digest] = (rec.stamp(), os.path.join(seg_dir, parse_location(location)[0]))
        return location

    def sync() -> None:
        start = rec.stamp()
        real_sync()
        rec.backend_syncs.append((start, rec.stamp()))

    monkeypatch.setattr(backend, "put", put)
    monkeypatch.setattr(backend, "sync", sync)

    real_apply = index.apply

    def apply(entries: list[IndexEntry], *args: Any, **kw: Any) -> Any:
        # A round trip through the event loop first: any answer already scheduled (an answer sent before this
        # commit) runs, and is stamped, before the commit starts, whatever the thread timing.
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result(10)
        start = rec.stamp()
        result = real_apply(entries, *args, **kw)
        rec.applies.append((start, rec.stamp(), {e.digest for e in entries}))
        return result

    monkeypatch.setattr(index, "apply", apply)
    committer = GroupCommitter(index, "keep-first", loop, max_batch=4, max_wait_ms=0.0)
    return committer, backend, index


def submission(budget: SpoolBudget, backend: SegmentBackend, n: int) -> Submission:
    spool = InstanceSpool(budget, backend.volume.tmp, b"")
    spool.write(f"instance {n} ".encode() * (50 + n))
    return Submission(spool, backend, header("P", "1.2.3", "1.2.3.4", f"1.2.3.4.{n}"), "1.2.840.10008.1.2.1", n, "SCU")


def check_order(rec: Recorder, digests: list[str]) -> list[str]:
    problems = []
    for d in digests:
        answer = rec.answers.get(d)
        if answer is None:
            problems.append(f"{d[:8]}: never answered")
            continue
        answered_at, status = answer
        if status != errors.SUCCESS:
            problems.append(f"{d[:8]}: answered {status:#06x}")
            continue
        if d not in rec.put:
            problems.append(f"{d[:8]}: Success without an append")
            continue
        put_at, path = rec.put[d]
        commits = [(s, e) for s, e, named in rec.applies if d in named]
        if not commits:
            problems.append(f"{d[:8]}: Success without an index commit naming it")
            continue
        commit_start, commit_end = commits[0]
        covering = [e for s, e, p in rec.syncs if p == path and s > put_at and e < commit_start]
        if not covering:
            problems.append(f"{d[:8]}: no fdatasync of its segment between its append and the commit naming it")
        if not any(s > put_at and e < commit_start for s, e in rec.backend_syncs):
            problems.append(f"{d[:8]}: no backend sync between its append and the commit naming it")
        if answered_at < commit_end:
            problems.append(f"{d[:8]}: answered (#{answered_at}) before its commit returned (#{commit_end})")
    return problems


def test_every_instance_is_synced_then_committed_then_answered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    rec = Recorder()

    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()
        committer, backend, index = build(tmp_path, loop, rec, monkeypatch)
        budget = SpoolBudget(1 << 20, 64 << 20)
        digests: list[str] = []

        async def submitter(k: int) -> None:
            for i in range(8):
                sub = submission(budget, backend, k * 100 + i)
                digest = sub.spool.digest()
                digests.append(digest)
                future = committer.submit(sub)

                def answered(f: asyncio.Future[CommitResult], d: str = digest) -> None:
                    rec.answers[d] = (rec.stamp(), f.result().status)

                future.add_done_callback(answered)
                if i % 3 == 2:
                    await asyncio.wait_for(asyncio.shield(future), 10)  # let others overtake this submitter
                else:
                    await asyncio.sleep(0)

        try:
            await asyncio.wait_for(asyncio.gather(*(submitter(k) for k in range(5))), 20)
            # Every answer arrives: poll with a deadline rather than sleeping.
            deadline = loop.time() + 10
            while len(rec.answers) < len(digests) and loop.time() < deadline:
                await asyncio.sleep(0.01)
        finally:
            await asyncio.to_thread(committer.close)
            backend.close()
            index.close()
        return digests

    digests = asyncio.run(scenario())
    assert len(digests) == 40
    assert len({s for s, _e, _n in rec.applies}) >= 2, "the run must span several groups"
    assert check_order(rec, digests) == []


def test_the_checker_sees_each_kind_of_misorder() -> None:
    """The checker itself: each broken sequence must be reported."""
    d = "ab" * 32
    good = Recorder(put={d: (1, "/s")}, syncs=[(2, 3, "/s")], backend_syncs=[(2, 3)], applies=[(4, 5, {d})],
                    answers={d: (6, errors.SUCCESS)})
    assert check_order(good, [d]) == []
    cases = {
        "no sync": Recorder(put={d: (1, "/s")}, syncs=[], backend_syncs=[(2, 3)], applies=[(4, 5, {d})],
                            answers={d: (6, 0)}),
        "sync after commit": Recorder(put={d: (1, "/s")}, syncs=[(6, 7, "/s")], backend_syncs=[(6, 7)],
                                      applies=[(4, 5, {d})], answers={d: (8, 0)}),
        "other file": Recorder(put={d: (1, "/s")}, syncs=[(2, 3, "/t")], backend_syncs=[(2, 3)],
                               applies=[(4, 5, {d})], answers={d: (6, 0)}),
        "answer first": Recorder(put={d: (1, "/s")}, syncs=[(2, 3, "/s")], backend_syncs=[(2, 3)],
                                 applies=[(5, 6, {d})], answers={d: (4, 0)}),
        "no commit": Recorder(put={d: (1, "/s")}, syncs=[(2, 3, "/s")], backend_syncs=[(2, 3)], applies=[],
                              answers={d: (4, 0)}),
        "unanswered": Recorder(put={d: (1, "/s")}, syncs=[(2, 3, "/s")], backend_syncs=[(2, 3)],
                               applies=[(4, 5, {d})]),
    }
    for name, rec in cases.items():
        assert check_order(rec, [d]), name
