"""relay.mx against a real DNS server on loopback (tests/fixtures/dns.py), over UDP/TCP."""

from __future__ import annotations

import random
import time

import pytest

from relay.config import Route
from relay.delivery.mx import MxHost, MxResolver, MxStatus, route_for
from relay.domains import normalize_domain
from tests.fixtures.dns import DnsServer


def resolver(server: DnsServer, timeout: float = 2.0, **kw: object) -> MxResolver:
    return MxResolver(server.resolver_config(timeout=timeout), **kw)  # type: ignore[arg-type]


async def test_preference_order_and_addresses(dns_server: DnsServer) -> None:
    dns_server.add(
        "example.test", "MX", "20 mx2.example.test", "10 MX1.Example.Test.", "30 mx3.example.test"
    )
    dns_server.add("mx1.example.test", "A", "127.0.0.11")
    dns_server.add("mx2.example.test", "A", "127.0.0.12")
    dns_server.add("mx3.example.test", "A", "127.0.0.13")
    result = await resolver(dns_server).resolve(normalize_domain("Example.TEST."))
    assert result.status is MxStatus.OK
    assert not result.implicit
    assert result.hosts == (
        MxHost("mx1.example.test", 10, ("127.0.0.11",)),
        MxHost("mx2.example.test", 20, ("127.0.0.12",)),
        MxHost("mx3.example.test", 30, ("127.0.0.13",)),
    )
    assert result.reason == ""


async def test_equal_preferences_shuffled_with_seeded_rng(dns_server: DnsServer) -> None:
    names = [f"mx{i}.example.test" for i in range(5)]
    dns_server.add("example.test", "MX", "5 first.example.test", *(f"10 {n}" for n in names))
    dns_server.add("first.example.test", "A", "127.0.0.2")
    for n in names:
        dns_server.add(n, "A", "127.0.0.3")
    orders = set()
    for seed in range(12):
        result = await resolver(dns_server, rng=random.Random(seed), max_hosts=10).resolve(
            "example.test"
        )
        got = [h.name for h in result.hosts]
        assert got[0] == "first.example.test"  # lower preference always first
        assert sorted(got[1:]) == sorted(names)
        expected = sorted(names)
        random.Random(seed).shuffle(expected)  # the rng decides, reproducibly
        assert got[1:] == expected
        orders.add(tuple(got))
    assert len(orders) > 1


async def test_no_mx_means_implicit_mx(dns_server: DnsServer) -> None:
    dns_server.add("implicit.test", "A", "127.0.0.5")
    dns_server.add("implicit.test", "AAAA", "::1")
    result = await resolver(dns_server).resolve("implicit.test")
    assert result.status is MxStatus.OK
    assert result.implicit
    assert result.hosts == (MxHost("implicit.test", 0, ("127.0.0.5", "::1")),)
    assert "RFC 5321" in result.reason


async def test_no_mx_and_no_address_is_permanent(dns_server: DnsServer) -> None:
    dns_server.add("txtonly.test", "TXT", '"v=spf1 -all"')
    result = await resolver(dns_server).resolve("txtonly.test")
    assert result.status is MxStatus.PERMANENT
    assert result.implicit
    assert result.hosts == ()


async def test_null_mx_is_permanent(dns_server: DnsServer) -> None:
    dns_server.add("nomail.test", "MX", "0 .")
    dns_server.add("nomail.test", "A", "127.0.0.9")  # must not be used
    result = await resolver(dns_server).resolve("nomail.test")
    assert result.status is MxStatus.PERMANENT
    assert result.reason == "domain does not accept mail (null MX, RFC 7505)"
    assert not dns_server.queried("nomail.test", "A")


async def test_null_mx_mixed_with_real_mx_is_ignored(dns_server: DnsServer) -> None:
    dns_server.add("mixed.test", "MX", "0 .", "10 mx.mixed.test")
    dns_server.add("mx.mixed.test", "A", "127.0.0.7")
    result = await resolver(dns_server).resolve("mixed.test")
    assert result.status is MxStatus.OK
    assert [h.name for h in result.hosts] == ["mx.mixed.test"]
    assert "RFC 7505" in result.reason


async def test_nxdomain_is_permanent(dns_server: DnsServer) -> None:
    result = await resolver(dns_server).resolve("does-not-exist.test")
    assert result.status is MxStatus.PERMANENT
    assert "NXDOMAIN" in result.reason


async def test_servfail_is_transient(dns_server: DnsServer) -> None:
    dns_server.add("broken.test", "MX", "10 mx.broken.test")
    dns_server.set_rcode("broken.test", "SERVFAIL")
    result = await resolver(dns_server).resolve("broken.test")
    assert result.status is MxStatus.TRANSIENT
    assert "SERVFAIL" in result.reason


