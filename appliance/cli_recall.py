"""`appliance tier recall UID... [--wait]`: bring studies on tape back online, and the recall step of `export`.

The request goes into the index's recall queue. A running server's recaller takes it within a second; with no
server (serve.lock free), this process runs the recaller itself. ``register(tier_app)`` adds the command to the
`tier` sub-app (appliance/cli_tier.py owns the app)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from appliance import errors
from appliance.cli_common import check_uid, emit, load_cli_config
from appliance.config import Config

if TYPE_CHECKING:
    from appliance.index.db import StudyIndex

POLL_S = 0.5


def queue_recalls(cfg: Config, index: StudyIndex, study_uids: list[str], by: str) -> list[str]:
    """Queue the studies (by Study Instance UID) with offline instances; the keys queued. NotFound for an unknown
    UID, OutOfSpace-like refusal when the queue is full."""
    from appliance.index.schema import OFFLINE

    keys = []
    for uid in study_uids:
        key = index.study_key(uid)
        if key is None:
            raise errors.NotFound(f"{uid}: no such study in the index")
        if not any(rec.availability == OFFLINE for _k, rec in index.instances_under(uid)):
            continue
        if not index.request_recall(key, by, cfg.tiering.recall_queue_max):
            raise errors.ApplianceError(f"the recall queue is full (tiering.recall_queue_max = "
                                        f"{cfg.tiering.recall_queue_max}); try again later")
        keys.append(key)
    return keys


def await_online(cfg: Config, index: StudyIndex, study_uids: list[str], wait_s: float) -> list[str]:
    """Run the recaller here when no server runs, else wait for the server's; the UIDs still offline after
    ``wait_s``."""
    from appliance.index.schema import OFFLINE
    from tiering.recall import run_recaller, serving

    deadline = time.monotonic() + wait_s
    if not serving(cfg):
        run_recaller(cfg, index, retry_failed=True, standalone=True)

    def offline() -> list[str]:
        return [u for u in study_uids if any(r.availability == OFFLINE for _k, r in index.instances_under(u))]

    left = offline()
    while left and time.monotonic() < deadline:
        time.sleep(POLL_S)
        left = offline()
    return left


def _nearline(index: StudyIndex, uid: str) -> bool:
    """A study not on tape with instances on a nearline tier: readable as it is, a recall does not apply."""
    from appliance.index.schema import NEARLINE

    return any(rec.availability == NEARLINE for _k, rec in index.instances_under(uid))


def register(tier_app: typer.Typer) -> None:
    @tier_app.command("recall")
    def recall(
        uids: Annotated[list[str], typer.Argument(help="Study Instance UID(s) to bring back online",
                                                  callback=check_uid)],
        config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML config")] = None,
        wait: Annotated[bool, typer.Option("--wait", help="Wait until online (up to tiering.recall_wait_s)")]
        = False,
        as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
    ) -> None:
        """Queue the recall of studies on tape. Without a running server, the recall runs now, in this process."""
        from appliance.index.db import StudyIndex
        from tiering.recall import serving

        try:
            cfg = load_cli_config(config)
            if not (cfg.storage.index_path / "data.mdb").exists():
                raise errors.NotFound(f"no index at {cfg.storage.index_path}")
            index = StudyIndex(cfg.storage.index_path, cfg.storage.index_map_size)
            try:
                queued = queue_recalls(cfg, index, uids, "cli")
                left = [u for u in uids if index.study_key(u) in queued]
                if queued and (wait or not serving(cfg)):
                    left = await_online(cfg, index, left, cfg.tiering.recall_wait_s if wait else 0.0)
                errors_by_uid = {k.split("\x00", 1)[1]: r.error for k, r in index.recalls() if r.error}
                nearline = [u for u in uids if index.study_key(u) not in queued and _nearline(index, u)]
            finally:
                index.close()
        except errors.ApplianceError as exc:
            raise exc from None  # cli_common.RootGroup: one line (JSON with --json) and its exit code
        online = [u for u in uids if u not in left and u not in nearline]
        data = {"online": online, "nearline": nearline, "queued": left,
                "errors": {u: errors_by_uid[u] for u in left if u in errors_by_uid}}
        lines = [f"{u}: online" for u in online] + [
            f"{u}: nearline, not on tape: read as it is (export, C-MOVE, C-GET), nothing to recall"
            for u in nearline] + [
            f"{u}: recall queued" + (f" (last error: {errors_by_uid[u]})" if u in errors_by_uid else "") for u in left]
        emit(data, as_json, "\n".join(lines))
        if left and wait:
            raise typer.Exit(errors.EXIT_UNAVAILABLE)
