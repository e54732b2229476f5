"""GroupCommitter failure paths: whatever breaks inside a commit, every submitted instance gets an answer and the
committer goes on serving (an unanswered future is an association hanging until its modality times out)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from appliance import errors
from appliance.config import VolumeConfig
from appliance.index.db import IndexEntry, StudyIndex
from appliance.store.blobs import BlobWriter
from appliance.store.commit import GroupCommitter
from appliance.store.volumes import VolumeSet, init_volume, open_volume
from tests.unit.test_index import entry, header


class BrokenMetrics:
    """Metrics whose commit() raises once: the index thread used to die on it."""

    def __init__(self) -> None:
        self.raised = 0

    def commit(self, *args: Any) -> None:
        if not self.raised:
            self.raised += 1
            raise RuntimeError("metrics backend gone")


def _setup(tmp_path: Path, loop: asyncio.AbstractEventLoop, metrics: Any = None) -> tuple[GroupCommitter, Any]:
    init_volume(tmp_path / "vol0", "vol0")
    vol = open_volume(VolumeConfig("vol0", tmp_path / "vol0", 0.999), create_missing=False)
    index = StudyIndex(tmp_path / "index")
    return GroupCommitter(index, VolumeSet([vol]), "overwrite", loop, max_wait_ms=0.0, metrics=metrics), vol


def _instance(vol: Any, n: int) -> tuple[BlobWriter, IndexEntry]:
    writer = BlobWriter(vol, b"prefix")
    writer.write(f"dataset {n}".encode())
    e = entry(header("P", "1.2.3", "1.2.3.4", f"1.2.3.4.{n}"), content=f"dataset {n}")
    e.digest, e.size = writer.digest(), writer.size
    return writer, e


def test_an_exception_inside_a_commit_answers_the_batch_and_the_committer_goes_on(tmp_path: Path) -> None:
    async def scenario() -> None:
        committer, vol = _setup(tmp_path, asyncio.get_running_loop(), BrokenMetrics())
        try:
            first = await asyncio.wait_for(committer.submit(*_instance(vol, 1)), 10)
            second = await asyncio.wait_for(committer.submit(*_instance(vol, 2)), 10)
        finally:
            await asyncio.to_thread(committer.close)
        assert first.status == errors.SUCCESS  # its answer was out before the metrics call failed
        assert second.status == errors.SUCCESS  # the committer is still alive (before: the thread had died)

    asyncio.run(scenario())


def test_submit_after_close_is_refused_at_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        committer, vol = _setup(tmp_path, asyncio.get_running_loop())
        ok = await asyncio.wait_for(committer.submit(*_instance(vol, 1)), 10)
        assert ok.status == errors.SUCCESS
        await asyncio.to_thread(committer.close)
        writer, e = _instance(vol, 2)
        late = await asyncio.wait_for(committer.submit(writer, e), 10)
        assert late.status == errors.PROCESSING_FAILURE
        assert not os.path.exists(writer.tmp_path)  # nothing of it left behind

    asyncio.run(scenario())
