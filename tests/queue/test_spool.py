"""Spool: durable write path, envelope round trip, recovery, locks."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relay import safeio
from relay.errors import CorruptMessage, MessageBusy, MessageNotFound, SpoolError
from relay.queue.envelope import (
    Attempt,
    AttemptOutcome,
    ClientInfo,
    QueueEnvelope,
    RcptState,
    Recipient,
)
from relay.queue.recovery import recover
from relay.queue.spool import Spool


def make_env(spool: Spool, *rcpts: str) -> QueueEnvelope:
    return QueueEnvelope(
        id=spool.new_id(),
        created=1_700_000_000.0,
        sender="app@corp.test",
        recipients=[Recipient(address=r, options=["NOTIFY=FAILURE"]) for r in rcpts],
        mail_options=["BODY=8BITMIME"],
        client=ClientInfo(ip="127.0.0.1", port=4000, helo="app", tls_version="TLSv1.3"),
        size=5,
    )


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool")
    s.setup()
    return s


def test_store_then_load_round_trips(spool: Spool) -> None:
    env = make_env(spool, "a@x.test", "b@y.test")
    spool.store(env, b"hello")
    loaded = spool.load(env.id)
    assert loaded == env
    assert spool.read_data(env.id) == b"hello"
    assert spool.ids() == [env.id]


def test_update_keeps_recipient_history(spool: Spool) -> None:
    env = make_env(spool, "a@x.test")
    spool.store(env, b"x")
    env.recipients[0].state = RcptState.DEFERRED
    env.recipients[0].record(
        Attempt(at=1.0, outcome=AttemptOutcome.TRANSIENT, reason="451 try later", mx="mx")
    )
    spool.update(env)
    again = spool.load(env.id)
    assert again.recipients[0].state is RcptState.DEFERRED
    assert again.recipients[0].last_reason == "451 try later"
    assert again.recipients[0].history[0].mx == "mx"


def test_hold_and_release_move_the_envelope(spool: Spool) -> None:
    env = make_env(spool, "a@x.test")
    spool.store(env, b"x")
    spool.hold(env.id)
    assert spool.ids() == [] and spool.ids(held=True) == [env.id]
    assert spool.load(env.id).held
    spool.release(env.id)
    assert spool.ids() == [env.id]
    with pytest.raises(MessageNotFound):
        spool.release(env.id)


def test_ids_from_outside_cannot_escape_the_spool(spool: Spool) -> None:
    with pytest.raises(MessageNotFound):
        spool.load("../../etc/passwd")


def test_recover_removes_orphans_and_quarantines_damage(spool: Spool) -> None:
    good = make_env(spool, "a@x.test")
    spool.store(good, b"x")
    (spool.queue_dir / ".tmp-HALF1.abcd").write_bytes(b"TLS-RELAY-MESSAGE 1 ")  # never renamed
    (spool.state_dir / "ORPHAN1.json").write_bytes(b"{}")  # its message was removed
    (spool.queue_dir / "BROKEN1").write_bytes(b"{not a spool file")
    truncated = make_env(spool, "b@x.test")
    spool.store(truncated, b"y")
    path = spool.message_path(truncated.id)
    path.write_bytes(path.read_bytes()[:30])
    badstate = make_env(spool, "c@x.test")
    spool.store(badstate, b"z")
    spool.state_path(badstate.id).write_bytes(b"{not json")

    actions = recover(spool)

    assert spool.ids() == [good.id]
    assert not (spool.state_dir / "ORPHAN1.json").exists()
    assert not list(spool.queue_dir.glob(".tmp-*"))
    quarantined = sorted(p.name.split(".")[0] for p in spool.quarantine_dir.iterdir())
    assert quarantined == sorted(["BROKEN1", truncated.id, badstate.id, badstate.id])
    assert any("BROKEN1" in a for a in actions)
    assert spool.load(good.id) == good and spool.read_data(good.id) == b"x"


def test_one_file_per_message_until_the_first_update(spool: Spool) -> None:
    env = make_env(spool, "a@x.test")
    spool.store(env, [b"chunked ", b"data"])
    assert [p.name for p in spool.queue_dir.iterdir()] == [env.id]
    assert list(spool.state_dir.iterdir()) == []
    head = spool.message_path(env.id).read_bytes()
    assert head.startswith(b"TLS-RELAY-MESSAGE 1 ") and head.endswith(b"}chunked data")
    env.recipients[0].state = RcptState.DEFERRED
    spool.update(env)
    assert spool.load(env.id).recipients[0].state is RcptState.DEFERRED  # state wins
    assert spool.read_data(env.id) == b"chunked data"
    spool.remove(env.id)
    assert list(spool.queue_dir.iterdir()) == list(spool.state_dir.iterdir()) == []
    assert not spool.exists(env.id)


def test_corrupt_envelope_is_reported(spool: Spool) -> None:
    with pytest.raises(CorruptMessage):
        QueueEnvelope.from_json(b'{"version": 99}')


def test_enospc_is_spool_full_and_leaves_no_temp(tmp_path: Path) -> None:
    """A real full file system: a 64 KiB tmpfs (needs root, as in CI)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        spool = Spool(mnt)
        spool.setup()
        env = make_env(spool, "a@x.test")
        from relay.errors import SpoolFullError

        with pytest.raises(SpoolFullError):
            spool.store(env, b"x" * 200_000)
        assert list(spool.queue_dir.iterdir()) == []  # no temp file left
        assert spool.ids() == []
        small = make_env(spool, "b@x.test")
        spool.store(small, b"fits")  # the spool keeps working once space is there
        assert spool.ids() == [small.id]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


