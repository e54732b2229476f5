"""SIGHUP reload (issue 12): a changed [peers] takes effect for the next association while one opened before goes
on; a file that does not parse or validate is refused and the old config keeps serving; what needs a restart is
named. Polled through the log, never a fixed sleep."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from appliance.config import Config, PeerConfig, ServerConfig, VolumeConfig
from appliance.reload import split_reload
from tests.conftest import ServerHandle, dcmtk, wait_for, write_config
from tests.peers import CT

MakeServer = Callable[..., ServerHandle]
IN_FORCE = "configuration in force in worker"


def find(server: ServerHandle, calling_ae: str) -> str:
    result = dcmtk("findscu", "-v", "-S", "-aet", calling_ae, "-aec", "APPLIANCE", "-k", "QueryRetrieveLevel=STUDY",
                   "-k", "StudyInstanceUID", "127.0.0.1", str(server.port))
    return result.stdout + result.stderr


def find_ok(server: ServerHandle, calling_ae: str) -> bool:
    """findscu associated, and its C-FIND was answered (not refused with 0x0124)."""
    out = find(server, calling_ae)
    return "Association Accepted" in out and "0x0124" not in out and "Received Final Find Response (Success)" in out


def reload(server: ServerHandle, expect: str) -> str:
    """SIGHUP, then wait for the next log line containing ``expect``; that line."""
    before = server.log().count(expect)
    in_force = server.log().count(IN_FORCE)
    assert server.proc is not None
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: server.log().count(expect) > before, 20, interval=0.05, what=expect)
    line = [line for line in server.log().splitlines() if expect in line][-1]
    if "configuration reloaded" in line and "nothing changed" not in line:
        # The supervisor accepted the file; the worker swaps it in on its own loop: wait for that, not a sleep.
        wait_for(lambda: server.log().count(IN_FORCE) > in_force, 20, interval=0.05, what="the worker taking it")
    return line


def new_ct() -> Any:
    ds = pydicom.dcmread(CT)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def test_reload_changes_rights_for_the_next_association_and_drops_none(make_server: MakeServer) -> None:
    sections: dict[str, Any] = {"server": {"unknown_peer_rights": ["echo", "store"]},
                                "peers": {"ws": {"ae_title": "WS1", "allow_find": False}}}
    server = make_server(**sections)
    assert server.proc is not None
    refused = "WS1 (peer 'ws', 127.0.0.1) is not allowed to find"
    assert not find_ok(server, "WS1")
    wait_for(lambda: refused in server.log(), 10, interval=0.05, what="the refusal logged")
    # An association opened before the reload, still open across it.
    ae = AE(ae_title="EARLY")
    ae.add_requested_context(CTImageStorage)
    early = ae.associate("127.0.0.1", server.port, ae_title="APPLIANCE")
    assert early.is_established
    assert early.send_c_store(new_ct()).Status == 0

    sections["peers"]["ws"]["allow_find"] = True
    write_config(server.root, **sections)
    line = reload(server, "configuration reloaded")
    assert "peers" in line
    worker_pids = server.worker_pids()
    # The next association has the new rights: findscu from WS1 is answered, and no new refusal is logged.
    assert find_ok(server, "WS1")
    assert server.log().count(refused) == 1
    # The early association was not dropped, and no worker was restarted to apply the change.
    assert early.is_established
    assert early.send_c_store(new_ct()).Status == 0
    early.release()
    assert server.worker_pids() == worker_pids

    # Not TOML: refused with the reason, the config in force (WS1 may find) stays.
    good = server.config_path.read_text()
    server.config_path.write_text(good + "\n[server\n")
    line = reload(server, "reload refused")
    assert "not valid TOML" in line
    assert "ERROR" in line
    assert find_ok(server, "WS1")
    # Valid TOML, invalid value: refused just the same (the whole file is validated before anything is applied).
    sections["peers"]["ws"]["allow_find"] = False  # would revoke; must not take effect with the bad value beside it
    sections["server"]["unknown_peer_rights"] = ["echo", "fly"]
    write_config(server.root, **sections)
    line = reload(server, "reload refused")
    assert "unknown_peer_rights" in line
    assert find_ok(server, "WS1")
    assert server.log().count(refused) == 1

    # A change that needs a restart is named, and the live part of the same file is applied.
    sections["server"]["unknown_peer_rights"] = ["echo", "store"]
    sections["server"]["max_associations"] = 7
    sections["volumes"] = [{"name": "vol0", "path": "var/volumes/vol0", "high_watermark": 0.9}]
    write_config(server.root, **sections)
    before = server.log().count("needs a restart")
    line = reload(server, "configuration reloaded")
    warning = [ln for ln in server.log().splitlines() if "needs a restart" in ln][before:]
    assert warning and "server.max_associations" in warning[0] and "volumes" in warning[0]
    assert "peers" in line
    assert not find_ok(server, "WS1")  # allow_find is false again: refused
    wait_for(lambda: server.log().count(refused) == 2, 10, interval=0.05, what="the second refusal")
    assert server.stop() == 0


def test_a_worker_restarted_after_a_reload_has_the_new_config(make_server: MakeServer) -> None:
    import os

    sections: dict[str, Any] = {"peers": {"ws": {"ae_title": "WS1", "allow_find": False}}}
    server = make_server(**sections)
    sections["peers"]["ws"]["allow_find"] = True
    write_config(server.root, **sections)
    reload(server, "configuration reloaded")
    (pid,) = server.worker_pids()
    os.kill(pid, 9)
    wait_for(lambda: len(server.worker_pids()) == 1 and server.worker_pids() != [pid], 30, interval=0.05,
             what="the worker restarted")
    wait_for(lambda: dcmtk("echoscu", "-to", "2", "-aec", "APPLIANCE", "127.0.0.1", str(server.port)).returncode == 0,
             30, interval=0.1, what="the new worker listening")
    assert find_ok(server, "WS1")
    assert "is not allowed to find" not in server.log()


def test_split_reload_names_every_changed_field() -> None:
    old = Config(server=ServerConfig(port=104, idle_timeout=300.0), peers=(PeerConfig("a", "A"),),
                 volumes=(VolumeConfig("vol0", Path("/v0")),))
    new = Config(server=ServerConfig(port=11112, idle_timeout=60.0, log_level="debug"),
                 peers=(PeerConfig("a", "A", allow_find=False), PeerConfig("b", "B")),
                 volumes=(VolumeConfig("vol0", Path("/v0")), VolumeConfig("vol1", Path("/v1"))))
    change = split_reload(old, new)
    assert set(change.applied) == {"peers", "server.idle_timeout", "server.log_level"}
    assert set(change.needs_restart) == {"server.port", "volumes"}
    # In force: the live changes only.
    assert change.config.peers == new.peers
    assert change.config.server.idle_timeout == 60.0 and change.config.server.port == 104
    assert change.config.volumes == old.volumes
    assert split_reload(old, old).applied == () and split_reload(old, old).config is old


def test_two_sighups_in_a_row_while_a_worker_restarts(make_server: MakeServer) -> None:
    """The races a reload meets: a worker dying as the SIGHUPs arrive (its replacement must start with the config in
    force), and two SIGHUPs back to back (coalesced or applied in turn: the last file wins). Two workers."""
    import os

    sections: dict[str, Any] = {"server": {"workers": 2}, "peers": {"ws": {"ae_title": "WS1", "allow_find": False}}}
    server = make_server(**sections)
    assert server.proc is not None
    pids = server.worker_pids()
    assert len(pids) == 2
    sections["peers"]["ws"]["allow_find"] = True
    write_config(server.root, **sections)
    before = server.log().count("configuration reloaded")
    os.kill(pids[0], 9)
    server.proc.send_signal(signal.SIGHUP)
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: server.log().count("configuration reloaded") > before, 20, interval=0.05, what="the reload")
    wait_for(lambda: len(server.worker_pids()) == 2 and pids[0] not in server.worker_pids(), 30, interval=0.05,
             what="the worker restarted")
    # The surviving worker swaps the config in on its loop; the restarted one starts with it.
    wait_for(lambda: f"{IN_FORCE} {pids[1]}" in server.log(), 20, interval=0.05, what="the surviving worker")
    wait_for(lambda: find_ok(server, "WS1"), 30, interval=0.1, what="the new worker listening")
    # Every worker has the new rights: enough associations that the kernel spreads them over both.
    for _ in range(8):
        assert find_ok(server, "WS1")
    assert "is not allowed to find" not in server.log()
    assert server.stop() == 0


def test_reread_refuses_what_cannot_be_read_or_would_not_validate_in_force(tmp_path: Path) -> None:
    """What a reload meets on disk: a file saved in Latin-1, a folder where the file was, and a file that validates
    alone but not merged with the restart-only parts in force (a policy to a tier only a restart would open). Each
    is refused with a reason (the supervisor keeps its config); none raises out of reread."""
    from appliance.config import load_config
    from appliance.reload import reread

    path = tmp_path / "appliance.toml"
    path.write_text('[server]\nport = 0\n\n[[volumes]]\nname = "vol0"\npath = "v0"\n')
    current = load_config(path)

    path.write_bytes(b'[server]\nport = 0\nae_title = "CAF\xc9"\n')
    refused = reread(current)
    assert isinstance(refused, str) and "UTF-8" in refused

    path.unlink()
    path.mkdir()
    refused = reread(current)
    assert isinstance(refused, str) and str(path) in refused
    path.rmdir()

    (tmp_path / "nl").mkdir()
    path.write_text('[server]\nport = 0\n\n[[volumes]]\nname = "vol0"\npath = "v0"\n\n'
                    '[[tiers]]\nname = "nearline"\nkind = "nearline"\nvolumes = [{name = "nl0", path = "nl"}]\n\n'
                    '[[policies]]\nname = "down"\nfrom = "online"\nto = "nearline"\nreceived_days_min = 1\n')
    load_config(path)  # valid on its own
    refused = reread(current)
    assert isinstance(refused, str) and "nearline" in refused, refused
