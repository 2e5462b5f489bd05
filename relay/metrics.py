"""Metrics: every tls-relay metric, on prometheus-client, and the HTTP endpoint that
serves them with ``/healthz`` and ``/readyz``.

Role: :class:`Metrics` declares every metric (names, help text, types and label
names read in one place).  The parts that count get it through their constructors
(app.py wires it) and call ``metrics.accepted.inc()`` and the like; gauges whose
value lives elsewhere (queue size, open connections) are read from a callback by
:meth:`Metrics.refresh`, every few seconds and before each scrape.
:class:`MetricsServer` is a tiny HTTP/1.1 responder for ``GET /metrics``,
``/healthz`` and ``/readyz`` (404 for other paths, one request per connection,
bounded request size, read timeout and number of clients).

Several processes: ``serve`` calls :func:`use_directory` before anything builds a
:class:`Metrics`.  prometheus-client then keeps every value in a small file per
process under ``<spool>/metrics`` (its multiprocess mode), and a scrape of any
process sums the files of all of them: with ``workers: N`` each worker serves the
one metrics socket the supervisor bound, and each answers for the whole relay.
Counters of a worker that died stay in the sum; its gauges leave it
(:func:`process_died`).  Because the library chooses that mode when it is first
imported, this module imports it only inside functions.

Not: deciding anything (it only counts what the parts report), or a general web
server - no keep-alive, no request bodies, no TLS (bind it to loopback or a
management network; the config names the address).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay.errors import RelayError
from relay.log import event

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger("relay.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST = 8192  # bytes of request line + headers; a scraper sends a few hundred
READ_TIMEOUT = 5.0  # seconds for the whole exchange with one client
MAX_CLIENTS = 16  # concurrent connections; more are closed at once
REFRESH_EVERY = 5.0  # seconds between gauge refreshes (each process; a scrape also does)
DIRECTORY_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's own switch

DEFER_REASONS = ("dns", "connection", "tls", "remote", "local")  # relay.delivery.outcome.Cause


def use_directory(path: Path) -> None:
    """Keep metric values in per-process files under *path*, emptied first (a new
    ``serve`` starts its counters at zero).  Before any :class:`Metrics` exists."""
    if "prometheus_client" in sys.modules and os.environ.get(DIRECTORY_ENV) != str(path):
        raise RuntimeError("prometheus_client was imported before metrics.use_directory")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    os.environ[DIRECTORY_ENV] = str(path)


def process_died(pid: int) -> None:
    """Take the gauges of a dead worker out of the sums (its counters stay)."""
    if os.environ.get(DIRECTORY_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class Metrics:
    """Every tls-relay metric.  One instance per process, made in app.py.

    A part built without one (unit tests) makes its own private instance, which
    nobody scrapes.  ``serve`` makes exactly one per process: in the multiprocess
    mode a second one would write the same keys of the same files.
    """

    def __init__(self) -> None:
        import prometheus_client as pc

        pc.disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series: they double every counter
        self.registry: CollectorRegistry = pc.CollectorRegistry(auto_describe=True)
        self._sources: list[tuple[str, Gauge, Callable[[], float]]] = []
        self._pc = pc

        def counter(name: str, text: str, labels: Sequence[str] = ()) -> Counter:
            return pc.Counter(name, text, labels, registry=self.registry)

        def gauge(name: str, text: str, mode: Any, labels: Sequence[str] = ()) -> Gauge:
            return pc.Gauge(name, text, labels, registry=self.registry, multiprocess_mode=mode)

        self._counters(counter)
        self._gauges(gauge)
        for outcome in ("delivered", "deferred", "bounced"):
            self.deliveries.labels(outcome=outcome)  # all three show from the first scrape
        for reason in DEFER_REASONS:
            self.deferrals.labels(reason=reason)
        for result in ("ok", "failed"):
            self.reloads.labels(result=result)

    def _counters(self, counter: Callable[..., Counter]) -> None:
        self.sessions = counter(
            "tls_relay_sessions_total", "SMTP sessions admitted, per listener.", ("listener",)
        )
        self.inbound_tls = counter(
            "tls_relay_inbound_tls_sessions_total",
            "Client sessions that completed a TLS handshake, per listener, version and cipher.",
            ("listener", "version", "cipher"),
        )
        self.accepted = counter(
            "tls_relay_messages_accepted_total", "Messages stored in the spool and given 250."
        )
        self.rejected = counter(
            "tls_relay_messages_rejected_total",
            "Messages refused after DATA (bad_data, header_too_large, spool_full, "
            "spool_error, shutdown).",
            ("reason",),
        )
        self.deliveries = counter(
            "tls_relay_deliveries_total",
            "Delivery results per recipient: delivered, deferred or bounced.",
            ("outcome",),
        )
        self.deferrals = counter(
            "tls_relay_deferrals_total",
            "Deferred recipients by reason class: dns, connection, tls (TLS or policy "
            "not met), remote (a 4xx reply), local.",
            ("reason",),
        )
        self.outbound_tls = counter(
            "tls_relay_outbound_tls_sessions_total",
            "New sessions to MX hosts that met their TLS requirement, per TLS version, "
            "level met and policy source (static, mta-sts, dane).",
            ("version", "level", "policy"),
        )
        self.tls_failures = counter(
            "tls_relay_tls_failures_total",
            "MX addresses that failed the TLS requirement, per RFC 8460 result type "
            "(each defers to the next MX).",
            ("result_type",),
        )
        self.mta_sts_testing = counter(
            "tls_relay_mta_sts_testing_total",
            "MTA-STS policies in mode testing, judged as enforce would at one MX address: "
            "pass or fail (delivery went on either way).",
            ("result",),
        )
        self.bounces = counter(
            "tls_relay_bounces_generated_total", "Failure DSNs (bounces) queued for senders."
        )
        self.reloads = counter(
            "tls_relay_reloads_total",
            "SIGHUP reloads per result (ok, failed); with workers, one per worker.",
            ("result",),
        )

    def _gauges(self, gauge: Callable[..., Gauge]) -> None:
        self.queue_messages = gauge(
            "tls_relay_queue_messages", "Messages in queue/ known to the scheduler.", "livesum"
        )
        self.queue_oldest = gauge(
            "tls_relay_queue_oldest_message_age_seconds",
            "Age of the oldest message in queue/ (0 when it is empty).",
            "livemax",
        )
        self.queue_held = gauge("tls_relay_queue_held", "Envelopes in hold/.", "livemax")
        self.connections_active = gauge(
            "tls_relay_connections_active",
            "Open SMTP client connections, all listeners.",
            "livesum",
        )
        self.cert_expiry = gauge(
            "tls_relay_certificate_expiry_timestamp_seconds",
            "When the listener certificate expires (Unix time), per config key "
            "(cert, rsa_cert); the earliest any live worker serves.",
            "livemin",
            ("certificate",),
        )
        self.reload_ok = gauge(
            "tls_relay_config_last_reload_successful",
            "1 when the last reload applied (or none was asked), 0 when it failed.",
            "livemin",
        )
        self.reload_ok.set(1)

    def track(self, gauge: Gauge, read: Callable[[], float]) -> None:
        """Set *gauge* (unlabelled) from *read* at every :meth:`refresh`."""
        name = next(iter(gauge.describe())).name
        self._sources.append((name, gauge, read))

    def refresh(self) -> None:
        for name, gauge, read in self._sources:
            try:
                gauge.set(float(read()))
            except Exception as exc:  # a failing source keeps its last value, not the scrape
                event(log, "metric_unavailable", logging.WARNING, metric=name, error=exc)

    def _scrape_registry(self) -> CollectorRegistry:
        path = os.environ.get(DIRECTORY_ENV)
        if not path:
            return self.registry
        from prometheus_client import multiprocess

        merged = self._pc.CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path)  # type: ignore[no-untyped-call]
        return merged

    def render(self) -> bytes:
        """The text exposition format 0.0.4, summed over every process."""
        self.refresh()
        return self._pc.generate_latest(self._scrape_registry())

    def sample(self, name: str, **labels: str) -> float:
        """One sample's value as a scrape would show it (0 when absent): for tests."""
        self.refresh()
        found = self._scrape_registry().get_sample_value(name, labels)
        return 0.0 if found is None else found


async def refresh_forever(metrics: Metrics, every: float = REFRESH_EVERY) -> None:
    """Keep this process's gauges current for scrapes that another worker answers."""
    while True:
        metrics.refresh()
        await asyncio.sleep(every)


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
        sock: socket.socket | None = None,
    ) -> None:
        self.metrics = metrics
        self.sock = sock  # bound by the supervisor, shared by every worker
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
            if self.sock is not None:
                self._server = await asyncio.start_server(
                    self._client, sock=self.sock, limit=self.max_request
                )
            else:
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


def _response(code: int, reason: str, body: str | bytes, headers: Sequence[str] = ()) -> bytes:
    payload = body if isinstance(body, bytes) else body.encode()
    if not any(h.startswith("Content-Type:") for h in headers):
        headers = (*headers, "Content-Type: text/plain; charset=utf-8")
    head = [f"HTTP/1.1 {code} {reason}", *headers]
    head += [f"Content-Length: {len(payload)}", "Connection: close"]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload
