"""metrics.py: the registry and its text format, the HTTP endpoint, the counting in
scheduler and delivery, and ``tls-relay serve`` with ``metrics.address`` end to end.

Only loopback is ever contacted; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import http.client
import smtplib
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.app import new_deliverer
from relay.config import DeliveryConfig, DomainPolicy, PolicyConfig, QueueConfig
from relay.delivery.mx import DnssecState, MxHost, MxResult, MxStatus
from relay.delivery.outcome import Cause, Outcome, Status
from relay.metrics import Metrics, MetricsServer
from relay.queue.envelope import QueueEnvelope, Recipient
from relay.queue.scheduler import Scheduler
from relay.queue.spool import Spool
from tests.fixtures.badpeers import SmtpPeer
from tests.fixtures.net import free_port, wait_port
from tests.fixtures.relay_proc import RelayFactory

HOST = "127.0.0.1"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# ---- parsing the exposition format back (prometheus-client's own parser) --------------


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """Types per family and every sample, as Prometheus reads them."""
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = sample.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


# ---- the registry ---------------------------------------------------------------------

FAMILIES = {
    "tls_relay_sessions": "counter",
    "tls_relay_inbound_tls_sessions": "counter",
    "tls_relay_messages_accepted": "counter",
    "tls_relay_messages_rejected": "counter",
    "tls_relay_deliveries": "counter",
    "tls_relay_deferrals": "counter",
    "tls_relay_outbound_tls_sessions": "counter",
    "tls_relay_tls_failures": "counter",
    "tls_relay_mta_sts_testing": "counter",
    "tls_relay_bounces_generated": "counter",
    "tls_relay_reloads": "counter",
    "tls_relay_queue_messages": "gauge",
    "tls_relay_queue_oldest_message_age_seconds": "gauge",
    "tls_relay_queue_held": "gauge",
    "tls_relay_connections_active": "gauge",
    "tls_relay_certificate_expiry_timestamp_seconds": "gauge",
    "tls_relay_config_last_reload_successful": "gauge",
}


def test_render_parses_back() -> None:
    m = Metrics()
    m.sessions.labels(listener="127.0.0.1:587").inc()
    m.sessions.labels(listener="127.0.0.1:587").inc()
    m.sessions.labels(listener='odd "name"\\with\nnewline').inc()
    m.inbound_tls.labels(listener="x", version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384").inc()
    m.accepted.inc()
    m.rejected.labels(reason="bad_data").inc()
    m.deliveries.labels(outcome="deferred").inc()
    m.tls_failures.labels(result_type="certificate-expired").inc(3)
    m.track(m.queue_messages, lambda: 7)
    m.queue_held.set(2)
    types, samples = parse(m.render().decode())
    assert types == FAMILIES
    assert value(samples, "tls_relay_sessions_total", listener="127.0.0.1:587") == 2
    assert value(samples, "tls_relay_sessions_total", listener='odd "name"\\with\nnewline') == 1
    tls13 = {"listener": "x", "version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384"}
    assert value(samples, "tls_relay_inbound_tls_sessions_total", **tls13) == 1
    assert value(samples, "tls_relay_messages_accepted_total") == 1
    assert value(samples, "tls_relay_messages_rejected_total", reason="bad_data") == 1
    for outcome, count in (("delivered", 0), ("deferred", 1), ("bounced", 0)):
        assert value(samples, "tls_relay_deliveries_total", outcome=outcome) == count
    for reason in ("dns", "connection", "tls", "remote", "local"):  # all shown from the start
        assert value(samples, "tls_relay_deferrals_total", reason=reason) == 0
    failures = "tls_relay_tls_failures_total"
    assert value(samples, failures, result_type="certificate-expired") == 3
    assert value(samples, "tls_relay_queue_messages") == 7
    assert value(samples, "tls_relay_queue_held") == 2
    assert value(samples, "tls_relay_config_last_reload_successful") == 1
    assert not any(name.endswith("_created") for name, _ in samples)  # no doubled series


def test_fresh_registry_shows_every_unlabelled_metric_at_zero() -> None:
    _, samples = parse(Metrics().render().decode())
    for name in ("tls_relay_messages_accepted_total", "tls_relay_bounces_generated_total"):
        assert value(samples, name) == 0
    assert value(samples, "tls_relay_reloads_total", result="failed") == 0


def test_failing_gauge_source_keeps_its_last_value() -> None:
    m = Metrics()
    broken = False

    def held() -> float:
        if broken:
            raise OSError("hold/ vanished")
        return 4

    m.track(m.queue_held, held)
    assert m.sample("tls_relay_queue_held") == 4
    broken = True
    m.accepted.inc()
    _, samples = parse(m.render().decode())
    assert value(samples, "tls_relay_queue_held") == 4
    assert value(samples, "tls_relay_messages_accepted_total") == 1


def test_oldest_message_age_comes_from_the_queue_id(tmp_path: Path) -> None:
    now = 1_800_000_000.0
    spool = Spool(tmp_path / "spool", clock=lambda: now - 90)
    sched = Scheduler(spool, ScriptedDeliverer({}), QueueConfig(), "relay.test", clock=lambda: now)
    assert sched.oldest_age() == 0
    sched.enqueue(spool.new_id())  # arrived 90 s ago
    sched.enqueue(Spool(tmp_path / "spool", clock=lambda: now - 5).new_id())
    assert sched.oldest_age() == pytest.approx(90, abs=0.01)


# ---- the HTTP endpoint ----------------------------------------------------------------


@pytest.fixture
async def endpoint() -> AsyncIterator[MetricsServer]:
    m = Metrics()
    m.accepted.inc()
    server = MetricsServer(m, HOST, 0, read_timeout=0.5, max_request=1024)
    await server.start()
    yield server
    await server.stop()


async def exchange(port: int, request: bytes) -> bytes:
    """Send *request*, read until the server closes (bounded)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout=5.0)
    finally:
        writer.close()


