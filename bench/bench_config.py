"""The appliance under test, configured as a site configured it: ``appliance bench ... -c FILE``.

A vendor sizing a box (or a site checking its own) wants the figures of *its* configuration: its volumes on its
arrays, its workers, its group-commit and segment settings, its audit trail. The benchmark cannot run that file
as it is: it would listen on the production port, write into the live index and volumes, and refuse the
benchmark's calling AE titles. So the file is read, validated as ``appliance serve`` would, and a copy is written
for each run with only what a benchmark must change:

- every ``[[volumes]]`` entry keeps its name and settings, but its path becomes
  ``<the volume's path>/appliance-bench/<run>/``: the data lands on the same array, in a fresh folder that is
  removed after the run. A configured volume that ``appliance serve`` would refuse (no folder, or no marker:
  the array is not mounted) is refused: measuring the root disk instead would be a wrong datasheet;
- ``[server]``: 127.0.0.1 on free ports (``port = 0``, ``metrics_port = 0``), ``log_level = "warning"``, the
  per-host and per-AE limits raised to at least 64 (every sender of a benchmark is one host, and morning-rush at
  N = 8 opens 48 associations at once), unknown calling AEs allowed to store, no peer-host check;
- the index and the Storage Commitment journal go into ``appliance-bench/<run>/`` beside the site's own index
  (so on the disk the site chose for its index, often not the volumes' array), and the audit trail (a file, or
  journald) into a file in the run's work folder: the site's trail gets none of the benchmark's events;
- ``[peers]``, ``[tls]``, ``[tiering]``, ``[[tiers]]`` and ``[[policies]]`` are dropped: the benchmark measures
  ingest, and a policy run or a TLS handshake would measure something else.
Everything else (``[storage]``, ``[dicom]``, ``[query]``, ``[retrieve]``, ``[audit]`` destination and limits,
``server.workers``...) is the site's.
"""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from appliance.config import Config, _env_overrides, load_config

BENCH_FOLDER = "appliance-bench"
# Sections a benchmark of ingest does not run with (see the module docstring).
DROPPED_SECTIONS = ("peers", "tls", "tiering", "tiers", "policies")
LIMIT_MIN = 64


class BenchConfigError(Exception):
    """The site's configuration cannot be benchmarked as it is (one line for the user)."""


def load_site(path: Path | None) -> SiteConfig | None:
    """``-c``'s file for a bench command (None without ``-c``). One that cannot be benchmarked ends the command as
    every usage error does: one line on stderr, exit 2."""
    if path is None:
        return None
    try:
        return SiteConfig(path)
    except BenchConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


