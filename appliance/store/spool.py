"""Where an instance's bytes wait between their arrival and their append to a segment.

A segment record's header holds the blob's size, and a dataset's size is only known after its last fragment, so an
instance cannot be appended while it streams in (and several associations stream at once into one segment).
Small instances (CT slices, MR images: 0.1-1 MiB) wait in memory; an instance that grows past
``spool_memory_bytes``, or arrives while the worker's spooled bytes exceed ``spool_memory_total_bytes``, spills to a
file in ``<volume>/tmp/`` and is copied into the segment in the kernel (copy_file_range). Memory per association is
therefore bounded by ``spool_memory_bytes`` whatever the instance size, and per worker by the total budget.

A spill file is unlinked when the instance is appended or refused; a crash leaves it in tmp/, where startup
recovery deletes it (nothing acknowledged can be in a spill file: the record in the segment is what the index
names).
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from typing import BinaryIO

from appliance.errors import OutOfSpace
from appliance.store.backend import BlobSource

log = logging.getLogger(__name__)


class SpoolBudget:
    """Bytes held in memory by all spools of one worker. The event loop adds, and the commit thread releases
    (after the append): the release takes a lock, the hot-path check reads without one (a stale read errs by
    one instance, the budget is not a hard limit to the byte)."""

    def __init__(self, instance_bytes_max: int, total_bytes_max: int) -> None:
        assert 0 < instance_bytes_max <= total_bytes_max
        self.instance_bytes_max = instance_bytes_max
        self.total_bytes_max = total_bytes_max
        self.in_memory = 0
        self.lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        with self.lock:
            self.in_memory += nbytes


class InstanceSpool(BlobSource):
    """One instance being received: its bytes (File Meta + dataset as received) and their SHA-256."""

    __slots__ = ("budget", "tmp_dir", "hasher", "size", "prefix_bytes", "_buf", "_fd", "_path", "_counted")

    def __init__(self, budget: SpoolBudget, tmp_dir: str, prefix: bytes) -> None:
        self.budget = budget
        self.tmp_dir = tmp_dir
        self.hasher = hashlib.sha256(prefix)
        self.size = len(prefix)
        self.prefix_bytes = len(prefix)
        self._buf: bytearray | None = bytearray(prefix)
        self._fd = -1
        self._path = ""
        self._counted = len(prefix)
        budget.add(len(prefix))

    def write(self, data: bytes | memoryview) -> None:
        self.hasher.update(data)
        n = len(data)
        if self._buf is not None:
            b = self.budget
            if self.size + n <= b.instance_bytes_max and b.in_memory + n <= b.total_bytes_max:
                self._buf += data
                self.size += n
                self._counted += n
                b.add(n)
                return
            self._spill()
        try:
            self._write_fd(data)
        except OSError as exc:
            self.discard()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise OutOfSpace(f"volume full while spooling a large instance: {exc.strerror}") from None
            raise OutOfSpace(f"spooling a large instance failed: {exc.strerror}") from None
        self.size += n

    def _write_fd(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def _spill(self) -> None:
        assert self._buf is not None
        self._path = os.path.join(self.tmp_dir, f"spill-{os.getpid()}-{uuid.uuid4().hex}")
        try:
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            self._write_fd(self._buf)
        except OSError as exc:
            self.discard()
            raise OutOfSpace(f"cannot spool a large instance: {exc.strerror}") from None
        self._release_memory()

    def _release_memory(self) -> None:
        self.budget.add(-self._counted)
        self._counted = 0
        self._buf = None

    @property
    def in_memory(self) -> bool:
        return self._buf is not None

    def digest(self) -> str:
        return self.hasher.hexdigest()

    def dataset_head(self, nbytes: int) -> bytes:
        """The first ``nbytes`` of the dataset (after the File Meta prefix), copied once when the instance is
        complete: the header walk reads them from here, instead of a second copy kept while the PDVs arrive."""
        start = self.prefix_bytes
        if self._buf is not None:
            return bytes(self._buf[start : start + nbytes])
        return os.pread(self._fd, nbytes, start)

    def reader(self) -> BinaryIO:
        """A file object over the bytes so far, from offset 0 (for pydicom, on the rare slow path)."""
        if self._buf is not None:
            return io.BytesIO(self._buf)
        return open(os.dup(self._fd), "rb", closefd=True)  # noqa: SIM115 - the caller closes it

    def chunks(self, chunk_bytes: int) -> Iterator[bytes | memoryview]:
        if self._buf is not None:
            view = memoryview(self._buf)
            for start in range(0, len(view), chunk_bytes):
                yield view[start : start + chunk_bytes]
            return
        offset = 0
        while offset < self.size:
            chunk = os.pread(self._fd, min(chunk_bytes, self.size - offset), offset)
            if not chunk:
                raise OutOfSpace("spill file shorter than its instance")
            offset += len(chunk)
            yield chunk

    def fileno(self) -> int | None:
        return self._fd if self._buf is None and self._fd >= 0 else None

    def discard(self) -> None:
        """Drop the bytes (appended, refused or abandoned); idempotent, never raises."""
        if self._buf is not None:
            self._release_memory()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._path:
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass
            except OSError as exc:  # a filesystem gone read-only: startup recovery removes it
                log.warning("could not remove spill file %s: %s", self._path, exc.strerror)
            self._path = ""


def clear_tmp(tmp_dir: str, pid: int | None = None) -> int:
    """Delete what crashed receptions left in tmp/: everything at startup, or the spill files of one dead worker
    (``pid``) while the others go on."""
    removed = 0
    try:
        names = os.listdir(tmp_dir)
    except FileNotFoundError:
        return 0
    for name in names:
        if pid is not None and not name.startswith(f"spill-{pid}-"):
            continue
        try:
            os.unlink(os.path.join(tmp_dir, name))
            removed += 1
        except IsADirectoryError:
            continue
        except FileNotFoundError:
            continue
    return removed
