"""The S3 tier's bucket access (tiering/s3.py): credentials, the boto3 client, and every call through the error
mapping and the circuit breaker (tiering/s3_errors.py).

One client per backend, made on first use (opening a tier does no network I/O: a worker starts while the store is
down) and shared by the reader threads and the upload threads (boto3 clients are thread-safe). The credentials file
is read when the backend is opened, so that a key file others can read is refused at once.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from appliance.config_tiering import TierConfig
from appliance.errors import BlobMissing, ConfigError, TierUnavailable, VolumeError
from tiering.s3_errors import CircuitBreaker, map_error

MARKER = ".appliance-tier"
ARCHIVES = "archives"
# Reader threads of a process that may read the tier at once (a worker's reader pool, the recaller): the HTTP
# connection pool holds this many plus the upload threads, so that nobody waits for a connection.
READER_CONNECTIONS = 16
LIST_PAGE_KEYS = 1000  # the S3 API's page size; every listing loop is bounded by LIST_PAGES_MAX pages
LIST_PAGES_MAX = 1_000_000

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


def make_client(tier: TierConfig, creds: Credentials | None) -> Any:
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
    if creds is not None:
        keys = {"aws_access_key_id": creds.access_key_id, "aws_secret_access_key": creds.secret_access_key,
                "aws_session_token": creds.session_token}
    verify: bool | str = str(tier.ca_file) if tier.ca_file is not None else tier.tls_verify
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=tier.endpoint or None, region_name=tier.region, config=config,
                          verify=verify, **keys)


class Bucket:
    """The tier's bucket and prefix behind one lazily made client, every call through the error mapping and the
    circuit breaker. Thread-safe (boto3 clients are)."""

    def __init__(self, tier: TierConfig) -> None:
        self.tier = tier
        self.name = tier.name
        self.bucket = tier.bucket
        self.breaker = CircuitBreaker(tier.unreachable_retry_s)
        # Read now (no network I/O): a key file others can read is refused when the tier is opened.
        self._creds = load_credentials(tier.credentials_file) if tier.credentials_file is not None else None
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
                self._client = make_client(self.tier, self._creds)
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
