"""DANE for SMTP (RFC 7672): which TLSA records are usable, and whether a peer's
certificate chain matches them (pure).

Role: :class:`TlsaSet` is what a TLSA lookup found (secure, absent, insecure, failed);
:func:`usable` keeps the records SMTP may use - DANE-TA(2) and DANE-EE(3), selector
Cert(0) or SPKI(1), matching Full(0), SHA2-256(1) or SHA2-512(2); PKIX-TA(0) and
PKIX-EE(1) are unusable for SMTP (RFC 7672 3.1.3).  :func:`authenticate` decides a
handshake: DANE-EE(3) matches the peer's own certificate or key, ignoring names and
dates (RFC 7672 3.1.1); DANE-TA(2) matches a certificate the peer sent above its own,
and the chain from the leaf to it must verify, with a name that is the MX host (or the
recipient domain, when the MX RRset was secure) and with valid dates (RFC 7672 3.1.2,
3.2.2).  Chains are checked with ``cryptography.x509.verification``, the TA as the
only anchor.
Not: DNS or DNSSEC (whether a TLSA RRset is secure is the resolver's word), sockets,
clocks (the caller passes the handshake time), or the verdict that combines DANE with
the configured floor (relay.tlspolicy.verdict).
"""

from __future__ import annotations

import datetime
import enum
import functools
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification


class Usage(enum.IntEnum):
    PKIX_TA = 0  # unusable for SMTP (RFC 7672 3.1.3)
    PKIX_EE = 1  # unusable for SMTP
    DANE_TA = 2
    DANE_EE = 3


class Selector(enum.IntEnum):
    CERT = 0  # the whole certificate (DER)
    SPKI = 1  # the SubjectPublicKeyInfo (DER)


class Matching(enum.IntEnum):
    FULL = 0
    SHA256 = 1
    SHA512 = 2


@dataclass(frozen=True)
class Tlsa:
    usage: int
    selector: int
    matching: int
    data: bytes  # the certificate association data

    def __str__(self) -> str:  # presentation form, as in a zone file (RFC 6698 2.2)
        return f"{self.usage} {self.selector} {self.matching} {self.data.hex()}"


class TlsaStatus(enum.Enum):
    SECURE = "secure"  # a DNSSEC-validated TLSA RRset (its records may all be unusable)
    ABSENT = "absent"  # validated denial: no TLSA here, DANE does not apply
    INSECURE = "insecure"  # not validated (unsigned zone): DANE does not apply
    FAILED = "failed"  # SERVFAIL, bogus or timeout for a secure host: defer the host


@dataclass(frozen=True)
class TlsaSet:
    """What the TLSA lookup at ``_PORT._tcp.HOST`` found (RFC 7672 2.2.3)."""

    name: str  # the TLSA owner name queried
    status: TlsaStatus
    records: tuple[Tlsa, ...] = ()  # every record of a SECURE RRset, usable or not
    detail: str = ""

    @property
    def usable(self) -> tuple[Tlsa, ...]:
        return tuple(usable(self.records)) if self.status is TlsaStatus.SECURE else ()


def usable(records: Iterable[Tlsa]) -> list[Tlsa]:
    """The records an SMTP client may use (RFC 7672 3.1.3, and only known parameters)."""
    return [
        r
        for r in records
        if r.usage in (Usage.DANE_TA, Usage.DANE_EE)
        and r.selector in (Selector.CERT, Selector.SPKI)
        and r.matching in (Matching.FULL, Matching.SHA256, Matching.SHA512)
    ]


def _selected(cert_der: bytes, selector: int) -> bytes:
    if selector == Selector.CERT:
        return cert_der
    cert = x509.load_der_x509_certificate(cert_der)
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _digest(data: bytes, matching: int) -> bytes:
    if matching == Matching.SHA256:
        return hashlib.sha256(data).digest()
    if matching == Matching.SHA512:
        return hashlib.sha512(data).digest()
    return data


def matches(record: Tlsa, cert_der: bytes) -> bool:
    """Does *cert_der* carry the association *record* names (selector + matching)?"""
    try:
        return _digest(_selected(cert_der, record.selector), record.matching) == record.data
    except Exception:  # a certificate or key cryptography cannot read
        # (ValueError, UnsupportedAlgorithm, ...) matches nothing: the peer chose to send it.
        return False


# ---- authenticating a peer -------------------------------------------------------------------

TLSA_INVALID = "tlsa-invalid"  # RFC 8460 4.3 result types for DANE failures
CERTIFICATE_EXPIRED = "certificate-expired"
CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"


