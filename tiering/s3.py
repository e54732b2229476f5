"""The S3 tier: per-study archives (tiering/archive.py) as objects in a bucket of an S3-compatible object store.

Layout under ``<prefix>/`` (docs/tiering.md "S3 tier", docs/tiering-internals.md "S3 tier"):

    <prefix>/.appliance-tier            marker: JSON tier, kind, owner, created (written by `appliance tier init`)
    <prefix>/archives/<name>.tar        one object per study move: pax tar of zstd-framed members, catalog last

A container is one object, named ``<name>.tar`` (its key adds the prefix). ``begin_container`` names it; puts
stream members through an ``ArchiveWriter`` into an ``ArchiveUpload`` (tiering/s3_upload.py); ``sync`` finishes
the archive and completes the upload (durable and visible at once: ``atomic_publish``), then, with
``verify_upload``, reads the object back and compares its SHA-256. A crash leaves at most an unfinished multipart
upload, which nothing names and ``recover`` aborts.

Writes need the marker with this node's owner (another appliance's prefix is never written into); reads do not.
Faults of the store raise ``TierUnavailable`` (a BlobMissing: readers fall back to other copies); after the store
could not be reached, every call fails at once for ``unreachable_retry_s`` (a circuit breaker), so that a retrieve
of a 200-instance study does not wait for 200 timeouts.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

from appliance.config_tiering import TierConfig
from appliance.errors import ApplianceError, BlobCorrupt, BlobMissing, TierUnavailable, VolumeError
from appliance.store.backend import (
    BlobBackend,
    BlobMeta,
    BlobSource,
    Capabilities,
    LatencyClass,
    Location,
    Recovery,
    StoredBlob,
    Usage,
)
from tiering.archive import (
    HEADER_BYTES_MAX,
    ArchiveTruncated,
    ArchiveWriter,
    Member,
    MemberReader,
    ReadAt,
    delete_whole_archives,
    iter_member,
    make_location,
    member_at,
    parse_location,
    read_catalog,
    read_range,
    scan_archive,
)
from tiering.s3_client import ARCHIVES, LIST_PAGE_KEYS, LIST_PAGES_MAX, MARKER, Bucket
from tiering.s3_errors import map_error
from tiering.s3_upload import ArchiveUpload

__all__ = ["MARKER", "S3Backend", "init_tier", "open_s3"]

log = logging.getLogger(__name__)

SUFFIX = ".tar"
FORMAT = "appliance-archive-v1"
# Parsed member headers kept per backend (a ranged read would otherwise fetch and parse the header again for every
# 64 KiB a BufferedReader asks for). ~0.5 KB each.
MEMBERS_CACHED_MAX = 8192
# A member whose header and data together are at most this is fetched in ONE ranged GET (a CT or MR instance: a
# retrieve costs one request per instance); a larger one has its header fetched, then its frames as needed.
SINGLE_GET_BYTES_MAX = 8 << 20
COPY_CHUNK = 1 << 20


def init_tier(tier: TierConfig, adopt: bool = False) -> str:
    """Check the bucket (create it when it does not exist and the credentials may), then write the prefix's
    marker with this node's owner. A prefix marked by another owner is refused unless ``adopt`` (a replaced node
    taking over its predecessor's archives). Idempotent."""
    bucket = Bucket(tier)
    lines = []
    try:
        bucket.call("head_bucket", Bucket=tier.bucket)
        lines.append(f"bucket {tier.bucket} exists")
    except TierUnavailable:
        raise
    except BlobMissing:
        params: dict[str, Any] = {"Bucket": tier.bucket}
        if tier.region and tier.region != "us-east-1":
            params["CreateBucketConfiguration"] = {"LocationConstraint": tier.region}
        bucket.call("create_bucket", **params)
        lines.append(f"bucket {tier.bucket} did not exist: created it")
    marker = bucket.read_marker()
    if marker is not None and marker.get("owner") == tier.owner and marker.get("tier") == tier.name:
        lines.append(f"{bucket.where()}: already initialised (owner {tier.owner!r})")
        return "\n".join(lines)
    if marker is not None and marker.get("owner") != tier.owner and not adopt:
        raise VolumeError(f"{bucket.where()} belongs to {marker.get('owner')!r} (tier {marker.get('tier')!r}), not "
                          f"to this appliance ({tier.owner!r}); to take it over (this node replaces that one), run "
                          f"`appliance tier init {tier.name} --adopt`")
    body = json.dumps({"tier": tier.name, "kind": "s3", "owner": tier.owner, "created": time.time(),
                       **({"adopted_from": marker.get("owner")} if marker is not None else {})}).encode()
    bucket.call("put_object", Bucket=tier.bucket, Key=bucket.key(MARKER), Body=body, ContentType="application/json")
    if marker is not None:
        lines.append(f"{bucket.where()}: adopted from {marker.get('owner')!r} (owner now {tier.owner!r})")
    else:
        lines.append(f"{bucket.where()}: initialised (owner {tier.owner!r})")
    return "\n".join(lines)


def open_s3(tier: TierConfig) -> S3Backend:
    return S3Backend(tier)


@dataclass
class _Pending:
    """An archive being written: its writer and upload."""

    container: str
    upload: ArchiveUpload
    writer: ArchiveWriter
    error: Exception | None = None  # a write failed: puts and sync raise this again


class _Window:
    """A ReadAt serving from bytes already fetched (a member's header and data in one GET), else the object."""

    def __init__(self, start: int, data: bytes, fallback: ReadAt) -> None:
        self.start, self.data, self.fallback = start, data, fallback

    def __call__(self, offset: int, length: int) -> bytes:
        rel = offset - self.start
        if rel >= 0 and rel + length <= len(self.data):
            return self.data[rel : rel + length]
        return self.fallback(offset, length)


class S3Backend(BlobBackend):
    """Per-study archives as objects of one bucket prefix. ``name`` is the tier's name.

    ``deletes_immediately`` is False, as on nearline: an object holds a whole study; ``delete`` removes it only
    when the call names every blob in it, the mover removes whole containers (``remove_container``)."""

    capabilities = Capabilities(random_read=True, atomic_publish=True, latency=LatencyClass.NEARLINE,
                                deletes_immediately=False)
    # Test hook: called with the object's key between completing an upload and reading it back for verify_upload.
    after_complete: Callable[[str], None] | None = None

    def __init__(self, tier: TierConfig) -> None:
        assert tier.kind == "s3"
        self.tier = tier
        self.name = tier.name
        self.bucket = Bucket(tier)
        self._pending: list[_Pending] = []
        self._current: _Pending | None = None
        self._owner_checked = False
        self._pool: ThreadPoolExecutor | None = None
        self._members: OrderedDict[tuple[str, int], Member] = OrderedDict()
        self._lock = threading.Lock()

    # ---- naming ------------------------------------------------------------------------------------------------

    def object_key(self, container: str) -> str:
        if not container.endswith(SUFFIX) or "/" in container or container.startswith(".") or ":" in container:
            raise BlobMissing(f"{self.name}: no archive {container!r} on this tier")
        return self.bucket.key(ARCHIVES, container)

    def container_of(self, location: Location) -> str:
        return parse_location(location)[0]

    # ---- write path (one writer) -------------------------------------------------------------------------------

    def check_owner(self) -> None:
        """Raise VolumeError unless the prefix's marker names this node (checked once per instance)."""
        if self._owner_checked:
            return
        marker = self.bucket.read_marker()
        where = self.bucket.where()
        if marker is None:
            raise VolumeError(f"object store tier {self.name}: {where} has no {MARKER} marker: run `appliance tier "
                              f"init {self.name}` (nothing is written into a prefix the appliance did not set up)")
        if marker.get("owner") != self.tier.owner:
            raise VolumeError(f"object store tier {self.name}: {where} belongs to {marker.get('owner')!r}, not to "
                              f"this appliance ({self.tier.owner!r}); if this node replaces that one, run "
                              f"`appliance tier init {self.name} --adopt`")
        self._owner_checked = True

    def begin_container(self, hint: str) -> str:
        return self._open_archive(hint).container

    def _open_archive(self, hint: str) -> _Pending:
        self.check_owner()
        # The hint is hashed: a caller passing a study UID must not put it into object keys.
        named = hashlib.sha256(hint.encode()).hexdigest()[:16]
        container = f"{named}-{time.time_ns():016x}-{uuid.uuid4().hex[:8]}{SUFFIX}"
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.tier.uploads_parallel, thread_name_prefix=f"s3-{self.name}")
        metadata = {"format": FORMAT, "tier": self.name, "owner": self.tier.owner, "created-ns": str(time.time_ns())}
        upload = ArchiveUpload(self.bucket.call, self.bucket.bucket, self.object_key(container), self.tier.part_bytes,
                               self.tier.uploads_parallel, self._pool, metadata)
        writer = ArchiveWriter(upload, compression_level=self.tier.compression_level,
                               frame_bytes=self.tier.frame_bytes)
        pending = _Pending(container, upload, writer)
        self._pending.append(pending)
        self._current = pending
        return pending

    def put(self, meta: BlobMeta, source: BlobSource) -> Location:
        assert source.size == meta.size
        pending = self._current if self._current is not None else self._open_archive("blobs")
        if pending.error is not None:
            raise _again(pending.error, f"object store {self.name}: archive {pending.container} failed earlier")
        try:
            member = pending.writer.add(meta, source.chunks(COPY_CHUNK))
        except ValueError as exc:
            if pending.writer.broken:
                pending.error = exc
            raise
        except Exception as exc:
            pending.error = exc
            raise
        return make_location(pending.container, member)

    def sync(self) -> None:
        """Finish and complete every archive written since the last sync (then verify it, with verify_upload).
        After a failure none of the group's archives counts: the rest are aborted, nothing is acknowledged."""
        pending, self._pending, self._current = self._pending, [], None
        done = 0
        try:
            for p in pending:
                self._finish(p)
                done += 1
        except BaseException:
            for p in pending[done:]:
                p.upload.abort()
            raise

    def _finish(self, p: _Pending) -> None:
        if p.error is not None:
            raise _again(p.error, f"object store {self.name}: archive {p.container} was not written whole")
        p.writer.finish()
        p.upload.complete()
        if self.after_complete is not None:
            self.after_complete(p.upload.key)
        if self.tier.verify_upload:
            self.verify_object(p.upload.key, p.upload.sha256_hex, p.upload.size)

    def verify_object(self, key: str, sha256_hex: str, size: int) -> None:
        """Read the object back whole and compare it with what was sent; a mismatch deletes it and raises
        BlobCorrupt (the move fails, the next run redoes it)."""
        hasher = hashlib.sha256()
        got = 0
        self.bucket.breaker.check(self.name)
        try:
            body = self.bucket.client().get_object(Bucket=self.bucket.bucket, Key=key)["Body"]
            for chunk in body.iter_chunks(COPY_CHUNK):
                hasher.update(chunk)
                got += len(chunk)
        except Exception as exc:
            raise map_error(exc, self.name, "get_object", self.bucket.breaker) from None
        if got != size or hasher.hexdigest() != sha256_hex:
            self.bucket.call("delete_object", Bucket=self.bucket.bucket, Key=key)
            raise BlobCorrupt(f"object store {self.name}: {key} read back {got} bytes with another SHA-256 than the "
                              f"{size} sent; deleted it (the move is redone)")

    def publish(self, locations: builtins.list[Location]) -> None:
        """Objects are visible once ``sync`` completed them."""

    def close(self) -> None:
        # Unsynced archives are left as unfinished multipart uploads, as a crash would leave them: recover aborts them.
        for p in self._pending:
            p.upload.abandon()
        self._pending, self._current = [], None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        with self._lock:
            self._members.clear()

    # ---- read path (any thread) --------------------------------------------------------------------------------

    def _read_at(self, container: str) -> ReadAt:
        key = self.object_key(container)

        def read_at(offset: int, length: int) -> bytes:
            return self.bucket.get_range(key, offset, length)
        return read_at

    def _member(self, location: Location, with_data: bool) -> tuple[Member, ReadAt]:
        """The member at ``location`` and a ReadAt over its object. Not cached yet: one GET of its header, and of
        its data too when ``with_data`` and the member is small (a whole-instance read then costs that GET only)."""
        container, record, data, stored, size = parse_location(location)
        read_at = self._read_at(container)
        where = f"{self.name}:{container}"
        key = (container, record)
        with self._lock:
            member = self._members.get(key)
            if member is not None:
                self._members.move_to_end(key)
        if member is None:
            end = data + stored if with_data and data + stored - record <= SINGLE_GET_BYTES_MAX else data
            if data - record > HEADER_BYTES_MAX:  # a bogus location must not make us fetch gigabytes
                raise BlobMissing(f"{where}: no member record at {record}:{data}")
            window = _Window(record, read_at(record, end - record), read_at)
            member = member_at(window, record, data, where)
            read_at = window
            with self._lock:
                self._members[key] = member
                while len(self._members) > MEMBERS_CACHED_MAX:
                    self._members.popitem(last=False)
        if (member.data_offset, member.stored_bytes, member.size) != (data, stored, size):
            raise BlobMissing(f"{self.name}:{location}: the member there is another one")
        return member, read_at

    def read(self, location: Location, offset: int = 0, length: int = -1) -> bytes:
        member, read_at = self._member(location, with_data=True)
        return read_range(read_at, member, offset, length, f"{self.name}:{location}")

    def iter_read(self, location: Location, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
        member, read_at = self._member(location, with_data=True)
        for plain in iter_member(read_at, member, chunk_bytes, f"{self.name}:{location}"):
            for start in range(0, len(plain), chunk_bytes):
                yield plain[start : start + chunk_bytes]

    def sha256(self, location: Location) -> str:
        """The SHA-256 of the original (decompressed) bytes: what the index's digest is."""
        hasher = hashlib.sha256()
        member, read_at = self._member(location, with_data=True)
        for plain in iter_member(read_at, member, COPY_CHUNK, f"{self.name}:{location}"):
            hasher.update(plain)
        return hasher.hexdigest()

    def open(self, location: Location, size: int) -> BinaryIO:
        member, read_at = self._member(location, with_data=True)
        return io.BufferedReader(MemberReader(read_at, member, f"{self.name}:{location}"), buffer_size=1 << 16)

    def stat(self, location: Location) -> BlobMeta:
        return self._member(location, with_data=False)[0].meta

    # ---- listing, deleting, recovery ---------------------------------------------------------------------------

    def archives(self) -> Iterator[tuple[str, int]]:
        """(container, object bytes) of every archive, in key order."""
        prefix = self.bucket.archives_prefix
        for key, size in self.bucket.keys(prefix):
            container = key[len(prefix):]
            if container.endswith(SUFFIX) and "/" not in container and ":" not in container:
                yield container, size

    def members(self, container: str, size: int | None = None) -> builtins.list[Member]:
        """The members of one archive: from its catalog (ranged GETs from its end), else by streaming it whole."""
        where = f"{self.name}:{container}"
        key = self.object_key(container)
        if size is None:
            size = int(self.bucket.call("head_object", Bucket=self.bucket.bucket, Key=key)["ContentLength"])
        try:
            return read_catalog(self._read_at(container), size, where)
        except TierUnavailable:
            raise
        except BlobMissing as exc:
            log.warning("%s: catalog unreadable (%s); scanning the archive", where, exc)
        found: builtins.list[Member] = []
        body = self.bucket.call("get_object", Bucket=self.bucket.bucket, Key=key)["Body"]
        try:
            for member in scan_archive(io.BufferedReader(_Stream(body), COPY_CHUNK), where):
                found.append(member)
        except ArchiveTruncated as exc:
            log.error("%s", exc)
        return found

    def list(self) -> Iterator[StoredBlob]:
        for container, size in self.archives():
            for member in self.members(container, size):
                yield StoredBlob(make_location(container, member), member.meta)

    def delete(self, locations: builtins.list[Location]) -> None:
        delete_whole_archives(locations, self.members, self.remove_container)

    def recover(self, committed_end: Callable[[str], int | None]) -> Recovery:
        """Abort every unfinished multipart upload under ``<prefix>/archives/`` (a crash or a close before sync;
        nothing names them: the mover redoes its journaled move). Completed objects were whole before anything
        named them: no tail. Call it with the tier's writer lock held (no other process uploading)."""
        result = Recovery()
        result.counts.update(aborted_uploads=0)
        try:
            self.check_owner()
        except VolumeError as exc:
            log.warning("%s", exc)  # not ours to clean; writes are refused with the same message
            result.counts["not_owner"] = 1
            return result
        params: dict[str, Any] = {"Bucket": self.bucket.bucket, "Prefix": self.bucket.archives_prefix,
                                  "MaxUploads": LIST_PAGE_KEYS}
        for _page in range(LIST_PAGES_MAX):
            answer = self.bucket.call("list_multipart_uploads", **params)
            for upload in answer.get("Uploads", []):
                self.bucket.call("abort_multipart_upload", Bucket=self.bucket.bucket, Key=upload["Key"],
                                 UploadId=upload["UploadId"])
                result.counts["aborted_uploads"] += 1
            if not answer.get("IsTruncated"):
                break
            params.update(KeyMarker=answer.get("NextKeyMarker", ""), UploadIdMarker=answer.get("NextUploadIdMarker", ""))
        return result

    def remove_container(self, name: str) -> None:
        """Delete an archive object (or abort its upload, if it is still being written). Harmless if gone."""
        key = self.object_key(name)
        self.check_owner()
        for p in [p for p in self._pending if p.container == name]:
            self._pending.remove(p)
            if self._current is p:
                self._current = None
            p.upload.abort()
        with self._lock:
            for cached in [k for k in self._members if k[0] == name]:
                del self._members[cached]
        self.bucket.call("delete_object", Bucket=self.bucket.bucket, Key=key)

    def seal(self) -> None:
        """Nothing stays open across a sync."""

    def usage(self) -> tuple[Usage, ...]:
        """The bytes of every archive (one LIST per 1,000 archives) against capacity_bytes (0: no quota, which
        `tier status` shows as such). An unreachable store is reported as not accepting."""
        name = self.bucket.where()
        capacity = self.tier.capacity_bytes
        try:
            used = sum(size for _container, size in self.archives())
        except ApplianceError as exc:  # tier status and the planner go on with the other tiers
            log.warning("%s", exc)
            return (Usage(name, 0, capacity, False),)
        return (Usage(name, used, capacity, not capacity or used < capacity),)


class _Stream(io.RawIOBase):
    """A botocore StreamingBody as a non-seekable file (scan_archive reads it straight through)."""

    def __init__(self, body: Any) -> None:
        self.body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _again(error: Exception, message: str) -> Exception:
    """The error an archive failed with, raised again (same class: an unavailable store stays TierUnavailable)."""
    if isinstance(error, TierUnavailable):
        return TierUnavailable(f"{message}: {error}", error.tier)  # the tier that was down (maybe the source)
    if isinstance(error, BlobCorrupt | VolumeError | ValueError):
        return type(error)(f"{message}: {error}")
    return TierUnavailable(f"{message}: {error}")