LOCK_HOLDER = """
import sys, time
from pathlib import Path
from relay.queue.recovery import recover
from relay.queue.spool import Spool
s = Spool(Path(sys.argv[1]))
with s.lock(sys.argv[2]):
    print("locked", flush=True)
    sys.stdin.readline()
"""


def test_lock_is_exclusive_across_processes(spool: Spool) -> None:
    env = make_env(spool, "a@x.test")
    spool.store(env, b"x")
    proc = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(spool.root), env.id],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(MessageBusy), spool.lock(env.id):
            pass
    finally:
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.close()
        proc.wait(timeout=10)
    with spool.lock(env.id):
        pass


def test_directory_fsync_is_group_committed(tmp_path: Path) -> None:
    """Concurrent callers share fsyncs, and each returns only after one that
    started after its call (the 250-after-fsync guarantee)."""
    import threading
    import time

    from relay.safeio import DirSync as _DirSync

    started: list[float] = []

    def slow_fsync(path: Path) -> None:
        started.append(time.monotonic())
        time.sleep(0.02)

    syncer = _DirSync(tmp_path, fsync=slow_fsync)
    calls: list[tuple[float, float]] = []

    def worker() -> None:
        t0 = time.monotonic()
        syncer.sync()
        calls.append((t0, time.monotonic()))

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(calls) == 16
    assert len(started) < 16  # batched
    for t0, t1 in calls:  # a covering fsync started after the call and finished before return
        assert any(t0 <= s and s + 0.02 <= t1 + 1e-3 for s in started)


def test_failed_directory_fsync_is_retried_by_waiters(tmp_path: Path) -> None:
    from relay.safeio import DirSync as _DirSync

    attempts: list[int] = []

    def flaky(path: Path) -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError(5, "I/O error")

    syncer = _DirSync(tmp_path, fsync=flaky)
    with pytest.raises(OSError):
        syncer.sync()
    syncer.sync()  # not covered by the failed one: it syncs again
    assert len(attempts) == 2


def test_take_fresh_only_while_the_envelope_is_untouched(spool: Spool) -> None:
    env = make_env(spool, "a@x.test")
    spool.store(env, b"data")
    got = spool.take_fresh(env.id)
    assert got is not None and got[0] is env and got[1] == b"data"
    assert spool.take_fresh(env.id) is None  # taken once

    changed = make_env(spool, "b@x.test")
    spool.store(changed, b"data")
    time.sleep(0.01)
    changed.recipients[0].state = RcptState.DEFERRED
    spool.update(changed)  # e.g. a `queue` command rewrote it meanwhile
    assert spool.take_fresh(changed.id) is None

    held = make_env(spool, "c@x.test")
    spool.store(held, b"data")
    spool.hold(held.id)
    assert spool.take_fresh(held.id) is None


async def test_store_soon_commits_concurrent_messages_in_batches(spool: Spool) -> None:
    """The loop writes, the Committer thread fsyncs/renames; every message is whole
    on disk when its await returns, and nothing temporary is left."""
    envs = [make_env(spool, f"r{i}@x.test") for i in range(40)]
    await asyncio.gather(*(spool.store_soon(env, b"data %d" % i) for i, env in enumerate(envs)))
    assert spool.ids() == sorted(env.id for env in envs)
    assert not [p for p in spool.queue_dir.iterdir() if p.name.startswith(".")]
    assert spool.read_data(envs[7].id) == b"data 7" and spool.load(envs[7].id) == envs[7]
    got = spool.take_fresh(envs[3].id)
    assert got is not None and got[1] == b"data 3"


