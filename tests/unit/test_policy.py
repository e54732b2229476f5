"""tiering/policy.py: pure planning with an injected clock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.config_tiering import PolicyConfig
from appliance.index.schema import StudyFacts
from appliance.store.backend import Usage
from tiering.policy import NS_PER_DAY, TierFill, apply_limit, plan, tier_fill

DAY = NS_PER_DAY
NOW = 1000 * DAY
ORDER = ["online", "nl", "tape"]


def study(uid: str, *, received_days: float = 100, accessed_days: float | None = None, size: int = 100,
          tier: str = "online", modalities: tuple[str, ...] = ("CT",), aes: tuple[str, ...] = ("SCU",),
          **kw: Any) -> StudyFacts:
    latest = NOW - int(received_days * DAY)
    access = 0 if accessed_days is None else NOW - int(accessed_days * DAY)
    return StudyFacts(key=f"P\x00{uid}", uid=uid, bytes=size, instances=2, latest_ns=latest, modalities=modalities,
                      calling_aes=aes, tier=tier, since_ns=0, last_access_ns=access,
                      partly_online=kw.pop("partly_online", False), **kw)


def policy(name: str = "p", source: str = "online", target: str = "nl", **kw: Any) -> PolicyConfig:
    return PolicyConfig(name=name, source=source, target=target, **kw)


def uids(studies: list[StudyFacts], policies: list[PolicyConfig], fills: dict[str, TierFill] | None = None,
         now: int = NOW) -> list[str]:
    return [m.study_uid for m in plan(studies, fills or {}, policies, ORDER, now)]


def test_received_age() -> None:
    studies = [study("young", received_days=10), study("old", received_days=40)]
    assert uids(studies, [policy(received_days_min=30)]) == ["old"]
    # The same data a month later: both are old enough.
    assert sorted(uids(studies, [policy(received_days_min=30)], now=NOW + 30 * DAY)) == ["old", "young"]


def test_accessed_age_uses_the_later_of_access_and_receipt() -> None:
    studies = [study("read-lately", received_days=100, accessed_days=5), study("never-read", received_days=100),
               study("fresh", received_days=3)]
    moves = plan(studies, {}, [policy(accessed_days_min=30)], ORDER, NOW)
    assert [m.study_uid for m in moves] == ["never-read"]
    assert "not accessed since received" in moves[0].reason


def test_modalities_calling_aes_and_sizes() -> None:
    studies = [study("ct", modalities=("CT", "SR")), study("mr", modalities=("MR",), aes=("MRI1",)),
               study("big", size=10_000), study("small", size=10)]
    assert uids(studies, [policy(modalities=("SR",))]) == ["ct"]
    assert uids(studies, [policy(calling_aes=("MRI1", "X"))]) == ["mr"]
    assert sorted(uids(studies, [policy(study_bytes_min=50, study_bytes_max=1000)])) == ["ct", "mr"]
    assert uids(studies, [policy(study_bytes_min=5000)]) == ["big"]


def test_only_down_the_tier_order_and_only_from_the_source() -> None:
    studies = [study("on-nl", tier="nl"), study("on-tape", tier="tape"), study("online")]
    assert uids(studies, [policy(source="nl", target="tape")]) == ["on-nl"]
    # A policy "up" (tape -> nl) plans nothing: recalls are not policies.
    assert uids(studies, [policy(source="tape", target="nl")]) == []


def test_recalled_study_goes_down_again() -> None:
    recalled = study("r", tier="online", received_days=400, accessed_days=40)
    assert uids([recalled], [policy(source="online", target="tape", accessed_days_min=30)]) == ["r"]
    assert uids([recalled], [policy(source="online", target="tape", accessed_days_min=60)]) == []


def test_partly_online_study_counts_as_online_for_its_tier_or_slower() -> None:
    partly = study("partly", tier="nl", partly_online=True)
    moves = plan([partly], {}, [policy(source="online", target="nl")], ORDER, NOW)
    assert [(m.study_uid, m.source, m.target) for m in moves] == [("partly", "online", "nl")]
    assert uids([study("whole", tier="nl")], [policy(source="online", target="nl")]) == []
    on_tape = study("t", tier="tape", partly_online=True)
    assert uids([on_tape], [policy(source="online", target="nl")]) == []  # nl is faster than its tape copy


def test_busy_studies_are_skipped() -> None:
    studies = [study("moving", moving=True), study("recalling", recall_queued=True), study("free")]
    assert uids(studies, [policy()]) == ["free"]


def test_policies_in_config_order_and_a_study_once() -> None:
    studies = [study("ct", modalities=("CT",)), study("mr", modalities=("MR",))]
    moves = plan(studies, {}, [policy("ct-to-tape", target="tape", modalities=("CT",)), policy("all-to-nl")],
                 ORDER, NOW)
    assert [(m.study_uid, m.policy, m.target) for m in moves] == [("ct", "ct-to-tape", "tape"),
                                                                  ("mr", "all-to-nl", "nl")]


def test_least_recently_accessed_first() -> None:
    studies = [study("b", accessed_days=10), study("a", accessed_days=50), study("c", accessed_days=20)]
    assert uids(studies, [policy()]) == ["a", "c", "b"]


def test_watermark_moves_lru_until_under_low() -> None:
    studies = [study(f"s{i}", accessed_days=100 - i, size=10) for i in range(10)]
    fills = {"online": TierFill(90, 100), "nl": TierFill(0, 1000)}
    rule = policy(high_watermark=0.85, low_watermark=0.7)
    # 90 -> 70 takes two studies of 10 (at 70 the tier is not under 70% yet: a third), oldest access first.
    assert uids(studies, [rule], fills) == ["s0", "s1", "s2"]
    assert fills["online"].used_bytes == 90  # the caller's fills are not changed
    moves = plan(studies, fills, [rule], ORDER, NOW)
    assert "online is 90% full (> 85%)" in moves[0].reason


def test_watermark_not_reached_moves_nothing() -> None:
    studies = [study("s", size=10)]
    rule = policy(high_watermark=0.85, low_watermark=0.7)
    assert uids(studies, [rule], {"online": TierFill(85, 100)}) == []
    assert uids(studies, [rule], {}) == []  # unknown fill: no watermark rule runs


def test_watermark_with_filters_and_projection_from_earlier_rules() -> None:
    studies = [study("ct", size=15, modalities=("CT",), accessed_days=90),
               study("mr", size=15, modalities=("MR",), accessed_days=80)]
    fills = {"online": TierFill(90, 100)}
    rules = [policy("ct-first", modalities=("CT",)), policy("wm", high_watermark=0.8, low_watermark=0.7)]
    # The first rule takes CT (projected 75%): the watermark rule no longer runs (75% <= 80%).
    assert uids(studies, rules, fills) == ["ct"]
    rules = [policy("ct-first", modalities=("CT",)), policy("wm", high_watermark=0.7, low_watermark=0.6)]
    assert uids(studies, rules, fills) == ["ct", "mr"]


def test_tier_fill_sums_usage() -> None:
    fill = tier_fill([Usage("v0", 30, 100, True), Usage("v1", 10, 100, False)])
    assert (fill.used_bytes, fill.capacity_bytes, fill.fill) == (40, 200, 0.2)
    assert tier_fill([]).fill == 1.0


def test_apply_limit_by_count_and_bytes() -> None:
    moves = plan([study(f"s{i}", size=s, accessed_days=100 - i) for i, s in enumerate([10, 50, 10, 10])], {},
                 [policy()], ORDER, NOW)
    assert [m.study_uid for m in apply_limit(moves, 2)] == ["s0", "s1"]
    assert [m.study_uid for m in apply_limit(moves, 10, bytes_max=30)] == ["s0", "s2", "s3"]


def test_no_filter_moves_every_study_of_the_tier_with_a_reason() -> None:
    (move,) = plan([study("x")], {}, [policy()], ORDER, NOW)
    assert (move.source, move.target, move.bytes, move.instances, move.policy) == ("online", "nl", 100, 2, "p")
    assert move.reason


def test_the_default_config_tiering_example_is_valid_once_uncommented(tmp_path: Path) -> None:
    import re

    from appliance.config import DEFAULT_CONFIG_TOML, load_config

    start = DEFAULT_CONFIG_TOML.index("# [tiering]")
    example = "\n".join(re.sub(r"^# ?", "", line) for line in DEFAULT_CONFIG_TOML[start:].split("\n"))
    (tmp_path / "a.toml").write_text(DEFAULT_CONFIG_TOML[:start] + example)
    config = load_config(tmp_path / "a.toml")
    assert [p.name for p in config.policies] == ["old-to-nearline", "online-full", "cold-to-tape",
                                                     "expire-10y"]
    assert [t.name for t in config.tiers] == ["nearline", "cloud", "tape"]
