"""`appliance delete UID` and `appliance hold`: deleting on purpose, and the legal holds that forbid it
(appliance/index/deletion.py). ``register(app)`` adds the commands (cli.py owns the app).

Who deleted is the OS user (SUDO_USER when run through sudo: the person, not root), written to the audit trail
with the time, the UID, the counts and the reason, and to the log."""

from __future__ import annotations

import getpass
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from appliance import errors
from appliance.audit import SUCCESS, write_once
from appliance.cli_common import emit, human_bytes, human_ns, load_cli_config, open_index
from appliance.config import Config

if TYPE_CHECKING:
    from appliance.index.db import StudyIndex
    from appliance.index.deletion import Deletion

log = logging.getLogger("appliance.delete")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output")]
ReasonOpt = Annotated[str, typer.Option("--reason", help="Why (written to the audit trail)")]


def who() -> str:
    """The person at the keyboard: sudo's caller rather than root."""
    return os.environ.get("SUDO_USER") or getpass.getuser()


def interactive() -> bool:
    """A person can answer a prompt (a module function so that tests can stand in for a terminal)."""
    return sys.stdin.isatty()


def _fail(exc: errors.ApplianceError) -> errors.ApplianceError:
    """The error as is: the root group (cli_common.RootGroup) prints it as one line, or as JSON with --json."""
    return exc


def describe(d: Deletion, verb: str) -> str:
    copies = ", ".join(f"{n} on {backend}" for backend, n in sorted(d.copies.items())) or "none"
    within = "" if d.level == "study" else f" (study {d.study_uid})"
    return f"{verb} {d.level} {d.uid}{within}: {d.instances} instance(s), {human_bytes(d.bytes)}; copies: {copies}"


def audit_lost(what: str, why: str) -> None:
    """The operation is done and stands; its audit line is not written (the loss is also counted in
    appliance_audit_dropped_total and logged). One line on stderr, so that the person (or the job's log) knows."""
    log.error("audit: the %s line was not written: %s", what, why)
    typer.echo(f"warning: {what} done, but its audit line was not written ({why})", err=True)


def delete_uid(cfg: Config, index: StudyIndex, uid: str, user: str, reason: str, why: str,
               expect: Deletion | None = None) -> tuple[Deletion, str | None]:
    """Delete one UID from the index, durably, and write the audit line and the log line. Under tiering.lock, so
    that no mover copies the study meanwhile (a mover's copies of bytes freed under it would stay dead).
    ``expect``: the preview the person confirmed (errors.Changed if the UID names other instances now). Returns
    the deletion and, if the audit line could not be written, why (the deletion stands: it is durable first)."""
    from tiering.run import tiering_lock

    with tiering_lock(cfg.storage.index_path, f"appliance delete by {user}"):
        done = index.delete(uid, {vol.name for vol in cfg.volumes}, expect=expect)
    if done is None:
        raise errors.NotFound(f"no study, series or instance {uid} in the index")
    lost = write_once(cfg.audit, cfg.server.ae_title, "delete", SUCCESS, study_uid=done.study_uid,
                      instances=done.instances, bytes=done.bytes, level=done.level, uid=done.uid, user=user,
                      reason=reason or None, why=why, scope="instances")
    log.warning("deleted %s %s (study %s): %d instance(s), %d bytes, by %s (%s)%s", done.level, done.uid,
                done.study_uid, done.instances, done.bytes, user, why, f": {reason}" if reason else "")
    if lost is not None:
        audit_lost("delete", lost)
    return done, lost


