"""Unit tests: outbound client TLS contexts and the facts a handshake proved."""

from __future__ import annotations

import datetime
import hashlib
import ssl
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay.config import TlsLevel
from relay.tlspolicy.contexts import (
    ClientContexts,
    cert_names,
    client_context,
    context_key,
    describe_handshake_error,
    fingerprint,
    observe,
)
from relay.tlspolicy.verdict import Requirement, decide


def req(level: TlsLevel, version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2) -> Requirement:
    return Requirement(level, version, "mx1.example.test", ("example.test",), "test")


def _der(cert: trustme.LeafCert) -> bytes:
    pem = cert.cert_chain_pems[0].bytes()
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext, sni: str) -> ssl.SSLObject:
    """An in-memory TLS handshake (no sockets); the client's SSLObject, or raises."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    cli = client.wrap_bio(c_in, c_out, server_hostname=sni)
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):  # bounded: a TLS 1.3 handshake needs 2-3 rounds
        for name, obj, out, peer_in in (("c", cli, c_out, s_in), ("s", srv, s_out, c_in)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done.values()):
            return cli
    raise AssertionError("handshake did not finish")


# ---- certificate facts ------------------------------------------------------------------


def test_cert_names_are_dns_sans(ca: trustme.CA) -> None:
    der = _der(ca.issue_cert("mx1.example.test", "*.example.test", "127.0.0.1"))
    assert cert_names(der) == ("mx1.example.test", "*.example.test")


def test_cert_names_fall_back_to_cn_only_without_san() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "legacy.example.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    assert cert_names(cert.public_bytes(serialization.Encoding.DER)) == ("legacy.example.test",)


def test_cert_names_of_garbage_is_empty() -> None:
    assert cert_names(b"not a certificate") == ()


def test_fingerprint_is_sha256_of_der(ca: trustme.CA) -> None:
    der = _der(ca.issue_cert("mx1.example.test"))
    assert fingerprint(der) == hashlib.sha256(der).hexdigest()
    assert len(fingerprint(der)) == 64


# ---- client contexts ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "verify"),
    [
        (TlsLevel.ENCRYPT, False),
        (TlsLevel.VERIFY, True),
        (TlsLevel.SECURE, True),
        (TlsLevel.DANE, False),
    ],
)
def test_context_per_level(level: TlsLevel, verify: bool, tmp_path: Path, ca: trustme.CA) -> None:
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    key, ctx = ClientContexts(tmp_path / "ca.pem").for_requirement(req(level))
    assert key == (verify, ssl.TLSVersion.TLSv1_2)
    assert ctx.check_hostname is False  # names are policy.decide's job
    assert ctx.verify_mode == (ssl.CERT_REQUIRED if verify else ssl.CERT_NONE)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_contexts_are_cached_per_key() -> None:
    contexts = ClientContexts(None)
    a = contexts.for_requirement(req(TlsLevel.VERIFY))[1]
    b = contexts.for_requirement(req(TlsLevel.SECURE))[1]
    c = contexts.for_requirement(req(TlsLevel.VERIFY, ssl.TLSVersion.TLSv1_3))[1]
    assert a is b and a is not c
    assert c.minimum_version == ssl.TLSVersion.TLSv1_3
    assert context_key(req(TlsLevel.ENCRYPT)) == (False, ssl.TLSVersion.TLSv1_2)


def test_observe_real_handshake_and_decide(ca: trustme.CA, tmp_path: Path) -> None:
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert = ca.issue_cert("mx1.example.test")
    cert.configure_cert(server)
    client = client_context(True, ssl.TLSVersion.TLSv1_2, tmp_path / "ca.pem")
    obs = observe(_handshake(client, server, "mx1.example.test"), verified=True, implicit_tls=False)
    assert obs.tls_version == "TLSv1.3" and obs.cipher and obs.cipher.startswith("TLS_")
    assert obs.cert_names == ("mx1.example.test",)
    assert obs.cert_fingerprint == fingerprint(_der(cert))
    assert obs.starttls_offered and obs.starttls_code == 220 and obs.chain_verified
    assert decide(req(TlsLevel.VERIFY), obs).ok
    assert not decide(req(TlsLevel.SECURE), obs).ok


def test_untrusted_chain_fails_the_handshake(tmp_path: Path, ca: trustme.CA) -> None:
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    trustme.CA().issue_cert("mx1.example.test").configure_cert(server)
    client = client_context(True, ssl.TLSVersion.TLSv1_2, tmp_path / "ca.pem")
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        _handshake(client, server, "mx1.example.test")
    text = describe_handshake_error(info.value)
    assert text.startswith("certificate verification failed: ")
    assert "issuer" in text


def test_ca_file_replaces_the_system_store(
    tmp_path: Path, ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """delivery.ca_file names the CAs to trust, and no others: a chain from a CA that
    only the system store has must fail (it used to be trusted as well)."""
    system_ca = trustme.CA()
    system_ca.cert_pem.write_to_path(str(tmp_path / "system.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "system.pem"))  # OpenSSL's default store
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    system_ca.issue_cert("mx1.example.test").configure_cert(server)
    # Without ca_file the system store decides: the chain is trusted.
    _handshake(client_context(True, ssl.TLSVersion.TLSv1_2, None), server, "mx1.example.test")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client = client_context(True, ssl.TLSVersion.TLSv1_2, tmp_path / "ca.pem")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(client, server, "mx1.example.test")


def test_version_floor_fails_the_handshake(ca: trustme.CA) -> None:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("mx1.example.test").configure_cert(server)
    server.maximum_version = ssl.TLSVersion.TLSv1_2
    client = client_context(False, ssl.TLSVersion.TLSv1_3, None)
    with pytest.raises(ssl.SSLError) as info:
        _handshake(client, server, "mx1.example.test")
    assert describe_handshake_error(info.value)  # OpenSSL's reason, e.g. "TLSV1_ALERT_..."
