"""`workers: 2`: one supervisor, two `serve` processes on one set of listening sockets
and one spool (relay.workers); real Postfix MX, `tls-relay queue` as its own process."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.e2e.test_queue_e2e import DOMAIN, message, queue, queue_json, route_to, send, wait_for
from tests.fixtures.postfix import PostfixMx
from tests.fixtures.relay_proc import RelayFactory, RelayProcess

pytestmark = [pytest.mark.e2e, pytest.mark.postfix]


def workers_of(proc: RelayProcess) -> list[int]:
    """Pids whose parent is the supervisor (the `tls-relay serve` we started)."""
    assert proc.proc is not None
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == proc.proc.pid:
            found.append(int(entry.name))
    return sorted(found)


def start_two(relay: RelayFactory, mx: PostfixMx) -> RelayProcess:
    proc = relay(extra_config={**route_to(mx), "workers": 2})
    proc.wait_log("workers_started count=2")
    wait_for(lambda: len(workers_of(proc)) == 2 or None, "two worker processes")
    return proc


def test_two_workers_accept_deliver_and_stop(
    relay: RelayFactory,
    postfix_mx: PostfixMx,
) -> None:
    proc = start_two(relay, postfix_mx)
    rcpts = [f"w{n}@{DOMAIN}" for n in range(12)]
    for rcpt in rcpts:  # one connection each: the kernel hands them to either worker
        send(proc, "app@corp.test", [rcpt], message(f"worker mail {rcpt}"))
    got = postfix_mx.wait_messages(len(rcpts))
    assert sorted(m.recipient for m in got) == sorted(rcpts)
    wait_for(lambda: queue_json(proc) == [] or None, "the queue to empty")
    children = workers_of(proc)
    assert proc.stop() == 0
    assert all(not Path(f"/proc/{pid}").exists() for pid in children)
    log = proc.log_text()
    assert log.count("relay_started") == 2 and "workers_stopped status=0" in log


def test_kick_reaches_every_worker(relay: RelayFactory, postfix_mx: PostfixMx) -> None:
    """A deferred message is rescanned by the worker whose shard it is in; `queue retry`
    kicks all of them, so it goes out whichever worker owns it."""
    later = [f"later{n}@{DOMAIN}" for n in range(4)]
    for rcpt in later:
        postfix_mx.set_access(rcpt, "450 4.2.0 come back later")
    proc = start_two(relay, postfix_mx)
    for rcpt in later:
        send(proc, "app@corp.test", [rcpt], message(f"deferred {rcpt}"))
    wait_for(
        lambda: (
            (
                len(items := queue_json(proc)) == len(later)
                and all(i["recipients"][0]["state"] == "deferred" for i in items)
            )
            or None
        ),
        "every message deferred",
    )
    time.sleep(1.1)  # Postfix notices a changed map by its mtime, in whole seconds
    for rcpt in later:
        postfix_mx.set_access(rcpt, "OK")
    done = queue(proc, "retry", "--all")
    assert done.returncode == 0 and f"{len(later)} message(s) due now" in done.stdout, done.stdout
    got = postfix_mx.wait_messages(len(later))
    assert sorted(m.recipient for m in got) == sorted(later)
    wait_for(lambda: queue_json(proc) == [] or None, "the queue to empty")
    assert proc.stop() == 0


def test_a_dead_worker_is_replaced(relay: RelayFactory, postfix_mx: PostfixMx) -> None:
    proc = start_two(relay, postfix_mx)
    victim = workers_of(proc)[0]
    os.kill(victim, signal.SIGKILL)
    proc.wait_log("worker_died")
    wait_for(
        lambda: (len(pids := workers_of(proc)) == 2 and victim not in pids) or None,
        "a replacement worker",
    )
    rcpt = f"after@{DOMAIN}"
    send(proc, "app@corp.test", [rcpt], message("after the crash"))
    assert [m.recipient for m in postfix_mx.wait_messages(1)] == [rcpt]
    assert proc.stop() == 0


def test_sighup_reloads_and_workers_die_with_their_supervisor(
    relay: RelayFactory,
    postfix_mx: PostfixMx,
) -> None:
    """SIGHUP used to kill the supervisor (129) and leave the workers holding the ports;
    now it is forwarded and every worker reloads, nobody exits.  A supervisor killed
    outright must not leave workers serving alone either."""
    proc = start_two(relay, postfix_mx)
    assert proc.proc is not None
    children = workers_of(proc)
    try:
        proc.proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: proc.log_text().count(" reload_done ") == 2 or None,
            "both workers to reload",
            timeout=10,
        )
        time.sleep(0.5)
        assert proc.running and workers_of(proc) == children
        proc.proc.kill()  # SIGKILL: no chance to forward anything
        proc.proc.wait(timeout=10)
        wait_for(
            lambda: all(not Path(f"/proc/{pid}").exists() for pid in children) or None,
            "the workers to exit after their supervisor died",
            timeout=20,
        )
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proc.starttls_port), timeout=5).close()
    finally:
        for pid in children:  # never leave a worker behind, whatever failed above
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
