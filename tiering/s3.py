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
import os
import stat
import threading
import time
import tomllib
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

from appliance.config_tiering import TierConfig
from appliance.errors import BlobCorrupt, BlobMissing, ConfigError, TierUnavailable, VolumeError
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
    ArchiveTruncated,
    ArchiveWriter,
    Member,
    MemberReader,
    ReadAt,
    iter_member,
    make_location,
    member_at,
    parse_location,
    read_catalog,
    read_range,
    scan_archive,
)
from tiering.s3_errors import CircuitBreaker, map_error
from tiering.s3_upload import ArchiveUpload

log = logging.getLogger(__name__)

MARKER = ".appliance-tier"
ARCHIVES = "archives"
SUFFIX = ".tar"
FORMAT = "appliance-archive-v1"
# Parsed member headers kept per backend (a ranged read would otherwise fetch and parse the header again for every
# 64 KiB a BufferedReader asks for). ~0.5 KB each.
MEMBERS_CACHED_MAX = 8192
# A member whose header and data together are at most this is fetched in ONE ranged GET (a CT or MR instance: a
# retrieve costs one request per instance); a larger one has its header fetched, then its frames as needed.
SINGLE_GET_BYTES_MAX = 8 << 20
# Reader threads of a process that may read the tier at once (a worker's reader pool, the recaller): the HTTP
# connection pool holds this many plus the upload threads, so that nobody waits for a connection.
READER_CONNECTIONS = 16
LIST_PAGE_KEYS = 1000  # the S3 API's page size; every listing loop is bounded by LIST_PAGES_MAX pages
LIST_PAGES_MAX = 1_000_000
COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str
    session_token: str | None = None

    def __repr__(self) -> str:  # never logged, never in a traceback's locals dump
        return f"Credentials({self.access_key_id[:4]}...)"


def load_credentials(path: os.PathLike[str] | str) -> Credentials:
    """The keys of a credentials_file (TOML ``access_key_id``, ``secret_access_key``, optional ``session_token``).
    Like an ssh key, a file that others may read, or that another user owns, is refused."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"credentials_file {path}: {exc.strerror}") from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ConfigError(f"credentials_file {path}: mode {stat.S_IMODE(st.st_mode):04o} lets other users read the "
                          f"object store's keys; `chmod 600 {path}`")
    if st.st_uid != os.geteuid():
        raise ConfigError(f"credentials_file {path}: owned by uid {st.st_uid}, not by the service user "
                          f"(uid {os.geteuid()})")
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
        keys = Credentials(str(data["access_key_id"]), str(data["secret_access_key"]),
                           str(data["session_token"]) if "session_token" in data else None)
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"credentials_file {path}: needs access_key_id and secret_access_key "
                          f"({type(exc).__name__})") from None
    return keys


def make_client(tier: TierConfig) -> Any:
    """A boto3 S3 client for the tier: path-style addressing (any S3-compatible store), the tier's timeouts and
    retries, a connection pool for the reader threads and the parallel uploads, TLS verified against ca_file or
    the system's CAs."""
    import boto3
    from botocore.config import Config as BotoConfig

    config = BotoConfig(connect_timeout=tier.connect_timeout_s, read_timeout=tier.read_timeout_s,
                        retries={"max_attempts": tier.retries_max, "mode": "standard"},
                        s3={"addressing_style": "path"},
                        max_pool_connections=READER_CONNECTIONS + tier.uploads_parallel,
                        # We send our own SHA-256 where it matters; botocore's default CRC trailers (aws-chunked
                        # bodies) are not understood by every S3-compatible store.
                        request_checksum_calculation="when_required",
                        response_checksum_validation="when_required")
    keys: dict[str, Any] = {}
    if tier.credentials_file is not None:
        creds = load_credentials(tier.credentials_file)
        keys = {"aws_access_key_id": creds.access_key_id, "aws_secret_access_key": creds.secret_access_key,
                "aws_session_token": creds.session_token}
    verify: bool | str = str(tier.ca_file) if tier.ca_file is not None else tier.tls_verify
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=tier.endpoint or None, region_name=tier.region, config=config,
                          verify=verify, **keys)


