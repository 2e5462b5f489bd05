"""End to end: clients that only do RSA (old printers and appliances) against `tls-relay
serve` with an RSA certificate beside its ECDSA one (tls.rsa_cert / tls.rsa_key, issue
15).  swaks (Debian's, on OpenSSL) restricted to an RSA cipher suite submits a message;
Python's ssl stands in for a client that offers nothing else.  Only 127.0.0.1 is used.
"""

from __future__ import annotations

import shutil
import socket
import ssl
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.e2e.test_intake import queued_id, swaks
from tests.fixtures.relay_proc import HOST, RelayFactory, RelayProcess

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("swaks") is None, reason="needs Debian's swaks"),
]

RSA_ONLY = "ECDHE-RSA-AES128-GCM-SHA256"  # TLS 1.2, RSA authentication only


@pytest.fixture
def rsa_pair(ca: trustme.CA, tmp_path: Path) -> dict[str, str]:
    leaf = ca.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.RSA)
    cert, key = tmp_path / "rsa-cert.pem", tmp_path / "rsa-key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return {"rsa_cert": str(cert), "rsa_key": str(key)}


def handshake(proc: RelayProcess, ciphers: str | None) -> x509.Certificate:
    """Implicit TLS at TLS 1.2 with *ciphers*; the certificate the relay chose."""
    ctx = proc.client_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if ciphers:
        ctx.set_ciphers(ciphers)
    raw = socket.create_connection((HOST, proc.implicit_port), timeout=10)
    with raw, ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.recv(512).startswith(b"220 ")
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_rsa_only_clients_get_the_rsa_certificate(
    relay: RelayFactory, rsa_pair: dict[str, str]
) -> None:
    proc = relay(extra_config={"tls": rsa_pair})
    assert isinstance(handshake(proc, RSA_ONLY).public_key(), rsa.RSAPublicKey)
    assert isinstance(handshake(proc, None).public_key(), ec.EllipticCurvePublicKey)
    result = swaks(
        proc, "--to", "bob@b.test", "--tls-cipher", RSA_ONLY, "--tls-protocol", "tlsv1_2"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert queued_id(result)


def test_without_an_rsa_certificate_they_cannot_connect(relay: RelayFactory) -> None:
    proc = relay()
    with pytest.raises(ssl.SSLError):
        handshake(proc, RSA_ONLY)
