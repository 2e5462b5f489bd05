"""relay.domains: the one normal form of a domain name (a table, and properties)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.domains import dns_name, domain_of, is_dns_name, normalize_domain
from relay.errors import InvalidDomain

FULLWIDTH_BUECHER = "\uff42\u00fc\uff43\uff48\uff45\uff52\uff0etest"  # fullwidth letters and dot


@pytest.mark.parametrize(
    ("written", "normal"),
    [
        ("example.com", "example.com"),
        ("Example.COM", "example.com"),  # mixed case
        ("example.com.", "example.com"),  # trailing root dot
        (" example.com ", "example.com"),
        ("bücher.test", "xn--bcher-kva.test"),  # U-label
        ("BÜCHER.test", "xn--bcher-kva.test"),  # U-label, upper case (UTS #46 folds it)
        ("xn--bcher-kva.test", "xn--bcher-kva.test"),  # A-label
        ("XN--BCHER-KVA.TEST.", "xn--bcher-kva.test"),  # A-label, upper case, root dot
        (FULLWIDTH_BUECHER, "xn--bcher-kva.test"),  # fullwidth compatibility forms
        ("\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com", "example.com"),  # fullwidth ASCII
        ("faß.de", "xn--fa-hia.de"),  # IDNA 2008, non-transitional: ß stays ß
        ("例子.广告", "xn--fsqu00a.xn--4rr70v"),
        ("a-b.c0.test", "a-b.c0.test"),
        ("R3--SN-ab.example", "r3--sn-ab.example"),  # reserved-LDH, not xn--: kept (DNS has them)
        ("bücher.ab--cd.test", "xn--bcher-kva.ab--cd.test"),
        ("a\u200bb.test", "ab.test"),  # UTS #46 ignores a zero-width space: the same name
        ("example.com\u3002", "example.com"),  # an ideographic full stop as the root dot
    ],
)
def test_normal_form(written: str, normal: str) -> None:
    assert normalize_domain(written) == normal


@pytest.mark.parametrize(
    "bad",
    [
        "",
        ".",
        "a..b",  # empty label
        "-a.test",
        "a-.test",
        "bücher.-a.test",  # a bad label beside a Unicode one
        "xn--zz.test",  # not valid punycode
        "exa_mple.com",  # STD3: LDH only
        "exa mple.com",
        "a" * 64 + ".test",  # label over 63 octets
        ".".join(["a" * 63] * 4) + ".test",  # name over 253
        "\u0661\u0662\u0663.com",  # bidi rule
    ],
)
def test_invalid_names_raise_with_the_name(bad: str) -> None:
    with pytest.raises(InvalidDomain, match="is not a valid domain name"):
        normalize_domain(bad)


def test_domain_of_an_address_and_dns_names() -> None:
    assert domain_of("jörg@Bücher.Test") == "xn--bcher-kva.test"
    assert dns_name("MX1.Example.COM.") == "mx1.example.com"
    assert is_dns_name("xn--bcher-kva.test") and not is_dns_name("bücher.test")


@given(
    st.from_regex(
        r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?){0,3}",
        fullmatch=True,
    )
)
def test_plain_names_are_their_own_normal_form_and_idempotent(name: str) -> None:
    if any(label.startswith("xn--") for label in name.split(".")):
        return  # must be a valid A-label: covered by the table
    assert normalize_domain(name) == name
    assert normalize_domain(normalize_domain(name.upper() + ".")) == name


@given(st.text(min_size=1, max_size=30))
def test_normal_form_is_idempotent_or_refused(text: str) -> None:
    try:
        once = normalize_domain(text)
    except InvalidDomain:
        return
    assert once.isascii() and once == once.lower() and not once.endswith(".")
    assert normalize_domain(once) == once
