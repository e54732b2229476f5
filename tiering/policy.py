"""The planner: which studies the configured policies move, and why. Pure functions: no I/O, the clock passed in as
``now_ns``, so a plan can be computed "as if it were" another date (tests, `APPLIANCE_TIER_NOW`).

Rules (docs/tiering.md, "Policies"):
- policies are applied in config order; a study is planned at most once (by the first policy that takes it);
- a study moves only down the tier order (online, nearline tiers, tape tiers); a recalled study (back online)
  goes down again like any other; a study placed on a slower tier whose later instances are online
  (``partly_online``) counts as online for a policy whose target is its tier or slower;
- a study with a move journaled or a recall queued is left alone;
- a filter left at its default does not filter: ages are days since the last instance was received
  (``received_days_min``) and since the last retrieve/export or, if later, receipt (``accessed_days_min``);
  ``modalities`` and ``calling_aes`` match when any of the study's values is listed; sizes are bytes;
- a watermark rule (``high_watermark`` > 0) runs only while its source tier is fuller than ``high_watermark``, and
  takes the least recently accessed matching studies until the projected fill is under ``low_watermark``. Every
  planned move updates the projected fill of both tiers, so later rules see the plan's effect;
- a retention rule (``to = "delete"``) plans deletes of the matching studies on its ``from`` tier (any tier
  without one), never of a study under legal hold (``held``): no rule overrides a hold. A move keeps the data, so
  a held study still moves.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from appliance.config_tiering import ANY_TIER, DELETE, ONLINE_TIER, PolicyConfig
from appliance.index.schema import StudyFacts
from appliance.store.backend import Usage

NS_PER_DAY = 86_400 * 1_000_000_000


@dataclass(frozen=True)
class PlannedMove:
    study_key: str
    study_uid: str
    source: str  # the tier the study is taken from (ONLINE_TIER for a partly online study)
    target: str
    bytes: int
    instances: int
    policy: str
    reason: str  # in words, for `tier plan` and the audit log (no patient data)
    # The study's placement (since_ns) when planned: the mover skips it if a switch (a recall) changed it since.
    # None: not checked (a resumed move).
    placed_since_ns: int | None = None


@dataclass
class TierFill:
    """A tier's fill as the plan goes: Usage summed over its volumes or cartridges."""

    used_bytes: int
    capacity_bytes: int

    @property
    def fill(self) -> float:
        return self.used_bytes / self.capacity_bytes if self.capacity_bytes else 1.0


def tier_fill(usages: Iterable[Usage]) -> TierFill:
    used = capacity = 0
    for usage in usages:
        used += usage.used_bytes
        capacity += usage.capacity_bytes
    return TierFill(used, capacity)


def last_touch_ns(study: StudyFacts) -> int:
    """When the study was last read or, if later, received: what "accessed" ages and LRU order use."""
    return max(study.last_access_ns, study.latest_ns)


def days(ns: int) -> float:
    return ns / NS_PER_DAY


def source_of(study: StudyFacts, policy: PolicyConfig, order: Sequence[str]) -> str | None:
    """The tier ``policy`` would take ``study`` from, or None when the policy cannot apply to it (another tier, or
    not a move down)."""
    if policy.target == DELETE:
        return study.tier if policy.source in (ANY_TIER, study.tier) else None
    rank = {name: i for i, name in enumerate(order)}
    if policy.target not in rank or study.tier not in rank:
        return None
    if study.tier == policy.source and rank[policy.target] > rank[study.tier]:
        return study.tier
    if (study.partly_online and policy.source == ONLINE_TIER and rank[policy.target] >= rank[study.tier]):
        return ONLINE_TIER
    return None


