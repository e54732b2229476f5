"""DICOM over TLS (PS3.15 Annex B, BCP 195): the server's SSLContext, checked when the server starts, and the handshake
in front of each association on the TLS port.

The handshake is run here (``loop.start_tls``) rather than by ``create_server(ssl=...)`` because asyncio and uvloop
report a failed handshake nowhere: an ssl.SSLError is an OSError, which both drop silently outside debug mode. Each
connection to the TLS port starts with a ``TlsHandshake`` protocol; it bounds the handshake in time
(tls.handshake_timeout_s) and in number (tls.handshakes_pending_max per worker), logs and counts every outcome
(the peer's address and OpenSSL's reason, which never contain patient data) and only then hands the connection to
the association protocol. A connection still in its handshake therefore holds no association slot and does not
count against server.max_connections_per_worker.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from appliance.audit import MINOR_FAILURE, NODE_AUTHENTICATION, Sink
from appliance.config import TlsConfig
from appliance.errors import ConfigError

if TYPE_CHECKING:
    from appliance.metrics import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
# Short names for the subject attributes a certificate usually has (RFC 4514); others keep OpenSSL's long name.
_SHORT = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
          "localityName": "L", "stateOrProvinceName": "ST", "emailAddress": "emailAddress"}


class _EncryptedKey(Exception):
    pass


def _no_password() -> bytes:
    # Called by OpenSSL only for an encrypted key. Without this callback it would prompt on the terminal and a
    # service started by systemd would hang there.
    raise _EncryptedKey


def _readable(key: str, path: Path | None) -> Path:
    if path is None:
        raise ConfigError(f"tls.{key}: required when tls.enabled = true")
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except FileNotFoundError:
        raise ConfigError(f"tls.{key}: {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"tls.{key}: {path} is a folder, not a PEM file") from None
    except PermissionError:
        raise ConfigError(f"tls.{key}: {path} cannot be read by the user the appliance runs as") from None
    return path


def _check_key_mode(path: Path, warn: Callable[[str], None]) -> None:
    """Whoever can read the private key can pose as this appliance to every modality. Accessible to every user:
    refused. Accessible to its group: a warning only, since /etc/ssl/private with group ssl-cert (0640) is a common
    and deliberate layout."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o007:
        raise ConfigError(f"tls.private_key: {path} is accessible to every user on this machine (mode {mode:04o}); "
                          f"anyone who can read it can impersonate this appliance: chmod 600 {path}")
    if mode & 0o070:
        warn(f"tls.private_key: {path} is accessible to its group (mode {mode:04o}); fine for a dedicated group "
             f"such as ssl-cert, otherwise chmod 600 {path}")


def non_bcp195_ciphers(context: ssl.SSLContext) -> list[str]:
    """The TLS 1.2 suites ``context`` would negotiate that BCP 195 (RFC 9325) does not recommend: anything but
    an ephemeral ECDH key exchange with an AEAD cipher. TLS 1.3 suites all qualify."""
    return [c["name"] for c in context.get_ciphers()
            if c["protocol"] != "TLSv1.3" and not (c["kea"] == "kx-ecdhe" and c["aead"])]


def server_context(tls: TlsConfig, warn: Callable[[str], None] | None = None) -> ssl.SSLContext:
    """The TLS context of the TLS port, or a ConfigError saying which key is wrong and how. ``warn`` gets what is
    allowed but doubtful (a group-readable key, cipher suites outside BCP 195)."""
    say = warn or (lambda _message: None)
    certificate = _readable("certificate", tls.certificate)
    private_key = _readable("private_key", tls.private_key)
    _check_key_mode(private_key, say)
    # Not ssl.create_default_context(CLIENT_AUTH): it loads the system's public CAs, so any client certificate a
    # public CA ever signed would be trusted. Only tls.ca_certificates is.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[tls.min_version]
    # Compression leaks plaintext lengths (CRIME); renegotiation is an old DoS and downgrade surface. The server's
    # cipher order (the BCP 195 list's) wins over the client's.
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        context.set_ciphers(tls.ciphers)
    except ssl.SSLError:
        raise ConfigError(f"tls.ciphers: OpenSSL selects no cipher suite from {tls.ciphers!r}") from None
    try:
        context.load_cert_chain(certificate, private_key, password=_no_password)
    except _EncryptedKey:
        raise ConfigError(f"tls.private_key: {private_key} is encrypted; the appliance starts unattended and cannot "
                          f"ask for a passphrase (decrypt it: openssl pkey -in KEY -out {private_key})") from None
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise ConfigError(f"tls.private_key: {private_key} is not the key of tls.certificate {certificate}") from None
        raise ConfigError(f"tls.certificate / tls.private_key: {certificate} and {private_key} are not a PEM "
                          f"certificate and its private key ({exc.reason or exc})") from None
    if tls.ca_certificates is not None:
        ca = _readable("ca_certificates", tls.ca_certificates)
        try:
            context.load_verify_locations(cafile=str(ca))
        except ssl.SSLError as exc:
            raise ConfigError(f"tls.ca_certificates: {ca} holds no PEM certificate ({exc.reason or exc})") from None
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    weak = non_bcp195_ciphers(context)
    if weak:
        say(f"tls.ciphers allows TLS 1.2 suites outside BCP 195 (RFC 9325): {', '.join(weak)}")
    return context


