"""The server's scheduled policy run is fail-stop like a worker: a StorageFault (a failed fsync) ends its process
with the server's storage-fault exit code, which the supervisor turns into stopping the appliance."""

from __future__ import annotations

from pathlib import Path

import pytest

import tiering.run as tier_run
from appliance.config import load_config
from appliance.errors import StorageFault
from appliance.server import EXIT_STORAGE_FAULT


def test_a_storage_fault_in_the_scheduled_run_exits_with_the_storage_fault_code(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_path = tmp_path / "appliance.toml"
    config_path.write_text('[storage]\nindex_path = "index"\n')
    config = load_config(config_path, environ={})

    def failing_run(*_args: object, **_kwargs: object) -> None:
        raise StorageFault("fsync of an archive failed: EIO")

    monkeypatch.setattr(tier_run, "run", failing_run)
    with pytest.raises(SystemExit) as stopped:
        tier_run.scheduled_main(config)
    assert stopped.value.code == EXIT_STORAGE_FAULT == tier_run.STORAGE_FAULT_EXIT


def test_other_errors_only_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.errors import OutOfSpace

    config_path = tmp_path / "appliance.toml"
    config_path.write_text('[storage]\nindex_path = "index"\n')
    config = load_config(config_path, environ={})

    def full_run(*_args: object, **_kwargs: object) -> None:
        raise OutOfSpace("nearline volume full")

    monkeypatch.setattr(tier_run, "run", full_run)
    tier_run.scheduled_main(config)  # the next scheduled run tries again
