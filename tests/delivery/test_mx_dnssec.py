"""relay.delivery.mx with DNSSEC asked for, against the loopback DNS fixture, which sets
the AD bit on request (the fast tier; tests/e2e/test_dane_e2e.py runs the same paths
against nsd and a validating unbound): the probe's verdicts, secure flags, TLSA
classification, and the TTL cache."""

from __future__ import annotations

import hashlib

from relay.app import new_deliverer
from relay.config import DeliveryConfig, PolicyConfig, ResolverConfig
from relay.delivery.mx import DnssecState, MxResolver, MxStatus
from relay.delivery.outcome import Status
from relay.metrics import Metrics
from relay.tlspolicy.dane import Tlsa, TlsaStatus
from tests.fixtures.dns import DnsServer
from tests.fixtures.net import free_port

TLSA_HEX = hashlib.sha256(b"key").hexdigest()


def signed(dns: DnsServer) -> None:
    """A root NS RRset and AD on every answer: what a validating resolver gives."""
    dns.add(".", "NS", "a.root.test.")
    dns.set_authenticated(True)


async def validating(dns: DnsServer) -> MxResolver:
    resolver = MxResolver(dns.resolver_config(), dnssec=True)
    assert await resolver.probe_dnssec() is None
    assert resolver.validated
    return resolver


async def test_the_probe_needs_ad_on_the_root_ns(dns_server: DnsServer) -> None:
    resolver = MxResolver(dns_server.resolver_config(), dnssec=True)
    assert resolver.dnssec_state is DnssecState.UNKNOWN
    why = await resolver.probe_dnssec()
    assert why is not None and "came back without the AD bit" in why
    assert resolver.dnssec_state is DnssecState.NOT_VALIDATING
    signed(dns_server)
    assert await resolver.probe_dnssec() is None
    assert resolver.dnssec_state is DnssecState.VALIDATING
    assert MxResolver(dns_server.resolver_config()).dnssec_state is DnssecState.OFF


async def test_a_probe_without_an_answer_keeps_the_verdict(dns_server: DnsServer) -> None:
    """Blocking '. NS' for a moment must not switch DANE off (nor on)."""
    signed(dns_server)
    resolver = await validating(dns_server)
    dns_server.set_rcode(".", "SERVFAIL")
    why = await resolver.probe_dnssec()
    assert why is not None and "nameserver answered SERVFAIL" in why
    assert resolver.dnssec_state is DnssecState.VALIDATING
    fresh = MxResolver(dns_server.resolver_config(), dnssec=True)
    await fresh.probe_dnssec()
    assert fresh.dnssec_state is DnssecState.UNKNOWN


async def test_a_resolver_off_loopback_is_never_trusted_nor_asked() -> None:
    cfg = ResolverConfig(nameservers=("192.0.2.53",), port=53, timeout=1.0)
    resolver = MxResolver(cfg, dnssec=True)
    why = await resolver.probe_dnssec()  # decided before any query is sent
    assert why is not None and "is not on loopback" in why
    assert resolver.dnssec_state is DnssecState.NOT_VALIDATING


async def test_secure_flags_of_mx_and_hosts(dns_server: DnsServer) -> None:
    signed(dns_server)
    dns_server.add("dane.test", "MX", "10 mx.dane.test.")
    dns_server.add("mx.dane.test", "A", "127.0.0.1")
    resolver = await validating(dns_server)
    result = await resolver.resolve("dane.test")
    assert result.status is MxStatus.OK and result.secure
    assert result.hosts[0].secure
    plain = await MxResolver(dns_server.resolver_config()).resolve("dane.test")
    assert not plain.secure and not plain.hosts[0].secure  # AD means nothing unasked


async def test_a_failed_aaaa_does_not_make_a_signed_host_look_unsigned(
    dns_server: DnsServer,
) -> None:
    """SERVFAIL is how a validator answers bogus data: an attacker who breaks AAAA
    must not switch DANE off for a host whose A RRset is secure."""
    signed(dns_server)
    dns_server.add("dane.test", "MX", "10 mx.dane.test.")
    dns_server.add("mx.dane.test", "A", "127.0.0.1")
    dns_server.set_rcode("mx.dane.test", "SERVFAIL", "AAAA")
    resolver = await validating(dns_server)
    (host,) = (await resolver.resolve("dane.test")).hosts
    assert host.addresses == ("127.0.0.1",) and host.secure


