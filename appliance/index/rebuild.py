"""The blobs are the source of truth: rebuild the index from the volumes alone, and verify blobs against it.

A blob carries everything its index entry holds: the dataset (attributes), the File Meta (transfer syntax),
its name (the digest), its size, its mtime (set to the receive time at commit) and an xattr (calling AE).
Entries are replayed in receive-time order with the configured duplicate policy, which reproduces the live
index exactly.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from appliance.config import Config
from appliance.errors import ApplianceError, IndexInUse
from appliance.index.db import SERVE_LOCK, IndexEntry, StudyIndex
from appliance.index.records import read_header_file
from appliance.store.blobs import get_calling_ae, hash_file
from appliance.store.volumes import Volume, VolumeSet

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
BATCH = 512


def iter_blobs(volume: Volume) -> Iterator[Path]:
    root = volume.blobs_dir
    if not root.is_dir():
        return
    for first in sorted(os.scandir(root), key=lambda e: e.name):
        if not first.is_dir():
            continue
        for second in sorted(os.scandir(first.path), key=lambda e: e.name):
            if not second.is_dir():
                continue
            for blob in sorted(os.scandir(second.path), key=lambda e: e.name):
                if blob.is_file() and _DIGEST.match(blob.name):
                    yield Path(blob.path)


@dataclass
class RebuildStats:
    blobs: int = 0
    indexed: int = 0
    unreadable: list[str] = field(default_factory=list)


def rebuild_index(config: Config, target: Path, rehash: bool = False) -> RebuildStats:
    """Build a fresh index at ``target`` (which must not exist) from every blob on every volume."""
    if target.exists() and any(target.iterdir()):
        raise ApplianceError(f"{target} exists and is not empty")
    volumes = VolumeSet.open(config)
    stats = RebuildStats()
    entries: list[IndexEntry] = []
    for volume in volumes.volumes:
        for path in iter_blobs(volume):
            stats.blobs += 1
            digest = path.name
            try:
                if rehash and hash_file(path) != digest:
                    raise ApplianceError("content does not match its name")
                header, ts = read_header_file(path)
            except ApplianceError as exc:
                stats.unreadable.append(f"{volume.name}/{digest}: {exc}")
                continue
            st = path.stat()
            entries.append(IndexEntry(header=header, digest=digest, volume=volume.name, size=st.st_size,
                                      transfer_syntax=ts, received_ns=st.st_mtime_ns,
                                      calling_ae=get_calling_ae(path)))
    entries.sort(key=lambda e: (e.received_ns, e.digest))
    index = StudyIndex(target, config.storage.index_map_size, sync=True)
    try:
        for start in range(0, len(entries), BATCH):
            index.apply(entries[start : start + BATCH], config.storage.duplicate_policy)
        stats.indexed = index.counts()["instances"]
    finally:
        index.close()
    return stats


def replace_index(config: Config, rehash: bool = False) -> RebuildStats:
    """Rebuild beside the live index, then swap it in (the old one is kept as ``<index>.old``)."""
    live = config.storage.index_path
    lock = live / SERVE_LOCK
    if lock.exists():
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by a running supervisor
        except BlockingIOError:
            raise IndexInUse(f"the appliance is serving {live}: stop it first, or use --into DIR") from None
        finally:
            os.close(fd)
    fresh = live.with_name(live.name + ".rebuild")
    old = live.with_name(live.name + ".old")
    shutil.rmtree(fresh, ignore_errors=True)
    stats = rebuild_index(config, fresh, rehash)
    shutil.rmtree(old, ignore_errors=True)
    if live.exists():
        os.rename(live, old)
    os.rename(fresh, live)
    return stats


@dataclass
class VerifyReport:
    checked: int = 0
    missing: list[str] = field(default_factory=list)  # index names a blob that is not there
    corrupt: list[str] = field(default_factory=list)  # blob content does not hash to its name
    orphans: list[str] = field(default_factory=list)  # blob that no index entry names

    @property
    def ok(self) -> bool:
        return not (self.missing or self.corrupt or self.orphans)


def verify(config: Config, index: StudyIndex) -> VerifyReport:
    volumes = VolumeSet.open(config)
    report = VerifyReport()
    named: set[str] = set()
    for _key, rec in index.items("instances"):
        digest = rec["digest"]
        if digest in named:
            continue
        named.add(digest)
        path = volumes.find_blob(rec["volume"], digest)
        report.checked += 1
        if path is None:
            report.missing.append(f"{rec['volume']}/{digest} ({rec.get('SOPInstanceUID', '?')})")
        elif hash_file(path) != digest:
            report.corrupt.append(f"{rec['volume']}/{digest} ({rec.get('SOPInstanceUID', '?')})")
    for volume in volumes.volumes:
        for path in iter_blobs(volume):
            if path.name not in named:
                report.orphans.append(f"{volume.name}/{path.name}")
    return report
