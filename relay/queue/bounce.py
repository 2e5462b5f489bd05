"""Bounces: RFC 3464 delivery status notifications built from the spool's records.

Role: turn an envelope and the recipients that failed (or are delayed) into the
bytes of a multipart/report DSN addressed from ``<>`` to the original sender, and
the envelope that queues it.  Pure: the caller passes ``now``, the new queue id and
the original message bytes; the result goes back into the spool like any message
and is delivered over TLS like any message.
Not: storing or sending the DSN (relay.queue.outcomes, relay.queue.cli), deciding whether a
recipient failed (relay.delivery classifies, relay.queue.outcomes applies), or parsing the
original message beyond finding the end of its header section.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Sequence

from relay.body import Body
from relay.mailformat import format_date
from relay.queue.envelope import Attempt, AttemptOutcome, QueueEnvelope, Recipient


class DsnKind(enum.StrEnum):
    """RFC 3464 2.3.3 Action of the recipients a DSN reports."""

    FAILED = "failed"  # given up: permanent failure or out of lifetime
    DELAYED = "delayed"  # still being retried (the optional delay warning)
    RELAYED = "relayed"  # NOTIFY=SUCCESS, handed to a next hop without DSN (RFC 3461 6.2.3)


CRLF = b"\r\n"
MAX_TEXT = 900  # RFC 5322 2.1.1: keep every line well under 998 characters
MAX_HEADERS = 256 * 1024  # a "header section" with no end is cut here
MAX_RETURN = 2 * 1024 * 1024  # RET=FULL returns a message up to this size, else its headers
SUBJECTS = {
    DsnKind.FAILED: "Undelivered Mail Returned to Sender",
    DsnKind.DELAYED: "Delayed Mail (still being retried)",
    DsnKind.RELAYED: "Successful Mail Relay",
}

# relay.delivery records a reply as `"550 5.1.1 text" from host[ip]:port`; a bare reply
# ("550 5.1.1 text") is accepted too.  RFC 5321 4.2: a reply starts with a 3-digit code.
_ENHANCED = re.compile(r"[245]\d\d[ -]([245]\.\d{1,3}\.\d{1,3})(?:\s|$)")  # RFC 3463 / 2034


def wants_notice(recipient: Recipient, kind: DsnKind) -> bool:
    """RFC 3461 4.1 NOTIFY: NEVER, or a list of SUCCESS/FAILURE/DELAY; absent = failure
    and delay notices, no success notice."""
    wanted = {DsnKind.FAILED: "FAILURE", DsnKind.DELAYED: "DELAY", DsnKind.RELAYED: "SUCCESS"}
    for option in recipient.options:
        key, _, value = option.partition("=")
        if key.upper() == "NOTIFY":
            words = {w.strip().upper() for w in value.split(",")}
            return wanted[kind] in words
    return kind is not DsnKind.RELAYED


def dsn_message(
    envelope: QueueEnvelope,
    failed: Sequence[Recipient],
    hostname: str,
    now: float,
    original: bytes | Body,
    kind: DsnKind,
    new_id: str,
    retry_until: float | None = None,
) -> tuple[QueueEnvelope, bytes]:
    """The DSN's envelope (from ``<>``, ``bounce=True``) and its bytes, ready for Spool.store.
    Blocking when *original* is on disk and returned whole: call it off the event loop."""
    data = build_dsn(envelope, list(failed), hostname, now, original, kind, new_id, retry_until)
    options = ["BODY=8BITMIME"] if not data.isascii() else []
    if any(o.upper() == "SMTPUTF8" for o in envelope.mail_options):
        options.append("SMTPUTF8")  # RFC 6531: the sender's address may be UTF-8
    if any(o.upper() == "REQUIRETLS" for o in envelope.mail_options):
        # RFC 8689 5: the notice about a REQUIRETLS message (its headers) is as protected.
        options.append("REQUIRETLS")
    dsn_env = QueueEnvelope(
        id=new_id,
        created=now,
        sender="",  # RFC 5321 4.5.5: notifications use the null reverse-path
        recipients=[Recipient(address=envelope.sender)],
        mail_options=options,
        size=len(data),
        bounce=True,
    )
    return dsn_env, data


def build_dsn(
    envelope: QueueEnvelope,
    failed: list[Recipient],
    hostname: str,
    now: float,
    original: bytes | Body,
    kind: DsnKind,
    new_id: str,
    retry_until: float | None = None,
) -> bytes:
    """RFC 3464 multipart/report; report-type=delivery-status, CRLF line endings."""
    human = _human_text(envelope, failed, hostname, kind, retry_until).encode()
    status = _status_fields(envelope, failed, hostname, now, kind, retry_until).encode()
    parts = [
        (b"text/plain; charset=utf-8", b"Notification", human),
        (b"message/delivery-status", b"Delivery report", status),
        _returned(envelope, original, kind),
    ]
    boundary = _boundary(new_id, hostname, [p[2] for p in parts])
    cte = b"7bit" if all(p[2].isascii() for p in parts) else b"8bit"
    out = [
        _top_headers(envelope, hostname, now, kind, new_id),
        b"Content-Type: multipart/report; report-type=delivery-status;" + CRLF,
        b' boundary="' + boundary + b'"' + CRLF,
        b"Content-Transfer-Encoding: " + cte + CRLF,
        CRLF,
        b"This is a MIME-encapsulated message." + CRLF,
    ]
    for ctype, description, body in parts:
        part_cte = b"7bit" if body.isascii() else b"8bit"
        out += [CRLF, b"--" + boundary + CRLF, b"Content-Description: " + description + CRLF]
        out += [b"Content-Type: " + ctype + CRLF, b"Content-Transfer-Encoding: " + part_cte + CRLF]
        out += [CRLF, body]
    out += [CRLF, b"--" + boundary + b"--" + CRLF]
    return b"".join(out)


def _returned(
    envelope: QueueEnvelope, original: bytes | Body, kind: DsnKind
) -> tuple[bytes, bytes, bytes]:
    """RFC 3461 4.3 RET: the whole message when the sender asked for it (RET=FULL) and it
    is not too big, else its headers (also the default, and always for REQUIRETLS)."""
    body = original if isinstance(original, Body) else Body.of(original)
    ret = (_option(envelope.mail_options, "RET") or "").upper()
    requiretls = any(o.upper() == "REQUIRETLS" for o in envelope.mail_options)
    if ret == "FULL" and kind is DsnKind.FAILED and not requiretls and body.size <= MAX_RETURN:
        return (b"message/rfc822", b"Undelivered Message", body.whole())
    return (b"text/rfc822-headers", b"Undelivered Message Headers", original_headers(body.head))


def original_headers(data: bytes) -> bytes:
    """The header section of *data*: everything before the first empty line (RFC 5322 2.1).

    Works on bytes on purpose: the original may be malformed or 8-bit, and the
    DSN must quote it, not a parser's reinterpretation of it.
    """
    ends = [i for i in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if i >= 0]
    if data.startswith((b"\r\n", b"\n")):
        head = b""
    elif ends:
        head = data[: min(ends)]
    else:
        head = data
    if len(head) > MAX_HEADERS:
        head = head[: head.rfind(b"\n", 0, MAX_HEADERS) + 1 or MAX_HEADERS]
    lines = re.split(rb"\r\n|\r|\n", head.rstrip(b"\r\n"))
    return b"".join(line + CRLF for line in lines if line)


def status_code(recipient: Recipient, kind: DsnKind) -> str:
    """RFC 3463 status for a recipient, from what was recorded when it was classified."""
    decision = recipient.history[-1] if recipient.history else None
    contact = _last_contact(recipient)
    if kind is DsnKind.DELAYED:
        return _enhanced(contact, "4") or "4.0.0"
    if kind is DsnKind.RELAYED:
        return "2.0.0"
    if decision is not None and decision.outcome is AttemptOutcome.EXPIRED:
        return "4.4.7"  # RFC 3463 4.4.7: delivery time expired
    if decision is not None and decision.outcome is AttemptOutcome.PERMANENT:
        if decision.status and decision.status.startswith("5."):
            return decision.status  # decided here, e.g. RFC 8689's 5.7.30
        return _enhanced(decision, "5") or "5.0.0"
    return "5.0.0"


def smtp_reply(attempt: Attempt | None) -> str | None:
    """The MX's reply recorded with the attempt, if there was one (for Diagnostic-Code).

    Recorded as data by delivery where the reply was seen; never parsed out of reason text.
    """
    return attempt.reply if attempt is not None and attempt.reply else None


# -- pieces --------------------------------------------------------------------


def _top_headers(
    envelope: QueueEnvelope, hostname: str, now: float, kind: DsnKind, new_id: str
) -> bytes:
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{envelope.sender}>",
        f"Subject: {SUBJECTS[kind]}",
        f"Date: {format_date(now)}",
        f"Message-ID: <{new_id}@{hostname}>",
        "Auto-Submitted: auto-replied",  # RFC 3834 5: no auto-replies to this
        "MIME-Version: 1.0",
    ]
    return "".join(line + "\r\n" for line in lines).encode()


def _human_text(
    envelope: QueueEnvelope,
    failed: list[Recipient],
    hostname: str,
    kind: DsnKind,
    until: float | None,
) -> str:
    lines = [f"This is the mail system at host {hostname}.", ""]
    if kind is DsnKind.FAILED:
        lines += [
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. It is attached below.",
            "",
        ]
    elif kind is DsnKind.RELAYED:
        lines += [
            "Your message was delivered to the next mail server on its way, which",
            "does not send delivery notifications itself: this is the last one.",
            "",
        ]
    else:
        lines += [
            "This is a warning only; you do not need to resend your message.",
            "",
            "Your message could not be delivered yet to the recipients below.",
            f"It will be retried until {format_date(until)}." if until else "It will be retried.",
            "",
        ]
    sent = f"<{envelope.sender}>" if envelope.sender else "<>"
    lines += [f"The message from {sent} arrived on {format_date(envelope.created)}.", ""]
    for rcpt in failed:
        lines.append(f"<{rcpt.address}>: {_clean(rcpt.last_reason or 'no reason recorded')}")
    return "".join(line + "\r\n" for line in lines)


def _status_fields(
    envelope: QueueEnvelope,
    failed: list[Recipient],
    hostname: str,
    now: float,
    kind: DsnKind,
    until: float | None,
) -> str:
    blocks = [_message_fields(envelope, hostname)]
    blocks += [_recipient_fields(r, now, kind, until) for r in failed]
    return "\r\n".join("".join(f"{line}\r\n" for line in block) for block in blocks)


def _message_fields(envelope: QueueEnvelope, hostname: str) -> list[str]:
    # RFC 3464 2.2: per-message fields
    lines = [f"Reporting-MTA: dns; {hostname}"]
    envid = _option(envelope.mail_options, "ENVID")
    if envid is not None:
        lines.append(f"Original-Envelope-Id: {_clean(_xtext(envid))}")  # RFC 3464 2.2.1
    lines.append(f"Arrival-Date: {format_date(envelope.created)}")
    return lines


def _recipient_fields(rcpt: Recipient, now: float, kind: DsnKind, until: float | None) -> list[str]:
    # RFC 3464 2.3: per-recipient fields
    lines = []
    orcpt = _option(rcpt.options, "ORCPT")
    if orcpt is not None and ";" in orcpt:
        addr_type, _, addr = orcpt.partition(";")
        lines.append(f"Original-Recipient: {addr_type}; {_clean(_xtext(addr))}")
    lines += [
        f"Final-Recipient: {_address_type(rcpt.address)}",
        f"Action: {kind}",
        f"Status: {status_code(rcpt, kind)}",
    ]
    contact = _last_contact(rcpt)
    if contact is not None and contact.mx:
        lines.append(f"Remote-MTA: dns; {_clean(contact.mx)}")
    reply = smtp_reply(contact)
    if reply is not None:
        lines.append(f"Diagnostic-Code: smtp; {_clean(reply)}")
    last = contact or (rcpt.history[-1] if rcpt.history else None)
    lines.append(f"Last-Attempt-Date: {format_date(last.at if last else now)}")
    if kind is DsnKind.DELAYED and until is not None:
        lines.append(f"Will-Retry-Until: {format_date(until)}")
    return lines


def _last_contact(rcpt: Recipient) -> Attempt | None:
    """The latest attempt that actually reached (or tried to reach) an MX."""
    return next((a for a in reversed(rcpt.history) if a.outcome.contacted_mx), None)


def _enhanced(attempt: Attempt | None, klass: str) -> str | None:
    match = _ENHANCED.match(smtp_reply(attempt) or "")
    if match and match.group(1).startswith(klass):
        return match.group(1)
    return None


def _option(options: Iterable[str], key: str) -> str | None:
    for option in options:
        name, sep, value = option.partition("=")
        if sep and name.upper() == key:
            return value
    return None


def _address_type(address: str) -> str:
    """RFC 3464 2.3.2 address-type; address.  A UTF-8 address (RFC 6531) is written as
    RFC 6533 3's ``utf-8`` type in its ASCII form, ``\\x{HEX}`` per non-ASCII character
    (and for "+", "=" and "\\"), so message/delivery-status stays 7-bit (RFC 3464 2.1) and
    the DSN can be made 7-bit for a sender's MX without SMTPUTF8 or 8BITMIME."""
    if address.isascii():
        return f"rfc822; {address}"
    return "utf-8; " + "".join(
        ch if ch.isascii() and ch.isprintable() and ch not in "+=\\" else f"\\x{{{ord(ch):02X}}}"
        for ch in address
    )


def _xtext(text: str) -> str:
    """RFC 3461 4: decode "+XX" hex escapes."""
    return re.sub(r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), text)


def _clean(text: str) -> str:
    """One line, no control characters, bounded length."""
    flat = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    return flat if len(flat) <= MAX_TEXT else flat[: MAX_TEXT - 3] + "..."


def _boundary(new_id: str, hostname: str, bodies: list[bytes]) -> bytes:
    """RFC 2046 5.1.1: a boundary that occurs in none of the parts."""
    boundary = f"={new_id}/{hostname}".encode()
    for _ in range(10):
        if not any(boundary in body for body in bodies):
            break
        boundary += b"=_"
    return boundary
