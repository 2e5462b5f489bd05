"""The state of one delivery call, and the log line each attempt leaves.

Role: :class:`Progress` holds one ``Deliverer.deliver`` call's recipients, their
outcomes so far, the reasons seen, where the attempt is (for the deadline's log
line) and the domain's MTA-STS and DANE (TLSA) state; :func:`log_attempt` writes the one
``delivery`` line per attempt - queue id, recipients, MX host and address, TLS
version and cipher, certificate fingerprint, level required and met, the policy
source, the outcome and, on failure, the RFC 8460 result type.
Not: deciding anything (relay.delivery.deliverer, relay.tlspolicy.verdict).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from relay.config import PolicyConfig, TlsLevel
from relay.delivery.outcome import Cause, Evidence, Outcome, Status
from relay.delivery.session import OutboundSession, Target, Trace
from relay.delivery.txresult import TxResult
from relay.domains import Domain
from relay.log import event
from relay.mailformat import header_value
from relay.tlspolicy.dane import TlsaSet
from relay.tlspolicy.ststore import StsState
from relay.tlspolicy.verdict import Observed, Requirement, Verdict

log = logging.getLogger("relay.delivery")

_LOG_OUTCOME = {
    Status.DELIVERED: "delivered",
    Status.TRANSIENT: "deferred",
    Status.PERMANENT: "bounced",
}


class Progress:
    """Mutable state of one deliver() call: outcomes so far and the reasons seen."""

    def __init__(self, queue_id: str, recipients: Sequence[tuple[str, Sequence[str]]]) -> None:
        self.queue_id = queue_id
        self.recipients = list(recipients)
        self.outcomes: list[Outcome | None] = [None] * len(self.recipients)
        self.reasons: list[str] = []
        self.causes: set[Cause] = set()  # the classes of those reasons
        self.trace = Trace()
        self.target: Target | None = None  # the address being tried, for the deadline's log
        self.sts: StsState | None = None  # the domain's MTA-STS state, when it applies
        self.tlsa: dict[str, TlsaSet] = {}  # MX host -> its TLSA lookup, when DANE is on
        self.mx_secure = False  # the MX RRset was DNSSEC-validated
        self.requiretls = False  # MAIL FROM had REQUIRETLS (RFC 8689)
        self.relaxed = False  # `TLS-Required: No`, honoured: MTA-STS and DANE not applied
        self.requiretls_failures = 0  # hosts that failed REQUIRETLS's conditions
        self.other_failures = 0  # hosts that failed otherwise (connect, greeting, ...)
        self.counted = False  # sessions go into the TLS reports (relay.tlsrpt)

    def fail(self, reason: str, cause: Cause) -> None:
        """One more thing that went wrong on this attempt."""
        self.reasons.append(reason)
        self.causes.add(cause)

    def cause(self) -> Cause:
        """The most telling class among the causes seen (relay.delivery.outcome.Cause)."""
        return next((c for c in Cause if c in self.causes), Cause.LOCAL)

    def relax(self, policy: PolicyConfig, domain: Domain, head: bytes) -> None:
        """RFC 8689 4.2.2: ``TLS-Required: No`` asks that MTA-STS and DANE failures be
        ignored; honoured when configured and not REQUIRETLS, the configured level still
        applies (SPEC; so never for dane-only), and TLS is never given up."""
        floor = policy.for_domain(domain)[0].level
        if self.requiretls or not policy.honor_tls_required_no or floor >= TlsLevel.DANE:
            return
        self.relaxed = (header_value(head, "TLS-Required") or "").lower() == "no"
        if self.relaxed:
            event(log, "tls_required_no", queue_id=self.queue_id, domain=domain)

    def pending(self) -> list[int]:
        return [i for i, outcome in enumerate(self.outcomes) if outcome is None]

    def record(
        self,
        pending: list[int],
        result: TxResult,
        session: OutboundSession,
        req: Requirement,
        verdict: Verdict,
    ) -> dict[tuple[Status, str], list[int]]:
        """Store a transaction's decisions; recipients grouped by (status, reason)."""
        groups: dict[tuple[Status, str], list[int]] = {}
        target = session.target
        obs = session.observed
        evidence = Evidence(
            obs.tls_version,
            obs.cipher,
            obs.cert_fingerprint,
            req.level.label,
            verdict.level_met.label if verdict.level_met is not None else None,
            req.policy_source.value,
        )
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
                evidence,
                status_code=decision.code,
                next_hop_dsn=result.dsn,
                cause=None if decision.status is Status.DELIVERED else Cause.REMOTE,
            )
            groups.setdefault((decision.status, decision.reason), []).append(i)
        if result.session_error is not None:
            self.fail(result.session_error, Cause.CONNECTION)
            groups[(Status.TRANSIENT, result.session_error)] = self.pending()
        return groups

    def settle(self, status: Status, reason: str, cause: Cause, code: str | None = None) -> None:
        """Decide every recipient still pending with *status* (no session was made:
        DNS, a policy), and log it once."""
        pending = self.pending()
        for i in pending:
            self.outcomes[i] = Outcome(
                self.recipients[i][0], status, reason, status_code=code, cause=cause
            )
        log_attempt(self, pending, status, reason)

    def finish(self, status: Status, reason: str, code: str | None = None) -> list[Outcome]:
        """Fill every undecided recipient with *status* (and RFC 3463 *code*); the final
        list, in order."""
        cause = self.cause()
        return [
            out if out is not None else Outcome(addr, status, reason, status_code=code, cause=cause)
            for out, (addr, _) in zip(self.outcomes, self.recipients, strict=True)
        ]

    def requiretls_refused(self) -> bool:
        """RFC 8689 4.2.1: every host tried failed REQUIRETLS's conditions (none was
        merely unreachable, which a later attempt may find up): return the message."""
        return self.requiretls and self.requiretls_failures > 0 and self.other_failures == 0


def log_attempt(
    progress: Progress,
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
        policy=req.policy_source if req else None,  # static | mta-sts | dane
        outcome=_LOG_OUTCOME[status],
        result_type=verdict.result_type if verdict is not None else None,  # RFC 8460
        reason=reason,
    )


def log_testing(
    progress: Progress,
    domain: str,
    target: Target,
    verdict: Verdict | None,
    reason: str | None = None,
) -> None:
    """The ``mta_sts_testing`` line: how an MX fared under a policy in mode testing."""
    ok = verdict is not None and verdict.ok
    event(
        log,
        "mta_sts_testing",
        logging.INFO if ok else logging.WARNING,
        queue_id=progress.queue_id,
        domain=domain,
        id=progress.sts.id if progress.sts else None,
        mx=target.host,
        ip=target.ip,
        result="pass" if ok else "fail",
        result_type=None if verdict is None else verdict.result_type,
        reason=reason or (verdict.reason if verdict is not None else None),
    )
