"""Delivery: hand one message's recipients for one destination domain to its MX hosts
over TLS, and say per recipient what happened.

Role: pick the destination (a ``delivery.routes`` next hop, else the MX hosts from
:class:`relay.mx.MxResolver`), try each host address in order until the recipients are
decided, with the TLS requirement of :func:`relay.policy.requirement` for each host;
return one :class:`Outcome` per recipient (delivered / transient / permanent, classified
where the reply or error was seen).  Keeps idle TLS sessions for reuse, enforces the
global and per-domain concurrency limits and an overall deadline per call, and logs one
line per attempt.  Any TLS or policy failure is transient and moves on to the next MX;
nothing is ever sent in plaintext (see relay/outbound.py).

Not: retry timing, spool state or bounces (scheduler), MX lookup (mx.py), TLS verdicts
(policy.py), SMTP session mechanics (outbound.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from relay.config import DeliveryConfig, PolicyConfig, TlsLevel
from relay.log import event
from relay.metrics import Metrics
from relay.mx import MxResolver, MxStatus, route_for
from relay.outbound import (
    Envelope,
    Failure,
    Session,
    Status,
    Target,
    Trace,
    TxResult,
    open_session,
    polite_quit,
    transact,
)
from relay.outbound_tls import ClientContexts, ContextKey
from relay.policy import Observed, Requirement, Verdict, decide, requirement

__all__ = ["Deliverer", "Outcome", "Status"]

log = logging.getLogger("relay.delivery")

MAX_ADDRESSES_PER_HOST = 4  # RFC 5321 §5.1: try addresses in order, but bound the effort
IDLE_TIMEOUT = 10.0  # seconds an idle pooled session is kept
QUIT_TIMEOUT = 5.0
MAX_STALE = 3  # dead pooled sessions replaced, at most, within one attempt
_LOG_OUTCOME = {
    Status.DELIVERED: "delivered",
    Status.TRANSIENT: "deferred",
    Status.PERMANENT: "bounced",
}


@dataclass(frozen=True)
class Outcome:
    recipient: str
    status: Status
    reason: str
    mx_host: str | None = None
    mx_ip: str | None = None
    tls: str | None = None  # "TLSv1.3 TLS_AES_256_GCM_SHA384"
    reply: str | None = None  # the MX's own reply ("550 5.1.1 text"), when there was one


PoolKey = tuple[Target, ContextKey]  # address, port, TLS mode, AUTH identity; context


class _Pool:
    """Idle TLS sessions per (target, context key); bounded per key, expiring."""

    def __init__(self, max_idle: int) -> None:
        # As many idle sessions per MX address as may be busy at once
        # (per_domain_concurrency): fewer would close and reopen TLS sessions
        # under steady load, which costs a full handshake each time.
        self.max_idle = max(1, max_idle)
        self._idle: dict[PoolKey, list[Session]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    def take(self, key: PoolKey) -> Session | None:
        sessions = self._idle.get(key)
        while sessions:
            session = sessions.pop()
            if session.smtp.is_connected:
                return session
            session.smtp.close()
        self._idle.pop(key, None)
        return None

    def put(self, key: PoolKey, session: Session) -> None:
        sessions = self._idle.setdefault(key, [])
        if len(sessions) >= self.max_idle:
            self._retire(key, sessions[0])
        loop = asyncio.get_running_loop()
        session.idle_since = loop.time()
        sessions.append(session)
        if self._sweeper is None:  # one timer for the pool, not one per put
            self._sweeper = loop.call_later(IDLE_TIMEOUT, self._sweep)

    def _sweep(self) -> None:
        """Retire sessions idle for IDLE_TIMEOUT; look again while any are pooled."""
        self._sweeper = None
        now = asyncio.get_running_loop().time()
        for key, sessions in list(self._idle.items()):
            for session in [s for s in sessions if now - s.idle_since >= IDLE_TIMEOUT]:
                self._retire(key, session)
        if any(self._idle.values()):
            oldest = min(s.idle_since for sessions in self._idle.values() for s in sessions)
            delay = max(0.1, oldest + IDLE_TIMEOUT - now)
            self._sweeper = asyncio.get_running_loop().call_later(delay, self._sweep)

    def _retire(self, key: PoolKey, session: Session) -> None:
        sessions = self._idle.get(key, [])
        if session in sessions:
            sessions.remove(session)
        task = asyncio.get_running_loop().create_task(polite_quit(session.smtp, QUIT_TIMEOUT))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for key, sessions in list(self._idle.items()):
            for session in list(sessions):
                self._retire(key, session)
        self._idle.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


class _Attempt:
    """Mutable state of one deliver() call: outcomes so far and the reasons seen."""

    def __init__(self, queue_id: str, recipients: Sequence[tuple[str, Sequence[str]]]) -> None:
        self.queue_id = queue_id
        self.recipients = list(recipients)
        self.outcomes: list[Outcome | None] = [None] * len(self.recipients)
        self.reasons: list[str] = []
        self.trace = Trace()
        self.target: Target | None = None  # the address being tried, for the deadline's log

    def pending(self) -> list[int]:
        return [i for i, outcome in enumerate(self.outcomes) if outcome is None]

    def record(
        self, pending: list[int], result: TxResult, session: Session
    ) -> dict[tuple[Status, str], list[int]]:
        """Store a transaction's decisions; recipients grouped by (status, reason)."""
        groups: dict[tuple[Status, str], list[int]] = {}
        target = session.target
        for j, decision in result.decided.items():
            i = pending[j]
            address = self.recipients[i][0]
            self.outcomes[i] = Outcome(
                address,
                decision.status,
                decision.reason,
                target.host,
                target.ip,
                session.tls,
                decision.reply,
            )
            groups.setdefault((decision.status, decision.reason), []).append(i)
        if result.session_error is not None:
            self.reasons.append(result.session_error)
            groups[(Status.TRANSIENT, result.session_error)] = self.pending()
        return groups

    def finish(self, status: Status, reason: str) -> list[Outcome]:
        """Fill every undecided recipient with *status*; the final list, in order."""
        return [
            out if out is not None else Outcome(addr, status, reason)
            for out, (addr, _) in zip(self.outcomes, self.recipients, strict=True)
        ]


