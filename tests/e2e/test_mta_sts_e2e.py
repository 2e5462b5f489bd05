"""End to end: MTA-STS (RFC 8461) with real peers - `tls-relay serve`, Debian's Postfix
as the MX, the DNS fixture on loopback for MX/A/TXT, and an HTTPS policy server on
127.0.0.1 (aiohttp.web with a trustme certificate per mta-sts.DOMAIN).  Every negative
case asserts that no mail reached Postfix.  Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from aiohttp import web

from tests.e2e.test_delivery_e2e import (
    SETTLE,
    add_postfix_mx,
    deferred,
    delivery_config,
    delivery_lines,
    submit_smtputf8,
)
from tests.e2e.test_queue_e2e import queue_json, wait_for
from tests.fixtures.dns import DnsServer
from tests.fixtures.postfix import MX_NAME, PostfixMx
from tests.fixtures.relay_proc import RelayFactory, RelayProcess

pytestmark = [pytest.mark.e2e, pytest.mark.postfix]


class PolicyServer:
    """HTTPS on 127.0.0.1 serving /.well-known/mta-sts.txt by Host header, in a thread
    with its own event loop; SNI picks the certificate for mta-sts.DOMAIN."""

    def __init__(self, ca: trustme.CA, domains: list[str]) -> None:
        self.policies: dict[str, bytes] = {}
        self.requests: list[str] = []
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert(*(f"mta-sts.{d}" for d in domains)).configure_cert(self._ctx)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def _policy(self, request: web.Request) -> web.Response:
        host = request.host.split(":")[0]
        self.requests.append(host)
        body = self.policies.get(host)
        if body is None:
            return web.Response(status=404)
        return web.Response(body=body, content_type="text/plain")

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/mta-sts.txt", self._policy)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._ctx)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


DOMAINS = ["sts.test", "nomatch.test", "alias.test", "testing.test"]


@pytest.fixture
def policy_server(ca: trustme.CA) -> Iterator[PolicyServer]:
    server = PolicyServer(ca, DOMAINS)
    server.start()
    yield server
    server.stop()


def enforce(mx: str, mode: str = "enforce") -> str:
    return f"version: STSv1\r\nmode: {mode}\r\nmx: {mx}\r\nmax_age: 86400\r\n"


@dataclass
class Lab:
    """The peers of one test: the relay factory, Postfix, DNS and the policy server."""

    relay: RelayFactory
    mx: PostfixMx
    dns: DnsServer
    ca_file: Path
    server: PolicyServer

    def publish(self, domain: str, body: str, pid: str = "1") -> None:
        self.dns.add(f"_mta-sts.{domain}", "TXT", f'"v=STSv1; id={pid};"')
        self.dns.add(f"mta-sts.{domain}", "A", "127.0.0.1")
        self.server.policies[f"mta-sts.{domain}"] = body.encode()

    def start(self) -> RelayProcess:
        """Floor `encrypt` everywhere: whatever is stricter comes from MTA-STS alone."""
        cfg = delivery_config(self.dns, self.mx.port, self.ca_file)
        cfg["delivery"]["mta_sts_port"] = self.server.port
        cfg["policy"] = {"default": {"level": "encrypt"}, "mta_sts": True, "dane": False}
        return self.relay(extra_config=cfg)


@pytest.fixture
def lab(
    relay: RelayFactory,
    postfix_mx: PostfixMx,
    dns_server: DnsServer,
    ca_file: Path,
    policy_server: PolicyServer,
) -> Lab:
    return Lab(relay, postfix_mx, dns_server, ca_file, policy_server)


def test_enforce_with_a_matching_mx_delivers_at_verify(lab: Lab) -> None:
    add_postfix_mx(lab.dns, "sts.test")
    lab.publish("sts.test", enforce(MX_NAME))
    proc = lab.start()
    submit_smtputf8(proc, "app@corp.test", "a@sts.test", "sts enforce")
    got = lab.mx.wait_messages(1, timeout=30)
    assert [m.recipient for m in got] == ["a@sts.test"]
    (line,) = delivery_lines(proc, rcpt="a@sts.test", outcome="delivered")
    assert "level_required=verify" in line and "policy=mta-sts" in line
    assert lab.server.requests == ["mta-sts.sts.test"]
    assert (proc.spool_dir / "mta-sts" / "sts.test.json").exists()
    wait_for(lambda: queue_json(proc) == [] or None, "the queue to empty")

    # The cache survives a restart: with the policy server gone the policy applies.
    assert proc.stop() == 0
    lab.server.policies.clear()
    proc.start()
    submit_smtputf8(proc, "app@corp.test", "b@sts.test", "sts after restart")
    got = lab.mx.wait_messages(2, timeout=30)
    lines = delivery_lines(proc, rcpt="b@sts.test", outcome="delivered")
    assert lines and "policy=mta-sts" in lines[0]


def test_enforce_skips_mx_hosts_the_policy_does_not_name(lab: Lab) -> None:
    add_postfix_mx(lab.dns, "nomatch.test")
    lab.publish("nomatch.test", enforce("*.elsewhere.test"))
    proc = lab.start()
    submit_smtputf8(proc, "app@corp.test", "a@nomatch.test", "sts no match")
    r = wait_for(lambda: deferred(proc), "the recipient to be deferred")
    assert "MTA-STS policy of nomatch.test (enforce, id 1) allows none of its MX" in str(
        r["last_reason"]
    )
    time.sleep(SETTLE)
    assert lab.mx.messages() == [] and lab.mx.tls_sessions() == 0  # never contacted
    assert "mta_sts_mx_refused" in proc.log_text()


def test_enforce_needs_a_certificate_for_the_mx_name(lab: Lab) -> None:
    """The MX is named other-mx.alias.test, which the policy allows, but Postfix's
    certificate says mx.postfix.test: `encrypt` alone would deliver; MTA-STS defers."""
    lab.dns.add("alias.test", "MX", "10 other-mx.alias.test.")
    lab.dns.add("other-mx.alias.test", "A", "127.0.0.1")
    lab.publish("alias.test", enforce("*.alias.test"))
    proc = lab.start()
    submit_smtputf8(proc, "app@corp.test", "a@alias.test", "sts wrong name")
    r = wait_for(lambda: deferred(proc), "the recipient to be deferred")
    reason = str(r["last_reason"])
    assert "MTA-STS policy of alias.test (enforce)" in reason
    assert "do not match MX host other-mx.alias.test" in reason
    time.sleep(SETTLE)
    assert lab.mx.messages() == []
    (line,) = delivery_lines(proc, rcpt="a@alias.test")
    assert "result_type=certificate-host-mismatch" in line and "policy=mta-sts" in line


def test_testing_mode_reports_and_delivers(lab: Lab) -> None:
    add_postfix_mx(lab.dns, "testing.test")
    lab.publish("testing.test", enforce("*.elsewhere.test", "testing"))
    proc = lab.start()
    submit_smtputf8(proc, "app@corp.test", "a@testing.test", "sts testing")
    got = lab.mx.wait_messages(1, timeout=30)
    assert [m.recipient for m in got] == ["a@testing.test"]
    log = proc.log_text()
    assert "mta_sts_mx_refused" in log and "mode=testing" in log
    assert "mta_sts_testing" in log
    (line,) = delivery_lines(proc, rcpt="a@testing.test", outcome="delivered")
    assert "level_required=encrypt" in line


def test_no_policy_and_a_failed_fetch_fall_back_to_the_floor(lab: Lab) -> None:
    """A TXT record whose policy is 404: no policy applies (RFC 8461 5.1: nothing was
    ever cached); delivery goes on under the floor, and the failure is logged."""
    add_postfix_mx(lab.dns, "sts.test")
    lab.dns.add("_mta-sts.sts.test", "TXT", '"v=STSv1; id=9;"')
    lab.dns.add("mta-sts.sts.test", "A", "127.0.0.1")
    proc = lab.start()
    submit_smtputf8(proc, "app@corp.test", "a@sts.test", "sts 404")
    got = lab.mx.wait_messages(1, timeout=30)
    assert [m.recipient for m in got] == ["a@sts.test"]
    log = proc.log_text()
    assert "mta_sts_failed" in log and "HTTP 404" in log
    (line,) = delivery_lines(proc, rcpt="a@sts.test", outcome="delivered")
    assert "policy=static" in line
