"""The queue end to end: `tls-relay serve` as a subprocess, a real Postfix MX that answers
4xx/5xx through its access map, and `tls-relay queue ...` as a separate process."""

from __future__ import annotations

import email
import json
import smtplib
import subprocess
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

from tests.fixtures.postfix import PostfixMx
from tests.fixtures.relay_proc import HOST, RelayFactory, RelayProcess

T = TypeVar("T")
DOMAIN = "postfix.test"


def route_to(mx: PostfixMx, **queue: Any) -> dict[str, Any]:
    """extra_config: deliver postfix.test to the Postfix MX; short queue timings."""
    return {
        "delivery": {
            "routes": [{"domains": [DOMAIN], "via": f"[{mx.host}]:{mx.port}"}],
            # Postfix re-reads its access map only between sessions: no reuse.
            "connection_reuse": False,
        },
        "queue": {"retry": ["1h"], "shutdown_grace": "5s", **queue},
    }


def message(subject: str) -> bytes:
    return (
        f"From: app@corp.test\r\nTo: someone@{DOMAIN}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@corp.test>\r\n\r\nhello\r\n"
    ).encode()


def send(proc: RelayProcess, sender: str, rcpts: list[str], data: bytes) -> None:
    with smtplib.SMTP(HOST, proc.starttls_port, timeout=15) as client:
        client.starttls(context=proc.client_context())
        refused = client.sendmail(sender, rcpts, data)
    assert refused == {}


def queue(proc: RelayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return proc.command("queue", *args)


def queue_json(proc: RelayProcess) -> list[dict[str, Any]]:
    done = queue(proc, "list", "--json")
    assert done.returncode == 0, done.stderr
    items = json.loads(done.stdout)
    assert isinstance(items, list)
    return items


def wait_for(probe: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
    """Poll *probe* (bounded) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = probe()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def settle(mx: PostfixMx, seconds: float = 3.0) -> int:
    """Give late duplicates a chance to arrive, then count messages."""
    time.sleep(seconds)
    return len(mx.messages())


pytestmark = [
    pytest.mark.e2e,
    pytest.mark.postfix,
]


def test_deferred_then_retry(relay: RelayFactory, postfix_mx: PostfixMx) -> None:
    rcpt = f"later@{DOMAIN}"
    postfix_mx.set_access(rcpt, "450 4.2.0 come back later")
    proc = relay(extra_config=route_to(postfix_mx))
    send(proc, "app@corp.test", [rcpt], message("deferred once"))

    def deferred() -> dict[str, object] | None:
        items = queue_json(proc)
        if items and items[0]["recipients"][0]["state"] == "deferred":
            return items[0]["recipients"][0]
        return None

    r = wait_for(deferred, "the recipient to be deferred")
    assert "450 4.2.0" in str(r["last_reason"]) and "come back later" in str(r["last_reason"])
    assert r["attempts"] == 1 and r["next_attempt"] is not None
    time.sleep(1.1)  # Postfix notices a changed map by its mtime, in whole seconds
    postfix_mx.set_access(rcpt, "OK")
    done = queue(proc, "retry", "--all")
    assert done.returncode == 0 and "1 message(s) due now" in done.stdout, done.stdout
    assert "no running relay" not in done.stdout  # the kick reached the relay
    got = postfix_mx.wait_messages(1)
    assert [m.recipient for m in got] == [rcpt]
    wait_for(lambda: queue_json(proc) == [] or None, "the queue to empty")
    assert proc.stop() == 0


def test_bounce_dsn_over_tls(relay: RelayFactory, postfix_mx: PostfixMx) -> None:
    postfix_mx.set_access(f"gone@{DOMAIN}", "550 5.1.1 no such user")
    proc = relay(extra_config=route_to(postfix_mx))
    sender = f"app@{DOMAIN}"  # the DSN goes back to the sender, through the same MX
    send(proc, sender, [f"gone@{DOMAIN}", f"ok@{DOMAIN}"], message("half bounced"))
    got = {m.recipient: m for m in postfix_mx.wait_messages(2)}
    assert set(got) == {f"ok@{DOMAIN}", sender}
    dsn = got[sender]
    assert dsn.return_path == "<>"
    raw = email.message_from_bytes(dsn.raw)
    assert raw.get_content_type() == "multipart/report"
    assert raw["Auto-Submitted"] == "auto-replied"
    _, status, headers = raw.get_payload()
    block = status.get_payload()[1]
    assert block["Final-Recipient"] == f"rfc822; gone@{DOMAIN}"
    assert (block["Action"], block["Status"]) == ("failed", "5.1.1")
    assert "Subject: half bounced" in headers.get_payload()
    assert "Received:" in dsn.raw.decode(errors="replace")
    wait_for(lambda: queue_json(proc) == [] or None, "the queue to empty")


def test_hold_release_delete(relay: RelayFactory, postfix_mx: PostfixMx) -> None:
    rcpt = f"held@{DOMAIN}"
    postfix_mx.set_access(rcpt, "450 4.2.0 not yet")
    proc = relay(extra_config=route_to(postfix_mx))
    send(proc, "app@corp.test", [rcpt], message("to hold"))
    item = wait_for(lambda: (queue_json(proc) or [None])[0], "the message to be queued")
    qid = str(item["id"])
    wait_for(lambda: queue_json(proc)[0]["recipients"][0]["attempts"] == 1, "a first attempt")
    assert queue(proc, "hold", qid).returncode == 0
    assert queue_json(proc)[0]["held"] is True
    time.sleep(1.1)  # Postfix notices a changed map by its mtime, in whole seconds
    postfix_mx.set_access(rcpt, "OK")
    assert queue(proc, "retry", qid).returncode == 0  # due now, but held: nothing is sent
    assert postfix_mx.messages() == []
    shown = queue(proc, "show", qid)
    assert (
        shown.returncode == 0 and "Subject: to hold" in shown.stdout and "450 4.2.0" in shown.stdout
    )
    assert queue(proc, "release", qid).returncode == 0
    postfix_mx.wait_messages(1)
    wait_for(lambda: queue_json(proc) == [] or None, "the queue to empty")
    gone = queue(proc, "delete", qid)
    assert (gone.returncode, gone.stderr) == (1, f"tls-relay queue: no such message: {qid}\n")
