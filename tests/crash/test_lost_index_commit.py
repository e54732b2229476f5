"""The serving index commits with a lazy meta page (one flush per group commit): a power loss can undo its last
transaction(s), whose instances were acknowledged. Their records are durable in the segments, beyond the committed
end the surviving index knows: startup recovery must index them again, byte-exact, and end where `index rebuild`
ends."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

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
