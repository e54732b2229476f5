"""Configuration: defaults, the file `appliance init` writes, validation errors that name the key, environment
overrides, path resolution and peers."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from appliance.config import (
    DEFAULT_CONFIG_TOML,
    DEFAULT_TRANSFER_SYNTAXES,
    Config,
    PeerConfig,
    all_storage_sop_classes,
    load_config,
    service_sop_classes,
)
from appliance.errors import EXIT_CONFIG, ConfigError
from tests.conftest import APPLIANCE


def load_text(tmp_path: Path, text: str, environ: dict[str, str] | None = None, name: str = "appliance.toml") -> Config:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return load_config(path, environ={} if environ is None else environ)


def config_error(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, environ)
    assert info.value.exit_code == EXIT_CONFIG
    return str(info.value)


# ---- defaults ---------------------------------------------------------------------------------------


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, environ={})
    assert cfg.server.ae_title == "APPLIANCE"
    assert cfg.server.port == 11112
    assert cfg.server.workers == 0  # one per CPU
    assert cfg.storage.duplicate_policy == "keep-first"
    assert cfg.server.host == "127.0.0.1"  # loopback until the config opens it
    assert cfg.storage.fsync is True
    assert cfg.storage.index_path == tmp_path / "var/index"
    assert [(v.name, v.path, v.high_watermark) for v in cfg.volumes] == [("vol0", tmp_path / "var/volumes/vol0", 0.95)]
    assert all(v.path.is_relative_to(tmp_path / "var") for v in cfg.volumes)
    assert cfg.peers == ()
    assert cfg.source is None
    assert cfg.dicom.transfer_syntaxes == DEFAULT_TRANSFER_SYNTAXES
    assert cfg.dicom.sop_classes[0] == "1.2.840.10008.1.1"  # Verification first
    assert set(cfg.dicom.sop_classes[1:]) == set(service_sop_classes()[1:]) | set(all_storage_sop_classes())
    assert "1.2.840.10008.5.1.4.1.1.2" in cfg.dicom.sop_classes  # CT Image Storage


def test_init_file_equals_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    from_file = load_text(tmp_path, DEFAULT_CONFIG_TOML)
    assert from_file.source == tmp_path / "appliance.toml"
    # The one difference: the file lists its volume (appliance init created it; serve never creates it), the
    # built-in defaults do not (serve creates that one: make run).
    assert not from_file.volumes_builtin and load_config(None, environ={}).volumes_builtin
    assert dataclasses.replace(from_file, source=None, volumes_builtin=True) == load_config(None, environ={})


def test_appliance_init_writes_the_default_file(tmp_path: Path) -> None:
    result = subprocess.run([*APPLIANCE, "init", "-c", "conf.toml"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "conf.toml").read_text() == DEFAULT_CONFIG_TOML
    assert (tmp_path / "var/volumes/vol0/.appliance-volume").is_file()
    assert (tmp_path / "var/index/data.mdb").is_file()
    # A second init refuses to overwrite (usage error).
    again = subprocess.run([*APPLIANCE, "init", "-c", "conf.toml"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 2
    assert "exists" in again.stderr


# ---- errors name the key ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[server]\nprot = 1\n", "server.prot: unknown key"),
        ("[storage]\nfsink = true\n", "storage.fsink: unknown key"),
        ("[[volumes]]\nname = 'v'\npath = 'v'\nwatermark = 0.5\n", "volumes[0].watermark: unknown key"),
        ("[peers.ct]\nae_title = 'CT'\nprot = 104\n", "peers.ct.prot: unknown key"),
        ("[srv]\nport = 1\n", "srv: unknown section"),
        ("[server]\nport = 70000\n", "server.port: 70000 is not a TCP port"),
        ("[server]\nport = -1\n", "server.port"),
        ("[server]\nmetrics_port = 65536\n", "server.metrics_port"),
        ("[server]\nae_title = ''\n", "server.ae_title"),
        ("[server]\nae_title = 'SEVENTEEN_CHARS_X'\n", "server.ae_title"),
        ("[server]\nae_title = 'A\\\\B'\n", "server.ae_title"),
        ("[server]\nae_title = 'ÄRZTE'\n", "server.ae_title"),
        ("[storage]\nduplicate_policy = 'ignore'\n", "storage.duplicate_policy"),
        ("[server]\nport = '11112'\n", "server.port: expected an integer"),
        ("[server]\nport = true\n", "server.port: expected an integer"),
        ("[server]\nport = 11112.0\n", "server.port: expected an integer"),
        ("[server]\nae_title = 5\n", "server.ae_title"),
        ("[server]\nacse_timeout = 'soon'\n", "server.acse_timeout: expected a number"),
        ("[storage]\nfsync = 'yes'\n", "storage.fsync: expected true or false"),
        ("[storage]\nfsync = 1\n", "storage.fsync: expected true or false"),
        ("[storage]\nindex_path = 7\n", "storage.index_path: expected a path"),
        ("[dicom]\ntransfer_syntaxes = '1.2.840.10008.1.2'\n", "dicom.transfer_syntaxes: expected a list"),
        ("[dicom]\nsop_classes = ['CT']\n", "dicom.sop_classes"),
        ("[dicom]\ntransfer_syntaxes = []\n", "dicom.transfer_syntaxes"),
        ("[[volumes]]\nname = 'v'\npath = 'v'\nhigh_watermark = 1.5\n", "volumes[0].high_watermark"),
        ("[[volumes]]\nname = 'v'\npath = 'a'\n[[volumes]]\nname = 'v'\npath = 'b'\n", "volumes[1].name"),
        ("[[volumes]]\nname = 'v'\npath = 3\n", "volumes[0].path: expected a path"),
        ("[peers.ct]\nae_title = 'CT'\nport = 0\n", "peers.ct.port"),
        ("[peers.ct]\nae_title = 'C\\\\T'\n", "peers.ct.ae_title"),
        ("[peers.ct]\nae_title = 'CT'\nallow_store = 'no'\n", "peers.ct.allow_store: expected true or false"),
        ("server = 5\n", "[server] must be a table"),
        ("[server]\nlog_level = 'loud'\n", "server.log_level"),
        ("[server]\nmax_pdu = 100\n", "server.max_pdu"),
        ("[storage]\nindex_map_size = 4096\n", "storage.index_map_size"),
        ("[server\nport = 1\n", "not valid TOML"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in config_error(tmp_path, text)


def test_unknown_key_lists_the_known_ones(tmp_path: Path) -> None:
    message = config_error(tmp_path, "[server]\naetitle = 'X'\n")
    assert "server.aetitle" in message and "ae_title" in message and "port" in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", environ={})


# ---- environment overrides --------------------------------------------------------------------------


def test_env_overrides(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "[server]\nport = 104\n", {
        "APPLIANCE_SERVER_PORT": "11113",
        "APPLIANCE_SERVER_AE_TITLE": '"ARCHIVE"',
        "APPLIANCE_STORAGE_DUPLICATE_POLICY": "reject",  # not TOML: taken as the bare string
        "APPLIANCE_STORAGE_FSYNC": "false",
        "APPLIANCE_STORAGE_COMMIT_MAX_WAIT_MS": "5",
        "OTHER_SERVER_PORT": "1",
        "APPLIANCE_CONFIG": "/elsewhere.toml",  # not a section key: ignored here
    })
    assert cfg.server.port == 11113  # the environment beats the file
    assert cfg.server.ae_title == "ARCHIVE"
    assert cfg.storage.duplicate_policy == "reject"
    assert cfg.storage.fsync is False
    assert cfg.storage.commit_max_wait_ms == 5.0


def test_env_overrides_without_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("APPLIANCE_SERVER_PORT", "4242")
    assert load_config(None).server.port == 4242  # environ=None reads os.environ


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("APPLIANCE_SERVER_PORT", "eleven", "server.port: expected an integer"),
        ("APPLIANCE_SERVER_PORT", "99999", "server.port"),
        ("APPLIANCE_SERVER_PROT", "1", "server.prot: unknown key"),
        ("APPLIANCE_STORAGE_DUPLICATE_POLICY", "keep-last", "storage.duplicate_policy"),
    ],
)
def test_env_override_errors_name_the_key(tmp_path: Path, name: str, value: str, expected: str) -> None:
    assert expected in config_error(tmp_path, "", {name: value})


# ---- paths ------------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    text = (
        "[storage]\nindex_path = 'db/index'\n"
        "[[volumes]]\nname = 'a'\npath = 'vols/a'\n"
        f"[[volumes]]\nname = 'b'\npath = '{tmp_path / 'abs/b'}'\nhigh_watermark = 0.5\n"
    )
    cfg = load_text(tmp_path / "etc", text)
    folder = tmp_path / "etc"
    assert cfg.storage.index_path == folder / "db/index"
    assert [(v.name, v.path, v.high_watermark) for v in cfg.volumes] == [
        ("a", folder / "vols/a", 0.95),
        ("b", tmp_path / "abs/b", 0.5),
    ]
    assert all(isinstance(v.path, Path) for v in cfg.volumes)


def test_default_volume_of_a_config_file_is_beside_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_text(tmp_path / "etc", "[server]\nport = 1\n")
    assert cfg.volumes[0].path == tmp_path / "etc/var/volumes/vol0"
    assert cfg.storage.index_path == tmp_path / "etc/var/index"


def test_home_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_text(tmp_path, "[storage]\nindex_path = '~/idx'\n")
    assert cfg.storage.index_path == tmp_path / "home/idx"


# ---- peers and dicom --------------------------------------------------------------------------------


def test_peers_parsed(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, (
        "[server]\nrefuse_unknown_calling_ae = true\n"
        "[peers.ct1]\nae_title = 'CT1'\nhost = '10.0.0.21'\nport = 104\nallow_store = false\n"
        "[peers.mr]\nae_title = 'MR_SCANNER'\n"
    ))
    assert cfg.server.refuse_unknown_calling_ae is True
    assert cfg.peers == (
        PeerConfig(name="ct1", ae_title="CT1", host="10.0.0.21", port=104, allow_store=False),
        PeerConfig(name="mr", ae_title="MR_SCANNER"),
    )
    assert cfg.peer_by_ae("CT1") is cfg.peers[0]
    assert cfg.peer_by_ae("MR_SCANNER") is cfg.peers[1]
    assert cfg.peer_by_ae("ct1") is None
    assert cfg.peers[1].allow_echo and cfg.peers[1].port == 104 and cfg.peers[1].host == "127.0.0.1"


def test_peer_without_ae_title_is_an_error(tmp_path: Path) -> None:
    assert "peers.ct" in config_error(tmp_path, "[peers.ct]\nhost = 'x'\n")


def test_dicom_lists(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "[dicom]\nsop_classes = ['1.2.840.10008.5.1.4.1.1.2']\n"
                              "transfer_syntaxes = ['1.2.840.10008.1.2']\n")
    assert cfg.dicom.sop_classes == ("1.2.840.10008.5.1.4.1.1.2",)
    assert cfg.dicom.transfer_syntaxes == ("1.2.840.10008.1.2",)
    storage = load_text(tmp_path, "[dicom]\nsop_classes = ['storage']\n")
    assert storage.dicom.sop_classes == ("1.2.840.10008.1.1", *all_storage_sop_classes())


def test_effective_workers(tmp_path: Path) -> None:
    import os

    assert load_text(tmp_path, "[server]\nworkers = 3\n").effective_workers() == 3
    assert load_text(tmp_path, "[server]\nworkers = 0\n").effective_workers() == (os.cpu_count() or 1)
    assert "server.workers" in config_error(tmp_path, "[server]\nworkers = 65\n")
