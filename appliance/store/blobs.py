"""Content-addressed blobs on a volume.

Invariants (kept together with store/commit.py):
- a blob is written to ``<volume>/tmp/`` and fsync'd (file and tmp folder) before any index entry names it.
  The tmp folder's fsync is usually done before the first byte arrives: TmpFileReserve creates tmp files
  ahead of time and fsyncs the folder before handing them out, so the commit fsyncs tmp/ only for files
  created on the spot (``BlobWriter.entry_durable`` is False);
- it is renamed to ``<volume>/blobs/ab/cd/<sha256>`` after the index commit; a crash in between leaves it in
  tmp/, where startup recovery (``recover_volume``) finds it by its hash and finishes the rename;
- an index entry is removed (or repointed) before the blob it named is deleted (the ``gc`` table).

A blob is a complete DICOM Part-10 file: 128-byte preamble, ``DICM``, a File Meta group built from the
C-STORE command and the negotiated transfer syntax, then the dataset bytes exactly as received. The File Meta
holds nothing that varies between two sends of the same dataset (no time, no calling AE), so an identical
re-send hashes to the same blob. SHA-256: in the standard library, hardware-accelerated (SHA-NI) on current
x86 and ARM servers (1.7 GB/s on one core here, faster than a core can receive DICOM), and it is what
security reviews expect for content addressing.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import struct
import threading
import uuid
from collections import deque
from pathlib import Path

from appliance.dicom.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME  # noqa: F401 (re-exported)
from appliance.errors import OutOfSpace
from appliance.store.volumes import Volume, fsync_dir

log = logging.getLogger(__name__)

CALLING_AE_XATTR = "user.appliance.calling_ae"

_ELEMENT_SHORT = struct.Struct("<HH2sH")
_ELEMENT_LONG = struct.Struct("<HH2s2xL")


def _even(raw: bytes, pad: bytes) -> bytes:
    return raw + pad if len(raw) % 2 else raw


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble + ``DICM`` + File Meta Information group (PS3.10 7.1), Explicit VR Little Endian."""
    elements = [
        _ELEMENT_LONG.pack(0x0002, 0x0001, b"OB", 2) + b"\x00\x01",
    ]
    for element, vr, value, pad in (
        (0x0002, b"UI", sop_class_uid, b"\x00"),
        (0x0003, b"UI", sop_instance_uid, b"\x00"),
        (0x0010, b"UI", transfer_syntax, b"\x00"),
        (0x0012, b"UI", IMPLEMENTATION_CLASS_UID, b"\x00"),
        (0x0013, b"SH", IMPLEMENTATION_VERSION_NAME, b" "),
    ):
        raw = _even(value.encode("ascii"), pad)
        elements.append(_ELEMENT_SHORT.pack(0x0002, element, vr, len(raw)) + raw)
    body = b"".join(elements)
    group_length = _ELEMENT_SHORT.pack(0x0002, 0x0000, b"UL", 4) + struct.pack("<L", len(body))
    return b"\x00" * 128 + b"DICM" + group_length + body


def create_tmp(volume: Volume) -> tuple[int, str]:
    path = volume.tmp_file(f"{os.getpid()}-{uuid.uuid4().hex}")
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644), path


class TmpFileReserve:
    """A few empty tmp files created ahead of time by a background thread.

    Creating a file in tmp/ takes ~0.1 ms, more while the same filesystem is busy with fsyncs (the journal and
    the folder lock are shared): done on the event loop it stalled every association of the worker. A crash
    leaves at most ``depth`` empty files, which startup recovery deletes like any unreferenced tmp file.

    Each refill fsyncs tmp/ before its files are handed out, so their directory entries are already durable
    when an instance is committed: one folder fsync fewer on the commit's critical path (the file's own
    fsync then covers its data, size and xattr).
    """

    def __init__(self, volume: Volume, depth: int = 16, fsync: bool = True) -> None:
        self.volume = volume
        self.depth = depth
        self.fsync = fsync  # storage.fsync = false (benchmarks only): no folder fsync either
        self._ready: deque[tuple[int, str]] = deque()
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._fill, name=f"tmp-{volume.name}", daemon=True)
        self._thread.start()

    def take(self) -> tuple[int, str] | None:
        try:
            ready = self._ready.popleft()
        except IndexError:
            ready = None
        if len(self._ready) <= self.depth // 2:
            # Refill in batches: one folder fsync per batch, and no thread wake-up per instance.
            self._wake.set()
        return ready

    def _fill(self) -> None:
        while not self._closed:
            fresh: list[tuple[int, str]] = []
            while len(self._ready) + len(fresh) < self.depth and not self._closed:
                try:
                    fresh.append(create_tmp(self.volume))
                except OSError:
                    break  # full or gone: the event loop's own attempt reports it
            if fresh and self.fsync:
                try:
                    fsync_dir(self.volume.tmp_dir)
                except OSError:
                    for fd, path in fresh:  # not known durable: let the event loop create its own
                        os.close(fd)
                        _unlink(path)
                    fresh = []
            if fresh:
                self._ready.extend(fresh)
            self._wake.wait(1.0)
            self._wake.clear()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join()
        while self._ready:
            fd, path = self._ready.popleft()
            os.close(fd)
            _unlink(path)


class BlobWriter:
    """One instance being received: a temp file on a volume, hashed and written as the PDVs arrive."""

    __slots__ = ("volume", "tmp_path", "fd", "hasher", "size", "entry_durable", "_prefix")

    def __init__(self, volume: Volume, prefix: bytes, reserve: TmpFileReserve | None = None) -> None:
        self.volume = volume
        self.hasher = hashlib.sha256()
        self.size = 0
        self.fd = -1
        ready = reserve.take() if reserve is not None else None
        # True when the tmp file's directory entry is already durable (a reserve file, folder fsync'd).
        self.entry_durable = ready is not None
        if ready is not None:
            self.fd, self.tmp_path = ready
        else:
            try:
                self.fd, self.tmp_path = create_tmp(volume)
            except OSError as exc:
                raise _io_error(exc) from None
        # The File Meta goes out with the first dataset PDV (one write syscall instead of two).
        self.hasher.update(prefix)
        self._prefix: bytes | None = prefix

    def write(self, data: bytes | memoryview) -> None:
        self.hasher.update(data)
        view = memoryview(data)
        try:
            if self._prefix is not None:
                prefix, self._prefix = self._prefix, None
                self.size += len(prefix)
                written = os.writev(self.fd, [prefix, view])
                if written < len(prefix):
                    os.write(self.fd, prefix[written:])
                    written = len(prefix)
                view = view[written - len(prefix) :]
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
        except OSError as exc:
            self.discard()
            raise _io_error(exc) from None
        self.size += len(data)

    def flush_prefix(self) -> None:
        """Write the File Meta now if no dataset byte came (an empty dataset)."""
        if self._prefix is not None:
            self.write(b"")

    def digest(self) -> str:
        return self.hasher.hexdigest()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        """Drop a partial or refused instance: nothing of it stays on disk."""
        self.close()
        _unlink(self.tmp_path)


def _unlink(path: str) -> None:
    """Remove a tmp file that is not needed. A failure (a filesystem gone read-only after an I/O error) is logged,
    not raised: the caller is answering or cleaning up, and startup recovery removes unreferenced tmp files."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc.strerror)


def _io_error(exc: OSError) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return OutOfSpace(f"volume full: {exc.strerror}")
    return OutOfSpace(f"volume write failed: {exc.strerror}")


def hash_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            hasher.update(chunk)
    return hasher.hexdigest()


def set_calling_ae(path: Path | str | int, calling_ae: str) -> None:
    """Keep the calling AE beside the blob (an xattr), so that an index rebuild recovers it."""
    try:
        os.setxattr(path, CALLING_AE_XATTR, calling_ae.encode("ascii", "replace"))
    except OSError:
        pass  # filesystem without user xattrs: the rebuild then reports an empty calling AE


def get_calling_ae(path: Path | str) -> str:
    try:
        return os.getxattr(path, CALLING_AE_XATTR).decode("ascii", "replace")
    except OSError:
        return ""
