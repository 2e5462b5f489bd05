"""Helper threads run SCHED_BATCH: their wake-ups do not preempt the event loop
(relay.threads).  Checked on the threads the relay really starts."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from relay import safeio, threads
from relay.audit.trail import AuditTrail
from relay.queue.spool import Spool
from tests.queue.test_spool import make_env

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux only")


def policy_of(name: str) -> int:
    """The one policy of every live thread called *name* (other tests' spools have
    commit threads too)."""
    ids = [t.native_id for t in threading.enumerate() if t.name == name and t.native_id]
    (policy,) = {os.sched_getscheduler(i) for i in ids}
    return policy


def test_executor_threads_and_the_caller() -> None:
    with threads.executor(2, "t") as pool:
        assert set(pool.map(lambda _: os.sched_getscheduler(0), range(4))) == {os.SCHED_BATCH}
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the calling thread is untouched


async def test_the_spool_commit_and_close_threads(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.setup()
    env = make_env(spool, "a@x.test")
    await spool.store_soon(env, b"data")
    with spool.lock(env.id):
        spool.remove(env.id)
    await asyncio.sleep(safeio.CLOSE_BATCH * 2)
    assert policy_of("spool-commit") == os.SCHED_BATCH
    assert policy_of("spool-close") == os.SCHED_BATCH


async def test_the_audit_writer(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path)
    trail.setup()
    await asyncio.get_running_loop().run_in_executor(trail._thread, lambda: None)
    assert policy_of("audit_0") == os.SCHED_BATCH
    assert Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text() != "audit_0\n"


def test_the_kernel_knows_the_thread_by_its_python_name() -> None:
    seen: list[str] = []

    def run() -> None:
        threads.batch()
        seen.append(Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text())

    thread = threading.Thread(target=run, name="spool-commit-and-more")
    thread.start()
    thread.join()
    assert seen == ["spool-commit-an\n"]  # TASK_COMM_LEN: 15 octets
