"""Unit tests: reply classification and the MAIL/RCPT parameters a transaction sends."""

from __future__ import annotations

import aiosmtplib
import pytest

from relay.delivery.outcome import Status, classify, reply_text
from relay.delivery.params import mail_options as _mail_options
from relay.delivery.params import rcpt_options as _rcpt_options
from relay.delivery.session import Target
from relay.delivery.transaction import Transaction

TARGET = Target("mx1.example.test", "127.0.0.2", 2525)


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (250, Status.DELIVERED),
        (251, Status.DELIVERED),
        (421, Status.TRANSIENT),
        (450, Status.TRANSIENT),
        (452, Status.TRANSIENT),
        (550, Status.PERMANENT),
        (552, Status.PERMANENT),
        (554, Status.PERMANENT),
    ],
)
def test_classify(code: int, status: Status) -> None:
    assert classify(code) is status


def test_reply_text_is_one_line() -> None:
    text = reply_text(550, "5.1.1 <a@x>: no such\n user", TARGET)
    assert text == '"550 5.1.1 <a@x>: no such user" from mx1.example.test[127.0.0.2]:2525'


def _smtp(**ext: str) -> aiosmtplib.SMTP:
    smtp = aiosmtplib.SMTP()
    smtp.esmtp_extensions = dict(ext)
    return smtp


def _env(*options: str, data: bytes = b"x" * 10) -> Transaction:
    return Transaction("a@src.test", list(options), [("b@example.test", ())], data)


def test_mail_options_recompute_size_and_drop_unknown() -> None:
    smtp = _smtp(size="1000", **{"8bitmime": "", "dsn": ""})
    opts = _mail_options(_env("SIZE=5", "BODY=8BITMIME", "RET=HDRS", "AUTH=<>"), smtp, TARGET)
    assert opts == ["SIZE=10", "BODY=8BITMIME", "RET=HDRS"]


def test_mail_options_without_extensions() -> None:
    assert _mail_options(_env("SIZE=5", "RET=FULL", "BODY=7BIT"), _smtp(), TARGET) == []
    problem = _mail_options(_env("BODY=8BITMIME"), _smtp(), TARGET)
    assert isinstance(problem, str) and "destination lacks 8BITMIME" in problem
    assert _mail_options(_env("SMTPUTF8"), _smtp(), TARGET) == []  # declared, not needed
    utf8 = Transaction("a@src.test", ["SMTPUTF8"], [("ü@example.test", ())], b"x")
    problem = _mail_options(utf8, _smtp(), TARGET)
    assert isinstance(problem, str) and "destination lacks SMTPUTF8" in problem


def test_rcpt_options_only_to_dsn_servers() -> None:
    options = ["NOTIFY=FAILURE", "ORCPT=rfc822;b@example.test", "X=1"]
    assert _rcpt_options(options, _smtp()) == []
    assert _rcpt_options(options, _smtp(dsn="")) == options[:2]
