"""Storage Commitment Push Model SCP (PS3.4 Annex J; issue 9 item 4).

A requester sends N-ACTION-RQ (Action Type 1) naming a Transaction UID and the SOP instances it wants us to take
responsibility for. We answer N-ACTION-RSP at once (the answer only says the request was understood), then verify
each instance: committed only when it is indexed, under the SOP class the requester names, and its stored bytes
still hash to the digest the index recorded (re-read from disk, in threads, a few at a time). The outcome goes
back as N-EVENT-REPORT-RQ (Event Type 1: all committed, 2: some failed): on the association of the request while
it is open, else on a new association we request to the peer's configured host and port, as SCP of the SOP class
through SCP/SCU role selection (PS3.4 J.3.3).

A request answered with Success is written to a small journal first (commitment_journal.py), so that a worker
that stops before it has reported takes it up when it starts again: verified again and reported on a new
association (docs/storage-commitment.md).
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.dsutils import decode, encode

from appliance import errors
from appliance.audit import MINOR_FAILURE, SERIOUS_FAILURE, SUCCESS
from appliance.config import CommitmentConfig, PeerConfig
from appliance.dicom.uids import STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_PUSH_INSTANCE
from appliance.index.schema import COPY_OK, Copy
from appliance.net import dimse
from appliance.net.client import AssociationAborted, AssociationRejected, ClientAssociation
from appliance.net.service import ChannelClosed, Request, Response
from appliance.services.commitment_journal import Journal, JournalEntry
from appliance.services.context import WorkerContext
from appliance.services.registry import register

log = logging.getLogger(__name__)

REQUEST_STORAGE_COMMITMENT = 1  # the one Action Type ID of the SOP class (PS3.4 J.3.2)
EVENT_ALL_COMMITTED = 1  # Event Type IDs of the report (PS3.4 J.3.3)
EVENT_SOME_FAILED = 2

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
# What we propose for a report on an association of our own: the two every implementation has.
REPORT_TRANSFER_SYNTAXES = [EXPLICIT_LE, IMPLICIT_LE]


@dataclass(frozen=True)
class Reference:
    sop_class_uid: str
    sop_instance_uid: str


@dataclass
class Outcome:
    committed: list[Reference] = field(default_factory=list)
    failed: list[tuple[Reference, int]] = field(default_factory=list)  # with its Failure Reason (PS3.4 J.3.3.1)

    @property
    def event_type(self) -> int:
        return EVENT_SOME_FAILED if self.failed else EVENT_ALL_COMMITTED


@dataclass
class Pending:
    """A request answered with Success, to verify and report."""

    transaction_uid: str
    calling_ae: str
    references: list[Reference]
    journal_name: str = ""
    request: Request | None = None  # the request as it came, while this worker runs; None when taken up at start


class BadRequest(Exception):
    """An N-ACTION refused before anything is verified; ``status`` is the N-ACTION-RSP's."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status


# ---- the datasets ---------------------------------------------------------------------------------------------

def _syntax(transfer_syntax: str) -> tuple[bool, bool, bool]:
    """(implicit VR, little endian, deflated) of a transfer syntax; encapsulated ones encode like explicit LE."""
    return (transfer_syntax == IMPLICIT_LE, transfer_syntax != EXPLICIT_BE, transfer_syntax == DEFLATED_LE)