def register(app: typer.Typer) -> None:
    @app.command("delete")
    def delete(
        uid: Annotated[str, typer.Argument(help="A Study, Series or SOP Instance UID")],
        config: ConfigOpt = None,
        yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask (scripts)")] = False,
        reason: ReasonOpt = "",
        as_json: JsonOpt = False,
    ) -> None:
        """Delete a study, series or instance: the index forgets it at once (C-FIND, C-MOVE, C-GET, export no
        longer find it); `appliance compact` (online) and `appliance tier run` (emptied tier archives) reclaim the
        bytes. Asks for confirmation unless --yes; refused for a study under legal hold."""
        try:
            cfg = load_cli_config(config)
            user = who()
            with open_index(cfg) as index:
                plan = index.preview_delete(uid)
                if plan is None:
                    raise errors.NotFound(f"no study, series or instance {uid} in the index")
                if index.held(plan.study_uid):
                    raise errors.OnHold(f"study {plan.study_uid} is under legal hold (appliance hold --release "
                                        "first)")
                if not yes:
                    if not interactive():
                        typer.echo("error: not deleting without confirmation: stdin is not a terminal (--yes for "
                                   "scripts)", err=True)
                        raise typer.Exit(errors.EXIT_USAGE)
                    typer.echo(describe(plan, "will delete"), err=as_json)
                    if not typer.confirm("Delete?", default=False, err=as_json):
                        typer.echo("error: not deleted", err=True)
                        raise typer.Exit(errors.EXIT_FAILURE)
                # Confirmed: the delete checks, in its own transaction, that the UID still names exactly the
                # previewed instances (a study that grew while the person read the prompt is not deleted).
                done, lost = delete_uid(cfg, index, uid, user, reason, "appliance delete", expect=None if yes else plan)
        except errors.ApplianceError as exc:
            raise _fail(exc) from None
        data = {**done.public(), "user": user, "reason": reason, "deleted": True, "audit_written": lost is None}
        emit(data, as_json, describe(done, "deleted") + "\n(`appliance compact` reclaims the space online)")

    @app.command("hold")
    def hold(
        study_uid: Annotated[str | None, typer.Argument(help="A Study Instance UID")] = None,
        release: Annotated[bool, typer.Option("--release", help="Release the hold on STUDY_UID")] = False,
        list_: Annotated[bool, typer.Option("--list", help="List the holds")] = False,
        reason: ReasonOpt = "",
        config: ConfigOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Legal hold: a held study is never deleted (`appliance delete`, retention rules). Tier moves go on (a
        move keeps the data)."""
        from appliance.index.deletion import HoldRecord

        try:
            cfg = load_cli_config(config)
            if list_:
                if study_uid is not None or release:
                    raise errors.ApplianceError("--list takes no STUDY_UID and no --release")
                with open_index(cfg) as index:
                    holds = index.holds()
                rows = [{"study_uid": uid, "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(h.since_ns / 1e9)),
                         "since_ns": h.since_ns, "by": h.by, "reason": h.reason} for uid, h in holds]
                # Human output: local ISO time, as every time the CLI prints for a person; --json keeps UTC and ns.
                emit(rows, as_json, "\n".join(f"{uid}  since {human_ns(h.since_ns)} by {h.by}"
                                              f"{'  ' + h.reason if h.reason else ''}" for uid, h in holds)
                     or "no holds")
                return
            if study_uid is None:
                raise errors.ApplianceError("STUDY_UID is required (or --list)")
            user = who()
            from appliance.store.compact import compaction_lock

            # An in-place `index rebuild` holds the compaction lock while it builds the index that replaces this
            # one: wait for it, so the hold lands in the index in force (not in the one renamed to .old).
            with compaction_lock(cfg.storage.index_path, wait=True), open_index(cfg) as index:
                level = index.lookup(study_uid)
                if level is not None and level[0] != "studies":
                    raise errors.ApplianceError(f"{study_uid} is a {level[0][:-1]} UID: a hold names a study")
                changed = (index.release(study_uid) if release else
                           index.hold(study_uid, HoldRecord(time.time_ns(), user, reason)))
            if not changed:
                raise errors.NotFound(f"study {study_uid} has no hold") if release else \
                    errors.ApplianceError(f"study {study_uid} is already on hold")
            action = "hold released" if release else "hold placed"
            lost = write_once(cfg.audit, cfg.server.ae_title, "hold", SUCCESS, study_uid=study_uid, user=user,
                              reason=reason or None, released=release or None)
            if lost is not None:
                audit_lost(action, lost)
            log.warning("%s on study %s by %s%s", action, study_uid, user, f": {reason}" if reason else "")
        except errors.ApplianceError as exc:
            raise _fail(exc) from None
        emit({"study_uid": study_uid, "held": not release, "user": user, "reason": reason}, as_json,
             f"{action}: study {study_uid}")
