"""metrics.py: the registry and its text format, the HTTP endpoint, the counting in
scheduler and delivery, and ``tls-relay serve`` with ``metrics.address`` end to end.

Only loopback is ever contacted; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import http.client
import re
import smtplib
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest

from relay.app import new_deliverer
from relay.config import DeliveryConfig, DomainPolicy, PolicyConfig, QueueConfig
from relay.delivery.mx import DnssecState, MxHost, MxResult, MxStatus
from relay.delivery.outcome import Outcome, Status
from relay.metrics import Metrics, MetricsServer, format_value
from relay.queue.envelope import QueueEnvelope, Recipient
from relay.queue.scheduler import Scheduler
from relay.queue.spool import Spool
from tests.fixtures.badpeers import SmtpPeer
from tests.fixtures.net import free_port, wait_port
from tests.fixtures.relay_proc import RelayFactory

HOST = "127.0.0.1"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# ---- parsing the exposition format back --------------------------------------------

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
SAMPLE = re.compile(rf"^({NAME})(?:\{{(.*)\}})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def _labels(text: str) -> tuple[tuple[str, str], ...]:
    pairs: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        match = LABEL.match(text, pos)
        assert match, f"bad label set {text!r} at {pos}"
        pairs.append((match.group(1), _unescape(match.group(2))))
        pos = match.end()
    return tuple(sorted(pairs))


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """Types per family and every sample; asserts the 0.0.4 line grammar as it goes."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    helps: set[str] = set()
    samples: Samples = {}
    current: str | None = None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in helps, f"second HELP for {name}"
            helps.add(name)
            current = name
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name == current and name not in types, line
            assert kind in ("counter", "gauge", "untyped"), line
            types[name] = kind
        else:
            match = SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            name, labels, value = match.groups()
            assert name == current and name in types, f"sample outside its family: {line!r}"
            key = (name, _labels(labels or ""))
            assert key not in samples, f"duplicate sample {line!r}"
            samples[key] = float(value)
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


# ---- the registry ---------------------------------------------------------------------


def test_render_parses_back_line_by_line() -> None:
    m = Metrics()
    m.sessions.inc(listener="127.0.0.1:587")
    m.sessions.inc(listener="127.0.0.1:587")
    m.sessions.inc(listener='odd "name"\\with\nnewline')
    m.accepted.inc()
    m.rejected.inc(reason="bad_data")
    m.deliveries.inc(outcome="deferred")
    m.tls_failures.inc(3)
    m.queue_messages.track(lambda: 7)
    m.queue_held.set(2)
    types, samples = parse(m.render())
    assert types == {
        "tls_relay_sessions_total": "counter",
        "tls_relay_messages_accepted_total": "counter",
        "tls_relay_messages_rejected_total": "counter",
        "tls_relay_deliveries_total": "counter",
        "tls_relay_tls_failures_total": "counter",
        "tls_relay_mta_sts_testing_total": "counter",
        "tls_relay_bounces_generated_total": "counter",
        "tls_relay_queue_messages": "gauge",
        "tls_relay_queue_held": "gauge",
        "tls_relay_connections_active": "gauge",
    }
    assert samples == {
        ("tls_relay_sessions_total", (("listener", "127.0.0.1:587"),)): 2,
        ("tls_relay_sessions_total", (("listener", 'odd "name"\\with\nnewline'),)): 1,
        ("tls_relay_messages_accepted_total", ()): 1,
        ("tls_relay_messages_rejected_total", (("reason", "bad_data"),)): 1,
        ("tls_relay_deliveries_total", (("outcome", "bounced"),)): 0,
        ("tls_relay_deliveries_total", (("outcome", "deferred"),)): 1,
        ("tls_relay_deliveries_total", (("outcome", "delivered"),)): 0,
        ("tls_relay_tls_failures_total", ()): 3,
        ("tls_relay_bounces_generated_total", ()): 0,
        ("tls_relay_queue_messages", ()): 7,
        ("tls_relay_queue_held", ()): 2,
        ("tls_relay_connections_active", ()): 0,
    }


def test_fresh_registry_shows_every_unlabelled_metric_at_zero() -> None:
    text = Metrics().render()
    assert "\ntls_relay_messages_accepted_total 0\n" in text
    assert text.startswith("# HELP tls_relay_sessions_total ")
    assert "# TYPE tls_relay_queue_held gauge\n" in text


@pytest.mark.parametrize(
    ("number", "text"),
    [
        (0, "0"),
        (3.0, "3"),
        (-2, "-2"),
        (0.25, "0.25"),
        (float("nan"), "NaN"),
        (float("inf"), "+Inf"),
        (float("-inf"), "-Inf"),
        (2.0**60, "1.152921504606847e+18"),
    ],
)
def test_format_value(number: float, text: str) -> None:
    assert format_value(number) == text


def test_labels_are_checked_and_counters_only_go_up() -> None:
    m = Metrics()
    with pytest.raises(ValueError, match="takes labels"):
        m.sessions.inc()
    with pytest.raises(ValueError, match="takes labels"):
        m.accepted.inc(reason="x")
    with pytest.raises(ValueError, match="only goes up"):
        m.accepted.inc(-1)
    with pytest.raises(ValueError, match="already registered"):
        m.counter("tls_relay_sessions_total", "again")


def test_failing_gauge_source_drops_only_its_sample() -> None:
    m = Metrics()

    def broken() -> float:
        raise OSError("hold/ vanished")

    m.queue_held.track(broken)
    m.accepted.inc()
    _, samples = parse(m.render())
    assert ("tls_relay_queue_held", ()) not in samples
    assert value(samples, "tls_relay_messages_accepted_total") == 1


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
    m.queue_messages.track(lambda: sched.queued)
    rcpts = [Recipient(address=a) for a in ("a@x.test", "b@y.test", "c@z.test")]
    env = QueueEnvelope(spool.new_id(), spool.clock(), "app@corp.test", rcpts, size=3)
    spool.store(env, b"x\r\n")
    await sched.start()
    try:
        # a delivered, b bounced (its DSN to app@corp.test is then delivered), c deferred
        await until(lambda: m.deliveries.get(outcome="delivered") == 2)
        assert m.deliveries.get(outcome="bounced") == 1
        assert m.deliveries.get(outcome="deferred") == 1
        assert m.bounces.get() == 1
        await until(lambda: sched.queued == 1)  # the DSN is gone; c's message waits
        _, samples = parse(m.render())
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
    assert m.tls_failures.get() == 1


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