async def test_get_metrics(endpoint: MetricsServer) -> None:
    raw = await exchange(endpoint.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK"
    assert "Content-Type: text/plain; version=0.0.4; charset=utf-8" in lines
    assert f"Content-Length: {len(body)}" in lines and "Connection: close" in lines
    _, samples = parse(body.decode())
    assert value(samples, "tls_relay_messages_accepted_total") == 1


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", b"HTTP/1.1 404 Not Found"),
        (b"GET /metricsx HTTP/1.0\r\n\r\n", b"HTTP/1.1 404 Not Found"),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", b"HTTP/1.1 405 Method"),
        (b"GET /metrics\r\n\r\n", b"HTTP/1.1 400 Bad Request"),
        (b"HELLO\r\n\r\n", b"HTTP/1.1 400 Bad Request"),
        (b"GET /metrics?x=1 HTTP/1.1\r\n\r\n", b"HTTP/1.1 200 OK"),
    ],
)
async def test_other_requests(endpoint: MetricsServer, request_bytes: bytes, status: bytes) -> None:
    assert (await exchange(endpoint.port, request_bytes)).startswith(status)


async def test_oversized_request_is_refused(endpoint: MetricsServer) -> None:
    request = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * 4096 + b"\r\n\r\n"
    assert (await exchange(endpoint.port, request)).startswith(b"HTTP/1.1 431 ")


async def test_slow_client_is_cut_off(endpoint: MetricsServer) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await exchange(endpoint.port, b"GET /metrics HTTP/1.1\r\n") == b""
    assert loop.time() - started < 3.0  # read_timeout is 0.5s


async def test_stop_frees_the_port_and_closes_idle_clients() -> None:
    server = MetricsServer(Metrics(), HOST, 0, read_timeout=30.0)
    await server.start()
    port = server.port
    reader, writer = await asyncio.open_connection(HOST, port)
    await asyncio.sleep(0.05)
    await asyncio.wait_for(server.stop(), timeout=5.0)
    assert await asyncio.wait_for(reader.read(), timeout=5.0) == b""
    writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection(HOST, port)


# ---- counting in the parts ------------------------------------------------------------


class ScriptedDeliverer:
    """One fixed status per recipient address; anything unlisted is delivered."""

    def __init__(self, statuses: dict[str, Status]) -> None:
        self.statuses = statuses

    async def deliver(
        self,
        queue_id: str,
        sender: str,
        mail_options: Sequence[str],
        domain: str,
        recipients: Sequence[tuple[str, Sequence[str]]],
        data: bytes,
    ) -> list[Outcome]:
        return [
            Outcome(a, self.statuses.get(a, Status.DELIVERED), "scripted") for a, _ in recipients
        ]

    async def close(self) -> None:
        pass


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


