"""End to end, byte-exact: smuggling, STARTTLS injection, second STARTTLS, bare LF,
declared SIZE - raw sockets and smtplib against ``tls-relay serve`` as a subprocess."""

from __future__ import annotations

import smtplib

import pytest

from tests.fixtures.rawsmtp import (
    SMUGGLING_VARIANTS,
    RawSMTP,
    replies_until_quit,
    session,
    smuggling_payload,
)
from tests.fixtures.relay_proc import RelayFactory

pytestmark = pytest.mark.e2e
HOST = "127.0.0.1"


def test_every_smuggling_variant_yields_one_message(relay: RelayFactory) -> None:
    proc = relay()
    spool = proc.spool()
    for number, variant in enumerate(SMUGGLING_VARIANTS, start=1):
        with session(HOST, proc.starttls_port, proc.client_context()) as raw:
            raw.send(smuggling_payload(variant))
            replies = replies_until_quit(raw)
        queued = [text for _, text in replies if text.startswith("2.0.0 Ok: queued as")]
        assert len(queued) == 1, (variant, replies)
        assert len(spool.ids()) == number, variant
        qid = queued[0].rsplit(" ", 1)[1]
        assert [r.address for r in spool.load(qid).recipients] == ["second@b.test"], variant
        assert b"smuggled" not in spool.read_data(qid)


def test_starttls_injection_is_discarded(relay: RelayFactory) -> None:
    proc = relay()
    with RawSMTP(HOST, proc.starttls_port) as raw:
        raw.greet()
        raw.cmd("EHLO c.test")
        raw.send(b"STARTTLS\r\nEHLO evil.test\r\nMAIL FROM:<x@y.test>\r\n")  # one write
        assert raw.reply()[0] == 220
        raw.sock = proc.client_context().wrap_socket(raw.sock, server_hostname="localhost")
        assert raw.pending(0.5) == b""  # no reply to anything sent before the handshake
        assert raw.cmd("MAIL FROM:<a@b.test>") == (503, "5.5.1 Error: send EHLO first")


@pytest.mark.parametrize("implicit", [False, True])
def test_second_starttls_is_503(relay: RelayFactory, implicit: bool) -> None:
    proc = relay()
    port = proc.implicit_port if implicit else proc.starttls_port
    with session(HOST, port, proc.client_context(), implicit=implicit) as raw:
        assert raw.cmd("STARTTLS") == (503, "5.5.1 TLS already active")
        assert raw.cmd("NOOP")[0] == 250


def test_bare_lf_rejected_550(relay: RelayFactory) -> None:
    proc = relay()
    with session(HOST, proc.starttls_port, proc.client_context()) as raw:
        raw.send(b"MAIL FROM:<a@a.test>\r\nRCPT TO:<b@b.test>\r\nDATA\r\n")
        assert [raw.reply()[0] for _ in range(3)] == [250, 250, 354]
        raw.send(b"Subject: lf\n\nunix line endings\n.\r\n")
        raw.send(b"\r\n.\r\n")
        code, text = raw.reply()
    assert (code, text[:5]) == (550, "5.6.0")
    assert proc.spool().ids() == []


def test_declared_size_too_big_552_at_mail(relay: RelayFactory) -> None:
    proc = relay(limits={"max_message_size": "4KiB"})
    message = b"Subject: big\r\n\r\n" + b"x" * 76 + b"\r\n" * 0 + (b"y" * 76 + b"\r\n") * 100
    with smtplib.SMTP(HOST, proc.starttls_port, timeout=15) as client:
        client.starttls(context=proc.client_context())
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("a@a.test", ["b@b.test"], message)  # smtplib sends SIZE=
    assert refused.value.smtp_code == 552
    assert refused.value.smtp_error.startswith(b"5.3.4")


def test_pipelined_transactions_each_spooled(relay: RelayFactory) -> None:
    proc = relay()
    one = b"MAIL FROM:<a@a.test>\r\nRCPT TO:<b@b.test>\r\nDATA\r\nSubject: p\r\n\r\nbody\r\n.\r\n"
    with session(HOST, proc.starttls_port, proc.client_context()) as raw:
        raw.send(one * 3 + b"QUIT\r\n")
        replies = replies_until_quit(raw)
    assert sum(text.startswith("2.0.0 Ok: queued") for _, text in replies) == 3
    assert len(proc.spool().ids()) == 3
