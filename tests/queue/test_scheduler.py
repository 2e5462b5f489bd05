"""scheduler.py with a real Spool on tmp_path, a scripted fake deliverer and a fake clock."""

from __future__ import annotations

import asyncio
import email
import random
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from relay.app import new_deliverer
from relay.body import Body
from relay.config import DeliveryConfig, PolicyConfig, QueueConfig, Route
from relay.delivery.deliverer import Deliverer
from relay.delivery.mx import MxResolver
from relay.delivery.outcome import Outcome, Status
from relay.errors import SpoolError, SpoolFullError
from relay.metrics import Metrics
from relay.queue.envelope import QueueEnvelope, RcptState, Recipient
from relay.queue.scheduler import Scheduler
from relay.queue.spool import Spool
from tests.fixtures.postfix import PostfixMx

T0 = 1_700_000_000.0
CFG = QueueConfig(retry=(60.0, 300.0), max_lifetime=3600.0)
DATA = b"From: app@corp.test\r\nSubject: hi\r\nMessage-ID: <1@corp.test>\r\n\r\nhello\r\n"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class NoJitter(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return 0.0


@dataclass
class Call:
    qid: str
    sender: str
    domain: str
    rcpts: list[str]
    data: bytes


@dataclass
class FakeDeliverer:
    """Answers from a script: address -> list of (status, reason), one per attempt;
    when a list runs out (or has no entry) the recipient is delivered."""

    script: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    gates: dict[str, asyncio.Event] = field(default_factory=dict)  # domain -> blocks until set
    fail_domains: set[str] = field(default_factory=set)
    in_flight: int = 0
    max_in_flight: int = 0
    closed: bool = False

    async def deliver(
        self,
        queue_id: str,
        sender: str,
        mail_options: Sequence[str],
        domain: str,
        recipients: Sequence[tuple[str, Sequence[str]]],
        data: bytes,
    ) -> list[Outcome]:
        raw = data.whole() if isinstance(data, Body) else data  # what was spooled
        self.calls.append(Call(queue_id, sender, domain, [a for a, _ in recipients], raw))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if domain in self.gates:
                await self.gates[domain].wait()
            await asyncio.sleep(0)
            if domain in self.fail_domains:
                raise RuntimeError("boom")
            return [self._answer(addr) for addr, _ in recipients]
        finally:
            self.in_flight -= 1

    def _answer(self, addr: str) -> Outcome:
        steps = self.script.get(addr) or []
        status, reason = steps.pop(0) if steps else ("delivered", "250 2.0.0 ok")
        # Like delivery: an MX reply is also kept as data; other reasons have none.
        reply = reason if reason[:3].isdigit() else None
        return Outcome(addr, Status(status), reason, "mx.test", "127.0.0.1", "TLSv1.3", reply)

    async def close(self) -> None:
        self.closed = True


def make_env(
    spool: Spool, *rcpts: str, sender: str = "app@corp.test", created: float = T0
) -> QueueEnvelope:
    return QueueEnvelope(
        id=spool.new_id(),
        created=created,
        sender=sender,
        recipients=[Recipient(address=r) for r in rcpts],
        size=len(DATA),
    )


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait (bounded) for *cond*."""
    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


async def settle(s: Scheduler) -> None:
    """Wait until nothing is running and nothing is due at the fake clock's now."""

    def idle() -> bool:
        due = s.next_due()
        return not s.busy and (due is None or due > s.clock())

    await until(idle)
    await asyncio.sleep(0.02)
    await until(idle)


@dataclass
class Env:
    spool: Spool
    clock: Clock
    fake: FakeDeliverer
    sched: Scheduler | None = None

    async def start(
        self, cfg: QueueConfig = CFG, concurrency: int = 200, spool: Spool | None = None
    ) -> Scheduler:
        self.sched = Scheduler(
            spool or self.spool,
            self.fake,
            cfg,
            "relay.test",
            clock=self.clock,
            rand=NoJitter(),
            concurrency=concurrency,
        )
        await self.sched.start()
        return self.sched

    def queue(self, *rcpts: str, sender: str = "app@corp.test", created: float = T0) -> str:
        env = make_env(self.spool, *rcpts, sender=sender, created=created)
        self.spool.store(env, DATA)
        return env.id

    def others(self, qid: str) -> list[QueueEnvelope]:
        return [self.spool.load(q) for q in self.spool.ids() if q != qid]


@pytest.fixture
async def t(tmp_path: Path) -> AsyncIterator[Env]:
    spool = Spool(tmp_path / "sp", clock=Clock())
    spool.setup()
    env = Env(spool, Clock(), FakeDeliverer())
    env.spool.clock = env.clock
    yield env
    if env.sched is not None:
        await env.sched.stop(0)


async def test_new_message_is_picked_up_at_once(t: Env) -> None:
    s = await t.start()
    qid = t.queue("a@x.test")
    s.enqueue(qid)
    await until(lambda: not t.spool.exists(qid), timeout=2.0)
    assert [(c.qid, c.domain, c.rcpts, c.data) for c in t.fake.calls] == [
        (qid, "x.test", ["a@x.test"], DATA)
    ]


async def test_queued_messages_are_loaded_at_start(t: Env) -> None:
    qid = t.queue("a@x.test")
    await t.start()
    await until(lambda: not t.spool.exists(qid))


async def test_per_recipient_retry_schedule(t: Env) -> None:
    t.fake.script = {"a@x.test": [("transient", "451 4.3.0 try later")] * 2}
    qid = t.queue("a@x.test", "b@x.test")
    s = await t.start()
    await settle(s)
    env = t.spool.load(qid)
    a, b = env.recipients
    assert (a.state, a.attempts, a.next_attempt, a.last_reason) == (
        RcptState.DEFERRED,
        1,
        T0 + 60,
        "451 4.3.0 try later",
    )
    assert (b.state, b.attempts) == (RcptState.DELIVERED, 1)
    assert s.due_time(qid) == T0 + 60
    t.clock.now = T0 + 59  # not yet
    s.wake()
    await settle(s)
    assert len(t.fake.calls) == 1
    t.clock.now = T0 + 60
    s.wake()
    await settle(s)
    assert t.fake.calls[1].rcpts == ["a@x.test"]  # never b again
    a = t.spool.load(qid).recipients[0]
    assert (a.attempts, a.next_attempt) == (2, T0 + 60 + 300)  # second interval
    assert [h.outcome for h in a.history] == ["transient", "transient"]
    t.clock.now = T0 + 360
    s.wake()
    await until(lambda: not t.spool.exists(qid))


async def test_mixed_outcomes_persisted_and_dsn_queued(t: Env) -> None:
    t.fake.script = {
        "b@y.test": [("transient", "TLS handshake failed: no STARTTLS offered")],
        "c@z.test": [("permanent", "550 5.1.1 no such user")],
    }
    qid = t.queue("a@x.test", "b@y.test", "c@z.test", "d@Z.TEST")
    s = await t.start()
    await settle(s)
    env = t.spool.load(qid)
    states = {r.address: r.state for r in env.recipients}
    assert states == {
        "a@x.test": RcptState.DELIVERED,
        "b@y.test": RcptState.DEFERRED,
        "c@z.test": RcptState.BOUNCED,
        "d@Z.TEST": RcptState.DELIVERED,
    }
    assert sorted(c.domain for c in t.fake.calls if c.qid == qid) == ["x.test", "y.test", "z.test"]
    # The DSN went back into the spool and through the same deliverer, from <>.
    dsn_calls = [c for c in t.fake.calls if c.qid != qid]
    assert len(dsn_calls) == 1
    call = dsn_calls[0]
    assert (call.sender, call.domain, call.rcpts) == ("", "corp.test", ["app@corp.test"])
    msg = email.message_from_bytes(call.data)
    assert msg.get_content_type() == "multipart/report"
    blocks = msg.get_payload()[1].get_payload()
    assert [b["Final-Recipient"] for b in blocks[1:]] == ["rfc822; c@z.test"]
    assert blocks[1]["Status"] == "5.1.1"


async def test_spellings_of_one_domain_are_one_delivery_under_its_name(t: Env) -> None:
    """Recipients spooled with a U-label (by a version before intake normalised them) are
    grouped under the domain's one normal form, the key of its policy and slots."""
    t.queue("a@bücher.test", "b@XN--BCHER-KVA.test")
    s = await t.start()
    await settle(s)
    assert [(c.domain, c.rcpts) for c in t.fake.calls] == [
        ("xn--bcher-kva.test", ["a@bücher.test", "b@XN--BCHER-KVA.test"])
    ]


async def test_a_spooled_invalid_domain_is_never_delivered(t: Env) -> None:
    """Fail closed: a domain IDNA refuses cannot be matched to its policy, so it is not
    handed to delivery (where DNS might still resolve it); it bounces with the reason."""
    qid = t.queue("a@xn--zz.test", "b@ok.test")
    s = await t.start()
    await settle(s)
    assert sorted(c.domain for c in t.fake.calls) == ["corp.test", "ok.test"]  # and the DSN
    (dsn_call,) = [c for c in t.fake.calls if c.domain == "corp.test"]
    assert dsn_call.sender == "" and b"a@xn--zz.test" in dsn_call.data
    assert b"is not a valid domain name" in dsn_call.data
    assert not t.spool.exists(qid)


async def test_expiry_bounces_with_dsn(t: Env) -> None:
    t.fake.script = {"a@x.test": [("transient", "451 4.4.1 no answer")] * 5}
    qid = t.queue("a@x.test")
    s = await t.start()
    await settle(s)
    t.clock.now = T0 + 3600  # the clipped final attempt happens at expiry
    s.wake()
    await settle(s)
    assert not t.spool.exists(qid)
    dsn = [c for c in t.fake.calls if c.sender == ""]
    assert len(dsn) == 1
    msg = email.message_from_bytes(dsn[0].data)
    text = msg.get_payload()[0].get_payload(decode=True).decode()
    assert "delivery time expired; last error: 451 4.4.1 no answer" in text
    block = msg.get_payload()[1].get_payload()[1]
    assert (block["Action"], block["Status"]) == ("failed", "4.4.7")
    assert block["Diagnostic-Code"] == "smtp; 451 4.4.1 no answer"


async def test_no_dsn_for_null_sender(t: Env) -> None:
    t.fake.script = {"a@x.test": [("permanent", "550 5.1.1 nope")]}
    qid = t.queue("a@x.test", sender="")
    s = await t.start()
    await settle(s)
    assert not t.spool.exists(qid)
    assert t.spool.ids() == []
    assert len(t.fake.calls) == 1


async def test_notify_never_suppresses_dsn(t: Env) -> None:
    t.fake.script = {"a@x.test": [("permanent", "550 5.1.1 nope")]}
    env = make_env(t.spool, "a@x.test")
    env.recipients[0].options = ["NOTIFY=NEVER"]
    t.spool.store(env, DATA)
    s = await t.start()
    await settle(s)
    assert t.spool.ids() == [] and len(t.fake.calls) == 1


class CrashingSpool(Spool):
    """Fails the write that would mark a recipient bounced, as a crash there would, and
    notes whether the DSN was already on disk at that moment."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.dsn_on_disk: list[bool] = []

    def update(self, envelope: QueueEnvelope) -> None:
        if any(r.state is RcptState.BOUNCED for r in envelope.recipients):
            self.dsn_on_disk.append(len(self.ids()) == 2)
            raise SpoolError("simulated crash before the bounced state is recorded")
        super().update(envelope)


async def test_dsn_is_stored_before_bounced_state(t: Env) -> None:
    """A crash between the two writes may send a DSN twice, never zero times: the DSN is
    on disk before the bounced state is written.  When that write fails without a crash,
    the process knows the recipient bounced: one DSN, and the message is done."""
    t.fake.script = {"a@x.test": [("permanent", "550 5.1.1 nope")] * 2}
    crashing = CrashingSpool(t.spool.root, clock=t.clock)
    t.fake.gates["corp.test"] = asyncio.Event()  # keep DSNs in the queue for inspection
    qid = t.queue("a@x.test")
    await t.start(spool=crashing)
    await until(lambda: bool(crashing.dsn_on_disk))
    assert crashing.dsn_on_disk[0] is True
    await until(lambda: not t.spool.exists(qid))
    dsns = t.others(qid)
    assert [(d.sender, d.bounce, d.recipients[0].address) for d in dsns] == [
        ("", True, "app@corp.test")
    ]
    assert [c.domain for c in t.fake.calls].count("x.test") == 1


async def test_delivered_domain_is_durable_before_others_finish(t: Env) -> None:
    gate = asyncio.Event()
    t.fake.gates["y.test"] = gate
    qid = t.queue("a@x.test", "b@y.test")
    s = await t.start()
    await until(lambda: t.spool.load(qid).recipients[0].state is RcptState.DELIVERED)
    assert t.spool.load(qid).recipients[1].state is RcptState.QUEUED
    await s.stop(0.05)  # y.test never answers: cancelled, left as it was on disk
    t.sched = None
    assert t.fake.closed
    env = t.spool.load(qid)
    assert [r.state for r in env.recipients] == [RcptState.DELIVERED, RcptState.QUEUED]
    t.fake = FakeDeliverer()
    await t.start()
    await until(lambda: not t.spool.exists(qid))
    assert [c.rcpts for c in t.fake.calls] == [["b@y.test"]]  # a@x.test never re-sent


async def test_stop_lets_in_flight_delivery_finish_within_grace(t: Env) -> None:
    gate = asyncio.Event()
    t.fake.gates["x.test"] = gate
    qid = t.queue("a@x.test")
    s = await t.start()
    await until(lambda: t.fake.in_flight == 1)
    asyncio.get_running_loop().call_later(0.05, gate.set)
    await s.stop(5.0)
    t.sched = None
    assert not t.spool.exists(qid)


async def test_held_message_is_not_scheduled_until_released(t: Env) -> None:
    qid = t.queue("a@x.test")
    t.spool.hold(qid)
    s = await t.start()
    await settle(s)
    assert t.fake.calls == []
    t.spool.release(qid)
    assert t.spool.kick()  # what `queue release` does
    await until(lambda: not t.spool.exists(qid))


async def test_busy_lock_is_retried(t: Env) -> None:
    qid = t.queue("a@x.test")
    with t.spool.lock(qid):
        s = await t.start()
        await until(lambda: s.due_time(qid) == T0 + 2.0)
    assert t.fake.calls == []
    t.clock.now = T0 + 2.0
    s.wake()
    await until(lambda: not t.spool.exists(qid))


async def test_deliverer_crash_defers(t: Env) -> None:
    t.fake.fail_domains.add("x.test")
    qid = t.queue("a@x.test")
    s = await t.start()
    await settle(s)
    r = t.spool.load(qid).recipients[0]
    assert r.state is RcptState.DEFERRED
    assert r.last_reason == "local error: delivery gave no outcome"


async def test_delay_warning_once(t: Env) -> None:
    cfg = QueueConfig(retry=(60.0,), max_lifetime=7200.0, delay_warning=600.0)
    t.fake.script = {"a@x.test": [("transient", "451 4.7.1 later")] * 30}
    t.fake.gates["corp.test"] = asyncio.Event()  # keep the warning DSN queued
    qid = t.queue("a@x.test")
    s = await t.start(cfg)
    await settle(s)
    assert t.others(qid) == []
    for step in (600, 700, 800):
        t.clock.now = T0 + step
        s.wake()
        await until(lambda step=step: t.spool.load(qid).recipients[0].history[-1].at == T0 + step)
    warnings = t.others(qid)
    assert len(warnings) == 1 and t.spool.load(qid).warned
    msg = email.message_from_bytes(t.spool.read_data(warnings[0].id))
    assert msg["Subject"] == "Delayed Mail (still being retried)"


async def test_corrupt_envelope_is_quarantined_and_start_continues(t: Env) -> None:
    (t.spool.queue_dir / "BAD1").write_bytes(b"TLS-RELAY-MESSAGE 1 9\n{not json")
    qid = t.queue("a@x.test")
    await t.start()
    await until(lambda: not t.spool.exists(qid))
    assert [p.name.split(".")[0] for p in t.spool.quarantine_dir.iterdir()] == ["BAD1"]


async def test_concurrency_is_bounded(t: Env) -> None:
    gate = asyncio.Event()
    for i in range(6):
        t.fake.gates[f"d{i}.test"] = gate
    ids = [t.queue(f"a@d{i}.test") for i in range(6)]
    s = await t.start(concurrency=2)
    await until(lambda: t.fake.in_flight == 2)
    await asyncio.sleep(0.05)
    assert t.fake.in_flight == 2
    gate.set()
    await until(lambda: not any(t.spool.exists(q) for q in ids))
    assert t.fake.max_in_flight == 2
    assert s.next_due() is None


# -- integration: the real Deliverer against a real Postfix MX ------------------------------


def real_deliverer(mx: PostfixMx) -> Deliverer:
    route = Route(domains=("postfix.test",), host="127.0.0.1", port=mx.port)
    # No session reuse: Postfix's smtpd re-reads its access map only between sessions.
    cfg = DeliveryConfig(
        routes=(route,), connect_timeout=5.0, attempt_deadline=30.0, connection_reuse=False
    )
    return new_deliverer(cfg, PolicyConfig(), "relay.test", MxResolver(None), Metrics())


@pytest.mark.postfix
async def test_postfix_deferral_retry_and_dsn(t: Env, postfix_mx: PostfixMx) -> None:
    mx = postfix_mx
    mx.set_access("a@postfix.test", "450 4.2.0 come back later")
    mx.set_access("c@postfix.test", "550 5.1.1 no such user here")
    t.fake = real_deliverer(mx)  # type: ignore[assignment]
    env = make_env(
        t.spool, "a@postfix.test", "b@postfix.test", "c@postfix.test", sender="app@postfix.test"
    )
    t.spool.store(env, DATA)
    s = await t.start()
    await until(lambda: len(mx.messages()) >= 2, timeout=30)  # b, and the DSN for c
    await settle(s)
    a, b, c = t.spool.load(env.id).recipients
    assert (a.state, b.state, c.state) == (
        RcptState.DEFERRED,
        RcptState.DELIVERED,
        RcptState.BOUNCED,
    )
    assert '"450 4.2.0 <a@postfix.test>: Recipient address rejected: come back later"' in (
        a.last_reason or ""
    )
    assert a.history[-1].tls is not None  # delivered over TLS, even the 450
    got = {m.recipient: m for m in mx.messages()}
    dsn = got["app@postfix.test"]
    assert dsn.return_path == "<>"
    report = dsn.message.get_payload()[1].get_payload()
    assert report[1]["Final-Recipient"] == "rfc822; c@postfix.test"
    assert report[1]["Status"] == "5.1.1"
    assert report[1]["Diagnostic-Code"] == (
        "smtp; 550 5.1.1 <c@postfix.test>: Recipient address rejected: no such user here"
    )
    await asyncio.sleep(1.1)  # Postfix notices a changed map by its mtime, in whole seconds
    mx.set_access("a@postfix.test", "OK")
    t.clock.now = a.next_attempt
    s.wake()
    await until(lambda: not t.spool.exists(env.id), timeout=30)
    assert sorted(m.recipient for m in mx.wait_messages(3)) == [
        "a@postfix.test",
        "app@postfix.test",
        "b@postfix.test",
    ]


class FullSpool(Spool):
    """A spool whose disk is full for state writes while ``full`` is set."""

    full = False

    def update(self, envelope: QueueEnvelope) -> None:
        if self.full:
            raise SpoolFullError(f"cannot write {envelope.id}: No space left on device")
        super().update(envelope)


async def test_disk_full_after_a_delivery_never_delivers_it_again(t: Env) -> None:
    """Issue 10, item 5: the state write after a delivery fails (disk full).  The
    recipient the MX accepted stays delivered in memory; the write is retried; nothing
    is sent again (it used to be re-delivered at every retry while the disk was full)."""
    t.fake.script = {"b@y.test": [("transient", "451 4.3.0 later")]}
    full = FullSpool(t.spool.root, clock=t.clock)
    full.full = True
    qid = t.queue("a@x.test", "b@y.test")
    s = await t.start(spool=full)
    await settle(s)
    assert sorted(c.domain for c in t.fake.calls) == ["x.test", "y.test"]
    for _ in range(3):  # three retry rounds with the disk still full
        t.clock.now += 61
        s.wake()
        await settle(s)
    assert sorted(c.domain for c in t.fake.calls) == ["x.test", "y.test"]  # nothing resent
    full.full = False  # space again: the state is written, then b is tried again
    t.clock.now += 61
    s.wake()
    await settle(s)
    assert [c.domain for c in t.fake.calls].count("x.test") == 1
    assert not t.spool.exists(qid)  # b delivered on its retry, a never again


class NoRoomForDsns(Spool):
    """The state JSON still fits, a DSN (the whole original message) does not."""

    def store(self, envelope: QueueEnvelope, data: bytes | Iterable[bytes]) -> None:
        if envelope.bounce:
            raise SpoolFullError("cannot write a DSN: No space left on device")
        super().store(envelope, data)


async def test_a_dsn_that_cannot_be_stored_is_retried_later_not_at_once(t: Env) -> None:
    """The recipient stays pending when its DSN cannot be stored; the next pass waits
    ERROR_RETRY instead of asking the MX again in a tight loop (found in review: 307
    attempts in a second with the clock frozen)."""
    t.fake.script = {"a@x.test": [("permanent", "550 5.1.1 nope")] * 5}
    spool = NoRoomForDsns(t.spool.root, clock=t.clock)
    qid = t.queue("a@x.test")
    s = await t.start(spool=spool)
    await settle(s)
    await asyncio.sleep(0.2)  # a tight loop would have run many passes by now
    assert len(t.fake.calls) == 1
    assert not t.spool.load(qid).recipients[0].state.final  # never lost, never bounced
    t.clock.now += 61
    s.wake()
    await settle(s)
    assert len(t.fake.calls) == 2


class StuckRemove(Spool):
    """Unlinking the finished message fails once (EIO, a read-only remount)."""

    failures = 1

    def remove(self, qid: str) -> None:
        if self.failures:
            self.failures -= 1
            raise OSError(5, "Input/output error")
        super().remove(qid)


async def test_a_failed_removal_never_delivers_again(t: Env) -> None:
    """The removal is the record that every recipient got it (the last state write is
    skipped); when it fails, that is kept in memory and the retry removes the message
    instead of delivering it again from the stale state on disk (found in review)."""
    spool = StuckRemove(t.spool.root, clock=t.clock)
    qid = t.queue("a@x.test")
    s = await t.start(spool=spool)
    await settle(s)
    assert t.spool.exists(qid) and len(t.fake.calls) == 1
    t.clock.now += 61
    s.wake()
    await settle(s)
    assert not t.spool.exists(qid) and len(t.fake.calls) == 1
