"""The streaming upload of one archive object of the S3 tier (tiering/s3.py): the ``Sink`` an ``ArchiveWriter``
writes into.

Bytes collect in a buffer; each time it holds ``part_bytes``, the part goes up as a multipart upload part with its
own ``ChecksumSHA256`` (the store rejects a part damaged on the way), at most ``parallel`` parts in flight, so
memory stays under part_bytes x (parallel + 1). ``complete`` sends the rest: one PutObject when the archive never
reached a part (most studies), else the last part and CompleteMultipartUpload. Until then nothing is visible under
the key: a crash leaves at most an unfinished multipart upload, which ``S3Backend.recover`` aborts.

The SHA-256 of the whole object is computed while the bytes are written (``sha256_hex``): the backend compares it
with a read-back after completion (an ETag is no digest for multipart objects).
"""

from __future__ import annotations

import base64
import hashlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

# A bucket call through the backend (error mapping, circuit breaker): (operation, **parameters) -> the answer.
Call = Callable[..., Any]

PARTS_MAX = 10_000  # the S3 API's limit per upload


def sha256_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


class ArchiveUpload:
    """One object being written under ``key``. Not thread-safe (one writer); parts go up on ``pool``'s threads."""

    def __init__(self, call: Call, bucket: str, key: str, part_bytes: int, parallel: int, pool: ThreadPoolExecutor,
                 metadata: dict[str, str]) -> None:
        assert part_bytes >= 1 and parallel >= 1
        self._call = call
        self.bucket, self.key = bucket, key
        self.part_bytes, self.parallel = part_bytes, parallel
        self._pool = pool
        self.metadata = metadata
        self._hasher = hashlib.sha256()
        self.size = 0  # bytes written so far
        self._buffer = bytearray()
        self.upload_id: str | None = None
        self._parts_sent = 0
        self._inflight: deque[Future[dict[str, Any]]] = deque()
        self._done_parts: list[dict[str, Any]] = []
        self.completed = False

    @property
    def sha256_hex(self) -> str:
        return self._hasher.hexdigest()

    @property
    def multipart(self) -> bool:
        return self.upload_id is not None

    def write(self, data: bytes | memoryview, /) -> int:
        assert not self.completed
        self._hasher.update(data)
        self.size += len(data)
        self._buffer += data
        while len(self._buffer) >= self.part_bytes:
            part = bytes(self._buffer[: self.part_bytes])
            del self._buffer[: self.part_bytes]
            self._send_part(part)
        return len(data)

    def _send_part(self, body: bytes) -> None:
        if self.upload_id is None:
            answer = self._call("create_multipart_upload", Bucket=self.bucket, Key=self.key, Metadata=self.metadata,
                                ChecksumAlgorithm="SHA256", ContentType="application/x-tar")
            self.upload_id = str(answer["UploadId"])
        if self._parts_sent >= PARTS_MAX:
            raise ValueError(f"{self.key}: more than {PARTS_MAX} parts of {self.part_bytes} bytes (raise part_bytes)")
        while len(self._inflight) >= self.parallel:  # bounded memory: wait for the oldest part in flight
            self._done_parts.append(self._inflight.popleft().result())
        self._parts_sent += 1
        self._inflight.append(self._pool.submit(self._upload_part, self._parts_sent, body))

    def _upload_part(self, number: int, body: bytes) -> dict[str, Any]:
        checksum = sha256_b64(body)
        answer = self._call("upload_part", Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                            PartNumber=number, Body=body, ChecksumSHA256=checksum)
        return {"PartNumber": number, "ETag": answer["ETag"], "ChecksumSHA256": checksum}

    def complete(self) -> None:
        """Send what is left and make the object visible (atomically: whole or not at all)."""
        if self.upload_id is None:
            body = bytes(self._buffer)
            self._buffer.clear()
            self._call("put_object", Bucket=self.bucket, Key=self.key, Body=body, Metadata=self.metadata,
                       ChecksumSHA256=sha256_b64(body), ContentType="application/x-tar")
        else:
            if self._buffer:
                part = bytes(self._buffer)
                self._buffer.clear()
                self._send_part(part)
            while self._inflight:
                self._done_parts.append(self._inflight.popleft().result())
            parts = sorted(self._done_parts, key=lambda p: int(p["PartNumber"]))
            self._call("complete_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                       MultipartUpload={"Parts": parts})
        self.completed = True

    def abandon(self) -> None:
        """Stop without completing (a failed archive, a close before sync): parts in flight are waited for (each is
        bounded by the client's timeouts), the buffer freed. The multipart upload itself is left for ``abort`` or
        for ``recover`` (as a crash would leave it)."""
        while self._inflight:
            future = self._inflight.popleft()
            if not future.cancel():
                try:
                    future.result()
                except Exception:  # noqa: BLE001 - the upload is given up either way
                    pass
        self._buffer = bytearray()

    def abort(self) -> None:
        """Abandon, then abort the multipart upload (best effort: ``recover`` aborts what this could not)."""
        self.abandon()
        if self.upload_id is not None and not self.completed:
            try:
                self._call("abort_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)
            except Exception:  # noqa: BLE001 - the store may be the reason we abort
                pass
