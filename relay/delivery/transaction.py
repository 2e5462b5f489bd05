"""One SMTP transaction on an open outbound session: MAIL, RCPT, DATA or BDAT.

Role: :func:`transact` sends one :class:`Transaction` (sender, parameters,
recipients, data) over an :class:`~relay.delivery.session.OutboundSession` that is
already TLS, in the order RFC 5321 3.3 asks, with the replies classified where they
are seen (relay.delivery.txresult).  A server that offers PIPELINING gets [RSET,]
MAIL, the RCPTs and DATA in one write (RFC 2920); one that also offers CHUNKING gets
BDAT instead of DATA (RFC 3030), and a small message's data in that same write - one
round trip per message.  A reused session is proven alive by that RSET, and reported
``stale`` when it is not.  MAIL is refused on a transport without TLS (defence in depth).
Not: opening sessions (relay.delivery.session), choosing hosts or pooling
(relay.delivery.deliverer), or the octets of the data (relay.delivery.wiredata).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib import SMTPException, SMTPResponse, SMTPResponseException

from relay.body import CHUNK, Body
from relay.config import DeliveryConfig
from relay.delivery.downgrade import needs_8bitmime, to_7bit
from relay.delivery.outcome import Decision, Status, decision_for
from relay.delivery.params import (
    SMTPUTF8_NEEDED,
    mail_options,
    needs_smtputf8,
    rcpt_options,
    size_problem,
)
from relay.delivery.session import OutboundSession, Target, Trace
from relay.delivery.txresult import (
    TxResult,
    decide_all,
    inline_replies,
    mail_accepted,
    rcpts_accepted,
    send_message,
)
from relay.delivery.wiredata import bdat_line, command, pipelined
from relay.mailformat import crlf_only


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
        return decide_all(result, len(tx.recipients), Status.PERMANENT, reason, code=code)
    options = [o for o in tx.mail_options if o.upper() != "BODY=8BITMIME"]
    result.converted = True
    return dataclasses.replace(tx, mail_options=options, data=Body.of(converted))


INLINE_MAX = CHUNK  # BDAT data up to this size goes in the same write as MAIL and RCPT


def chunking(smtp: aiosmtplib.SMTP, body: Body) -> bool:
    """BDAT (RFC 3030) for this message: the server offers CHUNKING, and the data is
    CRLF-only - checked here for data made in memory (DSNs, a 7-bit conversion);
    stored data was checked by intake (relay.intake.datareader) as it arrived."""
    if not smtp.supports_extension("chunking"):
        return False
    return body.data is None or crlf_only(body.data)


async def transact(
    session: OutboundSession,
    tx: Transaction,
    cfg: DeliveryConfig,
    trace: Trace,
    *,
    reset: bool = False,
) -> TxResult:
    """MAIL, RCPT per recipient, then DATA or BDAT (RFC 5321 §3.3, RFC 3030); every
    reply classified here.

    *reset*: the session was used before; RSET first (RFC 5321 §4.1.1.5), which also
    proves it is still alive - if not, ``stale`` says so.  A server that offers
    PIPELINING gets [RSET,] MAIL and the RCPTs in one write (RFC 2920), with DATA, or
    with BDAT and the data itself when it is small (RFC 3030 §4.2)."""
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
        return decide_all(result, count, Status.PERMANENT, problem or "unsendable", code=code)
    encoding = "utf-8" if "SMTPUTF8" in opts else "ascii"
    call = _Call(smtp, tx, target, cfg, trace, result, chunking(smtp, tx.data))
    if smtp.supports_extension("pipelining"):
        await _pipelined(call, opts, encoding, reset)
    else:
        await _one_by_one(call, opts, encoding, reset)
    return result


@dataclass(frozen=True)
class _Call:
    """One transact call: where, what, and where its decisions go."""

    smtp: aiosmtplib.SMTP
    tx: Transaction
    target: Target
    cfg: DeliveryConfig
    trace: Trace
    result: TxResult
    chunking: bool  # the data goes with BDAT (RFC 3030), not DATA

    async def send(self, accepted: list[int], *, started: bool = False) -> None:
        # RFC 5321 §4.5.3.2.6: up to 10 minutes for the reply to the final dot.
        timeout = 2 * self.cfg.command_timeout
        await send_message(
            self.smtp,
            self.tx.data,
            accepted,
            timeout,
            self.target,
            self.trace,
            self.result,
            chunking=self.chunking,
            started=started,
        )


async def _one_by_one(call: _Call, opts: list[str], encoding: str, reset: bool) -> None:
    """A command per round trip, for a server without PIPELINING."""
    smtp, tx, target, result = call.smtp, call.tx, call.target, call.result
    count = len(tx.recipients)
    if reset:
        call.trace.stage = f"RSET on a reused session to {target.label}"
        if not await _rset(smtp):
            result.stale = True
            result.session_error = f"reused session to {target.label} is gone"
            return
    try:
        call.trace.stage = f"MAIL FROM at {target.label}"
        await smtp.mail(tx.sender, options=opts, encoding=encoding)
    except SMTPResponseException as exc:
        mail_accepted(smtp, SMTPResponse(exc.code, exc.message), False, count, target, result)
        return
    except ValueError as exc:  # not encodable / control characters: no MX will take it
        result.reusable = smtp.is_connected
        why = f"sender {tx.sender!r} cannot be sent: {exc}"
        decide_all(result, count, Status.PERMANENT, why)
        return
    except (SMTPException, OSError) as exc:
        result.session_error = f"MAIL FROM failed at {target.label}: {exc}"
        return
    accepted = await _recipients(smtp, tx, encoding, target, call.trace, result)
    if result.session_error is not None:
        return
    if not accepted:
        result.reusable = await _rset(smtp)  # RFC 5321 §4.1.1.5: end the empty transaction
        return
    await call.send(accepted)


async def _pipelined(call: _Call, opts: list[str], encoding: str, reset: bool) -> None:
    """[RSET,] MAIL, RCPT... and DATA in one write, then the message if DATA got 354;
    or, with CHUNKING, BDAT and the message in that write when it is at most
    INLINE_MAX, else BDAT once the RCPT replies are in.

    The replies mean what they mean in the one-by-one exchange; nothing of the
    message is sent unless MAIL, at least one RCPT (and DATA) were accepted - except
    small BDAT data, which the server reads and drops after a refusal (RFC 3030 §2)."""
    smtp, tx, target, result = call.smtp, call.tx, call.target, call.result
    group = _group(smtp, tx, opts, encoding, result)
    if group is None:
        result.reusable = smtp.is_connected  # nothing was sent
        return
    lines, sent = group
    inline = call.chunking and tx.data.size <= INLINE_MAX
    end = [bdat_line(tx.data)] if inline else [] if call.chunking else [b"DATA\r\n"]
    lines = ([b"RSET\r\n"] if reset else []) + lines + end
    call.trace.stage = (
        f"MAIL/RCPT/{'BDAT' if call.chunking else 'DATA'} (pipelined) at {target.label}"
    )
    timeout = call.cfg.command_timeout * (2 if inline else 1)  # BDAT's is the final reply
    replies, error = await pipelined(smtp, lines, timeout, tx.data if inline else None)
    if inline:  # the data is out already
        count = len(tx.recipients)
        inline_replies(smtp, replies, error, sent, count, reset, target, result)
        return
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
    mail, rcpts, rest = replies[0], replies[1 : 1 + len(sent)], replies[1 + len(sent) :]
    started = not call.chunking and bool(rest and rest[0].code == 354)
    if not mail_accepted(smtp, mail, started, len(tx.recipients), target, result):
        return
    accepted = rcpts_accepted(smtp, sent, rcpts, target, result)
    if accepted is None:
        return
    if not call.chunking:
        await _data_started(call, accepted, rest, lost)
    elif len(rcpts) < len(sent):  # the connection broke first; nothing of the data went
        result.session_error = lost
    elif not accepted:
        result.reusable = smtp.is_connected  # the next use starts with RSET
    else:
        await call.send(accepted)  # BDAT now that a recipient was accepted


async def _data_started(
    call: _Call, accepted: list[int], rest: list[SMTPResponse], lost: str
) -> None:
    """After the pipelined MAIL, RCPTs and DATA: the message, if DATA got 354."""
    smtp, target, result = call.smtp, call.target, call.result
    if not rest:  # the connection broke before every reply came: nothing was sent
        result.session_error = lost
        return
    if rest[0].code != 354:
        decision = decision_for(rest[0].code, rest[0].message, target)
        if rest[0].code == 421 and accepted:
            smtp.close()
            result.session_error = decision.reason
            return
        for i in accepted:
            result.decided[i] = decision
        result.reusable = smtp.is_connected
    elif not accepted:
        smtp.close()  # 354 although no recipient was accepted: end the session instead
    else:
        await call.send(accepted, started=True)


def _group(
    smtp: aiosmtplib.SMTP, tx: Transaction, opts: list[str], encoding: str, result: TxResult
) -> tuple[list[bytes], list[int]] | None:
    """The MAIL and RCPT lines of a pipelined group, and the indexes of the recipients
    that have a line; None (with every recipient decided) when nothing can be sent."""
    try:
        lines = [command(b"MAIL FROM:", tx.sender, opts, encoding)]
    except ValueError as exc:  # not encodable / control characters: no MX will take it
        why = f"sender {tx.sender!r} cannot be sent: {exc}"
        decide_all(result, len(tx.recipients), Status.PERMANENT, why)
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
            if 200 <= exc.code < 300 and smtp.is_connected:  # e.g. 252: aiosmtplib wants 250/251
                accepted.append(i)
                continue
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


async def _rset(smtp: aiosmtplib.SMTP) -> bool:
    try:
        await smtp.rset()
    except (SMTPException, OSError):
        smtp.close()
        return False
    return True
