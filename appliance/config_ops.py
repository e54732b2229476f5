"""Operations config: [audit] (issue 12). Kept apart from config.py, which holds the DICOM node."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance.errors import ConfigError

LOG_FORMATS = ("text", "json")  # server.log_format
AUDIT_DESTINATIONS = ("file", "journald", "off")


@dataclass(frozen=True)
class AuditConfig:
    # "file": JSON lines appended to ``path`` (rotated at file_bytes_max; files_max files in all, the current one
    # included: appliance/audit.py FileDestination); "journald": the same JSON
    # lines to journald with SYSLOG_IDENTIFIER=appliance-audit; "off": nothing (not recommended for a PACS).
    destination: str = "file"
    # Relative to the config file's folder, like every other path.
    path: Path = Path("var/audit/audit.jsonl")
    file_bytes_max: int = 64 * 1024 * 1024
    files_max: int = 10
    # Audit lines waiting to be written, per process: above it lines are dropped and counted
    # (appliance_audit_dropped_total), never a reason to slow or fail a C-STORE.
    queue_max: int = 10_000


def validate_audit(audit: AuditConfig) -> None:
    if audit.destination not in AUDIT_DESTINATIONS:
        raise ConfigError(f"audit.destination: {audit.destination!r} is not one of {', '.join(AUDIT_DESTINATIONS)}")
    if audit.file_bytes_max < 1024 * 1024:
        raise ConfigError("audit.file_bytes_max: at least 1048576 (1 MiB)")
    if not 1 <= audit.files_max <= 1000:
        raise ConfigError("audit.files_max: 1 to 1000")
    if not 100 <= audit.queue_max <= 1_000_000:
        raise ConfigError("audit.queue_max: 100 to 1000000")
