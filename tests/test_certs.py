"""relay.certs (gen-cert, check_pair, fingerprints) and relay.tlsctx.server_context."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from relay import certs
from relay.config import ServerTls
from relay.errors import CertificateError
from relay.intake import tlscontext as tlsctx


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_gen_cert_writes_p256_self_signed_pair(tmp_path: Path) -> None:
    cert_path, key_path = certs.gen_cert("relay.test", tmp_path / "a" / "b")
    assert (cert_path, key_path) == (tmp_path / "a/b/cert.pem", tmp_path / "a/b/key.pem")
    cert = _load(cert_path)
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp256r1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["relay.test"]
    assert san.get_values_for_type(x509.IPAddress) == []
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=364) < lifetime < dt.timedelta(days=366)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert certs.check_pair(cert_path, key_path) == []
    assert not list((tmp_path / "a/b").glob(".tmp-*"))


def test_gen_cert_for_an_ip_adds_an_ip_san(tmp_path: Path) -> None:
    cert_path, _ = certs.gen_cert("127.0.0.1", tmp_path)
    san = _load(cert_path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


@pytest.mark.parametrize("bad", ["", "two words"])
def test_gen_cert_rejects_unusable_host_names(tmp_path: Path, bad: str) -> None:
    with pytest.raises(CertificateError):
        certs.gen_cert(bad, tmp_path)


def test_gen_cert_output_loads_into_server_context(tmp_path: Path) -> None:
    cert_path, key_path = certs.gen_cert("localhost", tmp_path)
    ctx = tlsctx.server_context(ServerTls(cert_path, key_path))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    ctx13 = tlsctx.server_context(ServerTls(cert_path, key_path, ssl.TLSVersion.TLSv1_3))
    assert ctx13.minimum_version == ssl.TLSVersion.TLSv1_3


def test_server_context_never_goes_below_tls12(server_cert: tuple[Path, Path]) -> None:
    ctx = tlsctx.server_context(ServerTls(*server_cert, min_version=ssl.TLSVersion.TLSv1))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    ciphers = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert ciphers and all("ECDHE" in name for name in ciphers)


def test_server_context_wraps_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="cannot load certificate"):
        tlsctx.server_context(ServerTls(tmp_path / "nope.pem", tmp_path / "nope.key"))


def test_check_pair_catches_a_mismatched_key(tmp_path: Path) -> None:
    cert_a, _ = certs.gen_cert("a.test", tmp_path / "a")
    _, key_b = certs.gen_cert("b.test", tmp_path / "b")
    assert certs.check_pair(cert_a, key_b) == [f"{key_b}: key does not match the certificate"]


def test_check_pair_accepts_a_trustme_chain(server_cert: tuple[Path, Path]) -> None:
    assert certs.check_pair(*server_cert) == []


def test_check_pair_reports_expiry(tmp_path: Path) -> None:
    cert_path, key_path = certs.gen_cert("a.test", tmp_path)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=400)
    [problem] = certs.check_pair(cert_path, key_path, now=later)
    assert problem.startswith(f"{cert_path}: certificate expired on ")
    earlier = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    [problem] = certs.check_pair(cert_path, key_path, now=earlier)
    assert "not valid before" in problem


@pytest.mark.parametrize(
    ("cert_text", "key_text", "expected"),
    [
        (None, None, ["cert: file is unreadable", "key: file is unreadable"]),
        (b"hello", b"hello", ["cert: file is not a PEM certificate", "key: file is not a PEM"]),
    ],
)
def test_check_pair_unreadable_or_not_pem(
    tmp_path: Path, cert_text: bytes | None, key_text: bytes | None, expected: list[str]
) -> None:
    cert_path, key_path = tmp_path / "cert", tmp_path / "key"
    if cert_text is not None:
        cert_path.write_bytes(cert_text)
    if key_text is not None:
        key_path.write_bytes(key_text)
    problems = certs.pair_problems(cert_path, key_path)
    shown = [f"{which}: {text}" for which, text in problems]
    assert len(shown) == len(expected)
    for line, start in zip(shown, expected, strict=True):
        assert line.startswith(start)


def test_fingerprint_matches_openssl_format(tmp_path: Path) -> None:
    cert_path, _ = certs.gen_cert("a.test", tmp_path)
    der = ssl.PEM_cert_to_DER_cert(cert_path.read_text())
    fingerprint = certs.fingerprint_sha256(der)
    assert len(fingerprint) == 32 * 3 - 1
    assert fingerprint.count(":") == 31 and fingerprint == fingerprint.upper()
    assert certs.fingerprint_sha256(b"") == (
        "E3:B0:C4:42:98:FC:1C:14:9A:FB:F4:C8:99:6F:B9:24:"
        "27:AE:41:E4:64:9B:93:4C:A4:95:99:1B:78:52:B8:55"
    )


def test_gen_cert_extensions_as_a_ca_would_write_them(tmp_path: Path) -> None:
    """SubjectKeyIdentifier, AuthorityKeyIdentifier (= its own key: self-signed),
    KeyUsage and ExtendedKeyUsage serverAuth, as strict clients expect."""
    cert = _load(certs.gen_cert("relay.test", tmp_path, ips=["192.0.2.7", "::1"])[0])
    ext = cert.extensions
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    usage = ext.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("192.0.2.7"),
        ipaddress.ip_address("::1"),
    ]
    with pytest.raises(CertificateError, match="--ip 'nope' is not an IP address"):
        certs.gen_cert("relay.test", tmp_path, ips=["nope"])


def test_gen_cert_rsa_pair_beside_the_ecdsa_one(tmp_path: Path) -> None:
    ec_cert, _ = certs.gen_cert("relay.test", tmp_path)
    cert_path, key_path = certs.gen_cert("relay.test", tmp_path, rsa_key=True)
    assert (cert_path.name, key_path.name) == ("rsa-cert.pem", "rsa-key.pem")
    public = _load(cert_path).public_key()
    assert isinstance(public, rsa.RSAPublicKey) and public.key_size == 2048
    usage = _load(cert_path).extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_encipherment
    assert (certs.key_kind(cert_path), certs.key_kind(ec_cert)) == ("RSA", "ECDSA")
    assert certs.check_pair(cert_path, key_path) == []


def test_expiry_warning_within_30_days_only(tmp_path: Path) -> None:
    cert_path, _ = certs.gen_cert("relay.test", tmp_path)  # valid 365 days
    now = dt.datetime.now(dt.UTC)
    assert certs.expiry_warning(cert_path, now) is None
    soon = certs.expiry_warning(cert_path, now + dt.timedelta(days=350))
    assert soon is not None and "certificate expires in 14 days" in soon
    assert str(cert_path) in soon
    assert (
        certs.expiry_warning(cert_path, now + dt.timedelta(days=400)) is None
    )  # expired: an error
