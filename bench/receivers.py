"""The receivers the benchmarks start on 127.0.0.1, each with a fresh data folder and a documented config:
the appliance (``python -m appliance serve``), DCMTK ``storescp --fork`` and Orthanc; plus the small process
helpers they need. Used by bench/compare.py (burst and scenario modes) and bench/driver.py (--start-appliance).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.bench_config import SiteConfig

ROOT = Path(__file__).resolve().parent.parent


# What appliance/config.py reads from the environment over the file (``APPLIANCE_SERVER_PORT``...), and the
# config file's location.
CONFIG_ENV_PREFIXES = ("APPLIANCE_SERVER_", "APPLIANCE_STORAGE_", "APPLIANCE_TLS_", "APPLIANCE_CONFIG")


def receiver_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a receiver we start: ours without the configuration overrides. load_config applies
    ``APPLIANCE_SERVER_PORT``, ``APPLIANCE_STORAGE_INDEX_PATH``, ``APPLIANCE_TLS_ENABLED``... over the file, so
    a variable exported for the site's own appliance (a shell, a unit's Environment=) would otherwise put the
    benchmark's appliance on the production port or into the live index. bench/bench_config.py folds the
    variables into the site's configuration before the run's copy is written, so ``-c`` still measures them."""
    env = dict(os.environ if environ is None else environ)
    return {k: v for k, v in env.items() if not k.startswith(CONFIG_ENV_PREFIXES)}


DCMTK_ENV = {**receiver_env(), "TCP_NODELAY": "1"}  # DCMTK keeps Nagle on unless told otherwise
CLK_TCK = os.sysconf("SC_CLK_TCK")
RECEIVERS = ("appliance", "storescp", "orthanc")
START_TIMEOUT = 60.0
# The CPUs the receivers we start may run on (None: all). ``appliance bench datasheet --sender-cpus`` pins the
# sender to some CPUs and the receivers to the others, so that on a small box they do not take turns on a core.
RECEIVER_CPUS: set[int] | None = None


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the session a receiver was started in (``start_new_session``): its workers or --fork children too,
    even once its leader has exited; then reap the leader. The one way the harness makes sure no receiver outlives
    its run."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


def _pin_receiver() -> None:
    """Popen's preexec_fn: the child (and all it forks: workers, storescp --fork children) on RECEIVER_CPUS."""
    if RECEIVER_CPUS:
        os.sched_setaffinity(0, RECEIVER_CPUS)


# ---- small helpers ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "", interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy; TimeoutError after ``timeout`` seconds. The one
    way the harness and the tests wait for a process, port or file (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what or predicate}")
        time.sleep(interval)


def echo(ae: str, port: int, host: str = "127.0.0.1") -> bool:
    """One C-ECHO with our own client (appliance/net/client.py), in this process: not DCMTK's ``echoscu``, which
    a venv's ``bin`` first on PATH shadows with pynetdicom's script of the same name (other options, other exit
    codes)."""
    import asyncio

    from appliance.net.client import ClientAssociation

    verification, implicit_le = "1.2.840.10008.1.1", "1.2.840.10008.1.2"

    async def once() -> int:
        assoc = await asyncio.wait_for(ClientAssociation.open(host, port, ae, "BENCHECHO",
                                                              [(verification, [implicit_le])], 1 << 16), 5)
        try:
            return await asyncio.wait_for(assoc.echo(), 5)
        finally:
            await asyncio.wait_for(assoc.release(), 5)

    try:
        return asyncio.run(once()) == 0
    except Exception:  # refused, reset, timed out, rejected: not answering yet
        return False


