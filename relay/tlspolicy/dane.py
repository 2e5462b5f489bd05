"""DANE for SMTP (RFC 7672): which TLSA records are usable, and whether a certificate
matches them (pure).

Role: :func:`usable` keeps the records SMTP may use - DANE-TA(2) and DANE-EE(3),
selector Cert(0) or SPKI(1), matching Full(0), SHA2-256(1) or SHA2-512(2); PKIX-TA(0)
and PKIX-EE(1) are unusable for SMTP (RFC 7672 3.1.3) - and :func:`ee_matches` decides
DANE-EE: the peer's own certificate (or its public key) against the records, ignoring
names and expiry as RFC 7672 3.1.1 says.  DANE-TA needs the peer's chain
(:func:`ta_matches` takes it when the caller can provide it).
Not: DNS or DNSSEC (whether a TLSA RRset is secure is the resolver's word), sockets,
or the verdict that combines DANE with the configured floor.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization


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
    except ValueError:  # a certificate that cannot be parsed matches nothing
        return False


def ee_matches(records: Iterable[Tlsa], leaf_der: bytes) -> bool:
    """DANE-EE(3): the server's own certificate matches one record; names and dates are
    not checked (RFC 7672 3.1.1: the TLSA record is the authority)."""
    return any(r.usage == Usage.DANE_EE and matches(r, leaf_der) for r in usable(records))


def ta_matches(records: Iterable[Tlsa], chain_der: Sequence[bytes]) -> bool:
    """DANE-TA(2): some certificate the server sent above its own matches one record
    (RFC 7672 3.1.2).  The caller still checks the chain up to that certificate, the
    name (MX host or the recipient domain) and the validity dates."""
    issuers = list(chain_der[1:])
    return any(
        r.usage == Usage.DANE_TA and any(matches(r, der) for der in issuers)
        for r in usable(records)
    )
