"""kill -9 the relay at each step, restart it, and count what the MX received.

Every message that got a 250 is delivered exactly once, or - only when the crash falls
after the MX accepted it but before the relay recorded that - at most twice.  Never zero.
A message whose DATA was cut off by the crash never got a 250 and leaves nothing behind.
"""

from __future__ import annotations

import signal
import smtplib
import time
from collections.abc import Iterator

import pytest
import trustme

from tests.e2e.test_queue_e2e import (
    DOMAIN,
    HOST,
    message,
    queue,
    queue_json,
    route_to,
    send,
    settle,
    wait_for,
)
from tests.fixtures.postfix import PostfixMx, available, postfix_instance
from tests.fixtures.relay_proc import RelayFactory

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.postfix,
]
SLOW = "4"  # seconds Postfix pauses, the window in which the relay is killed


@pytest.fixture
def slow_data_mx(ca: trustme.CA) -> Iterator[PostfixMx]:
    """Postfix that pauses before answering DATA: the relay is mid-delivery, nothing sent."""
    if not available():
        pytest.skip("needs Debian's postfix binaries and root")
    with postfix_instance(ca, main={"smtpd_data_restrictions": f"sleep {SLOW}"}) as mx:
        yield mx


@pytest.fixture
def slow_eod_mx(ca: trustme.CA) -> Iterator[PostfixMx]:
    """Postfix that pauses after the final dot: it has the message, the relay has no 250."""
    if not available():
        pytest.skip("needs Debian's postfix binaries and root")
    main = {"smtpd_end_of_data_restrictions": f"sleep {SLOW}"}
    with postfix_instance(ca, main=main) as mx:
        yield mx


def test_kill_mid_data_keeps_nothing(relay: RelayFactory, postfix_mx: PostfixMx) -> None:
    proc = relay(extra_config=route_to(postfix_mx))
    client = smtplib.SMTP(HOST, proc.starttls_port, timeout=15)
    client.starttls(context=proc.client_context())
    client.ehlo()
    assert client.mail("app@corp.test")[0] == 250
    assert client.rcpt(f"a@{DOMAIN}")[0] == 250
    assert client.docmd("DATA")[0] == 354
    client.send(b"Subject: cut off\r\n\r\nhalf a message\r\n")
    proc.kill9()
    client.close()
    proc.start()
    assert queue_json(proc) == []
    spool = proc.spool()
    assert list(spool.queue_dir.iterdir()) == [] and spool.ids() == []  # no temp file
    assert settle(postfix_mx) == 0


def test_kill_right_after_250(relay: RelayFactory, postfix_mx: PostfixMx) -> None:
    rcpt = f"a@{DOMAIN}"
    postfix_mx.set_access(rcpt, "450 4.2.0 not yet")  # whatever delivery starts cannot finish
    proc = relay(extra_config=route_to(postfix_mx))
    send(proc, "app@corp.test", [rcpt], message("after 250"))
    proc.kill9()
    time.sleep(1.1)  # Postfix notices a changed map by its mtime, in whole seconds
    postfix_mx.set_access(rcpt, "OK")
    proc.start()
    # Recovery makes a deferred message due at its next attempt; force it now.
    wait_for(
        lambda: queue_json(proc) == [] or queue(proc, "retry", "--all").returncode < 0,
        "delivery after restart",
    )
    postfix_mx.wait_messages(1)
    assert settle(postfix_mx) == 1


def test_kill_mid_delivery(relay: RelayFactory, slow_data_mx: PostfixMx) -> None:
    mx = slow_data_mx
    proc = relay(extra_config=route_to(mx))
    send(proc, "app@corp.test", [f"a@{DOMAIN}"], message("mid delivery"))
    mx.wait_log("connect from")  # the relay is in its SMTP session with the MX
    proc.kill9()  # waiting for the MX's answer to DATA: nothing was handed over
    proc.start()
    got = mx.wait_messages(1, timeout=30)
    assert [m.recipient for m in got] == [f"a@{DOMAIN}"]
    wait_for(lambda: queue_json(proc) == [] or None, "the queue to empty")
    assert settle(mx) == 1


def test_kill_after_mx_accepted(relay: RelayFactory, slow_eod_mx: PostfixMx) -> None:
    mx = slow_eod_mx
    proc = relay(extra_config=route_to(mx))
    send(proc, "app@corp.test", [f"a@{DOMAIN}"], message("maybe twice"))
    mx.wait_log("message-id=<maybe-twice@corp.test>")  # cleanup(8) is reading the data
    proc.kill9()  # the MX has the whole message; the relay never saw its 250
    proc.start()
    wait_for(lambda: queue_json(proc) == [] or None, "the queue to empty", timeout=40)
    count = settle(mx, 5.0)
    assert 1 <= count <= 2  # the one case where a duplicate is allowed, never a loss


def test_sigterm_drains(relay: RelayFactory, slow_data_mx: PostfixMx) -> None:
    """SIGTERM: new sessions are refused at once, the delivery in flight completes
    within queue.shutdown_grace, and the relay exits 0 with the message delivered."""
    mx = slow_data_mx
    proc = relay(extra_config=route_to(mx, shutdown_grace="15s"))
    send(proc, "app@corp.test", [f"a@{DOMAIN}"], message("graceful"))
    mx.wait_log("connect from")  # delivery is in flight; Postfix pauses before DATA
    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises((ConnectionError, smtplib.SMTPException, OSError)):
        late = smtplib.SMTP(HOST, proc.starttls_port, timeout=5)
        code = late.ehlo()[0]
        late.close()
        assert code != 250, "a new session was served after SIGTERM"
        raise ConnectionError("refused with a non-250 code")
    assert proc.proc.wait(timeout=30) == 0
    assert [m.recipient for m in mx.wait_messages(1, timeout=10)] == [f"a@{DOMAIN}"]
    assert "delivered" in proc.log_text()
    proc.start()
    assert queue_json(proc) == []  # recorded as delivered before exit: nothing to resend
    assert settle(mx) == 1
