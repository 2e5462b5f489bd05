"""relay.tlspolicy.dane: usable TLSA records and DANE-EE / DANE-TA matching against
certificates made by trustme (RFC 7672)."""

from __future__ import annotations

import datetime
import hashlib

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from relay.tlspolicy.dane import Tlsa, authenticate, matches, usable


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
    wrong = data[:-1] + bytes([data[-1] ^ 0xFF])  # the last byte differs, whatever it was
    assert not matches(Tlsa(3, selector, matching, wrong), leaf)


def sha256_spki(cert_der: bytes) -> bytes:
    return hashlib.sha256(spki(cert_der)).digest()


NOW = datetime.datetime(2026, 12, 2, tzinfo=datetime.UTC)
MX = ("mx1.example.test",)


def test_dane_ee_3_1_1_match_and_mismatch(chain: tuple[bytes, bytes]) -> None:
    leaf, inter = chain
    good = Tlsa(3, 1, 1, sha256_spki(leaf))
    other = Tlsa(3, 1, 1, sha256_spki(inter))
    assert authenticate((other, good), (leaf, inter), MX, NOW).ok
    miss = authenticate((other,), (leaf, inter), MX, NOW)
    assert (miss.ok, miss.result_type) == (False, "tlsa-invalid")
    pkix = authenticate((Tlsa(1, 1, 1, good.data),), (leaf,), MX, NOW)
    assert (pkix.ok, pkix.reason) == (False, "no usable TLSA record (DANE-TA or DANE-EE)")


def test_dane_ee_ignores_names_and_dates() -> None:
    """RFC 7672 3.1.1: with DANE-EE the record is the authority, not the certificate."""
    old = trustme.CA().issue_cert(
        "anything.invalid", not_after=datetime.datetime(2001, 1, 1, tzinfo=datetime.UTC)
    )
    leaf = der(old.cert_chain_pems[0].bytes())
    assert authenticate((Tlsa(3, 1, 1, sha256_spki(leaf)),), (leaf,), MX, NOW).ok


def test_dane_ta_chain_and_name(chain: tuple[bytes, bytes]) -> None:
    leaf, inter = chain
    ta = Tlsa(2, 1, 1, sha256_spki(inter))
    ok = authenticate((ta,), (leaf, inter), MX, NOW)
    assert ok.ok and "name mx1.example.test" in ok.reason
    # The name may also be the recipient domain (passed when the MX RRset is secure).
    assert authenticate((ta,), (leaf, inter), ("mx9.other.test", "mx1.example.test"), NOW).ok
    wrong = authenticate((ta,), (leaf, inter), ("mx2.example.test",), NOW)
    assert (wrong.ok, wrong.result_type) == (False, "certificate-host-mismatch")


def test_dane_ta_must_be_above_the_leaf_and_sent(chain: tuple[bytes, bytes]) -> None:
    leaf, inter = chain
    leaf_as_ta = Tlsa(2, 1, 1, sha256_spki(leaf))
    assert authenticate((leaf_as_ta,), (leaf, inter), MX, NOW).result_type == "tlsa-invalid"
    ta = Tlsa(2, 1, 1, sha256_spki(inter))
    assert authenticate((ta,), (leaf,), MX, NOW).result_type == "tlsa-invalid"


def test_dane_ta_checks_dates() -> None:
    ca = trustme.CA()
    inter = ca.create_child_ca()
    expired = inter.issue_cert(
        "mx1.example.test",
        not_before=datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC),
        not_after=datetime.datetime(2021, 1, 1, tzinfo=datetime.UTC),
    )
    leaf, issuer = (der(p.bytes()) for p in expired.cert_chain_pems)
    got = authenticate((Tlsa(2, 0, 1, hashlib.sha256(issuer).digest()),), (leaf, issuer), MX, NOW)
    assert (got.ok, got.result_type) == (False, "certificate-expired")
    assert "expired on 2021-01-01" in got.reason


def test_dane_ta_rejects_a_leaf_from_another_issuer(chain: tuple[bytes, bytes]) -> None:
    """The TA is sent along, but the leaf was not issued under it."""
    _, inter = chain
    stranger = der(trustme.CA().issue_cert("mx1.example.test").cert_chain_pems[0].bytes())
    got = authenticate((Tlsa(2, 1, 1, sha256_spki(inter)),), (stranger, inter), MX, NOW)
    assert (got.ok, got.result_type) == (False, "certificate-not-trusted")


def test_garbage_certificate_matches_nothing() -> None:
    assert not matches(Tlsa(3, 1, 1, b"\x00" * 32), b"not a certificate")


def test_dane_ta_tries_every_matching_anchor(chain: tuple[bytes, bytes]) -> None:
    """A TA record for a certificate the peer sent but that is not its issuer must not
    hide the one that is (both are in the chain as sent)."""
    leaf, inter = chain
    unrelated = der(trustme.CA().cert_pem.bytes())
    records = (Tlsa(2, 1, 1, sha256_spki(unrelated)), Tlsa(2, 1, 1, sha256_spki(inter)))
    assert authenticate(records, (leaf, unrelated, inter), MX, NOW).ok


def test_an_unreadable_certificate_in_the_chain_is_a_failure_not_an_exception(
    chain: tuple[bytes, bytes],
) -> None:
    leaf, inter = chain
    garbage = b"\x30\x03\x02\x01\x00"  # DER, but no certificate
    got = authenticate((Tlsa(2, 0, 0, garbage),), (leaf, garbage), MX, NOW)
    assert (got.ok, got.result_type) == (False, "tlsa-invalid")
    assert not authenticate((Tlsa(2, 1, 1, sha256_spki(inter)),), (garbage,), MX, NOW).ok
