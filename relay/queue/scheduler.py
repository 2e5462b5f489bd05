"""Scheduler: the queue manager between the spool and delivery.

Role: know when each queued message is due, take its lock, and run one
:class:`~relay.queue.outcomes.DeliveryPass` over its due recipients (which records
every outcome durably, with DSNs that re-enter the spool as messages from ``<>``).
New messages are picked up the moment the listener calls :meth:`Scheduler.enqueue`;
deferred ones by a timer on an in-memory due-time heap; changes made by
``tls-relay queue`` arrive as a b"kick" datagram on the spool's control socket
(and a periodic rescan catches anything else).
With several workers each scheduler takes its shard of the queue (relay.workers).
Not: what an outcome means for a recipient (relay.queue.outcomes), SMTP, MX lookup or
TLS (relay.delivery), the retry arithmetic (relay.queue.retry), the control socket
(relay.queue.control), or the file formats and locking (relay.queue.spool).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import random
import time
from collections.abc import Callable

from relay.audit.trail import AuditTrail
from relay.body import Body
from relay.config import QueueConfig
from relay.errors import CorruptMessage, MessageBusy, MessageNotFound, SpoolError
from relay.log import event
from relay.metrics import Metrics
from relay.queue.control import ControlSocket
from relay.queue.envelope import QueueEnvelope
from relay.queue.outcomes import DelivererLike, DeliveryPass, PassContext, due_recipients, off_loop
from relay.queue.recovery import recover
from relay.queue.spool import Spool
from relay.workers import shard_of

log = logging.getLogger("relay.scheduler")

BUSY_RETRY = 2.0  # a `queue` command holds the message's lock: look again soon
ERROR_RETRY = 60.0  # spool trouble (disk full, unreadable data): look again later
RESCAN_INTERVAL = 60.0  # safety net besides kicks: notice files changed behind our back
MAX_SLEEP = RESCAN_INTERVAL  # the wall clock may jump: never sleep longer than this
CANCEL_WAIT = 5.0  # stop(): how long cancelled deliveries get to unwind


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
        audit: AuditTrail | None = None,
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
        self._wake = asyncio.Event()
        self._kick = asyncio.Event()
        self._mtimes: dict[str, int] = {}
        # Envelopes whose latest state the spool could not take (disk full), by qid.
        self._unsaved: dict[str, QueueEnvelope] = {}
        self._background: list[asyncio.Task[None]] = []
        self._stopping = False
        self._control = ControlSocket(
            spool.control_socket(shard[0]), self.kick, f"rescan every {RESCAN_INTERVAL:g}s"
        )
        self._passes = PassContext(
            spool,
            deliverer,
            cfg,
            hostname,
            clock,
            self.rand,
            self.metrics,
            asyncio.Semaphore(self.concurrency),  # concurrent domain deliveries
            self.enqueue,
            audit,
        )

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

    def oldest_age(self) -> float:
        """Seconds since the oldest message scheduled here arrived (queue ids start
        with the arrival time, relay.queue.spool.Spool.new_id); 0 when none is."""
        oldest = min(min(self._due, default="~"), min(self._active, default="~"))
        try:
            arrived = int(oldest[:13], 16) / 1_000_000
        except ValueError:  # empty ("~"), or a file named by hand
            return 0.0
        return max(0.0, self.clock() - arrived)

    @property
    def busy(self) -> bool:
        """True while any message is being worked on."""
        return bool(self._active)

    async def start(self) -> None:
        """Recover the spool, load every queued message, listen for kicks, run."""
        if self.shard[1] == 1:  # with several workers the supervisor did it, once
            for line in await asyncio.to_thread(recover, self.spool):
                event(log, "recovered", action=line)
        await self.rescan()
        await self._control.open()
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
        self._control.close()
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
            if qid not in self._active and qid not in self._unsaved:
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

    def _next_due(self, env: QueueEnvelope) -> float:
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
            await off_loop(self.spool.quarantine, qid, False, str(exc))
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
        unsaved = self._unsaved.get(qid)
        if unsaved is not None and not self.spool.exists(qid):
            del self._unsaved[qid]  # deleted by an operator meanwhile
            return None
        if unsaved is not None:
            # Outcomes the spool could not take (disk full): what this process knows
            # stays true - a delivered recipient is not delivered again - and nothing
            # new is tried until the state is on disk.
            try:
                await off_loop(self.spool.update, unsaved)
            except SpoolError as exc:
                event(log, "queue_write_failed", logging.ERROR, queue_id=qid, error=exc)
                return now + ERROR_RETRY
            del self._unsaved[qid]
        fresh = self.spool.take_fresh(qid)  # just accepted: still in memory
        if fresh is not None:
            env, data = fresh[0], Body.of(fresh[1])
        else:
            env, data = await off_loop(self._load, qid, now)
        if env.held:
            return None  # hold/ is never scheduled; `release` kicks us
        due = due_recipients(env, now)
        if due:
            run = DeliveryPass(self._passes, env, data)
            await run.run(due)
            if run.write_failed and not env.done:
                return self._keep_unsaved(qid, env)  # the spool is behind what happened
            if run.notices_failed and not env.done:
                return self.clock() + ERROR_RETRY  # a DSN could not be stored: not at once
        if env.done:
            try:
                self.spool.remove(qid)  # two unlinks, no fsync: not worth a thread hop
            except OSError as exc:
                # The removal was to be the record that everyone got it (the last state
                # write was skipped): keep that in memory, or the retry would deliver again.
                event(log, "queue_remove_failed", logging.ERROR, queue_id=qid, error=exc)
                return self._keep_unsaved(qid, env)
            event(log, "queue_removed", queue_id=qid)
            return None
        return self._next_due(env)

    def _keep_unsaved(self, qid: str, env: QueueEnvelope) -> float:
        """The spool could not record *env*: keep it in memory (written again before
        anything else is tried for it) and look again after ERROR_RETRY."""
        self._unsaved[qid] = env
        return self.clock() + ERROR_RETRY

    def _load(self, qid: str, now: float) -> tuple[QueueEnvelope, Body]:
        """QueueEnvelope and data in one trip off the loop (data only if something is due)."""
        env = self.spool.load(qid)
        if env.held or not due_recipients(env, now):
            return env, Body.of(b"")
        return env, self.spool.body(qid, env.eight_bit)