def parse_action(data: bytes, transfer_syntax: str, max_references: int) -> tuple[str, list[Reference]]:
    """The Transaction UID and the references of an N-ACTION's Action Information (PS3.4 J.3.2.1.1). Anything
    missing or unreadable is BadRequest 0x0115 (Invalid argument value): PS3.7 10.1.4.1.10 lists no "missing
    attribute" status for N-ACTION."""
    implicit, little, deflated = _syntax(transfer_syntax)
    try:
        ds = decode(io.BytesIO(data), implicit, little, deflated)
        transaction = str(ds.get("TransactionUID", "") or "").strip()
        items = ds.get("ReferencedSOPSequence")
        if not transaction:
            raise BadRequest(errors.INVALID_ARGUMENT_VALUE, "no Transaction UID")
        if not UID(transaction).is_valid:
            raise BadRequest(errors.INVALID_ARGUMENT_VALUE, "Transaction UID is not a valid UID")
        if not items:
            raise BadRequest(errors.INVALID_ARGUMENT_VALUE, "no Referenced SOP Sequence items")
        if len(items) > max_references:
            raise BadRequest(errors.RESOURCE_LIMITATION,
                             f"{len(items)} references (commitment.references_per_request_max {max_references})")
        references = []
        for item in items:
            sop_class = str(item.get("ReferencedSOPClassUID", "") or "").strip()
            sop_instance = str(item.get("ReferencedSOPInstanceUID", "") or "").strip()
            if not sop_class or not sop_instance:
                raise BadRequest(errors.INVALID_ARGUMENT_VALUE, "a reference without its SOP class or instance UID")
            # Checked here, whole request at once: an invalid UID would otherwise reach the report we encode, after
            # the N-ACTION-RSP said Success (and pydicom would log it, value and all).
            if not (UID(sop_class).is_valid and UID(sop_instance).is_valid):
                raise BadRequest(errors.INVALID_ARGUMENT_VALUE, "a referenced UID is not a valid UID")
            references.append(Reference(sop_class, sop_instance))
    except BadRequest:
        raise
    except Exception as exc:  # pydicom raises anything from struct.error to ValueError on hostile bytes
        raise BadRequest(errors.INVALID_ARGUMENT_VALUE, f"unreadable Action Information ({type(exc).__name__})") \
            from None
    return transaction, references


