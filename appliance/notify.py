"""systemd's service notification protocol (sd_notify(3)), written to its documented socket interface.

One datagram of ``KEY=VALUE`` lines to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a path, or an abstract
name starting with "@"). Outside systemd the variable is unset and every call is a no-op, so the same code runs
under `make run`, the tests and the unit. Thirty lines of our own instead of a dependency: the protocol is one
sendto(), and the PyPI wrappers are either unmaintained (sdnotify, 2017) or need libsystemd at build time.

What the appliance sends (docs/operations.md "systemd"):
- ``READY=1`` once recovery is done and every worker listens;
- ``RELOADING=1`` + ``MONOTONIC_USEC`` at a SIGHUP, then ``READY=1`` when the new config is in force or refused;
- ``STOPPING=1`` when the drain starts;
- ``WATCHDOG=1`` from the supervisor's loop, every ``watchdog_interval_s()``;
- ``STATUS=...`` a one-line human summary (no patient data).
"""

from __future__ import annotations

import os
import socket
import time

_MESSAGE_BYTES_MAX = 4096  # our messages are a few lines; a bound so a caller's STATUS cannot grow without limit


def notify(*lines: str) -> bool:
    """Send ``lines`` (each ``KEY=VALUE``) to systemd. True if sent; False outside systemd or if the socket is
    gone (a notification is advice to the service manager, never a reason for the appliance to fail)."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    message = "\n".join(lines).encode("utf-8", "replace")[:_MESSAGE_BYTES_MAX]
    target = "\0" + address[1:] if address[0] == "@" else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, target)
    except OSError:
        return False
    return True


def ready(status: str = "") -> bool:
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def reloading() -> bool:
    # MONOTONIC_USEC tells systemd which reload this is (Type=notify-reload needs it; plain notify accepts it).
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def stopping(status: str = "") -> bool:
    return notify("STOPPING=1", *([f"STATUS={status}"] if status else []))


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def watchdog_interval_s() -> float:
    """How often to send WATCHDOG=1: half of ``$WATCHDOG_USEC`` (as sd_watchdog_enabled(3) advises), 0 when the
    unit has no WatchdogSec or the variable is meant for another process (``$WATCHDOG_PID``)."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return 0.0
    pid = os.environ.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return 0.0
    return usec / 2_000_000