@dataclass(frozen=True)
class DaneCheck:
    ok: bool
    reason: str  # what matched, or why nothing did
    result_type: str | None = None  # RFC 8460 type when not ok


def _load(der: bytes) -> x509.Certificate | None:
    try:
        return x509.load_der_x509_certificate(der)
    except Exception:  # unreadable: not a certificate we can use
        return None


def _chain_to(
    anchors: Sequence[x509.Certificate],
    leaf: x509.Certificate,
    sent: Sequence[x509.Certificate],
    name: str,
    at: datetime.datetime,
) -> str | None:
    """Verify *leaf* up to one of *anchors* (the only trust anchors) for *name* at *at*;
    None when it does, else the library's reason.  Extensions are not judged by the
    Web PKI rules (a private CA need not follow the CA/B Forum's profile, as OpenSSL's
    DANE does not ask it to); every issuer must still assert basicConstraints CA, and
    the leaf must carry a subjectAltName with the name."""
    policy = verification.ExtensionPolicy.permit_all()
    agnostic = verification.Criticality.AGNOSTIC
    try:
        verifier = (
            verification.PolicyBuilder()
            .store(verification.Store(list(anchors)))
            .time(at)
            .extension_policies(
                ca_policy=policy.require_present(x509.BasicConstraints, agnostic, None),
                ee_policy=policy.require_present(x509.SubjectAlternativeName, agnostic, None),
            )
            .build_server_verifier(x509.DNSName(name))
        )
        verifier.verify(leaf, list(sent))
    except Exception as exc:  # whatever the library raises is a failure
        return str(exc).partition(" (encountered")[0] or type(exc).__name__
    return None


def _dates_problem(cert: x509.Certificate, at: datetime.datetime) -> str | None:
    if at > cert.not_valid_after_utc:
        return f"certificate expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    if at < cert.not_valid_before_utc:
        return f"certificate not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
    return None


def _ta_check(
    records: Sequence[Tlsa], chain: Sequence[bytes], names: Sequence[str], at: datetime.datetime
) -> DaneCheck | None:
    """DANE-TA(2): None when no record matches a certificate above the leaf."""
    matched = [der for der in chain[1:] if any(matches(r, der) for r in records)]
    anchors = [c for c in (_load(der) for der in matched) if c is not None]
    leaf = _load(chain[0])
    if not anchors or leaf is None:
        return None
    sent = [c for c in (_load(der) for der in chain[1:]) if c is not None]
    dates = _dates_problem(leaf, at)
    if dates is not None:
        return DaneCheck(False, f"DANE-TA: {dates}", CERTIFICATE_EXPIRED)
    problems = []
    for name in names:
        problem = _chain_to(anchors, leaf, sent, name, at)
        if problem is None:
            return DaneCheck(True, f"DANE-TA: chain to the TLSA trust anchor, name {name}")
        problems.append(problem)
    if all("subjectAltName" in p for p in problems):
        wanted = " or ".join(names)
        return DaneCheck(
            False,
            f"DANE-TA: the certificate is not valid for {wanted} (RFC 7672 3.2.2)",
            CERTIFICATE_HOST_MISMATCH,
        )
    return DaneCheck(
        False,
        f"DANE-TA: chain does not verify to the TLSA trust anchor: {problems[0]}",
        CERTIFICATE_NOT_TRUSTED,
    )


@functools.lru_cache(maxsize=512)
def authenticate(
    records: tuple[Tlsa, ...],
    chain: tuple[bytes, ...],
    names: tuple[str, ...],
    at: datetime.datetime,
) -> DaneCheck:
    """Does the peer (*chain*: its certificates as sent, leaf first) match the usable
    *records*?  *names*: reference identifiers for DANE-TA; *at*: the handshake time.
    Cached: a pooled session is judged again for each message with the same inputs."""
    good = usable(records)
    if not good:
        return DaneCheck(False, "no usable TLSA record (DANE-TA or DANE-EE)", TLSA_INVALID)
    if not chain:
        return DaneCheck(False, "the MX sent no certificate", TLSA_INVALID)
    ee = [r for r in good if r.usage == Usage.DANE_EE]
    if any(matches(r, chain[0]) for r in ee):
        return DaneCheck(True, "DANE-EE: the certificate matches a TLSA record")
    ta = _ta_check([r for r in good if r.usage == Usage.DANE_TA], chain, names, at)
    if ta is not None:
        return ta
    return DaneCheck(
        False,
        f"the certificate chain matches none of the {len(good)} usable TLSA record(s)",
        TLSA_INVALID,
    )
