"""bounce.py: RFC 3464 DSNs, parsed back with Python's email package."""

from __future__ import annotations

import email
from email.message import Message

import pytest

from relay.delivery.downgrade import to_7bit
from relay.queue import bounce
from relay.queue.bounce import DsnKind
from relay.queue.envelope import Attempt, AttemptOutcome, QueueEnvelope, RcptState, Recipient

T0 = 1_700_000_000.0
ORIGINAL = (
    b"From: App <app@corp.test>\r\nTo: a@x.test\r\nSubject: Invoice 42\r\n"
    b"Message-ID: <m1@corp.test>\r\n\r\nBody line\r\nTo: not-a-header@x.test\r\n"
)


def rcpt(address: str, *history: Attempt, options: list[str] | None = None) -> Recipient:
    r = Recipient(address=address, options=options or [], state=RcptState.DEFERRED)
    for a in history:
        r.record(a)
    r.attempts = len(history)
    return r


def env(
    *rcpts: Recipient, sender: str = "app@corp.test", options: list[str] | None = None
) -> QueueEnvelope:
    return QueueEnvelope(
        id="AAA111", created=T0, sender=sender, recipients=list(rcpts), mail_options=options or []
    )


def parse(blob: bytes) -> Message:
    return email.message_from_bytes(blob)


def status_blocks(msg: Message) -> list[Message]:
    part = msg.get_payload()[1]
    assert part.get_content_type() == "message/delivery-status"
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    return blocks


PERM = Attempt(
    at=T0 + 10,
    outcome=AttemptOutcome.PERMANENT,
    reason='"550 5.1.1 <a@x.test>: user unknown" from mx.x.test[127.0.0.2]:25',
    mx="mx.x.test",
    ip="127.0.0.2",
    tls="TLSv1.3",
    reply="550 5.1.1 <a@x.test>: user unknown",
)
TLSFAIL = Attempt(
    at=T0 + 20,
    outcome=AttemptOutcome.TRANSIENT,
    reason="TLS handshake with mx.y.test failed: certificate verify failed",
    mx="mx.y.test",
    ip="127.0.0.3",
)
EXPIRED = Attempt(
    at=T0 + 30,
    outcome=AttemptOutcome.EXPIRED,
    reason="delivery time expired; last error: TLS handshake with mx.y.test failed",
)


def test_failed_dsn_structure_and_fields() -> None:
    failed = [rcpt("a@x.test", PERM), rcpt("b@y.test", TLSFAIL, EXPIRED)]
    blob = bounce.build_dsn(
        env(*failed), failed, "relay.test", T0 + 100, ORIGINAL, DsnKind.FAILED, "BBB222"
    )
    assert b"\n" not in blob.replace(b"\r\n", b"")  # CRLF only
    msg = parse(blob)
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@relay.test>"
    assert msg["To"] == "<app@corp.test>"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Message-ID"] == "<BBB222@relay.test>"
    assert email.utils.parsedate_to_datetime(msg["Date"]).timestamp() == T0 + 100
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    human, _, headers = msg.get_payload()
    text = human.get_payload(decode=True).decode()
    assert '<a@x.test>: "550 5.1.1 <a@x.test>: user unknown" from mx.x.test' in text
    assert "<b@y.test>: delivery time expired; last error: TLS handshake" in text
    per_msg, first, second = status_blocks(msg)
    assert per_msg["Reporting-MTA"] == "dns; relay.test"
    assert email.utils.parsedate_to_datetime(per_msg["Arrival-Date"]).timestamp() == T0
    assert first["Final-Recipient"] == "rfc822; a@x.test"
    assert first["Action"] == "failed"
    assert first["Status"] == "5.1.1"  # the enhanced code of the reply
    assert first["Remote-MTA"] == "dns; mx.x.test"
    assert first["Diagnostic-Code"] == "smtp; 550 5.1.1 <a@x.test>: user unknown"
    assert email.utils.parsedate_to_datetime(first["Last-Attempt-Date"]).timestamp() == T0 + 10
    assert second["Final-Recipient"] == "rfc822; b@y.test"
    assert second["Status"] == "4.4.7"  # RFC 3463: delivery time expired
    assert second["Diagnostic-Code"] is None  # a TLS failure is not an SMTP reply
    assert second["Remote-MTA"] == "dns; mx.y.test"
    assert headers.get_content_type() == "text/rfc822-headers"
    quoted = headers.get_payload()
    assert "Subject: Invoice 42" in quoted
    assert "Body line" not in quoted and "not-a-header" not in quoted