async def test_tlsa_classification(dns_server: DnsServer) -> None:
    signed(dns_server)
    dns_server.add("_25._tcp.mx1.dane.test", "TLSA", f"3 1 1 {TLSA_HEX}", "1 1 1 " + "00" * 32)
    dns_server.add("mx2.dane.test", "A", "127.0.0.1")
    dns_server.set_rcode("_25._tcp.mx3.dane.test", "SERVFAIL")
    resolver = await validating(dns_server)
    got = await resolver.tlsa("MX1.dane.test.", 25)
    assert (got.name, got.status) == ("_25._tcp.mx1.dane.test", TlsaStatus.SECURE)
    assert got.usable == (Tlsa(3, 1, 1, bytes.fromhex(TLSA_HEX)),) and len(got.records) == 2
    assert (await resolver.tlsa("mx2.dane.test", 25)).status is TlsaStatus.ABSENT
    failed = await resolver.tlsa("mx3.dane.test", 25)
    assert failed.status is TlsaStatus.FAILED and "SERVFAIL" in failed.detail
    dns_server.set_authenticated(False)  # an unsigned zone under a validating resolver
    assert (await resolver.tlsa("mx4.dane.test", 25)).status is TlsaStatus.INSECURE
    assert (await resolver.tlsa("mx2.dane.test", 2525)).name == "_2525._tcp.mx2.dane.test"


async def test_results_are_kept_for_their_ttl_and_failures_never(dns_server: DnsServer) -> None:
    dns_server.add("kept.test", "MX", "10 mx.kept.test.", ttl=300)
    dns_server.add("mx.kept.test", "A", "127.0.0.1", ttl=300)
    dns_server.add("short.test", "MX", "10 mx.short.test.", ttl=0)
    dns_server.add("mx.short.test", "A", "127.0.0.1", ttl=0)
    dns_server.set_rcode("broken.test", "SERVFAIL")
    resolver = MxResolver(dns_server.resolver_config())
    for _ in range(3):
        assert (await resolver.resolve("kept.test")).status is MxStatus.OK
        assert (await resolver.resolve("short.test")).status is MxStatus.OK
        assert (await resolver.resolve("broken.test")).status is MxStatus.TRANSIENT

    def count(name: str) -> int:
        return sum(1 for q in dns_server.queries if q.name == name and q.rdtype == "MX")

    assert (count("kept.test"), count("short.test"), count("broken.test")) == (1, 3, 3)


async def test_a_changed_dnssec_verdict_drops_what_was_kept(dns_server: DnsServer) -> None:
    dns_server.add("dane.test", "MX", "10 mx.dane.test.", ttl=300)
    dns_server.add("mx.dane.test", "A", "127.0.0.1", ttl=300)
    resolver = MxResolver(dns_server.resolver_config(), dnssec=True)
    await resolver.probe_dnssec()
    assert not (await resolver.resolve("dane.test")).secure
    signed(dns_server)
    assert await resolver.probe_dnssec() is None
    assert (await resolver.resolve("dane.test")).secure  # asked again, not the kept one


async def test_deliveries_wait_while_no_probe_has_been_answered(dns_server: DnsServer) -> None:
    """Fail closed: with DANE on and the resolver's DNSSEC status unknown, mail to MX
    hosts is deferred (nobody knows whether they publish TLSA), not sent without it."""
    dns_server.set_rcode(".", "SERVFAIL")
    dns_server.add("dane.test", "MX", "10 mx.dane.test.")
    resolver = MxResolver(dns_server.resolver_config(), dnssec=True)
    await resolver.probe_dnssec()
    cfg = DeliveryConfig(port=free_port(), connect_timeout=2, command_timeout=2)
    deliverer = new_deliverer(cfg, PolicyConfig(), "relay.test", resolver, Metrics())
    (outcome,) = await deliverer.deliver(
        "Q1", "a@src.test", (), "dane.test", [("b@dane.test", ())], b"x"
    )
    assert outcome.status is Status.TRANSIENT
    assert "has not answered the DNSSEC probe yet" in outcome.reason
    assert not dns_server.queried("dane.test", "MX")
    await deliverer.close()
