"""End to end: what got 250 survives kill -9; a full disk gets 452 and leaves nothing.

The disk-full cases mount a tiny tmpfs over a spool directory, so they need root
(or CAP_SYS_ADMIN) and are skipped otherwise.
"""

from __future__ import annotations

import contextlib
import os
import smtplib
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.safeio import TMP_PREFIX
from tests.fixtures.relay_proc import RelayFactory, RelayProcess

pytestmark = pytest.mark.e2e
HOST = "127.0.0.1"
MESSAGE = b"Subject: durable\r\n\r\n" + b"line of body text\r\n" * 50


def send(proc: RelayProcess, message: bytes = MESSAGE) -> str:
    """One message over STARTTLS; the queue id from the 250 reply."""
    with smtplib.SMTP(HOST, proc.starttls_port, timeout=15) as client:
        client.starttls(context=proc.client_context())
        client.ehlo("app.test")
        client.mail("app@a.test")
        client.rcpt("dest@b.test")
        code, text = client.data(message)
    assert code == 250, (code, text)
    return text.decode().rsplit(" ", 1)[1]


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if p.name.startswith(TMP_PREFIX))


def test_kill9_right_after_250_keeps_the_message(relay: RelayFactory) -> None:
    proc = relay()
    qid = send(proc)
    proc.kill9()  # no shutdown handling at all: the 250 must already mean "on disk"
    proc.start()
    spool = proc.spool()
    env = spool.load(qid)
    assert [r.address for r in env.recipients] == ["dest@b.test"] and env.sender == "app@a.test"
    data = spool.read_data(qid)
    assert data.endswith(MESSAGE[MESSAGE.index(b"\r\n\r\n") :]) and env.size == len(data)
    assert leftovers(proc.spool_dir) == []


def test_kill9_under_load_loses_nothing_acknowledged(relay: RelayFactory) -> None:
    proc = relay()
    acknowledged: list[str] = []
    stop = threading.Event()

    def client() -> None:
        for _ in range(200):  # bounded; the kill ends it much earlier
            if stop.is_set():
                return
            with contextlib.suppress(OSError, smtplib.SMTPException, AssertionError):
                acknowledged.append(send(proc))

    worker = threading.Thread(target=client)
    worker.start()
    for _ in range(100):
        if len(acknowledged) >= 5:
            break
        time.sleep(0.05)
    proc.kill9()
    stop.set()
    worker.join(timeout=30)
    assert acknowledged
    proc.start()
    spool = proc.spool()
    for qid in acknowledged:
        assert spool.load(qid).recipients[0].address == "dest@b.test"
        assert spool.read_data(qid).endswith(b"line of body text\r\n")


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str = "64k") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.parametrize(
    ("disk", "lines"),
    [("64k", 100), ("1m", 3000)],  # kept in memory, one write; streamed while it arrives
    ids=["one write", "streamed"],
)
def test_message_bigger_than_the_disk_is_452_and_leaves_nothing(
    relay: RelayFactory, disk: str, lines: int
) -> None:
    proc = relay(start=False, limits={"max_message_size": 64 * 1024 * 1024})
    with tiny_tmpfs(proc.spool_dir / "queue", size=disk):
        proc.start()
        big = b"Subject: too big for the disk\r\n\r\n" + (b"x" * 998 + b"\r\n") * lines
        with smtplib.SMTP(HOST, proc.starttls_port, timeout=15) as client:
            client.starttls(context=proc.client_context())
            client.ehlo("app.test")
            client.mail("app@a.test")
            client.rcpt("dest@b.test")
            code, text = client.data(big)
        assert (code, text) == (452, b"4.3.1 Insufficient system storage")
        assert list((proc.spool_dir / "queue").iterdir()) == []  # no temp file left
        assert send(proc)  # a message that fits still goes through
        proc.stop()
    assert "spool_failed" in proc.log_text()


def test_full_disk_is_452_and_leaves_only_what_was_there(relay: RelayFactory) -> None:
    proc = relay(start=False)
    with tiny_tmpfs(proc.spool_dir / "queue") as queue_dir:
        filler = queue_dir / ".filler"  # a dot-name: not a message to the spool
        with contextlib.suppress(OSError), filler.open("wb") as fh:
            fh.write(b"\0" * 128 * 1024)  # fill the tmpfs up
        proc.start()
        with smtplib.SMTP(HOST, proc.starttls_port, timeout=15) as client:
            client.starttls(context=proc.client_context())
            client.ehlo("app.test")
            client.mail("app@a.test")
            client.rcpt("dest@b.test")
            code, _ = client.data(MESSAGE)
        assert code == 452
        assert [p.name for p in queue_dir.iterdir()] == [".filler"]
        proc.stop()
