"""What the S3 tier's errors mean to the appliance (tiering/s3.py), and its circuit breaker.

botocore's exceptions become ours: a missing object or range -> ``BlobMissing``; a store that cannot be reached,
answers too slowly, throttles or fails beyond the client's retries, or refuses our credentials -> ``TierUnavailable``
(a BlobMissing: readers fall back to another copy; the mover pauses its run). Messages start with
``object store <tier>`` and say the key fact first: a retrieve puts them into a DICOM Error Comment (64 chars).
Nothing here logs or repeats a request's parameters (signatures, keys).
"""

from __future__ import annotations

import time

from appliance.errors import ApplianceError, BlobMissing, TierUnavailable

MISSING_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchUpload"}
REFUSED_CODES = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
                 "AccountProblem", "InvalidObjectState"}
BUSY_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "Throttling", "ThrottlingException",
              "RequestTimeout", "RequestTimeTooSkewed", "503", "500"}


class RangeBeyondEnd(BlobMissing):
    """A ranged GET starting at or past the object's end (416 InvalidRange)."""

    invalid_range = True


class CircuitBreaker:
    """After a failure to reach the store, fail at once for ``retry_s`` instead of waiting for a timeout per call.
    Shared by the threads of one backend (a float assignment is atomic)."""

    def __init__(self, retry_s: float) -> None:
        self.retry_s = retry_s
        self.open_until = 0.0  # time.monotonic() before which calls fail at once
        self.reason = ""

    def check(self, tier: str) -> None:
        left = self.open_until - time.monotonic()
        if left > 0:
            raise TierUnavailable(f"object store {tier} unreachable ({self.reason}; next try in {left:.0f} s)")

    def trip(self, reason: str) -> None:
        self.reason = reason
        self.open_until = time.monotonic() + self.retry_s


def map_error(exc: BaseException, tier: str, operation: str, breaker: CircuitBreaker) -> BaseException:
    """The appliance's error for what a bucket call raised (``exc`` itself when it is not the store's)."""
    from botocore import exceptions as bx

    if isinstance(exc, ApplianceError):
        return exc
    if isinstance(exc, bx.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code == "InvalidRange" or status == 416:
            return RangeBeyondEnd(f"object store {tier}: range beyond the object's end ({operation})")
        if code in MISSING_CODES:
            return BlobMissing(f"object store {tier}: no such object ({operation})")
        if code == "NoSuchBucket":
            return TierUnavailable(f"object store {tier}: bucket missing (NoSuchBucket, {operation})")
        if code in REFUSED_CODES or status == 403:
            return TierUnavailable(f"object store {tier} refused {operation}: {code or status}")
        if code in BUSY_CODES or status >= 500:
            return TierUnavailable(f"object store {tier} busy: {code or status} after retries ({operation})")
        return TierUnavailable(f"object store {tier} error {code or status} ({operation})")
    if isinstance(exc, bx.ConnectTimeoutError | bx.EndpointConnectionError | bx.ProxyConnectionError):
        reason = "connect timeout" if isinstance(exc, bx.ConnectTimeoutError) else "connection refused"
        breaker.trip(reason)
        return TierUnavailable(f"object store {tier} unreachable ({reason}, {operation})")
    if isinstance(exc, bx.ReadTimeoutError):
        breaker.trip("read timeout")
        return TierUnavailable(f"object store {tier} unreachable (read timeout, {operation})")
    if isinstance(exc, bx.ConnectionClosedError | bx.ResponseStreamingError | bx.HTTPClientError):
        return TierUnavailable(f"object store {tier}: connection dropped ({operation})")
    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        return TierUnavailable(f"object store {tier}: no credentials (credentials_file, or AWS_* variables)")
    if isinstance(exc, bx.SSLError):
        breaker.trip("TLS error")
        return TierUnavailable(f"object store {tier}: TLS failed ({operation}): check tls_verify / ca_file")
    return exc
