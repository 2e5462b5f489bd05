"""One SMTP transaction on an open outbound session: MAIL, RCPT, DATA.

Role: :func:`transact` sends one :class:`Transaction` (sender, parameters,
recipients, data) over an :class:`~relay.delivery.session.OutboundSession` that is
already TLS, and classifies every reply where it is seen (RFC 5321 3.3, 4.2.1).  A
server that offers PIPELINING gets [RSET,] MAIL, the RCPTs and DATA in one write
(RFC 2920); a reused session is proven alive by that RSET, and reported ``stale``
when it is not.  MAIL is refused on a transport without TLS (defence in depth).
Not: opening sessions (relay.delivery.session), choosing hosts or pooling
(relay.delivery.deliverer), or the bytes of DATA (relay.delivery.wiredata).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiosmtplib
from aiosmtplib import SMTPException, SMTPResponse, SMTPResponseException

from relay.body import Body
from relay.config import DeliveryConfig
from relay.delivery.downgrade import needs_8bitmime, to_7bit
from relay.delivery.outcome import Decision, Status, decision_for, raw_reply, reply_text
from relay.delivery.params import (
    SMTPUTF8_NEEDED,
    mail_options,
    needs_smtputf8,
    rcpt_options,
    size_problem,
)
from relay.delivery.session import OutboundSession, Target, Trace
from relay.delivery.wiredata import command, pipelined, send_data


@dataclass(frozen=True)
class Transaction:
    """What one SMTP transaction carries (one message, one domain's recipients)."""

    sender: str
    mail_options: Sequence[str]
    recipients: Sequence[tuple[str, Sequence[str]]]
    data: Body

    def __post_init__(self) -> None:
        if isinstance(self.data, bytes):  # a message in memory, as tests give it
            object.__setattr__(self, "data", Body.of(self.data))


@dataclass
class TxResult:
    """Per-recipient decisions (by index into the recipients given to :func:`transact`).
    ``session_error``: the session failed before these recipients were decided; the
    undecided ones may try the next MX.  ``reusable``: the session may carry another
    transaction (after an RSET, which :func:`transact` sends first on a reused one)."""

    decided: dict[int, Decision] = field(default_factory=dict)
    session_error: str | None = None
    reusable: bool = False
    # A reused session turned out dead or unfit before any message data went out:
    # nothing was decided, and the same recipients may go over a fresh session.
    stale: bool = False
    converted: bool = False  # the data went as 7 bit (RFC 6152 §3): said in the log line
    dsn: bool = False  # the server offered DSN: NOTIFY/ORCPT went with the recipients


def _all(
    result: TxResult,
    count: int,
    status: Status,
    reason: str,
    reply: str | None = None,
    code: str | None = None,
) -> TxResult:
    for i in range(count):
        result.decided.setdefault(i, Decision(status, reason, reply, code))
    return result


async def _seven_bit(
    tx: Transaction, smtp: aiosmtplib.SMTP, target: Target, result: TxResult
) -> Transaction | TxResult:
    """RFC 6152 §3: the message converted to 7 bit for a server without 8BITMIME, as
    Postfix does (the one step that needs the whole message in memory; in a worker
    thread); or every recipient refused when it cannot be."""
    converted = await asyncio.to_thread(lambda: to_7bit(tx.data.whole()))
    if converted is None:  # 8-bit headers (SMTPUTF8's business) or an unparsable structure
        result.reusable = True
        why, code = "8BITMIME and the message cannot be made 7-bit", None
        if needs_smtputf8(tx) and not smtp.supports_extension("smtputf8"):
            why, code = "SMTPUTF8, which the message needs", SMTPUTF8_NEEDED
        reason = f"destination lacks {why} ({target.label})"
        return _all(result, len(tx.recipients), Status.PERMANENT, reason, code=code)
    options = [o for o in tx.mail_options if o.upper() != "BODY=8BITMIME"]
    result.converted = True
    return dataclasses.replace(tx, mail_options=options, data=Body.of(converted))


async def transact(
    session: OutboundSession,
    tx: Transaction,
    cfg: DeliveryConfig,
    trace: Trace,
    *,
    reset: bool = False,
) -> TxResult:
    """MAIL, RCPT per recipient, DATA (RFC 5321 §3.3); every reply classified here.

    *reset*: the session was used before; RSET first (RFC 5321 §4.1.1.5), which also
    proves it is still alive - if not, ``stale`` says so.  A server that offers
    PIPELINING gets [RSET,] MAIL, the RCPTs and DATA in one write (RFC 2920)."""
    smtp, target, count = session.smtp, session.target, len(tx.recipients)
    result = TxResult()
    if smtp.get_transport_info("ssl_object") is None:  # defence in depth: never plaintext
        result.session_error = f"refusing MAIL to {target.label}: the session is not TLS"
        return result
    if needs_8bitmime(tx.mail_options, tx.data) and not smtp.supports_extension("8bitmime"):
        seven = await _seven_bit(tx, smtp, target, result)
        if isinstance(seven, TxResult):
            return seven
        tx = seven
    result.dsn = smtp.supports_extension("dsn")
    opts = mail_options(tx, smtp, target)
    problem = opts if isinstance(opts, str) else size_problem(tx, smtp, target)
    if problem is not None or isinstance(opts, str):
        result.reusable = True  # nothing was sent
        utf8 = needs_smtputf8(tx) and not smtp.supports_extension("smtputf8")
        code = SMTPUTF8_NEEDED if utf8 and isinstance(opts, str) else None
        return _all(result, count, Status.PERMANENT, problem or "unsendable", code=code)
    encoding = "utf-8" if "SMTPUTF8" in opts else "ascii"
    if smtp.supports_extension("pipelining"):
        await _pipelined(smtp, tx, opts, encoding, cfg, target, trace, result, reset)
        return result
    if reset:
        trace.stage = f"RSET on a reused session to {target.label}"
        if not await _rset(smtp):
            result.stale = True
            result.session_error = f"reused session to {target.label} is gone"
            return result
    try:
        trace.stage = f"MAIL FROM at {target.label}"
        await smtp.mail(tx.sender, options=opts, encoding=encoding)
    except SMTPResponseException as exc:
        reason = reply_text(exc.code, exc.message, target)
        if exc.code == 421 or exc.code < 500:
            result.session_error = reason  # RFC 5321 §4.2.1: this MX is busy; try the next
            return result
        result.reusable = smtp.is_connected
        return _all(result, count, Status.PERMANENT, reason, raw_reply(exc.code, exc.message))
    except ValueError as exc:  # not encodable / control characters: no MX will take it
        result.reusable = smtp.is_connected
        return _all(result, count, Status.PERMANENT, f"sender {tx.sender!r} cannot be sent: {exc}")
    except (SMTPException, OSError) as exc:
        result.session_error = f"MAIL FROM failed at {target.label}: {exc}"
        return result
    accepted = await _recipients(smtp, tx, encoding, target, trace, result)
    if result.session_error is not None:
        return result
    if not accepted:
        result.reusable = await _rset(smtp)  # RFC 5321 §4.1.1.5: end the empty transaction
        return result
    await _data(smtp, tx, accepted, cfg, target, trace, result)
    return result


async def _pipelined(
    smtp: aiosmtplib.SMTP,
    tx: Transaction,
    opts: list[str],
    encoding: str,
    cfg: DeliveryConfig,
    target: Target,
    trace: Trace,
    result: TxResult,
    reset: bool,
) -> None:
    """[RSET,] MAIL, RCPT..., DATA in one write; then the message if DATA got 354.

    The replies mean what they mean in the one-by-one exchange; nothing of the
    message is sent unless MAIL, at least one RCPT and DATA were accepted."""
    group = _group(smtp, tx, opts, encoding, result)
    if group is None:
        result.reusable = smtp.is_connected  # nothing was sent
        return
    lines, sent = group
    lines = ([b"RSET\r\n"] if reset else []) + lines + [b"DATA\r\n"]
    trace.stage = f"MAIL/RCPT/DATA (pipelined) at {target.label}"
    replies, error = await pipelined(smtp, lines, cfg.command_timeout)
    lost = f"connection lost at {target.label}: {error}"
    if reset:
        rset = replies.pop(0) if replies else None
        if rset is None or rset.code != 250:
            smtp.close()  # gone or unfit for reuse; what it said to the rest does not count
            result.stale = True
            result.session_error = lost if rset is None else f"{target.label} refused RSET"
            return
    if not replies:
        result.session_error = lost
        return
    mail, rcpts, data = replies[0], replies[1 : 1 + len(sent)], replies[1 + len(sent) :]
    if not _mail_accepted(smtp, mail, bool(data and data[0].code == 354), tx, target, result):
        return
    accepted = _rcpts_accepted(smtp, sent, rcpts, target, result)
    if accepted is None:
        return
    if not data:  # the connection broke before every reply came: nothing was sent
        result.session_error = lost
        return
    if data[0].code != 354:
        decision = decision_for(data[0].code, data[0].message, target)
        if data[0].code == 421 and accepted:
            smtp.close()
            result.session_error = decision.reason
            return
        for i in accepted:
            result.decided[i] = decision
        result.reusable = smtp.is_connected
    elif not accepted:
        smtp.close()  # 354 although no recipient was accepted: end the session instead
    else:
        await _data(smtp, tx, accepted, cfg, target, trace, result, started=True)


def _group(
    smtp: aiosmtplib.SMTP, tx: Transaction, opts: list[str], encoding: str, result: TxResult
) -> tuple[list[bytes], list[int]] | None:
    """The MAIL and RCPT lines of a pipelined group, and the indexes of the recipients
    that have a line; None (with every recipient decided) when nothing can be sent."""
    try:
        lines = [command(b"MAIL FROM:", tx.sender, opts, encoding)]
    except ValueError as exc:  # not encodable / control characters: no MX will take it
        why = f"sender {tx.sender!r} cannot be sent: {exc}"
        _all(result, len(tx.recipients), Status.PERMANENT, why)
        return None
    sent: list[int] = []
    for i, (address, options) in enumerate(tx.recipients):
        try:
            lines.append(command(b"RCPT TO:", address, rcpt_options(options, smtp), encoding))
        except ValueError as exc:
            result.decided[i] = Decision(Status.PERMANENT, f"recipient cannot be sent: {exc}")
            continue
        sent.append(i)
    return (lines, sent) if sent else None


def _mail_accepted(
    smtp: aiosmtplib.SMTP,
    mail: SMTPResponse,
    data_started: bool,
    tx: Transaction,
    target: Target,
    result: TxResult,
) -> bool:
    """Whether MAIL got 250; otherwise what its reply decides is in *result*."""
    if mail.code == 250:
        return True
    if data_started:
        smtp.close()  # it waits for a message we will not send: end the session
    reason = reply_text(mail.code, mail.message, target)
    if mail.code == 421 or mail.code < 500:
        result.session_error = reason  # RFC 5321 §4.2.1: this MX is busy; try the next
        return False
    result.reusable = smtp.is_connected
    _all(result, len(tx.recipients), Status.PERMANENT, reason, raw_reply(mail.code, mail.message))
    return False


def _rcpts_accepted(
    smtp: aiosmtplib.SMTP,
    sent: list[int],
    rcpts: list[SMTPResponse],
    target: Target,
    result: TxResult,
) -> list[int] | None:
    """Indexes of the recipients the RCPT replies accepted; the others are decided.
    None when a 421 closed the session (every undecided recipient may try the next MX)."""
    accepted: list[int] = []
    for i, reply in zip(sent, rcpts, strict=False):
        decision = decision_for(reply.code, reply.message, target)
        if reply.code == 421:
            smtp.close()
            result.session_error = decision.reason  # the MX is closing: try the next MX
            return None
        if reply.code in (250, 251):
            accepted.append(i)
        else:
            result.decided[i] = decision
    return accepted


async def _recipients(
    smtp: aiosmtplib.SMTP,
    tx: Transaction,
    encoding: str,
    target: Target,
    trace: Trace,
    result: TxResult,
) -> list[int]:
    accepted: list[int] = []
    for i, (address, options) in enumerate(tx.recipients):
        try:
            trace.stage = f"RCPT TO at {target.label}"
            await smtp.rcpt(address, options=rcpt_options(options, smtp), encoding=encoding)
        except SMTPResponseException as exc:
            decision = decision_for(exc.code, exc.message, target)
            if exc.code == 421 or not smtp.is_connected:
                result.session_error = decision.reason  # the MX closed: try the next MX
                return accepted
            result.decided[i] = decision
            continue
        except ValueError as exc:
            result.decided[i] = Decision(Status.PERMANENT, f"recipient cannot be sent: {exc}")
            continue
        except (SMTPException, OSError) as exc:
            result.session_error = f"RCPT TO failed at {target.label}: {exc}"
            return accepted
        accepted.append(i)
    return accepted


async def _data(
    smtp: aiosmtplib.SMTP,
    tx: Transaction,
    accepted: list[int],
    cfg: DeliveryConfig,
    target: Target,
    trace: Trace,
    result: TxResult,
    *,
    started: bool = False,
) -> None:
    """DATA (or, *started*, just the message after a 354 already received); its
    reply applies to every accepted recipient (RFC 5321 §3.3)."""
    trace.stage = f"DATA at {target.label}"
    try:
        # RFC 5321 §4.5.3.2.6: up to 10 minutes for the reply to the final dot.
        reply = await send_data(smtp, tx.data, 2 * cfg.command_timeout, started=started)
    except SMTPResponseException as exc:
        decision = decision_for(exc.code, exc.message, target)
        result.reusable = smtp.is_connected
    except (SMTPException, OSError) as exc:
        # The MX may have taken the message before the connection broke (RFC 1047):
        # defer rather than try another MX now, so a duplicate is the worst case.
        decision = Decision(
            Status.TRANSIENT, f"connection lost during DATA at {target.label}: {exc}"
        )
    else:
        decision = Decision(
            Status.DELIVERED,
            reply_text(reply.code, reply.message, target),
            raw_reply(reply.code, reply.message),
        )
        result.reusable = True
    for i in accepted:
        result.decided[i] = decision


async def _rset(smtp: aiosmtplib.SMTP) -> bool:
    try:
        await smtp.rset()
    except (SMTPException, OSError):
        smtp.close()
        return False
    return True
