"""One asyncio.BufferedProtocol per association, acceptor role (PS3.8 state machine, simplified to the states
an acceptor can be in): awaiting A-ASSOCIATE-RQ (ARTIM running), established, rejected (waiting for the peer to
close), closed.

A-ASSOCIATE-RQ: its fixed fields are checked first (net/negotiation.py read_request_header: AE titles, number
of presentation contexts, the peer's max PDU), then it goes to the Negotiator (pynetdicom's codecs, cached).
P-DATA-TF is framed by net/pdu.py; each DIMSE request goes to the Application's Handler (net/service.py), whose
responses are sent as they come. A protocol error aborts this association only (A-ABORT with the provider
reason); the worker keeps serving the others.

Everything one peer can make us hold is bounded by a [server] key: the receive buffer (max_associate_rq_bytes
before the association exists, max_pdu after), connections per worker, association slots overall, per calling
AE and per source host (net/slots.py), the time to associate (acse_timeout), to send one message
(message_timeout), to stay silent (idle_timeout), and the unsent output (write_buffer_high, write_timeout).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.pdu_primitives import A_ASSOCIATE

from appliance.audit import Session, Sink
from appliance.config import Config, PeerConfig
from appliance.net import dimse, pdu, service
from appliance.net.negotiation import APPLICATION_CONTEXT, Negotiator, read_request_header
from appliance.net.service import AnswerOnce, Application, ChannelClosed, Handler, Request, Response
from appliance.net.slots import SlotTable
from appliance.net.tls import certificate_subject

if TYPE_CHECKING:
    from appliance.metrics import Metrics

log = logging.getLogger(__name__)

MAX_COMMAND_BYTES = 64 * 1024
UNRECOGNIZED_OPERATION = 0x0211  # PS3.7 C.4.2

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
RJ_NO_REASON = (0x01, 0x01, 0x01)
RJ_APP_CONTEXT = (0x01, 0x01, 0x02)
RJ_CALLING_AE = (0x01, 0x01, 0x03)
RJ_CALLED_AE = (0x01, 0x01, 0x07)
RJ_PROTOCOL_VERSION = (0x01, 0x02, 0x02)
RJ_LOCAL_LIMIT = (0x02, 0x03, 0x02)


@dataclass
class Endpoint:
    """What every association of one listening worker shares. Built once per worker by the server."""

    config: Config
    app: Application
    metrics: Metrics
    slots: SlotTable = field(default=cast(SlotTable, None))  # None: a table private to this process
    worker: int = 0  # this worker's row owner id in ``slots``
    negotiator: Negotiator = field(default=cast(Negotiator, None))
    connections: set[AssociationProtocol] = field(default_factory=set)  # open, associated or not
    accepted: int = 0  # associations accepted so far (the benchmark's discard receiver reports it)

    peer_addresses: dict[str, frozenset[str]] = field(default_factory=dict)  # peer name -> its host's addresses
    audit: Sink = field(default_factory=Sink)  # this worker's audit trail (default: dropped)
    # Associations whose end waits for their last stores before its log and audit lines (referenced here so that
    # the tasks are not collected; the worker waits for them before closing the audit sink).
    ending: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.config.server.check_peer_host and not self.peer_addresses:
            self.peer_addresses = resolve_peer_hosts(self.config)
        if self.slots is None:
            self.slots = SlotTable(self.config.server.max_associations)
        if self.negotiator is None:
            self.negotiator = Negotiator(self.config)


def _normal_address(address: str) -> str:
    return address[7:] if address.startswith("::ffff:") else address  # an IPv4 peer on a dual-stack socket


def resolve_peer_hosts(config: Config) -> dict[str, frozenset[str]]:
    """The addresses of every configured peer's host, resolved once when the worker starts (never on the event
    loop per association: a slow DNS server would stall every association). A name that does not resolve keeps
    only itself, so such a peer is refused until the name resolves and the worker restarts; that is logged."""
    out: dict[str, frozenset[str]] = {}
    for peer in config.peers:
        addresses = {peer.host}
        try:
            addresses |= {_normal_address(str(info[4][0])) for info in socket.getaddrinfo(peer.host, None)}
        except OSError as exc:
            log.warning("peer %r: host %r does not resolve (%s): its associations will be refused", peer.name,
                        peer.host, exc)
        out[peer.name] = frozenset(addresses)
    return out


AWAIT_RQ, ESTABLISHED, REJECTED, CLOSED = "await-rq", "established", "rejected", "closed"


# Requests timed from their (identifier's) arrival to their final response, for the metrics' duration histograms.
_TIMED = {dimse.C_FIND_RQ: "C-FIND", dimse.C_MOVE_RQ: "C-MOVE", dimse.C_GET_RQ: "C-GET"}


class AssociationProtocol(asyncio.BufferedProtocol):
    def __init__(self, endpoint: Endpoint) -> None:
        self.ep = endpoint
        cfg = endpoint.config.server
        # Only what an A-ASSOCIATE-RQ may need until the association is accepted (then grown to max_pdu).
        self.framer = pdu.PDUFramer(cfg.max_associate_rq_bytes, max_other=cfg.max_associate_rq_bytes)
        self.state = AWAIT_RQ
        self.transport: asyncio.Transport | None = None
        self.calling_ae = ""
        self.peer_max_pdu = 0
        self.accepted: dict[int, tuple[str, str]] = {}  # context id -> (abstract syntax, transfer syntax)
        self.command_buf = bytearray()
        self.command_context = 0  # the presentation context of the command being reassembled
        self.known_peer: PeerConfig | None = None  # the calling AE's [peers] entry, looked up once
        self.ae_label = service.UNKNOWN_AE  # the calling_ae metric label: the AE title of a configured peer only
        self.receiving: Handler | None = None  # the handler whose dataset is arriving
        self.receiving_request: Request | None = None
        self.running: dict[int, Handler] = {}  # message id -> handler still answering (for C-CANCEL)
        self.tasks: set[asyncio.Task[None]] = set()
        self.release_requested = False
        self.slot = -1  # our row in the slot table while associated
        self.last_activity = time.monotonic()
        self.message_started: float | None = None  # first byte of the DIMSE message in progress
        self.write_paused_at: float | None = None  # output above write_buffer_high since then
        self.timer: asyncio.TimerHandle | None = None
        self.timer_when = 0.0
        self.hard_abort: asyncio.TimerHandle | None = None
        self.peer = ""
        self.host = ""
        # Whether the connection came over the TLS port (net/tls.py), its protocol and cipher suite, and the subject
        # of the client certificate it verified (None without one): logged on association, kept for audit.
        self.tls = False
        self.tls_cipher = ""
        self.tls_subject: str | None = None
        # The PeerChannel side (requests we send to the peer: C-GET sub-operations, N-EVENT-REPORT).
        self.peer_scp: frozenset[int] = frozenset()  # contexts on which the peer may act as SCP
        self.awaiting: dict[int, asyncio.Future[dimse.Command]] = {}  # our message id -> its response
        self.our_message_id = 0
        self.send_lock = asyncio.Lock()  # one message (command + dataset) on the wire at a time
        self.writable: asyncio.Future[None] | None = None  # set while the transport's buffer is above its limit
        self.dropping_context = 0  # a response dataset from the peer is being read and dropped on this context
        self.session: Session | None = None  # while associated: what it did, for the audit trail and log
        self.released = False  # A-RELEASE-RP sent: the association ended normally

    # ---- transport callbacks ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        cfg = self.ep.config.server
        peer = transport.get_extra_info("peername")
        self.host = str(peer[0]) if peer else "?"
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        if len(self.ep.connections) >= cfg.max_connections_per_worker:
            # Not even an A-ASSOCIATE-RJ: that would mean reading the request into a buffer we refuse to give.
            log.warning("%s: %d connections open in this worker, resetting", self.peer, len(self.ep.connections))
            self.ep.metrics.aborts.labels("connections").inc()
            self.state = CLOSED
            transport.abort()  # type: ignore[attr-defined]
            return
        cipher = transport.get_extra_info("cipher")  # (name, protocol, bits) on a TLS transport only
        if cipher:
            self.tls = True
            self.tls_cipher = f"{cipher[1]} {cipher[0]}"
            self.tls_subject = certificate_subject(transport.get_extra_info("peercert"))
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=cfg.write_buffer_high)  # type: ignore[attr-defined]
        self.ep.connections.add(self)
        self._arm_timer(cfg.acse_timeout)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.state in (REJECTED, CLOSED):
            self._drop_input()  # whatever is left can never be framed: never hand out a full (empty) buffer
        return self.framer.get_buffer()

    def _drop_input(self) -> None:
        self.framer.start = self.framer.end = 0

    def buffer_updated(self, nbytes: int) -> None:
        self.framer.advance(nbytes)
        now = self.last_activity = time.monotonic()
        if self.state in (REJECTED, CLOSED):  # PS3.8 Sta13: read and drop until the peer closes or ARTIM expires
            self._drop_input()
            return
        if self.state == ESTABLISHED and self.message_started is None:
            self.message_started = now
            self._schedule(now + self.ep.config.server.message_timeout)
        try:
            for pdu_type, body in self.framer.pdus():
                self._on_pdu(pdu_type, body)
                if self.state not in (AWAIT_RQ, ESTABLISHED):
                    break
        except pdu.PDUTooLarge as exc:
            if self.state == AWAIT_RQ and exc.pdu_type == pdu.A_ASSOCIATE_RQ:
                self._reject(RJ_NO_REASON, f"A-ASSOCIATE-RQ of {exc.length} bytes (server.max_associate_rq_bytes)")
            elif self.state in (AWAIT_RQ, ESTABLISHED):
                self.abort(exc.reason, str(exc))
        except pdu.PDUError as exc:
            # Only while the association can still be aborted: after an A-ASSOCIATE-RJ (write_eof done) or our own
            # A-ABORT, the next PDU header of the same read is no longer ours to judge.
            if self.state in (AWAIT_RQ, ESTABLISHED):
                self.abort(exc.reason, str(exc))
        except dimse.CommandError as exc:
            if self.state in (AWAIT_RQ, ESTABLISHED):
                self.abort(pdu.ABORT_INVALID_PARAMETER, f"bad command set: {exc}")
        if self.state in (REJECTED, CLOSED):
            self._drop_input()
            return
        if (self.message_started is not None and self.receiving is None and not self.command_buf
                and not self.framer.partial):
            self.message_started = None  # the message is complete: its handler is ours to time, not the peer's

    def eof_received(self) -> bool | None:
        return False

    def pause_writing(self) -> None:
        # The peer does not read its responses as fast as it sends requests: stop reading its requests until it
        # does, so the output buffer stays bounded; if it never does, the timer resets the connection.
        self.write_paused_at = time.monotonic()
        if self.writable is None or self.writable.done():
            self.writable = asyncio.get_running_loop().create_future()
        if self.transport is not None and self.state != CLOSED:
            try:
                self.transport.pause_reading()
            except (RuntimeError, AttributeError):  # already closing
                pass
        self._schedule(self.write_paused_at + self.ep.config.server.write_timeout)

    def resume_writing(self) -> None:
        self.write_paused_at = None
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        if self.transport is not None and self.state not in (CLOSED,) and not self.transport.is_closing():
            try:
                self.transport.resume_reading()
            except (RuntimeError, AttributeError):
                pass

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_handlers()
        self.state = CLOSED
        self._end_session()
        for handle in (self.timer, self.hard_abort):
            if handle is not None:
                handle.cancel()
        self.ep.connections.discard(self)
        self._give_slot()

    # ---- timers -----------------------------------------------------------------------------------

    def _arm_timer(self, delay: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        loop = asyncio.get_running_loop()
        self.timer_when = loop.time() + delay
        self.timer = loop.call_at(self.timer_when, self._on_timer)

    def _schedule(self, deadline: float) -> None:
        """Make sure the timer fires by ``deadline`` (time.monotonic()), re-arming only if it is earlier than
        the one already set: the common case (message deadline after the idle check) costs nothing."""
        delay = max(0.0, deadline - time.monotonic())
        if self.timer is None or asyncio.get_running_loop().time() + delay < self.timer_when:
            self._arm_timer(delay)

    def _on_timer(self) -> None:
        self.timer = None
        cfg = self.ep.config.server
        if self.state in (AWAIT_RQ, REJECTED):
            log.info("%s: no A-ASSOCIATE-RQ (or no close after a reject) within %ss (ARTIM), closing", self.peer,
                     cfg.acse_timeout)
            self.ep.metrics.aborts.labels("artim").inc()
            self._close()
            return
        if self.state != ESTABLISHED:
            return
        now = time.monotonic()
        if self.write_paused_at is not None and now - self.write_paused_at >= cfg.write_timeout:
            log.warning("%s (%s): has not read its responses for %ss, resetting", self.peer, self.calling_ae,
                        cfg.write_timeout)
            self.ep.metrics.aborts.labels("write_timeout").inc()
            self._reset()
            return
        if self.message_started is not None and now - self.message_started >= cfg.message_timeout:
            self.abort(pdu.ABORT_NOT_SPECIFIED, f"a message took longer than {cfg.message_timeout}s to arrive",
                       metric="message_timeout")
            return
        idle = now - self.last_activity
        if idle >= cfg.idle_timeout and not self.tasks:
            self.abort(pdu.ABORT_NOT_SPECIFIED, f"idle for {idle:.0f}s", metric="idle")
            return
        deadlines = [self.last_activity + cfg.idle_timeout]
        if self.message_started is not None:
            deadlines.append(self.message_started + cfg.message_timeout)
        if self.write_paused_at is not None:
            deadlines.append(self.write_paused_at + cfg.write_timeout)
        self._arm_timer(max(0.05, min(deadlines) - now))

    # ---- PDUs -------------------------------------------------------------------------------------

    def _on_pdu(self, pdu_type: int, body: memoryview) -> None:
        if self.state == AWAIT_RQ:
            if pdu_type != pdu.A_ASSOCIATE_RQ:
                raise pdu.PDUError(f"PDU type 0x{pdu_type:02x} before A-ASSOCIATE-RQ", pdu.ABORT_UNEXPECTED_PDU)
            self._on_associate_rq(pdu.HEADER.pack(pdu_type, len(body)) + body)
        elif pdu_type == pdu.P_DATA_TF:
            if self.release_requested:
                raise pdu.PDUError("P-DATA-TF after A-RELEASE-RQ", pdu.ABORT_UNEXPECTED_PDU)
            for pdv in pdu.iter_pdvs(body):
                self._on_pdv(pdv)
        elif pdu_type == pdu.A_RELEASE_RQ:
            if self.receiving is not None or self.command_buf:
                raise pdu.PDUError("A-RELEASE-RQ in the middle of a message", pdu.ABORT_UNEXPECTED_PDU)
            self.release_requested = True
            self._maybe_release()
        elif pdu_type == pdu.A_ABORT:
            log.info("%s (%s): peer aborted the association", self.peer, self.calling_ae)
            self.ep.metrics.aborts.labels("peer").inc()
            self._end_handlers()
            self._close()
        else:
            raise pdu.PDUError(f"unexpected PDU type 0x{pdu_type:02x} on an association", pdu.ABORT_UNEXPECTED_PDU)

    def _send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _give_slot(self) -> None:
        if self.slot >= 0:
            self.ep.slots.give(self.slot)
            self.slot = -1
            self.ep.metrics.associations_active.labels(self.ae_label).dec()

    def _close(self) -> None:
        """Close after what is queued has been sent. The slot is free at once; the descriptor is freed when the
        peer has read our last PDU, or reset after write_timeout if it never does (close() alone would wait
        for the output to drain forever)."""
        self.state = CLOSED
        self._give_slot()
        self._end_session()  # over for us now, though the transport may take write_timeout to go
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.close()
        if self.transport.get_write_buffer_size():
            self.hard_abort = asyncio.get_running_loop().call_later(self.ep.config.server.write_timeout, self._reset)

    def _reset(self) -> None:
        self.state = CLOSED
        self._give_slot()
        self._end_session()
        if self.transport is not None:
            self.transport.abort()

    def _end_handlers(self) -> None:
        for future in self.awaiting.values():
            if not future.done():
                future.set_exception(ChannelClosed("association ended"))
        self.awaiting.clear()
        if self.writable is not None and not self.writable.done():
            self.writable.set_exception(ChannelClosed("association ended"))
        handlers = list(self.running.values())  # the one receiving its dataset is among them
        if self.receiving is not None and all(h is not self.receiving for h in handlers):
            handlers.append(self.receiving)
        self.receiving = self.receiving_request = None
        self.running.clear()
        for handler in handlers:
            handler.abandon()  # whatever the state: a store's spooled bytes must go

    def abort(self, reason: int, message: str, metric: str = "protocol") -> None:
        log.warning("%s (%s): aborting association: %s", self.peer, self.calling_ae or "-", message)
        self.ep.metrics.aborts.labels(metric).inc()
        self._end_handlers()
        if self.write_paused_at is not None:
            self._reset()  # it does not read: an A-ABORT would only queue behind what it already ignores
            return
        self._send(pdu.abort_pdu(0x02, reason))
        self._close()

    def _reject(self, rj: tuple[int, int, int], why: str, alert: bool = False) -> None:
        """``alert``: refused for who the peer is (AE titles, host), not for a limit: a security alert too."""
        log.info("%s: association from %r rejected: %s", self.peer, self.calling_ae, why)
        self.ep.audit.rejected(self.calling_ae, self.host, self.tls, why, alert)
        self.ep.metrics.associations_total.labels(self.ae_label, "rejected").inc()
        primitive = A_ASSOCIATE()
        primitive.result, primitive.result_source, primitive.diagnostic = rj
        out = A_ASSOCIATE_RJ()
        out.from_primitive(primitive)
        self._send(out.encode())
        # PS3.8 Sta13: the requestor closes after reading the RJ. Closing first while it is still sending (an
        # oversized request) would reset the connection and could destroy the RJ before the peer reads it, so
        # half-close, drop what still comes, and let ARTIM bound the wait.
        self.state = REJECTED
        if self.transport is not None and self.transport.can_write_eof():
            self.transport.write_eof()
        self._arm_timer(self.ep.config.server.acse_timeout)

    def _on_associate_rq(self, raw: bytes) -> None:
        cfg = self.ep.config
        server = cfg.server
        # Cheap checks on the fixed fields first: a peer we refuse costs no pynetdicom decode.
        head = read_request_header(raw)
        self.calling_ae = head.calling_ae
        # Looked up before any check, so that a rejection of a configured peer is counted under its label.
        self.known_peer = cfg.peer_by_ae(self.calling_ae)
        self.ae_label = service.peer_label(self.known_peer)
        if not (head.protocol_version & 1):
            return self._reject(RJ_PROTOCOL_VERSION, f"protocol version {head.protocol_version}")
        if head.called_ae != server.ae_title:
            return self._reject(RJ_CALLED_AE, f"called AE title {head.called_ae!r} is not ours", alert=True)
        if server.refuse_unknown_calling_ae and self.known_peer is None:
            return self._reject(RJ_CALLING_AE, "calling AE title not in [peers]", alert=True)
        if (server.check_peer_host and self.known_peer is not None
                and _normal_address(self.host) not in self.ep.peer_addresses.get(self.known_peer.name, ())):
            return self._reject(RJ_CALLING_AE, f"calling AE title of peer {self.known_peer.name!r} from a host that is "
                                               "not its configured one (server.check_peer_host)", alert=True)
        if head.presentation_contexts > server.max_presentation_contexts:
            return self._reject(RJ_NO_REASON, f"{head.presentation_contexts} presentation contexts "
                                              f"(server.max_presentation_contexts = {server.max_presentation_contexts})")
        if head.peer_max_pdu and head.peer_max_pdu < server.min_peer_pdu:
            # We may not send PDUs longer than the peer announced, and cannot make useful ones shorter than this.
            return self._reject(RJ_NO_REASON, f"maximum PDU length {head.peer_max_pdu} is below "
                                              f"server.min_peer_pdu ({server.min_peer_pdu})")
        neg = self.ep.negotiator.negotiate(raw)
        if neg.application_context != APPLICATION_CONTEXT:
            return self._reject(RJ_APP_CONTEXT, "unknown application context")
        if neg.peer_max_pdu and neg.peer_max_pdu < server.min_peer_pdu:  # the same field, as pynetdicom read it
            return self._reject(RJ_NO_REASON, f"maximum PDU length {neg.peer_max_pdu} is below server.min_peer_pdu")
        taken = self.ep.slots.take(self.ep.worker, self.calling_ae, self.host, server.max_associations_per_ae,
                                   server.max_associations_per_host)
        if isinstance(taken, str):
            self.ep.metrics.aborts.labels("limit").inc()
            return self._reject(RJ_LOCAL_LIMIT, f"server.{taken} reached")
        self.slot = taken
        self.peer_max_pdu = neg.peer_max_pdu
        self.accepted = neg.contexts  # shared with the cache entry: read-only here
        self.peer_scp = neg.peer_scp
        self.framer.grow(server.max_pdu, max(65536, server.max_pdu))
        self._send(neg.ac_pdu)
        self.state = ESTABLISHED
        self.ep.accepted += 1
        self.ep.metrics.associations_total.labels(self.ae_label, "accepted").inc()
        self.ep.metrics.associations_active.labels(self.ae_label).inc()
        self.session = Session(self.ep.audit, self.calling_ae, self.host, self.tls)
        if self.tls:
            log.info("%s: association with %s accepted over TLS (%s), client certificate %s", self.peer,
                     self.calling_ae, self.tls_cipher, self.tls_subject or "none")
        log.debug("%s: association with %s accepted, %d contexts", self.peer, self.calling_ae, len(self.accepted))
        self._arm_timer(server.idle_timeout)
        return None

    # ---- DIMSE ------------------------------------------------------------------------------------

    def _on_pdv(self, pdv: pdu.PDV) -> None:
        context = self.accepted.get(pdv.context_id)
        if context is None:
            raise pdu.PDUError(f"PDV on presentation context {pdv.context_id}, which was not accepted")
        if pdv.is_command:
            if self.receiving is not None:
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
        if self.dropping_context:
            if pdv.context_id != self.dropping_context:
                raise pdu.PDUError("response dataset fragments on two presentation contexts",
                                   pdu.ABORT_UNEXPECTED_PARAMETER)
            if pdv.is_last:
                self.dropping_context = 0
            return
        handler, request = self.receiving, self.receiving_request
        if handler is None or request is None or pdv.context_id != request.context_id:
            raise pdu.PDUError("dataset fragment without a pending command", pdu.ABORT_UNEXPECTED_PARAMETER)
        handler.feed(pdv.data)
        if pdv.is_last:
            self.receiving = self.receiving_request = None
            self._spawn(self._respond(handler, request))

    def _on_command(self, command: dimse.Command, context_id: int, context: tuple[str, str]) -> None:
        if command.command_field == dimse.C_CANCEL_RQ:
            running = self.running.get(command.message_id_responded_to or 0)
            if running is not None:
                running.cancel()
            return
        if command.is_response:
            self._on_response(command, context_id)
            return
        request = Request(command, context_id, context[0], context[1], self.calling_ae, self.known_peer, self.host,
                          self, self.session)
        handler = self.ep.app.handler(request)
        if handler is None:
            handler = AnswerOnce(Response(UNRECOGNIZED_OPERATION))
        self.running[command.message_id] = handler
        if command.has_dataset:
            self.receiving, self.receiving_request = handler, request
        else:
            self._spawn(self._respond(handler, request))

    def _on_response(self, command: dimse.Command, context_id: int) -> None:
        """A response to one of our requests (PeerChannel.request). One nobody waits for (timed out, or never
        asked) is dropped: answering a response would be a protocol error of ours."""
        future = self.awaiting.pop(command.message_id_responded_to or 0, None)
        if future is None:
            log.info("%s (%s): response 0x%04X to message %s nobody waits for, dropped", self.peer, self.calling_ae,
                     command.command_field, command.message_id_responded_to)
        elif not future.done():
            future.set_result(command)
        if command.has_dataset:
            self.dropping_context = context_id

    # ---- PeerChannel: requests we send on this association ----------------------------------------

    @property
    def is_open(self) -> bool:
        return self.state == ESTABLISHED and self.transport is not None and not self.transport.is_closing()

    def contexts(self, abstract_syntax: str, peer_scp: bool = False) -> dict[str, int]:
        return {ts: cid for cid, (abstract, ts) in self.accepted.items()
                if abstract == abstract_syntax and (not peer_scp or cid in self.peer_scp)}

    async def _wait_writable(self) -> None:
        while self.writable is not None and not self.writable.done():
            await asyncio.shield(self.writable)
        if not self.is_open:
            raise ChannelClosed("association ended")

    async def request(self, context_id: int, command: Callable[[int], bytes],
                      dataset: AsyncIterator[bytes] | None, timeout: float) -> dimse.Command:
        if not self.is_open:
            raise ChannelClosed("association is not open")
        self.our_message_id = self.our_message_id % 0xFFFF + 1
        message_id = self.our_message_id
        future: asyncio.Future[dimse.Command] = asyncio.get_running_loop().create_future()
        self.awaiting[message_id] = future
        try:
            async with self.send_lock:
                await self._wait_writable()
                self._send(b"".join(pdu.p_data_pdus(context_id, command(message_id), True, self.peer_max_pdu)))
                if dataset is not None:
                    await self._send_dataset(context_id, dataset)
            async with asyncio.timeout(timeout):
                return await future
        finally:
            self.awaiting.pop(message_id, None)

    async def _send_dataset(self, context_id: int, dataset: AsyncIterator[bytes]) -> None:
        """Stream ``dataset``: each chunk is sent once the next is known (the last fragment must be marked last),
        waiting for the transport to drain below write_buffer_high in between, so memory stays bounded."""
        held: bytes | None = None
        async for chunk in dataset:
            if not chunk:
                continue
            if held is not None:
                await self._wait_writable()
                self._send(b"".join(pdu.p_data_pdus(context_id, held, False, self.peer_max_pdu, final=False)))
            held = chunk
        await self._wait_writable()
        self._send(b"".join(pdu.p_data_pdus(context_id, held or b"", False, self.peer_max_pdu)))

    async def _respond(self, handler: Handler, request: Request) -> None:
        """Send every response the handler yields: Pending ones only while the peer reads what we send (a C-FIND
        streaming thousands of matches waits for the transport to drain below write_buffer_high, so the output
        stays bounded), then exactly one final response; a handler that ends without one is a bug of ours, and
        the peer still gets its answer (0xC211) instead of waiting for ever."""
        command = request.command
        started = time.perf_counter()
        try:
            async for response in handler.responses():
                if self.state == CLOSED:
                    return
                async with self.send_lock:  # never between the fragments of a request we are sending
                    if response.is_pending:
                        try:
                            await self._wait_writable()
                        except ChannelClosed:
                            return
                    if self.state == CLOSED:
                        return
                    self._send_response(request, response)
                if not response.is_pending:
                    operation = _TIMED.get(command.command_field)
                    if operation is not None:  # a C-STORE costs this lookup only
                        self.ep.metrics.answered(operation, response.status, time.perf_counter() - started)
                    return
            log.error("%s (%s): the handler of a 0x%04X request ended without a final response", self.peer,
                      self.calling_ae, command.command_field)
            if self.state == ESTABLISHED:
                async with self.send_lock:
                    self._send_response(request, Response(0xC211, "no final response (internal error)"))
        finally:
            if self.running.get(command.message_id) is handler:
                del self.running[command.message_id]

    def _send_response(self, request: Request, response: Response) -> None:
        command = request.command
        instance = response.affected_sop_instance_uid
        encoded = dimse.response(command.command_field | dimse.RESPONSE_BIT, command.message_id, response.status,
                                 command.sop_class_uid, command.sop_instance_uid if instance is None else instance,
                                 response.comment, has_dataset=response.dataset is not None, extra=response.extra)
        out = list(pdu.p_data_pdus(request.context_id, encoded, True, self.peer_max_pdu))
        if response.dataset is not None:
            out.extend(pdu.p_data_pdus(request.context_id, response.dataset, False, self.peer_max_pdu))
        self._send(b"".join(out))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: DIMSE handler failed", self.peer, exc_info=task.exception())
            if self.state == ESTABLISHED:
                self.abort(pdu.ABORT_NOT_SPECIFIED, "internal error")
            return
        self._maybe_release()

    def _maybe_release(self) -> None:
        """A-RELEASE-RP goes out only after every pending response has been sent."""
        if self.release_requested and not self.tasks and self.state == ESTABLISHED:
            self._send(pdu.RELEASE_RP_PDU)
            self.released = True
            self._close()

    # ---- the association's end: one info line and its audit lines ---------------------------------

    def _end_session(self) -> None:
        session, self.session = self.session, None
        if session is None:
            return
        how = "released" if self.released else "aborted"
        pending = [t for t in self.tasks if not t.done()]
        if pending:
            # An instance the group commit still holds is counted when its handler ends (bounded by the commit).
            task = asyncio.get_running_loop().create_task(session.end_after(pending, how))
            self.ep.ending.add(task)
            task.add_done_callback(self.ep.ending.discard)
        else:
            session.end(how)
