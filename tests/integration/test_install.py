"""Issue 13, items 1-2: `make install` into a temporary DESTDIR, `appliance init --data-dir`, and volumes that cannot
fool an admin (never created by serve, named from the config, status says why). Real subprocesses (make, the
installed interpreter, `appliance serve`) and typer's CliRunner, as an admin would run them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from appliance import errors
from appliance.cli import app
from appliance.config import load_config
from appliance.store.volumes import MARKER
from tests.conftest import APPLIANCE, write_config

ROOT = Path(__file__).resolve().parents[2]
DATA = Path("/var/lib/appliance")
UNITS = sorted(p.name for p in (ROOT / "systemd").iterdir() if p.suffix in (".service", ".timer"))


def _make(destdir: Path, target: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), target, f"DESTDIR={destdir}",
                           *(f"{k}={v}" for k, v in env.items())],
                          capture_output=True, text=True, timeout=600)


def _data_paths(config: Path) -> list[Path]:
    cfg = load_config(config, environ={})
    return [cfg.storage.index_path, cfg.commitment.journal_path, cfg.audit.path, cfg.tiering.audit_log,
            *(vc.path for vc in cfg.volumes)]


@pytest.mark.skipif(shutil.which("make") is None, reason="make missing")
def test_make_install_into_a_destdir_then_uninstall_keeps_config_and_data(tmp_path: Path) -> None:
    """The tree `make install` stages is the one the docs and the unit name; the venv is a plain install that runs
    from its final path; uninstall takes the program and units and leaves the config and the data."""
    dest = tmp_path / "root"
    done = _make(dest, "install")
    assert done.returncode == 0, done.stderr[-3000:]
    venv = dest / "opt/appliance/.venv"
    # Units, sysusers.d and tmpfiles.d where docs/operations.md says, as in the repository.
    for unit in UNITS:
        assert (dest / "etc/systemd/system" / unit).read_text() == (ROOT / "systemd" / unit).read_text(), unit
    for kind in ("sysusers.d", "tmpfiles.d"):
        assert (dest / "etc" / kind / "appliance.conf").read_bytes() == \
            (ROOT / "systemd" / kind / "appliance.conf").read_bytes()
    assert "ExecStart=/opt/appliance/.venv/bin/appliance serve -c /etc/appliance/appliance.toml" in \
        (dest / "etc/systemd/system/appliance.service").read_text()
    assert (dest / "opt/appliance/docs/operations.md").is_file()  # the unit's Documentation=
    # The config: absolute data paths under /var/lib/appliance, the layout tmpfiles.d creates; 0640.
    config = dest / "etc/appliance/appliance.toml"
    assert config.stat().st_mode & 0o777 == 0o640
    for path in _data_paths(config):
        assert path.is_absolute() and path.is_relative_to(DATA), path
    assert not (dest / "var").exists()  # nothing created at install time under DESTDIR but the config
    # A non-dev install, byte-compiled (/opt is read-only under the unit), relocated to its final path.
    site = next(venv.glob("lib/python3*/site-packages"))
    assert (site / "appliance/__pycache__").is_dir() and not (site / "appliance.egg-link").exists()
    assert not any((site / name).exists() for name in ("pytest", "mypy", "ruff", "_pytest"))
    assert (venv / "bin/appliance").read_text().startswith("#!/opt/appliance/.venv/bin/python")
    for file in [*(venv / "bin").iterdir(), venv / "pyvenv.cfg"]:
        if file.is_file() and not file.is_symlink():
            assert str(dest) not in file.read_text(errors="replace"), file
    # It runs: the venv's interpreter finds the installed package (its script's shebang names /opt, not here).
    helped = subprocess.run([str(venv / "bin/python"), "-m", "appliance", "--help"], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert helped.returncode == 0 and "serve" in helped.stdout, helped.stderr
    # Uninstall: program, units, snippets gone; the config and the data stay.
    (dest / "var/lib/appliance/volumes").mkdir(parents=True)
    (dest / "var/lib/appliance/volumes/keep").write_text("images")
    done = _make(dest, "uninstall")
    assert done.returncode == 0, done.stderr
    assert "kept" in done.stdout and "/var/lib/appliance" in done.stdout
    assert not (dest / "opt/appliance").exists()
    assert not any((dest / "etc/systemd/system" / unit).exists() for unit in UNITS)
    assert not (dest / "etc/sysusers.d/appliance.conf").exists() and not (dest / "etc/tmpfiles.d/appliance.conf").exists()
    assert config.is_file() and (dest / "var/lib/appliance/volumes/keep").read_text() == "images"


@pytest.mark.skipif(shutil.which("make") is None, reason="make missing")
def test_make_install_never_overwrites_an_admins_config_and_follows_prefix(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    config = dest / "etc/appliance/appliance.toml"
    config.parent.mkdir(parents=True)
    config.write_text('[server]\nport = 104\n')
    # --no-deps: only the package itself (fast); the config step and the paths are what this test is about.
    done = _make(dest, "install", PIP_ARGS="--no-deps", PREFIX="/opt/dicom")
    assert done.returncode == 0, done.stderr[-3000:]
    assert config.read_text() == '[server]\nport = 104\n' and "kept the existing" in done.stdout
    unit = (dest / "etc/systemd/system/appliance.service").read_text()
    assert "ExecStart=/opt/dicom/.venv/bin/appliance serve" in unit and "/opt/appliance/" not in unit
    assert (dest / "opt/dicom/.venv/bin/appliance").read_text().startswith("#!/opt/dicom/.venv/bin/python")


def _checkout_state() -> dict[str, int]:
    """What a build could leave in the checkout: build/ and *.egg-info, each file with its mtime."""
    found = [ROOT / "build", *ROOT.glob("*.egg-info")]
    return {str(f): f.stat().st_mtime_ns for top in found if top.exists() for f in [top, *top.rglob("*")]}


@pytest.mark.skipif(shutil.which("make") is None, reason="make missing")
def test_reinstall_that_fails_keeps_the_installed_program(tmp_path: Path) -> None:
    """A relative DESTDIR (taken from the checkout's folder) is relocated like an absolute one; WITH_BENCH=1 asks
    pip for `.[bench]`; the build leaves nothing in the checkout; a reinstall whose pip fails leaves the venv in
    place and working."""
    dest = tmp_path / "root"
    relative = os.path.relpath(dest, ROOT)
    assert not relative.startswith("/")
    config = dest / "etc/appliance/appliance.toml"  # kept: the --no-deps venv could not run `appliance init`
    config.parent.mkdir(parents=True)
    config.write_text("[server]\nport = 104\n")
    before = _checkout_state()
    report = tmp_path / "pip-report.json"
    done = _make(Path(relative), "install", PIP_ARGS=f"--no-deps --report {report}", WITH_BENCH="1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _checkout_state() == before  # no build/, no *.egg-info written (as root: root-owned) in the checkout
    venv = dest / "opt/appliance/.venv"
    assert (venv / "bin/appliance").read_text().startswith("#!/opt/appliance/.venv/bin/python")
    for file in [*(venv / "bin").iterdir(), venv / "pyvenv.cfg"]:
        if file.is_file() and not file.is_symlink():
            text = file.read_text(errors="replace")
            assert str(dest) not in text and ".venv.new" not in text, file
    (installed,) = [item for item in json.loads(report.read_text())["install"]
                    if item["metadata"]["name"] == "dicom-appliance"]
    assert installed.get("requested_extras") == ["bench"], installed
    works = [str(venv / "bin/python"), "-c", "import appliance, bench; print(appliance.__version__)"]
    assert subprocess.run(works, capture_output=True, timeout=60, cwd=tmp_path).returncode == 0
    # A reinstall whose pip fails (no index: setuptools cannot be fetched to build the wheel): an error, and the
    # installed venv is the one that was there, still working.
    failed = _make(dest, "install", PIP_ARGS="--no-deps --no-index")
    assert failed.returncode != 0, failed.stdout
    ran = subprocess.run(works, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert ran.returncode == 0 and ran.stdout.strip(), ran.stderr
    assert sorted(p.name for p in venv.parent.iterdir() if p.name.startswith(".venv")) == [".venv"]


@pytest.mark.skipif(os.geteuid() != 0, reason="the live-system path of the install needs root")
def test_live_reinstall_is_refused_while_the_service_is_active(tmp_path: Path) -> None:
    """On the live system (root, no DESTDIR) with appliance.service active: one line, exit 75, nothing touched;
    FORCE=1 goes on. systemctl is a stand-in on PATH; PYTHON=false and failing stand-ins for the system tools make
    sure that going on cannot reach the real system (it fails at the venv, under a temporary PREFIX)."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    calls = tmp_path / "calls"
    (stubs / "systemctl").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n'
                                     '[ "$1 $2 $3" = "is-active --quiet appliance.service" ]\n')
    for tool in ("systemd-sysusers", "systemd-tmpfiles", "runuser"):
        (stubs / tool).write_text("#!/bin/sh\nexit 1\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    prefix = tmp_path / "opt"
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "DESTDIR": "", "PREFIX": str(prefix),
           "UNITDIR": str(tmp_path / "units"), "SYSUSERSDIR": str(tmp_path / "sysusers"),
           "TMPFILESDIR": str(tmp_path / "tmpfiles"), "PYTHON": "false"}

    def install(**extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", "scripts/install.sh", "install"], capture_output=True, text=True, timeout=120,
                              cwd=ROOT, env={**env, **extra})

    refused = install()
    assert refused.returncode == 75, refused
    assert refused.stderr.count("\n") == 1 and "appliance.service is active" in refused.stderr
    assert "FORCE=1" in refused.stderr and not prefix.exists()
    assert calls.read_text().splitlines() == ["is-active --quiet appliance.service"]
    forced = install(FORCE="1")
    assert forced.returncode not in (0, 75), forced  # past the check, then PYTHON=false fails the venv
    assert not prefix.exists() or not any(prefix.iterdir())


