"""The recaller (tiering/recall.py) and last-access recording (appliance/services/access.py) on a real index and real
segment stores (tests/tiering_site.py)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import Offline
from appliance.index.schema import OFFLINE, ONLINE
from appliance.services.access import AccessRecorder
from appliance.services.retrieve import Match, RetrieveRefused, await_recalls, offline_studies
from tests.tiering_site import Site
from tiering.recall import RECALL_LOCK, recall_lock, recall_queued, tape_position


@pytest.fixture()
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site.open(tmp_path)
    yield s
    s.close()


def test_recall_brings_a_tape_study_online_byte_exact(site: Site) -> None:
    study, data = site.ingest(3)
    site.to_tier(study, "lto")
    assert site.availability(study) == {OFFLINE}
    with pytest.raises(Offline):
        site.read_study(study)
    key = site.index.study_key(study)
    assert key is not None and site.index.request_recall(key, "cli")
    report = recall_queued(site.config, site.index, site.store, clock=lambda: 2_000_000_000_000_000_000)
    assert (report.studies, report.instances, report.failed) == (1, 3, {})
    assert site.availability(study) == {ONLINE}
    assert site.read_study(study) == data
    assert site.index.recalls() == []
    place = site.index.placement(key)
    assert (place.tier, place.last_access_ns) == ("online", 2_000_000_000_000_000_000)
    # The tape copies are kept: going down again is an index switch.
    for _s, _d, blob, _i in site.index.study_blobs(key):
        assert sorted(c.backend for c in blob.copies) == ["lto", "vol0"]
    audit = [json.loads(line) for line in site.config.tiering.audit_log.read_text().splitlines()]
    assert audit[-1]["event"] == "recall" and audit[-1]["outcome"] == "recalled"
    assert (audit[-1]["study"], audit[-1]["from"], audit[-1]["to"], audit[-1]["instances"]) == (study, "lto", "online", 3)
    # A second run finds nothing to do.
    assert recall_queued(site.config, site.index, site.store).studies == 0


def test_batches_in_tape_order_and_bounded(tmp_path: Path) -> None:
    site = Site.open(tmp_path, recall_batch_max=2)
    try:
        studies = []
        for _ in range(3):
            study, _data = site.ingest(1)
            site.to_tier(study, "lto")
            studies.append(study)
        for study in reversed(studies):  # queued in the reverse of their tape order
            key = site.index.study_key(study)
            assert key is not None and site.index.request_recall(key, "cli")
        report = recall_queued(site.config, site.index, site.store, batches_max=1)
        assert report.studies == 2  # one batch of recall_batch_max
        # The two first on tape came back, whatever the queue order.
        assert [site.availability(s) for s in studies] == [{ONLINE}, {ONLINE}, {OFFLINE}]
        assert recall_queued(site.config, site.index, site.store).studies == 1
    finally:
        site.close()


def test_a_corrupt_tape_copy_is_not_recalled(site: Site) -> None:
    study, _data = site.ingest(1)
    site.to_tier(study, "lto")
    key = site.index.study_key(study)
    assert key is not None
    [(_s, _d, blob, _i)] = site.index.study_blobs(key)
    from tests.unit.test_blobstore_tiers import _corrupt

    _corrupt(site.store.tiers["lto"], blob.copies[0])
    site.index.request_recall(key, "cli")
    report = recall_queued(site.config, site.index, site.store)
    assert report.studies == 0 and study in report.failed
    assert site.availability(study) == {OFFLINE}
    [(_k, rec)] = site.index.recalls()
    assert rec.attempts == 1 and "hash" in rec.error


def test_one_recaller_at_a_time(site: Site) -> None:
    with recall_lock(site.config.storage.index_path) as held:
        assert held and (site.config.storage.index_path / RECALL_LOCK).exists()
        assert recall_queued(site.config, site.index, site.store).busy


def test_tape_position_orders_by_cartridge_file_offset() -> None:
    locations = ["L00002/1:0:512:10:10", "L00001/10:4096:4608:10:10", "L00001/2:8192:8704:10:10",
                 "L00001/2:0:512:10:10"]
    assert sorted(locations, key=tape_position) == [locations[3], locations[2], locations[1], locations[0]]


def test_access_recorder_batches_into_one_write(site: Site) -> None:
    study, _data = site.ingest(1)
    clock = iter(range(5_000, 10_000, 1000))
    recorder = AccessRecorder(site.index, studies_max=2, clock=lambda: next(clock))
    recorder.note([study, "1.2.3.unknown"])
    assert recorder.full.is_set()  # two distinct studies: the flusher is asked to go early
    assert recorder.flush() == 2 and recorder.pending() == 0
    key = site.index.study_key(study)
    assert key is not None and site.index.placement(key).last_access_ns == 5_000
    recorder.note([study])
    recorder.flush()
    assert site.index.placement(key).last_access_ns == 6_000


def _matches(site: Site, study: str) -> list[Match]:
    from appliance.services.retrieve import _match

    return [_match(key, rec) for key, rec in site.index.instances_under(study)]


async def _in_thread(func: Any, *args: Any) -> Any:
    return await asyncio.to_thread(func, *args)


def test_retrieve_waits_for_the_recall(site: Site) -> None:
    study, _data = site.ingest(2)
    site.to_tier(study, "lto")
    matches = _matches(site, study)
    assert offline_studies(matches)

    async def scenario() -> list[Match]:
        waiting = asyncio.create_task(await_recalls(site.index, matches, "c-move", 30.0, 10, lambda: False,
                                                    _in_thread))
        # The recaller (the server's process in real life) finds the request the retrieve queued.
        while not site.index.recalls():
            await asyncio.sleep(0.01)
        await asyncio.to_thread(recall_queued, site.config, site.index, site.store)
        return await waiting

    started = time.monotonic()
    got = asyncio.run(scenario())
    assert {m.availability for m in got} == {ONLINE} and time.monotonic() - started < 10


def test_retrieve_gives_up_after_recall_wait_s_and_the_recall_stays_queued(site: Site) -> None:
    study, _data = site.ingest(1)
    site.to_tier(study, "lto")
    with pytest.raises(RetrieveRefused) as info:
        asyncio.run(await_recalls(site.index, _matches(site, study), "c-get", 0.2, 10, lambda: False, _in_thread))
    assert info.value.status == 0xA702 and info.value.comment == "study is on tape; recall queued"
    [(key, rec)] = site.index.recalls()
    assert rec.requested_by == "c-get" and key == site.index.study_key(study)


def test_a_full_recall_queue_refuses(site: Site) -> None:
    first, _ = site.ingest(1)
    second, _ = site.ingest(1)
    for study in (first, second):
        site.to_tier(study, "lto")
    asyncio.run(_queue(site, first))
    with pytest.raises(RetrieveRefused, match="queue full"):
        asyncio.run(await_recalls(site.index, _matches(site, second), "c-move", 0.0, 1, lambda: False, _in_thread))


async def _queue(site: Site, study: str) -> None:
    with pytest.raises(RetrieveRefused):
        await await_recalls(site.index, _matches(site, study), "c-move", 0.0, 1, lambda: False, _in_thread)


def test_tier_gauges_from_the_index(site: Site) -> None:
    from prometheus_client import REGISTRY

    from tiering.recall import refresh_gauges

    online, _ = site.ingest(2)
    taped, _ = site.ingest(1)
    site.to_tier(taped, "lto")
    key = site.index.study_key(taped)
    assert key is not None and site.index.request_recall(key, "cli")
    refresh_gauges(site.config, site.index)

    def value(name: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(name, labels)

    assert value("appliance_tier_studies", tier="online") == 1
    assert value("appliance_tier_studies", tier="lto") == 1
    assert value("appliance_tier_studies", tier="nas") == 0
    assert value("appliance_recall_queue_depth") == 1
    assert (value("appliance_tier_bytes", tier="online") or 0) > 0 and (value("appliance_tier_bytes", tier="lto") or 0) > 0
    before = value("appliance_recall_duration_seconds_count") or 0
    from tiering.recall import _observe

    _observe(recall_queued(site.config, site.index, site.store))
    assert value("appliance_recall_duration_seconds_count") == before + 1
    assert (value("appliance_tier_migration_bytes_total", from_tier="lto", to_tier="online") or 0) > 0


def test_after_the_wait_the_online_part_goes_and_the_tape_part_fails(site: Site) -> None:
    online, _ = site.ingest(1)
    taped, _ = site.ingest(1)
    site.to_tier(taped, "lto")
    matches = _matches(site, online) + _matches(site, taped)
    got = asyncio.run(await_recalls(site.index, matches, "c-move", 0.0, 10, lambda: False, _in_thread))
    assert sorted(m.availability for m in got) == [OFFLINE, ONLINE]  # not refused: the online one is sent
    assert len(site.index.recalls()) == 1


def test_a_move_switching_the_study_during_a_recall_leaves_no_instance_online_without_an_online_copy(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recaller (recall.lock) and a mover (tiering.lock) can work on the same study: a partly online study on
    tape whose recall is queued, taken by a policy moving its online instances down. The recaller read the study
    before the mover's switch and switches after it: an instance whose only copy is now on tape must not be
    marked ONLINE (a retrieve would then neither read it nor queue its recall)."""
    from tiering.recall import Recaller

    study, _data = site.ingest(2)
    site.to_tier(study, "lto")
    late, _ = site.ingest(1, study_uid=study)  # received after the move: online only
    assert late == study and site.availability(study) == {OFFLINE, ONLINE}
    key = site.index.study_key(study)
    assert key is not None and site.index.request_recall(key, "c-move")
    copy_study = Recaller._copy_study

    def copy_then_mover_switches(self: Recaller, blobs: Any, used: Any) -> Any:
        added = copy_study(self, blobs, used)
        site.to_tier(study, "lto")  # the mover's switch lands between the recaller's copy and its switch
        return added

    monkeypatch.setattr(Recaller, "_copy_study", copy_then_mover_switches)
    report = recall_queued(site.config, site.index, site.store)
    assert report.studies == 1
    for _sop, _d, blob, inst in site.index.study_blobs(key):
        on = {c.backend for c in blob.copies}
        assert inst.availability == (ONLINE if "vol0" in on else OFFLINE), (on, inst.availability)


