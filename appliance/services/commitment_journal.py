"""The Storage Commitment requests a worker has answered and not yet reported, one small JSON file each, so that a
worker that stops (SIGTERM, crash, kill -9) reports them when it starts again instead of leaving the requester
without an answer.

Layout: ``<commitment.journal_path>/worker-<N>/<name>.json``. A file is written (fsync'd, renamed into place,
folder fsync'd) before the N-ACTION-RSP says Success and deleted once its report is delivered, dropped or given
up. Worker N takes up its own folder when it starts; worker 0 also takes over the folders of worker numbers that
no longer run (fewer workers than before). The files hold UIDs and the calling AE title: no patient data.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class JournalEntry:
    transaction_uid: str
    calling_ae: str
    references: list[tuple[str, str]]  # (SOP Class UID, SOP Instance UID)
    name: str = ""  # the file's name in the worker's folder


class Journal:
    def __init__(self, root: Path, worker: int, fsync: bool = True) -> None:
        self.root = root
        self.worker = worker
        self.folder = root / f"worker-{worker}"
        self.fsync = fsync

    def add(self, entry: JournalEntry) -> str:
        """Write ``entry`` durably; its file name. Blocking: call it in a thread."""
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{uuid.uuid4().hex}.json"
        tmp = self.folder / f".{name}.tmp"
        data = json.dumps({"transaction_uid": entry.transaction_uid, "calling_ae": entry.calling_ae,
                           "references": entry.references}).encode()
        with open(tmp, "wb") as fh:
            fh.write(data)
            if self.fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, self.folder / name)
        self._sync_folder()
        entry.name = name
        return name

    def remove(self, name: str) -> None:
        (self.folder / name).unlink(missing_ok=True)  # not fsync'd: a lost delete only repeats a report

    def _sync_folder(self) -> None:
        if not self.fsync:
            return
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def take_up(self, workers: int) -> list[JournalEntry]:
        """The entries this worker must report after a restart: its own, and (worker 0) those of worker folders
        numbered ``workers`` or more, moved into its own folder first. Unreadable files are set aside as
        ``*.bad`` and logged."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.worker == 0:
            for other in sorted(self.root.glob("worker-*")):
                suffix = other.name.removeprefix("worker-")
                if suffix.isdigit() and int(suffix) >= workers:
                    for path in other.glob("*.json"):
                        os.replace(path, self.folder / path.name)
        for stale in self.folder.glob(".*.tmp"):  # written but never renamed: never answered with Success
            stale.unlink(missing_ok=True)
        entries = []
        for path in sorted(self.folder.glob("*.json")):
            try:
                raw = json.loads(path.read_bytes())
                entries.append(JournalEntry(str(raw["transaction_uid"]), str(raw["calling_ae"]),
                                            [(str(c), str(i)) for c, i in raw["references"]], path.name))
            except (OSError, ValueError, KeyError, TypeError):
                log.error("storage commitment journal: %s is unreadable, set aside as .bad", path.name)
                os.replace(path, path.with_suffix(".bad"))
        return entries
