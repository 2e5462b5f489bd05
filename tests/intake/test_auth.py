"""relay.intake.auth: password checks in their own threads; the gate's in-flight count."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import threading

from relay.app import auth_executor
from relay.config import Limits
from relay.intake.auth import PasswordChecker
from relay.intake.gate import Gate
from relay.intake.users import UserDb, hash_password


class RecordingDb(UserDb):
    def __init__(self) -> None:
        super().__init__({"alice": hash_password("right")})
        self.threads: list[str] = []

    def verify(self, user: str, password: str) -> bool:
        self.threads.append(threading.current_thread().name)
        return super().verify(user, password)


async def test_scrypt_runs_in_the_auth_threads_not_the_default_executor() -> None:
    """An AUTH flood queues in its own two threads; the loop's default executor (the
    spool's writes and reads) stays free."""
    db = RecordingDb()
    checker = PasswordChecker(db, auth_executor())
    blocker = threading.Event()
    default = concurrent.futures.ThreadPoolExecutor(1)
    asyncio.get_running_loop().set_default_executor(default)
    busy = asyncio.get_running_loop().run_in_executor(None, blocker.wait, 10)  # saturated
    try:
        results = await asyncio.wait_for(
            asyncio.gather(checker.verify("alice", "right"), checker.verify("alice", "no")), 10
        )
    finally:
        blocker.set()
        await busy
    assert results == [True, False]
    assert all(name.startswith("auth") for name in db.threads), db.threads


def test_running_checks_count_against_the_limit() -> None:
    gate = Gate(Limits(max_auth_failures=2))
    addr = ipaddress.ip_address("192.0.2.1")
    assert gate.auth_begin(addr) and gate.auth_begin(addr)
    assert not gate.auth_begin(addr)  # two running: a third waits for their outcome
    assert gate.auth_end(addr, failed=False) == 0
    assert gate.auth_begin(addr)
    assert gate.auth_end(addr, failed=True) == 1
    assert gate.auth_end(addr, failed=True) == 2
    assert not gate.auth_begin(addr) and gate.auth_blocked(addr)
