"""Metrics: counters and gauges, and the HTTP endpoint that serves them to Prometheus.

Role: :class:`Metrics` is the registry of every tls-relay metric (names, help text,
types and label names are all declared here, so the catalogue reads in one place).
The parts that count get it through their constructors (app.py wires it) and call
``metrics.accepted.inc()`` and the like; gauges whose value lives elsewhere (queue
size, open connections) read it through a callback at scrape time.  :meth:`render`
gives the Prometheus text exposition format 0.0.4.  :class:`MetricsServer` is a tiny
HTTP/1.1 responder for ``GET /metrics`` (404 for other paths, one request per
connection, bounded request size, read timeout and number of clients).

Not: deciding anything (it only counts what the parts report), histograms, or a
general web server - no keep-alive, no request bodies, no TLS (bind it to loopback
or a management network; the config names the address).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from relay.errors import RelayError
from relay.log import event

log = logging.getLogger("relay.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST = 8192  # bytes of request line + headers; a scraper sends a few hundred
READ_TIMEOUT = 5.0  # seconds for the whole exchange with one client
MAX_CLIENTS = 16  # concurrent connections; more are closed at once

F = TypeVar("F", bound="_Family")


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value as Prometheus writes it: integers without a point, NaN, +Inf."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


class _Family:
    """One metric name with its samples, keyed by label values (in label-name order)."""

    kind = "untyped"

    def __init__(
        self, name: str, help_text: str, labels: Sequence[str], lock: threading.Lock
    ) -> None:
        self.name = name
        self.help = help_text
        self.labels = tuple(labels)
        self._lock = lock
        self._values: dict[tuple[str, ...], float] = {}
        if not self.labels:
            self._values[()] = 0.0  # an unlabelled metric exists from the start, at 0

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {tuple(labels)}")
        return tuple(str(labels[name]) for name in self.labels)

    def get(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[tuple[tuple[str, ...], float]]:
        with self._lock:
            return sorted(self._values.items())


class Counter(_Family):
    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter only goes up (got {amount})")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount


class Gauge(_Family):
    kind = "gauge"

    def __init__(
        self, name: str, help_text: str, labels: Sequence[str], lock: threading.Lock
    ) -> None:
        super().__init__(name, help_text, labels, lock)
        self._read: Callable[[], float] | None = None

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def track(self, read: Callable[[], float]) -> None:
        """Take the (unlabelled) value from *read* at every scrape instead."""
        if self.labels:
            raise ValueError(f"{self.name}: only an unlabelled gauge can track a callback")
        self._read = read

    def samples(self) -> list[tuple[tuple[str, ...], float]]:
        if self._read is None:
            return super().samples()
        try:
            return [((), float(self._read()))]
        except Exception as exc:  # a failing source drops its sample, not the whole scrape
            event(log, "metric_unavailable", logging.WARNING, metric=self.name, error=exc)
            return []


class Metrics:
    """Every tls-relay metric.  One instance per process, made in app.py.

    A part built without one (unit tests) makes its own private instance, which
    nobody scrapes: counting is then a harmless no-op.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._families: list[_Family] = []
        self.sessions = self.counter(
            "tls_relay_sessions_total", "SMTP sessions admitted, per listener.", ("listener",)
        )
        self.accepted = self.counter(
            "tls_relay_messages_accepted_total", "Messages stored in the spool and given 250."
        )
        self.rejected = self.counter(
            "tls_relay_messages_rejected_total",
            "Messages refused after DATA (bad_data, spool_full, spool_error, shutdown).",
            ("reason",),
        )
        self.deliveries = self.counter(
            "tls_relay_deliveries_total",
            "Delivery results per recipient: delivered, deferred or bounced.",
            ("outcome",),
        )
        self.tls_failures = self.counter(
            "tls_relay_tls_failures_total",
            "Attempts at one MX address that failed the TLS requirement (STARTTLS missing, "
            "handshake, certificate, version); each defers to the next MX.",
        )
        self.mta_sts_testing = self.counter(
            "tls_relay_mta_sts_testing_total",
            "MTA-STS policies in mode testing, judged as enforce would at one MX address: "
            "pass or fail (delivery went on either way).",
            ("result",),
        )
        self.bounces = self.counter(
            "tls_relay_bounces_generated_total", "Failure DSNs (bounces) queued for senders."
        )
        self.queue_messages = self.gauge(
            "tls_relay_queue_messages", "Messages in queue/ known to the scheduler."
        )
        self.queue_held = self.gauge("tls_relay_queue_held", "Envelopes in hold/.")
        self.connections_active = self.gauge(
            "tls_relay_connections_active", "Open SMTP client connections, all listeners."
        )
        for outcome in ("delivered", "deferred", "bounced"):
            self.deliveries.inc(0, outcome=outcome)  # all three show from the first scrape

    def counter(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Counter:
        return self._add(Counter(name, help_text, labels, self._lock))

    def gauge(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Gauge:
        return self._add(Gauge(name, help_text, labels, self._lock))

    def _add(self, family: F) -> F:
        if any(f.name == family.name for f in self._families):
            raise ValueError(f"metric {family.name} is already registered")
        self._families.append(family)
        return family

    def render(self) -> str:
        """The text exposition format 0.0.4: HELP, TYPE, then one line per sample."""
        lines: list[str] = []
        for family in self._families:
            lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
            lines.append(f"# TYPE {family.name} {family.kind}")
            for key, value in family.samples():
                labels = ",".join(
                    f'{name}="{_escape_label(val)}"'
                    for name, val in zip(family.labels, key, strict=True)
                )
                sample = f"{family.name}{{{labels}}}" if labels else family.name
                lines.append(f"{sample} {format_value(value)}")
        return "\n".join(lines) + "\n"


class MetricsServer:
    """``GET /metrics`` over plain HTTP/1.1 on *host*:*port*; one request per connection."""

    def __init__(
        self,
        metrics: Metrics,
        host: str,
        port: int,
        *,
        read_timeout: float = READ_TIMEOUT,
        max_request: int = MAX_REQUEST,
        ready: Callable[[], str | None] | None = None,
    ) -> None:
        self.metrics = metrics
        self.ready = ready  # /readyz: None when ready, else why not (relay.health)
        self.host = host
        self.requested_port = port
        self.read_timeout = read_timeout
        self.max_request = max_request
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        if self._server is None or not self._server.sockets:
            return self.requested_port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._client,
                host=self.host,
                port=self.requested_port,
                limit=self.max_request,
                reuse_address=True,
            )
        except OSError as exc:
            raise RelayError(f"cannot listen on metrics address {self.address}: {exc}") from exc
        event(log, "metrics_start", address=self.address)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.wait(set(self._clients), timeout=1.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), timeout=1.0)
        self._server = None
        event(log, "metrics_stop", address=self.address)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or len(self._clients) >= MAX_CLIENTS:
            writer.close()
            return
        self._clients.add(task)
        try:
            async with asyncio.timeout(self.read_timeout):  # the whole exchange, both ways
                head = await self._read_head(reader)
                if head is not None:
                    writer.write(self._respond(head))
                    await writer.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            pass  # slow, vanished or half-sent request: just close
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(OSError, TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(writer.wait_closed(), timeout=1.0)

    async def _read_head(self, reader: asyncio.StreamReader) -> bytes | None:
        """Request line and headers, or None (after nothing useful) if too long."""
        try:
            return await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return b""  # answered with 431 below

    def _respond(self, head: bytes) -> bytes:
        if not head:
            return _response(431, "Request Header Fields Too Large", "request too large\n")
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return _response(400, "Bad Request", "bad request\n")
        method, target = parts[0], parts[1].split("?", 1)[0]
        if target not in ("/metrics", "/healthz", "/readyz"):
            return _response(404, "Not Found", "not found; try /metrics, /healthz, /readyz\n")
        if method != "GET":
            return _response(405, "Method Not Allowed", "only GET\n", ("Allow: GET",))
        if target == "/healthz":
            return _response(200, "OK", "ok\n")  # the process answers: it is alive
        if target == "/readyz":
            problem = self.ready() if self.ready is not None else None
            if problem is not None:
                return _response(503, "Service Unavailable", f"not ready: {problem}\n")
            return _response(200, "OK", "ready\n")
        return _response(200, "OK", self.metrics.render(), (f"Content-Type: {CONTENT_TYPE}",))


def _response(code: int, reason: str, body: str, headers: Sequence[str] = ()) -> bytes:
    payload = body.encode()
    if not any(h.startswith("Content-Type:") for h in headers):
        headers = (*headers, "Content-Type: text/plain; charset=utf-8")
    head = [f"HTTP/1.1 {code} {reason}", *headers]
    head += [f"Content-Length: {len(payload)}", "Connection: close"]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload
