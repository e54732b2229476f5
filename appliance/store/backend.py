"""The blob-backend interface: what every tier (online segments, nearline, tape, S3) implements.

A blob is the complete Part-10 file of one instance, named by the SHA-256 of its bytes. A backend stores blobs and
hands back a ``Location`` (an opaque string of its own); the index keeps (backend name, location) pairs as the
blob's copies. Only the index decides which stored blobs exist: a backend may hold bytes that no index entry
names (a put whose commit never happened, a record freed by an overwrite); ``recover`` and reclaim remove them.

The write path is split into explicit steps, because a tier's durability and visibility come at different
moments (a segment append is visible at once and durable after ``sync``; an S3 multipart upload is durable and
visible only when completed):

1. ``put``      the bytes are handed over; NOT durable when it returns;
2. ``sync``     every put that returned before the call is durable when it returns;
3. ``publish``  the puts become readable by other processes/nodes (a no-op where they already are);
4. the caller commits the index entries that name the locations (group commit), and only then acknowledges.

Every method's contract says what a crash in the middle leaves. A backend raises ``StorageFault`` on an I/O
error after which its state in memory or in the page cache cannot be trusted (a failed fsync): the caller must
stop (fail-stop), never retry.

The conformance suite in tests/conformance/ runs against every backend.
"""

from __future__ import annotations

import enum
import hashlib
import io
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from appliance.errors import BlobMissing, StorageFault

__all__ = ["BlobBackend", "BlobMeta", "BlobMissing", "BlobSource", "Capabilities", "LatencyClass", "Location",
           "Recovery", "StorageFault", "StoredBlob", "Usage"]

Location = str


class LatencyClass(enum.Enum):
    ONLINE = "online"  # a read starts in milliseconds (local disk, RAID)
    NEARLINE = "nearline"  # seconds (NAS, spun-down disks, object store)
    OFFLINE = "offline"  # minutes to hours (tape in a library or on a shelf)


@dataclass(frozen=True)
class Capabilities:
    random_read: bool  # a range of a blob can be read without reading what comes before it
    atomic_publish: bool  # a blob is either wholly readable or not at all, never torn, once published
    latency: LatencyClass
    deletes_immediately: bool  # delete frees the blob's space and removes it from list() at once


@dataclass(frozen=True)
class BlobMeta:
    """Provenance stored with the blob itself, so that the index can be rebuilt from a backend alone (tape and S3
    have no mtime or xattrs to keep it in)."""

    digest: str  # SHA-256 hex of the blob's bytes
    size: int
    received_ns: int  # when the last byte of the instance arrived (wall clock, ns)
    calling_ae: str
    # The duplicate policy the instance was stored under (the sender's rights: overwrite is granted per peer), so
    # that a rebuild replays it as it happened, whatever the config says by then. "" = the configured policy.
    policy: str = ""

    def __post_init__(self) -> None:
        assert len(self.digest) == 64, self.digest
        assert self.size >= 0


@dataclass(frozen=True)
class StoredBlob:
    location: Location
    meta: BlobMeta


@dataclass(frozen=True)
class Usage:
    """Fill of one place a backend writes to (a volume, a cartridge): what `tier status` shows and what watermark
    policies and placement read."""

    name: str
    used_bytes: int
    capacity_bytes: int
    accepting: bool  # takes new writes (mounted, under its watermark, not full, not read-only)

    @property
    def fill(self) -> float:
        return self.used_bytes / self.capacity_bytes if self.capacity_bytes else 1.0


@dataclass
class Recovery:
    """What ``recover`` did. ``tail``: whole, verified blobs beyond what the index committed, in write order; the
    caller indexes them (they are durable, and may have been acknowledged by a transaction the index lost)."""

    tail: list[StoredBlob] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


class BlobSource(ABC):
    """The bytes of one blob being put, already complete (the dataset has been received): in memory for small
    instances, in a spill file for large ones (store/spool.py)."""

    size: int

    @abstractmethod
    def chunks(self, chunk_bytes: int) -> Iterator[bytes | memoryview]:
        """The blob's bytes in order, at most ``chunk_bytes`` at a time."""

    def fileno(self) -> int | None:
        """A file descriptor holding the bytes from offset 0, when there is one (lets a backend copy in the
        kernel: copy_file_range), else None."""
        return None


class BlobBackend(ABC):
    """One storage target. Not thread-safe: one writer (a worker's commit thread, or the compactor) per instance;
    reads may come from any thread of the process."""

    name: str
    capabilities: Capabilities

    @abstractmethod
    def put(self, meta: BlobMeta, source: BlobSource) -> Location:
        """Store the blob's bytes and provenance. Not durable on return.

        Crash before ``sync`` returns: the blob may be absent, torn or whole; ``recover`` removes it unless a
        committed index entry names it (which cannot happen: the index is committed after ``sync``)."""

    @abstractmethod
    def sync(self) -> None:
        """Make every put that returned before this call durable (one flush for the whole group).

        Raises ``StorageFault`` when the flush failed: the page cache can no longer be trusted and the process
        must stop without acknowledging anything of the group."""

    @abstractmethod
    def publish(self, locations: list[Location]) -> None:
        """Make synced puts readable by other processes and nodes. Called after ``sync`` and before the index
        commit that names them. A no-op for backends whose puts are readable as soon as they are written.
        Crash after it: the published blobs stay until ``recover`` finds no index entry naming them."""

    @abstractmethod
    def read(self, location: Location, offset: int = 0, length: int = -1) -> bytes:
        """``length`` bytes of the blob from ``offset`` (-1: to its end). Raises ``BlobMissing`` when the blob
        is not there (deleted, its segment compacted away, the medium gone)."""

    def iter_read(self, location: Location, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
        """The whole blob in chunks, without holding it in memory."""
        size = self.stat(location).size
        offset = 0
        while offset < size:
            chunk = self.read(location, offset, min(chunk_bytes, size - offset))
            if not chunk:
                raise BlobMissing(f"{self.name}:{location}: ends at {offset} of {size} bytes")
            offset += len(chunk)
            yield chunk

    def sha256(self, location: Location) -> str:
        """The SHA-256 of the blob's bytes as the backend holds them (verify, recovery, rebuild --rehash)."""
        hasher = hashlib.sha256()
        for chunk in self.iter_read(location):
            hasher.update(chunk)
        return hasher.hexdigest()

    def open(self, location: Location, size: int) -> BinaryIO:
        """A read-only, seekable file object over the blob (ranged reads underneath)."""
        return io.BufferedReader(_RangeReader(self, location, size), buffer_size=1 << 16)

    @abstractmethod
    def stat(self, location: Location) -> BlobMeta:
        """The provenance stored with the blob (its size included), read from the backend itself."""

    @abstractmethod
    def delete(self, locations: list[Location]) -> None:
        """Forget blobs that no index entry names any more (the index changed first). With
        ``deletes_immediately`` the space is freed and list() stops showing them at once; otherwise (segments)
        the space comes back when the backend reclaims it (compaction), and until then list() may show them.
        Crash in the middle: some are deleted, some are not; a repeated call is harmless."""

    @abstractmethod
    def list(self) -> Iterator[StoredBlob]:
        """Every blob the backend holds, with its provenance (for ``index rebuild`` and ``verify``)."""

    @abstractmethod
    def recover(self, committed_end: Callable[[str], int | None]) -> Recovery:
        """Startup, before any put. ``committed_end(container)`` tells how far the index has committed into one of
        the backend's containers (a segment), or None when the index does not know it (left alone).

        Whole blobs beyond the committed end whose bytes hash to their name are returned in ``tail``: they were
        made durable, and their index transaction may have been lost (the index syncs its last commit lazily),
        so the caller indexes them. What an interrupted put left (a torn or unsynced record, an unpublished
        upload) is removed. Idempotent once the caller has indexed the tail."""

    # ---- containers (tiers write per-study archives; the index accounts space per container) ----------------

    def begin_container(self, hint: str) -> str:
        """The puts that follow, up to the next ``sync``, go into one new container (a tier's per-study archive;
        ``hint`` names what it holds, e.g. a hash of the study UID) whose name is returned: the mover registers it
        in its journal before the first put, so that a crash leaves nothing the index cannot name. Backends whose
        containers are not chosen by the caller (online segments) return the name of the active one, or "".
        Without a call, a put opens a container of the backend's choosing."""
        return ""

    def container_of(self, location: Location) -> str:
        """The container a location lies in (its Copy.container)."""
        raise NotImplementedError

    def remove_container(self, name: str) -> None:  # noqa: B027 - append-only media cannot
        """Delete a whole container that the index no longer names (its ``gc`` row is durable). Harmless if it is
        already gone. Append-only media (tape) leave the bytes where they are and only forget them."""

    def seal(self) -> None:  # noqa: B027 - only backends that keep a container open across syncs need it
        """End of a writing session (a tier run): close a container kept open across syncs (a tape archive), so that
        it reads back with stock tools alone. The next put opens a new one."""

    def usage(self) -> tuple[Usage, ...]:
        """Fill per volume / cartridge, for `tier status`, placement and watermark policies."""
        return ()

    def close(self) -> None:  # noqa: B027 - most backends hold nothing to release
        """Release descriptors. Anything not synced is not durable."""


class _RangeReader(io.RawIOBase):
    def __init__(self, backend: BlobBackend, location: Location, size: int) -> None:
        self.backend, self.location, self.size, self.pos = backend, location, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self.size - self.pos)
        if want <= 0:
            return 0
        data = self.backend.read(self.location, self.pos, want)
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)
