"""The serving index commits with a lazy meta page (one flush per group commit): a power loss can undo its last
transaction(s), whose instances were acknowledged. Their records are durable in the segments, beyond the committed
end the surviving index knows: startup recovery must index them again, byte-exact, and end where `index rebuild`
ends."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest

from appliance import errors
from appliance.index.db import StudyIndex
from appliance.store.online import recover
from tests.crash.test_power_loss import STUDY, Site, burst, check_recovered, part10


def test_a_lost_last_index_transaction_is_redone_from_the_segments(tmp_path: Path) -> None:
    root = tmp_path / "site"
    snapshot = tmp_path / "index-before-the-last-commits"
    first = {n: part10(n) for n in range(3)}
    late = {n: part10(n) for n in range(3, 9)}
    site = Site.open(root)
    try:
        answers = asyncio.run(burst(site, list(first.items())))
        snapshot.mkdir()
        site.index.env.copy(str(snapshot))  # the index as the disk holds it if what follows is lost
        answers.update(asyncio.run(burst(site, list(late.items()))))
        assert {a.status for a in answers.values()} == {errors.SUCCESS}  # every one acknowledged
    finally:
        site.close()
    shutil.rmtree(root / "index")
    snapshot.rename(root / "index")  # power loss: the meta pages of the last transactions never reached the disk
    lost = StudyIndex(root / "index")
    assert lost.counts()["instances"] == 3
    lost.close()

    # Startup recovery indexes the durable records beyond the committed ends; every acknowledged instance is back,
    # byte-exact, verify is clean and a rebuild gives the same index.
    index = check_recovered(root, {**first, **late}, tmp_path)
    try:
        assert index.counts()["instances"] == 9
        assert index.instances_under(f"{STUDY}.3.8")
    finally:
        index.close()
    again = Site.open(root)
    try:
        stats = recover(again.store, again.index)  # idempotent: nothing is left beyond the committed ends
        assert stats["reindexed"] == 0 and stats["truncated_bytes"] == 0
    finally:
        again.close()


def test_a_crash_during_recovery_redoes_every_chunk_at_the_next_start(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """More durable records beyond the committed ends than recovery indexes in one transaction (512): a crash
    after the first chunk must leave the segment ends where they were, so the next start redoes all of them."""
    root = tmp_path / "site"
    snapshot = tmp_path / "index-before"
    site = Site.open(root)
    sent = {n: part10(n, size=64) for n in range(601)}
    site.store.segment_backend("vol0").segment_bytes_max = 64 << 20  # one segment, registered before the snapshot
    try:
        asyncio.run(burst(site, [(0, sent[0])]))  # the segment exists and is registered
        snapshot.mkdir()
        site.index.env.copy(str(snapshot))  # the index as the disk holds it if everything after is lost
        asyncio.run(burst(site, [(n, data) for n, data in sent.items() if n]))
    finally:
        site.close()
    shutil.rmtree(root / "index")
    snapshot.rename(root / "index")

    calls = {"n": 0}
    real_apply = StudyIndex.apply

    def crash_after_first_chunk(self: StudyIndex, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("power cut during recovery")
        return real_apply(self, *args, **kwargs)

    site = Site.open(root)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(StudyIndex, "apply", crash_after_first_chunk)
            with pytest.raises(RuntimeError, match="power cut"):
                recover(site.store, site.index)
    finally:
        site.close()
    index = check_recovered(root, sent, tmp_path)
    index.close()
