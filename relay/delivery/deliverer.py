"""Delivery: hand one message's recipients for one destination domain to its MX hosts
over TLS, and say per recipient what happened.

Role: pick the destination (a ``delivery.routes`` next hop, else the MX hosts from
:class:`relay.delivery.mx.MxResolver`), try each host address in order until the recipients are
decided, with the TLS requirement of :func:`relay.tlspolicy.verdict.requirement` for each host;
return one :class:`Outcome` per recipient (delivered / transient / permanent, classified
where the reply or error was seen).  Keeps idle TLS sessions for reuse, enforces the
global and per-domain concurrency limits and an overall deadline per call, and logs one
line per progress.  Any TLS or policy failure is transient and moves on to the next MX;
nothing is ever sent in plaintext (see relay.delivery.session).

Not: retry timing, spool state or bounces (relay.queue), MX lookup (relay.delivery.mx), TLS
verdicts (relay.tlspolicy), SMTP sessions and transactions (relay.delivery.session,
relay.delivery.transaction), keeping idle sessions (relay.delivery.pool).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Sequence

from relay.config import DeliveryConfig, PolicyConfig, TlsLevel
from relay.delivery.mx import MxResolver, MxStatus, route_for
from relay.delivery.outcome import Outcome, Status
from relay.delivery.pool import QUIT_TIMEOUT, PoolKey, SessionPool
from relay.delivery.session import (
    Failure,
    OutboundSession,
    Target,
    Trace,
    open_session,
    polite_quit,
)
from relay.delivery.transaction import Transaction, TxResult, transact
from relay.domains import Domain
from relay.log import event
from relay.metrics import Metrics
from relay.tlspolicy.contexts import ClientContexts
from relay.tlspolicy.verdict import Observed, Requirement, Verdict, decide, requirement

log = logging.getLogger("relay.delivery")

MAX_ADDRESSES_PER_HOST = 4  # RFC 5321 §5.1: try addresses in order, but bound the effort
MAX_STALE = 3  # dead pooled sessions replaced, at most, within one attempt
_LOG_OUTCOME = {
    Status.DELIVERED: "delivered",
    Status.TRANSIENT: "deferred",
    Status.PERMANENT: "bounced",
}


class _Progress:
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
        self, pending: list[int], result: TxResult, session: OutboundSession
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
        contexts: ClientContexts,
        pool: SessionPool,
        metrics: Metrics,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.policy = policy
        self.hostname = hostname
        self.resolver = resolver
        self._contexts = contexts
        self._pool = pool
        self._global = asyncio.Semaphore(cfg.concurrency)
        self._domains: dict[Domain, tuple[asyncio.Semaphore, int]] = {}

    async def deliver(
        self,
        queue_id: str,
        sender: str,
        mail_options: Sequence[str],
        domain: Domain,
        recipients: Sequence[tuple[str, Sequence[str]]],
        data: bytes,
    ) -> list[Outcome]:
        """One Outcome per recipient, in order.  Never raises for network trouble."""
        progress = _Progress(queue_id, recipients)
        if not recipients:
            return []
        async with self._slot(domain):
            try:
                # RFC 5321 §4.5.3.2 bounds each command; this bounds the whole call, so a
                # tarpitting MX cannot hold a worker however it drips its replies.
                async with asyncio.timeout(self.cfg.attempt_deadline):
                    await self._deliver(progress, domain, sender, mail_options, data)
            except TimeoutError:
                reason = (
                    f"attempt deadline of {self.cfg.attempt_deadline:g}s exceeded "
                    f"during {progress.trace.stage}"
                )
                progress.reasons.append(reason)
                self._log(progress, progress.pending(), Status.TRANSIENT, reason, progress.target)
        return progress.finish(Status.TRANSIENT, "; ".join(progress.reasons) or "no MX host tried")

    async def close(self) -> None:
        """QUIT and close every pooled session."""
        await self._pool.close()

    # ---- destinations ----------------------------------------------------------------------

    async def _deliver(
        self,
        progress: _Progress,
        domain: Domain,
        sender: str,
        mail_options: Sequence[str],
        data: bytes,
    ) -> None:
        for target in await self._targets(progress, domain):
            if not progress.pending():
                return
            await self._try_target(progress, domain, target, sender, mail_options, data)

    async def _targets(self, progress: _Progress, domain: Domain) -> list[Target]:
        """Addresses to try, in order; empty (with outcomes or reasons set) if none."""
        route = route_for(self.cfg.routes, domain)
        if route is not None:
            host = route.host.strip("[]")  # "[host]": its addresses, no MX lookup
            progress.trace.stage = f"address lookup of next hop {host}"
            addresses = await self.resolver.addresses(host)
            if not addresses:
                progress.reasons.append(f"next hop {host} for {domain} has no address")
            return [
                Target(host, ip, route.port, route.implicit_tls, route.auth)
                for ip in addresses[:MAX_ADDRESSES_PER_HOST]
            ]
        progress.trace.stage = f"MX lookup of {domain}"
        result = await self.resolver.resolve(domain)
        if result.status is not MxStatus.OK:
            status = Status.PERMANENT if result.status is MxStatus.PERMANENT else Status.TRANSIENT
            for i in progress.pending():
                progress.outcomes[i] = Outcome(progress.recipients[i][0], status, result.reason)
            self._log(progress, list(range(len(progress.recipients))), status, result.reason)
            return []
        targets: list[Target] = []
        for mx in result.hosts[: self.cfg.max_mx_hosts]:
            addresses = mx.addresses or await self.resolver.addresses(mx.name)
            targets += [
                Target(mx.name, ip, self.cfg.port) for ip in addresses[:MAX_ADDRESSES_PER_HOST]
            ]
        if not targets:
            progress.reasons.append(
                f"no MX host of {domain} has an address {result.reason}".strip()
            )
        return targets

    # ---- one MX address --------------------------------------------------------------------

    async def _try_target(
        self,
        progress: _Progress,
        domain: Domain,
        target: Target,
        sender: str,
        mail_options: Sequence[str],
        data: bytes,
    ) -> None:
        req = requirement(self.policy, domain, target.host)
        ctx_key, ctx = self._contexts.for_requirement(req)
        key: PoolKey = (target, ctx_key)
        pending = progress.pending()
        progress.target = target
        got = await self._session(key, target, req, ctx, ctx_key[0], progress.trace)
        if isinstance(got, Failure):
            self._no_session(progress, pending, got, target, req)
            return
        session, verdict, reused = got
        tx = Transaction(sender, mail_options, [progress.recipients[i] for i in pending], data)
        for _ in range(MAX_STALE + 1):
            try:
                result = await transact(session, tx, self.cfg, progress.trace, reset=reused)
            except BaseException:
                session.smtp.close()  # deadline or cancellation mid-transaction: never pool it
                raise
            if not result.stale:
                break
            # A pooled session died while idle; nothing was sent: the next one.
            await polite_quit(session.smtp, QUIT_TIMEOUT)
            got = await self._session(key, target, req, ctx, ctx_key[0], progress.trace)
            if isinstance(got, Failure):
                self._no_session(progress, pending, got, target, req)
                return
            session, verdict, reused = got
        session.messages += 1
        groups = progress.record(pending, result, session)
        for (status, reason), indexes in groups.items():
            self._log(progress, indexes, status, reason, target, req, session.observed, verdict)
        await self._release(key, session, result.reusable and result.session_error is None)

    def _no_session(
        self,
        progress: _Progress,
        pending: list[int],
        failure: Failure,
        target: Target,
        req: Requirement,
    ) -> None:
        """No usable session to *target*: the recipients may try the next MX."""
        progress.reasons.append(failure.reason)
        if failure.verdict is not None and not failure.verdict.ok:  # TLS/policy, not connect
            self.metrics.tls_failures.inc()
        self._log(
            progress,
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
    ) -> tuple[OutboundSession, Verdict, bool] | Failure:
        """A pooled session that still satisfies *req*, or a new one; and whether it
        is a reused one (transact then sends RSET first, which also proves it alive)."""
        while self.cfg.connection_reuse and (session := self._pool.take(key)) is not None:
            verdict = decide(req, session.observed)  # the same pure verdict as a new session
            if verdict.ok:
                return session, verdict, True
            await polite_quit(session.smtp, QUIT_TIMEOUT)  # unfit now: not a failure
        got = await open_session(target, req, ctx, verify, self.cfg, self.hostname, trace)
        return got if isinstance(got, Failure) else (*got, False)

    async def _release(self, key: PoolKey, session: OutboundSession, reusable: bool) -> None:
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
    async def _slot(self, domain: Domain) -> AsyncIterator[None]:
        """Per-domain, then global concurrency slot (the domain first, so a waiting
        delivery never holds a global slot)."""
        name = domain  # the one normal form: every spelling shares one slot
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
        progress: _Progress,
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
            queue_id=progress.queue_id,
            rcpt=",".join(progress.recipients[i][0] for i in indexes),
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