def event_information(transaction_uid: str, outcome: Outcome, retrieve_ae: str, transfer_syntax: str) -> bytes:
    """The N-EVENT-REPORT's Event Information (PS3.4 J.3.3.1), encoded in ``transfer_syntax``."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    ds.RetrieveAETitle = retrieve_ae
    if outcome.committed:
        ds.ReferencedSOPSequence = [_item(ref) for ref in outcome.committed]
    if outcome.failed:
        failed = []
        for ref, reason in outcome.failed:
            item = _item(ref)
            item.FailureReason = reason
            failed.append(item)
        ds.FailedSOPSequence = failed
    implicit, little, deflated = _syntax(transfer_syntax)
    encoded = encode(ds, implicit, little, deflated)
    assert encoded is not None, "an event report we built does not encode"
    return encoded


def _item(ref: Reference) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ref.sop_class_uid
    item.ReferencedSOPInstanceUID = ref.sop_instance_uid
    return item


# ---- verification ---------------------------------------------------------------------------------------------

def verify_reference(ctx: WorkerContext, ref: Reference) -> int | None:
    """None when we hold ``ref`` intact, else its Failure Reason. Blocking (reads and hashes the blob): run it in a
    thread. One intact copy is enough; a copy marked suspect by `verify` is re-hashed too (it may have been
    repaired), after the others."""
    found = ctx.index.lookup(ref.sop_instance_uid)
    if found is None or found[0] != "instances":  # a study or series UID names no instance
        return errors.NO_SUCH_OBJECT_INSTANCE
    records = ctx.index.instances_under(ref.sop_instance_uid)
    if not records:  # deleted since the lookup
        return errors.NO_SUCH_OBJECT_INSTANCE
    record = records[0][1]
    if record.attrs.get("SOPClassUID") != ref.sop_class_uid:
        return errors.CLASS_INSTANCE_CONFLICT
    checked: set[Copy] = set()
    for _attempt in range(2):  # compaction may have moved the blob to a new copy while we hashed the old one
        blob = ctx.index.blob(record.digest)
        if blob is None:
            return errors.N_PROCESSING_FAILURE
        copies = [copy for copy in sorted(blob.copies, key=lambda c: c.state != COPY_OK) if copy not in checked]
        if not copies:
            break
        for copy in copies:
            if ctx.blobstore.check(record.digest, copy) == "ok":
                return None
            checked.add(copy)
    return errors.N_PROCESSING_FAILURE


class Commitments:
    """One worker's storage commitment work: the bound on pending requests, the hashing threads, the tasks."""

    def __init__(self, ctx: WorkerContext, worker: int = 0) -> None:
        self.ctx = ctx
        self.config: CommitmentConfig = ctx.config.commitment
        self.journal = Journal(self.config.journal_path, worker, ctx.config.storage.fsync)
        self.pending = 0  # requests answered (or being answered) with Success and not yet reported
        self.hashing = asyncio.Semaphore(self.config.verify_concurrency_max)
        self.tasks: set[asyncio.Task[None]] = set()

    def start(self, pending: Pending) -> None:
        """Verify and report ``pending`` (its ``self.pending`` slot already taken)."""
        task = asyncio.get_running_loop().create_task(self._run(pending))
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.pending -= 1
        if not task.cancelled() and task.exception() is not None:
            log.error("storage commitment failed", exc_info=task.exception())

    async def _run(self, pending: Pending) -> None:
        outcome = await self.verify(pending.references)
        metrics = self.ctx.metrics.commitments
        metrics.labels("committed").inc(len(outcome.committed))
        metrics.labels("failed").inc(len(outcome.failed))
        log.info("storage commitment for %s: %d committed, %d failed", pending.calling_ae, len(outcome.committed),
                 len(outcome.failed))
        session = pending.request.session if pending.request is not None else None
        if session is not None:  # (a request taken up at start has no association left to name)
            session.emit("commitment", (MINOR_FAILURE if outcome.committed else SERIOUS_FAILURE) if outcome.failed
                         else SUCCESS, instances=len(outcome.committed), failed=len(outcome.failed) or None)
        log.debug("storage commitment transaction %s: failed %s", pending.transaction_uid,
                  [(ref.sop_instance_uid, hex(reason)) for ref, reason in outcome.failed])
        await self.report(pending, outcome)
        # Only once the report is settled (delivered, dropped or given up): a worker stopped before that (its task
        # cancelled, or the process gone) finds the entry again when it starts.
        if pending.journal_name:
            await asyncio.to_thread(self.journal.remove, pending.journal_name)

    async def verify(self, references: list[Reference]) -> Outcome:
        reasons: list[int | None] = [None] * len(references)
        todo: Iterator[int] = iter(range(len(references)))

        async def lane() -> None:
            for i in todo:  # the lanes share one iterator: at most verify_concurrency_max references at a time
                async with self.hashing:  # ... and per worker over all requests
                    reasons[i] = await asyncio.to_thread(self._verify_safely, references[i])

        await asyncio.gather(*(lane() for _ in range(min(self.config.verify_concurrency_max, len(references)))))
        outcome = Outcome()
        for ref, reason in zip(references, reasons, strict=True):
            if reason is None:
                outcome.committed.append(ref)
            else:
                outcome.failed.append((ref, reason))
        return outcome

    def _verify_safely(self, ref: Reference) -> int | None:
        try:
            return verify_reference(self.ctx, ref)
        except Exception as exc:  # an unreadable segment, an LMDB error: that reference fails, the report still goes
            log.warning("storage commitment: an instance could not be verified: %s", type(exc).__name__)
            return errors.N_PROCESSING_FAILURE

    # ---- the report ----------------------------------------------------------------------------------------------

    async def report(self, pending: Pending, outcome: Outcome) -> None:
        """Deliver the N-EVENT-REPORT: the association of the request first, then new associations."""
        request = pending.request
        transaction_uid = pending.transaction_uid
        if request is not None and request.channel is not None and request.channel.is_open:
            data = event_information(transaction_uid, outcome, self.ctx.config.server.ae_title,
                                     request.transfer_syntax)

            def command(message_id: int) -> bytes:
                return dimse.event_report_request(message_id, STORAGE_COMMITMENT_PUSH,
                                                  STORAGE_COMMITMENT_PUSH_INSTANCE, outcome.event_type)

            try:
                rsp = await request.channel.request(request.context_id, command, _once(data),
                                                    self.config.report_timeout_s)
                # A failure status is the SCU's problem with the report, not a delivery failure: not re-sent.
                log.log(logging.INFO if rsp.status == 0 else logging.WARNING,
                        "storage commitment report to %s on its association: status 0x%04X", pending.calling_ae,
                        rsp.status or 0)
                self.ctx.metrics.commitments.labels("same_association").inc()
                return
            except ChannelClosed:
                log.info("storage commitment: the association of %s ended before the report, opening a new one",
                         pending.calling_ae)
            except TimeoutError:
                log.warning("storage commitment: %s did not answer the report within %ss on its association, "
                            "trying a new one", pending.calling_ae, self.config.report_timeout_s)
        # The peer as configured now: a request taken up after a restart is reported under the current config.
        peer = self.ctx.config.peer_by_ae(pending.calling_ae)
        if peer is None or not self.ctx.config.allows(peer, "storage_commitment") or not peer.allow_receive:
            why = "not under [peers]" if peer is None else "not allowed to receive it"
            log.warning("storage commitment report for %s dropped: its association ended and it is %s",
                        pending.calling_ae, why)
            self.ctx.metrics.commitments.labels("undelivered").inc()
            return
        for attempt in range(1, self.config.report_attempts_max + 1):
            try:
                status = await self.report_on_new_association(peer, transaction_uid, outcome)
                log.log(logging.INFO if status == 0 else logging.WARNING,
                        "storage commitment report to peer %r on a new association: status 0x%04X", peer.name, status)
                self.ctx.metrics.commitments.labels("new_association").inc()
                return
            except (OSError, TimeoutError, AssociationRejected, AssociationAborted, ReportRefused) as exc:
                log.warning("storage commitment report to peer %r, attempt %d of %d: %s", peer.name, attempt,
                            self.config.report_attempts_max, exc or type(exc).__name__)
            if attempt < self.config.report_attempts_max:
                await asyncio.sleep(self.config.report_retry_wait_s)
        log.error("storage commitment report to peer %r not delivered after %d attempts", peer.name,
                  self.config.report_attempts_max)
        self.ctx.metrics.commitments.labels("undelivered").inc()

    async def report_on_new_association(self, peer: PeerConfig, transaction_uid: str, outcome: Outcome) -> int:
        cfg = self.config
        async with asyncio.timeout(cfg.connect_timeout_s):
            assoc = await ClientAssociation.open(
                peer.host, peer.port, peer.ae_title, self.ctx.config.server.ae_title,
                [(STORAGE_COMMITMENT_PUSH, REPORT_TRANSFER_SYNTAXES)],
                roles=((STORAGE_COMMITMENT_PUSH, False, True),),  # we are the SCP, the requester of this association
                ssl=self.ctx.ssl_for(peer))
        try:
            accepted = [(ts, cid) for (abstract, ts), cid in assoc.accepted.items() if abstract == STORAGE_COMMITMENT_PUSH]
            if not accepted:
                raise ReportRefused("the peer accepted no Storage Commitment Push Model context")
            transfer_syntax, context_id = accepted[0]
            data = event_information(transaction_uid, outcome, self.ctx.config.server.ae_title, transfer_syntax)
            command = dimse.event_report_request(assoc.next_message_id(), STORAGE_COMMITMENT_PUSH,
                                                 STORAGE_COMMITMENT_PUSH_INSTANCE, outcome.event_type)
            rsp = await assoc.request(context_id, command, data, cfg.report_timeout_s)
            async with asyncio.timeout(cfg.report_timeout_s):
                await assoc.release()
        except BaseException:
            assoc.abort()
            raise
        return int(rsp.status or 0)


