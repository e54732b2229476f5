"""The audit log: one JSON line per move (and, from the recaller and scrub, per recall and finding), appended,
flushed and fsynced before the next move starts, so the log is as durable as what it reports. No patient data:
study UIDs, tier names, counts, bytes, seconds, outcomes."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any


class AuditLog:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._lock = threading.Lock()

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one line ``{"ts": ISO time, "event": event, **fields}``; durable on return."""
        line = {"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event, **fields}
        raw = (json.dumps(line, sort_keys=False, separators=(",", ":")) + "\n").encode()
        with self._lock:
            os.write(self._fd, raw)  # one write of an O_APPEND file: lines of two writers never interleave
            os.fsync(self._fd)
        return line

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def read_audit(path: Path, lines_max: int = 100_000) -> list[dict[str, Any]]:
    """The last ``lines_max`` lines (for tests and `tier status`); a torn last line (a crash mid-write) is
    skipped."""
    if not path.exists():
        return []
    out = []
    with path.open("rb") as fh:
        for raw in fh:
            try:
                out.append(json.loads(raw))
            except ValueError:
                continue
            if len(out) > lines_max:
                out.pop(0)
    return out