def test_delayed_dsn() -> None:
    late = [
        rcpt(
            "c@z.test",
            Attempt(
                at=T0 + 5,
                outcome=AttemptOutcome.TRANSIENT,
                reason='"451 4.7.1 greylisted" from mx.z.test',
                mx="mx.z.test",
                reply="451 4.7.1 greylisted",
            ),
        )
    ]
    blob = bounce.build_dsn(
        env(*late),
        late,
        "relay.test",
        T0 + 3600,
        ORIGINAL,
        DsnKind.DELAYED,
        "CCC",
        retry_until=T0 + 86400,
    )
    msg = parse(blob)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    _, block = status_blocks(msg)
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.7.1"
    assert email.utils.parsedate_to_datetime(block["Will-Retry-Until"]).timestamp() == T0 + 86400


@pytest.mark.parametrize(
    ("history", "kind", "expected"),
    [
        (
            [Attempt(1, AttemptOutcome.PERMANENT, "x", reply="554 transaction failed")],
            DsnKind.FAILED,
            "5.0.0",
        ),
        (
            [Attempt(1, AttemptOutcome.PERMANENT, "x", reply="550 4.1.1 odd")],
            DsnKind.FAILED,
            "5.0.0",
        ),
        ([Attempt(1, AttemptOutcome.PERMANENT, "550 5.1.1 only in text")], DsnKind.FAILED, "5.0.0"),
        (
            [Attempt(at=1, outcome=AttemptOutcome.OPERATOR, reason="bounced by operator")],
            DsnKind.FAILED,
            "5.0.0",
        ),
        ([], DsnKind.FAILED, "5.0.0"),
        (
            [Attempt(at=1, outcome=AttemptOutcome.TRANSIENT, reason="connection refused")],
            DsnKind.DELAYED,
            "4.0.0",
        ),
    ],
)
def test_status_code_fallbacks(history: list[Attempt], kind: bounce.Kind, expected: str) -> None:
    assert bounce.status_code(rcpt("a@x.test", *history), kind) == expected


def test_dsn_message_envelope_is_from_null_sender() -> None:
    failed = [rcpt("a@x.test", PERM)]
    dsn_env, blob = bounce.dsn_message(
        env(*failed), failed, "relay.test", T0, ORIGINAL, DsnKind.FAILED, "NEW1"
    )
    assert dsn_env.id == "NEW1" and dsn_env.sender == "" and dsn_env.bounce
    assert [r.address for r in dsn_env.recipients] == ["app@corp.test"]
    assert dsn_env.size == len(blob)
    assert dsn_env.mail_options == []


def test_eight_bit_headers_are_quoted_as_is() -> None:
    original = "Subject: Grüße\r\n\r\nbody".encode()
    failed = [rcpt("a@x.test", PERM)]
    dsn_env, blob = bounce.dsn_message(
        env(*failed, options=["SMTPUTF8"]), failed, "relay.test", T0, original, DsnKind.FAILED, "N2"
    )
    assert "Subject: Grüße\r\n".encode() in blob
    assert dsn_env.mail_options == ["BODY=8BITMIME", "SMTPUTF8"]
    assert b"Content-Transfer-Encoding: 8bit" in blob


def test_reason_with_newlines_stays_on_one_line() -> None:
    bad = Attempt(
        1, AttemptOutcome.PERMANENT, "x", reply="550-5.7.1 first\r\n550 5.7.1 second\x00x"
    )
    failed = [rcpt("a@x.test", bad)]
    blob = bounce.build_dsn(env(*failed), failed, "h.test", T0, ORIGINAL, DsnKind.FAILED, "N3")
    _, block = status_blocks(parse(blob))
    assert block["Diagnostic-Code"] == "smtp; 550-5.7.1 first 550 5.7.1 second x"


