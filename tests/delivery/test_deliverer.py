"""Deliverer against real local peers: Postfix as the good MX, and attack/fault peers.

MX "hosts" are distinct loopback addresses (127.0.0.1 = Postfix, 127.0.0.2/3 = test
peers) sharing one port, which is ``delivery.port``; a fake resolver maps names to them.
"""

from __future__ import annotations

import asyncio
import email
import hashlib
import logging
import re
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from relay.app import new_deliverer
from relay.config import DeliveryConfig, DomainPolicy, PolicyConfig, Route, RouteAuth, TlsLevel
from relay.delivery.deliverer import Deliverer
from relay.delivery.mx import DnssecState, MxHost, MxResult, MxStatus
from relay.delivery.outcome import Outcome, Status
from relay.delivery.pool import SessionPool
from relay.metrics import Metrics
from relay.tlspolicy.contexts import ClientContexts
from relay.tlspolicy.dane import Tlsa, TlsaSet, TlsaStatus
from relay.tlspolicy.mtasts import parse_policy
from relay.tlspolicy.ststore import StsState
from relay.tlsrpt import counts as tlsrpt_counts
from relay.tlsrpt.counts import TlsCounts
from tests.fixtures import badpeers
from tests.fixtures.badpeers import SmtpPeer, StripStartTlsProxy, server_context, start
from tests.fixtures.net import free_port
from tests.fixtures.postfix import PostfixMx, postfix_instance

PEER1, PEER2 = "127.0.0.2", "127.0.0.3"
MESSAGE = (
    b"From: App <app@src.test>\r\n"
    b"To: Someone <a@example.test>\r\n"
    b"Subject: quarterly report\r\n"
    b"Message-ID: <abc123@src.test>\r\n"
    b"X-Custom: kept as is\r\n"
    b"\r\n"
    b"Hello.\r\n"
    b".leading dot line\r\n"
)


class FakeResolver:
    """relay.mx.MxResolver's interface over fixed tables."""

    def __init__(
        self,
        mx: Mapping[str, Sequence[tuple[str, str]] | MxResult],
        hosts: Mapping[str, tuple[str, ...]] | None = None,
        tlsa: Mapping[str, TlsaSet] | None = None,
        secure: bool = False,
    ) -> None:
        self.mx = dict(mx)
        self.hosts = dict(hosts or {})
        self.tlsa_sets = dict(tlsa or {})  # host -> TLSA; any entry makes DNSSEC "on"
        self.secure = secure  # every answer DNSSEC-validated
        self.validated = bool(self.tlsa_sets) or secure
        self.dnssec_state = DnssecState.VALIDATING if self.validated else DnssecState.OFF

    async def ready(self) -> None:
        return None

    async def tlsa(self, host: str, port: int) -> TlsaSet:
        return self.tlsa_sets.get(host, TlsaSet(f"_{port}._tcp.{host}", TlsaStatus.ABSENT))

    async def resolve(self, domain: str) -> MxResult:
        entry = self.mx[domain]
        if isinstance(entry, MxResult):
            return entry
        hosts = tuple(
            MxHost(name, 10 * (n + 1), (ip,), secure=self.secure or name in self.tlsa_sets)
            for n, (name, ip) in enumerate(entry)
        )
        return MxResult(MxStatus.OK, hosts, "", secure=self.secure)

    async def addresses(self, host: str) -> tuple[str, ...]:
        return self.hosts.get(host, ())


