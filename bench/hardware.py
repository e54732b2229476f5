"""What this machine can do, measured in a bounded time: the ceilings the ingest benchmarks run into.

- ``fsync_<size>_t<threads>_files_per_s`` / ``..._mb_per_s``: files of 130 KiB (an MR image) and 512 KiB (a CT
  slice) created, written and fsync'd one after another by 1 thread, and by 8 threads at once (what group
  commit and parallel associations can get out of the disk's flushes);
- ``seq_fdatasync_mb_per_s``: one file written sequentially in 1 MiB writes, fdatasync'd every 64 MiB and at
  the end, time including the last fdatasync (like ``dd bs=1M conv=fdatasync``, bounded in time);
- ``pagecache_write_mb_per_s``: the same without any sync (what a receiver that does not fsync sees, until the
  kernel's dirty limits throttle it), at most 1 GiB;
- ``tcp_loopback_mb_per_s``: one TCP connection over 127.0.0.1 (TCP_NODELAY on both ends), 1 MiB sends,
  received into a 1 MiB buffer, measured at the receiver;
- ``tcp_rtt_us``: round trip of a 64-byte message over the same kind of connection (TCP_NODELAY).

MB = 10^6 bytes. The written data is random (no compression or dedup can help). Every file is removed
afterwards, and nothing is written outside ``<dir>/.hwprobe-<pid>``.

    python -m bench.hardware [--dir DIR] [--json FILE] [--seconds S]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

KIB = 1024
MIB = 1024 * 1024
SMALL_SIZES = {"130kib": 130 * KIB, "512kib": 512 * KIB}
THREADS = (1, 8)
SEQ_FLUSH_EVERY = 64 * MIB
PAGECACHE_CAP = 1024 * MIB
# Shares of the time budget.
SHARE_FSYNC = 0.12  # each of the 4 small-file runs
SHARE_SEQ = 0.2
SHARE_PAGECACHE = 0.1
SHARE_TCP = 0.15
SHARE_RTT = 0.05


def fsync_files(folder: Path, size: int, threads: int, seconds: float, data: bytes) -> tuple[float, float]:
    """(files/s, MB/s) of create + write + fsync + close, by ``threads`` threads until ``seconds`` have passed."""
    counts = [0] * threads
    start = threading.Barrier(threads + 1)
    payload = memoryview(data)[:size]
    deadline = [0.0]

    def worker(t: int) -> None:
        start.wait()
        n = 0
        while True:
            path = folder / f"t{t}-{n}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                written = 0
                while written < size:
                    written += os.write(fd, payload[written:])
                os.fsync(fd)
            finally:
                os.close(fd)
            n += 1
            if time.perf_counter() >= deadline[0]:
                break
        counts[t] = n

    workers = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(threads)]
    for w in workers:
        w.start()
    t0 = time.perf_counter()
    deadline[0] = t0 + seconds
    start.wait()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - t0
    for entry in os.scandir(folder):
        os.unlink(entry.path)
    files = sum(counts)
    return files / elapsed, files * size / elapsed / 1e6


def _sequential(folder: Path, seconds: float, data: bytes, sync: bool, cap: int) -> float:
    """MB/s of 1 MiB writes to one file for ``seconds`` (at most ``cap`` bytes), fdatasync'd when ``sync``."""
    chunk = memoryview(data)[:MIB]
    path = folder / ("seq" if sync else "pagecache")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    total = 0
    try:
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while True:
            written = 0
            while written < len(chunk):
                written += os.write(fd, chunk[written:])
            total += written
            if sync and total % SEQ_FLUSH_EVERY == 0:
                os.fdatasync(fd)
            if total >= cap or time.perf_counter() >= deadline:
                break
        if sync:
            os.fdatasync(fd)
        elapsed = time.perf_counter() - t0
    finally:
        os.close(fd)
        os.unlink(path)  # unsynced dirty pages of an unlinked file are dropped, not written back
    return total / elapsed / 1e6


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected client/server pair over 127.0.0.1 with TCP_NODELAY on both."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname()[:2])
        server, _ = listener.accept()
    for s in (client, server):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client, server


def _tcp_throughput(seconds: float, data: bytes) -> float:
    """MB/s through one loopback connection, measured at the receiver."""
    client, server = _tcp_pair()
    received = [0]
    elapsed = [0.0]

    def receive() -> None:
        buf = bytearray(MIB)
        t0 = time.perf_counter()
        while True:
            n = server.recv_into(buf)
            if n == 0:
                break
            received[0] += n
        elapsed[0] = time.perf_counter() - t0

    with client, server:
        reader = threading.Thread(target=receive, daemon=True)
        reader.start()
        payload = memoryview(data)[:MIB]
        deadline = time.perf_counter() + seconds
        while True:
            client.sendall(payload)
            if time.perf_counter() >= deadline:
                break
        client.shutdown(socket.SHUT_WR)
        reader.join()
    return received[0] / max(elapsed[0], 1e-9) / 1e6


