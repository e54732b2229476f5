"""bench/hardware.py: the machine probe returns a positive number for every measurement and leaves nothing behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench import hardware

KEYS = {
    *(f"fsync_{size}_t{t}_{unit}" for size in ("130kib", "512kib") for t in (1, 8) for unit in ("files_per_s", "mb_per_s")),
    "seq_fdatasync_mb_per_s",
    "pagecache_write_mb_per_s",
    "tcp_loopback_mb_per_s",
    "tcp_rtt_us",
}


def test_probe_positive_numbers_and_cleans_up(tmp_path: Path) -> None:
    results = hardware.probe(tmp_path, seconds=0.3)
    assert set(results) == KEYS
    for key, value in results.items():
        assert isinstance(value, float) and value > 0, key
    # files/s and MB/s agree with the file size
    for size, nbytes in hardware.SMALL_SIZES.items():
        for t in hardware.THREADS:
            files, mb = results[f"fsync_{size}_t{t}_files_per_s"], results[f"fsync_{size}_t{t}_mb_per_s"]
            assert abs(files * nbytes / 1e6 - mb) < 1e-6 * max(mb, 1)
    assert list(tmp_path.iterdir()) == []
    assert "fsync'd 130 KiB files, 8 threads" in hardware.table(results)


def test_main_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "hw.json"
    work = tmp_path / "work"
    work.mkdir()
    assert hardware.main(["--dir", str(work), "--seconds", "0.2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["results"]) == KEYS and data["machine"]["cpus"] >= 1
    assert list(work.iterdir()) == []
    assert hardware.main(["--dir", str(tmp_path / "missing")]) == 2


def test_disk_io_counts_the_flush_of_an_fsync(tmp_path: Path) -> None:
    from bench.receivers import disk_delta, disk_io

    before = disk_io(tmp_path)
    if before is None:
        pytest.skip("no block-device counters for this filesystem in /sys")
    with open(tmp_path / "f", "wb") as fh:
        fh.write(b"x" * 65536)
        fh.flush()
        os.fsync(fh.fileno())
    delta = disk_delta(before, tmp_path)
    assert delta is not None
    assert delta["bytes_written"] >= 65536 and delta["writes"] >= 1 and delta["flushes"] >= 1
