"""Several ``serve`` processes on one spool: the supervisor.

Role: with ``workers: N`` (``auto``: one per CPU this process may run on), ``serve``
recovers the spool once, binds every listener once, then forks N worker processes
that inherit the listening sockets; the kernel hands each new connection to one of
them.  Each worker is a whole relay (listeners, scheduler, deliverer; relay.app) on the
shared spool.  A worker delivers what it accepted; its rescans take the queued
messages whose id falls in its shard (:func:`shard_of`), so deferred mail has one
owner.  The per-message flock(2) keeps any two processes - workers or
``tls-relay queue`` - off the same message at the same time.

The parent forwards SIGTERM/SIGINT to the workers and exits 0 when every worker
stopped cleanly.  A worker that dies otherwise is restarted after a pause; one that
keeps dying (MAX_RESTARTS within RESTART_WINDOW seconds) stops the whole relay with
exit status 1, so a supervisor such as systemd sees the failure.

A Python process runs Python on one core at a time (the GIL): workers are how the
relay uses a multi-core machine, as Postfix does with its many processes.
Connection caps (``limits.max_connections``, ``max_connections_per_ip``) are
divided among the workers; AUTH failure throttling is per worker.  The metrics socket
is bound here too and served by every worker, each scrape summing all of them
(relay.metrics); a dead worker's gauges are taken out of the sums.

Not: what a worker does (relay.app), or how a message is locked (relay.queue.spool).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from relay import metrics
from relay.config import Config
from relay.errors import RelayError
from relay.log import event
from relay.queue.recovery import recover
from relay.queue.spool import Spool

log = logging.getLogger("relay.workers")

RESTART_PAUSE = 1.0  # seconds before a dead worker is started again
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


@dataclass(frozen=True)
class Worker:
    """What one worker process is: its place among the others and the sockets."""

    index: int
    count: int
    sockets: tuple[socket.socket, ...]  # one per cfg.listeners entry, in order
    metrics_socket: socket.socket | None = None  # every worker serves /metrics on it


def resolve(cfg: Config) -> int:
    """The number of worker processes *cfg* asks for (``auto``: usable CPUs)."""
    if cfg.workers is not None:
        return cfg.workers
    return max(1, len(os.sched_getaffinity(0)))


def shard_of(qid: str, count: int) -> int:
    """Which worker's rescans own *qid* (stable across processes and restarts)."""
    return zlib.crc32(qid.encode()) % count


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket, as asyncio's create_server would make it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=511)
    except OSError as exc:
        raise RelayError(f"cannot listen on {host}:{port}: {exc}") from exc
    sock.setblocking(False)
    return sock


def supervise(cfg: Config, count: int, run_worker: Callable[[Config, Worker], int]) -> int:
    """Recover, bind, fork *count* workers running *run_worker*; wait; exit status."""
    for line in recover(Spool(cfg.spool.path)):
        event(log, "recovered", action=line)
    listening = tuple(bind(spec.host, spec.port) for spec in cfg.listeners)
    # Any worker answers a scrape, for all of them (relay.metrics: the values are in files).
    metrics_socket = bind(cfg.metrics.host, cfg.metrics.port) if cfg.metrics else None
    sockets = (listening, metrics_socket)
    children: dict[int, int] = {}  # pid -> worker index
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            _signal(pid, signum)

    def hangup(signum: int, _frame: object) -> None:
        event(log, "reload_forwarded", workers=len(children))
        for pid in children:  # each worker reloads its own process (relay.reload)
            _signal(pid, signal.SIGHUP)

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, hangup)
    restarts: list[float] = []
    status = 0
    try:
        for index in range(count):
            children[_fork(cfg, Worker(index, count, *sockets), run_worker)] = index
        event(log, "workers_started", count=count, pids=",".join(map(str, children)))
        while children:
            pid, code = _wait()
            index = children.pop(pid)
            metrics.process_died(pid)  # its gauges leave the sums; its counters stay
            if stopping:
                status = status or (1 if code else 0)
                continue
            event(log, "worker_died", logging.ERROR, index=index, pid=pid, status=code)
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < RESTART_WINDOW] + [now]
            if len(restarts) > MAX_RESTARTS:
                event(log, "workers_giving_up", logging.ERROR, restarts=len(restarts))
                status, stopping = 1, True
                for other in children:
                    _signal(other, signal.SIGTERM)
                continue
            time.sleep(RESTART_PAUSE)
            if not stopping:
                children[_fork(cfg, Worker(index, count, *sockets), run_worker)] = index
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sock in (*listening, metrics_socket):
            if sock is not None:
                sock.close()
    event(log, "workers_stopped", status=status)
    return status


def ignore_hangup(signum: int = signal.SIGHUP, _frame: object = None) -> None:
    """SIGHUP before the event loop handles it (start-up) must never stop the relay:
    its default action killed it with 129 and left workers holding the ports.  Logged
    and ignored; once serving, SIGHUP reloads (relay.reload)."""
    event(log, "sighup_ignored", logging.WARNING, reason="still starting; send it again")


def _die_with_parent(parent: int) -> None:
    """Linux prctl(PR_SET_PDEATHSIG): SIGTERM this worker when the supervisor dies,
    however it dies (SIGKILL, OOM), so no worker keeps serving the ports alone."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (AttributeError, OSError):  # not Linux: no prctl; the worker still runs
        log.warning("prctl is not available: workers will not follow a dead supervisor")
        return
    if prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _fork(cfg: Config, worker: Worker, run_worker: Callable[[Config, Worker], int]) -> int:
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 70  # EX_SOFTWARE, if run_worker itself blows up
    try:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)  # the worker's event loop installs its own
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the worker's loop logs it
        _die_with_parent(parent)
        code = run_worker(cfg, worker)
    except BaseException:
        log.exception("worker %d failed", worker.index)
    finally:
        logging.shutdown()
        os._exit(code)


def _wait() -> tuple[int, int]:
    """The next worker that ended and its exit status (signal n -> 128 + n)."""
    pid, raw = os.waitpid(-1, 0)
    code = os.waitstatus_to_exitcode(raw)
    return pid, code if code >= 0 else 128 - code


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