class _Bucket:
    """The tier's bucket and prefix behind one lazily made client, every call through the error mapping and the
    circuit breaker. Thread-safe (boto3 clients are)."""

    def __init__(self, tier: TierConfig) -> None:
        self.tier = tier
        self.name = tier.name
        self.bucket = tier.bucket
        self.breaker = CircuitBreaker(tier.unreachable_retry_s)
        self._client: Any = None
        self._lock = threading.Lock()

    def key(self, *parts: str) -> str:
        return "/".join([self.tier.prefix, *parts] if self.tier.prefix else parts)

    @property
    def archives_prefix(self) -> str:
        return self.key(ARCHIVES) + "/"

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = make_client(self.tier)
            return self._client

    def call(self, operation: str, **params: Any) -> Any:
        self.breaker.check(self.name)
        try:
            return getattr(self.client(), operation)(**params)
        except Exception as exc:
            raise map_error(exc, self.name, operation, self.breaker) from None

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes of an object from ``offset``, short at its end (ReadAt's contract)."""
        if length <= 0:
            return b""
        self.breaker.check(self.name)
        try:
            answer = self.client().get_object(Bucket=self.bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}")
            data: bytes = answer["Body"].read()
        except Exception as exc:
            mapped = map_error(exc, self.name, "get_object", self.breaker)
            if getattr(mapped, "invalid_range", False):
                return b""  # offset at or past the object's end
            raise mapped from None
        return data[:length]

    def keys(self, prefix: str) -> Iterator[tuple[str, int]]:
        """(key, size) of every object under ``prefix``, in key order, a page at a time."""
        token: str | None = None
        for _page in range(LIST_PAGES_MAX):
            params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": LIST_PAGE_KEYS}
            if token:
                params["ContinuationToken"] = token
            answer = self.call("list_objects_v2", **params)
            for obj in answer.get("Contents", []):
                yield str(obj["Key"]), int(obj["Size"])
            token = answer.get("NextContinuationToken")
            if not answer.get("IsTruncated") or not token:
                return

    def read_marker(self) -> dict[str, Any] | None:
        try:
            body = self.call("get_object", Bucket=self.bucket, Key=self.key(MARKER))["Body"].read()
        except BlobMissing as exc:
            if isinstance(exc, TierUnavailable):
                raise
            return None
        try:
            data = json.loads(body)
        except ValueError:
            raise VolumeError(f"object store tier {self.name}: unreadable marker s3://{self.bucket}/"
                              f"{self.key(MARKER)}") from None
        return data if isinstance(data, dict) else {}

    def where(self) -> str:
        return f"s3://{self.bucket}/{self.tier.prefix}"


def init_tier(tier: TierConfig, adopt: bool = False) -> str:
    """Check the bucket (create it when it does not exist and the credentials may), then write the prefix's
    marker with this node's owner. A prefix marked by another owner is refused unless ``adopt`` (a replaced node
    taking over its predecessor's archives). Idempotent."""
    bucket = _Bucket(tier)
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
        self.bucket = _Bucket(tier)
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
            if data - record > SINGLE_GET_BYTES_MAX:
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
        by_container: dict[str, set[int]] = {}
        for location in locations:
            container, record, *_ = parse_location(location)
            by_container.setdefault(container, set()).add(record)
        for container, records in by_container.items():
            try:
                members = self.members(container)
            except TierUnavailable:
                raise
            except BlobMissing:
                continue  # already gone
            if {m.record_offset for m in members} <= records:
                self.remove_container(container)

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
        except TierUnavailable as exc:
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
    if isinstance(error, TierUnavailable | BlobCorrupt | VolumeError | ValueError):
        return type(error)(f"{message}: {error}")
    return TierUnavailable(f"{message}: {error}")