async def test_refused_is_transient(dns_server: DnsServer) -> None:
    dns_server.set_rcode("refused.test", "REFUSED")
    result = await resolver(dns_server).resolve("refused.test")
    assert result.status is MxStatus.TRANSIENT


async def test_timeout_is_transient_and_bounded(dns_server: DnsServer) -> None:
    dns_server.add("slow.test", "MX", "10 mx.slow.test")
    dns_server.set_drop("slow.test")
    started = time.monotonic()
    result = await resolver(dns_server, timeout=0.5).resolve("slow.test")
    elapsed = time.monotonic() - started
    assert result.status is MxStatus.TRANSIENT
    assert "timed out" in result.reason
    assert elapsed < 3.0


async def test_no_nameserver_listening_is_transient() -> None:
    from relay.config import ResolverConfig
    from tests.fixtures.net import free_port

    cfg = ResolverConfig(nameservers=("127.0.0.1",), port=free_port(), timeout=0.5)
    result = await MxResolver(cfg).resolve("example.test")
    assert result.status is MxStatus.TRANSIENT


async def test_mx_host_without_address_is_skipped(dns_server: DnsServer) -> None:
    dns_server.add("skip.test", "MX", "10 noaddr.skip.test", "20 gone.skip.test", "30 ok.skip.test")
    dns_server.add("noaddr.skip.test", "TXT", '"exists, no address"')
    dns_server.add("ok.skip.test", "A", "127.0.0.8")
    result = await resolver(dns_server).resolve("skip.test")
    assert result.status is MxStatus.OK
    assert [h.name for h in result.hosts] == ["ok.skip.test"]
    assert "noaddr.skip.test" in result.reason
    assert "gone.skip.test" in result.reason and "NXDOMAIN" in result.reason


async def test_no_mx_host_has_address_is_transient_without_fallback(dns_server: DnsServer) -> None:
    dns_server.add("dangling.test", "MX", "10 gone.dangling.test")
    dns_server.add("dangling.test", "A", "127.0.0.99")  # RFC 5321 §5.1: never used when MX exists
    result = await resolver(dns_server).resolve("dangling.test")
    assert result.status is MxStatus.TRANSIENT
    assert result.hosts == ()
    assert "gone.dangling.test" in result.reason
    assert not dns_server.queried("dangling.test", "A")
    assert not dns_server.queried("dangling.test", "AAAA")


async def test_mx_host_servfail_is_transient(dns_server: DnsServer) -> None:
    dns_server.add("hostfail.test", "MX", "10 mx.hostfail.test")
    dns_server.set_rcode("mx.hostfail.test", "SERVFAIL")
    result = await resolver(dns_server).resolve("hostfail.test")
    assert result.status is MxStatus.TRANSIENT
    assert "failed" in result.reason


async def test_partial_address_failure_uses_what_answered(dns_server: DnsServer) -> None:
    dns_server.add("partial.test", "MX", "10 mx.partial.test")
    dns_server.add("mx.partial.test", "A", "127.0.0.21")
    dns_server.set_rcode("mx.partial.test", "SERVFAIL", rdtype="AAAA")
    result = await resolver(dns_server).resolve("partial.test")
    assert result.status is MxStatus.OK
    assert result.hosts[0].addresses == ("127.0.0.21",)


async def test_cap_of_max_hosts(dns_server: DnsServer) -> None:
    dns_server.add("many.test", "MX", *(f"{i * 10} mx{i}.many.test" for i in range(1, 8)))
    for i in range(1, 8):
        dns_server.add(f"mx{i}.many.test", "A", f"127.0.1.{i}")
    result = await resolver(dns_server, max_hosts=3).resolve("many.test")
    assert [h.name for h in result.hosts] == ["mx1.many.test", "mx2.many.test", "mx3.many.test"]
    assert "3 of 7" in result.reason
    assert not dns_server.queried("mx4.many.test")  # capped names are not even looked up


async def test_ipv6_addresses(dns_server: DnsServer) -> None:
    dns_server.add("v6.test", "MX", "10 only6.v6.test", "20 dual.v6.test")
    dns_server.add("only6.v6.test", "AAAA", "::1")
    dns_server.add("dual.v6.test", "A", "127.0.0.31")
    dns_server.add("dual.v6.test", "AAAA", "0:0:0:0:0:0:0:1", "fd00::31")
    result = await resolver(dns_server).resolve("v6.test")
    assert result.hosts[0] == MxHost("only6.v6.test", 10, ("::1",))
    dual = result.hosts[1]
    assert (dual.name, dual.preference) == ("dual.v6.test", 20)
    # IPv4 first, then IPv6; the order inside an RRset is not defined (RFC 2181 §5).
    assert dual.addresses[0] == "127.0.0.31"
    assert sorted(dual.addresses[1:]) == ["::1", "fd00::31"]


