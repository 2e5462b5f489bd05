"""Delivery: hand one message's recipients for one destination domain to its MX hosts
over TLS, and say per recipient what happened.

Role: pick the destination (a ``delivery.routes`` next hop, else the MX hosts from
:class:`relay.delivery.mx.MxResolver`), try each host address in order until the recipients are
decided, with the TLS requirement of :func:`relay.tlspolicy.verdict.requirement` for each host;
return one :class:`Outcome` per recipient (delivered / transient / permanent, classified
where the reply or error was seen).  Reuses idle TLS sessions (relay.delivery.sessions),
runs MTA-STS testing mode and counts sessions for TLS reports, enforces the
global and per-domain concurrency limits and an overall deadline per call, and logs one
line per progress.  Any TLS or policy failure is transient and moves on to the next MX;
nothing is ever sent in plaintext (see relay.delivery.session).

Not: retry timing, spool state or bounces (relay.queue), MX lookup (relay.delivery.mx),
which hosts DANE and MTA-STS allow (relay.delivery.hostpolicy), TLS verdicts
(relay.tlspolicy), SMTP sessions and transactions (relay.delivery.session,
relay.delivery.transaction), keeping idle sessions (relay.delivery.sessions,
relay.delivery.pool).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Sequence
from dataclasses import replace

from relay.body import Body
from relay.config import DeliveryConfig, PolicyConfig
from relay.delivery.hostpolicy import targets
from relay.delivery.mx import DnssecState, MxResolver, route_for
from relay.delivery.outcome import Cause, Outcome, Status
from relay.delivery.pool import QUIT_TIMEOUT, PoolKey, SessionPool
from relay.delivery.progress import Progress, log_attempt, log_testing
from relay.delivery.session import Failure, OutboundSession, Target, polite_quit
from relay.delivery.sessions import Got, Sessions
from relay.delivery.slots import Slots
from relay.delivery.transaction import Transaction, transact
from relay.domains import Domain
from relay.log import event
from relay.metrics import Metrics
from relay.tlspolicy.contexts import ClientContexts, ContextKey
from relay.tlspolicy.dane import TlsaStatus
from relay.tlspolicy.mtasts import Mode, StsPolicy
from relay.tlspolicy.ststore import StsPolicies
from relay.tlspolicy.verdict import (
    AUTHENTICATION,
    PolicySource,
    Requirement,
    Verdict,
    decide,
    precheck,
    requirement,
    with_requiretls,
)
from relay.tlsrpt.counts import TlsCounts
from relay.tlsrpt.report import count_session, policy_object

log = logging.getLogger("relay.delivery")

MAX_STALE = 3  # dead pooled sessions replaced, at most, within one attempt
REQUIRETLS_CODE = "5.7.30"  # RFC 8689 6: REQUIRETLS support required


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
        sts: StsPolicies | None = None,
        reports: TlsCounts | None = None,
        report_sender: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.policy = policy
        self.hostname = hostname
        self.resolver = resolver
        self._contexts = contexts
        self._pool = pool
        self._sessions = Sessions(cfg, hostname, pool, metrics)
        self._sts = sts  # None: MTA-STS off (policy mta_sts: false)
        self._reports = reports  # None: no TLS reports (no tls_reports in the config)
        self._report_sender = report_sender  # reports' own sessions are not counted
        self._slots = Slots(cfg.concurrency, cfg.per_domain_concurrency)

    async def deliver(
        self,
        queue_id: str,
        sender: str,
        mail_options: Sequence[str],
        domain: Domain,
        recipients: Sequence[tuple[str, Sequence[str]]],
        data: Body | bytes,
    ) -> list[Outcome]:
        """One Outcome per recipient, in order.  Never raises for network trouble."""
        data = data if isinstance(data, Body) else Body.of(data)
        progress = Progress(queue_id, recipients)
        if not recipients:
            return []
        progress.counted = self._reports is not None and sender != self._report_sender
        progress.requiretls = any(o.upper() == "REQUIRETLS" for o in mail_options)
        progress.relax(self.policy, domain, data.head)
        async with self._slots.slot(domain):
            try:
                # RFC 5321 §4.5.3.2 bounds each command; this bounds the whole call, so a
                # tarpitting MX cannot hold a worker however it drips its replies.
                async with asyncio.timeout(self.cfg.attempt_deadline):
                    await self._deliver(progress, domain, sender, mail_options, data)
            except TimeoutError:
                progress.other_failures += 1
                reason = (
                    f"attempt deadline of {self.cfg.attempt_deadline:g}s exceeded "
                    f"during {progress.trace.stage}"
                )
                progress.fail(reason, Cause.CONNECTION)
                log_attempt(progress, progress.pending(), Status.TRANSIENT, reason, progress.target)
        reason = "; ".join(progress.reasons) or "no MX host tried"
        if progress.requiretls_refused():
            return progress.finish(Status.PERMANENT, f"REQUIRETLS: {reason}", REQUIRETLS_CODE)
        return progress.finish(Status.TRANSIENT, reason)

    async def close(self) -> None:
        """QUIT and close every pooled session."""
        await self._pool.close()
        if self._sts is not None:
            await self._sts.close()

    # ---- destinations ----------------------------------------------------------------------

    async def _deliver(
        self,
        progress: Progress,
        domain: Domain,
        sender: str,
        mail_options: Sequence[str],
        data: Body,
    ) -> None:
        route = route_for(self.cfg.routes, domain)
        if route is None:
            progress.trace.stage = "the first DNSSEC probe of the resolver"
            await self.resolver.ready()
            if self.policy.dane and self.resolver.dnssec_state is DnssecState.UNKNOWN:
                # Fail closed: until the resolver answers the probe, nobody knows whether
                # the MX hosts publish DANE; waiting is safe, guessing is not.
                reason = (
                    "DANE is on but the resolver has not answered the DNSSEC probe yet "
                    f"({self.resolver.dnssec_problem}); deferred rather than sent without DANE"
                )
                progress.fail(reason, Cause.DNS)
                log_attempt(progress, progress.pending(), Status.TRANSIENT, reason)
                return
        if route is None and self._sts is not None:
            # MTA-STS names the MX hosts of a domain; a route's next hop is the
            # operator's choice, outside any recipient domain's policy.
            progress.trace.stage = f"MTA-STS discovery for {domain}"
            progress.sts = await self._sts.for_domain(domain)
        found = await targets(
            progress, domain, route, self.resolver, self.cfg, self.dane_active, self.metrics
        )
        if self._reports is not None and progress.counted:
            for host, tlsa in progress.tlsa.items():  # RFC 8460: dnssec-invalid, no session
                if tlsa.status is TlsaStatus.FAILED:
                    policy = policy_object(domain, tlsa)
                    self._reports.failure(policy, "dnssec-invalid", None, host, None)
        for target in found:
            if not progress.pending():
                return
            await self._try_target(progress, domain, target, sender, mail_options, data)

    @property
    def dane_active(self) -> bool:
        """DANE is asked for (policy ``dane: true``) and the resolver's AD bit is
        believed (relay.delivery.mx.MxResolver.probe_dnssec)."""
        return self.policy.dane and self.resolver.validated

    # ---- one MX address --------------------------------------------------------------------

    async def _try_target(
        self,
        progress: Progress,
        domain: Domain,
        target: Target,
        sender: str,
        mail_options: Sequence[str],
        data: Body,
    ) -> None:
        sts = progress.sts.policy if progress.sts is not None and not progress.relaxed else None
        tlsa = None if progress.relaxed else progress.tlsa.get(target.host)
        req = requirement(self.policy, domain, target.host, sts, tlsa, progress.mx_secure)
        if progress.requiretls:
            req = with_requiretls(req)
        pending = progress.pending()
        progress.target = target
        refused = precheck(req)
        if refused is not None:  # dane-only without usable TLSA: no connection at all
            self._count(progress, domain, target, req, refused)
            self._no_session(progress, pending, Failure(refused.reason, None, refused), target, req)
            return
        got, ctx_key, ctx = await self._open(progress, domain, target, req, sts)
        if isinstance(got, Failure):
            self._no_session(progress, pending, got, target, req)
            return
        key: PoolKey = (target, ctx_key)
        session = got[0]
        if progress.requiretls and not session.smtp.supports_extension("requiretls"):
            reason = f"{target.label} does not offer REQUIRETLS, which the message requires"
            progress.fail(reason, Cause.TLS)
            progress.requiretls_failures += 1
            log_attempt(progress, pending, Status.TRANSIENT, reason, target, req, session.observed)
            await self._sessions.release(key, session, True)  # fine for other mail
            return
        tx = Transaction(sender, mail_options, [progress.recipients[i] for i in pending], data)
        await self._transact(progress, domain, pending, key, req, ctx, tx, got)

    async def _open(
        self,
        progress: Progress,
        domain: Domain,
        target: Target,
        req: Requirement,
        sts: StsPolicy | None,
    ) -> tuple[Got, ContextKey, ssl.SSLContext]:
        """A session to *target* for *req*, counted for the TLS reports (a reused one
        was counted when it was made), and its client context."""
        ctx_key, ctx = self._contexts.for_requirement(req)
        dane = req.policy_source is PolicySource.DANE  # then MTA-STS is not consulted
        if sts is not None and sts.mode is Mode.TESTING and not dane:  # counts on its own
            return await self._testing_session(progress, domain, target, req, sts, (ctx_key, ctx))
        return await self._counted(progress, domain, (target, ctx_key), req, ctx), ctx_key, ctx

    async def _counted(
        self,
        progress: Progress,
        domain: Domain,
        key: PoolKey,
        req: Requirement,
        ctx: ssl.SSLContext,
    ) -> Got:
        """A session for *req* (pooled or new), a new one or a failure counted for the
        TLS reports (RFC 8460 counts every session; a reused one was counted when made)."""
        got = await self._sessions.get(key, req, ctx, progress.trace)
        if isinstance(got, Failure):
            self._count(progress, domain, key[0], req, got.verdict, None, got.local_ip)
        elif not got[2]:
            self._count(progress, domain, key[0], req, got[1])
        return got

    async def _transact(
        self,
        progress: Progress,
        domain: Domain,
        pending: list[int],
        key: PoolKey,
        req: Requirement,
        ctx: ssl.SSLContext,
        tx: Transaction,
        got: tuple[OutboundSession, Verdict, bool],
    ) -> None:
        """*tx* over the session *got*, or over a fresh one for each pooled session
        found dead before any data went; the outcomes recorded and logged."""
        target = key[0]
        session, verdict, reused = got
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
            again = await self._counted(progress, domain, key, req, ctx)
            if isinstance(again, Failure):
                self._no_session(progress, pending, again, target, req)
                return
            session, verdict, reused = again
        session.messages += 1
        if result.session_error is not None:
            progress.other_failures += 1  # a 4xx or a dropped session: worth another try
        if result.converted:  # RFC 6152 §3, as Postfix: 8-bit parts went as QP / base64
            event(log, "converted_to_7bit", queue_id=progress.queue_id, mx=target.label)
        groups = progress.record(pending, result, session, req, verdict)
        for (status, reason), indexes in groups.items():
            log_attempt(progress, indexes, status, reason, target, req, session.observed, verdict)
        await self._sessions.release(key, session, result.reusable and result.session_error is None)

    async def _testing_session(
        self,
        progress: Progress,
        domain: Domain,
        target: Target,
        req: Requirement,
        sts: StsPolicy,
        floor: tuple[ContextKey, ssl.SSLContext],
    ) -> tuple[Got, ContextKey, ssl.SSLContext]:
        """MTA-STS mode testing (RFC 8461 5): judge the session as enforce would, log
        the outcome, deliver under the floor.  The handshake verifies the chain so the
        policy can be judged; if the chain is what fails, the floor (which may not ask
        for a trusted certificate) gets a session of its own."""
        probe = requirement(self.policy, domain, target.host, replace(sts, mode=Mode.ENFORCE))
        probe_key, probe_ctx = self._contexts.for_requirement(probe)
        got = await self._sessions.get((target, probe_key), req, probe_ctx, progress.trace)
        if not isinstance(got, Failure):
            judged = decide(probe, got[0].observed)
            self._log_testing(progress, domain, target, judged)
            if not got[2]:  # a reused session was counted when it was made
                self._count(progress, domain, target, probe, judged, sts)
            return got, probe_key, probe_ctx
        untrusted = got.observed is not None and got.observed.handshake_error is not None
        self._log_testing(progress, domain, target, got.verdict, got.reason)
        self._count(progress, domain, target, probe, got.verdict, sts, got.local_ip)
        floor_key, floor_ctx = floor
        if not untrusted or floor_key == probe_key:
            return got, probe_key, probe_ctx  # the floor fails the same way
        got = await self._sessions.get((target, floor_key), req, floor_ctx, progress.trace)
        return got, floor_key, floor_ctx

    def _log_testing(
        self,
        progress: Progress,
        domain: Domain,
        target: Target,
        verdict: Verdict | None,
        reason: str | None = None,
    ) -> None:
        ok = verdict is not None and verdict.ok
        self.metrics.mta_sts_testing.labels(result="pass" if ok else "fail").inc()
        log_testing(progress, domain, target, verdict, reason)

    def _count(
        self,
        progress: Progress,
        domain: Domain,
        target: Target,
        req: Requirement,
        verdict: Verdict | None,
        sts: StsPolicy | None = None,
        local_ip: str | None = None,
    ) -> None:
        """One session for the TLS reports (RFC 8460)."""
        if self._reports is not None and progress.counted and verdict is not None:
            if sts is None and progress.sts is not None and not progress.relaxed:
                sts = progress.sts.policy
            where = (local_ip, target.host, target.ip)
            count_session(self._reports, domain, where, req, verdict, sts)

    def _no_session(
        self,
        progress: Progress,
        pending: list[int],
        failure: Failure,
        target: Target,
        req: Requirement,
    ) -> None:
        """No usable session to *target*: the recipients may try the next MX."""
        verdict = failure.verdict
        tls = verdict is not None and not verdict.ok  # TLS/policy, not connect
        progress.fail(failure.reason, Cause.TLS if tls else Cause.CONNECTION)
        if verdict is not None and tls:
            self.metrics.tls_failures.labels(result_type=verdict.result_type or "other").inc()
        if verdict is not None and verdict.result_type in AUTHENTICATION:
            progress.requiretls_failures += 1  # RFC 8689: the server is not authenticated
        else:
            progress.other_failures += 1  # may pass later (a 454, a reset, no answer)
        log_attempt(
            progress,
            pending,
            Status.TRANSIENT,
            failure.reason,
            target,
            req,
            failure.observed,
            failure.verdict,
        )
