"""What one SMTP transaction decided, recipient by recipient, from the replies it got.

Role: :class:`TxResult` holds a :class:`~relay.delivery.outcome.Decision` per recipient
(by index) and whether the session may carry another transaction; the functions here
turn the replies to MAIL, to each RCPT and to the message data into those decisions,
where the reply is seen (RFC 5321 3.3, 4.2.1).  :func:`send_message` sends the data -
DATA, or BDAT to a server that offers CHUNKING (RFC 3030) - and decides by its reply.
Not: which commands go when (relay.delivery.transaction), the octets on the wire
(relay.delivery.wiredata), what a reply code means (relay.delivery.outcome).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import aiosmtplib
from aiosmtplib import (
    SMTPException,
    SMTPResponse,
    SMTPResponseException,
    SMTPServerDisconnected,
)

from relay.body import Body
from relay.delivery.outcome import Decision, Status, decision_for, raw_reply, reply_text
from relay.delivery.session import Target, Trace
from relay.delivery.wiredata import DataUnreadable, send_bdat, send_data


@dataclass
class TxResult:
    """Per-recipient decisions (by index into the recipients of the transaction).
    ``session_error``: the session failed before these recipients were decided; the
    undecided ones may try the next MX.  ``reusable``: the session may carry another
    transaction (after an RSET, which a reused session always gets first)."""

    decided: dict[int, Decision] = field(default_factory=dict)
    session_error: str | None = None
    reusable: bool = False
    # A reused session turned out dead or unfit before any message data went out:
    # nothing was decided, and the same recipients may go over a fresh session.
    stale: bool = False
    converted: bool = False  # the data went as 7 bit (RFC 6152 §3): said in the log line
    dsn: bool = False  # the server offered DSN: NOTIFY/ORCPT went with the recipients


def decide_all(
    result: TxResult,
    count: int,
    status: Status,
    reason: str,
    reply: str | None = None,
    code: str | None = None,
) -> TxResult:
    """Every recipient not yet decided gets the same decision."""
    for i in range(count):
        result.decided.setdefault(i, Decision(status, reason, reply, code))
    return result


def mail_accepted(
    smtp: aiosmtplib.SMTP,
    mail: SMTPResponse,
    data_started: bool,
    count: int,
    target: Target,
    result: TxResult,
) -> bool:
    """Whether MAIL got 250; otherwise what its reply decides for the *count*
    recipients is in *result*.  *data_started*: DATA got its 354 in the same group,
    so the server waits for a message that will not come: the session ends."""
    if mail.code == 250:
        return True
    if data_started:
        smtp.close()
    reason = reply_text(mail.code, mail.message, target)
    if mail.code == 421 or mail.code < 500:
        result.session_error = reason  # RFC 5321 §4.2.1: this MX is busy; try the next
        return False
    result.reusable = smtp.is_connected
    decide_all(result, count, Status.PERMANENT, reason, raw_reply(mail.code, mail.message))
    return False


def rcpts_accepted(
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
        if 200 <= reply.code < 300:  # 250, 251 (RFC 5321 4.2.2), or a stray 2xx such as 252:
            accepted.append(i)  # the data, not this reply, decides it
        else:
            result.decided[i] = decision
    return accepted


def data_reply(
    smtp: aiosmtplib.SMTP,
    reply: SMTPResponse,
    accepted: list[int],
    target: Target,
    result: TxResult,
) -> None:
    """The reply to the end of the data applies to every accepted recipient (RFC 5321
    §3.3; RFC 3030 for BDAT LAST)."""
    if reply.code == 250:
        decision = Decision(
            Status.DELIVERED,
            reply_text(reply.code, reply.message, target),
            raw_reply(reply.code, reply.message),
        )
    else:
        decision = decision_for(reply.code, reply.message, target)
        if reply.code == 421:
            smtp.close()  # RFC 5321 §3.8: the server is closing
    result.reusable = smtp.is_connected
    for i in accepted:
        result.decided[i] = decision


def data_lost(
    accepted: list[int], verb: str, target: Target, error: Exception, result: TxResult
) -> None:
    """The connection broke once message data (after *verb*) had gone out."""
    # The MX may have taken the message before the connection broke (RFC 1047):
    # defer rather than try another MX now, so a duplicate is the worst case.
    reason = f"connection lost during {verb} at {target.label}: {error}"
    decision = Decision(Status.TRANSIENT, reason)
    for i in accepted:
        result.decided[i] = decision


async def send_message(
    smtp: aiosmtplib.SMTP,
    body: Body,
    accepted: list[int],
    timeout: float,
    target: Target,
    trace: Trace,
    result: TxResult,
    *,
    chunking: bool = False,
    started: bool = False,
) -> None:
    """The message and its final reply, which decides every accepted recipient:
    BDAT when *chunking*, else DATA (with *started*: DATA already got its 354 at the
    end of a pipelined group, so only the message).  *timeout*: for that reply."""
    verb = "BDAT" if chunking else "DATA"
    trace.stage = f"{verb} at {target.label}"
    try:
        if chunking:
            reply = await send_bdat(smtp, body, timeout)
        else:
            reply = await send_data(smtp, body, timeout, started=started)
    except SMTPResponseException as exc:
        data_reply(smtp, SMTPResponse(exc.code, exc.message), accepted, target, result)
    except (SMTPException, OSError) as exc:
        data_lost(accepted, verb, target, exc, result)
    else:
        data_reply(smtp, reply, accepted, target, result)


def inline_replies(
    smtp: aiosmtplib.SMTP,
    replies: list[SMTPResponse],
    error: Exception | None,
    sent: list[int],
    count: int,
    reset: bool,
    target: Target,
    result: TxResult,
) -> None:
    """The replies to [RSET,] MAIL, the RCPTs and ``BDAT <n> LAST`` whose data went in
    the same write (RFC 3030 4.2), and *error* if the group did not end well.

    The data is out: a reply that is missing or cannot be trusted defers the
    recipients it would have decided (RFC 1047: the MX may have taken the message)
    rather than sending them to another MX now.  Refusals that came before a break
    count.  One exception: a pooled session that answered nothing at all, or only a
    421, was gone before the write (closed by the MX while idle) - ``stale``, and
    the same recipients go over a fresh session.  *count*: recipients of the
    transaction; *sent*: those that had an RCPT line."""
    gone = not replies or (len(replies) == 1 and replies[0].code == 421)
    dropped = isinstance(error, SMTPServerDisconnected) and not isinstance(error, DataUnreadable)
    if reset and gone and dropped:
        smtp.close()
        result.stale = True
        result.session_error = f"reused session to {target.label} is gone"
        return
    odd = False
    if reset and replies:
        odd = replies.pop(0).code != 250  # a refused RSET: only a 250 to BDAT counts
    full = len(replies) == len(sent) + 2
    if error is not None or odd:
        smtp.close()
    cause = error or SMTPResponseException(-1, f"{target.label} refused RSET")
    out_of_step = (full and error is not None) or (odd and not (full and replies[-1].code == 250))
    if out_of_step or not replies:  # trust none of it, or there is none
        return _defer_sent(sent, target, cause, result)
    if not mail_accepted(smtp, replies[0], False, count, target, result):
        return None  # refused: so was the BDAT that followed
    rcpts = replies[1 : 1 + len(sent)]
    accepted = rcpts_accepted(smtp, sent, rcpts, target, result)
    if accepted is None:
        return None  # a 421: the MX is closing, and took nothing after it
    if not full:  # every recipient not refused before the break may have the message
        return data_lost(accepted + sent[len(rcpts) :], "BDAT", target, cause, result)
    if accepted:
        data_reply(smtp, replies[-1], accepted, target, result)
    else:  # the BDAT got its refusal too
        result.reusable = smtp.is_connected
    return None


def _defer_sent(sent: list[int], target: Target, error: Exception, result: TxResult) -> None:
    data_lost([i for i in sent if i not in result.decided], "BDAT", target, error, result)
