"""Retention: the deletes a `to = "delete"` policy planned (tiering/policy.py), done by `tier run` under its lock.

Each study goes through the index's delete (appliance/index/deletion.py): one synced transaction, refused for a
study put on legal hold since the plan; its bytes become dead records (compaction, the mover's garbage collection).
One audit line per study (event "delete", why "retention", the policy), as `appliance delete` writes."""

from __future__ import annotations

import logging
import time

from appliance.audit import SUCCESS, write_once
from appliance.config import Config
from appliance.errors import OnHold
from appliance.index.db import StudyIndex
from tiering.mover import MoveResult
from tiering.policy import PlannedMove

log = logging.getLogger("tiering.expire")


def expire(config: Config, index: StudyIndex, planned: PlannedMove, who: str) -> MoveResult:
    """Delete one expired study. Outcomes: deleted, held (a hold placed since the plan), vanished."""
    started = time.monotonic()
    result = MoveResult(planned.study_uid, planned.policy, planned.source, planned.target)
    try:
        done = index.delete(planned.study_uid, {vol.name for vol in config.volumes})
    except OnHold as exc:
        result.outcome, result.error = "held", str(exc)
        return result
    result.seconds = time.monotonic() - started
    if done is None:
        result.outcome = "vanished"
        return result
    result.outcome, result.instances = "deleted", done.instances
    lost = write_once(config.audit, config.server.ae_title, "delete", SUCCESS, study_uid=done.study_uid,
                      instances=done.instances, bytes=done.bytes, level="study", uid=done.uid, user=who,
                      why="retention", policy=planned.policy, reason=planned.reason, scope="instances")
    log.warning("retention: deleted study %s (%d instance(s), %d bytes) by policy %s", done.study_uid,
                done.instances, done.bytes, planned.policy)
    if lost is not None:
        # The delete is durable: it stands, the run goes on; the loss is counted (appliance_audit_dropped_total),
        # logged here and reported by the run (counts "audit_lost").
        result.error = f"audit line not written: {lost}"
        log.error("retention: study %s deleted, but its audit line was not written: %s", done.study_uid, lost)
    return result
