"""relay.policy: the TLS verdict, table-driven; RFC 6125 name matching with Hypothesis."""

from __future__ import annotations

import ssl
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.config import DomainPolicy, PolicyConfig, TlsLevel
from relay.domains import Domain, normalize_domain
from relay.tlspolicy.mtasts import parse_policy
from relay.tlspolicy.verdict import (
    Observed,
    PolicySource,
    Requirement,
    Verdict,
    decide,
    name_matches,
    requirement,
    version_rank,
)

E, V, S = TlsLevel.ENCRYPT, TlsLevel.VERIFY, TlsLevel.SECURE

POLICY = PolicyConfig(
    default=DomainPolicy(level=E, min_version=ssl.TLSVersion.TLSv1_2),
    domains={
        "example.com": DomainPolicy(level=S, match=(".example.com", "mail.partner.net")),
        "verify.test": DomainPolicy(level=V, min_version=ssl.TLSVersion.TLSv1_3),
        "dane.test": DomainPolicy(level=TlsLevel.DANE),
    },
)


# ---- requirement -----------------------------------------------------------------------------


def test_requirement_from_domain_entry() -> None:
    req = requirement(POLICY, normalize_domain("EXAMPLE.com."), "MX1.example.com.")
    assert req == Requirement(
        level=S,
        min_version=ssl.TLSVersion.TLSv1_2,
        mx_host="mx1.example.com",
        secure_names=("example.com", ".example.com", "mail.partner.net"),
        source="static policy domains['example.com']",
    )


def test_requirement_from_default() -> None:
    req = requirement(POLICY, "other.test", "mx.other.test")
    assert (req.level, req.source, req.secure_names) == (
        E,
        "static policy default",
        ("other.test",),
    )


def test_requirement_min_version_per_domain() -> None:
    assert requirement(POLICY, "verify.test", "mx").min_version is ssl.TLSVersion.TLSv1_3


# ---- decide ----------------------------------------------------------------------------------

GOOD = Observed(
    starttls_offered=True,
    starttls_code=220,
    chain_verified=True,
    tls_version="TLSv1.3",
    cipher="TLS_AES_256_GCM_SHA384",
    cert_names=("mx1.example.com",),
    cert_fingerprint="ab" * 32,
)


def req(level: TlsLevel, **kw: object) -> Requirement:
    base = Requirement(
        level=level,
        min_version=ssl.TLSVersion.TLSv1_2,
        mx_host="mx1.example.com",
        secure_names=("example.com", ".example.com"),
        source="static policy domains['example.com']",
    )
    return replace(base, **kw)  # type: ignore[arg-type]