class SiteConfig:
    """A site's configuration file, read and validated once; ``write_run_config`` makes one run's copy."""

    def __init__(self, path: Path) -> None:
        self.path = path.resolve()
        try:
            self.raw: dict[str, Any] = tomllib.loads(self.path.read_text())
            # The APPLIANCE_SERVER_*/STORAGE_*/TLS_* variables the site's appliance would apply over its file:
            # folded into the copy here (what the site runs is measured), and kept from the benchmark's appliance
            # (bench/receivers.py receiver_env), which would otherwise apply a port or an index path to it.
            self.environment = sorted(k for k in os.environ if k.startswith(("APPLIANCE_SERVER_", "APPLIANCE_STORAGE_",
                                                                            "APPLIANCE_TLS_")))
            _env_overrides(self.raw, dict(os.environ))
            self.config: Config = load_config(self.path)
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise BenchConfigError(f"{path}: {exc}") from None
        except Exception as exc:  # appliance.errors.ConfigError and friends: their message is the one line
            raise BenchConfigError(str(exc)) from None
        from appliance.store.volumes import volume_problem

        # What serve checks: the folder exists and holds the volume's marker with its name. A folder that merely
        # exists may be the empty mount point of an array that is not mounted: measuring the root disk under it
        # would be a wrong datasheet.
        problems = [f"volume {vc.name}: {why}" for vc in self.config.volumes if (why := volume_problem(vc))]
        if problems:
            raise BenchConfigError(f"{path}: {'; '.join(problems)}; the benchmark writes into a fresh folder inside "
                                   "each configured volume")
        # Refused here, in one line, rather than as "appliance exited 1 while starting" in every run of the side
        # by side: a folder the benchmark cannot write into (another user's, a read-only mount).
        index_parent = self.config.storage.index_path.parent
        folders = [vc.path for vc in self.config.volumes] + ([index_parent] if index_parent.is_dir() else [])
        unwritable = [str(f) for f in folders if not os.access(f, os.W_OK | os.X_OK)]
        if unwritable:
            raise BenchConfigError(
                f"{path}: cannot write into {', '.join(unwritable)}: run the benchmark as the appliance's user "
                "(or root); it writes into a fresh folder there")
        live = self.serving()
        if live:
            raise BenchConfigError(
                f"{path}: an appliance is serving this configuration (index {live}): the benchmark would write "
                "into its volumes and compete with its ingest; stop it first, or measure it as it runs with "
                "--target HOST:PORT (its volumes then hold the benchmark's images)")

    def leftovers(self) -> list[Path]:
        """What earlier runs left in the ``appliance-bench/`` folders (a run killed with SIGKILL, a power cut):
        said before a run, never removed unasked (another benchmark of the same configuration may be running)."""
        parents = {vc.path / BENCH_FOLDER for vc in self.config.volumes}
        parents.add(self.config.storage.index_path.parent / BENCH_FOLDER)
        return sorted(p for parent in parents if parent.is_dir() for p in parent.iterdir())

    def serving(self) -> Path | None:
        """The site's index when a supervisor holds its serve lock (appliance/server.py), else None. Tried with
        a non-blocking flock that is released at once; a missing lock file is not created."""
        import fcntl

        from appliance.index.db import SERVE_LOCK

        lock = self.config.storage.index_path / SERVE_LOCK
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError:
            return None  # no index yet, or not readable: nothing serves it from here
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return self.config.storage.index_path
        finally:
            os.close(fd)  # also releases the lock when we got it
        return None

    @property
    def ae_title(self) -> str:
        return self.config.server.ae_title

    @property
    def workers(self) -> int:
        return self.config.server.workers

    def volume_roots(self, run: str) -> list[tuple[str, Path]]:
        """(name, the run's folder) of each configured volume."""
        return [(vc.name, vc.path / BENCH_FOLDER / run) for vc in self.config.volumes]

    def index_root(self, run: str) -> Path:
        """The run's folder for the index: beside the site's index, else (its folder does not exist yet, as on a
        box where the appliance never ran) on the first volume."""
        parent = self.config.storage.index_path.parent
        if parent.is_dir():
            return parent / BENCH_FOLDER / run
        return self.config.volumes[0].path / BENCH_FOLDER / run / "meta"

    def describe(self) -> dict[str, Any]:
        """What the datasheet prints of the configuration (no peer names, no hosts: only what shapes ingest)."""
        c = self.config
        return {
            "file": str(self.path),
            "ae_title": c.server.ae_title,
            "workers": c.server.workers,
            "volumes": [{"name": vc.name, "path": str(vc.path), "high_watermark": vc.high_watermark}
                        for vc in c.volumes],
            "storage": {"fsync": c.storage.fsync, "commit_max_batch": c.storage.commit_max_batch,
                        "commit_max_wait_ms": c.storage.commit_max_wait_ms,
                        "writer_lanes": c.storage.writer_lanes, "segment_bytes_max": c.storage.segment_bytes_max,
                        "duplicate_policy": c.storage.duplicate_policy},
            "index_path": str(c.storage.index_path),
            "audit": c.audit.destination,
            "dropped_sections": [s for s in DROPPED_SECTIONS if s in self.raw],
            "environment": self.environment,
        }

    def run_config(self, workdir: Path, run: str, workers: int | None = None) -> dict[str, Any]:
        """The run's configuration as a TOML document (a dict): see the module docstring."""
        raw = {k: _copy(v) for k, v in self.raw.items() if k not in DROPPED_SECTIONS}
        server = raw.setdefault("server", {})
        server.update(host="127.0.0.1", port=0, metrics_port=0, metrics_host="127.0.0.1", log_level="warning",
                      refuse_unknown_calling_ae=False, check_peer_host=False)
        rights = set(server.get("unknown_peer_rights", ["echo", "store"])) | {"echo", "store"}
        server["unknown_peer_rights"] = sorted(rights)
        for key in ("max_associations_per_host", "max_associations_per_ae", "max_associations"):
            current = getattr(self.config.server, key)
            server[key] = max(current, LIMIT_MIN)
        if workers is not None:
            server["workers"] = workers
        roots = self.volume_roots(run)
        meta = self.index_root(run)
        raw.setdefault("storage", {})["index_path"] = str(meta / "index")
        raw.setdefault("commitment", {})["journal_path"] = str(meta / "commitments")
        audit = raw.setdefault("audit", {})
        if audit.get("destination", "file") != "off":
            # journald too: the site's audit trail (what its SIEM collects) must not get the benchmark's
            # thousands of stores; a JSON line per event is still written, into the run's folder.
            audit["destination"] = "file"
            audit["path"] = str(workdir / "audit" / "audit.jsonl")
        raw["volumes"] = [{**_copy(entry), "path": str(root)}
                          for entry, (_name, root) in zip(self._volume_entries(), roots, strict=True)]
        return raw

    def _volume_entries(self) -> list[dict[str, Any]]:
        entries = self.raw.get("volumes")
        if entries:
            return [dict(e) for e in entries]
        return [{"name": vc.name, "path": str(vc.path)} for vc in self.config.volumes]  # the built-in default

    def write_run_config(self, workdir: Path, run: str, workers: int | None = None) -> Path:
        """Write the run's config into ``workdir`` and create (``volume init``) each volume's run folder.
        Returns the config's path. The run folders are removed by ``remove_run``."""
        from appliance.store.volumes import init_volume

        doc = self.run_config(workdir, run, workers)
        path = workdir / "appliance.toml"
        path.write_text(tomli_w.dumps(doc))
        load_config(path)  # what serve will read: refuse here, with the reason, rather than in the receiver's log
        for name, root in self.volume_roots(run):
            init_volume(root, name)
        return path

    def remove_run(self, run: str) -> None:
        import shutil

        for root in [self.index_root(run), *(r for _n, r in self.volume_roots(run))]:
            shutil.rmtree(root, ignore_errors=True)
            try:
                root.parent.rmdir()  # appliance-bench/, when no other run is in it
            except OSError:
                pass


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