def test_init_data_dir_puts_every_data_path_under_it(tmp_path: Path) -> None:
    config, data = tmp_path / "etc/appliance.toml", tmp_path / "data"
    result = CliRunner().invoke(app, ["init", "-c", str(config), "--data-dir", str(data)])
    assert result.exit_code == 0, result.output
    for path in _data_paths(config):
        assert path.is_relative_to(data), path
    assert sorted(p.name for p in config.parent.iterdir()) == ["appliance.toml"]  # no data next to the config
    assert (data / "volumes/vol0" / MARKER).is_file() and (data / "index/data.mdb").is_file()
    # --config-only (make install): the file only.
    other = tmp_path / "other.toml"
    result = CliRunner().invoke(app, ["init", "-c", str(other), "--data-dir", str(tmp_path / "d2"), "--config-only"])
    assert result.exit_code == 0 and other.is_file() and not (tmp_path / "d2").exists(), result.output


def test_init_under_etc_without_data_dir_is_refused(tmp_path: Path) -> None:
    target = Path("/etc/appliance-test-i13") / f"{os.getpid()}" / "appliance.toml"
    done = subprocess.run([*APPLIANCE, "init", "-c", str(target)], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert done.returncode == errors.EXIT_USAGE, done
    assert done.stderr.count("\n") == 1 and "--data-dir" in done.stderr
    assert not target.parent.exists()


def _serve(root: Path, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*APPLIANCE, "serve", "-c", str(config)], capture_output=True, text=True, timeout=60,
                          cwd=root)