CASES: list[tuple[str, Requirement, Observed, bool, TlsLevel | None, str]] = [
    # id, requirement, observed, ok, level_met, reason fragment
    ("encrypt ok", req(E), GOOD, True, S, "meets level encrypt"),
    (
        "encrypt ok without verification",
        req(E),
        replace(GOOD, chain_verified=False, cert_names=()),
        True,
        E,
        "met encrypt",
    ),
    ("verify ok", req(V), GOOD, True, S, "meets level verify"),
    ("secure ok via subdomain entry", req(S), GOOD, True, S, "meets level secure"),
    (
        "secure ok via recipient domain name",
        req(S, mx_host="example.com"),
        replace(GOOD, cert_names=("example.com",)),
        True,
        S,
        "secure",
    ),
    (
        "secure ok via wildcard under match entry",
        req(S),
        replace(GOOD, cert_names=("*.example.com",)),
        True,
        S,
        "secure",
    ),
    (
        "implicit TLS without STARTTLS",
        req(E),
        replace(GOOD, starttls_offered=False, starttls_code=None, implicit_tls=True),
        True,
        S,
        "encrypt",
    ),
    (
        "starttls not offered",
        req(E),
        Observed(starttls_offered=False),
        False,
        None,
        "STARTTLS not offered by MX (downgrade or misconfiguration); refusing plaintext",
    ),
    (
        "starttls 454",
        req(E),
        Observed(starttls_offered=True, starttls_code=454),
        False,
        None,
        "MX answered 454 to STARTTLS",
    ),
    (
        "starttls 501",
        req(V),
        Observed(starttls_offered=True, starttls_code=501),
        False,
        None,
        "answered 501",
    ),
    (
        "handshake error",
        req(E),
        Observed(starttls_offered=True, starttls_code=220, handshake_error="wrong version number"),
        False,
        None,
        "TLS handshake with MX failed: wrong version number",
    ),
    (
        "no session reported",
        req(E),
        Observed(starttls_offered=True, starttls_code=220),
        False,
        None,
        "no TLS session",
    ),
    (
        "version too low",
        req(E),
        replace(GOOD, tls_version="TLSv1"),
        False,
        None,
        "MX negotiated TLSv1, below the required minimum TLSv1.2",
    ),
    (
        "TLSv1.1 below 1.2",
        req(V),
        replace(GOOD, tls_version="TLSv1.1"),
        False,
        None,
        "below the required minimum TLSv1.2",
    ),
    (
        "TLSv1.2 below 1.3",
        req(E, min_version=ssl.TLSVersion.TLSv1_3),
        replace(GOOD, tls_version="TLSv1.2"),
        False,
        None,
        "TLSv1.2, below the required minimum TLSv1.3",
    ),
    (
        "verify: chain not verified",
        req(V),
        replace(GOOD, chain_verified=False),
        False,
        E,
        "could not be verified",
    ),
    (
        "verify: wrong name",
        req(V),
        replace(GOOD, cert_names=("other.example.net",)),
        False,
        E,
        "certificate names (other.example.net) do not match MX host mx1.example.com",
    ),
    (
        "verify: no names",
        req(V),
        replace(GOOD, cert_names=()),
        False,
        E,
        "(none)",
    ),
    (
        "verify: wildcard too deep",
        req(V, mx_host="a.b.example.com", secure_names=("example.com",)),
        replace(GOOD, cert_names=("*.example.com",)),
        False,
        E,
        "do not match MX host a.b.example.com",
    ),
    (
        # Postfix semantics: `secure` checks the recipient domain / match list
        # instead of the MX name, and a session meeting it also meets `verify`.
        "secure: domain match suffices without MX-name match",
        req(S, mx_host="mx.other-provider.net"),
        replace(GOOD, cert_names=("mail.example.com",)),
        True,
        TlsLevel.SECURE,
        "meets level secure",
    ),
    (
        "verify ok but not secure",
        req(V, mx_host="mx.provider.net"),
        replace(GOOD, cert_names=("mx.provider.net",)),
        True,
        V,
        "met verify",
    ),
    (
        "secure: MX name only",
        req(S, mx_host="mx.provider.net"),
        replace(GOOD, cert_names=("mx.provider.net",)),
        False,
        V,
        "match none of example.com, .example.com",
    ),
    (
        "secure: chain not verified",
        req(S),
        replace(GOOD, chain_verified=False),
        False,
        E,
        "level secure required (static policy domains['example.com']) but certificate chain",
    ),
    (
        "secure: dotted entry does not match the bare domain",
        req(S, mx_host="example.com", secure_names=(".example.com",)),
        replace(GOOD, cert_names=("example.com",)),
        False,
        V,
        "match none",
    ),
    (
        "dane without a TLSA RRset fails closed",
        req(TlsLevel.DANE),
        GOOD,
        False,
        None,
        "has no usable DNSSEC-validated TLSA RRset (not looked up",
    ),
    (
        "dane-only without a TLSA RRset fails closed",
        req(TlsLevel.DANE_ONLY),
        GOOD,
        False,
        None,
        "but mx1.example.com has no usable DNSSEC-validated TLSA RRset",
    ),
]


@pytest.mark.parametrize(
    ("req_", "obs", "ok", "met", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_decide(
    req_: Requirement, obs: Observed, ok: bool, met: TlsLevel | None, fragment: str
) -> None:
    verdict = decide(req_, obs)
    assert isinstance(verdict, Verdict)
    assert verdict.ok is ok
    assert verdict.level_met == met
    assert fragment in verdict.reason
    assert "\n" not in verdict.reason


def test_never_ok_without_tls_whatever_else_is_claimed() -> None:
    # A peer that did not do STARTTLS cannot pass, even if other fields look good.
    sneaky = replace(GOOD, starttls_offered=False, implicit_tls=False)
    for level in TlsLevel:
        assert not decide(req(level), sneaky).ok


# ---- version_rank ----------------------------------------------------------------------------


def test_version_rank_order() -> None:
    names = ["SSLv2", "SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"]
    ranks = [version_rank(n) for n in names]
    assert ranks == sorted(ranks) and len(set(ranks)) == len(ranks)
    assert version_rank("TLSv1_2") == version_rank("TLSv1.2")
    assert version_rank("garbage") < version_rank("SSLv2")
    assert version_rank("TLSv1.4") > version_rank("TLSv1.3")


# ---- name_matches ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cert", "wanted", "expected"),
    [
        ("mx.example.com", "mx.example.com", True),
        ("MX.Example.COM.", "mx.example.com", True),
        ("mx.example.com", "MX.EXAMPLE.COM.", True),
        ("*.example.com", "mx.example.com", True),
        ("*.EXAMPLE.com", "Mx.example.com", True),
        ("*.example.com", "example.com", False),  # the wildcard needs a label
        ("*.example.com", "a.b.example.com", False),  # never across dots
        ("*.com", "example.com", False),  # too broad
        ("*", "localhost", False),
        ("f*.example.com", "foo.example.com", False),  # partial wildcards refused
        ("*foo.example.com", "xfoo.example.com", False),
        ("mx.*.com", "mx.example.com", False),
        ("*.*.example.com", "a.b.example.com", False),
        ("mx.example.com", "*.example.com", False),  # the reference is never a pattern
        ("mx.example.com", "mx.example.com.evil", False),
        ("example.com", "xexample.com", False),
        ("", "example.com", False),
        ("mx..example.com", "mx..example.com", False),
        ("xn--bcher-kva.example", "bücher.example", True),  # IDNA A-labels compared
        ("*.xn--bcher-kva.example", "mx.bücher.example", True),
        ("bücher.example", "xn--bcher-kva.example", True),
    ],
)
def test_name_matches_table(cert: str, wanted: str, expected: bool) -> None:
    assert name_matches(cert, wanted) is expected


LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
NAME = st.lists(LABEL, min_size=1, max_size=5).map(".".join)


@given(NAME)
def test_name_always_matches_itself(name: str) -> None:
    assert name_matches(name, name)
    assert name_matches(name.upper(), name + ".")


@given(LABEL, LABEL, st.lists(LABEL, min_size=2, max_size=4).map(".".join))
def test_wildcard_matches_one_label_never_across_dots(a: str, b: str, suffix: str) -> None:
    assert name_matches(f"*.{suffix}", f"{a}.{suffix}")
    assert not name_matches(f"*.{suffix}", f"{a}.{b}.{suffix}")
    assert not name_matches(f"*.{suffix}", suffix)


@given(NAME, NAME)
def test_distinct_names_do_not_match(x: str, y: str) -> None:
    if x != y:
        assert not name_matches(x, y)


@given(st.text(max_size=30), st.text(max_size=30))
def test_name_matches_never_raises(x: str, y: str) -> None:
    assert name_matches(x, y) in (True, False)


STS = parse_policy(b"version: STSv1\nmode: enforce\nmx: *.example.com\nmax_age: 86400\n")


def test_mta_sts_enforce_raises_encrypt_to_verify_and_never_lowers() -> None:
    req = requirement(POLICY, Domain("other.test"), "mx.other.test", STS)
    assert (req.level, req.policy_source, req.mx_name_required) == (V, PolicySource.MTA_STS, True)
    assert req.source == "MTA-STS policy of other.test (enforce)"
    secure = requirement(POLICY, Domain("example.com"), "mx1.example.com", STS)
    assert secure.level == S  # the floor stays where it was
    testing = parse_policy(b"version: STSv1\nmode: testing\nmx: a.test\nmax_age: 60\n")
    assert requirement(POLICY, Domain("other.test"), "mx.other.test", testing).level == E


def test_mta_sts_enforce_needs_the_mx_name_even_where_secure_is_met() -> None:
    """Found in review: `secure` accepts a `match` name (www.example.com via
    .example.com) without the MX host name; RFC 8461 4.2 requires the MX name."""
    www = replace(GOOD, cert_names=("www.example.com",))
    static = requirement(POLICY, Domain("example.com"), "mx1.example.com")
    assert decide(static, www).ok  # the configured policy alone accepts it
    enforced = requirement(POLICY, Domain("example.com"), "mx1.example.com", STS)
    verdict = decide(enforced, www)
    assert not verdict.ok and verdict.result_type == "certificate-host-mismatch"
    assert "requires the MX host name" in verdict.reason
    assert decide(enforced, replace(GOOD, cert_names=("mx1.example.com", "example.com"))).ok
