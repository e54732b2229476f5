"""The C-FIND SCP (PS3.4 C.4.1) for the Patient Root and Study Root models, answered from the index alone.

The identifier is collected (up to query.identifier_bytes_max), parsed and checked (appliance/query), then the
search runs in one of the worker's query threads (query.threads_max) one bounded batch at a time; each batch's
matches are encoded there too and sent as Pending responses as soon as the batch is done. A C-CANCEL is honoured
between two responses (0xFE00); query.results_max and query.search_s_max end a query with 0xA700 and an Error
Comment saying which. Logs carry the plan and the counts, never an attribute value (patient data).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from appliance import errors
from appliance.audit import MINOR_FAILURE, SUCCESS
from appliance.dicom.uids import FIND_MODELS
from appliance.net import dimse
from appliance.net.service import Request, Response
from appliance.query.encoding import encode_match
from appliance.query.identifier import Query, QueryError, parse
from appliance.query.search import Search, SearchOptions, describe
from appliance.services.context import WorkerContext
from appliance.services.registry import register

log = logging.getLogger(__name__)
T = TypeVar("T")

# The worker's C-FIND threads (query.threads_max), made on first use (after the worker process is forked): searches
# of many associations queue here instead of taking the default executor other services may need.
_pool: ThreadPoolExecutor | None = None


async def in_query_thread(threads: int, fn: Callable[..., T], *args: Any) -> T:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(threads, thread_name_prefix="find")
    return await asyncio.get_running_loop().run_in_executor(_pool, functools.partial(fn, *args))

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"


class FindHandler:
    def __init__(self, ctx: WorkerContext, request: Request) -> None:
        self.ctx = ctx
        self.request = request
        self.identifier = bytearray()
        self.too_large = False
        self.cancelled = False
        self.abandoned = False

    def feed(self, data: memoryview) -> None:
        if self.too_large:
            return
        if len(self.identifier) + len(data) > self.ctx.config.query.identifier_bytes_max:
            self.too_large = True
            self.identifier = bytearray()  # dropped now: the rest is read and thrown away
            return
        self.identifier += data

    def cancel(self) -> None:
        self.cancelled = True

    def abandon(self) -> None:
        self.abandoned = True

    async def responses(self) -> AsyncIterator[Response]:
        cfg = self.ctx.config.query
        if self.too_large:
            yield Response(errors.UNABLE_TO_PROCESS, f"identifier larger than {cfg.identifier_bytes_max} bytes")
            return
        if not self.request.command.has_dataset:
            yield Response(errors.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "C-FIND without an identifier")
            return
        started = time.monotonic()
        ts = self.request.transfer_syntax
        encoding = (ts == IMPLICIT_LE, ts != EXPLICIT_BE, ts == DEFLATED)
        options = SearchOptions(self.ctx.config.server.ae_title, cfg.batch_rows_max,
                                cfg.case_sensitive_person_names, cfg.combined_date_time_matching)
        try:
            query = await in_query_thread(cfg.threads_max, parse, bytes(self.identifier), *encoding,
                                          self.request.abstract_syntax)
            search = await in_query_thread(cfg.threads_max, Search, self.ctx.index, query, options)
        except QueryError as exc:
            log.info("C-FIND from %s refused: %s", self.request.calling_ae, exc.comment)
            self._audit(started, "", 0, exc.status)
            yield Response(exc.status, exc.comment)
            return
        self.identifier = bytearray()
        pending = errors.PENDING_WARNING if search.unsupported else errors.PENDING
        deadline = time.monotonic() + cfg.search_s_max
        sent = 0
        final = Response(errors.SUCCESS)
        done = False
        while not done:
            if self.cancelled or self.abandoned:
                final = Response(errors.CANCEL)
                break
            if time.monotonic() > deadline:
                final = Response(errors.OUT_OF_RESOURCES, f"search longer than {cfg.search_s_max:g} s: narrow it")
                break
            try:
                encoded, done = await in_query_thread(cfg.threads_max, self._batch, search, query, encoding)
            except QueryError as exc:
                final = Response(exc.status, exc.comment)
                break
            for dataset in encoded:
                if self.cancelled or self.abandoned:
                    break
                if sent >= cfg.results_max:
                    final = Response(errors.OUT_OF_RESOURCES, f"more than {cfg.results_max} matches: narrow the query")
                    done = True
                    break
                yield Response(pending, dataset=dataset)
                sent += 1
                await asyncio.sleep(0)  # let the association read a C-CANCEL between two responses
        if final.status == errors.SUCCESS and (self.cancelled or self.abandoned):
            final = Response(errors.CANCEL)
        log.debug("C-FIND from %s: %d match(es), final 0x%04X, %s", self.request.calling_ae, sent, final.status,
                  describe(search))
        self._audit(started, query.level, sent, final.status)
        yield final

    def _audit(self, started: float, level: str, matches: int, status: int) -> None:
        """One Query line per C-FIND: the level and the number of matches, never the keys (they can hold names)."""
        session = self.request.session
        if session is None:
            return
        session.request("C-FIND")
        outcome = SUCCESS if status in (errors.SUCCESS, errors.CANCEL) else MINOR_FAILURE
        session.emit("query", outcome, level=level or None, matches=matches, status=f"0x{status:04X}",
                     sop_class=self.request.abstract_syntax, duration_s=round(time.monotonic() - started, 3))

    @staticmethod
    def _batch(search: Search, query: Query, encoding: tuple[bool, bool, bool]) -> tuple[list[bytes], bool]:
        """One batch of the search and the encoding of its matches (in a worker thread)."""
        records, done = search.next_batch()
        return [encode_match(query, record, *encoding) for record in records], done


def find_handler(ctx: WorkerContext, request: Request) -> FindHandler:
    return FindHandler(ctx, request)


register(dimse.C_FIND_RQ, FIND_MODELS, "find", find_handler)