def make_cfg(port: int, ca_file: Path, **kw: object) -> DeliveryConfig:
    base = DeliveryConfig(
        port=port, ca_file=ca_file, connect_timeout=5, command_timeout=10, attempt_deadline=30
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def policy(level: TlsLevel = TlsLevel.ENCRYPT, **domains: DomainPolicy) -> PolicyConfig:
    return PolicyConfig(default=DomainPolicy(level=level), domains=domains)


async def send(
    deliverer: Deliverer,
    rcpts: Sequence[str],
    domain: str = "example.test",
    data: bytes = MESSAGE,
    options: Sequence[str] = (),
) -> list[Outcome]:
    try:
        return await deliverer.deliver(
            "Q1", "app@src.test", options, domain, [(r, ()) for r in rcpts], data
        )
    finally:
        await deliverer.close()


async def send_each(deliverer: Deliverer, count: int, data: bytes = MESSAGE) -> list[Status]:
    """Message n to r<n>@example.test, one after the other over the deliverer's pool
    (closed after); each one's status."""
    statuses = []
    try:
        for n in range(count):
            out = await deliverer.deliver(
                f"Q{n}", "app@src.test", (), "example.test", [(f"r{n}@example.test", ())], data
            )
            statuses.append(out[0].status)
    finally:
        await deliverer.close()
    return statuses


# ---- delivery to a real Postfix -------------------------------------------------------


async def test_delivers_to_postfix_over_tls(postfix_mx: PostfixMx, ca_file: Path) -> None:
    resolver = FakeResolver({"example.test": [("mx.postfix.test", "127.0.0.1")]})
    d = new_deliverer(
        make_cfg(postfix_mx.port, ca_file), policy(), "relay.test", resolver, Metrics()
    )
    outcomes = await send(d, ["a@example.test", "b@example.test"])
    assert [o.status for o in outcomes] == [Status.DELIVERED, Status.DELIVERED]
    assert outcomes[0].mx_host == "mx.postfix.test" and outcomes[0].mx_ip == "127.0.0.1"
    assert outcomes[0].tls is not None and outcomes[0].tls.startswith("TLSv1.3 ")
    # Postfix offers CHUNKING and words its reply to BDAT (RFC 3030) its own way.
    assert re.search(r'"250 2\.0\.0 Ok: \d+ bytes queued as', outcomes[0].reason), outcomes[0]
    got = postfix_mx.wait_messages(2)
    assert sorted(m.recipient for m in got) == ["a@example.test", "b@example.test"]
    for m in got:
        assert m.message["Subject"] == "quarterly report"
        assert m.message["Message-ID"] == "<abc123@src.test>"
        assert m.message["X-Custom"] == "kept as is"
        assert m.return_path == "<app@src.test>"
        assert b"\n.leading dot line" in m.raw  # dot-stuffing undone by the MX
    log = postfix_mx.wait_log("TLS connection established")
    assert "nrcpt=2" in log  # one copy for the domain, two recipients on it
    assert postfix_mx.tls_sessions() == 1


async def test_mixed_recipient_replies(postfix_mx: PostfixMx, ca_file: Path) -> None:
    postfix_mx.set_access("later@example.test", "450 4.2.0 try later")
    postfix_mx.set_access("nobody@example.test", "550 5.1.1 no such user")
    resolver = FakeResolver({"example.test": [("mx.postfix.test", "127.0.0.1")]})
    d = new_deliverer(
        make_cfg(postfix_mx.port, ca_file), policy(), "relay.test", resolver, Metrics()
    )
    outcomes = await send(d, ["ok@example.test", "later@example.test", "nobody@example.test"])
    assert [o.recipient for o in outcomes] == [
        "ok@example.test",
        "later@example.test",
        "nobody@example.test",
    ]
    assert [o.status for o in outcomes] == [Status.DELIVERED, Status.TRANSIENT, Status.PERMANENT]
    assert outcomes[1].reason.startswith('"450 4.2.0 ')
    assert "try later" in outcomes[1].reason
    assert outcomes[2].reason.startswith('"550 5.1.1 ')
    assert f"from mx.postfix.test[127.0.0.1]:{postfix_mx.port}" in outcomes[2].reason
    assert [m.recipient for m in postfix_mx.wait_messages(1)] == ["ok@example.test"]


@pytest.mark.parametrize("chunking", [True, False], ids=["bdat", "data"])
async def test_all_recipients_refused_delivers_nothing(
    chunking: bool, ca: trustme.CA, ca_file: Path
) -> None:
    """Postfix offers PIPELINING and CHUNKING: MAIL, RCPT and BDAT with the small
    message go in one write (RFC 2920, RFC 3030 4.2).  With the only recipient refused,
    Postfix refuses the BDAT too and queues nothing; without CHUNKING it refuses DATA
    and no message data is sent.  The next transaction on the pooled session starts
    with RSET and is delivered."""
    main = {} if chunking else {"smtpd_discard_ehlo_keywords": "chunking"}
    with postfix_instance(ca, main=main) as mx:
        mx.set_access("nobody@example.test", "550 5.1.1 no such user")
        resolver = FakeResolver({"example.test": [("mx.postfix.test", "127.0.0.1")]})
        d = new_deliverer(make_cfg(mx.port, ca_file), policy(), "relay.test", resolver, Metrics())
        try:
            for rcpt, status in (("nobody", Status.PERMANENT), ("ok", Status.DELIVERED)):
                outcomes = await d.deliver(
                    "Q1",
                    "app@src.test",
                    (),
                    "example.test",
                    [(f"{rcpt}@example.test", ())],
                    MESSAGE,
                )
                assert [o.status for o in outcomes] == [status]
        finally:
            await d.close()
        log = mx.wait_log("quit=1")
        verb = "bdat" if chunking else "data"
        assert re.search(rf"mail=2 rcpt=1/2 {verb}=1/2 rset=1 quit=1 commands=\d+/\d+", log), log
        assert len(mx.wait_messages(1)) == 1


async def test_size_limit_of_postfix_is_permanent(ca: trustme.CA, ca_file: Path) -> None:
    with postfix_instance(ca, main={"message_size_limit": "4096"}) as mx:
        resolver = FakeResolver({"example.test": [("mx.postfix.test", "127.0.0.1")]})
        d = new_deliverer(make_cfg(mx.port, ca_file), policy(), "relay.test", resolver, Metrics())
        big = MESSAGE + b"x" * 8000 + b"\r\n"
        outcomes = await send(d, ["a@example.test"], data=big)
        assert outcomes[0].status is Status.PERMANENT
        assert "exceeds the limit of 4096 bytes" in outcomes[0].reason
        assert "from=<app@src.test>" not in mx.log_text()  # MAIL was never sent


async def test_connection_reuse_with_postfix(postfix_mx: PostfixMx, ca_file: Path) -> None:
    resolver = FakeResolver({"example.test": [("mx.postfix.test", "127.0.0.1")]})
    d = new_deliverer(
        make_cfg(postfix_mx.port, ca_file), policy(), "relay.test", resolver, Metrics()
    )
    assert await send_each(d, 2) == [Status.DELIVERED] * 2
    postfix_mx.wait_messages(2)
    assert postfix_mx.tls_sessions() == 1
    postfix_mx.wait_log("mail=2")  # two transactions in one session, RSET between


# ---- attack and fault peers ------------------------------------------------------------


def _fault_peer(kind: str, port: int, ca: trustme.CA) -> SmtpPeer:
    if kind == "tls1.0-only":
        tls10 = server_context(ca.issue_cert("mx1.example.test"), ssl.TLSVersion.TLSv1)
        return SmtpPeer(PEER1, port, tls_context=tls10, handshake_only=True)
    mode = {"no-starttls": "none", "starttls-454": "refuse", "garbage-handshake": "garbage"}
    return SmtpPeer(PEER1, port, starttls=mode[kind])


TLS10_WARNING = "ignore:ssl.TLSVersion.TLSv1 is deprecated:DeprecationWarning"


@pytest.mark.filterwarnings(TLS10_WARNING)
@pytest.mark.parametrize(
    ("kind", "why"),
    [
        ("no-starttls", "STARTTLS not offered"),
        ("starttls-454", "454"),
        ("garbage-handshake", "handshake"),
        ("tls1.0-only", "TLS handshake with MX failed: TLSV1_ALERT_PROTOCOL_VERSION"),
    ],
)
async def test_attack_peer_defers_then_next_mx_gets_mail(
    kind: str, why: str, postfix_mx: PostfixMx, ca: trustme.CA, ca_file: Path, peers: list
) -> None:
    peer = await start(peers, _fault_peer(kind, postfix_mx.port, ca))
    resolver = FakeResolver(
        {
            "bad.test": [("mx1.example.test", PEER1)],
            "example.test": [("mx1.example.test", PEER1), ("mx.postfix.test", "127.0.0.1")],
        }
    )
    cfg = make_cfg(postfix_mx.port, ca_file)
    only_bad = await send(
        new_deliverer(cfg, policy(), "relay.test", resolver, Metrics()), ["a@bad.test"], "bad.test"
    )
    assert only_bad[0].status is Status.TRANSIENT
    assert why in only_bad[0].reason and "mx1.example.test" in only_bad[0].reason
    outcomes = await send(
        new_deliverer(cfg, policy(), "relay.test", resolver, Metrics()), ["a@example.test"]
    )
    assert outcomes[0].status is Status.DELIVERED
    assert outcomes[0].mx_host == "mx.postfix.test"
    assert peer.connections == 2
    assert not peer.plaintext_mail, peer.commands
    assert "MAIL" not in peer.verbs()
    assert postfix_mx.wait_messages(1)[0].recipient == "a@example.test"


@pytest.mark.filterwarnings(TLS10_WARNING)
async def test_tls10_peer_really_speaks_tls10(ca: trustme.CA, peers: list) -> None:
    """The TLS 1.0 peer works for a client that allows TLS 1.0, so the failure above is
    the protocol floor, not a broken peer."""
    port = free_port(PEER1)
    await start(peers, _fault_peer("tls1.0-only", port, ca))
    reader, writer = await asyncio.open_connection(PEER1, port)
    await reader.readline()
    writer.write(b"EHLO t\r\n")
    while (await reader.readline())[3:4] == b"-":
        pass
    writer.write(b"STARTTLS\r\n")
    assert (await reader.readline()).startswith(b"220")
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    await writer.start_tls(ctx)
    assert writer.get_extra_info("ssl_object").version() == "TLSv1"
    writer.close()


async def test_starttls_stripping_proxy_is_refused(
    postfix_mx: PostfixMx, ca_file: Path, peers: list
) -> None:
    proxy = await start(
        peers, StripStartTlsProxy(PEER1, postfix_mx.port, ("127.0.0.1", postfix_mx.port))
    )
    resolver = FakeResolver(
        {"example.test": [("mx1.example.test", PEER1), ("mx.postfix.test", "127.0.0.1")]}
    )
    d = new_deliverer(
        make_cfg(postfix_mx.port, ca_file), policy(), "relay.test", resolver, Metrics()
    )
    outcomes = await send(d, ["a@example.test"])
    assert outcomes[0].status is Status.DELIVERED and outcomes[0].mx_host == "mx.postfix.test"
    assert proxy.connections == 1
    assert proxy.verbs() == ["EHLO", "QUIT"], proxy.commands  # downgrade noticed, no MAIL
    assert not proxy.plaintext_mail
    assert postfix_mx.wait_messages(1)[0].recipient == "a@example.test"


async def test_all_mx_fail_reasons_joined(ca: trustme.CA, ca_file: Path, peers: list) -> None:
    port = free_port(PEER1)
    p1 = await start(peers, SmtpPeer(PEER1, port, starttls="none"))
    p2 = await start(peers, SmtpPeer(PEER2, port, starttls="refuse"))
    resolver = FakeResolver(
        {"example.test": [("mx1.example.test", PEER1), ("mx2.example.test", PEER2)]}
    )
    d = new_deliverer(make_cfg(port, ca_file), policy(), "relay.test", resolver, Metrics())
    outcomes = await send(d, ["a@example.test", "b@example.test"])
    assert {o.status for o in outcomes} == {Status.TRANSIENT}
    assert "mx1.example.test" in outcomes[0].reason and "mx2.example.test" in outcomes[0].reason
    assert not p1.plaintext_mail and not p2.plaintext_mail


# ---- certificates under verify / secure -------------------------------------------------


def _cert(kind: str, ca: trustme.CA) -> trustme.LeafCert | tuple[bytes, bytes]:
    if kind == "good":
        return ca.issue_cert("mx1.example.test")
    if kind == "expired":
        return badpeers.expired(ca, "mx1.example.test")
    if kind == "self-signed":
        return badpeers.self_signed("mx1.example.test")
    if kind == "untrusted-ca":
        return trustme.CA().issue_cert("mx1.example.test")
    assert kind == "wrong-name"
    return ca.issue_cert("mail.elsewhere.test")


@pytest.mark.parametrize(
    ("kind", "level", "match", "expected", "why"),
    [
        ("good", TlsLevel.VERIFY, (), Status.DELIVERED, ""),
        ("expired", TlsLevel.VERIFY, (), Status.TRANSIENT, "expired"),
        ("self-signed", TlsLevel.VERIFY, (), Status.TRANSIENT, "self-signed"),
        ("untrusted-ca", TlsLevel.VERIFY, (), Status.TRANSIENT, "unable to get local issuer"),
        ("wrong-name", TlsLevel.VERIFY, (), Status.TRANSIENT, "do not match MX host"),
        ("good", TlsLevel.SECURE, (), Status.TRANSIENT, "match none of"),
        ("good", TlsLevel.SECURE, (".example.test",), Status.DELIVERED, ""),
        (
            "wrong-name",
            TlsLevel.SECURE,
            (".example.test",),
            Status.TRANSIENT,
            "mail.elsewhere.test",
        ),
        ("self-signed", TlsLevel.ENCRYPT, (), Status.DELIVERED, ""),
        ("expired", TlsLevel.ENCRYPT, (), Status.DELIVERED, ""),
    ],
)
async def test_certificate_checks(
    kind: str,
    level: TlsLevel,
    match: tuple[str, ...],
    expected: Status,
    why: str,
    ca: trustme.CA,
    ca_file: Path,
    peers: list,
) -> None:
    port = free_port(PEER1)
    peer = await start(peers, SmtpPeer(PEER1, port, tls_context=server_context(_cert(kind, ca))))
    pol = policy(**{"example.test": DomainPolicy(level=level, match=match)})
    resolver = FakeResolver({"example.test": [("mx1.example.test", PEER1)]})
    outcomes = await send(
        new_deliverer(make_cfg(port, ca_file), pol, "relay.test", resolver, Metrics()),
        ["a@example.test"],
    )
    assert outcomes[0].status is expected, outcomes[0].reason
    assert why in outcomes[0].reason
    assert not peer.plaintext_mail
    if expected is Status.TRANSIENT:
        assert "MAIL" not in peer.verbs()
    else:
        assert len(peer.messages) == 1


# ---- transaction details -----------------------------------------------------------------


def extensions(pipelining: bool) -> tuple[str, ...]:
    """The test peer's EHLO keywords; with PIPELINING, transact sends [RSET,] MAIL,
    RCPT... and DATA in one write (RFC 2920), else one command per round trip."""
    return ("8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES") + ("PIPELINING",) * pipelining


async def _tls_peer(peers: list, ca: trustme.CA, **kw: object) -> SmtpPeer:
    port = free_port(PEER1)
    ctx = server_context(ca.issue_cert("mx1.example.test"))
    return await start(peers, SmtpPeer(PEER1, port, tls_context=ctx, **kw))  # type: ignore[arg-type]


async def test_advertised_size_is_respected(ca: trustme.CA, ca_file: Path, peers: list) -> None:
    peer = await _tls_peer(peers, ca, size=100)
    resolver = FakeResolver({"example.test": [("mx1.example.test", PEER1)]})
    d = new_deliverer(make_cfg(peer.port, ca_file), policy(), "relay.test", resolver, Metrics())
    outcomes = await send(d, ["a@example.test", "b@example.test"])
    assert [o.status for o in outcomes] == [Status.PERMANENT, Status.PERMANENT]
    assert "exceeds the limit of 100 bytes" in outcomes[0].reason
    assert "MAIL" not in peer.verbs()


@pytest.mark.parametrize("ext", [("8BITMIME",), ()])
async def test_smtputf8_needed_but_missing(
    ext: tuple[str, ...], ca: trustme.CA, ca_file: Path, peers: list
) -> None:
    """Issue 15: only a message that really uses UTF-8 (address or header) needs a next
    hop with SMTPUTF8; one that merely declared it goes without, as Postfix sends it.
    Without 8BITMIME too, the refusal still names SMTPUTF8 (it used to blame 8BITMIME,
    since UTF-8 headers cannot be made 7-bit)."""
    peer = await _tls_peer(peers, ca, extensions=ext)
    resolver = FakeResolver({"example.test": [("mx1.example.test", PEER1)]})
    cfg = make_cfg(peer.port, ca_file)
    options = ["SMTPUTF8", "BODY=8BITMIME"]
    utf8_header = b"Subject: Gr\xc3\xbc\xc3\x9fe\r\n" + MESSAGE
    for rcpt, data in (("ü@example.test", MESSAGE), ("a@example.test", utf8_header)):
        d = new_deliverer(cfg, policy(), "relay.test", resolver, Metrics())
        (outcome,) = await send(d, [rcpt], data=data, options=options)
        assert outcome.status is Status.PERMANENT and outcome.status_code == "5.6.7"
        assert "destination lacks SMTPUTF8" in outcome.reason
    assert "MAIL" not in peer.verbs()
    d = new_deliverer(cfg, policy(), "relay.test", resolver, Metrics())
    (outcome,) = await send(d, ["a@example.test"], options=options)
    assert outcome.status is Status.DELIVERED, outcome.reason
    mail = next(c.line for c in peer.commands if c.verb == "MAIL")
    assert mail == "MAIL FROM:<app@src.test>" + " BODY=8BITMIME" * bool(ext)


async def test_options_carried(ca: trustme.CA, ca_file: Path, peers: list) -> None:
    peer = await _tls_peer(peers, ca, size=100000)
    resolver = FakeResolver({"example.test": [("mx1.example.test", PEER1)]})
    d = new_deliverer(make_cfg(peer.port, ca_file), policy(), "relay.test", resolver, Metrics())
    outcomes = await send(d, ["ü@example.test"], options=["SMTPUTF8", "BODY=8BITMIME", "SIZE=1"])
    assert outcomes[0].status is Status.DELIVERED, outcomes[0].reason
    mail = next(c.line for c in peer.commands if c.verb == "MAIL")
    assert mail == f"MAIL FROM:<app@src.test> SIZE={len(MESSAGE)} SMTPUTF8 BODY=8BITMIME"
    assert peer.messages[0].recipients == ["ü@example.test"]


@pytest.mark.parametrize("pipelining", [False, True])
async def test_connection_reuse_one_tcp_connection(
    ca: trustme.CA, ca_file: Path, peers: list, pipelining: bool
) -> None:
    peer = await _tls_peer(peers, ca, extensions=extensions(pipelining))
    resolver = FakeResolver({"example.test": [("mx1.example.test", PEER1)]})
    d = new_deliverer(make_cfg(peer.port, ca_file), policy(), "relay.test", resolver, Metrics())
    try:
        for n in range(3):
            out = await d.deliver(
                f"Q{n}", "app@src.test", (), "example.test", [(f"r{n}@example.test", ())], MESSAGE
            )
            assert out[0].status is Status.DELIVERED
    finally:
        await d.close()
    assert peer.connections == 1
    assert len(peer.messages) == 3
    assert peer.verbs().count("RSET") == 2 and peer.verbs()[-1] == "QUIT"
    assert peer.verbs(tls=False) == ["EHLO", "STARTTLS"]
    # One write per group: [RSET,] MAIL, RCPT were followed by buffered input; DATA ended it.
    group = ["MAIL", "RCPT"] + ["RSET", "MAIL", "RCPT"] * 2
    assert peer.pipelined == (group if pipelining else [])


@pytest.mark.parametrize("pipelining", [False, True])
async def test_reuse_limit_and_dead_pooled_connection(
    ca: trustme.CA, ca_file: Path, peers: list, pipelining: bool
) -> None:
    peer = await _tls_peer(peers, ca, extensions=extensions(pipelining))
    resolver = FakeResolver({"example.test": [("mx1.example.test", PEER1)]})
    cfg = make_cfg(peer.port, ca_file, max_messages_per_connection=2)
    d = new_deliverer(cfg, policy(), "relay.test", resolver, Metrics())
    try:
        for n in range(3):  # 2 on the first connection, then a new one
            out = await d.deliver(
                f"Q{n}", "app@src.test", (), "example.test", [(f"r{n}@example.test", ())], MESSAGE
            )
            assert out[0].status is Status.DELIVERED
        assert peer.connections == 2
        for writer in list(peer._writers):  # the MX drops the idle pooled session
            writer.close()
        await asyncio.sleep(0.2)
        out = await d.deliver(
            "Q9", "app@src.test", (), "example.test", [("r9@example.test", ())], MESSAGE
        )
        assert out[0].status is Status.DELIVERED  # a fresh session, no failure
    finally:
        await d.close()
    assert peer.connections == 3 and len(peer.messages) == 4


@pytest.mark.parametrize("chunking", [False, True], ids=["data", "bdat"])
async def test_a_session_replacing_a_dead_pooled_one_is_counted_for_tls_reports(
    ca: trustme.CA, ca_file: Path, peers: list, tmp_path: Path, chunking: bool
) -> None:
    """RFC 8460 counts every TLS session: the fresh one opened because the pooled
    session answered RSET with 421 and closed is counted too (it used not to be)."""
    ext = extensions(True) + ("CHUNKING",) * chunking
    peer = await _tls_peer(peers, ca, extensions=ext, rset_reply="421 4.4.2 idle too long")
    resolver = FakeResolver({"example.test": [("mx1.example.test", PEER1)]})
    reports = TlsCounts(tmp_path)
    reports.setup()
    cfg = make_cfg(peer.port, ca_file)
    d = new_deliverer(cfg, policy(), "relay.test", resolver, Metrics(), reports=reports)
    assert await send_each(d, 2) == [Status.DELIVERED] * 2
    reports.flush()
    (day,) = tlsrpt_counts.days(tmp_path)
    (counted,) = tlsrpt_counts.load_day(tmp_path, day)["example.test"]
    assert peer.connections == 2 and counted.success == 2 and not counted.failures


async def test_reuse_off(ca: trustme.CA, ca_file: Path, peers: list) -> None:
    peer = await _tls_peer(peers, ca)
    resolver = FakeResolver({"example.test": [("mx1.example.test", PEER1)]})
    d = new_deliverer(
        make_cfg(peer.port, ca_file, connection_reuse=False),
        policy(),
        "r.test",
        resolver,
        Metrics(),
    )
    for n in range(2):
        await d.deliver(
            f"Q{n}", "a@src.test", (), "example.test", [("r@example.test", ())], MESSAGE
        )
    await d.close()
    assert peer.connections == 2


async def test_tarpit_bounded_by_attempt_deadline(
    ca: trustme.CA, ca_file: Path, peers: list
) -> None:
    port = free_port(PEER1)
    await start(peers, SmtpPeer(PEER1, port, starttls="none", tarpit=0.2))
    resolver = FakeResolver({"example.test": [("mx1.example.test", PEER1)]})
    cfg = make_cfg(port, ca_file, command_timeout=60, attempt_deadline=1.0)
    started = time.monotonic()
    outcomes = await send(
        new_deliverer(cfg, policy(), "relay.test", resolver, Metrics()), ["a@example.test"]
    )
    assert time.monotonic() - started < 3
    assert outcomes[0].status is Status.TRANSIENT
    assert "attempt deadline of 1s exceeded" in outcomes[0].reason
    assert "greeting from mx1.example.test" in outcomes[0].reason


async def test_command_timeout(ca: trustme.CA, ca_file: Path, peers: list) -> None:
    port = free_port(PEER1)
    await start(peers, SmtpPeer(PEER1, port, starttls="none", tarpit=0.5))
    resolver = FakeResolver({"example.test": [("mx1.example.test", PEER1)]})
    cfg = make_cfg(port, ca_file, command_timeout=0.3, attempt_deadline=10)
    outcomes = await send(
        new_deliverer(cfg, policy(), "relay.test", resolver, Metrics()), ["a@example.test"]
    )
    assert outcomes[0].status is Status.TRANSIENT
    assert "greeting" in outcomes[0].reason


async def test_connect_refused_tries_next(ca: trustme.CA, ca_file: Path, peers: list) -> None:
    peer = await _tls_peer(peers, ca)
    resolver = FakeResolver(
        {"example.test": [("mx0.example.test", PEER2), ("mx1.example.test", PEER1)]}
    )
    d = new_deliverer(make_cfg(peer.port, ca_file), policy(), "relay.test", resolver, Metrics())
    outcomes = await send(d, ["a@example.test"])
    assert outcomes[0].status is Status.DELIVERED and outcomes[0].mx_ip == PEER1


@pytest.mark.parametrize("status", [MxStatus.PERMANENT, MxStatus.TRANSIENT])
async def test_mx_lookup_failures(status: MxStatus, ca_file: Path) -> None:
    resolver = FakeResolver({"gone.test": MxResult(status, (), "domain gone.test: lookup said so")})
    d = new_deliverer(make_cfg(25, ca_file), policy(), "relay.test", resolver, Metrics())
    outcomes = await send(d, ["a@gone.test", "b@gone.test"], "gone.test")
    expected = Status.PERMANENT if status is MxStatus.PERMANENT else Status.TRANSIENT
    assert [o.status for o in outcomes] == [expected, expected]
    assert outcomes[1].reason == "domain gone.test: lookup said so"


async def test_route_implicit_tls_with_auth(ca: trustme.CA, ca_file: Path, peers: list) -> None:
    peer = await _tls_peer(peers, ca, implicit_tls=True, starttls="none")
    route = Route(
        ("partner.test",),
        "hop.partner.test",
        peer.port,
        implicit_tls=True,
        auth=RouteAuth("relayuser", "s3cret"),
    )
    resolver = FakeResolver({}, {"hop.partner.test": (PEER1,)})
    cfg = make_cfg(1, ca_file, routes=(route,))
    pol = policy(**{"partner.test": DomainPolicy(level=TlsLevel.VERIFY)})
    outcomes = await send(
        new_deliverer(cfg, pol, "relay.test", resolver, Metrics()),
        ["a@partner.test"],
        "partner.test",
    )
    # the hop's cert says mx1.example.test, not hop.partner.test: verify fails closed
    assert outcomes[0].status is Status.TRANSIENT and "hop.partner.test" in outcomes[0].reason
    assert peer.auth == []
    ok = policy(**{"partner.test": DomainPolicy(level=TlsLevel.ENCRYPT)})
    outcomes = await send(
        new_deliverer(cfg, ok, "relay.test", resolver, Metrics()),
        ["a@partner.test"],
        "partner.test",
    )
    assert outcomes[0].status is Status.DELIVERED, outcomes[0].reason
    assert peer.auth == ["\0relayuser\0s3cret"]
    assert all(c.tls for c in peer.commands)


async def test_log_line_per_attempt(
    ca: trustme.CA, ca_file: Path, peers: list, caplog: pytest.LogCaptureFixture
) -> None:
    peer = await _tls_peer(peers, ca)
    resolver = FakeResolver({"example.test": [("mx1.example.test", PEER1)]})
    pol = policy(**{"example.test": DomainPolicy(level=TlsLevel.VERIFY)})
    d = new_deliverer(make_cfg(peer.port, ca_file), pol, "relay.test", resolver, Metrics())
    with caplog.at_level(logging.INFO, logger="relay.delivery"):
        await send(d, ["a@example.test", "b@example.test"])
    lines = [r.getMessage() for r in caplog.records if r.name == "relay.delivery"]
    assert len(lines) == 1
    line = lines[0]
    assert line.startswith("delivery queue_id=Q1 rcpt=a@example.test,b@example.test ")
    for part in (
        "mx=mx1.example.test",
        f"ip={PEER1}",
        "tls=TLSv1.3",
        "cipher=TLS_",
        "cert_sha256=",
        "level_required=verify",
        "level_met=verify",
        "outcome=delivered",
    ):
        assert part in line


@pytest.mark.parametrize("server", ["self-signed", "plaintext"])
async def test_route_implicit_tls_handshake_failure(
    server: str, ca: trustme.CA, ca_file: Path, peers: list
) -> None:
    port = free_port(PEER1)
    if server == "plaintext":  # a plain SMTP server where implicit TLS was configured
        peer = await start(peers, SmtpPeer(PEER1, port, starttls="none"))
    else:
        ctx = server_context(badpeers.self_signed("hop.partner.test"))
        peer = await start(peers, SmtpPeer(PEER1, port, tls_context=ctx, implicit_tls=True))
    route = Route(("partner.test",), "[hop.partner.test]", port, implicit_tls=True)
    resolver = FakeResolver({}, {"hop.partner.test": (PEER1,)})
    cfg = make_cfg(1, ca_file, routes=(route,), command_timeout=2)
    pol = policy(TlsLevel.VERIFY)
    outcomes = await send(
        new_deliverer(cfg, pol, "relay.test", resolver, Metrics()),
        ["a@partner.test"],
        "partner.test",
    )
    assert outcomes[0].status is Status.TRANSIENT
    assert "hop.partner.test[127.0.0.2]" in outcomes[0].reason
    assert not peer.plaintext_mail and "MAIL" not in peer.verbs()


async def test_concurrency_limits(ca: trustme.CA, ca_file: Path, peers: list) -> None:
    peer = await _tls_peer(peers, ca)
    resolver = FakeResolver({"example.test": [("mx1.example.test", PEER1)]})
    cfg = make_cfg(peer.port, ca_file, per_domain_concurrency=2, connection_reuse=False)
    d = new_deliverer(cfg, policy(), "relay.test", resolver, Metrics())
    try:
        results = await asyncio.gather(
            *(
                d.deliver(
                    f"Q{n}", "a@src.test", (), "example.test", [("r@example.test", ())], MESSAGE
                )
                for n in range(6)
            )
        )
    finally:
        await d.close()
    assert all(r[0].status is Status.DELIVERED for r in results)
    assert peer.connections == 6 and peer.max_active <= 2


# Peer replies -> the two recipients' statuses and how many messages the peer kept.
ENVELOPE_REPLIES: list[tuple[dict[str, Any], list[Status], int]] = [
    ({"mail_reply": "550 5.7.1 sender rejected"}, [Status.PERMANENT] * 2, 0),
    ({"mail_reply": "451 4.3.0 try again"}, [Status.TRANSIENT] * 2, 0),
    ({"data_reply": "554 5.6.0 content rejected"}, [Status.PERMANENT] * 2, 0),
    ({"data_reply": "452 4.3.1 out of space"}, [Status.TRANSIENT] * 2, 0),
    ({"rcpt_replies": {"b@example.test": "421 4.3.2 closing"}}, [Status.TRANSIENT] * 2, 0),
]


@pytest.mark.parametrize(("kw", "expected", "delivered_to_peer"), ENVELOPE_REPLIES)
@pytest.mark.parametrize("pipelining", [False, True])
async def test_envelope_and_data_replies(
    kw: dict,
    expected: list[Status],
    delivered_to_peer: int,
    ca: trustme.CA,
    ca_file: Path,
    peers: list,
    pipelining: bool,
) -> None:
    peer = await _tls_peer(peers, ca, extensions=extensions(pipelining), **kw)
    resolver = FakeResolver({"example.test": [("mx1.example.test", PEER1)]})
    d = new_deliverer(make_cfg(peer.port, ca_file), policy(), "relay.test", resolver, Metrics())
    outcomes = await send(d, ["a@example.test", "b@example.test"])
    assert [o.status for o in outcomes] == expected
    reply = next(iter(kw.values()))
    code = (reply if isinstance(reply, str) else next(iter(reply.values())))[:3]
    assert all(f'"{code} ' in o.reason for o in outcomes), outcomes
    assert len(peer.messages) == delivered_to_peer


@pytest.mark.parametrize("chunking", [False, True], ids=["data", "bdat"])
@pytest.mark.parametrize("pipelining", [False, True])
async def test_a_stray_2xx_to_rcpt_is_decided_by_the_data_reply(
    ca: trustme.CA, ca_file: Path, peers: list, pipelining: bool, chunking: bool
) -> None:
    """A 252 to RCPT (a VRFY code, but 2xx): the recipient is sent the message and the
    reply to the data decides it - it used to count as delivered with no data sent."""
    ext = extensions(pipelining) + ("CHUNKING",) * chunking
    peer = await _tls_peer(
        peers, ca, extensions=ext, rcpt_replies={"a@example.test": "252 2.1.5 will try"}
    )
    resolver = FakeResolver({"example.test": [("mx1.example.test", PEER1)]})
    d = new_deliverer(make_cfg(peer.port, ca_file), policy(), "relay.test", resolver, Metrics())
    (outcome,) = await send(d, ["a@example.test"])
    assert outcome.status is Status.DELIVERED and '"250 ' in outcome.reason, outcome.reason
    assert [m.recipients for m in peer.messages] == [["a@example.test"]]


async def test_idle_pooled_session_is_quit_after_the_idle_timeout(
    ca: trustme.CA, ca_file: Path, peers: list
) -> None:
    """One sweeper timer for the pool retires sessions idle for its idle timeout."""
    peer = await _tls_peer(peers, ca, extensions=extensions(True))
    resolver = FakeResolver({"example.test": [("mx1.example.test", PEER1)]})
    cfg = make_cfg(peer.port, ca_file)
    pool = SessionPool(cfg.per_domain_concurrency, idle_timeout=0.3)
    contexts = ClientContexts(cfg.ca_file)
    d = Deliverer(cfg, policy(), "relay.test", resolver, contexts, pool, Metrics())
    try:
        out = await d.deliver(
            "Q1", "app@src.test", (), "example.test", [("a@example.test", ())], MESSAGE
        )
        assert out[0].status is Status.DELIVERED
        assert "QUIT" not in peer.verbs()  # pooled, not closed
        for _ in range(50):  # bounded: 5 s
            if "QUIT" in peer.verbs():
                break
            await asyncio.sleep(0.1)
        assert peer.verbs()[-1] == "QUIT"
    finally:
        await d.close()


@pytest.mark.parametrize("pipelining", [False, True])
async def test_reply_timeout_in_the_transaction(
    ca: trustme.CA, ca_file: Path, peers: list, pipelining: bool
) -> None:
    peer = await _tls_peer(peers, ca, extensions=extensions(pipelining), mail_delay=2.0)
    resolver = FakeResolver({"example.test": [("mx1.example.test", PEER1)]})
    cfg = make_cfg(peer.port, ca_file, command_timeout=0.3, attempt_deadline=10)
    outcomes = await send(
        new_deliverer(cfg, policy(), "relay.test", resolver, Metrics()), ["a@example.test"]
    )
    assert outcomes[0].status is Status.TRANSIENT
    assert "Timed out waiting for server response" in outcomes[0].reason, outcomes[0].reason
    assert peer.messages == []


# ---- DANE over MTA-STS (RFC 8461 2) ---------------------------------------------------------


class FixedSts:
    """StsPolicies' interface: one state for every domain."""

    def __init__(self, state: StsState) -> None:
        self.state = state

    async def for_domain(self, domain: str) -> StsState:
        return self.state

    async def close(self) -> None:
        return None


def postfix_ee_tlsa(mx: PostfixMx) -> Tlsa:
    leaf = x509.load_pem_x509_certificates((mx.conf / "mx.pem").read_bytes())[0]
    spki = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Tlsa(3, 1, 1, hashlib.sha256(spki).digest())


async def test_dane_host_is_not_subject_to_an_mta_sts_policy(
    postfix_mx: PostfixMx, ca_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The MTA-STS policy names no host of the domain; with a secure, matching TLSA RRset
    the MX is a DANE host and gets the mail; without one, MTA-STS defers."""
    enforce = parse_policy(b"version: STSv1\nmode: enforce\nmx: *.elsewhere.test\nmax_age: 86400\n")
    sts = FixedSts(StsState(enforce, id="7", origin="cache"))
    name = f"_{postfix_mx.port}._tcp.mx.postfix.test"
    cases = {
        TlsaStatus.SECURE: (Status.DELIVERED, "policy=dane"),
        TlsaStatus.ABSENT: (Status.TRANSIENT, "allows none of its MX hosts"),
    }
    for status, (want, text) in cases.items():
        records = (postfix_ee_tlsa(postfix_mx),) if status is TlsaStatus.SECURE else ()
        resolver = FakeResolver(
            {"example.test": [("mx.postfix.test", "127.0.0.1")]},
            tlsa={"mx.postfix.test": TlsaSet(name, status, records)},
        )
        d = new_deliverer(
            make_cfg(postfix_mx.port, ca_file), policy(), "relay.test", resolver, Metrics()
        )
        d._sts = sts  # type: ignore[assignment]
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="relay.delivery"):
            (outcome,) = await send(d, ["a@example.test"])
        await d.close()
        assert outcome.status is want
        assert text in caplog.text + outcome.reason
    assert len(postfix_mx.wait_messages(1)) == 1


async def test_8bit_message_converted_for_a_next_hop_without_8bitmime(
    ca: trustme.CA, ca_file: Path, peers: list
) -> None:
    """Issue 15 / RFC 6152 §3: not bounced, but sent as 7 bit (as Postfix does)."""
    peer = await _tls_peer(peers, ca, extensions=("ENHANCEDSTATUSCODES",))
    resolver = FakeResolver({"example.test": [("mx1.example.test", PEER1)]})
    d = new_deliverer(make_cfg(peer.port, ca_file), policy(), "relay.test", resolver, Metrics())
    data = b"From: a@src.test\r\nSubject: hi\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n"
    (outcome,) = await send(d, ["a@example.test"], data=data, options=["BODY=8BITMIME"])
    assert outcome.status is Status.DELIVERED, outcome.reason
    mail = next(c.line for c in peer.commands if c.verb == "MAIL")
    assert mail == "MAIL FROM:<app@src.test>"
    got = peer.messages[0].data
    assert got.isascii() and b"Content-Transfer-Encoding: quoted-printable" in got
    body = email.message_from_bytes(got.removesuffix(b".\r\n")).get_payload(decode=True)
    assert body == b"Gr\xc3\xbc\xc3\x9fe\r\n"
