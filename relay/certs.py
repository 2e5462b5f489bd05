"""Certificates: generate a self-signed pair for a first run, and check a configured pair.

Role: ``gen_cert`` writes a self-signed ECDSA P-256 (or RSA 2048) certificate (SAN =
hostname and any IP addresses; key usage, EKU serverAuth, key identifiers) and its key
for a lab; ``check_pair`` lists what is wrong with a configured cert/key so the config loader
can report it; ``fingerprint_sha256`` formats a DER fingerprint the way openssl does.
Not: building ``ssl.SSLContext`` objects (relay.intake.tlscontext), or trusting anything.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from relay.errors import CertificateError
from relay.safeio import atomic_write

VALIDITY = dt.timedelta(days=365)  # gen-cert's lifetime (said in its --help)
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
_BACKDATE = dt.timedelta(minutes=5)  # tolerate small clock skew between hosts


def fingerprint_sha256(der: bytes) -> str:
    """SHA-256 of a DER certificate as upper-case hex pairs joined by colons (like openssl)."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return ":".join(f"{b:02X}" for b in digest.finalize())


def _sans(hostname: str, ips: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName(hostname)]
    addresses = list(ips)
    try:
        ipaddress.ip_address(hostname)
        addresses.insert(0, hostname)
    except ValueError:
        pass
    for text in dict.fromkeys(addresses):
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise CertificateError(f"gen-cert: --ip {text!r} is not an IP address") from None
        # RFC 6125: an IP literal is matched against an iPAddress SAN, never a dNSName.
        names.append(x509.IPAddress(address))
    return names


def _build_cert(hostname: str, key: PrivateKey, ips: Sequence[str]) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    eku = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    rsa_key = isinstance(key, rsa.RSAPrivateKey)
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=rsa_key,  # RSA key exchange (TLS 1.2 clients without ECDHE)
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(_sans(hostname, ips)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        .add_extension(ski, critical=False)
        # Self-signed: the authority is the certificate's own key (RFC 5280 4.2.1.1).
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )


def gen_cert(
    hostname: str, out: Path, ips: Sequence[str] = (), rsa_key: bool = False
) -> tuple[Path, Path]:
    """Write ``out/cert.pem`` and ``out/key.pem`` (mode 0600) - or, with *rsa_key*, an
    RSA 2048 pair ``out/rsa-cert.pem`` and ``out/rsa-key.pem`` for ``tls.rsa_cert`` -
    valid for ``VALIDITY``; *ips* become iPAddress SANs.  Return the two paths."""
    if not hostname or any(ch.isspace() for ch in hostname):
        raise CertificateError(f"gen-cert: not a usable host name (got {hostname!r})")
    key: PrivateKey = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if rsa_key
        else ec.generate_private_key(ec.SECP256R1())
    )
    cert = _build_cert(hostname, key, ips)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    prefix = "rsa-" if rsa_key else ""
    cert_path, key_path = out / f"{prefix}cert.pem", out / f"{prefix}key.pem"
    try:
        out.mkdir(parents=True, exist_ok=True)
        # Key first: a cert.pem without its key would look like a finished pair.
        atomic_write(key_path, key_pem, 0o600)
        atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    except OSError as exc:
        raise CertificateError(f"gen-cert: cannot write to {out}: {exc.strerror}") from exc
    return cert_path, key_path


Problem = tuple[str, str]  # ("cert" | "key", sentence without the path)


def _read(path: Path, which: str, problems: list[Problem]) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as exc:
        problems.append((which, f"file is unreadable: {exc.strerror or exc}"))
        return None


def _load_cert(data: bytes, problems: list[Problem]) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        problems.append(("cert", "file is not a PEM certificate"))
        return None


def _load_key(data: bytes, problems: list[Problem]) -> object | None:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        problems.append(("key", "key is encrypted; a key without passphrase is needed"))
    except ValueError:
        problems.append(("key", "file is not a PEM private key"))
    except UnsupportedAlgorithm:
        problems.append(("key", "file holds an unsupported kind of private key"))
    return None


def _public_der(obj: object) -> bytes:
    public = obj.public_key()  # type: ignore[attr-defined]  # keys and certificates
    der: bytes = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def _validity(certificate: x509.Certificate, when: dt.datetime) -> list[Problem]:
    if certificate.not_valid_after_utc < when:
        return [("cert", f"certificate expired on {certificate.not_valid_after_utc:%Y-%m-%d}")]
    if certificate.not_valid_before_utc > when:
        start = certificate.not_valid_before_utc
        return [("cert", f"certificate is not valid before {start:%Y-%m-%d %H:%M} UTC")]
    return []


def pair_problems(cert: Path, key: Path, now: dt.datetime | None = None) -> list[Problem]:
    """What is wrong with a cert/key pair, each tagged with the file it concerns.

    Checks: both readable, both PEM, the certificate is inside its validity period at
    *now*, and the key matches the (first) certificate in the file.
    """
    problems: list[Problem] = []
    cert_data = _read(cert, "cert", problems)
    key_data = _read(key, "key", problems)
    certificate = _load_cert(cert_data, problems) if cert_data is not None else None
    private = _load_key(key_data, problems) if key_data is not None else None
    if certificate is None:
        return problems
    problems.extend(_validity(certificate, now or dt.datetime.now(dt.UTC)))
    if private is not None and _public_der(private) != _public_der(certificate):
        problems.append(("key", "key does not match the certificate"))
    return problems


EXPIRY_WARNING = dt.timedelta(days=30)


def expiry_warning(cert: Path, now: dt.datetime | None = None) -> str | None:
    """A sentence when *cert* expires within EXPIRY_WARNING (expired is an error, said by
    pair_problems); None otherwise, or when it cannot be read."""
    try:
        certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    except (OSError, ValueError):
        return None
    now = now or dt.datetime.now(dt.UTC)
    left = certificate.not_valid_after_utc - now
    if dt.timedelta(0) <= left < EXPIRY_WARNING:
        when = f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        return f"{cert}: certificate expires in {left.days} days ({when}); renew it"
    return None


def not_after(cert: Path) -> float | None:
    """When *cert* expires, as Unix time; None when it cannot be read."""
    try:
        certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    except (OSError, ValueError):
        return None
    return certificate.not_valid_after_utc.timestamp()


def expiry_warnings(*certs: Path | None) -> list[str]:
    """expiry_warning for each certificate given (tls.cert, tls.rsa_cert; None skipped)."""
    return [w for w in (expiry_warning(c) for c in certs if c is not None) if w is not None]


def key_kind(cert: Path) -> str:
    """ "RSA", "ECDSA", "Ed25519", ... for the (first) certificate in *cert*."""
    try:
        public = x509.load_pem_x509_certificate(cert.read_bytes()).public_key()
    except (OSError, ValueError, UnsupportedAlgorithm):
        return "an unreadable key"
    if isinstance(public, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(public, ec.EllipticCurvePublicKey):
        return "ECDSA"
    return type(public).__name__.removesuffix("PublicKey") or "another kind of key"


def check_pair(cert: Path, key: Path, now: dt.datetime | None = None) -> list[str]:
    """Problems with a certificate/key pair as sentences naming the file (empty: usable)."""
    paths = {"cert": cert, "key": key}
    return [f"{paths[which]}: {text}" for which, text in pair_problems(cert, key, now)]