def test_serve_never_creates_a_volume_inside_an_unmounted_mount_point(tmp_path: Path) -> None:
    """/mnt/raid1 exists (the mount point) and is empty: its filesystem is not mounted. /mnt/raid1/dicom is not
    created on the root disk; serve exits 66, which systemd's RestartPreventExitStatus does not restart."""
    mount_point = tmp_path / "mnt/raid1"
    mount_point.mkdir(parents=True)
    config = write_config(tmp_path, volumes=[{"name": "raid1", "path": str(mount_point / "dicom")}])
    done = _serve(tmp_path, config)
    assert done.returncode == errors.EXIT_VOLUME_REFUSED == 66, done
    assert done.stderr.count("\n") == 1 and "raid1" in done.stderr and "does not exist" in done.stderr
    assert list(mount_point.iterdir()) == []
    unit = (ROOT / "systemd/appliance.service").read_text()
    assert f"RestartPreventExitStatus={errors.EXIT_VOLUME_REFUSED} " in unit
    status = subprocess.run([*APPLIANCE, "status", "--json", "-c", str(config)], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    (volume,) = json.loads(status.stdout)["volumes"]
    assert status.returncode == errors.EXIT_UNAVAILABLE and not volume["accepting"]
    assert "does not exist" in volume["why"]


def test_serve_refuses_a_volume_marked_with_another_name_and_status_says_why(tmp_path: Path) -> None:
    path = tmp_path / "raid1"
    marked = CliRunner().invoke(app, ["volume", "init", str(path), "--name", "vol0"])  # the mistake
    assert marked.exit_code == 0, marked.output
    config = write_config(tmp_path, volumes=[{"name": "raid1", "path": str(path)}])
    done = _serve(tmp_path, config)
    assert done.returncode == 66 and done.stderr.count("\n") == 1 and "marked as volume 'vol0'" in done.stderr
    status = CliRunner().invoke(app, ["status", "-c", str(config)])
    assert status.exit_code == errors.EXIT_UNAVAILABLE
    assert "NOT ACCEPTING" in status.stdout and "marked as volume 'vol0'" in status.stdout


def test_volume_init_takes_the_name_from_the_config(tmp_path: Path) -> None:
    path = tmp_path / "raid1"
    config = write_config(tmp_path, volumes=[{"name": "raid1", "path": str(path)}])
    contradicting = CliRunner().invoke(app, ["volume", "init", str(path), "-c", str(config), "--name", "vol0"])
    assert contradicting.exit_code == errors.EXIT_CONFIG and "is volume 'raid1' in the config" in contradicting.output
    assert not path.exists()
    unknown = CliRunner().invoke(app, ["volume", "init", str(tmp_path / "elsewhere"), "-c", str(config)])
    assert unknown.exit_code == errors.EXIT_CONFIG and "--name" in unknown.output
    done = CliRunner().invoke(app, ["volume", "init", str(path), "-c", str(config)])
    assert done.exit_code == 0, done.output
    assert json.loads((path / MARKER).read_text())["name"] == "raid1"
    status = CliRunner().invoke(app, ["status", "--json", "-c", str(config)])
    assert status.exit_code == 0 and json.loads(status.stdout)["volumes"][0]["accepting"] is True


def test_status_says_a_volume_above_its_watermark_is_not_accepting(tmp_path: Path) -> None:
    path = tmp_path / "vol"
    config = write_config(tmp_path, volumes=[{"name": "v", "path": str(path), "high_watermark": 0.000001}])
    assert CliRunner().invoke(app, ["volume", "init", str(path), "-c", str(config)]).exit_code == 0
    status = CliRunner().invoke(app, ["status", "--json", "-c", str(config)])
    (volume,) = json.loads(status.stdout)["volumes"]
    assert status.exit_code == 0 and not volume["accepting"] and "high watermark" in volume["why"]
