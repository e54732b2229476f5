"""The [tls] section and net/tls.py: validation messages that name the key, the server context (BCP 195 only,
client certificates verified against our CA only), the startup file checks, and the handshake gate in process on
asyncio's loop and on uvloop (a TLS client, a silent client, one over the pending bound)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop
from prometheus_client import CollectorRegistry

from appliance.config import TlsConfig, load_config
from appliance.errors import ConfigError
from appliance.metrics import Metrics
from appliance.net.tls import TlsGate, certificate_subject, non_bcp195_ciphers, server_context
from tests.tls_pki import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_config(pki: Pki, **changes: Any) -> TlsConfig:
    values: dict[str, Any] = {"enabled": True, "port": 0, "certificate": pki.server_cert,
                              "private_key": pki.server_key, "ca_certificates": pki.ca, **changes}
    return TlsConfig(**values)


def load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Any:
    path = tmp_path / "appliance.toml"
    path.write_text(text)
    return load_config(path, environ=environ or {})


# ---- configuration ------------------------------------------------------------------------------------


def test_tls_is_off_by_default_and_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    assert load(tmp_path, "").tls == TlsConfig()
    cfg = load(tmp_path, '[tls]\nenabled = true\ncertificate = "tls/s.crt"\nprivate_key = "/etc/k.key"\n'
                         'ca_certificates = "ca.crt"\n')
    assert cfg.tls.certificate == tmp_path / "tls/s.crt" and cfg.tls.private_key == Path("/etc/k.key")
    assert cfg.tls.ca_certificates == tmp_path / "ca.crt" and cfg.tls.port == 2762
    assert load(tmp_path, "", {"APPLIANCE_TLS_HANDSHAKE_TIMEOUT_S": "3"}).tls.handshake_timeout_s == 3.0


@pytest.mark.parametrize("text,message", [
    ("enabled = true\nprivate_key = 'k'\nca_certificates = 'c'", "tls.certificate: required"),
    ("enabled = true\ncertificate = 'c'\nca_certificates = 'c'", "tls.private_key: required"),
    ("enabled = true\ncertificate = 'c'\nprivate_key = 'k'", "tls.ca_certificates: required with"),
    ("min_version = '1.1'", "tls.min_version"),
    ("min_version = '1.0'", "BCP 195 forbids"),
    ("port = 70000", "tls.port"),
    ("enabled = true\nport = 11112\ncertificate = 'c'\nprivate_key = 'k'\nca_certificates = 'c'", "server.port too"),
    ("ciphers = ''", "tls.ciphers"),
    ("handshake_timeout_s = 0", "tls.handshake_timeout_s"),
    ("handshakes_pending_max = 0", "tls.handshakes_pending_max"),
    ("verify = true", "tls.verify: unknown key"),
])
def test_validation_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, "[tls]\n" + text + "\n")


def test_no_client_certificate_needs_no_ca(tmp_path: Path) -> None:
    cfg = load(tmp_path, "[tls]\nenabled = true\ncertificate = 'c'\nprivate_key = 'k'\n"
                         "require_client_certificate = false\n")
    assert cfg.tls.ca_certificates is None


# ---- the server context -------------------------------------------------------------------------------


def test_default_context_is_bcp195(pki: Pki) -> None:
    context = server_context(tls_config(pki))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.options & ssl.OP_NO_COMPRESSION and context.options & ssl.OP_NO_RENEGOTIATION
    assert non_bcp195_ciphers(context) == []
    tls12 = [c for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12 and all(c["kea"] == "kx-ecdhe" and c["aead"] for c in tls12)
    assert not any("CBC" in c["description"] or "SHA1" in c["description"] for c in tls12)
    # Only our CA is trusted for client certificates, not the system's public ones.
    assert [ca["subject"] for ca in context.get_ca_certs()] == [((("organizationName", "Test"),),
                                                                  (("commonName", "ca"),))]


def test_verify_modes_and_min_version(pki: Pki) -> None:
    assert server_context(tls_config(pki, require_client_certificate=False)).verify_mode == ssl.CERT_OPTIONAL
    assert server_context(tls_config(pki, ca_certificates=None,
                                     require_client_certificate=False)).verify_mode == ssl.CERT_NONE
    assert server_context(tls_config(pki, min_version="1.3")).minimum_version == ssl.TLSVersion.TLSv1_3


def copy_key(pki: Pki, tmp_path: Path, mode: int, source: Path | None = None) -> Path:
    key = tmp_path / "key.pem"
    key.write_bytes((source or pki.server_key).read_bytes())
    key.chmod(mode)
    return key


def test_private_key_permissions(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"accessible to every user .*mode 0644.*chmod 600"):
        server_context(tls_config(pki, private_key=copy_key(pki, tmp_path, 0o644)))
    warnings: list[str] = []
    server_context(tls_config(pki, private_key=copy_key(pki, tmp_path, 0o640)), warn=warnings.append)
    assert len(warnings) == 1 and "accessible to its group (mode 0640)" in warnings[0]
    warnings.clear()
    server_context(tls_config(pki, private_key=copy_key(pki, tmp_path, 0o600)), warn=warnings.append)
    assert warnings == []


@pytest.mark.parametrize("case,message", [
    ("missing certificate", "tls.certificate: .* does not exist"),
    ("key is a folder", "tls.private_key: .* is a folder"),
    ("mismatched key", "is not the key of tls.certificate"),
    ("not PEM", "are not a PEM certificate and its private key"),
    ("empty CA file", "tls.ca_certificates: .* holds no PEM certificate"),
    ("no cipher", "OpenSSL selects no cipher suite"),
])
def test_bad_files_are_refused_with_a_clear_message(pki: Pki, tmp_path: Path, case: str, message: str) -> None:
    changes: dict[str, Any] = {
        "missing certificate": {"certificate": tmp_path / "nope.crt"},
        "key is a folder": {"private_key": tmp_path},
        "mismatched key": {"private_key": copy_key(pki, tmp_path, 0o600, pki.client_key)},
        "not PEM": {"certificate": pki.ca.with_suffix(".srl")},
        "empty CA file": {"ca_certificates": tmp_path / "empty.pem"},
        "no cipher": {"ciphers": "NO-SUCH-CIPHER"},
    }[case]
    (tmp_path / "empty.pem").write_text("")
    with pytest.raises(ConfigError, match=message):
        server_context(tls_config(pki, **changes))


def test_encrypted_key_is_refused_without_a_prompt(pki: Pki, tmp_path: Path) -> None:
    import subprocess

    key = tmp_path / "encrypted.key"
    subprocess.run(["openssl", "pkey", "-in", str(pki.server_key), "-out", str(key), "-aes256", "-passout",
                    "pass:secret"], check=True, capture_output=True, timeout=30)
    key.chmod(0o600)
    with pytest.raises(ConfigError, match="is encrypted"):
        server_context(tls_config(pki, private_key=key))


def test_ciphers_outside_bcp195_are_warned_about(pki: Pki) -> None:
    warnings: list[str] = []
    server_context(tls_config(pki, ciphers="ECDHE-RSA-AES128-GCM-SHA256:AES128-SHA:ECDHE-ECDSA-AES128-SHA"),
                   warn=warnings.append)
    assert len(warnings) == 1 and "AES128-SHA" in warnings[0] and "ECDHE-ECDSA-AES128-SHA" in warnings[0]


def test_certificate_subject() -> None:
    assert certificate_subject({}) is None and certificate_subject(None) is None
    cert = {"subject": ((("countryName", "CH"),), (("organizationName", "Hospital"),), (("commonName", "CT01"),),
                        (("serialNumber", "7"),))}
    assert certificate_subject(cert) == "C=CH,O=Hospital,CN=CT01,serialNumber=7"


# ---- the handshake gate, in process ---------------------------------------------------------------------


class Echo(asyncio.BufferedProtocol):
    """Stands in for the association protocol: echoes what it reads, records what the transport says."""

    made: list[Any] = []

    def __init__(self) -> None:
        self.buffer = bytearray(4096)
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        Echo.made.append(transport.get_extra_info("peercert"))

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buffer)

    def buffer_updated(self, nbytes: int) -> None:
        self.transport.write(bytes(self.buffer[:nbytes]))


def run_on(loop_name: str, main: Callable[[], Any]) -> Any:
    if loop_name == "uvloop":
        return uvloop.run(main())  # type: ignore[no-untyped-call]
    return asyncio.run(main())


def value(metrics: Metrics, result: str) -> float:
    return float(metrics.tls_handshakes.labels(result)._value.get())


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_gate_hands_over_after_the_handshake_and_drops_the_rest(pki: Pki, loop_name: str) -> None:
    metrics = Metrics(CollectorRegistry())
    Echo.made.clear()

    async def main() -> None:
        gate = TlsGate(tls_config(pki, handshake_timeout_s=1.0, handshakes_pending_max=1), server_context(
            tls_config(pki)), Echo, metrics, early_bytes_max=65536)
        server = await asyncio.get_running_loop().create_server(gate.protocol, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = ssl.create_default_context(cafile=str(pki.ca))
        client.load_cert_chain(pki.client_cert, pki.client_key)
        # The first bytes go out with the client's last handshake flight (TLS 1.3): none may be lost.
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="localhost")
        writer.write(b"A-ASSOCIATE-RQ")
        assert await asyncio.wait_for(reader.readexactly(14), 5) == b"A-ASSOCIATE-RQ"
        writer.close()
        assert Echo.made and certificate_subject(Echo.made[0]) == "O=Test Hospital,CN=CT01"
        # A silent connection takes the one pending place; the next is reset at once; the silent one times out.
        silent = socket.create_connection(("127.0.0.1", port))
        silent.setblocking(False)
        while not gate.pending:
            await asyncio.sleep(0.01)
        _, over = await asyncio.open_connection("127.0.0.1", port)
        loop = asyncio.get_running_loop()
        assert await asyncio.wait_for(loop.sock_recv(silent, 1), 5) == b""
        silent.close()
        over.close()
        assert not gate.pending
        server.close()

    run_on(loop_name, main)
    assert (value(metrics, "ok"), value(metrics, "limit"), value(metrics, "timeout")) == (1, 1, 1)