class Deliverer:
    """Delivers to one destination domain per call; see the module docstring."""

    def __init__(
        self,
        cfg: DeliveryConfig,
        policy: PolicyConfig,
        hostname: str,
        resolver: MxResolver,
        metrics: Metrics | None = None,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self.policy = policy
        self.hostname = hostname
        self.resolver = resolver
        self._contexts = ClientContexts(cfg.ca_file)
        self._pool = _Pool(cfg.per_domain_concurrency)
        self._global = asyncio.Semaphore(cfg.concurrency)
        self._domains: dict[str, tuple[asyncio.Semaphore, int]] = {}

    async def deliver(
        self,
        queue_id: str,
        sender: str,
        mail_options: Sequence[str],
        domain: str,
        recipients: Sequence[tuple[str, Sequence[str]]],
        data: bytes,
    ) -> list[Outcome]:
        """One Outcome per recipient, in order.  Never raises for network trouble."""
        attempt = _Attempt(queue_id, recipients)
        if not recipients:
            return []
        async with self._slot(domain):
            try:
                # RFC 5321 §4.5.3.2 bounds each command; this bounds the whole call, so a
                # tarpitting MX cannot hold a worker however it drips its replies.
                async with asyncio.timeout(self.cfg.attempt_deadline):
                    await self._deliver(attempt, domain, sender, mail_options, data)
            except TimeoutError:
                reason = (
                    f"attempt deadline of {self.cfg.attempt_deadline:g}s exceeded "
                    f"during {attempt.trace.stage}"
                )
                attempt.reasons.append(reason)
                self._log(attempt, attempt.pending(), Status.TRANSIENT, reason, attempt.target)
        return attempt.finish(Status.TRANSIENT, "; ".join(attempt.reasons) or "no MX host tried")

    async def close(self) -> None:
        """QUIT and close every pooled session."""
        await self._pool.close()

    # ---- destinations ----------------------------------------------------------------------

    async def _deliver(
        self,
        attempt: _Attempt,
        domain: str,
        sender: str,
        mail_options: Sequence[str],
        data: bytes,
    ) -> None:
        for target in await self._targets(attempt, domain):
            if not attempt.pending():
                return
            await self._try_target(attempt, domain, target, sender, mail_options, data)

    async def _targets(self, attempt: _Attempt, domain: str) -> list[Target]:
        """Addresses to try, in order; empty (with outcomes or reasons set) if none."""
        route = route_for(self.cfg.routes, domain)
        if route is not None:
            host = route.host.strip("[]")  # "[host]": its addresses, no MX lookup
            attempt.trace.stage = f"address lookup of next hop {host}"
            addresses = await self.resolver.addresses(host)
            if not addresses:
                attempt.reasons.append(f"next hop {host} for {domain} has no address")
            return [
                Target(host, ip, route.port, route.implicit_tls, route.auth)
                for ip in addresses[:MAX_ADDRESSES_PER_HOST]
            ]
        attempt.trace.stage = f"MX lookup of {domain}"
        result = await self.resolver.resolve(domain)
        if result.status is not MxStatus.OK:
            status = Status.PERMANENT if result.status is MxStatus.PERMANENT else Status.TRANSIENT
            for i in attempt.pending():
                attempt.outcomes[i] = Outcome(attempt.recipients[i][0], status, result.reason)
            self._log(attempt, list(range(len(attempt.recipients))), status, result.reason)
            return []
        targets: list[Target] = []
        for mx in result.hosts[: self.cfg.max_mx_hosts]:
            addresses = mx.addresses or await self.resolver.addresses(mx.name)
            targets += [
                Target(mx.name, ip, self.cfg.port) for ip in addresses[:MAX_ADDRESSES_PER_HOST]
            ]
        if not targets:
            attempt.reasons.append(f"no MX host of {domain} has an address {result.reason}".strip())
        return targets

    # ---- one MX address --------------------------------------------------------------------

    async def _try_target(
        self,
        attempt: _Attempt,
        domain: str,
        target: Target,
        sender: str,
        mail_options: Sequence[str],
        data: bytes,
    ) -> None:
        req = requirement(self.policy, domain, target.host)
        ctx_key, ctx = self._contexts.for_requirement(req)
        key: PoolKey = (target, ctx_key)
        pending = attempt.pending()
        attempt.target = target
        got = await self._session(key, target, req, ctx, ctx_key[0], attempt.trace)
        if isinstance(got, Failure):
            self._no_session(attempt, pending, got, target, req)
            return
        session, verdict, reused = got
        env = Envelope(sender, mail_options, [attempt.recipients[i] for i in pending], data)
        for _ in range(MAX_STALE + 1):
            try:
                result = await transact(session, env, self.cfg, attempt.trace, reset=reused)
            except BaseException:
                session.smtp.close()  # deadline or cancellation mid-transaction: never pool it
                raise
            if not result.stale:
                break
            # A pooled session died while idle; nothing was sent: the next one.
            await polite_quit(session.smtp, QUIT_TIMEOUT)
            got = await self._session(key, target, req, ctx, ctx_key[0], attempt.trace)
            if isinstance(got, Failure):
                self._no_session(attempt, pending, got, target, req)
                return
            session, verdict, reused = got
        session.messages += 1
        groups = attempt.record(pending, result, session)
        for (status, reason), indexes in groups.items():
            self._log(attempt, indexes, status, reason, target, req, session.observed, verdict)
        await self._release(key, session, result.reusable and result.session_error is None)

    def _no_session(
        self,
        attempt: _Attempt,
        pending: list[int],
        failure: Failure,
        target: Target,
        req: Requirement,
    ) -> None:
        """No usable session to *target*: the recipients may try the next MX."""
        attempt.reasons.append(failure.reason)
        if failure.verdict is not None and not failure.verdict.ok:  # TLS/policy, not connect
            self.metrics.tls_failures.inc()
        self._log(
            attempt,
            pending,
            Status.TRANSIENT,
            failure.reason,
            target,
            req,
            failure.observed,
            failure.verdict,
        )

    async def _session(
        self,
        key: PoolKey,
        target: Target,
        req: Requirement,
        ctx: ssl.SSLContext,
        verify: bool,
        trace: Trace,
    ) -> tuple[Session, Verdict, bool] | Failure:
        """A pooled session that still satisfies *req*, or a new one; and whether it
        is a reused one (transact then sends RSET first, which also proves it alive)."""
        while self.cfg.connection_reuse and (session := self._pool.take(key)) is not None:
            verdict = decide(req, session.observed)  # the same pure verdict as a new session
            if verdict.ok:
                return session, verdict, True
            await polite_quit(session.smtp, QUIT_TIMEOUT)  # unfit now: not a failure
        got = await open_session(target, req, ctx, verify, self.cfg, self.hostname, trace)
        return got if isinstance(got, Failure) else (*got, False)

    async def _release(self, key: PoolKey, session: Session, reusable: bool) -> None:
        if (
            reusable
            and self.cfg.connection_reuse
            and session.messages < self.cfg.max_messages_per_connection
            and session.smtp.is_connected
        ):
            self._pool.put(key, session)
        else:
            await polite_quit(session.smtp, QUIT_TIMEOUT)

    @contextlib.asynccontextmanager
    async def _slot(self, domain: str) -> AsyncIterator[None]:
        """Per-domain, then global concurrency slot (the domain first, so a waiting
        delivery never holds a global slot)."""
        name = domain.lower().rstrip(".")
        sem, users = self._domains.get(
            name, (asyncio.Semaphore(self.cfg.per_domain_concurrency), 0)
        )
        self._domains[name] = (sem, users + 1)
        try:
            async with sem, self._global:
                yield
        finally:
            sem, users = self._domains[name]
            if users <= 1:
                del self._domains[name]
            else:
                self._domains[name] = (sem, users - 1)

    def _log(
        self,
        attempt: _Attempt,
        indexes: list[int],
        status: Status,
        reason: str,
        target: Target | None = None,
        req: Requirement | None = None,
        observed: Observed | None = None,
        verdict: Verdict | None = None,
    ) -> None:
        level_met: TlsLevel | None = verdict.level_met if verdict is not None else None
        event(
            log,
            "delivery",
            level=logging.INFO if status is Status.DELIVERED else logging.WARNING,
            queue_id=attempt.queue_id,
            rcpt=",".join(attempt.recipients[i][0] for i in indexes),
            mx=target.host if target else None,
            ip=target.ip if target else None,
            port=target.port if target else None,
            tls=observed.tls_version if observed else None,
            cipher=observed.cipher if observed else None,
            cert_sha256=observed.cert_fingerprint if observed else None,
            level_required=req.level.label if req else None,
            level_met=level_met.label if level_met is not None else None,
            outcome=_LOG_OUTCOME[status],
            reason=reason,
        )
