"""Where the deliverer gets a TLS session to an MX address, and where it goes after.

Role: :class:`Sessions` hands out a pooled session whose recorded TLS facts still
satisfy the requirement of this delivery (the same pure verdict a new session gets,
relay.tlspolicy.verdict.decide), else opens a new one (relay.delivery.session) and
counts it in the outbound TLS metrics; after a transaction it keeps a reusable
session in the pool (relay.delivery.pool) or ends it with QUIT.
Not: which requirement applies (relay.tlspolicy.verdict), MTA-STS testing or TLS
reports (relay.delivery.deliverer), the SMTP transaction (relay.delivery.transaction).
"""

from __future__ import annotations

import ssl

from relay.config import DeliveryConfig
from relay.delivery.pool import QUIT_TIMEOUT, PoolKey, SessionPool
from relay.delivery.session import Failure, OutboundSession, Trace, open_session, polite_quit
from relay.metrics import Metrics
from relay.tlspolicy.verdict import Requirement, Verdict, decide

Got = tuple[OutboundSession, Verdict, bool] | Failure  # session, its verdict, reused?


class Sessions:
    """Pooled or new outbound sessions, per (target, client context) key."""

    def __init__(
        self, cfg: DeliveryConfig, hostname: str, pool: SessionPool, metrics: Metrics
    ) -> None:
        self.cfg = cfg
        self.hostname = hostname
        self.pool = pool
        self.metrics = metrics

    async def get(self, key: PoolKey, req: Requirement, ctx: ssl.SSLContext, trace: Trace) -> Got:
        """A pooled session that still satisfies *req*, or a new one; and whether it
        is a reused one (transact then sends RSET first, which also proves it alive)."""
        target, (verify, _) = key
        while self.cfg.connection_reuse and (session := self.pool.take(key)) is not None:
            verdict = decide(req, session.observed)  # the same pure verdict as a new session
            if verdict.ok:
                return session, verdict, True
            await polite_quit(session.smtp, QUIT_TIMEOUT)  # unfit now: not a failure
        got = await open_session(target, req, ctx, verify, self.cfg, self.hostname, trace)
        if isinstance(got, Failure):
            return got
        observed, level = got[0].observed, got[1].level_met
        self.metrics.outbound_tls.labels(
            version=observed.tls_version or "none",
            level=level.label if level is not None else "none",
            policy=req.policy_source.value,
        ).inc()
        return (*got, False)

    async def release(self, key: PoolKey, session: OutboundSession, reusable: bool) -> None:
        """Keep *session* for the next message to the same key, or QUIT it."""
        if (
            reusable
            and self.cfg.connection_reuse
            and session.messages < self.cfg.max_messages_per_connection
            and session.smtp.is_connected
        ):
            self.pool.put(key, session)
        else:
            await polite_quit(session.smtp, QUIT_TIMEOUT)
