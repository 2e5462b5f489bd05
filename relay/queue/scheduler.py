"""Scheduler: the queue manager between the spool and delivery.

Role: know when each queued message is due, take its lock, hand its due
recipients to the deliverer one destination domain at a time (concurrently,
bounded), and turn each recipient's outcome into durable spool state at once:
delivered, deferred with the next attempt from retry.py, or bounced with an
RFC 3464 DSN (bounce.py) that re-enters the spool as a message from ``<>``.
New messages are picked up the moment the listener calls :meth:`Scheduler.enqueue`;
deferred ones by a timer on an in-memory due-time heap; changes made by
``tls-relay queue`` arrive as a b"kick" datagram on the spool's control socket
(and a periodic rescan catches anything else).
Not: SMTP, MX lookup or TLS (delivery.py), the retry arithmetic (retry.py), the
DSN format (bounce.py), or the file formats and locking (spool.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import random
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from relay import bounce, retry
from relay.config import QueueConfig
from relay.delivery import Outcome, Status
from relay.errors import CorruptMessage, MessageBusy, MessageNotFound, SpoolError
from relay.log import event
from relay.metrics import Metrics
from relay.spool import Attempt, Envelope, RcptState, Recipient, Spool
from relay.workers import shard_of

log = logging.getLogger("relay.scheduler")

BUSY_RETRY = 2.0  # a `queue` command holds the message's lock: look again soon
ERROR_RETRY = 60.0  # spool trouble (disk full, unreadable data): look again later
RESCAN_INTERVAL = 60.0  # safety net besides kicks: notice files changed behind our back
MAX_SLEEP = RESCAN_INTERVAL  # the wall clock may jump: never sleep longer than this
CANCEL_WAIT = 5.0  # stop(): how long cancelled deliveries get to unwind

T = TypeVar("T")


class DelivererLike(Protocol):
    """delivery.Deliverer as the scheduler uses it."""

    async def deliver(
        self,
        queue_id: str,
        sender: str,
        mail_options: Sequence[str],
        domain: str,
        recipients: Sequence[tuple[str, Sequence[str]]],
        data: bytes,
    ) -> Sequence[Outcome]: ...

    async def close(self) -> None: ...


@dataclass
class _Pass:
    """One delivery pass over one message."""

    env: Envelope
    data: bytes
    guard: asyncio.Lock  # serialises apply + write between concurrent domains
    to_bounce: list[Recipient]
    write_failed: bool = False


class Scheduler:
    def __init__(
        self,
        spool: Spool,
        deliverer: DelivererLike,
        cfg: QueueConfig,
        hostname: str,
        clock: Callable[[], float] = time.time,
        rand: random.Random | None = None,
        concurrency: int = 200,
        metrics: Metrics | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        # One of several worker processes (relay.workers): the supervisor recovered
        # the spool; rescans take only this shard's messages; own control socket.
        self.shard = shard
        self.spool = spool
        self.metrics = metrics or Metrics()
        self.deliverer = deliverer
        self.cfg = cfg
        self.hostname = hostname
        self.clock = clock
        self.rand = rand or random.Random()  # noqa: S311 - jitter, not secrets
        self.concurrency = max(1, concurrency)
        self._heap: list[tuple[float, int, str]] = []  # (due, seq, qid); stale entries skipped
        self._due: dict[str, float] = {}  # the one current due time per scheduled qid
        self._seq = itertools.count()
        self._active: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(self.concurrency)  # concurrent domain deliveries
        self._wake = asyncio.Event()
        self._kick = asyncio.Event()
        self._mtimes: dict[str, int] = {}
        self._background: list[asyncio.Task[None]] = []
        self._control: asyncio.DatagramTransport | None = None
        self._stopping = False

    # -- public -------------------------------------------------------------------
    def enqueue(self, qid: str) -> None:
        """A new message is on disk: make it due now (the listener calls this after 250)."""
        self._schedule(qid, self.clock())

    def wake(self) -> None:
        """Re-check due times now (e.g. after a test advanced its fake clock)."""
        self._wake.set()

    def kick(self) -> None:
        """Rescan queue/ soon, as a b"kick" on the control socket does."""
        self._kick.set()

    def due_time(self, qid: str) -> float | None:
        return self._due.get(qid)

    def next_due(self) -> float | None:
        """The earliest due time of anything scheduled, None if nothing is."""
        return min(self._due.values(), default=None)

    @property
    def queued(self) -> int:
        """Messages in queue/ that are scheduled or being worked on (held ones are not)."""
        return len(self._due.keys() | self._active.keys())

    @property
    def busy(self) -> bool:
        """True while any message is being worked on."""
        return bool(self._active)

    async def start(self) -> None:
        """Recover the spool, load every queued message, listen for kicks, run."""
        if self.shard[1] == 1:  # with several workers the supervisor did it, once
            for line in await asyncio.to_thread(self.spool.recover):
                event(log, "recovered", action=line)
        await self.rescan()
        await self._open_control()
        loop = asyncio.get_running_loop()
        self._background = [
            loop.create_task(self._dispatch(), name="scheduler-dispatch"),
            loop.create_task(self._rescanner(), name="scheduler-rescan"),
        ]

    async def stop(self, grace: float) -> None:
        """Take no new work; let deliveries finish within *grace* s; cancel the rest.

        A cancelled delivery leaves its recipients as they are on disk: outcomes
        already written stay, the others are tried again at the next start.
        """
        if self._stopping:
            return
        self._stopping = True
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._close_control()
        running = set(self._active.values())
        if running:
            _, pending = await asyncio.wait(running, timeout=max(grace, 0.0))
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=CANCEL_WAIT)
            event(
                log,
                "scheduler_stopped",
                finished=len(running) - len(pending),
                cancelled=len(pending),
            )
        await self.deliverer.close()

    async def rescan(self) -> None:
        """Read queue/ and make every new or changed message due per its recipients."""
        known = {q: m for q, m in self._mtimes.items() if q in self._due or q in self._active}
        found = await asyncio.to_thread(self._scan_disk, known)
        self._mtimes = known  # forget messages that are gone; bounded by what is queued
        for qid, (due, mtime) in found.items():
            self._mtimes[qid] = mtime
            if qid not in self._active:
                self._schedule(qid, due)

    # -- timing -------------------------------------------------------------------
    def _schedule(self, qid: str, due: float) -> None:
        if self._stopping or self._due.get(qid) == due:
            return
        self._due[qid] = due
        heapq.heappush(self._heap, (due, next(self._seq), qid))
        if len(self._heap) > 2 * len(self._due) + 1024:  # drop stale entries now and then
            self._heap = [(d, s, q) for d, s, q in self._heap if self._due.get(q) == d]
            heapq.heapify(self._heap)
        self._wake.set()

    async def _dispatch(self) -> None:
        while not self._stopping:
            self._wake.clear()
            delay = self._launch_due()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)

    def _launch_due(self) -> float:
        """Start every due message there is room for; return how long to sleep."""
        now = self.clock()
        while self._heap:
            due, _, qid = self._heap[0]
            if self._due.get(qid) != due:
                heapq.heappop(self._heap)
                continue
            if due > now:
                return min(due - now, MAX_SLEEP)
            if len(self._active) >= self.concurrency:
                return MAX_SLEEP  # a finishing message wakes us
            heapq.heappop(self._heap)
            del self._due[qid]
            if qid not in self._active:  # a running pass reschedules it from disk
                task = asyncio.get_running_loop().create_task(self._process(qid))
                self._active[qid] = task
        return MAX_SLEEP

    async def _rescanner(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), timeout=RESCAN_INTERVAL)
            self._kick.clear()
            try:
                await self.rescan()
            except (OSError, SpoolError) as exc:
                event(log, "rescan_failed", level=logging.ERROR, error=exc)

    def _scan_disk(self, known: dict[str, int]) -> dict[str, tuple[float, int]]:
        """(In a thread.) Due time and change stamp of each queued message that changed."""
        found: dict[str, tuple[float, int]] = {}
        index, count = self.shard
        for qid in self.spool.ids():
            if count > 1 and shard_of(qid, count) != index:
                continue  # another worker's
            try:
                mtime = self.spool.stamp(qid)
                if known.get(qid) == mtime:
                    continue
                found[qid] = (self._next_due(self.spool.load(qid)), mtime)
            except (FileNotFoundError, MessageNotFound):
                continue  # deleted or held meanwhile
            except CorruptMessage:
                found[qid] = (self.clock(), 0)  # _process quarantines it under its lock
        return found

    def _next_due(self, env: Envelope) -> float:
        pending = [r.next_attempt for r in env.recipients if not r.state.final]
        return min(pending) if pending else self.clock()

    # -- one message --------------------------------------------------------------
    async def _process(self, qid: str) -> None:
        again: float | None = None
        try:
            with self.spool.lock(qid):
                again = await self._run_message(qid)
        except MessageBusy:
            again = self.clock() + BUSY_RETRY
        except MessageNotFound:
            pass  # deleted by an operator, or a bad id
        except CorruptMessage as exc:
            await _off_loop(self.spool.quarantine, qid, False, str(exc))
        except (SpoolError, OSError) as exc:
            event(log, "queue_error", level=logging.ERROR, queue_id=qid, error=exc)
            again = self.clock() + ERROR_RETRY
        except Exception:  # a bug must not stop the queue; the message stays on disk
            log.exception("queue_bug queue_id=%s", qid)
            again = self.clock() + ERROR_RETRY
        finally:
            self._active.pop(qid, None)
            if again is not None:
                self._schedule(qid, again)
            self._wake.set()

    async def _run_message(self, qid: str) -> float | None:
        """Deliver the due recipients of *qid*; return its next due time, None if gone."""
        now = self.clock()  # one reading: what is due and whether data was read agree
        fresh = self.spool.take_fresh(qid)  # just accepted: still in memory
        env, data = fresh if fresh is not None else await _off_loop(self._load, qid, now)
        if env.held:
            return None  # hold/ is never scheduled; `release` kicks us
        due = _due(env, now)
        if due:
            run = _Pass(env, data, asyncio.Lock(), [])
            domains = _by_domain(due)
            if len(domains) == 1:  # the common case: no task group needed
                await self._deliver_domain(run, *next(iter(domains.items())))
            else:
                async with asyncio.TaskGroup() as group:
                    for domain, rcpts in domains.items():
                        group.create_task(self._deliver_domain(run, domain, rcpts))
            await self._finish(run)
        if env.done:
            self.spool.remove(qid)  # two unlinks, no fsync: not worth a thread hop
            event(log, "queue_removed", queue_id=qid)
            return None
        return self._next_due(env)

    def _load(self, qid: str, now: float) -> tuple[Envelope, bytes]:
        """Envelope and data in one trip off the loop (data only if something is due)."""
        env = self.spool.load(qid)
        if env.held or not _due(env, now):
            return env, b""
        return env, self.spool.read_data(qid)

    async def _deliver_domain(self, run: _Pass, domain: str, rcpts: list[Recipient]) -> None:
        async with self._slots:
            outcomes = await self._call_deliverer(run, domain, rcpts)
        async with run.guard:
            now = self.clock()
            for rcpt, outcome in zip(rcpts, outcomes, strict=True):
                self._apply(run, rcpt, outcome, now)
            if run.env.done and not run.to_bounce:
                return  # removing the message right after is the durable record
            try:  # durable at once: a restart never re-sends to these recipients
                await _off_loop(self.spool.update, run.env)
            except SpoolError as exc:
                run.write_failed = True
                event(
                    log,
                    "queue_write_failed",
                    level=logging.ERROR,
                    queue_id=run.env.id,
                    domain=domain,
                    error=exc,
                )

    async def _call_deliverer(
        self, run: _Pass, domain: str, rcpts: list[Recipient]
    ) -> list[Outcome]:
        env = run.env
        try:
            got = await self.deliverer.deliver(
                env.id,
                env.sender,
                env.mail_options,
                domain,
                [(r.address, r.options) for r in rcpts],
                run.data,
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

    def _apply(self, run: _Pass, rcpt: Recipient, outcome: Outcome, now: float) -> None:
        o = outcome
        rcpt.attempts += 1
        rcpt.record(Attempt(now, str(o.status), o.reason, o.mx_host, o.mx_ip, o.tls, o.reply))
        if o.status is Status.DELIVERED:
            rcpt.state = RcptState.DELIVERED
        elif o.status is Status.PERMANENT:
            run.to_bounce.append(rcpt)  # marked bounced in _finish, after its DSN is stored
            return
        else:
            jitter = self.rand.uniform(-1.0, 1.0)
            nxt = retry.next_attempt(rcpt.attempts, run.env.created, now, self.cfg, jitter)
            if nxt is None:  # RFC 5321 4.5.4.1: out of lifetime, give up
                why = f"delivery time expired; last error: {outcome.reason}"
                rcpt.record(Attempt(at=now, outcome="expired", reason=why))
                run.to_bounce.append(rcpt)
                return
            rcpt.state, rcpt.next_attempt = RcptState.DEFERRED, nxt
        self._log_state(run.env, rcpt, outcome.mx_host)

    async def _finish(self, run: _Pass) -> None:
        """Bounces (DSN stored before the recipients are marked), delay warning."""
        env, now = run.env, self.clock()
        if run.to_bounce:
            # Store the DSN first: a crash between the two writes may send it twice,
            # never zero times.
            await self._notify(run, run.to_bounce, "failed", now)
            for rcpt in run.to_bounce:
                rcpt.state = RcptState.BOUNCED
                self._log_state(env, rcpt, None)
            await _off_loop(self.spool.update, env)
        if retry.warning_due(env.created, now, self.cfg, env.warned):
            late = [r for r in env.recipients if r.state is RcptState.DEFERRED]
            await self._notify(run, late, "delayed", now)
            env.warned = True
            await _off_loop(self.spool.update, env)
        if run.write_failed:  # one more try to record every outcome; raises if it fails
            await _off_loop(self.spool.update, env)

    async def _notify(
        self, run: _Pass, rcpts: list[Recipient], kind: bounce.Kind, now: float
    ) -> None:
        env = run.env
        wanted = [r for r in rcpts if bounce.wants_notice(r, kind)]
        if not wanted:
            return
        if not env.sender or env.bounce:  # RFC 5321 4.5.5 / RFC 3464: never bounce a bounce
            event(log, "dsn_suppressed", queue_id=env.id, kind=kind, reason="null sender")
            return
        until = retry.expires_at(env.created, self.cfg) if kind == "delayed" else None
        new_id = self.spool.new_id()
        dsn_env, blob = bounce.dsn_message(
            env, wanted, self.hostname, now, run.data, kind, new_id, until
        )
        await _off_loop(self.spool.store, dsn_env, blob)
        event(
            log,
            "dsn_queued",
            queue_id=env.id,
            dsn_id=new_id,
            kind=kind,
            to=env.sender,
            recipients=",".join(r.address for r in wanted),
        )
        if kind == "failed":
            self.metrics.bounces.inc()
        self.enqueue(new_id)

    def _log_state(self, env: Envelope, rcpt: Recipient, mx: str | None) -> None:
        nxt = rcpt.next_attempt if rcpt.state is RcptState.DEFERRED else None
        self.metrics.deliveries.inc(outcome=str(rcpt.state))  # delivered|deferred|bounced
        if rcpt.state is RcptState.DELIVERED:
            return  # the deliverer's line (outcome=delivered, MX, TLS) is the record
        event(
            log,
            "queue_state",
            queue_id=env.id,
            recipient=rcpt.address,
            state=rcpt.state,
            attempts=rcpt.attempts,
            next_in=None if nxt is None else round(nxt - self.clock()),
            mx=mx,
            reason=rcpt.last_reason,
        )

    # -- control socket -----------------------------------------------------------
    async def _open_control(self) -> None:
        path = self.spool.control_socket(self.shard[0])
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            if path.is_socket():
                path.unlink()  # left by a previous run
            sock.bind(str(path))
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            self._control, _ = await loop.create_datagram_endpoint(
                lambda: _Control(self.kick), sock=sock
            )
        except OSError as exc:
            sock.close()
            event(
                log,
                "control_socket_unavailable",
                level=logging.WARNING,
                path=path,
                error=exc,
                fallback=f"rescan every {RESCAN_INTERVAL:g}s",
            )

    def _close_control(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
            with contextlib.suppress(OSError):
                self.spool.control_socket(self.shard[0]).unlink()


class _Control(asyncio.DatagramProtocol):
    def __init__(self, on_kick: Callable[[], None]) -> None:
        self.on_kick = on_kick

    def datagram_received(self, data: bytes, addr: object) -> None:
        if data.strip() == b"kick":
            self.on_kick()


def _due(env: Envelope, now: float) -> list[Recipient]:
    return [r for r in env.recipients if not r.state.final and r.next_attempt <= now]


def _by_domain(rcpts: list[Recipient]) -> dict[str, list[Recipient]]:
    groups: dict[str, list[Recipient]] = {}
    for rcpt in rcpts:
        groups.setdefault(rcpt.address.rpartition("@")[2].lower(), []).append(rcpt)
    return groups


async def _off_loop(fn: Callable[..., T], *args: object) -> T:
    """Run blocking spool I/O in a thread.  If we are cancelled meanwhile, wait for
    the thread anyway, so the message lock is never released mid-write."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise
