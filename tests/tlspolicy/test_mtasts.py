"""relay.tlspolicy.mtasts: RFC 8461 TXT records, policy files and MX patterns (tables)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.tlspolicy.mtasts import (
    MAX_AGE_CAP,
    MAX_POLICY_BYTES,
    Mode,
    StsError,
    StsPolicy,
    mx_allowed,
    parse_policy,
    parse_txt,
)

GOOD = (
    b"version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\n"
    b"mx: *.example.net\r\nmax_age: 86400\r\n"
)


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
        (["v=STSv1;id=abc"], "abc"),
        (["v=STSv1; id=A1; ext=value"], "A1"),
        (["v=spf1 -all", "v=STSv1; id=1"], "1"),  # other records are discarded
        (["v=spf1 -all"], None),  # no STS record: no policy
        ([], None),
    ],
)
def test_txt_record(records: list[str], expected: str | None) -> None:
    assert parse_txt(records) == expected


@pytest.mark.parametrize(
    ("records", "why"),
    [
        (["v=STSv1; id=1", "v=STSv1; id=2"], "exactly one"),
        (["v=STSv1"], "no id"),
        (["v=STSv1; id="], "1 to 32 letters or digits"),
        (["v=STSv1; id=" + "a" * 33], "1 to 32 letters or digits"),
        (["v=STSv1; id=a-b"], "1 to 32 letters or digits"),
        (["v=STSv1; id=1; id=2"], "more than one id"),
        (["v=STSv1; junk"], "not valid"),
        (["v=STSv10; id=1"], "does not start with v=STSv1"),
    ],
)
def test_invalid_txt_records(records: list[str], why: str) -> None:
    with pytest.raises(StsError, match=why):
        parse_txt(records)


def test_policy_crlf_and_lf() -> None:
    policy = parse_policy(GOOD)
    assert policy == StsPolicy(
        Mode.ENFORCE, ("mail.example.com", "*.example.net"), 86400, GOOD.decode()
    )
    assert parse_policy(GOOD.replace(b"\r\n", b"\n")).mx == policy.mx
    assert parse_policy(b"version: STSv1\nmode: none\nmax_age: 1\n").mode is Mode.NONE


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"mode: enforce\nmx: a.test\nmax_age: 1\n", "version must be STSv1"),
        (b"version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n", "version must be STSv1"),
        (b"version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n", "mode must be"),
        (b"version: STSv1\nmode: enforce\nmx: a.test\n", "max_age must be"),
        (b"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 0\n", "max_age must be"),
        (b"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -5\n", "max_age must be"),
        (b"version: STSv1\nmode: enforce\nmax_age: 60\n", "names no mx"),
        (b"version: STSv1\nmode: testing\nmax_age: 60\n", "names no mx"),
        (b"version: STSv1\nmode: enforce\nmode: none\nmx: a.test\nmax_age: 1\n", "more than one"),
        (b"version: STSv1\nmode: enforce\nmx: *.*.a.test\nmax_age: 1\n", "mx pattern"),
        (b"version: STSv1\nmode: enforce\nmx: a*.test\nmax_age: 1\n", "mx pattern"),
        (b"version: STSv1\nmode: enforce\nmx: localhost\nmax_age: 1\n", "mx pattern"),
        (b"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 1\njunk line\n", "key: value"),
        (b"version: STSv1\nmode: enforce\nmx: b\xc3\xbc.test\nmax_age: 1\n", "not ASCII"),
        (b"x" * (MAX_POLICY_BYTES + 1), "larger than"),
    ],
)
def test_invalid_policies(body: bytes, why: str) -> None:
    with pytest.raises(StsError, match=why):
        parse_policy(body)


def test_max_age_is_capped_and_extensions_ignored() -> None:
    body = b"version: STSv1\nmode: testing\nmx: a.test\nmax_age: 9999999999\nfoo: bar\n"
    policy = parse_policy(body)
    assert (policy.mode, policy.max_age) == (Mode.TESTING, MAX_AGE_CAP)


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("mail.example.com", True),
        ("MAIL.Example.COM.", True),
        ("mx1.example.net", True),  # *.example.net: one label
        ("a.b.example.net", False),  # never more than one label
        ("example.net", False),  # never the bare parent
        ("mail.example.com.evil.test", False),
        ("xmail.example.com", False),
    ],
)
def test_mx_patterns(host: str, allowed: bool) -> None:
    assert mx_allowed(parse_policy(GOOD), host) is allowed


@given(st.binary(max_size=400))
def test_any_body_is_a_policy_or_a_reason(body: bytes) -> None:
    try:
        policy = parse_policy(body)
    except StsError as exc:
        assert str(exc)
        return
    assert policy.mode in Mode and 0 < policy.max_age <= MAX_AGE_CAP


@given(st.lists(st.text(max_size=60), max_size=4))
def test_any_txt_rrset_is_an_id_none_or_a_reason(records: list[str]) -> None:
    try:
        found = parse_txt(records)
    except StsError as exc:
        assert str(exc)
        return
    assert found is None or (found.isalnum() and len(found) <= 32)
