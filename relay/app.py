"""The one place that builds and wires tls-relay's parts for ``tls-relay serve``.

Role: from a validated :class:`~relay.config.Config`, build the spool, the users
database, the server TLS context, the shared client gate and one
:class:`~relay.intake.listener.Listener` per configured listener (:func:`build`); run them
in an asyncio loop until SIGTERM or SIGINT, then stop cleanly (:func:`serve`).
Shutdown order: listeners first (no new mail; sessions get 421, a message being
written still gets its 250), then the queue side drains, then the metrics endpoint.

Metrics: one :class:`~relay.metrics.Metrics` registry, handed to the listeners, the
scheduler and the deliverer; the gauges read the gate, the scheduler and hold/ every
few seconds and at each scrape.  The HTTP endpoint runs only when ``metrics.address``
is configured; then :func:`serve` first puts the values in ``<spool>/metrics`` so
that every worker's scrape sums them all (relay.metrics).

The seam for the queue side is :meth:`App.on_queued` (the listener calls it after
each 250) and :meth:`App.start` / :meth:`App.stop`; the scheduler and deliverer are
created in :func:`build` next to the listeners.

Not: business logic of any step - every decision lives in the module named for it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import gc
import logging
import os
import signal
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from relay import log as relaylog
from relay import metrics as metricsmod
from relay import safeio, threads, workers
from relay.audit.trail import AuditTrail
from relay.config import (
    Config,
    DeliveryConfig,
    Limits,
    PolicyConfig,
    TlsLevel,
    TlsReportsConfig,
)
from relay.delivery.deliverer import Deliverer
from relay.delivery.mx import MxResolver
from relay.delivery.pool import SessionPool
from relay.health import Readiness
from relay.intake import tlscontext
from relay.intake.auth import PasswordChecker
from relay.intake.gate import Gate
from relay.intake.listener import Listener
from relay.intake.users import UserDb
from relay.log import event
from relay.metrics import Metrics, MetricsServer, refresh_forever
from relay.queue.envelope import QueueEnvelope, Recipient
from relay.queue.recovery import claim
from relay.queue.scheduler import Scheduler
from relay.queue.spool import Spool
from relay.reload import reload
from relay.tlspolicy.contexts import ClientContexts
from relay.tlspolicy.stsfetch import StsFetcher
from relay.tlspolicy.ststore import StsPolicies
from relay.tlsrpt import sender as tlsrpt_sender
from relay.tlsrpt.counts import TlsCounts
from relay.tlsrpt.sender import ReportSender
from relay.watch import watch_certificates, watch_dnssec

log = logging.getLogger("relay.app")


@dataclass
class App:
    cfg: Config
    spool: Spool
    users: UserDb | None
    ssl_context: ssl.SSLContext
    gate: Gate
    scheduler: Scheduler
    listeners: list[Listener] = field(default_factory=list)
    metrics: Metrics = field(default_factory=Metrics)
    metrics_server: MetricsServer | None = None
    resolver: MxResolver | None = None  # probed for DNSSEC when the policy asks for DANE
    tls_counts: TlsCounts | None = None  # RFC 8460 session counts (tls_reports configured)
    report_sender: ReportSender | None = None  # in one process only (worker 0)
    readiness: Readiness | None = None  # /readyz (relay.health)
    _dnssec_watch: asyncio.Task[None] | None = None
    _cert_watch: asyncio.Task[None] | None = None
    _auth_executor: concurrent.futures.ThreadPoolExecutor | None = None
    _reports_task: asyncio.Task[None] | None = None
    _refresh_task: asyncio.Task[None] | None = None

    def passwords_executor(self) -> concurrent.futures.ThreadPoolExecutor:
        """The scrypt threads, one pool for the process (a reload keeps it)."""
        if self._auth_executor is None:
            self._auth_executor = auth_executor()
        return self._auth_executor

    def on_queued(self, qid: str) -> None:
        """A message is on disk and acknowledged; hand it to the queue side."""
        event(log, "queued", logging.DEBUG, queue_id=qid)
        self.scheduler.enqueue(qid)

    async def start(self) -> None:
        if self.cfg.policy.dane and self.resolver is not None:
            # Deliveries wait for its first verdict (MxResolver.ready); listeners do not.
            dane_only = [d for d, p in self.cfg.policy.domains.items() if p.level >= TlsLevel.DANE]
            self._dnssec_watch = asyncio.create_task(watch_dnssec(self.resolver, dane_only))
        # Queue side first: its spool recovery must finish before any listener writes.
        await self.scheduler.start()
        if self.tls_counts is not None:
            self.tls_counts.start()
        if self.report_sender is not None:
            self._reports_task = asyncio.create_task(tlsrpt_sender.run(self.report_sender))
        started: list[Listener] = []
        try:
            # Before the listeners, so it is up by the time mail can arrive.
            if self.metrics_server is not None:
                await self.metrics_server.start()
            for listener in self.listeners:
                await listener.start()
                started.append(listener)
            if self.readiness is not None:
                self.readiness.listening = True
        except BaseException:
            await asyncio.gather(*(x.stop() for x in started), return_exceptions=True)
            await self._stop_dnssec_watch()
            if self.metrics_server is not None:
                await self.metrics_server.stop()
            await self.scheduler.stop(0)
            raise
        self._cert_watch = asyncio.create_task(
            watch_certificates(lambda: self.cfg.tls, self.metrics)
        )
        if self.metrics_server is not None:
            self._refresh_task = asyncio.create_task(refresh_forever(self.metrics))
        event(
            log,
            "relay_started",
            hostname=self.cfg.hostname,
            listeners=",".join(x.config.address for x in self.listeners),
            spool=self.spool.root,
            users=len(self.users) if self.users is not None else None,
            metrics=self.metrics_server.address if self.metrics_server else None,
            loop=type(asyncio.get_running_loop()).__module__.partition(".")[0],  # uvloop|asyncio
        )

    async def _stop_dnssec_watch(self) -> None:
        if self._dnssec_watch is not None:
            self._dnssec_watch.cancel()
            await asyncio.gather(self._dnssec_watch, return_exceptions=True)
            self._dnssec_watch = None

    async def stop(self) -> None:
        for task in (self._cert_watch, self._refresh_task):
            if task is not None:
                task.cancel()
        if self.readiness is not None:
            self.readiness.listening = False  # draining: take no new mail
        await self._stop_dnssec_watch()
        await asyncio.gather(*(x.stop() for x in self.listeners))
        await self.scheduler.stop(self.cfg.queue.shutdown_grace)
        if self._reports_task is not None:
            self._reports_task.cancel()
            await asyncio.gather(self._reports_task, return_exceptions=True)
        if self.tls_counts is not None:
            await self.tls_counts.stop()  # the last seconds of counts, written
        self.spool.fresh.clear()  # locks still held for messages never picked up
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        event(log, "relay_stopped")


def worker_limits(limits: Limits, worker: workers.Worker | None) -> Limits:
    """One worker's share of the connection caps (rounded up)."""
    if worker is None:
        return limits
    return dataclasses.replace(
        limits,
        max_connections=-(-limits.max_connections // worker.count),
        max_connections_per_ip=-(-limits.max_connections_per_ip // worker.count),
    )


def build(cfg: Config, worker: workers.Worker | None = None) -> App:
    """Create every part from *cfg*; nothing listens until :meth:`App.start`.
    As one of several workers: that worker's share of the connection caps, its
    shard of the queue, the listening sockets the supervisor bound."""
    spool = Spool(cfg.spool.path)
    spool.setup()
    users = UserDb.load(cfg.clients.users_file) if cfg.clients.users_file else None
    executor = auth_executor()
    passwords = PasswordChecker(users, executor) if users is not None else None
    context = tlscontext.server_context(cfg.tls)
    gate = Gate(worker_limits(cfg.limits, worker), cfg.clients.networks)  # per process
    metrics = Metrics()
    resolver = MxResolver(
        cfg.delivery.resolver, max_hosts=cfg.delivery.max_mx_hosts, dnssec=cfg.policy.dane
    )
    sts = mta_sts(cfg, resolver) if cfg.policy.mta_sts else None
    counts = None
    if cfg.tls_reports is not None:
        counts = TlsCounts(cfg.spool.path / "tlsrpt", str(worker.index) if worker else "0")
        counts.setup()
    deliverer = new_deliverer(
        cfg.delivery, cfg.policy, cfg.hostname, resolver, metrics, sts, counts, cfg.tls_reports
    )
    audit = None
    if cfg.audit is not None and cfg.audit.enabled:
        audit = AuditTrail(cfg.audit.path)
        audit.setup()
    scheduler = Scheduler(
        spool,
        deliverer,
        cfg.queue,
        cfg.hostname,
        concurrency=cfg.delivery.concurrency,
        metrics=metrics,
        shard=(worker.index, worker.count) if worker is not None else (0, 1),
        audit=audit,
    )
    app = App(
        cfg=cfg,
        spool=spool,
        users=users,
        ssl_context=context,
        gate=gate,
        scheduler=scheduler,
        metrics=metrics,
        resolver=resolver,
        tls_counts=counts,
    )
    app._auth_executor = executor
    if cfg.tls_reports is not None and (worker is None or worker.index == 0):
        app.report_sender = report_sender(cfg, resolver, spool, app.on_queued)
    sockets = worker.sockets if worker is not None else (None,) * len(cfg.listeners)
    app.listeners = [
        Listener(cfg, spec, spool, passwords, app.on_queued, context, gate, metrics, sock=sock)
        for spec, sock in zip(cfg.listeners, sockets, strict=True)
    ]
    observe(app, worker)
    return app


def observe(app: App, worker: workers.Worker | None) -> None:
    """The gauges' sources, readiness, and the metrics endpoint where one is configured."""
    metrics, gate, scheduler, spool, cfg = app.metrics, app.gate, app.scheduler, app.spool, app.cfg
    metrics.track(metrics.connections_active, lambda: gate.connections)
    metrics.track(metrics.queue_messages, lambda: scheduler.queued)
    metrics.track(metrics.queue_oldest, scheduler.oldest_age)
    metrics.track(metrics.queue_held, lambda: len(spool.ids(held=True)))  # one listdir
    app.readiness = Readiness(spool.queue_dir, cfg.limits.max_message_size)
    if cfg.metrics is not None:  # bind only where configured
        app.metrics_server = MetricsServer(
            metrics,
            cfg.metrics.host,
            cfg.metrics.port,
            ready=app.readiness.problem,
            sock=worker.metrics_socket if worker is not None else None,
        )


def new_deliverer(
    cfg: DeliveryConfig,
    policy: PolicyConfig,
    hostname: str,
    resolver: MxResolver,
    metrics: Metrics,
    sts: StsPolicies | None = None,
    reports: TlsCounts | None = None,
    reports_cfg: TlsReportsConfig | None = None,
) -> Deliverer:
    """The deliverer with its client TLS contexts (built once: loading a CA bundle is
    costly) and its pool of idle sessions (as many per MX address as may be busy at
    once, per_domain_concurrency: fewer would close and reopen TLS sessions under
    steady load)."""
    contexts = ClientContexts(cfg.ca_file)
    pool = SessionPool(cfg.per_domain_concurrency)
    sender = reports_cfg.sender if reports_cfg is not None else None
    return Deliverer(cfg, policy, hostname, resolver, contexts, pool, metrics, sts, reports, sender)


def report_sender(
    cfg: Config, resolver: MxResolver, spool: Spool, queued: Callable[[str], None]
) -> ReportSender:
    """RFC 8460 reports: TXT _smtp._tls through the relay's resolver, mailed reports
    through the relay's own queue (*queued* hands the stored message to a scheduler),
    HTTPS posts against the `verify` CA store."""
    assert cfg.tls_reports is not None

    def submit(sender: str, rcpts: list[str], data: bytes) -> None:
        recipients = [Recipient(address=r) for r in rcpts]
        env = QueueEnvelope(spool.new_id(), time.time(), sender, recipients, size=len(data))
        spool.store(env, data)
        queued(env.id)

    root = cfg.spool.path / "tlsrpt"
    return ReportSender(
        root,
        cfg.tls_reports,
        cfg.hostname,
        resolver.txt,
        resolver.addresses,
        submit,
        cfg.delivery.ca_file,
    )


def mta_sts(cfg: Config, resolver: MxResolver) -> StsPolicies:
    """MTA-STS (RFC 8461): TXT and mta-sts.DOMAIN through the relay's resolver, the
    policy over HTTPS against the same CA store as `verify`, cached under the spool."""
    fetcher = StsFetcher(resolver.addresses, cfg.delivery.ca_file, port=cfg.delivery.mta_sts_port)
    return StsPolicies(cfg.spool.path / "mta-sts", resolver.txt, fetcher)


AUTH_THREADS = 2  # scrypt checks at once, per process; more wait in line


def auth_executor() -> concurrent.futures.ThreadPoolExecutor:
    """The password checks' own threads (see relay.intake.auth.PasswordChecker)."""
    return threads.executor(AUTH_THREADS, "auth")


async def run(app: App) -> int:
    """Start *app*, wait for SIGTERM/SIGINT, stop it; the exit code."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in workers.STOP_SIGNALS:
        loop.add_signal_handler(sig, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: reload(app))
    try:
        await app.start()
        await stopping.wait()
        event(log, "relay_stopping", reason="signal")
        await app.stop()
    finally:
        for sig in (*workers.STOP_SIGNALS, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        safeio.flush_closes()  # lock descriptors the loop will not hand over any more
    return 0


def serve(cfg: Config) -> int:
    """``tls-relay serve``: run until SIGTERM/SIGINT, exit 0 after a clean stop.
    With ``workers`` above 1, relay.workers forks that many of :func:`serve_worker`."""
    relaylog.setup(cfg.log_level)
    signal.signal(signal.SIGHUP, workers.ignore_hangup)  # from the first moment on
    claimed = claim(cfg.spool.path)  # before recovery, sockets, anything: one serve a spool
    try:
        if cfg.metrics is not None:  # before any Metrics exists (relay.metrics)
            metricsmod.use_directory(cfg.spool.path / "metrics")
        count = workers.resolve(cfg)
        if count > 1:
            return workers.supervise(cfg, count, serve_worker)
        return serve_worker(cfg, None)
    finally:
        os.close(claimed)


def serve_worker(cfg: Config, worker: workers.Worker | None) -> int:
    """One relay process: the whole relay, or one of several (*worker*)."""
    tune_gc()
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(run(build(cfg, worker)))


GC_THRESHOLD = 200_000  # allocations between young-generation collections (default 700)


def tune_gc() -> None:
    """Fewer cyclic-GC passes: everything loaded so far is frozen out of them, and
    the young generation is collected every GC_THRESHOLD allocations, not every
    700.  Per message the relay allocates thousands of objects that reference
    counting frees at once; with the defaults the collector ran many times per
    message and walked every live object on each older-generation pass.  The 2 KiB
    per-core benchmark went from ~1.6 to ~1.3 ms CPU per message.  Cycles (e.g.
    exceptions with tracebacks) are still collected, just in larger batches."""
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 100)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (measured faster: see README, Performance), unless
    TLS_RELAY_LOOP=asyncio asks for the standard loop."""
    if os.environ.get("TLS_RELAY_LOOP", "uvloop") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
