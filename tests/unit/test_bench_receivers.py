"""bench/receivers.py: a receiver that fails to start leaves no process behind, and the harness's C-ECHO is its
own (not whatever ``echoscu`` is first on PATH)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from bench import receivers
from tests.conftest import free_port


class Dies(receivers.Receiver):
    """Forks a long-lived child (as the appliance forks its workers) and exits before answering."""

    label = "dies"

    def command(self) -> list[str]:
        self.port = free_port()
        return ["sh", "-c", f"sleep 300 & echo $! > {self.workdir}/child.pid; exit 3"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not running: only its parent has not reaped it yet
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"


def test_a_receiver_that_fails_to_start_leaves_no_process(tmp_path: Path) -> None:
    receiver = Dies(tmp_path)
    with pytest.raises(RuntimeError, match="exited 3 while starting"):
        receiver.start()
    child = int((tmp_path / "child.pid").read_text())
    receivers.wait_for(lambda: not alive(child), 10, "the orphaned child to be killed")


def test_stop_kills_what_is_left_of_the_group(tmp_path: Path) -> None:
    class Stays(Dies):
        def command(self) -> list[str]:
            self.port = free_port()
            return ["sh", "-c", f"sleep 300 & echo $! > {self.workdir}/child.pid; trap 'exit 0' TERM; "
                    "while :; do sleep 0.1; done"]

    receiver = Stays(tmp_path)
    cmd = receiver.command()
    receiver.proc = subprocess.Popen(cmd, start_new_session=True)
    receivers.wait_for(lambda: (tmp_path / "child.pid").exists(), 10, "the child")
    child = int((tmp_path / "child.pid").read_text())
    receiver.stop(timeout=10)  # the shell exits on SIGTERM; its child would outlive it
    receivers.wait_for(lambda: not alive(child), 10, "the child to be killed with the group")
    assert receiver.proc.returncode is not None


def test_echo_is_false_on_a_closed_port() -> None:
    assert receivers.echo("ANY", free_port()) is False