def test_a_batch_holds_a_bounded_number_of_instances(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch keeps every new copy until its switch: recall_batch_max studies of up to study_instances_max
    instances each would not fit in memory, so a batch also stops at RECALL_BATCH_INSTANCES_MAX instances (one
    study always goes, however large) and the batch's records are not all held while it is ordered."""
    import tiering.recall as recall

    monkeypatch.setattr(recall, "RECALL_BATCH_INSTANCES_MAX", 4)
    site = Site.open(tmp_path, recall_batch_max=64)
    try:
        studies = []
        for count in (2, 2, 5):
            study, _data = site.ingest(count)
            site.to_tier(study, "lto")
            key = site.index.study_key(study)
            assert key is not None and site.index.request_recall(key, "cli")
            studies.append(study)
        batch = recall.Recaller(site.config, site.index, site.store).next_batch(set())
        assert all(len(item) == 2 for item in batch)  # (key, requested_ns): no study's records kept
        report = recall_queued(site.config, site.index, site.store, batches_max=1)
        assert (report.studies, report.instances) == (2, 4)
        report = recall_queued(site.config, site.index, site.store, batches_max=1)
        assert (report.studies, report.instances) == (1, 5)  # larger than the bound alone: it still goes
        assert [site.availability(s) for s in studies] == [{ONLINE}] * 3
    finally:
        site.close()


def test_a_recall_replaces_an_online_copy_verify_found_corrupt(site: Site) -> None:
    """A recalled study whose online copy `verify` then found corrupt (suspect): `tier recall` brings a good copy
    online again from tape instead of counting the suspect one as online."""
    from appliance.index.schema import COPY_SUSPECT
    from tests.unit.test_blobstore_tiers import _corrupt

    study, data = site.ingest(1)
    site.to_tier(study, "lto")
    key = site.index.study_key(study)
    assert key is not None and site.index.request_recall(key, "cli")
    assert recall_queued(site.config, site.index, site.store).studies == 1
    [(_s, digest, blob, _i)] = site.index.study_blobs(key)
    [online] = [c for c in blob.copies if c.backend == "vol0"]
    _corrupt(site.store.backends["vol0"], online)
    site.index.mark_verified([(digest, online, COPY_SUSPECT)], 1)
    assert site.index.request_recall(key, "cli")
    report = recall_queued(site.config, site.index, site.store)
    assert (report.studies, report.bytes_copied) == (1, len(next(iter(data.values()))))
    assert site.read_study(study) == data