def test_orcpt_and_envid_are_reported() -> None:
    failed = [rcpt("a@x.test", PERM, options=["NOTIFY=FAILURE", "ORCPT=rfc822;A+2BB@x.test"])]
    blob = bounce.build_dsn(
        env(*failed, options=["ENVID=QQ+3D1"]), failed, "h.test", T0, ORIGINAL, DsnKind.FAILED, "N4"
    )
    per_msg, block = status_blocks(parse(blob))
    assert per_msg["Original-Envelope-Id"] == "QQ=1"  # RFC 3464 2.2.1 (was misnamed)
    assert block["Original-Recipient"] == "rfc822; A+B@x.test"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"A: 1\r\nB: 2\r\n\r\nbody\r\n\r\nmore", b"A: 1\r\nB: 2\r\n"),
        (b"A: 1\r\n folded\r\n\r\nbody", b"A: 1\r\n folded\r\n"),
        (b"A: 1\nB: 2\n\nbody", b"A: 1\r\nB: 2\r\n"),  # bare LF tolerated
        (b"\r\nbody only", b""),
        (b"A: 1\r\nno blank line", b"A: 1\r\nno blank line\r\n"),
    ],
)
def test_original_headers(data: bytes, expected: bytes) -> None:
    assert bounce.original_headers(data) == expected


@pytest.mark.parametrize(
    ("options", "kind", "expected"),
    [
        ([], DsnKind.FAILED, True),
        ([], DsnKind.DELAYED, True),
        (["NOTIFY=NEVER"], DsnKind.FAILED, False),
        (["NOTIFY=SUCCESS,FAILURE"], DsnKind.FAILED, True),
        (["notify=success,failure"], DsnKind.DELAYED, False),
        (["NOTIFY=DELAY"], DsnKind.DELAYED, True),
    ],
)
def test_wants_notice(options: list[str], kind: bounce.Kind, expected: bool) -> None:
    assert bounce.wants_notice(Recipient(address="a@x.test", options=options), kind) is expected


def test_boundary_avoids_collisions() -> None:
    failed = [rcpt("a@x.test", PERM)]
    original = b"X-Trick: --=N5/h.test\r\n\r\n"
    blob = bounce.build_dsn(env(*failed), failed, "h.test", T0, original, DsnKind.FAILED, "N5")
    msg = parse(blob)
    assert len(msg.get_payload()) == 3
    assert "X-Trick" in msg.get_payload()[2].get_payload()


def test_reply_is_data_not_parsed_from_reason() -> None:
    """Diagnostic-Code comes from the reply recorded where it was seen, never from text."""
    assert bounce.smtp_reply(Attempt(1, AttemptOutcome.PERMANENT, '"550 5.1.1 x" from mx')) is None
    assert (
        bounce.smtp_reply(Attempt(1, AttemptOutcome.PERMANENT, "x", reply="550 5.1.1 x"))
        == "550 5.1.1 x"
    )
    assert bounce.smtp_reply(None) is None


def test_delivery_reason_format_gives_status_and_diagnostic() -> None:
    attempt = Attempt(
        at=T0,
        outcome=AttemptOutcome.PERMANENT,
        mx="mx.x.test",
        reason='"550 5.7.1 relaying denied" from mx.x.test[127.0.0.2]:25',
        reply="550 5.7.1 relaying denied",
    )
    failed = [rcpt("a@x.test", attempt)]
    blob = bounce.build_dsn(env(*failed), failed, "h.test", T0, ORIGINAL, DsnKind.FAILED, "N6")
    _, block = status_blocks(parse(blob))
    assert block["Status"] == "5.7.1"
    assert block["Diagnostic-Code"] == "smtp; 550 5.7.1 relaying denied"


