"""relay.tlspolicy.dane: usable TLSA records and DANE-EE / DANE-TA matching against
certificates made by trustme (RFC 7672)."""

from __future__ import annotations

import hashlib

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from relay.tlspolicy.dane import Tlsa, ee_matches, matches, ta_matches, usable


def der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def spki(cert_der: bytes) -> bytes:
    key = x509.load_der_x509_certificate(cert_der).public_key()
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def chain() -> tuple[bytes, bytes]:
    """(leaf, intermediate) DER, from a CA with one intermediate."""
    ca = trustme.CA()
    inter = ca.create_child_ca()
    leaf = inter.issue_cert("mx1.example.test")
    pems = [p.bytes() for p in leaf.cert_chain_pems]
    return der(pems[0]), der(pems[1])


def test_only_dane_ta_and_ee_with_known_parameters_are_usable() -> None:
    records = [
        Tlsa(3, 1, 1, b"x"),
        Tlsa(2, 0, 2, b"x"),
        Tlsa(1, 1, 1, b"x"),  # PKIX-EE: unusable for SMTP
        Tlsa(0, 0, 1, b"x"),  # PKIX-TA: unusable
        Tlsa(3, 2, 1, b"x"),  # unknown selector
        Tlsa(3, 1, 3, b"x"),  # unknown matching type
    ]
    assert usable(records) == records[:2]


@pytest.mark.parametrize(("selector", "matching"), [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)])
def test_every_selector_and_matching_type(
    chain: tuple[bytes, bytes], selector: int, matching: int
) -> None:
    leaf, _ = chain
    data = leaf if selector == 0 else spki(leaf)
    if matching == 1:
        data = hashlib.sha256(data).digest()
    elif matching == 2:
        data = hashlib.sha512(data).digest()
    record = Tlsa(3, selector, matching, data)
    assert matches(record, leaf)
    assert not matches(Tlsa(3, selector, matching, data[:-1] + b"\x00"), leaf)


def test_dane_ee_3_1_1_match_and_mismatch(chain: tuple[bytes, bytes]) -> None:
    leaf, inter = chain
    good = Tlsa(3, 1, 1, hashlib.sha256(spki(leaf)).digest())
    other = Tlsa(3, 1, 1, hashlib.sha256(spki(inter)).digest())
    assert ee_matches([other, good], leaf)
    assert not ee_matches([other], leaf)
    assert not ee_matches([Tlsa(1, 1, 1, good.data)], leaf)  # PKIX-EE is never used


def test_dane_ta_matches_an_issuer_not_the_leaf(chain: tuple[bytes, bytes]) -> None:
    leaf, inter = chain
    ta = Tlsa(2, 1, 1, hashlib.sha256(spki(inter)).digest())
    assert ta_matches([ta], [leaf, inter])
    leaf_as_ta = Tlsa(2, 1, 1, hashlib.sha256(spki(leaf)).digest())
    assert not ta_matches([leaf_as_ta], [leaf, inter])  # a TA is above the leaf
    assert not ta_matches([ta], [leaf])  # the server did not send its issuer


def test_garbage_certificate_matches_nothing() -> None:
    assert not matches(Tlsa(3, 1, 1, b"\x00" * 32), b"not a certificate")