def first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    lines = [line.strip() for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    return lines[0] if lines else "?"


def _proc_table() -> tuple[dict[int, list[int]], dict[int, float]]:
    """(children by parent pid, CPU seconds by pid) for every process, from /proc."""
    children: dict[int, list[int]] = {}
    stats: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
        stats[int(entry)] = sum(int(v) for v in fields[11:15]) / CLK_TCK  # utime stime cutime cstime
    return children, stats


def proc_tree(root_pid: int, children: dict[int, list[int]] | None = None) -> list[int]:
    """A process and all its live descendants."""
    if children is None:
        children = _proc_table()[0]
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def proc_tree_cpu(root_pid: int) -> float:
    """CPU seconds (user+sys, own and of reaped children) of a process and all its live descendants."""
    children, stats = _proc_table()
    return sum(stats.get(pid, 0.0) for pid in proc_tree(root_pid, children))


def system_cpu() -> tuple[float, float, float]:
    """(busy, iowait, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (values + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy / CLK_TCK, iowait / CLK_TCK, (busy + idle + iowait) / CLK_TCK


def disk_io(path: Path) -> tuple[int, int, int | None] | None:
    """(write requests, bytes written, flush requests) completed so far by the block device holding ``path``,
    from /sys/dev/block/MAJ:MIN/stat (Documentation/admin-guide/iostats.rst; kernel 5.5+ counts flushes);
    None where that is not readable (tmpfs, overlay, another OS). Every fsync/fdatasync that reaches the disk
    costs one flush request: a durable receiver's flushes per instance, next to the disk's flushes/s, tell how
    close to the device it runs. The kernel counts flushes on whole disks only: for a partition they are read
    from its disk (which other partitions share); for device-mapper and md devices (LVM, dm-crypt, software
    RAID), which never count them, flushes are None rather than a misleading 0."""
    try:
        dev = os.stat(path).st_dev
        node = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
        fields = (node / "stat").read_text().split()
        if (node / "partition").exists():
            disk_fields = (node.resolve().parent / "stat").read_text().split()
        else:
            disk_fields = fields
    except OSError:
        return None
    if len(fields) < 7:
        return None
    flushes: int | None = int(disk_fields[15]) if len(disk_fields) >= 17 else None
    if (node / "dm").exists() or (node / "md").exists():
        flushes = None
    return int(fields[4]), int(fields[6]) * 512, flushes


def disk_delta(before: tuple[int, int, int | None] | None, path: Path) -> dict[str, int | None] | None:
    """What the disk did since ``before`` (see disk_io): ``writes``, ``bytes_written``, ``flushes`` (None when the
    device does not count them)."""
    after = disk_io(path)
    if before is None or after is None:
        return None
    flushes = after[2] - before[2] if after[2] is not None and before[2] is not None else None
    return {"writes": after[0] - before[0], "bytes_written": after[1] - before[1], "flushes": flushes}


def rotated(items: list[Any], k: int) -> list[Any]:
    """``items`` starting at position ``k`` (modulo its length). The compares rotate the receivers from one cell
    to the next, so that no receiver is always the one run just after another run's data was deleted: on a
    journal-less ext4 that run pays for allocating inodes among the recently deleted ones (docs/benchmarks.md,
    Caveats), and with a fixed order the first receiver paid it every time."""
    if not items:
        return []
    k %= len(items)
    return items[k:] + items[:k]


def count_files(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.access("/usr/sbin/Orthanc", os.X_OK) else None)



# ---- receivers ----------------------------------------------------------------------------------------


class Receiver:
    """One receiver process with its own data folder. ``start`` returns once it answers a C-ECHO."""

    label = "?"
    ae = "?"
    fsync = "?"
    host = "127.0.0.1"
    measures_cpu = True  # its process tree is here: CPU seconds are known
    counts_stored = True  # its storage is here: what it holds can be counted after the run

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.metrics_url: str | None = None  # the appliance's /metrics once started; None for the others
        self.log_path = workdir / "receiver.log"
        self.extra_env: dict[str, str] = {}

    @staticmethod
    def available() -> str | None:
        """None when installed, else why not."""
        return None

    def command(self) -> list[str]:
        raise NotImplementedError

    def storage(self) -> Path:
        """The folder holding what the receiver stored."""
        raise NotImplementedError

    def stored_count(self) -> int:
        """How many instances the receiver holds after stop (one file per instance, by default)."""
        return count_files(self.storage())

    def wait_port(self) -> None:
        pass

    def start(self) -> None:
        cmd = self.command()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                         env={**DCMTK_ENV, **self.extra_env}, start_new_session=True,
                                         preexec_fn=_pin_receiver if RECEIVER_CPUS else None)

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited {self.proc.returncode} while starting:\n{self.log_tail()}")
            return echo(self.ae, self.port, self.host)

        try:
            self.wait_port()
            wait_for(ready, START_TIMEOUT, f"{self.label} to answer C-ECHO on port {self.port}")
        except BaseException:
            self.kill()  # a receiver that failed to start leaves no process behind (workers included)
            raise

    def cleanup(self) -> None:
        """Remove what the run wrote outside ``workdir`` (the caller removes workdir itself)."""

    def data_path(self) -> Path:
        """A folder on the disk the receiver writes its instances to (for the disk's I/O counters)."""
        return self.workdir

    def cpu_seconds(self) -> float:
        return proc_tree_cpu(self.proc.pid) if self.proc is not None else 0.0

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (a clean shutdown: the appliance drains, Orthanc closes its index), SIGKILL if it hangs; then
        whatever is left of its process group (an appliance worker whose supervisor died, storescp --fork
        children) is killed, so that no receiver outlives its run."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"  warning: {self.label} ignored SIGTERM for {timeout:.0f}s; killing it", file=sys.stderr)
        self.kill()

    def kill(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class ApplianceReceiver(Receiver):
    ae = "APPLIANCE"

    def __init__(self, workdir: Path, workers: int | None = 0, fsync: bool = True, source: Path | None = None,
                 site: SiteConfig | None = None) -> None:
        """``site``: a site's configuration file (``-c``), run as bench/bench_config.py describes; ``workers``
        None then means the file's."""
        super().__init__(workdir)
        self.site = site
        self.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{workdir.name}"
        if workers is None:
            workers = site.workers if site is not None else 0
        self.workers = workers
        self.fsync_on = fsync if site is None else site.config.storage.fsync
        self.source = source
        self.fsync = ("segment append + fdatasync per group, LMDB commit, before Success" if self.fsync_on
                      else "OFF (storage.fsync = false)")
        if site is not None:
            self.ae = site.ae_title
        # workers = 0 is the product default (one per CPU): the label says how many that made
        self.label = f"appliance-w{workers or os.cpu_count() or 1}" + ("" if self.fsync_on else "-nofsync")
        if source is not None:
            # Another checkout of the appliance (APPLIANCE_BENCH_BASE): the same harness, the code before a change.
            self.label = f"base-w{workers or os.cpu_count() or 1}"
            self.fsync = f"as in {source}"
            self.extra_env = {"PYTHONPATH": str(source)}
        self.port_file = workdir / "port.json"
        self.config_path = workdir / "appliance.toml"

    def command(self) -> list[str]:
        if self.site is not None:
            self.config_path = self.site.write_run_config(self.workdir, self.run_id, self.workers)
            return [_venv_python(), "-m", "appliance", "serve", "-c", str(self.config_path), "--port-file",
                    str(self.port_file)]
        self.config_path.write_text("\n".join([
            "[server]",
            'host = "127.0.0.1"',
            "port = 0",
            "metrics_port = 0",
            f"workers = {self.workers}",
            'log_level = "warning"',
            # Every sender of a benchmark is one host (127.0.0.1), and a scenario's modalities may share calling
            # AEs: the per-host and per-AE limits (32 by default, against one peer taking every slot) would refuse
            # morning-rush at N=8 (48 associations). The total limit still applies. (A base checkout from before
            # these keys would refuse them.)
            *([] if self.source is not None else ["max_associations_per_host = 64", "max_associations_per_ae = 64"]),
            "[storage]",
            f"index_path = {json.dumps(str(self.workdir / 'index'))}",
            f"fsync = {'true' if self.fsync_on else 'false'}",
            # No [[volumes]] table: the built-in default volume vol0 at <config folder>/var/volumes/vol0.
            "",
        ]))
        return [_venv_python(), "-m", "appliance", "serve", "-c", str(self.config_path), "--port-file",
                str(self.port_file)]

    def cleanup(self) -> None:
        if self.site is not None:
            self.site.remove_run(self.run_id)

    def data_path(self) -> Path:
        return self.site.volume_roots(self.run_id)[0][1] if self.site is not None else self.workdir

    def wait_port(self) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"appliance exited {self.proc.returncode} while starting:\n{self.log_tail()}")
            return self.port_file.exists()

        wait_for(ready, START_TIMEOUT, "the appliance port file")
        ports = json.loads(self.port_file.read_text())
        self.port = int(ports["port"])
        metrics_port = int(ports.get("metrics_port") or 0)
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics" if metrics_port else None

    def storage(self) -> Path:
        if self.site is not None:
            return self.site.volume_roots(self.run_id)[0][1] / "segments"
        return self.workdir / "var" / "volumes" / "vol0" / "segments"

    def stored_count(self) -> int:
        """Records in the segments (tar members) of every volume, read as any tar reader would."""
        older = self.storage().parent / "blobs"  # a base checkout from before segments: one file per instance
        if older.is_dir():
            return count_files(older)
        folders = ([root / "segments" for _n, root in self.site.volume_roots(self.run_id)] if self.site is not None
                   else [self.storage()])
        count = 0
        for folder in folders:
            for segment in sorted(folder.glob("*.tar")):
                with tarfile.open(segment) as archive:
                    count += sum(1 for member in archive if member.name.endswith(".dcm"))
        return count


class RemoteReceiver(Receiver):
    """A receiver somebody else started, possibly on another machine (``--target``, ``--storescp``,
    ``--orthanc`` HOST:PORT): start waits for its C-ECHO answer, stop does nothing; neither its CPU nor what it
    stored can be read from here."""

    measures_cpu = False
    counts_stored = False

    def __init__(self, workdir: Path, label: str, host: str, port: int, ae: str, durability: str) -> None:
        super().__init__(workdir)
        self.label, self.host, self.port, self.ae, self.fsync = label, host, port, ae, durability

    def start(self) -> None:
        wait_for(lambda: echo(self.ae, self.port, self.host), START_TIMEOUT,
                 f"{self.label} at {self.host}:{self.port} (AE {self.ae}) to answer C-ECHO")

    def stop(self, timeout: float = 60.0) -> None:
        pass

    def cpu_seconds(self) -> float:
        return 0.0

    def stored_count(self) -> int:
        return 0


def _venv_python() -> str:
    venv = ROOT / ".venv/bin/python"
    return str(venv) if venv.exists() else sys.executable


class StorescpReceiver(Receiver):
    label = "storescp"
    ae = "STORESCP"
    fsync = "none (writes files, no fsync)"

    @staticmethod
    def available() -> str | None:
        return None if shutil.which("storescp") else "storescp (DCMTK) is not installed"

    def command(self) -> list[str]:
        self.port = free_port()
        (self.workdir / "out").mkdir()
        return ["storescp", "--fork", "-od", str(self.workdir / "out"), "-aet", self.ae, str(self.port)]

    def storage(self) -> Path:
        return self.workdir / "out"


class OrthancReceiver(Receiver):
    label = "orthanc"
    ae = "ORTHANC"
    fsync = "SyncStorageArea = true (fsync per file), SQLite index"

    @staticmethod
    def available() -> str | None:
        return None if orthanc_binary() else "Orthanc is not installed"

    def command(self) -> list[str]:
        self.port = free_port()
        http_port = free_port()
        config = {
            "Name": "bench",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "StorageCompression": False,
            "SyncStorageArea": True,  # the default: fsync every stored file
            "DicomAet": self.ae,
            "DicomPort": self.port,
            "DicomCheckCalledAet": False,
            "HttpPort": http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],  # no system plugins: measure Orthanc itself
            "SaveJobs": False,
        }
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        binary = orthanc_binary()
        assert binary is not None
        return [binary, str(path)]

    def storage(self) -> Path:
        return self.workdir / "storage"


def make_receivers(names: list[str], workers: list[int | None], nofsync: bool, site: SiteConfig | None = None
                   ) -> list[Callable[[Path], Receiver]]:
    """``workers``: appliance worker counts (None: the site's); ``site``: -c's configuration for the appliance."""
    factories: list[Callable[[Path], Receiver]] = []
    for name in names:
        if name == "appliance":
            for w in workers:
                factories.append(functools.partial(ApplianceReceiver, workers=w, site=site))
                if nofsync and site is None:
                    factories.append(functools.partial(ApplianceReceiver, workers=w, fsync=False))
        elif name == "appliance-base":  # the checkout named by APPLIANCE_BENCH_BASE, for before/after runs
            base = os.environ.get("APPLIANCE_BENCH_BASE")
            if not base or not (Path(base) / "appliance").is_dir():
                raise SystemExit("appliance-base needs APPLIANCE_BENCH_BASE=<a checkout of the appliance>")
            for w in workers:
                factories.append(functools.partial(ApplianceReceiver, workers=w, source=Path(base)))
        elif name == "storescp":
            factories.append(StorescpReceiver)
        elif name == "orthanc":
            factories.append(OrthancReceiver)
    return factories