def test_requiretls_refusal_is_5_7_30_and_its_dsn_is_requiretls_too() -> None:
    """RFC 8689: the recipients of a REQUIRETLS message that could not be sent with
    its conditions get 5.7.30, decided here (no MX said it); the DSN, which carries
    the original's headers, is itself sent with REQUIRETLS."""
    refused = Attempt(
        at=T0 + 10,
        outcome=AttemptOutcome.PERMANENT,
        reason="REQUIRETLS: mx.x.test[127.0.0.2]:25 does not offer REQUIRETLS",
        status="5.7.30",
    )
    e = env(rcpt("a@x.test", refused), options=["REQUIRETLS"])
    dsn_env, data = bounce.dsn_message(
        e, e.recipients, "relay.test", T0 + 20, ORIGINAL, DsnKind.FAILED, "BBB222"
    )
    assert "REQUIRETLS" in dsn_env.mail_options
    (block,) = [b for b in status_blocks(parse(data)) if b.get("Final-Recipient")]
    assert block["Status"] == "5.7.30"
    assert b"Body line" not in data  # headers only


def test_ret_full_returns_the_whole_message_and_hdrs_only_headers() -> None:
    """RFC 3461 4.3: RET=FULL asks for the message back (when not too big)."""
    perm = rcpt("a@x.test", PERM)
    for ret, ctype, body_in in (
        ("FULL", "message/rfc822", True),
        ("HDRS", "text/rfc822-headers", False),
    ):
        e = env(perm, options=[f"RET={ret}"])
        _, data = bounce.dsn_message(
            e, [perm], "relay.test", T0 + 20, ORIGINAL, DsnKind.FAILED, "B1"
        )
        parts = parse(data).get_payload()
        assert parts[2].get_content_type() == ctype
        assert (b"Body line" in data) is body_in


def test_relayed_notice_for_notify_success() -> None:
    """RFC 3461 6.2.3: NOTIFY=SUCCESS to a next hop without DSN: a "relayed" DSN."""
    done = rcpt("a@x.test", options=["NOTIFY=SUCCESS"])
    assert bounce.wants_notice(done, DsnKind.RELAYED)
    assert not bounce.wants_notice(rcpt("b@x.test"), DsnKind.RELAYED)  # not asked
    e = env(done)
    _, data = bounce.dsn_message(e, [done], "relay.test", T0 + 20, ORIGINAL, DsnKind.RELAYED, "B2")
    msg = parse(data)
    assert msg["Subject"] == "Successful Mail Relay"
    (block,) = [b for b in status_blocks(msg) if b.get("Final-Recipient")]
    assert (block["Action"], block["Status"]) == ("relayed", "2.0.0")


def test_dsn_for_a_utf8_recipient_can_be_made_7bit() -> None:
    """Found by the MX matrix (issue 15): the DSN for a recipient with a UTF-8 address
    (refused by a next hop without SMTPUTF8) went back to the sender's MX, which lacked
    SMTPUTF8 and 8BITMIME too, and could not be made 7-bit - the sender never heard.
    Now its message/delivery-status stays ASCII (RFC 3464 2.1) with RFC 6533's utf-8
    address type, and the text parts are converted as any 8-bit text."""
    failed = rcpt("j\u00fcrgen+x@x.test", PERM)
    original = b"From: app@corp.test\r\nTo: j\xc3\xbcrgen+x@x.test\r\n\r\nhi\r\n"
    e = env(failed, options=["SMTPUTF8"])
    _, blob = bounce.dsn_message(e, [failed], "h.test", T0, original, DsnKind.FAILED, "N7")
    (block,) = status_blocks(parse(blob))[1:]
    assert block["Final-Recipient"] == "utf-8; j\\x{FC}rgen\\x{2B}x@x.test"
    seven = to_7bit(blob)
    assert seven is not None and seven.isascii()
    text = parse(seven).get_payload()[0].get_payload(decode=True).decode()
    assert "<j\u00fcrgen+x@x.test>" in text
    assert status_blocks(parse(seven))[1]["Final-Recipient"] == block["Final-Recipient"]