async def test_committer_failure_is_raised_and_nothing_is_renamed(tmp_path: Path) -> None:
    from relay.safeio import Committer

    tmp, target = tmp_path / ".tmp-x", tmp_path / "x"
    tmp.write_bytes(b"half")
    fd = os.open(tmp, os.O_RDONLY)
    os.close(fd)  # fsync on a closed descriptor: EBADF, like a failing disk
    with pytest.raises(OSError):
        await Committer().submit(fd, str(tmp), str(target))
    assert tmp.exists() and not target.exists()


async def test_a_just_stored_message_stays_locked_until_its_first_pass(spool: Spool) -> None:
    """store_soon keeps the message file flock'd and lock() hands that lock on: a
    `queue` command (another process) finds it busy instead of racing the first pass."""
    env = make_env(spool, "a@x.test")
    await spool.store_soon(env, b"data")
    assert probe_lock(spool, env.id) == "busy"
    with spool.lock(env.id):
        got = spool.take_fresh(env.id)
        assert got is not None and got[0] is env  # no stat checks needed: it was locked
    assert probe_lock(spool, env.id) == "free"


async def test_forget_fresh_releases_the_locks(spool: Spool) -> None:
    env = make_env(spool, "a@x.test")
    await spool.store_soon(env, b"data")
    spool.fresh.clear()
    with spool.lock(env.id):  # a fresh open + flock works in this process too
        assert spool.take_fresh(env.id) is None


PROBE_LOCK = """
import sys
from pathlib import Path
from relay.errors import MessageBusy
from relay.queue.recovery import recover
from relay.queue.spool import Spool
try:
    with Spool(Path(sys.argv[1])).lock(sys.argv[2]):
        print("free")
except MessageBusy:
    print("busy")
"""


def probe_lock(spool: Spool, qid: str) -> str:
    """Try the message's lock from another process: "busy" or "free"."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE_LOCK, str(spool.root), qid],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


async def test_a_queue_id_collision_never_overwrites_a_message(spool: Spool) -> None:
    """Both write paths (store, and store_soon with the Committer) refuse to replace an
    existing message file; the first message stays whole and no temp file is left."""
    first = make_env(spool, "a@x.test")
    spool.store(first, b"first")
    again = make_env(spool, "b@y.test")
    again.id = first.id
    with pytest.raises(SpoolError, match="queue id collision"):
        spool.store(again, b"second")
    with pytest.raises(SpoolError, match="queue id collision"):
        await spool.store_soon(again, b"second, on the loop")
    assert spool.load(first.id) == first and spool.read_data(first.id) == b"first"
    assert sorted(os.listdir(spool.queue_dir)) == [first.id]


def test_close_soon_hands_loop_descriptors_over_together(tmp_path: Path) -> None:
    """Descriptors of removed messages given on the event loop stay open for up to
    CLOSE_BATCH seconds and are then closed by the background thread, all at once;
    off the loop, at once."""

    def opened(n: int) -> list[tuple[int, int]]:
        out = []
        for i in range(n):
            path = tmp_path / f"m{i}-{len(list(tmp_path.iterdir()))}"
            path.write_bytes(b"x")
            fd = os.open(path, os.O_RDONLY)
            out.append((fd, os.fstat(fd).st_ino))
            path.unlink()
        return out

    def still_open(fd: int, ino: int) -> bool:
        try:
            return os.fstat(fd).st_ino == ino  # the number may be reused once closed
        except OSError:
            return False

    def closed_within(fds: list[tuple[int, int]], seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not any(still_open(fd, ino) for fd, ino in fds):
                return True
            time.sleep(0.005)
        return False

    async def main() -> bool:
        fds = opened(3)
        for fd, _ in fds:
            safeio.close_soon(fd)
        held = all(still_open(fd, ino) for fd, ino in fds)
        await asyncio.sleep(safeio.CLOSE_BATCH * 3)
        return held and closed_within(fds, 5.0)

    assert asyncio.run(main())
    assert asyncio.run(main())  # a second loop: the first one's hand-over is not awaited
    off_loop = opened(1)
    safeio.close_soon(off_loop[0][0])
    assert closed_within(off_loop, 5.0)
