"""queuecli.py: `tls-relay queue ...` on a real Spool, in-process and as a subprocess."""

from __future__ import annotations

import email
import io
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay import cli, config
from relay.queue import cli as queuecli
from relay.queue.envelope import (
    Attempt,
    AttemptOutcome,
    ClientInfo,
    QueueEnvelope,
    RcptState,
    Recipient,
)
from relay.queue.spool import Spool

T0 = 1_700_000_000.0
NOW = T0 + 600
DATA = b"From: app@corp.test\r\nSubject: report\r\n\r\nbody text\r\n"
VENV_BIN = Path(sys.executable).parent


def write_config(tmp_path: Path, cert: Path, key: Path) -> Path:
    path = tmp_path / "relay.yaml"
    path.write_text(
        "hostname: relay.test\n"
        'listeners: [{address: "127.0.0.1:2599", tls: starttls}]\n'
        f"tls: {{cert: {cert}, key: {key}}}\n"
        "spool: {path: sp}\n"
        "policy: {default: {level: encrypt}}\n"
    )
    return path


@dataclass
class Q:
    cfg_path: Path
    cfg: config.Config
    spool: Spool

    def run(self, *argv: str) -> tuple[int, str, str]:
        args = cli.build_parser().parse_args(["queue", *argv])
        out, err = io.StringIO(), io.StringIO()
        rc = queuecli.run(self.cfg, args, clock=lambda: NOW, out=out, err=err)
        return rc, out.getvalue(), err.getvalue()

    def add(self, *rcpts: str, sender: str = "app@corp.test") -> QueueEnvelope:
        env = QueueEnvelope(
            id=self.spool.new_id(),
            created=T0,
            sender=sender,
            size=len(DATA),
            recipients=[Recipient(address=r) for r in rcpts],
            client=ClientInfo(
                ip="127.0.0.1",
                port=40000,
                helo="app",
                tls_version="TLSv1.3",
                tls_cipher="TLS_AES_256_GCM_SHA384",
            ),
        )
        self.spool.store(env, DATA)
        return env


@pytest.fixture
def q(tmp_path: Path, server_cert: tuple[Path, Path]) -> Q:
    path = write_config(tmp_path, *server_cert)
    cfg = config.load(path)
    spool = Spool(cfg.spool.path, clock=iter(range(10**6)).__next__)  # distinct ids
    spool.setup()
    return Q(path, cfg, spool)