async def test_ip_literal_mx_target_is_skipped(dns_server: DnsServer) -> None:
    dns_server.add("literal.test", "MX", "10 127.0.0.1", "20 mx.literal.test")
    dns_server.add("mx.literal.test", "A", "127.0.0.41")
    result = await resolver(dns_server).resolve("literal.test")
    assert [h.name for h in result.hosts] == ["mx.literal.test"]
    assert "IP address" in result.reason


async def test_cname_targets(dns_server: DnsServer) -> None:
    dns_server.add("cn.test", "MX", "10 alias.cn.test", "20 nowhere.cn.test")
    dns_server.add("alias.cn.test", "CNAME", "real.cn.test")
    dns_server.add("real.cn.test", "A", "127.0.0.51")
    dns_server.add("nowhere.cn.test", "CNAME", "missing.cn.test")
    result = await resolver(dns_server).resolve("cn.test")
    assert result.status is MxStatus.OK
    assert result.hosts == (MxHost("alias.cn.test", 10, ("127.0.0.51",)),)
    assert "nowhere.cn.test" in result.reason


async def test_duplicate_mx_host_listed_once(dns_server: DnsServer) -> None:
    dns_server.add("dup.test", "MX", "20 mx.dup.test", "10 mx.dup.test")
    dns_server.add("mx.dup.test", "A", "127.0.0.61")
    result = await resolver(dns_server).resolve("dup.test")
    assert result.hosts == (MxHost("mx.dup.test", 10, ("127.0.0.61",)),)


async def test_truncated_udp_answer_retried_over_tcp(dns_server: DnsServer) -> None:
    dns_server.add("tc.test", "MX", "10 mx.tc.test")
    dns_server.add("mx.tc.test", "A", "127.0.0.71")
    dns_server.set_truncate("tc.test")
    result = await resolver(dns_server).resolve("tc.test")
    assert result.status is MxStatus.OK
    assert any(q.transport == "tcp" for q in dns_server.queries)


@pytest.mark.parametrize("domain", ["", "[127.0.0.1]", "192.0.2.1", "a" * 64 + ".test", "a..test"])
async def test_non_domains_are_permanent(dns_server: DnsServer, domain: str) -> None:
    result = await resolver(dns_server).resolve(domain)
    assert result.status is MxStatus.PERMANENT
    assert dns_server.queries == []


async def test_addresses(dns_server: DnsServer) -> None:
    dns_server.add("hop.test", "A", "127.0.0.81")
    dns_server.add("hop.test", "AAAA", "::1")
    r = resolver(dns_server)
    assert await r.addresses("HOP.test.") == ("127.0.0.81", "::1")
    assert await r.addresses("127.0.0.5") == ("127.0.0.5",)
    assert await r.addresses("[::1]") == ("::1",)
    assert await r.addresses("[IPv6:::1]") == ("::1",)
    assert await r.addresses("missing.test") == ()


def test_max_hosts_must_be_positive(dns_server: DnsServer) -> None:
    with pytest.raises(ValueError, match="max_hosts"):
        resolver(dns_server, max_hosts=0)


# ---- route_for (pure) ----------------------------------------------------------------------

EXACT = Route(domains=("partner.test",), host="mx.partner.test", port=2525)
SUB = Route(domains=(".partner.test",), host="sub.partner.test", port=25)
DEEP = Route(domains=(".eu.partner.test", "other.test"), host="eu.partner.test", port=25)


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("partner.test", EXACT),
        ("PARTNER.test.", EXACT),
        ("a.partner.test", SUB),
        ("x.eu.partner.test", DEEP),  # longest suffix wins
        ("eu.partner.test", SUB),  # ".eu.partner.test" matches subdomains only
        ("other.test", DEEP),
        ("notpartner.test", None),
        ("partner.test.evil", None),
        ("xpartner.test", None),
    ],
)
def test_route_for(domain: str, expected: Route | None) -> None:
    assert route_for((SUB, DEEP, EXACT), normalize_domain(domain)) is expected


def test_route_for_no_routes() -> None:
    assert route_for((), "partner.test") is None


async def test_unicode_domain_is_queried_as_a_labels(dns_server: DnsServer) -> None:
    dns_server.add("xn--bcher-kva.test", "MX", "10 mx.xn--bcher-kva.test")
    dns_server.add("mx.xn--bcher-kva.test", "A", "127.0.0.91")
    result = await resolver(dns_server).resolve("Bücher.test")
    assert result.status is MxStatus.OK
    assert result.hosts == (MxHost("mx.xn--bcher-kva.test", 10, ("127.0.0.91",)),)
