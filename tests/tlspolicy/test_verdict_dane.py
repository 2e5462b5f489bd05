"""relay.tlspolicy.verdict with DANE: the precedence of SPEC.md (DANE over MTA-STS per
host, the configured level a floor under both) and verdicts on real trustme chains."""

from __future__ import annotations

import datetime
import hashlib
import ssl
from dataclasses import replace

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from relay.config import DomainPolicy, PolicyConfig, TlsLevel
from relay.tlspolicy.dane import Tlsa, TlsaSet, TlsaStatus
from relay.tlspolicy.mtasts import parse_policy
from relay.tlspolicy.verdict import Observed, PolicySource, decide, precheck, requirement

E, V, S = TlsLevel.ENCRYPT, TlsLevel.VERIFY, TlsLevel.SECURE
POLICY = PolicyConfig(
    default=DomainPolicy(level=E),
    domains={
        "verify.test": DomainPolicy(level=V),
        "bank.test": DomainPolicy(level=TlsLevel.DANE_ONLY),
    },
)
ENFORCE = parse_policy(b"version: STSv1\nmode: enforce\nmx: *.example.test\nmax_age: 86400\n")
NAME = "_25._tcp.mx1.example.test"


def der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def peer() -> tuple[bytes, bytes]:
    """(leaf, issuer) DER for mx1.example.test under a throwaway CA."""
    inter = trustme.CA().create_child_ca()
    pems = inter.issue_cert("mx1.example.test").cert_chain_pems
    return der(pems[0].bytes()), der(pems[1].bytes())


def ee_record(cert_der: bytes) -> Tlsa:
    key = x509.load_der_x509_certificate(cert_der).public_key()
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Tlsa(3, 1, 1, hashlib.sha256(spki).digest())


def secure(*records: Tlsa) -> TlsaSet:
    return TlsaSet(NAME, TlsaStatus.SECURE, records)


def observed(chain: tuple[bytes, ...], verified: bool = False) -> Observed:
    return Observed(
        starttls_offered=True,
        starttls_code=220,
        chain_verified=verified,
        tls_version="TLSv1.3",
        cipher="TLS_AES_128_GCM_SHA256",
        cert_names=("mx1.example.test",),
        peer_chain=chain,
        at=datetime.datetime(2026, 12, 2, tzinfo=datetime.UTC),
    )


# ---- requirement: precedence ---------------------------------------------------------------


def test_usable_tlsa_makes_dane_the_source_and_mta_sts_is_not_consulted(
    peer: tuple[bytes, bytes],
) -> None:
    req = requirement(
        POLICY, "example.test", "mx1.example.test", ENFORCE, secure(ee_record(peer[0]))
    )
    assert (req.level, req.floor, req.policy_source) == (TlsLevel.DANE, E, PolicySource.DANE)
    assert not req.mx_name_required  # the MTA-STS rule is not applied to this host
    assert req.source == f"DANE TLSA at {NAME}"
    assert req.dane_names == ("mx1.example.test",)
    assert req.webpki_level == E


def test_dane_names_include_the_domain_only_when_the_mx_rrset_is_secure() -> None:
    tlsa = secure(Tlsa(2, 1, 1, b"\x01" * 32))
    insecure_mx = requirement(POLICY, "example.test", "mx1.example.test", None, tlsa, False)
    secure_mx = requirement(POLICY, "example.test", "mx1.example.test", None, tlsa, True)
    assert insecure_mx.dane_names == ("mx1.example.test",)
    assert secure_mx.dane_names == ("mx1.example.test", "example.test")


def test_the_configured_floor_stays_under_dane() -> None:
    req = requirement(POLICY, "verify.test", "mx1.verify.test", None, secure(Tlsa(3, 1, 1, b"x")))
    assert (req.level, req.webpki_level) == (TlsLevel.DANE, V)
    assert req.source.startswith("static policy domains['verify.test'] and DANE TLSA")


