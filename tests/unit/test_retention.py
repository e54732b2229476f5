"""Retention rules (`to = "delete"` in [[policies]]): the config accepts and checks them, the planner plans deletes
of expired studies on any tier (or the one named), never of a study on legal hold, which still moves."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config_tiering import ANY_TIER, DELETE
from appliance.errors import ConfigError
from tests.unit.test_config import load_text
from tests.unit.test_policy import DAY, NOW, ORDER, policy, study
from tiering.policy import plan

NEARLINE = '[[tiers]]\nname = "nl"\nkind = "nearline"\npath = "nl"\n'


def test_a_retention_rule_parses_without_from(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, '[[policies]]\nname = "expire-10y"\nto = "delete"\nreceived_days_min = 3650\n'
                              'modalities = ["CT"]\n')
    [rule] = cfg.policies
    assert (rule.source, rule.target, rule.received_days_min, rule.modalities) == (ANY_TIER, DELETE, 3650, ("CT",))


@pytest.mark.parametrize(("body", "message"), [
    ('to = "delete"\n', "needs received_days_min > 0"),
    ('to = "delete"\nreceived_days_min = 10\nhigh_watermark = 0.9\nlow_watermark = 0.8\n', "watermark"),
    ('from = "nowhere"\nto = "delete"\nreceived_days_min = 10\n', "from must be"),
])
def test_a_retention_rule_is_checked(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_text(tmp_path, '[[policies]]\nname = "r"\n' + body)


def test_no_tier_may_be_called_delete(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="taken"):
        load_text(tmp_path, NEARLINE.replace('"nl"\nkind', '"delete"\nkind'))


def test_expired_studies_on_every_tier_are_planned_for_deletion_but_not_held_ones() -> None:
    studies = [study("young", received_days=100), study("old", received_days=4000),
               study("old-on-tape", received_days=5000, tier="tape"), study("held", received_days=6000)]
    rule = policy("expire-10y", ANY_TIER, DELETE, received_days_min=3650)
    moves = plan(studies, {}, [rule], ORDER, NOW, held={"held"})
    assert sorted((m.study_uid, m.source, m.target) for m in moves) == [("old", "online", DELETE),
                                                                         ("old-on-tape", "tape", DELETE)]
    assert all("received" in m.reason and m.policy == "expire-10y" for m in moves)
    # `from` restricts the rule to one tier; a ten years old study is young a year earlier.
    only_tape = policy("expire-tape", "tape", DELETE, received_days_min=3650)
    assert [m.study_uid for m in plan(studies, {}, [only_tape], ORDER, NOW, held={"held"})] == ["old-on-tape"]
    assert [m.study_uid for m in plan(studies, {}, [rule], ORDER, NOW - 1000 * DAY, held={"held"})] == ["old-on-tape"]


def test_a_held_study_still_moves() -> None:
    studies = [study("held", received_days=6000)]
    rules = [policy("expire", ANY_TIER, DELETE, received_days_min=3650), policy("down", "online", "nl")]
    [move] = plan(studies, {}, rules, ORDER, NOW, held={"held"})
    assert (move.study_uid, move.target, move.policy) == ("held", "nl", "down")
