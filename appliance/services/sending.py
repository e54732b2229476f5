"""Reading a stored instance for a C-STORE sub-operation (C-MOVE, C-GET): as stored, or converted.

A blob is our File Meta followed by the dataset exactly as received. When the destination accepted the stored
transfer syntax, the dataset bytes are streamed as they are: the meta is skipped (records.part10_dataset_offset)
and the rest goes out chunk by chunk as BlobStore.open_blob reads it. Reads are blocking disk I/O, so they run on
a small thread pool (``retrieve.read_threads``) with one chunk read ahead: a sub-operation holds at most two
backend chunks (1 MiB each), whatever the instance's size.

Otherwise the instance is converted with pydicom (decompressed with the pylibjpeg plugins when it is compressed)
to Explicit VR Little Endian, or Implicit VR Little Endian when that is all the destination took, in memory and
only up to ``retrieve.transcode_bytes_max``. We never compress, and never send a syntax the destination did not
accept: an instance with no possible syntax is a failed sub-operation.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncGenerator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID

from appliance.config import Config
from appliance.errors import ApplianceError, TierUnavailable
from appliance.index.records import IMPLICIT_LE, part10_dataset_offset
from appliance.services.context import WorkerContext
from appliance.services.retrieve import Match

log = logging.getLogger(__name__)

EXPLICIT_LE = "1.2.840.10008.1.2.1"
# What we can convert any stored syntax to, in order of preference.
UNCOMPRESSED = (EXPLICIT_LE, IMPLICIT_LE)
# The File Meta is parsed from the blob's first bytes; it is a few hundred bytes, this is plenty.
META_PREFIX_BYTES = 64 << 10
# A converted dataset is handed to the network in pieces of this size (the PDUs are built per piece).
CONVERTED_PIECE_BYTES = 1 << 20

_pool: ThreadPoolExecutor | None = None


class SubOperationFailed(Exception):
    """This instance cannot be sent; the sub-operation counts as failed (``comment`` is logged, no PHI)."""


def pool(config: Config) -> ThreadPoolExecutor:
    """The worker's retrieve readers, created on first use (worker processes are forked after the config is read)."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(config.retrieve.read_threads, thread_name_prefix="retrieve-read")
    return _pool


def choose_syntax(stored: str, accepted: dict[str, int]) -> tuple[str, int] | None:
    """(transfer syntax, context id) to send an instance stored in ``stored`` on, from the accepted contexts of its
    SOP class (transfer syntax -> context id): the stored syntax when accepted, else an uncompressed one."""
    if stored in accepted:
        return stored, accepted[stored]
    for ts in UNCOMPRESSED:
        if ts in accepted:
            return ts, accepted[ts]
    return None


@dataclass
class Outgoing:
    """One instance ready to go: its context, its syntax and its dataset bytes as an async iterator. The iterator
    must be closed (contextlib.aclosing) so that the reader is released even when the send stops half-way."""

    context_id: int
    transfer_syntax: str
    chunks: AsyncGenerator[bytes, None]


async def prepare(ctx: WorkerContext, match: Match, accepted: dict[str, int], peer: str) -> Outgoing:
    """Open ``match`` for sending on one of the ``accepted`` contexts (``peer`` names the destination in logs).
    Raises SubOperationFailed before anything is sent when the instance cannot be read or converted, so that a
    failed instance never leaves half a message on the association."""
    choice = choose_syntax(match.transfer_syntax, accepted)
    if choice is None:
        # The Error Comment holds 64 characters: what matters first, who and which class after.
        raise SubOperationFailed(f"no accepted syntax for one stored as {_name(match.transfer_syntax)} "
                                 f"({_name(match.sop_class_uid)}, {peer})")
    ts, context_id = choice
    loop = asyncio.get_running_loop()
    readers = pool(ctx.config)
    if ts == match.transfer_syntax:
        try:
            first, rest = await loop.run_in_executor(readers, _open_dataset, ctx, match)
        except TierUnavailable as exc:
            raise SubOperationFailed(str(exc)) from None  # "object store X unreachable": already says it all
        except (ApplianceError, OSError) as exc:
            raise SubOperationFailed(f"stored instance not readable: {exc}") from None
        return Outgoing(context_id, ts, _stream(first, rest, readers))
    limit = ctx.config.retrieve.transcode_bytes_max
    if match.size > limit:
        raise SubOperationFailed(f"too large to convert ({match.size} bytes > retrieve.transcode_bytes_max) to "
                                 f"{_name(ts)} for {peer}")
    # Debug: a move of a compressed CT to a peer that takes only uncompressed converts every instance.
    log.debug("converting a %s instance from %s to %s for %s", _name(match.sop_class_uid),
             _name(match.transfer_syntax), _name(ts), peer)
    data = await loop.run_in_executor(readers, _convert, ctx, match, ts)
    return Outgoing(context_id, ts, _pieces(data))