@pytest.fixture
def control(q: Q) -> Iterator[socket.socket]:
    """Stands in for a running `serve`: receives the kicks."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(q.spool.control_path))
    sock.settimeout(2.0)
    yield sock
    sock.close()


def deferred(q: Q) -> QueueEnvelope:
    env = q.add("a@x.test", "b@y.test")
    a, b = env.recipients
    a.state, a.attempts, a.next_attempt = RcptState.DEFERRED, 2, NOW + 300
    a.record(
        Attempt(
            at=T0 + 60,
            outcome=AttemptOutcome.TRANSIENT,
            reason='"451 4.7.1 later" from mx[127.0.0.2]:25',
            mx="mx.x.test",
            ip="127.0.0.2",
            tls="TLSv1.3",
        )
    )
    b.state, b.attempts = RcptState.DELIVERED, 1
    b.record(Attempt(at=T0 + 60, outcome=AttemptOutcome.DELIVERED, reason="250 ok", mx="mx.y.test"))
    q.spool.update(env)
    return env


def test_list_empty(q: Q) -> None:
    assert q.run("list") == (0, "queue is empty\n", "")
    assert q.run("list", "--json") == (0, "[]\n", "")


def test_list_text_and_json(q: Q) -> None:
    env = deferred(q)
    held = q.add("c@z.test")
    q.spool.hold(held.id)
    rc, out, _ = q.run("list")
    assert rc == 0
    assert f"{env.id}   10m" in out and f"{held.id}" in out and "HELD" in out
    assert 'a@x.test  deferred  attempts=2  next in 5m  "451 4.7.1 later"' in out
    assert "b@y.test  delivered  attempts=1  250 ok" in out
    assert "2 message(s), 1 held" in out
    rc, out, _ = q.run("list", "--json")
    items = {m["id"]: m for m in json.loads(out)}
    m = items[env.id]
    assert (m["sender"], m["created"], m["held"], m["size"]) == (
        "app@corp.test",
        "2023-11-14T22:13:20Z",
        False,
        len(DATA),
    )
    assert m["recipients"] == [
        {
            "address": "a@x.test",
            "state": "deferred",
            "attempts": 2,
            "next_attempt": "2023-11-14T22:28:20Z",
            "last_reason": '"451 4.7.1 later" from mx[127.0.0.2]:25',
        },
        {
            "address": "b@y.test",
            "state": "delivered",
            "attempts": 1,
            "next_attempt": None,
            "last_reason": "250 ok",
        },
    ]
    assert items[held.id]["held"] is True
    assert items[held.id]["recipients"][0]["next_attempt"] == "2023-11-14T22:13:20Z"  # due at once


def test_show(q: Q) -> None:
    env = deferred(q)
    rc, out, _ = q.run("show", env.id)
    assert rc == 0
    assert "Subject: report" in out and "body text" not in out
    assert "127.0.0.1:40000 helo=app" in out and "TLSv1.3 TLS_AES_256_GCM_SHA384" in out
    assert 'transient mx=mx.x.test ip=127.0.0.2 tls=TLSv1.3: "451 4.7.1 later"' in out


def test_unknown_and_bad_ids(q: Q) -> None:
    for cmd in ("show", "hold", "release", "delete", "bounce", "retry"):
        rc, out, err = q.run(cmd, "0123ABCD")
        assert (rc, out, err) == (1, "", "tls-relay queue: no such message: 0123ABCD\n"), cmd
    rc, _, err = q.run("delete", "../../etc")
    assert rc == 1 and err.startswith("tls-relay queue: no such message")


def test_retry_one_and_all(q: Q, control: socket.socket) -> None:
    env = deferred(q)
    other = deferred(q)
    rc, out, _ = q.run("retry", env.id)
    assert (rc, out) == (0, f"{env.id}: due now\n")
    assert control.recv(16) == b"kick"
    a, b = q.spool.load(env.id).recipients
    assert a.next_attempt == NOW and b.state is RcptState.DELIVERED
    assert q.spool.load(other.id).recipients[0].next_attempt == NOW + 300
    rc, out, _ = q.run("retry", "--all")
    assert (rc, out) == (0, "2 message(s) due now\n")
    assert q.spool.load(other.id).recipients[0].next_attempt == NOW
    rc, _, err = q.run("retry")
    assert rc == 1 and "either a queue id or --all" in err


def test_retry_without_running_relay_says_so(q: Q) -> None:
    env = deferred(q)
    rc, out, _ = q.run("retry", env.id)
    assert rc == 0 and "no running relay answered" in out


def test_commands_refused_while_delivering(q: Q) -> None:
    env = deferred(q)
    before = q.spool.load(env.id)
    with q.spool.lock(env.id):  # what the scheduler holds while delivering
        for cmd in ("retry", "hold", "release", "delete", "bounce"):
            rc, _, err = q.run(cmd, env.id)
            assert rc == 1, cmd
            assert err == (
                f"tls-relay queue: message {env.id} is being delivered right now; "
                "try again shortly\n"
            )
        rc, out, _ = q.run("retry", "--all")
        assert (rc, out.splitlines()[0]) == (0, "0 message(s) due now, 1 being delivered already")
    assert q.spool.load(env.id) == before


def test_hold_and_release(q: Q, control: socket.socket) -> None:
    env = deferred(q)
    assert q.run("hold", env.id)[:2] == (0, f"{env.id}: held\n")
    assert q.spool.ids(held=True) == [env.id] and q.spool.ids() == []
    assert q.run("hold", env.id)[:2] == (0, f"{env.id}: already held\n")
    assert q.run("release", env.id)[:2] == (0, f"{env.id}: released\n")
    assert control.recv(16) == b"kick"
    assert q.spool.ids() == [env.id]
    assert q.run("release", env.id)[:2] == (0, f"{env.id}: not held\n")


def test_delete_sends_no_bounce(q: Q) -> None:
    env = deferred(q)
    assert q.run("delete", env.id)[:2] == (0, f"{env.id}: deleted (no bounce sent)\n")
    assert q.spool.ids() == [] and q.spool.ids(held=True) == []
    assert list(q.spool.queue_dir.iterdir()) == list(q.spool.state_dir.iterdir()) == []


def test_bounce_queues_dsn_for_pending_recipients(q: Q, control: socket.socket) -> None:
    env = deferred(q)
    rc, out, _ = q.run("bounce", env.id)
    assert rc == 0 and "bounced 1 recipient(s); DSN" in out
    assert control.recv(16) == b"kick"
    assert not q.spool.exists(env.id)  # every recipient final: removed
    (dsn_id,) = q.spool.ids()
    dsn = q.spool.load(dsn_id)
    assert (dsn.sender, dsn.bounce, [r.address for r in dsn.recipients]) == (
        "",
        True,
        ["app@corp.test"],
    )
    msg = email.message_from_bytes(q.spool.read_data(dsn_id))
    assert msg["To"] == "<app@corp.test>"
    text = msg.get_payload()[0].get_payload(decode=True).decode()
    assert "<a@x.test>: bounced by operator" in text and "b@y.test" not in text
    block = msg.get_payload()[1].get_payload()[1]
    assert (block["Final-Recipient"], block["Action"], block["Status"]) == (
        "rfc822; a@x.test",
        "failed",
        "5.0.0",
    )


def test_bounce_null_sender_sends_no_dsn(q: Q) -> None:
    env = q.add("a@x.test", sender="")
    rc, out, _ = q.run("bounce", env.id)
    assert rc == 0 and "no DSN (null sender)" in out
    assert q.spool.ids() == []


def test_bounce_held_message(q: Q) -> None:
    env = q.add("a@x.test")
    q.spool.hold(env.id)
    assert q.run("bounce", env.id)[0] == 0
    assert q.spool.ids(held=True) == []
    assert len(q.spool.ids()) == 1  # the DSN


def test_queue_list_json_as_subprocess(q: Q) -> None:
    env = deferred(q)
    proc = subprocess.run(
        [str(VENV_BIN / "tls-relay"), "queue", "list", "--json", "-c", str(q.cfg_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    (item,) = json.loads(proc.stdout)
    assert item["id"] == env.id and item["recipients"][0]["state"] == "deferred"
    proc = subprocess.run(
        [str(VENV_BIN / "tls-relay"), "queue", "delete", "NOPE1", "-c", str(q.cfg_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (proc.returncode, proc.stderr) == (1, "tls-relay queue: no such message: NOPE1\n")


def test_queue_list_into_head_ends_quietly(q: Q) -> None:
    """`tls-relay queue list | head` must not end with a BrokenPipe traceback."""
    for n in range(400):  # well over a pipe buffer of output
        q.add(*(f"rcpt{n}-{i}@example.test" for i in range(5)))
    cmd = f"'{VENV_BIN / 'tls-relay'}' queue list -c '{q.cfg_path}' | head -n 1"
    proc = subprocess.run(
        ["bash", "-o", "pipefail", "-c", cmd],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.stdout.count("\n") == 1
    assert proc.stderr == ""
    assert proc.returncode in (0, 141)  # 141: ended by the closed pipe, as `ls | head`
