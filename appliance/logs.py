"""Log formats (issue 12 item 6): ``server.log_format`` = "text" or "json", on stderr, where systemd's journald
(or the terminal, or a container runtime) reads them. docs/operations.md "Logs".

"text" under journald (JOURNAL_STREAM names our stderr, see systemd.exec(5)): each line starts with its syslog
priority, "<6>", which journald turns into the entry's PRIORITY (so `journalctl -p warning` works), and carries no
timestamp, since journald stamps every entry itself. Anywhere else: a timestamp first, as before.

"json": one JSON object per line (time, level, logger, pid, message, then the record's extras), with the same
"<N>" prefix under journald (it goes into PRIORITY; the entry's MESSAGE is the JSON object). The standard
library's json and logging do it in a few lines, so no dependency (python-json-logger would add a package to
audit and update for what ``JsonFormatter.format`` below does).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

TEXT_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
JOURNAL_FORMAT = "%(levelname)s [%(process)d] %(name)s: %(message)s"
# The attributes every LogRecord has: anything else was passed with extra={...} and goes into the JSON line.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def syslog_priority(levelno: int) -> int:
    """syslog(3) priority of a logging level: 7 debug, 6 info, 4 warning, 3 error, 2 critical."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    return 6 if levelno >= logging.INFO else 7


def under_journald(stream: TextIO) -> bool:
    """True when ``stream`` is the journal stream systemd connected (JOURNAL_STREAM = "device:inode" of it): a
    child that inherited the variable but writes elsewhere (a shell redirect) keeps timestamps."""
    value = os.environ.get("JOURNAL_STREAM", "")
    if not value:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return value == f"{st.st_dev}:{st.st_ino}"


class JournalFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        # Continuation lines (a traceback) keep the priority: journald splits the stream at newlines.
        prefix = f"<{syslog_priority(record.levelno)}>"
        return prefix + text.replace("\n", "\n" + prefix)


class JsonFormatter(logging.Formatter):
    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal  # "<N>" first: journald strips it into PRIORITY, the MESSAGE stays pure JSON

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in line:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        text = json.dumps(line, default=str, ensure_ascii=False)  # one line: json escapes the newlines
        return f"<{syslog_priority(record.levelno)}>{text}" if self.journal else text


def formatter(log_format: str, stream: TextIO) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter(journal=under_journald(stream))
    return JournalFormatter() if under_journald(stream) else logging.Formatter(TEXT_FORMAT)


def configure(level: str, log_format: str = "text", stream: TextIO | None = None) -> None:
    """The root logger's one handler, on stderr, in ``log_format``."""
    stream = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(stream)
    handler.set_name("appliance")
    handler.setFormatter(formatter(log_format, stream))
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == "appliance":  # ours from an earlier call (a test); others' (pytest's) stay
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
