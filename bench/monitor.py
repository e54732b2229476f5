"""The receiver's side of a bench/driver.py run: CPU seconds and peak RSS of a local process tree, and the
appliance's /metrics (per-stage breakdown, group commit batch size, failures) scraped before and after."""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.receivers import proc_tree

STAGES = ("receive", "fsync", "queue", "index", "total")


# ---- the receiver's side: CPU, RSS, /metrics ----------------------------------------------------------


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


class ServerMonitor:
    """CPU seconds of a local process tree over the run, and its peak RSS (sum over the tree, sampled 5 times a
    second in a thread), plus VmHWM (each process's lifetime peak) at the end."""

    def __init__(self, pid: int) -> None:
        from bench.receivers import proc_tree_cpu

        self.pid = pid
        self.cpu = proc_tree_cpu
        self.peak = 0
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _rss(self) -> int:
        return sum(_status_kb(p, "VmRSS") for p in proc_tree(self.pid)) * 1024

    def _sample(self) -> None:
        while not self.stop_event.wait(0.2):
            self.peak = max(self.peak, self._rss())

    def start(self) -> None:
        self.cpu0 = self.cpu(self.pid)
        self.peak = self._rss()
        self.thread.start()

    def stop(self) -> dict[str, Any]:
        self.stop_event.set()
        self.thread.join(5)
        self.peak = max(self.peak, self._rss())
        tree = proc_tree(self.pid)
        return {"pid": self.pid, "processes": len(tree), "cpu_s": round(self.cpu(self.pid) - self.cpu0, 3),
                "peak_rss_bytes": self.peak, "vmhwm_bytes": sum(_status_kb(p, "VmHWM") for p in tree) * 1024}


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in samples.items() if n == name and all(dict(lab).get(k) == x
                                                                         for k, x in labels.items()))


def metrics_delta(before: dict[Any, float], after: dict[Any, float]) -> dict[str, Any]:
    def d(name: str, **labels: str) -> float:
        return _total(after, name, **labels) - _total(before, name, **labels)

    stages = {}
    for stage in STAGES:
        count, total = d("appliance_store_stage_seconds_count", stage=stage), d("appliance_store_stage_seconds_sum",
                                                                               stage=stage)
        stages[stage] = {"count": int(count), "sum_s": round(total, 6),
                         "mean_ms": round(1000 * total / count, 3) if count else None}
    commits = d("appliance_commit_batch_size_count")
    failures = {}
    for (name, labels), _ in after.items():
        if name == "appliance_store_failures_total":
            status = dict(labels).get("status", "?")
            failures[status] = int(d(name, status=status))
    return {
        "stages": stages,
        "commits": int(commits),
        "batch_size_mean": round(d("appliance_commit_batch_size_sum") / commits, 3) if commits else None,
        "instances_stored": int(d("appliance_instances_stored_total")),
        "bytes_stored": int(d("appliance_stored_bytes_total")),
        "failures_by_status": {k: v for k, v in failures.items() if v},
    }


def settled_metrics(url: str, before: dict[Any, float], ok: int, timeout: float = 5.0) -> dict[str, Any]:
    """The delta once it covers the run's ``ok`` instances: workers write per-instance series every 0.5 s
    (appliance/metrics.py), and one scrape can catch a write half done (histograms updated, counters not yet),
    so poll until the stage counts and the instance counter all add up, or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        delta = metrics_delta(before, scrape(url))
        settled = all(delta["stages"][s]["count"] >= ok for s in STAGES) and delta["instances_stored"] >= ok
        if settled or time.monotonic() > deadline:
            return delta
        time.sleep(0.1)


class MetricsWindow:
    """The appliance's /metrics around one run: scraped before it (``open``), and settled after it (``close``);
    a failed scrape becomes ``error``, a note for the run, not an exception. Without a URL it does nothing."""

    def __init__(self, url: str | None) -> None:
        self.url = url
        self.before: dict[Any, float] | None = None
        self.error: str | None = None

    def open(self) -> None:
        if self.url:
            try:
                self.before = scrape(self.url)
            except OSError as exc:
                self.error = f"scrape before the run failed: {exc}"

    def close(self, ok: int) -> dict[str, Any] | None:
        """The run's delta (with ``url``), or None when there was no URL or a scrape failed."""
        if self.before is None or not self.url:
            return None
        try:
            return {**settled_metrics(self.url, self.before, ok), "url": self.url}
        except OSError as exc:
            self.error = f"scrape after the run failed: {exc}"
            return None