class ReportRefused(Exception):
    pass


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


# ---- the handler ----------------------------------------------------------------------------------------------

_WORKERS: dict[int, Commitments] = {}  # id(WorkerContext) -> its Commitments: one context per worker process


def commitments_for(ctx: WorkerContext, worker: int = 0) -> Commitments:
    found = _WORKERS.get(id(ctx))
    if found is None or found.ctx is not ctx:
        found = _WORKERS[id(ctx)] = Commitments(ctx, worker)
    return found


def resume_commitments(ctx: WorkerContext, worker: int, workers: int) -> int:
    """At worker start (on its event loop): take up the requests a previous run of this worker answered and did
    not report (commitment_journal.py), verify them again and report them on new associations. Returns how many."""
    commitments = commitments_for(ctx, worker)
    try:
        entries = commitments.journal.take_up(workers)
    except OSError as exc:  # the worker serves anyway; requests are refused (0x0110) while the journal is unusable
        log.error("storage commitment journal %s cannot be read: %s", commitments.journal.folder, exc)
        return 0
    for entry in entries:
        commitments.pending += 1
        references = [Reference(sop_class, sop_instance) for sop_class, sop_instance in entry.references]
        commitments.start(Pending(entry.transaction_uid, entry.calling_ae, references, entry.name))
    if entries:
        log.info("storage commitment: %d requests of a previous run taken up, reporting them", len(entries))
    return len(entries)


class CommitmentHandler:
    """One N-ACTION-RQ: its dataset is held (bounded by commitment.request_bytes_max), checked, answered, and the
    verification and report go on in the worker's Commitments after the answer."""

    def __init__(self, ctx: WorkerContext, request: Request) -> None:
        self.ctx = ctx
        self.request = request
        self.data = bytearray()
        self.too_large = False

    def feed(self, data: memoryview) -> None:
        if self.too_large:
            return
        if len(self.data) + len(data) > self.ctx.config.commitment.request_bytes_max:
            self.too_large = True
            self.data = bytearray()
            return
        self.data += data

    async def responses(self) -> AsyncIterator[Response]:
        command = self.request.command
        action = ((dimse.ACTION_TYPE_ID, dimse.us(command.action_type_id)),) if command.action_type_id else ()
        try:
            transaction, references = await self._check()
        except BadRequest as exc:
            log.info("storage commitment request from %s refused: 0x%04X %s", self.request.calling_ae, exc.status,
                     exc)
            yield Response(exc.status, str(exc), extra=action)
            return
        log.debug("storage commitment transaction %s from %s: %d references", transaction, self.request.calling_ae,
                  len(references))
        commitments = commitments_for(self.ctx)
        commitments.pending += 1  # taken before the journal write's await: concurrent requests see it
        entry = JournalEntry(transaction, self.request.calling_ae,
                             [(ref.sop_class_uid, ref.sop_instance_uid) for ref in references])
        try:
            await asyncio.to_thread(commitments.journal.add, entry)
        except OSError as exc:
            commitments.pending -= 1
            log.error("storage commitment journal cannot be written (%s): request from %s refused",
                      type(exc).__name__, self.request.calling_ae)
            yield Response(errors.N_PROCESSING_FAILURE, "cannot record the request", extra=action)
            return
        # Started before the answer is yielded, yet it cannot overtake it: the answer is written as soon as this
        # generator yields, while the task needs its first hash from a thread before it can send anything.
        commitments.start(Pending(transaction, self.request.calling_ae, references, entry.name, self.request))
        yield Response(errors.SUCCESS, extra=action)

    async def _check(self) -> tuple[str, list[Reference]]:
        """The command's checks, then the Action Information parsed in a thread: up to request_bytes_max of
        sequence items is seconds of pydicom work, which must not stall the worker's other associations."""
        command = self.request.command
        cfg = self.ctx.config.commitment
        if command.sop_instance_uid != STORAGE_COMMITMENT_PUSH_INSTANCE:
            raise BadRequest(errors.NO_SUCH_OBJECT_INSTANCE, "not the Storage Commitment Push Model SOP instance")
        if command.action_type_id != REQUEST_STORAGE_COMMITMENT:
            raise BadRequest(errors.NO_SUCH_ACTION, f"Action Type ID {command.action_type_id}")
        if not command.has_dataset:
            raise BadRequest(errors.INVALID_ARGUMENT_VALUE, "no Action Information")
        if self.too_large:
            raise BadRequest(errors.RESOURCE_LIMITATION, "Action Information larger than commitment.request_bytes_max")
        if commitments_for(self.ctx).pending >= cfg.pending_per_worker_max:  # before any parsing work
            raise BadRequest(errors.RESOURCE_LIMITATION, "too many storage commitments pending")
        data, self.data = bytes(self.data), bytearray()
        parsed = await asyncio.to_thread(parse_action, data, self.request.transfer_syntax,
                                         cfg.references_per_request_max)
        if commitments_for(self.ctx).pending >= cfg.pending_per_worker_max:  # others may have started meanwhile
            raise BadRequest(errors.RESOURCE_LIMITATION, "too many storage commitments pending")
        return parsed

    def cancel(self) -> None:
        pass  # PS3.7 has no C-CANCEL for N-ACTION

    def abandon(self) -> None:
        self.data = bytearray()  # a request answered already reports on a new association


register(dimse.N_ACTION_RQ, (STORAGE_COMMITMENT_PUSH,), "storage_commitment", CommitmentHandler)