def _name(uid: str) -> str:
    name = UID(uid).name
    return name if name and name != uid else uid


def _read_blob(ctx: WorkerContext, match: Match) -> tuple[int, Iterator[bytes]]:
    """(the blob's size, its chunks)."""
    blob = ctx.index.blob(match.digest)
    if blob is None:
        raise SubOperationFailed("the index names no bytes for this instance")
    return blob.size, ctx.blobstore.open_blob(match.digest, blob)


def _open_dataset(ctx: WorkerContext, match: Match) -> tuple[bytes, Iterator[bytes] | None]:
    """(the first dataset bytes, the iterator of the rest or None when the first read got it all), the File Meta
    skipped. Runs on a reader thread."""
    size, chunks = _read_blob(ctx, match)
    try:
        prefix = b""
        for chunk in chunks:
            prefix += chunk
            if len(prefix) >= META_PREFIX_BYTES:
                break
        offset, _ts = part10_dataset_offset(prefix)
    except BaseException:
        _close(chunks)
        raise
    if len(prefix) >= size:
        # Most instances fit in one backend read (1 MiB): no second trip to a reader thread to learn that.
        _close(chunks)
        return prefix[offset:], None
    return prefix[offset:], chunks


def _close(chunks: Iterator[bytes]) -> None:
    close = getattr(chunks, "close", None)
    if close is not None:
        close()


async def _stream(first: bytes, rest: Iterator[bytes] | None,
                  readers: ThreadPoolExecutor) -> AsyncGenerator[bytes, None]:
    """``first`` then the rest of the blob, each next chunk read on a reader thread while this one is sent."""
    if rest is None:
        yield first
        return
    loop = asyncio.get_running_loop()
    pending: asyncio.Future[bytes | None] | None = None
    try:
        if first:
            pending = loop.run_in_executor(readers, next, rest, None)
            yield first
        while True:
            if pending is None:
                pending = loop.run_in_executor(readers, next, rest, None)
            try:
                chunk = await pending
            except (ApplianceError, OSError) as exc:
                # Half the dataset is on the wire: the caller must end that association (no way to finish it).
                raise SubOperationFailed(f"read error in the middle of an instance: {exc}") from None
            pending = None
            if chunk is None:
                return
            pending = loop.run_in_executor(readers, next, rest, None)
            yield chunk
    finally:
        # The iterator may still be running on a reader thread (the send stopped half-way): close it there, once
        # that read is over, never from this thread while it runs. A read error after the send stopped is moot.
        def release(done: asyncio.Future[bytes | None] | None) -> None:
            if done is not None and not done.cancelled():
                done.exception()  # retrieved, so asyncio does not log it as never retrieved
            readers.submit(_close, rest)

        if pending is not None and not pending.done():
            pending.add_done_callback(release)
        else:
            release(pending)


async def _pieces(data: bytes) -> AsyncGenerator[bytes, None]:
    view = memoryview(data)
    for start in range(0, len(view), CONVERTED_PIECE_BYTES):
        yield bytes(view[start : start + CONVERTED_PIECE_BYTES])


def _convert(ctx: WorkerContext, match: Match, ts: str) -> bytes:
    """The instance's dataset in ``ts`` (Explicit or Implicit VR Little Endian), decompressed if need be."""
    try:
        blob = b"".join(_read_blob(ctx, match)[1])
    except TierUnavailable as exc:
        raise SubOperationFailed(str(exc)) from None
    except (ApplianceError, OSError) as exc:
        raise SubOperationFailed(f"stored instance not readable: {exc}") from None
    try:
        ds = dcmread(io.BytesIO(blob))
        del blob
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            # Never a new SOP Instance UID: the destination must get the instance it asked for.
            ds.decompress(generate_instance_uid=False)
        out = DicomBytesIO()
        out.is_little_endian, out.is_implicit_VR = True, ts == IMPLICIT_LE
        write_dataset(out, ds)
        return out.getvalue()
    except SubOperationFailed:
        raise
    except Exception as exc:  # any decoder's failure: this instance fails, the retrieve goes on
        raise SubOperationFailed(f"cannot convert from {_name(match.transfer_syntax)} to {_name(ts)}: "
                                 f"{type(exc).__name__}") from None