def filter_reasons(study: StudyFacts, policy: PolicyConfig, now_ns: int) -> list[str] | None:
    """Why each filter of ``policy`` matches ``study``, in words, or None when one does not match."""
    reasons = []
    if policy.received_days_min:
        age = days(now_ns - study.latest_ns)
        if age < policy.received_days_min:
            return None
        reasons.append(f"received {age:.0f} days ago (>= {policy.received_days_min:g})")
    if policy.accessed_days_min:
        age = days(now_ns - last_touch_ns(study))
        if age < policy.accessed_days_min:
            return None
        what = "accessed" if study.last_access_ns > study.latest_ns else "not accessed since received,"
        reasons.append(f"{what} {age:.0f} days ago (>= {policy.accessed_days_min:g})")
    if policy.modalities:
        hits = sorted(set(policy.modalities) & set(study.modalities))
        if not hits:
            return None
        reasons.append(f"modality {'/'.join(hits)}")
    if policy.calling_aes:
        hits = sorted(set(policy.calling_aes) & set(study.calling_aes))
        if not hits:
            return None
        reasons.append(f"sent by {'/'.join(hits)}")
    if policy.study_bytes_min and study.bytes < policy.study_bytes_min:
        return None
    if policy.study_bytes_max and study.bytes > policy.study_bytes_max:
        return None
    if policy.study_bytes_min or policy.study_bytes_max:
        reasons.append(f"size {study.bytes} bytes within the policy's bounds")
    return reasons


def plan(studies: Iterable[StudyFacts], fills: dict[str, TierFill], policies: Sequence[PolicyConfig],
         order: Sequence[str], now_ns: int, held: Collection[str] = frozenset()) -> list[PlannedMove]:
    """The ordered list of moves the ``policies`` make of ``studies``, given each tier's ``fills`` (not modified)
    and the tier ``order`` (fastest first). Within a policy, the least recently accessed study comes first, so a
    run cut short by a limit moves the coldest studies."""
    candidates = [s for s in studies if not s.moving and not s.recall_queued and s.instances > 0]
    candidates.sort(key=lambda s: (last_touch_ns(s), s.key))
    projected = {name: TierFill(f.used_bytes, f.capacity_bytes) for name, f in fills.items()}
    planned: list[PlannedMove] = []
    taken: set[str] = set()
    for policy in policies:
        watermark = policy.high_watermark > 0
        source_fill = projected.get(policy.source)
        if watermark:
            if source_fill is None or source_fill.fill <= policy.high_watermark:
                continue
            start_fill = source_fill.fill
        for study in candidates:
            if study.key in taken or (policy.target == DELETE and study.uid in held):
                continue
            if watermark:
                assert source_fill is not None
                if source_fill.fill < policy.low_watermark:
                    break
            source = source_of(study, policy, order)
            if source is None:
                continue
            reasons = filter_reasons(study, policy, now_ns)
            if reasons is None:
                continue
            if watermark:
                reasons.insert(0, f"{policy.source} is {start_fill:.0%} full (> {policy.high_watermark:.0%}), "
                                  f"least recently accessed first until under {policy.low_watermark:.0%}")
            if not reasons:
                reasons = ["every study on the tier (no filter)"]
            taken.add(study.key)
            planned.append(PlannedMove(study.key, study.uid, source, policy.target, study.bytes, study.instances,
                                       policy.name, "; ".join(reasons), study.since_ns))
            for name, sign in ((source, -1), (policy.target, +1)):
                tier = projected.get(name)
                if tier is not None:
                    tier.used_bytes = max(0, tier.used_bytes + sign * study.bytes)
    return planned


def apply_limit(moves: Sequence[PlannedMove], studies_max: int, bytes_max: int = 0) -> list[PlannedMove]:
    """The first moves of a plan within a count and (if > 0) a byte limit: `tier run --limit`,
    tiering.run_studies_max. A study larger than the byte limit alone is skipped, not cut."""
    out: list[PlannedMove] = []
    total = 0
    for move in moves:
        if len(out) >= studies_max:
            break
        if bytes_max and total + move.bytes > bytes_max:
            continue
        out.append(move)
        total += move.bytes
    return out
