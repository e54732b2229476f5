"""A throw-away PKI for the TLS tests, made with the openssl CLI as docs/security.md tells an operator to: a CA, a
server certificate for 127.0.0.1/localhost, a client certificate it signed, and a client certificate from another
CA (untrusted). EC P-256 keys: generated in milliseconds, and accepted by every BCP 195 suite with ECDSA."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

DAYS = "2"


@dataclass(frozen=True)
class Pki:
    root: Path
    ca: Path  # the CA the appliance trusts for client certificates, and the clients for the server's
    server_cert: Path
    server_key: Path
    client_cert: Path  # signed by ``ca``
    client_key: Path
    rogue_cert: Path  # signed by another CA, which nobody trusts
    rogue_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"openssl {' '.join(args)}:\n{result.stderr}"


def _ca(root: Path, name: str) -> tuple[Path, Path]:
    key, cert = root / f"{name}.key", root / f"{name}.crt"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", DAYS, "-subj", f"/O=Test/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=root)
    return cert, key


def _leaf(root: Path, name: str, subject: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    key, csr, cert, ext = (root / f"{name}.{suffix}" for suffix in ("key", "csr", "crt", "ext"))
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key),
             "-out", str(csr), "-subj", subject, cwd=root)
    ext.write_text(extensions)
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-out", str(cert), "-days", DAYS, "-extfile", str(ext), cwd=root)
    os.chmod(key, 0o600)
    return cert, key


def make_pki(root: Path) -> Pki:
    root.mkdir(parents=True, exist_ok=True)
    ca = _ca(root, "ca")
    server = _leaf(root, "server", "/O=Test/CN=localhost", ca,
                   "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    client = _leaf(root, "client", "/O=Test Hospital/CN=CT01", ca, "extendedKeyUsage=clientAuth\n")
    rogue = _leaf(root, "rogue", "/O=Elsewhere/CN=CT01", _ca(root, "rogue-ca"), "extendedKeyUsage=clientAuth\n")
    return Pki(root, ca[0], *server, *client, *rogue)
