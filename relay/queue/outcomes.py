"""One delivery pass over one message, and what each recipient's outcome makes of it.

Role: hand a message's due recipients to the deliverer, one destination domain at a
time (concurrently, within the scheduler's slots), and turn every
:class:`~relay.delivery.outcome.Outcome` into durable spool state at once: delivered,
deferred until the next attempt from :mod:`relay.queue.retry`, or bounced with an
RFC 3464 DSN (:mod:`relay.queue.bounce`) that is stored, as a new message from
``<>``, before the recipients are marked.  The order of those writes is what makes a
crash safe: a DSN may be sent twice, never zero times; a recipient the MX accepted
is recorded before the pass goes on.
Not: when a message is due or which process handles it (relay.queue.scheduler),
SMTP (relay.delivery), or the DSN's format (relay.queue.bounce).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from relay.audit.trail import AuditError, AuditTrail
from relay.body import Body
from relay.config import QueueConfig
from relay.delivery.outcome import Cause, Outcome, Status
from relay.domains import Domain, domain_of
from relay.errors import InvalidDomain, SpoolError
from relay.log import event
from relay.mailformat import header_value
from relay.metrics import Metrics
from relay.queue import bounce, retry
from relay.queue.envelope import Attempt, AttemptOutcome, QueueEnvelope, RcptState, Recipient
from relay.queue.spool import Spool

log = logging.getLogger("relay.scheduler")

AUDIT_FIELD_MAX = 998  # RFC 5322 line limit: Message-ID and reply as recorded

T = TypeVar("T")


class DelivererLike(Protocol):
    """relay.delivery.deliverer.Deliverer as the queue uses it."""

    async def deliver(
        self,
        queue_id: str,
        sender: str,
        mail_options: Sequence[str],
        domain: Domain,
        recipients: Sequence[tuple[str, Sequence[str]]],
        data: Body,
    ) -> Sequence[Outcome]: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class PassContext:
    """What every pass of one scheduler shares."""

    spool: Spool
    deliverer: DelivererLike
    cfg: QueueConfig
    hostname: str
    clock: Callable[[], float]
    rand: random.Random
    metrics: Metrics
    slots: asyncio.Semaphore  # concurrent domain deliveries, across messages
    enqueue: Callable[[str], None]  # a stored DSN is a new message
    audit: AuditTrail | None = None  # evidence of each delivered recipient, written first


@dataclass
class DeliveryPass:
    """One pass over one message; call :meth:`run` with its message locked."""

    ctx: PassContext
    env: QueueEnvelope
    data: Body
    guard: asyncio.Lock = field(default_factory=asyncio.Lock)  # apply + write, per domain
    to_bounce: list[Recipient] = field(default_factory=list)
    to_relay: list[Recipient] = field(default_factory=list)  # NOTIFY=SUCCESS, no DSN next
    write_failed: bool = False
    notices_failed: bool = False  # a DSN could not be stored: its recipients stay pending
    message_id: str | None = None  # read from the data when the first audit record is made

    async def run(self, due: list[Recipient]) -> None:
        """Deliver *due*, record every outcome, store DSNs and a delay warning."""
        domains, invalid = _by_domain(due)
        if invalid:
            # Intake refuses such addresses; one spooled by an older version cannot be
            # matched to its domain's policy, so it is never delivered (fail closed).
            outcomes = [Outcome(r.address, Status.PERMANENT, why) for r, why in invalid]
            await self._record("(invalid domain)", [r for r, _ in invalid], outcomes)
        if not domains:
            pass
        elif len(domains) == 1:  # the common case: no task group needed
            await self._deliver_domain(*next(iter(domains.items())))
        else:
            async with asyncio.TaskGroup() as group:
                for domain, rcpts in domains.items():
                    group.create_task(self._deliver_domain(domain, rcpts))
        await self._finish()

    async def _deliver_domain(self, domain: Domain, rcpts: list[Recipient]) -> None:
        async with self.ctx.slots:
            outcomes = await self._call_deliverer(domain, rcpts)
        await self._record(domain, rcpts, outcomes)

    async def _record(self, domain: str, rcpts: list[Recipient], outcomes: list[Outcome]) -> None:
        """Apply *outcomes* and make them durable at once, one domain at a time; the
        audit records of the delivered ones go to disk before any of that."""
        await self._audit(outcomes)
        async with self.guard:
            now = self.ctx.clock()
            for rcpt, outcome in zip(rcpts, outcomes, strict=True):
                self._apply(rcpt, outcome, now)
            if self.env.done and not self.to_bounce:
                return  # removing the message right after is the durable record
            try:  # durable at once: a restart never re-sends to these recipients
                await off_loop(self.ctx.spool.update, self.env)
            except SpoolError as exc:
                self.write_failed = True
                event(
                    log,
                    "queue_write_failed",
                    level=logging.ERROR,
                    queue_id=self.env.id,
                    domain=domain,
                    error=exc,
                )

    async def _audit(self, outcomes: list[Outcome]) -> None:
        """Audit lines first: a crash after them may repeat one, never lose one.  A trail
        that cannot be written does not undo a delivery the MX accepted: the records go
        to the log at ERROR instead, and the recipients are recorded as delivered."""
        trail = self.ctx.audit
        delivered = [o for o in outcomes if o.status is Status.DELIVERED]
        if trail is None or not delivered:
            return
        if self.message_id is None:
            self.message_id = header_value(self.data.head, "Message-ID") or ""
        now = self.ctx.clock()
        records = [audit_record(self.env, o, self.message_id, now) for o in delivered]
        try:
            await trail.append(records)
        except AuditError as exc:
            for record in records:
                event(log, "audit_write_failed", logging.ERROR, error=exc, record=record)

    async def _call_deliverer(self, domain: Domain, rcpts: list[Recipient]) -> list[Outcome]:
        env = self.env
        try:
            got = await self.ctx.deliverer.deliver(
                env.id,
                env.sender,
                env.mail_options,
                domain,
                [(r.address, r.options) for r in rcpts],
                self.data,
            )
        except Exception as exc:  # a delivery bug defers, it never loses or bounces mail
            event(
                log,
                "delivery_error",
                level=logging.ERROR,
                queue_id=env.id,
                domain=domain,
                error=repr(exc),
            )
            got = []
        if len(got) == len(rcpts):
            return list(got)  # one per recipient, same order (the delivery contract)
        by_address = {o.recipient: o for o in got}
        missing = "local error: delivery gave no outcome"
        return [
            by_address.get(r.address, Outcome(r.address, Status.TRANSIENT, missing)) for r in rcpts
        ]

    def _apply(self, rcpt: Recipient, outcome: Outcome, now: float) -> None:
        o = outcome
        rcpt.attempts += 1
        rcpt.record(
            Attempt(
                now,
                AttemptOutcome(o.status),
                o.reason,
                o.mx_host,
                o.mx_ip,
                o.tls,
                o.reply,
                o.status_code,
            )
        )
        if o.status is Status.DELIVERED:
            rcpt.state = RcptState.DELIVERED
            if not o.next_hop_dsn and bounce.wants_notice(rcpt, bounce.DsnKind.RELAYED):
                self.to_relay.append(rcpt)  # RFC 3461 6.2.3: nobody further will tell
        elif o.status is Status.PERMANENT:
            self.to_bounce.append(rcpt)  # marked bounced in _finish, after its DSN is stored
            return
        else:
            jitter = self.ctx.rand.uniform(-1.0, 1.0)
            nxt = retry.next_attempt(rcpt.attempts, self.env.created, now, self.ctx.cfg, jitter)
            if nxt is None:  # RFC 5321 4.5.4.1: out of lifetime, give up
                why = f"delivery time expired; last error: {outcome.reason}"
                rcpt.record(Attempt(at=now, outcome=AttemptOutcome.EXPIRED, reason=why))
                self.to_bounce.append(rcpt)
                return
            rcpt.state, rcpt.next_attempt = RcptState.DEFERRED, nxt
            self.ctx.metrics.deferrals.labels(reason=str(o.cause or Cause.LOCAL)).inc()
        self._log_state(self.env, rcpt, outcome.mx_host)

    async def _finish(self) -> None:
        """Bounces (DSN stored before the recipients are marked), delay warning; then,
        if any state write failed, one more try.  ``write_failed`` stays True when the
        spool still cannot take it: the caller keeps this envelope in memory."""
        try:
            await self._notices()
        except SpoolError as exc:
            # The recipients to bounce stay as they were (not bounced, already due): the
            # caller must wait before the next pass, or it would ask the MX again at once.
            self.notices_failed = True
            event(log, "dsn_store_failed", logging.ERROR, queue_id=self.env.id, error=exc)
        if self.write_failed:
            try:
                await off_loop(self.ctx.spool.update, self.env)
                self.write_failed = False
            except SpoolError as exc:
                event(log, "queue_write_failed", logging.ERROR, queue_id=self.env.id, error=exc)

    async def _notices(self) -> None:
        env, now = self.env, self.ctx.clock()
        if self.to_bounce:
            # Store the DSN first: a crash between the two writes may send it twice,
            # never zero times.
            await self._notify(self.to_bounce, bounce.DsnKind.FAILED, now)
            for rcpt in self.to_bounce:
                rcpt.state = RcptState.BOUNCED
                self._log_state(env, rcpt, None)
            await off_loop(self.ctx.spool.update, env)
        if self.to_relay:
            await self._notify(self.to_relay, bounce.DsnKind.RELAYED, now)
            self.to_relay = []
        if retry.warning_due(env.created, now, self.ctx.cfg, env.warned):
            late = [r for r in env.recipients if r.state is RcptState.DEFERRED]
            await self._notify(late, bounce.DsnKind.DELAYED, now)
            env.warned = True
            await off_loop(self.ctx.spool.update, env)

    async def _notify(self, rcpts: list[Recipient], kind: bounce.DsnKind, now: float) -> None:
        env = self.env
        wanted = [r for r in rcpts if bounce.wants_notice(r, kind)]
        if not wanted:
            return
        if not env.sender or env.bounce:  # RFC 5321 4.5.5 / RFC 3464: never bounce a bounce
            event(log, "dsn_suppressed", queue_id=env.id, kind=kind, reason="null sender")
            return
        until = (
            retry.expires_at(env.created, self.ctx.cfg) if kind is bounce.DsnKind.DELAYED else None
        )
        new_id = self.ctx.spool.new_id()
        dsn_env, blob = await off_loop(  # may read the message from disk (RET=FULL)
            bounce.dsn_message, env, wanted, self.ctx.hostname, now, self.data, kind, new_id, until
        )
        await off_loop(self.ctx.spool.store, dsn_env, blob)
        event(
            log,
            "dsn_queued",
            queue_id=env.id,
            dsn_id=new_id,
            kind=kind,
            to=env.sender,
            recipients=",".join(r.address for r in wanted),
        )
        if kind is bounce.DsnKind.FAILED:
            self.ctx.metrics.bounces.inc()
        self.ctx.enqueue(new_id)

    def _log_state(self, env: QueueEnvelope, rcpt: Recipient, mx: str | None) -> None:
        nxt = rcpt.next_attempt if rcpt.state is RcptState.DEFERRED else None
        self.ctx.metrics.deliveries.labels(outcome=str(rcpt.state)).inc()  # delivered|deferred|...
        if rcpt.state is RcptState.DELIVERED:
            return  # the deliverer's line (outcome=delivered, MX, TLS) is the record
        event(
            log,
            "queue_state",
            queue_id=env.id,
            recipient=rcpt.address,
            state=rcpt.state,
            attempts=rcpt.attempts,
            next_in=None if nxt is None else round(nxt - self.ctx.clock()),
            mx=mx,
            reason=rcpt.last_reason,
        )

    # -- control socket -----------------------------------------------------------


def due_recipients(env: QueueEnvelope, now: float) -> list[Recipient]:
    return [r for r in env.recipients if not r.state.final and r.next_attempt <= now]


def _by_domain(
    rcpts: list[Recipient],
) -> tuple[dict[Domain, list[Recipient]], list[tuple[Recipient, str]]]:
    """Recipients grouped by their domain's normal form (every spelling of a domain in
    one group, under its policy), and those whose domain is not valid, with why."""
    groups: dict[Domain, list[Recipient]] = {}
    invalid: list[tuple[Recipient, str]] = []
    for rcpt in rcpts:
        try:
            groups.setdefault(domain_of(rcpt.address), []).append(rcpt)
        except InvalidDomain as exc:
            invalid.append((rcpt, f"recipient domain refused: {exc}"))
    return groups, invalid


async def off_loop(fn: Callable[..., T], *args: object) -> T:
    """Run blocking spool I/O in a thread.  If we are cancelled meanwhile, wait for
    the thread anyway, so the message lock is never released mid-write."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


def audit_record(env: QueueEnvelope, o: Outcome, message_id: str, now: float) -> dict[str, Any]:
    """The audit trail's record of one delivered recipient (relay.audit.trail)."""
    ev = o.evidence
    when = dt.datetime.fromtimestamp(now, dt.UTC).isoformat(timespec="milliseconds")
    message_id = message_id[:AUDIT_FIELD_MAX]  # a line stays far below the trail's TAIL
    return {
        "time": when.replace("+00:00", "Z"),
        "queue_id": env.id,
        "message_id": message_id or None,
        "sender": env.sender,
        "recipient": o.recipient,
        "mx_host": o.mx_host,
        "mx_ip": o.mx_ip,
        "tls_version": ev.tls_version if ev else None,
        "cipher": ev.cipher if ev else None,
        "cert_sha256": ev.cert_sha256 if ev else None,
        "level_required": ev.level_required if ev else None,
        "level_met": ev.level_met if ev else None,
        "policy_source": ev.policy_source if ev else None,
        "reply": o.reply[:AUDIT_FIELD_MAX] if o.reply else o.reply,
    }