def test_unusable_only_rrset_neither_authenticates_nor_exempts_from_mta_sts() -> None:
    """RFC 7672 3.1.3: TLS without authentication, which every level asks anyway; an
    MTA-STS enforce policy still applies to such a host (only usable DANE replaces it)."""
    unusable = secure(Tlsa(1, 1, 1, b"x"))
    req = requirement(POLICY, "example.test", "mx1.example.test", ENFORCE, unusable)
    assert (req.level, req.policy_source, req.mx_name_required) == (V, PolicySource.MTA_STS, True)
    plain = requirement(POLICY, "example.test", "mx1.example.test", None, unusable)
    assert (plain.level, plain.policy_source, plain.tlsa) == (E, PolicySource.STATIC, unusable)


@pytest.mark.parametrize("status", [TlsaStatus.ABSENT, TlsaStatus.INSECURE])
def test_without_a_secure_rrset_mta_sts_applies(status: TlsaStatus) -> None:
    req = requirement(POLICY, "example.test", "mx1.example.test", ENFORCE, TlsaSet(NAME, status))
    assert (req.level, req.policy_source) == (V, PolicySource.MTA_STS)


def test_dane_only_without_usable_records_is_refused_before_connecting() -> None:
    for tlsa in (None, TlsaSet(NAME, TlsaStatus.INSECURE), secure(Tlsa(0, 0, 1, b"x"))):
        req = requirement(POLICY, "bank.test", "mx1.bank.test", None, tlsa)
        verdict = precheck(req)
        assert verdict is not None and verdict.result_type == "dane-required"
        assert decide(req, observed(())).result_type == "dane-required"
    assert (
        precheck(requirement(POLICY, "bank.test", "mx", None, secure(Tlsa(3, 1, 1, b"x")))) is None
    )


# ---- decide ----------------------------------------------------------------------------------


def test_dane_ee_match_without_any_ca(peer: tuple[bytes, bytes]) -> None:
    req = requirement(POLICY, "example.test", "mx1.example.test", None, secure(ee_record(peer[0])))
    verdict = decide(req, observed(peer))
    assert (verdict.ok, verdict.level_met) == (True, TlsLevel.DANE)
    assert "DANE-EE" in verdict.reason


def test_dane_mismatch_is_tlsa_invalid(peer: tuple[bytes, bytes]) -> None:
    req = requirement(POLICY, "example.test", "mx1.example.test", None, secure(ee_record(peer[1])))
    verdict = decide(req, observed(peer))
    assert (verdict.ok, verdict.result_type, verdict.level_met) == (False, "tlsa-invalid", E)


def test_a_verify_floor_still_wants_the_ca_store(peer: tuple[bytes, bytes]) -> None:
    req = requirement(POLICY, "verify.test", "mx1.example.test", None, secure(ee_record(peer[0])))
    unverified = decide(req, observed(peer))
    assert (unverified.ok, unverified.result_type) == (False, "certificate-not-trusted")
    both = decide(req, observed(peer, verified=True))
    assert (both.ok, both.level_met) == (True, TlsLevel.DANE)


def test_dane_only_with_a_match(peer: tuple[bytes, bytes]) -> None:
    req = requirement(POLICY, "bank.test", "mx1.example.test", None, secure(ee_record(peer[0])))
    assert req.level is TlsLevel.DANE_ONLY
    assert decide(req, observed(peer)).ok
    assert not decide(req, replace(observed(peer), peer_chain=(peer[1],))).ok


def test_min_version_still_applies_under_dane(peer: tuple[bytes, bytes]) -> None:
    req = requirement(POLICY, "example.test", "mx1.example.test", None, secure(ee_record(peer[0])))
    req = replace(req, min_version=ssl.TLSVersion.TLSv1_3)
    verdict = decide(req, replace(observed(peer), tls_version="TLSv1.2"))
    assert not verdict.ok and "below the required minimum" in verdict.reason
