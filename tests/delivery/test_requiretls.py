"""REQUIRETLS (RFC 8689) in delivery, against real peers: a scripted MX that offers
REQUIRETLS, Debian's Postfix (which does not), and an MX with a certificate no CA
vouches for.  A REQUIRETLS message goes only over an authenticated session to an MX
found through DNSSEC (or MTA-STS enforce) that offers it, with the parameter passed
on; otherwise the recipients fail with 5.7.30 - and no MAIL reaches a peer.  Also
`TLS-Required: No` (RFC 8689 4.2.2)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from relay.app import new_deliverer
from relay.config import DomainPolicy, TlsLevel
from relay.delivery.outcome import Status
from relay.metrics import Metrics
from relay.tlspolicy.dane import Tlsa, TlsaSet, TlsaStatus
from tests.delivery.test_deliverer import (
    MESSAGE,
    PEER1,
    PEER2,
    FakeResolver,
    _tls_peer,
    make_cfg,
    policy,
    send,
)
from tests.fixtures.badpeers import SmtpPeer, self_signed, server_context, start
from tests.fixtures.net import free_port
from tests.fixtures.postfix import PostfixMx

REQUIRETLS = ["REQUIRETLS"]
EXTENSIONS = ("8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "REQUIRETLS")
MX = {"example.test": [("mx1.example.test", PEER1)]}


async def test_delivered_with_the_parameter_to_an_authenticated_mx_that_offers_it(
    ca: trustme.CA, ca_file: Path, peers: list
) -> None:
    peer = await _tls_peer(peers, ca, extensions=EXTENSIONS)
    d = new_deliverer(
        make_cfg(peer.port, ca_file),
        policy(),
        "relay.test",
        FakeResolver(MX, secure=True),
        Metrics(),
    )
    (outcome,) = await send(d, ["a@example.test"], options=REQUIRETLS)
    assert outcome.status is Status.DELIVERED, outcome.reason
    mail = next(c.line for c in peer.commands if c.verb == "MAIL")
    assert mail.endswith(" REQUIRETLS")
    assert outcome.evidence is not None and outcome.evidence.level_required == "verify"


async def test_an_mx_without_requiretls_gets_no_mail_and_the_message_is_returned(
    postfix_mx: PostfixMx, ca_file: Path
) -> None:
    resolver = FakeResolver({"example.test": [("mx.postfix.test", "127.0.0.1")]}, secure=True)
    d = new_deliverer(
        make_cfg(postfix_mx.port, ca_file), policy(), "relay.test", resolver, Metrics()
    )
    (outcome,) = await send(d, ["a@example.test"], options=REQUIRETLS)
    assert (outcome.status, outcome.status_code) == (Status.PERMANENT, "5.7.30")
    assert "does not offer REQUIRETLS" in outcome.reason
    assert postfix_mx.messages() == [] and " client=" not in postfix_mx.log_text()
    plain = new_deliverer(
        make_cfg(postfix_mx.port, ca_file), policy(), "relay.test", resolver, Metrics()
    )
    assert (await send(plain, ["b@example.test"]))[0].status is Status.DELIVERED


async def test_an_mx_found_without_dnssec_or_mta_sts_is_not_even_contacted(
    ca: trustme.CA, ca_file: Path, peers: list
) -> None:
    peer = await _tls_peer(peers, ca, extensions=EXTENSIONS)
    d = new_deliverer(
        make_cfg(peer.port, ca_file), policy(), "relay.test", FakeResolver(MX), Metrics()
    )
    (outcome,) = await send(d, ["a@example.test"], options=REQUIRETLS)
    assert (outcome.status, outcome.status_code) == (Status.PERMANENT, "5.7.30")
    assert "neither through DNSSEC nor through an MTA-STS policy" in outcome.reason
    assert peer.commands == []


async def test_a_certificate_nobody_vouches_for_is_refused_even_at_level_encrypt(
    ca_file: Path, peers: list
) -> None:
    port = free_port(PEER1)
    ctx = server_context(self_signed("mx1.example.test"))
    peer = await start(peers, SmtpPeer(PEER1, port, tls_context=ctx, extensions=EXTENSIONS))
    d = new_deliverer(
        make_cfg(port, ca_file), policy(), "relay.test", FakeResolver(MX, secure=True), Metrics()
    )
    (outcome,) = await send(d, ["a@example.test"], options=REQUIRETLS)
    assert (outcome.status, outcome.status_code) == (Status.PERMANENT, "5.7.30")
    assert "MAIL" not in peer.verbs()


async def test_tls_required_no_relaxes_dane_but_never_the_floor(
    ca: trustme.CA, ca_file: Path, peers: list
) -> None:
    """A TLSA record the MX does not match defers the mail, unless the message says
    `TLS-Required: No`: then the configured level (encrypt) alone applies."""
    peer = await _tls_peer(peers, ca)
    wrong = TlsaSet("_25._tcp.mx1.example.test", TlsaStatus.SECURE, (Tlsa(3, 1, 1, b"\0" * 32),))
    resolver = FakeResolver(MX, tlsa={"mx1.example.test": wrong})
    cfg = make_cfg(peer.port, ca_file)
    (strict,) = await send(
        new_deliverer(cfg, policy(), "relay.test", resolver, Metrics()), ["a@example.test"]
    )
    assert strict.status is Status.TRANSIENT and "TLSA" in strict.reason
    relaxed_data = b"TLS-Required: No\r\n" + MESSAGE
    d = new_deliverer(cfg, policy(), "relay.test", resolver, Metrics())
    (relaxed,) = await send(d, ["a@example.test"], data=relaxed_data)
    assert relaxed.status is Status.DELIVERED, relaxed.reason
    assert relaxed.evidence is not None and relaxed.evidence.policy_source == "static"


async def test_trouble_that_may_pass_defers_instead_of_returning(
    ca: trustme.CA, ca_file: Path, peers: list
) -> None:
    """Only an unauthenticated server or a missing REQUIRETLS returns the message: a 454
    to STARTTLS, or a 451 to MAIL from the one MX that offers REQUIRETLS, is retried."""
    port = free_port(PEER1)
    refusing = await start(peers, SmtpPeer(PEER1, port, starttls="refuse"))
    ctx = server_context(ca.issue_cert("mx2.example.test"))
    busy = SmtpPeer(
        PEER2, port, tls_context=ctx, extensions=EXTENSIONS, mail_reply="451 4.3.2 busy"
    )
    await start(peers, busy)
    two = {"example.test": [("mx1.example.test", PEER1), ("mx2.example.test", PEER2)]}
    d = new_deliverer(
        make_cfg(port, ca_file), policy(), "relay.test", FakeResolver(two, secure=True), Metrics()
    )
    (outcome,) = await send(d, ["a@example.test"], options=REQUIRETLS)
    assert (outcome.status, outcome.status_code) == (Status.TRANSIENT, None), outcome.reason
    assert "MAIL" not in refusing.verbs()


async def test_tls_required_no_never_relaxes_a_dane_only_floor(
    ca: trustme.CA, ca_file: Path, peers: list
) -> None:
    leaf = ca.issue_cert("mx1.example.test")
    port = free_port(PEER1)
    await start(peers, SmtpPeer(PEER1, port, tls_context=server_context(leaf)))
    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    match = Tlsa(3, 1, 1, hashlib.sha256(spki).digest())
    tlsa = {"mx1.example.test": TlsaSet("_x", TlsaStatus.SECURE, (match,))}
    bank = policy(**{"example.test": DomainPolicy(level=TlsLevel.DANE_ONLY)})
    d = new_deliverer(
        make_cfg(port, ca_file), bank, "relay.test", FakeResolver(MX, tlsa=tlsa), Metrics()
    )
    (outcome,) = await send(d, ["a@example.test"], data=b"TLS-Required: No\r\n" + MESSAGE)
    assert outcome.status is Status.DELIVERED, outcome.reason
    assert outcome.evidence is not None and outcome.evidence.level_met == "dane"