async def test_scheduler_counts_outcomes_and_bounces(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.setup()
    m = Metrics()
    fake = ScriptedDeliverer({"b@y.test": Status.PERMANENT, "c@z.test": Status.TRANSIENT})
    sched = Scheduler(spool, fake, QueueConfig(), "relay.test", metrics=m)
    m.track(m.queue_messages, lambda: sched.queued)
    rcpts = [Recipient(address=a) for a in ("a@x.test", "b@y.test", "c@z.test")]
    env = QueueEnvelope(spool.new_id(), spool.clock(), "app@corp.test", rcpts, size=3)
    spool.store(env, b"x\r\n")
    await sched.start()
    try:
        # a delivered, b bounced (its DSN to app@corp.test is then delivered), c deferred
        deliveries = "tls_relay_deliveries_total"
        await until(lambda: m.sample(deliveries, outcome="delivered") == 2)
        assert m.sample(deliveries, outcome="bounced") == 1
        assert m.sample(deliveries, outcome="deferred") == 1
        assert m.sample("tls_relay_deferrals_total", reason="local") == 1  # no cause given
        assert m.sample("tls_relay_bounces_generated_total") == 1
        await until(lambda: sched.queued == 1)  # the DSN is gone; c's message waits
        _, samples = parse(m.render().decode())
        assert value(samples, "tls_relay_queue_messages") == 1
    finally:
        await sched.stop(0)


class OneMx:
    """relay.mx.MxResolver's interface: every domain has one MX at *ip*."""

    validated = False  # DNSSEC: not asked
    dnssec_state = DnssecState.OFF

    def __init__(self, ip: str) -> None:
        self.ip = ip

    async def ready(self) -> None:
        return None

    async def resolve(self, domain: str) -> MxResult:
        return MxResult(MxStatus.OK, (MxHost(f"mx.{domain}", 10, (self.ip,)),), "")

    async def addresses(self, host: str) -> tuple[str, ...]:
        return (self.ip,)


async def test_deliverer_counts_tls_failures() -> None:
    peer = SmtpPeer(HOST, free_port(), starttls="none")
    await peer.start()
    cfg = DeliveryConfig(port=peer.port, connect_timeout=5, command_timeout=5, attempt_deadline=20)
    m = Metrics()
    d = new_deliverer(cfg, PolicyConfig(default=DomainPolicy()), "relay.test", OneMx(HOST), m)  # type: ignore[arg-type]
    try:
        outcomes = await d.deliver("Q1", "app@src.test", (), "example.test", [("a@x", ())], b"x")
    finally:
        await d.close()
        await peer.stop()
    assert outcomes[0].status is Status.TRANSIENT  # never plaintext, never a bounce
    assert outcomes[0].cause is Cause.TLS
    failures = "tls_relay_tls_failures_total"
    assert m.sample(failures, result_type="starttls-not-supported") == 1


# ---- end to end: tls-relay serve with metrics.address ----------------------------------


def scrape(port: int) -> Samples:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)  # no proxies: loopback only
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type") == "text/plain; version=0.0.4; charset=utf-8"
        return parse(response.read().decode())[1]
    finally:
        conn.close()


def send_one(port: int, context: ssl.SSLContext) -> None:
    with smtplib.SMTP(HOST, port, timeout=15) as client:
        client.ehlo("app.test")
        client.starttls(context=context)
        client.ehlo("app.test")
        client.sendmail("app@a.test", ["bob@b.test"], b"Subject: m\r\n\r\nhello\r\n")


@pytest.mark.e2e
def test_serve_exposes_metrics(relay: RelayFactory) -> None:
    port = free_port()
    proc = relay(extra_config={"metrics": {"address": f"{HOST}:{port}"}})
    wait_port(HOST, port, timeout=10)
    listener = f"{HOST}:{proc.starttls_port}"
    before = scrape(port)
    assert value(before, "tls_relay_queue_messages") == 0
    assert value(before, "tls_relay_queue_held") == 0
    send_one(proc.starttls_port, proc.client_context())
    after = scrape(port)
    accepted = "tls_relay_messages_accepted_total"
    assert value(after, accepted) == value(before, accepted) + 1
    sessions = before.get(("tls_relay_sessions_total", (("listener", listener),)), 0)
    assert value(after, "tls_relay_sessions_total", listener=listener) == sessions + 1
    assert value(after, "tls_relay_queue_messages") == 1
    # The fixture's resolver never answers: the queue side defers the recipient.
    for _ in range(100):
        if value(scrape(port), "tls_relay_deliveries_total", outcome="deferred") >= 1:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("no deferral counted in 10s")
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", "/")
        assert conn.getresponse().status == 404
    finally:
        conn.close()
    assert proc.stop() == 0
