"""Helper threads that do not interrupt the event loop when they wake up.

Role: the event loop shares its core with helper threads - the spool's commit and
close threads, the audit writer, the password checks.  Linux lets a thread that
wakes (its fsync is done) preempt the running one; a helper that preempted the
event loop mostly found the GIL held and went back to sleep, at a cost of two
context switches each time.  At 2 KiB per core
that was about 20 context switches per message and 15 % of the relay's CPU (perf).
SCHED_BATCH (sched(7)) keeps a helper's fair share of the CPU but stops its wake-ups
from preempting: it runs when the loop waits or its time slice ends.  No privilege
is needed, and the systemd unit's system call filter allows it (``@resources``).
Each such thread also carries its Python name in the kernel (``ps -L``, ``top -H``:
``spool-commit``, ``spool-close``, ``audit_0``, ``auth_0``), where Python 3.11 leaves
every thread named after the process.  Not asyncio's default executor, which reads and
writes the pieces of large messages: run later, it let those pieces pile up (peak
memory with eight 20 MiB messages 70 -> 75 MiB), for 5 % less CPU at 10 MiB.
Not: which work goes to a thread (the modules that start them).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import os
import threading

PR_SET_NAME = 15  # prctl(2)


def batch() -> None:
    """Make the calling thread SCHED_BATCH and give it its Python name in the kernel
    (Linux; elsewhere, or if refused, nothing changes: the thread costs more CPU, or
    shows the process name)."""
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None:
        return
    # Anything refused (musl returns ENOSYS) leaves the thread as it was: a pool
    # whose initializer raised would be broken for good.
    with contextlib.suppress(Exception):  # pid 0: this thread, not the process
        os.sched_setscheduler(0, policy, os.sched_param(0))
    name = threading.current_thread().name.encode("ascii", "replace")[:15]  # TASK_COMM_LEN
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)


def executor(workers: int | None, name: str) -> concurrent.futures.ThreadPoolExecutor:
    """A thread pool whose threads are :func:`batch` threads."""
    return concurrent.futures.ThreadPoolExecutor(
        workers, thread_name_prefix=name, initializer=batch
    )
