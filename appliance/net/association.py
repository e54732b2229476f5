"""One asyncio.BufferedProtocol per association, acceptor role (PS3.8 state machine, simplified to the states
an acceptor can be in): awaiting A-ASSOCIATE-RQ (ARTIM running), established, released/aborted.

A-ASSOCIATE-RQ goes to net/negotiation.py (pynetdicom's codecs and negotiation, cached); P-DATA-TF is framed
by net/pdu.py and its PDVs go straight to the DIMSE service (C-ECHO, C-STORE). A protocol error aborts this
association only (A-ABORT with the provider reason); the worker keeps serving the others.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.pdu_primitives import A_ASSOCIATE

from appliance import errors
from appliance.config import Config, PeerConfig
from appliance.net import dimse, pdu
from appliance.net.negotiation import APPLICATION_CONTEXT, Negotiator
from appliance.services.store import StoreOperation, StoreResult

if TYPE_CHECKING:
    from multiprocessing.sharedctypes import Synchronized

    from appliance.metrics import Metrics
    from appliance.store.commit import GroupCommitter
    from appliance.store.online import BlobStore
    from appliance.store.spool import SpoolBudget
    from appliance.store.volumes import VolumeSet

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
MAX_COMMAND_BYTES = 64 * 1024

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
RJ_NO_REASON = (0x01, 0x01, 0x01)
RJ_APP_CONTEXT = (0x01, 0x01, 0x02)
RJ_CALLING_AE = (0x01, 0x01, 0x03)
RJ_CALLED_AE = (0x01, 0x01, 0x07)
RJ_PROTOCOL_VERSION = (0x01, 0x02, 0x02)
RJ_LOCAL_LIMIT = (0x02, 0x03, 0x02)


@dataclass
class WorkerContext:
    """What every association of one worker process shares. Built once by the server."""

    config: Config
    volumes: VolumeSet
    committer: GroupCommitter
    metrics: Metrics
    slots: Synchronized[int] | None = None  # associations open over all workers
    accepted_sop_classes: frozenset[str] = frozenset()
    negotiator: Negotiator = field(default=cast(Negotiator, None))
    associations: set[AssociationProtocol] = field(default_factory=set)
    blobstore: BlobStore = field(default=cast("BlobStore", None))
    spool_budget: SpoolBudget = field(default=cast("SpoolBudget", None))

    @classmethod
    def build(cls, config: Config, **kwargs: Any) -> WorkerContext:
        return cls(config=config, accepted_sop_classes=frozenset(config.dicom.sop_classes),
                   negotiator=Negotiator(config), **kwargs)

    def take_slot(self) -> bool:
        if self.slots is None:
            return len(self.associations) <= self.config.server.max_associations
        with self.slots.get_lock():
            if self.slots.value >= self.config.server.max_associations:
                return False
            self.slots.value += 1
            return True

    def give_slot(self) -> None:
        if self.slots is not None:
            with self.slots.get_lock():
                self.slots.value -= 1


AWAIT_RQ, ESTABLISHED, CLOSED = "await-rq", "established", "closed"


class AssociationProtocol(asyncio.BufferedProtocol):
    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        cfg = ctx.config.server
        self.framer = pdu.PDUFramer(cfg.max_pdu, max_other=max(65536, cfg.max_pdu))
        self.state = AWAIT_RQ
        self.transport: asyncio.Transport | None = None
        self.calling_ae = ""
        self.peer_max_pdu = 0
        self.contexts: dict[int, tuple[str, str]] = {}  # context id -> (abstract syntax, transfer syntax)
        self.command_buf = bytearray()
        self.command_context = 0  # the presentation context of the command being reassembled
        self.known_peer: PeerConfig | None = None  # the calling AE's [peers] entry, looked up once
        self.operation: StoreOperation | None = None
        self.operation_context = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.release_requested = False
        self.has_slot = False
        self.last_activity = time.monotonic()
        self.timer: asyncio.TimerHandle | None = None
        self.peer = ""

    # ---- transport callbacks ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.ctx.associations.add(self)
        self._arm_timer(self.ctx.config.server.acse_timeout)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.framer.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.framer.advance(nbytes)
        self.last_activity = time.monotonic()
        try:
            for pdu_type, body in self.framer.pdus():
                if self.state == CLOSED:
                    return
                self._on_pdu(pdu_type, body)
        except pdu.PDUError as exc:
            self.abort(exc.reason, str(exc))
        except dimse.CommandError as exc:
            self.abort(pdu.ABORT_INVALID_PARAMETER, f"bad command set: {exc}")

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.operation is not None:
            self.operation.abandon()  # whatever the state: its tmp file must go
        self.operation = None
        self.state = CLOSED
        if self.timer is not None:
            self.timer.cancel()
        self.ctx.associations.discard(self)
        if self.has_slot:
            self.has_slot = False
            self.ctx.give_slot()
            self.ctx.metrics.associations_active.labels(self.calling_ae).dec()

    # ---- timers -----------------------------------------------------------------------------------

    def _arm_timer(self, delay: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        if self.state == AWAIT_RQ:
            log.info("%s: no A-ASSOCIATE-RQ within %ss (ARTIM), closing", self.peer, self.ctx.config.server.acse_timeout)
            self.ctx.metrics.aborts.labels("artim").inc()
            self._close()
            return
        if self.state != ESTABLISHED:
            return
        idle = time.monotonic() - self.last_activity
        limit = self.ctx.config.server.idle_timeout
        if idle >= limit and not self.tasks:
            self.abort(pdu.ABORT_NOT_SPECIFIED, f"idle for {idle:.0f}s", metric="idle")
        else:
            self._arm_timer(max(0.05, limit - idle))

    # ---- PDUs -------------------------------------------------------------------------------------

    def _on_pdu(self, pdu_type: int, body: memoryview) -> None:
        if self.state == AWAIT_RQ:
            if pdu_type != pdu.A_ASSOCIATE_RQ:
                raise pdu.PDUError(f"PDU type 0x{pdu_type:02x} before A-ASSOCIATE-RQ", pdu.ABORT_UNEXPECTED_PDU)
            self._on_associate_rq(pdu.HEADER.pack(pdu_type, len(body)) + body)
        elif pdu_type == pdu.P_DATA_TF:
            for pdv in pdu.iter_pdvs(body):
                self._on_pdv(pdv)
        elif pdu_type == pdu.A_RELEASE_RQ:
            if self.operation is not None:
                raise pdu.PDUError("A-RELEASE-RQ in the middle of a dataset", pdu.ABORT_UNEXPECTED_PDU)
            self.release_requested = True
            self._maybe_release()
        elif pdu_type == pdu.A_ABORT:
            log.info("%s (%s): peer aborted the association", self.peer, self.calling_ae)
            self.ctx.metrics.aborts.labels("peer").inc()
            if self.operation is not None:
                self.operation.abandon()
                self.operation = None
            self._close()
        else:
            raise pdu.PDUError(f"unexpected PDU type 0x{pdu_type:02x} on an association", pdu.ABORT_UNEXPECTED_PDU)

    def _send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _close(self) -> None:
        self.state = CLOSED
        if self.transport is not None:
            self.transport.close()

    def abort(self, reason: int, message: str, metric: str = "protocol") -> None:
        log.warning("%s (%s): aborting association: %s", self.peer, self.calling_ae or "-", message)
        self.ctx.metrics.aborts.labels(metric).inc()
        if self.operation is not None:
            self.operation.abandon()
            self.operation = None
        self._send(pdu.abort_pdu(0x02, reason))
        self._close()

    def _reject(self, rj: tuple[int, int, int], why: str) -> None:
        log.info("%s: association from %r rejected: %s", self.peer, self.calling_ae, why)
        self.ctx.metrics.associations_total.labels(self.calling_ae, "rejected").inc()
        primitive = A_ASSOCIATE()
        primitive.result, primitive.result_source, primitive.diagnostic = rj
        out = A_ASSOCIATE_RJ()
        out.from_primitive(primitive)
        self._send(out.encode())
        self._close()

    def _on_associate_rq(self, raw: bytes) -> None:
        neg = self.ctx.negotiator.negotiate(raw)
        cfg = self.ctx.config
        self.calling_ae = neg.calling_ae
        if not (neg.protocol_version & 1):
            return self._reject(RJ_PROTOCOL_VERSION, f"protocol version {neg.protocol_version}")
        if neg.application_context != APPLICATION_CONTEXT:
            return self._reject(RJ_APP_CONTEXT, "unknown application context")
        if neg.called_ae != cfg.server.ae_title:
            return self._reject(RJ_CALLED_AE, f"called AE title {neg.called_ae!r} is not ours")
        self.known_peer = cfg.peer_by_ae(self.calling_ae)
        if cfg.server.refuse_unknown_calling_ae and self.known_peer is None:
            return self._reject(RJ_CALLING_AE, "calling AE title not in [peers]")
        if not self.ctx.take_slot():
            return self._reject(RJ_LOCAL_LIMIT, f"{cfg.server.max_associations} associations already open")
        self.has_slot = True
        self.peer_max_pdu = neg.peer_max_pdu
        self.contexts = neg.contexts  # shared with the cache entry: read-only here
        self._send(neg.ac_pdu)
        self.state = ESTABLISHED
        self.ctx.metrics.associations_total.labels(self.calling_ae, "accepted").inc()
        self.ctx.metrics.associations_active.labels(self.calling_ae).inc()
        log.debug("%s: association with %s accepted, %d contexts", self.peer, self.calling_ae, len(self.contexts))
        self._arm_timer(cfg.server.idle_timeout)

    # ---- DIMSE ------------------------------------------------------------------------------------

    def _on_pdv(self, pdv: pdu.PDV) -> None:
        context = self.contexts.get(pdv.context_id)
        if context is None:
            raise pdu.PDUError(f"PDV on presentation context {pdv.context_id}, which was not accepted")
        if pdv.is_command:
            if self.operation is not None:
                raise pdu.PDUError("command fragment in the middle of a dataset", pdu.ABORT_UNEXPECTED_PARAMETER)
            if len(self.command_buf) + len(pdv.data) > MAX_COMMAND_BYTES:
                raise pdu.PDUError("command set larger than 64 KiB")
            if self.command_buf and pdv.context_id != self.command_context:
                raise pdu.PDUError("command fragments on two presentation contexts", pdu.ABORT_UNEXPECTED_PARAMETER)
            self.command_buf += pdv.data
            self.command_context = pdv.context_id
            if pdv.is_last:
                command = dimse.decode_command(bytes(self.command_buf))
                self.command_buf.clear()
                self._on_command(command, pdv.context_id, context)
            return
        op = self.operation
        if op is None or pdv.context_id != self.operation_context:
            raise pdu.PDUError("dataset fragment without a pending command", pdu.ABORT_UNEXPECTED_PARAMETER)
        op.feed(pdv.data)
        if pdv.is_last:
            self.operation = None
            self._spawn(self._respond_store(op, pdv.context_id))

    def _on_command(self, command: dimse.Command, context_id: int, context: tuple[str, str]) -> None:
        field_ = command.command_field
        if field_ == dimse.C_ECHO_RQ:
            peer = self.known_peer
            status = errors.NOT_AUTHORIZED if peer is not None and not peer.allow_echo else errors.SUCCESS
            self._send_response(context_id, dimse.C_ECHO_RSP, command.message_id, status, VERIFICATION)
        elif field_ == dimse.C_STORE_RQ:
            op = StoreOperation(self.ctx, command, context[0], context[1], self.calling_ae, self.known_peer)
            if command.has_dataset:
                self.operation = op
                self.operation_context = context_id
            else:
                op.result = op.result or StoreResult(errors.CANNOT_UNDERSTAND, "C-STORE without a dataset")
                self._spawn(self._respond_store(op, context_id))
        elif field_ == dimse.C_CANCEL_RQ:
            pass  # nothing of ours is cancellable yet
        else:
            # PS3.7 C.4.2: Unrecognized Operation. Only reachable on contexts we accepted (Verification/Storage).
            self._send_response(context_id, field_ | 0x8000, command.message_id, 0x0211,
                                command.affected_sop_class_uid)

    def _send_response(self, context_id: int, field_: int, message_id: int, status: int, sop_class: str = "",
                       sop_instance: str = "", comment: str = "") -> None:
        command = dimse.response(field_, message_id, status, sop_class, sop_instance, comment)
        self._send(b"".join(pdu.p_data_pdus(context_id, command, True, self.peer_max_pdu)))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: DIMSE handler failed", self.peer, exc_info=task.exception())
            self.abort(pdu.ABORT_NOT_SPECIFIED, "internal error")
            return
        self._maybe_release()

    async def _respond_store(self, op: StoreOperation, context_id: int) -> None:
        result = await op.finish()
        cmd = op.command
        self._send_response(context_id, dimse.C_STORE_RSP, cmd.message_id,
                            result.status, cmd.affected_sop_class_uid, cmd.affected_sop_instance_uid,
                            result.comment)

    def _maybe_release(self) -> None:
        """A-RELEASE-RP goes out only after every pending response has been sent."""
        if self.release_requested and not self.tasks and self.state == ESTABLISHED:
            self._send(pdu.RELEASE_RP_PDU)
            self.state = CLOSED
            if self.transport is not None:
                self.transport.close()