def _tcp_rtt(seconds: float) -> float:
    """Mean round trip in microseconds of a 64-byte message echoed back."""
    client, server = _tcp_pair()

    def echo() -> None:
        while True:
            msg = server.recv(64)
            if not msg:
                break
            server.sendall(msg)

    with client, server:
        echoer = threading.Thread(target=echo, daemon=True)
        echoer.start()
        msg = b"x" * 64
        n = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while True:
            client.sendall(msg)
            got = 0
            while got < len(msg):
                got += len(client.recv(64 - got))
            n += 1
            if time.perf_counter() >= deadline:
                break
        elapsed = time.perf_counter() - t0
        client.shutdown(socket.SHUT_WR)
        echoer.join()
    return elapsed / n * 1e6


def probe(dir: str | Path | None = None, seconds: float = 10.0,
          progress: Callable[[str], None] | None = None) -> dict[str, float]:
    """Measure this machine in about ``seconds`` (plus the last flushes); files go to ``<dir>/.hwprobe-<pid>``."""
    base = Path(dir) if dir is not None else Path.cwd()
    folder = base / f".hwprobe-{os.getpid()}"
    folder.mkdir(parents=True)
    data = os.urandom(MIB)
    results: dict[str, float] = {}
    try:
        for name, size in SMALL_SIZES.items():
            for threads in THREADS:
                if progress:
                    progress(f"fsync'd {name} files, {threads} thread(s)")
                files_s, mb_s = fsync_files(folder, size, threads, seconds * SHARE_FSYNC, data)
                results[f"fsync_{name}_t{threads}_files_per_s"] = files_s
                results[f"fsync_{name}_t{threads}_mb_per_s"] = mb_s
        free = shutil.disk_usage(folder).free
        if progress:
            progress("sequential write + fdatasync")
        results["seq_fdatasync_mb_per_s"] = _sequential(folder, seconds * SHARE_SEQ, data, True,
                                                        max(MIB, min(4096 * MIB, free // 4)))
        if progress:
            progress("page-cache write")
        results["pagecache_write_mb_per_s"] = _sequential(folder, seconds * SHARE_PAGECACHE, data, False,
                                                          max(MIB, min(PAGECACHE_CAP, free // 4)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if progress:
        progress("loopback TCP")
    results["tcp_loopback_mb_per_s"] = _tcp_throughput(seconds * SHARE_TCP, data)
    results["tcp_rtt_us"] = _tcp_rtt(seconds * SHARE_RTT)
    return results


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def memory_total() -> str:
    """MemTotal from /proc/meminfo, as the kernel writes it ("24684084 kB", where kB means KiB)."""
    try:
        return Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    except (OSError, IndexError):
        return ""


def memory_bytes() -> int | None:
    """MemTotal in bytes (the kernel's "kB" is 1024 bytes)."""
    try:
        value, unit = memory_total().split()
        return int(value) * (1024 if unit == "kB" else 1)
    except ValueError:
        return None


def memory_human() -> str:
    """MemTotal as people read it: "23.5 GiB" (GiB = 2^30 bytes)."""
    total = memory_bytes()
    return "memory unknown" if total is None else f"{total / 2**30:.1f} GiB"


def machine(dir: str | Path) -> dict[str, Any]:
    """What the numbers were measured on."""
    model = cpu_model()
    fs = ""
    try:
        target = os.path.realpath(dir)
        best = ""
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and (target == parts[1] or target.startswith(parts[1].rstrip("/") + "/")) \
                    and len(parts[1]) >= len(best):
                best, fs = parts[1], f"{parts[2]} on {parts[0]} ({parts[1]})"
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "kernel": platform.release(), "python": platform.python_version(),
            "dir": str(Path(dir).resolve()), "filesystem": fs}


def table(results: dict[str, float]) -> str:
    """A short human table."""
    rows = []
    for name in SMALL_SIZES:
        for threads in THREADS:
            rows.append((f"fsync'd {name.replace('kib', ' KiB')} files, {threads} thread{'s' if threads > 1 else ''}",
                         f"{results[f'fsync_{name}_t{threads}_files_per_s']:,.0f} files/s",
                         f"{results[f'fsync_{name}_t{threads}_mb_per_s']:,.1f} MB/s"))
    rows.append(("sequential write, fdatasync", "", f"{results['seq_fdatasync_mb_per_s']:,.0f} MB/s"))
    rows.append(("page-cache write, no sync", "", f"{results['pagecache_write_mb_per_s']:,.0f} MB/s"))
    rows.append(("loopback TCP, 1 connection", "", f"{results['tcp_loopback_mb_per_s']:,.0f} MB/s"))
    rows.append(("loopback TCP round trip, 64 B", "", f"{results['tcp_rtt_us']:,.1f} us"))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:>{w1}}  {c:>{w2}}" for a, b, c in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path.cwd(),
                        help="where to write (on the filesystem to measure; default: the current folder)")
    parser.add_argument("--seconds", type=float, default=10.0, help="time budget (default 10)")
    parser.add_argument("--json", type=Path, help="also write the machine and the results to this file")
    args = parser.parse_args(argv)
    if not args.dir.is_dir():
        print(f"error: {args.dir} is not a folder", file=sys.stderr)
        return 2
    if args.seconds <= 0:
        print("error: --seconds must be positive", file=sys.stderr)
        return 2
    info = machine(args.dir)
    print(f"probing {info['filesystem'] or info['dir']} for ~{args.seconds:g}s ...", file=sys.stderr, flush=True)
    results = probe(args.dir, args.seconds, progress=lambda what: print(f"  {what}", file=sys.stderr, flush=True))
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "seconds": args.seconds, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
