"""relay.addresses: table tests for RFC 5321 paths, plus Hypothesis properties."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.intake.addresses import (
    MAX_DOMAIN,
    MAX_LOCAL_PART,
    MAX_PATH,
    MailCommand,
    parse_forward_path,
    parse_mail,
    parse_params,
    parse_rcpt,
    parse_reverse_path,
    split_argument,
)
from relay.intake.replies import Reply

OK_BOTH = [
    ("<user@example.com>", "user@example.com"),
    ("<User.Name+tag@Example.COM>", "User.Name+tag@example.com"),  # domain lower-cased only
    ("<a@b>", "a@b"),
    ("<o'brien@x-y.example>", "o'brien@x-y.example"),
    ('<"plain"@example.com>', "plain@example.com"),  # needless quotes dropped
    ('<"with space"@example.com>', '"with space"@example.com'),
    ('<"quote\\"d"@example.com>', '"quote\\"d"@example.com'),
    ("<{weird}=/?^`|~#$&*@example.com>", "{weird}=/?^`|~#$&*@example.com"),
    ("<" + "l" * MAX_LOCAL_PART + "@example.com>", "l" * MAX_LOCAL_PART + "@example.com"),
]

REFUSED_BOTH = [
    ("<@a.example,@b.example:user@c.example>", 553, "Source routes"),
    ("<@a.example:user@c.example>", 553, "Source routes"),
    ("<user%c.example@a.example>", 553, "Percent hack"),
    ("<c.example!user@a.example>", 553, "bang paths"),
    ('<"user%c"@a.example>', 553, "Percent hack"),
    ("<user>", 553, "domain"),
    ("<user@>", 553, "domain"),
    ("<@>", 553, "Source routes"),
    ("<a@b@c.example>", 501, "local part"),
    ("<.a@example.com>", 501, "local part"),
    ("<a..b@example.com>", 501, "local part"),
    ("<a.@example.com>", 501, "local part"),
    ("<a b@example.com>", 501, "local part"),
    ('<""@example.com>', 553, "Empty local part"),
    ("<user@-bad.example>", 501, "domain"),
    ("<user@bad-.example>", 501, "domain"),
    ("<user@exa_mple.com>", 501, "domain"),
    ("<user@example..com>", 501, "domain"),
    ("<user@example.com.>", 501, "domain"),
    ("<user@" + "a" * 64 + ".example>", 501, "domain"),  # label > 63
    ("<" + "l" * (MAX_LOCAL_PART + 1) + "@example.com>", 553, "Local part longer"),
    ("<user@" + ("a" * 60 + ".") * 5 + "com>", 553, "Path longer"),
    ("user@example.com", 501, "enclosed"),
    ("<jörg@example.com>", 553, "SMTPUTF8"),
    ("<user@exämple.com>", 553, "SMTPUTF8"),
    ("<a\udcff@example.com>", 501, "UTF-8"),
    ('<"unterminated@example.com>', 501, "Unterminated"),
    ('<"ctl\x01"@example.com>', 501, "quoted"),
]


@pytest.mark.parametrize(("path", "normal"), OK_BOTH)
def test_valid_paths(path: str, normal: str) -> None:
    assert parse_reverse_path(path) == normal
    assert parse_forward_path(path) == normal


@pytest.mark.parametrize(("path", "code", "words"), REFUSED_BOTH)
def test_refused_paths(path: str, code: int, words: str) -> None:
    for parsed, enhanced in (
        (parse_reverse_path(path), "5.1.7"),
        (parse_forward_path(path), "5.1.3"),
    ):
        assert isinstance(parsed, Reply), parsed
        assert parsed.code == code and words.lower() in parsed.text.lower()
        assert parsed.enhanced in (enhanced, "5.6.7")


def test_null_paths() -> None:
    assert parse_reverse_path("<>") == ""  # RFC 5321 4.5.5: the null reverse-path
    refused = parse_forward_path("<>")
    assert isinstance(refused, Reply) and refused.code == 501


def test_ip_literals_only_for_senders() -> None:
    assert parse_reverse_path("<u@[192.0.2.1]>") == "u@[192.0.2.1]"
    assert parse_reverse_path("<u@[IPv6:2001:DB8:0::1]>") == "u@[IPv6:2001:db8::1]"
    for bad in ("<u@[300.0.0.1]>", "<u@[IPv6:zz::1]>", "<u@[tag:x]>", "<u@[IPv6:fe80::1%eth0]>"):
        assert isinstance(parse_reverse_path(bad), Reply), bad
    refused = parse_forward_path("<u@[192.0.2.1]>")
    assert isinstance(refused, Reply) and refused.code == 553 and "literal" in refused.text


def test_smtputf8_addresses_need_the_parameter() -> None:
    # The local part stays as written; the domain takes its A-label form (relay.domains).
    assert parse_reverse_path("<jörg@exämple.com>", smtputf8=True) == "jörg@xn--exmple-cua.com"
    assert parse_forward_path("<用户@例子.广告>", smtputf8=True) == "用户@xn--fsqu00a.xn--4rr70v"
    assert isinstance(parse_forward_path("<a\u200bb@example.com>", smtputf8=True), Reply)
    long_local = "ä" * 33  # 66 octets in UTF-8, 33 characters
    assert isinstance(parse_forward_path(f"<{long_local}@example.com>", smtputf8=True), Reply)


def test_domain_and_path_length_limits() -> None:
    domain = ".".join(["a" * 63] * 3) + "." + "b" * 58  # 250 octets
    assert len(domain) <= MAX_DOMAIN
    assert parse_forward_path(f"<u@{domain}>") == f"u@{domain}"  # path: 254 octets
    longer = domain + "bbb"  # a 253-octet domain is fine, the 257-octet path is not
    refused = parse_forward_path(f"<u@{longer}>")
    assert isinstance(refused, Reply) and "Path longer" in refused.text


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("FROM:<a@b.example>", ("<a@b.example>", [])),
        ("from: <a@b.example>", ("<a@b.example>", [])),
        (
            "FROM:<a@b.example> SIZE=10 BODY=8BITMIME",
            ("<a@b.example>", ["SIZE=10", "BODY=8BITMIME"]),
        ),
        ('FROM:<"a b>c"@b.example> SMTPUTF8', ('<"a b>c"@b.example>', ["SMTPUTF8"])),
        ("FROM:<>", ("<>", [])),
    ],
)
def test_split_argument(arg: str, expected: tuple[str, list[str]]) -> None:
    assert split_argument(arg, "FROM:") == expected


@pytest.mark.parametrize(
    "arg", [None, "", "FROM", "TO:<a@b>", "FROM:a@b", "FROM:<a@b", "FROM:<a@b>X"]
)
def test_split_argument_syntax_errors(arg: str | None) -> None:
    reply = split_argument(arg, "FROM:")
    assert isinstance(reply, Reply) and reply.code == 501


def test_parse_params() -> None:
    assert parse_params(["size=10", "SMTPUTF8", "BODY=8BITMIME"]) == {
        "SIZE": "10",
        "SMTPUTF8": None,
        "BODY": "8BITMIME",
    }
    for bad in (["SIZE="], ["-X=1"], ["SIZE=1", "size=2"], ["X=a=b"], ["X=\x7f"]):
        assert isinstance(parse_params(bad), Reply), bad


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("FROM:<a@b.example>", MailCommand("a@b.example", (), False)),
        ("FROM:<> size=100 body=8bitmime", MailCommand("", ("SIZE=100", "BODY=8bitmime"), False)),
        ("FROM:<jörg@b.example> SMTPUTF8", MailCommand("jörg@b.example", ("SMTPUTF8",), True)),
        ("FROM:<a@b.example> SIZE=1000", MailCommand("a@b.example", ("SIZE=1000",), False)),
    ],
)
def test_parse_mail(arg: str, expected: MailCommand) -> None:
    assert parse_mail(arg, extended=True, max_size=1000) == expected


@pytest.mark.parametrize(
    ("arg", "code", "enhanced"),
    [
        ("FROM:<a@b.example> SIZE=1001", 552, "5.3.4"),
        ("FROM:<a@b.example> SIZE=big", 501, "5.5.4"),
        ("FROM:<a@b.example> BODY=BINARYMIME", 501, "5.5.4"),
        ("FROM:<a@b.example> SMTPUTF8=yes", 501, "5.5.4"),
        ("FROM:<a@b.example> RET=SOME", 501, "5.5.4"),
        ("FROM:<a@b.example> ENVID=a=b", 501, "5.5.4"),
        ("FROM:<a@b.example> XFOO=1", 555, "5.5.4"),
        ("FROM:<jörg@b.example>", 553, "5.6.7"),
        ("FROM:<@x.example:a@b.example>", 553, "5.1.7"),
    ],
)
def test_parse_mail_refusals(arg: str, code: int, enhanced: str) -> None:
    reply = parse_mail(arg, extended=True, max_size=1000)
    assert isinstance(reply, Reply) and (reply.code, reply.enhanced) == (code, enhanced)


def test_parameters_need_ehlo() -> None:
    reply = parse_mail("FROM:<a@b.example> SIZE=1", extended=False, max_size=1000)
    assert isinstance(reply, Reply) and reply.code == 555
    assert parse_mail("FROM:<a@b.example>", extended=False, max_size=1000) == MailCommand(
        "a@b.example", (), False
    )


def test_parse_rcpt() -> None:
    assert parse_rcpt("TO:<A@B.example>", extended=True, smtputf8=False) == ("A@b.example", [])
    assert parse_rcpt("TO:<ä@b.example>", extended=True, smtputf8=True) == ("ä@b.example", [])
    for arg, code in (("TO:<a@b.example> XFOO=1", 555), ("TO:<>", 501), ("FROM:<a@b>", 501)):
        reply = parse_rcpt(arg, extended=True, smtputf8=False)
        assert isinstance(reply, Reply) and reply.code == code, arg


def test_dsn_parameters_rfc_3461() -> None:
    """DSN is offered: RET/ENVID on MAIL, NOTIFY/ORCPT on RCPT, checked and kept."""
    got = parse_rcpt(
        "TO:<a@b.example> NOTIFY=failure,Success ORCPT=rfc822;a+40b.example",
        extended=True,
        smtputf8=False,
    )
    assert got == ("a@b.example", ["NOTIFY=FAILURE,SUCCESS", "ORCPT=rfc822;a+40b.example"])
    for bad in ("NOTIFY=NEVER,SUCCESS", "NOTIFY=SOMETIMES", "ORCPT=a@b", "ORCPT=rfc822;a=b"):
        reply = parse_rcpt(f"TO:<a@b.example> {bad}", extended=True, smtputf8=False)
        assert isinstance(reply, Reply) and reply.code == 501, bad
    mail = parse_mail("FROM:<a@b.example> RET=HDRS ENVID=QQ+2B1", extended=True, max_size=9)
    assert isinstance(mail, MailCommand) and mail.options == ("RET=HDRS", "ENVID=QQ+2B1")


# -- properties -------------------------------------------------------------------
ATOM = st.text(
    alphabet=string.ascii_letters + string.digits + "#$&'*+-/=?^_`{|}~", min_size=1, max_size=10
)
LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)


@given(
    local=st.lists(ATOM, min_size=1, max_size=4).map(".".join),
    labels=st.lists(LABEL, min_size=1, max_size=4),
)
def test_generated_valid_addresses_round_trip(local: str, labels: list[str]) -> None:
    domain = ".".join(labels)
    path = f"<{local}@{domain}>"
    parsed = parse_forward_path(path)
    if len(local) <= MAX_LOCAL_PART and len(path) <= MAX_PATH:
        assert parsed == f"{local}@{domain}"
        assert parse_forward_path(f"<{parsed}>") == parsed  # normal form is a fixed point
    else:
        assert isinstance(parsed, Reply)


@given(st.text(max_size=300), st.booleans())
def test_any_text_gives_address_or_reply(text: str, smtputf8: bool) -> None:
    for parsed in (
        parse_reverse_path(f"<{text}>", smtputf8=smtputf8),
        parse_forward_path(f"<{text}>", smtputf8=smtputf8),
    ):
        if isinstance(parsed, Reply):
            assert parsed.code in (501, 553)
            continue
        local = parsed.rpartition("@")[0]
        assert "%" not in local and "!" not in local
        assert not any(ch in parsed for ch in "\r\n\x00")
        assert len(f"<{parsed}>".encode()) <= MAX_PATH
        assert smtputf8 or parsed.isascii()


@given(st.text(max_size=200))
def test_split_argument_never_raises(text: str) -> None:
    result = split_argument("FROM:" + text, "FROM:")
    assert isinstance(result, (Reply, tuple))


@pytest.mark.parametrize(
    ("written", "normal"),
    [
        ("bücher.test", "xn--bcher-kva.test"),  # U-label
        ("BÜCHER.Test", "xn--bcher-kva.test"),  # U-label, mixed case
        ("XN--BCHER-KVA.test", "xn--bcher-kva.test"),  # A-label, upper case
        ("\uff42\u00fc\uff43\uff48\uff45\uff52\uff0etest", "xn--bcher-kva.test"),  # fullwidth
        ("\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com", "example.com"),  # fullwidth ASCII
    ],
)
def test_every_spelling_of_a_domain_is_one_recipient_domain(written: str, normal: str) -> None:
    """The policy bypass of issue 10: a spelling of a configured domain must reach intake's
    caller in the configured (A-label) form, or its policy is skipped."""
    assert parse_forward_path(f"<a@{written}>", smtputf8=True) == f"a@{normal}"


@pytest.mark.parametrize(
    ("written", "code"),
    [
        ("xn--zz.test", 553),  # an A-label that is not valid punycode
        ("\u0661\u0662\u0663.com", 553),  # bidi rule
        ("exa mple.com", 501),
        ("-a.com", 501),
    ],
)
def test_invalid_domains_are_refused_with_the_reason(written: str, code: int) -> None:
    refused = parse_forward_path(f"<a@{written}>", smtputf8=True)
    assert isinstance(refused, Reply) and refused.code == code, refused
    assert refused.enhanced == "5.1.3"