def client_context(tls: TlsConfig) -> ssl.SSLContext:
    """The TLS context of the associations we open to [peers] with ``tls = true``: the same versions and cipher
    policy as the TLS port; the peer's certificate verified against tls.ca_certificates only (not the system's
    public CAs) and against its host name or address; our client certificate presented."""
    ca = _readable("ca_certificates", tls.ca_certificates)
    certificate = _readable("client_certificate", tls.client_certificate or tls.certificate)
    private_key = _readable("client_private_key", tls.client_private_key or tls.private_key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED by default
    context.minimum_version = _VERSIONS[tls.min_version]
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    try:
        context.set_ciphers(tls.ciphers)
        context.load_verify_locations(cafile=str(ca))
        context.load_cert_chain(certificate, private_key, password=_no_password)
    except _EncryptedKey:
        raise ConfigError(f"tls: {private_key} is encrypted; the appliance cannot ask for a passphrase") from None
    except ssl.SSLError as exc:
        raise ConfigError(f"tls: the client certificate {certificate}, its key {private_key} or the CAs {ca} cannot "
                          f"be used ({exc.reason or exc})") from None
    return context


def certificate_subject(peercert: Any) -> str | None:
    """A verified client certificate's subject as ``CN=...,O=...`` (None without one): for the association log and
    later for audit. ``peercert`` is ssl.SSLObject.getpeercert()'s dict (empty when nothing was verified)."""
    if not peercert:
        return None
    parts = [f"{_SHORT.get(name, name)}={value}" for rdn in peercert.get("subject", ()) for name, value in rdn]
    return ",".join(parts) or None


def _reason(exc: BaseException) -> str:
    """What OpenSSL says went wrong (a reason code, a verification message), never data from the connection."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"client certificate not accepted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    return type(exc).__name__


class _Early(asyncio.Protocol):
    """Holds what arrives between the end of the handshake and the association taking the connection (asyncio's
    own loop delivers the records that came with the client's last handshake flight at once; uvloop a callback
    later), up to ``limit`` bytes: before it is associated a peer has nothing to send but an A-ASSOCIATE-RQ."""

    def __init__(self, limit: int) -> None:
        self.data = bytearray()
        self.limit = limit
        self.overflow = self.lost = False

    def data_received(self, data: bytes) -> None:
        if len(self.data) + len(data) > self.limit:
            self.overflow = True
            return
        self.data += data

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


def _feed(protocol: asyncio.BufferedProtocol, data: bytes) -> None:
    view = memoryview(data)
    while view:
        buffer = memoryview(protocol.get_buffer(len(view)))
        n = min(len(buffer), len(view))
        if not n:
            return  # the protocol takes no more (it has given up on the connection)
        buffer[:n] = view[:n]
        protocol.buffer_updated(n)
        view = view[n:]


def run_now(coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
    """Run ``coro`` up to its first suspension now, in the caller, and on from there as the futures it waits for
    are done; its outcome is the returned future's, and cancelling that future cancels the one ``coro`` waits for.
    A Task would only start at the loop's next turn (Python 3.12's eager tasks do what this does): too late for
    start_tls, which must own the transport before the loop reads the client's first bytes, and uvloop starts
    reading right after connection_made returns (a pause_reading there is ignored)."""
    out: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    waiting: list[asyncio.Future[Any]] = []

    def step(_done: object = None) -> None:
        waiting.clear()
        try:
            yielded = coro.send(None)
        except StopIteration as stop:
            if not out.done():
                out.set_result(stop.value)
            return
        except BaseException as exc:  # noqa: BLE001 - the coroutine's outcome, whatever it is, goes to ``out``
            if not out.done():
                out.set_exception(exc)
            return
        yielded._asyncio_future_blocking = False  # what asyncio.Task does with the future a coroutine yields
        waiting.append(yielded)
        yielded.add_done_callback(step)

    def on_out_done(_out: asyncio.Future[T]) -> None:
        if out.cancelled():
            for future in waiting:
                future.cancel()  # the coroutine resumes with CancelledError and cleans up (start_tls closes)

    out.add_done_callback(on_out_done)
    step()
    return out


class TlsGate:
    """One worker's TLS port: the context, the handshakes in progress, and what to hand a connection to once its
    handshake is done (``make_protocol``: the same association protocol as the plain port's)."""

    def __init__(self, tls: TlsConfig, context: ssl.SSLContext, make_protocol: Callable[[], asyncio.BufferedProtocol],
                 metrics: Metrics, early_bytes_max: int, audit: Sink | None = None) -> None:
        self.tls = tls
        self.audit = audit if audit is not None else Sink()  # TLS failures are Security Alerts
        self.context = context
        self.make_protocol = make_protocol
        self.metrics = metrics
        self.early_bytes_max = early_bytes_max
        self.pending: set[TlsHandshake] = set()

    def protocol(self) -> TlsHandshake:
        return TlsHandshake(self)

    def close(self) -> None:
        """Stop the handshakes in progress (the worker is stopping); their connections are reset."""
        for handshake in list(self.pending):
            handshake.stop()


class TlsHandshake(asyncio.Protocol):
    """The first protocol of a connection to the TLS port: hands the transport to start_tls at once, then the
    TLS transport to the association protocol."""

    def __init__(self, gate: TlsGate) -> None:
        self.gate = gate
        self.peer = "?"
        self.transport: Any = None
        self.early = _Early(gate.early_bytes_max)
        self.handshake: asyncio.Future[Any] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timed_out = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        gate, tls = self.gate, self.gate.tls
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        if len(gate.pending) >= tls.handshakes_pending_max:
            log.warning("%s: %d TLS handshakes in progress in this worker (tls.handshakes_pending_max), resetting",
                        self.peer, len(gate.pending))
            gate.metrics.tls_handshakes.labels("limit").inc()
            transport.abort()  # type: ignore[attr-defined]
            return
        loop = asyncio.get_running_loop()
        gate.pending.add(self)
        # Our own deadline; start_tls's (later, as a backstop) would surface as an ordinary connection error.
        self.timer = loop.call_later(tls.handshake_timeout_s, self._on_timeout)
        self.handshake = run_now(loop.start_tls(transport, self.early, gate.context, server_side=True,  # type: ignore[arg-type]
                                                ssl_handshake_timeout=tls.handshake_timeout_s + 5.0))
        self.handshake.add_done_callback(self._on_handshake)

    def data_received(self, data: bytes) -> None:
        pass  # never called: start_tls owns the transport from connection_made on

    def _on_timeout(self) -> None:
        self.timed_out = True
        self.stop()

    def stop(self) -> None:
        if self.handshake is not None:
            self.handshake.cancel()

    def _on_handshake(self, handshake: asyncio.Future[Any]) -> None:
        gate = self.gate
        gate.pending.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        if handshake.cancelled():
            if self.timed_out:
                self._failed(self.transport, "timeout", f"not done within {gate.tls.handshake_timeout_s}s")
            else:
                self.transport.abort()  # the worker is stopping
            return
        exc = handshake.exception()
        if exc is not None:  # SSLError, a reset, anything: the connection goes, the worker stays
            self._failed(self.transport, "failed", _reason(exc))
            return
        tls_transport = handshake.result()
        if tls_transport is None or self.early.lost or self.early.overflow:
            self._failed(tls_transport or self.transport, "failed", "closed before associating" if self.early.lost
                         else "more than an A-ASSOCIATE-RQ sent before associating")
            return
        gate.metrics.tls_handshakes.labels("ok").inc()
        protocol = gate.make_protocol()
        tls_transport.set_protocol(protocol)
        protocol.connection_made(tls_transport)
        if self.early.data:
            _feed(protocol, bytes(self.early.data))

    def _failed(self, transport: Any, result: str, reason: str) -> None:
        log.info("%s: TLS handshake %s: %s", self.peer, "timed out" if result == "timeout" else "failed", reason)
        self.gate.metrics.tls_handshakes.labels(result).inc()
        if result != "timeout":  # a port scan or a slow client is not an authentication failure
            self.gate.audit.emit("security_alert", MINOR_FAILURE, alert_type=NODE_AUTHENTICATION, tls=True,
                                 peer_address=self.peer.rpartition(":")[0] or None, reason=f"TLS handshake: {reason}")
        transport.abort()
