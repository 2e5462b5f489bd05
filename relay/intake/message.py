"""Message data: line-ending checks and header surgery on raw bytes (pure).

Role: produce the bytes that go to the spool:
a ``Received:`` field prepended (RFC 5321 4.4, with the inbound TLS details), and
``Message-ID:`` / ``Date:`` appended to the header block when missing (RFC 5322 3.6:
Date is required, Message-ID should be present; RFC 6409 8.2/8.3 let a submission
server add them).  Works on bytes only - no ``email`` parser on the hot path, so
the message body is never re-encoded.

Bare CR, bare LF and NUL never get here: relay.intake.datareader rejects them
(``550 5.6.0``) while reading, and says why it rejects rather than normalises.

Not: I/O, clocks (the caller passes ``now``), or MIME handling.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relay.mailformat import CRLF, format_date

_FIELD = rb"[!-9;-~]+[ \t]*:"  # RFC 5322 2.2 ftext, obs-optional WSP
_LINE_REST = rb"[^\r\n]*(?:\r\n|\Z)"
# Fields, each with its folded continuation lines, from the start of the data.
_HEADER_RUN = re.compile(rb"(?:%s%s(?:[ \t]%s)*)*" % (_FIELD, _LINE_REST, _LINE_REST))
_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.MULTILINE)
_HELO_SAFE = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")


@dataclass(frozen=True)
class ReceivedInfo:
    """What the Received field says about the inbound hop."""

    hostname: str  # our name
    queue_id: str
    client_ip: str
    helo: str | None
    tls_version: str | None
    tls_cipher: str | None
    tls_bits: int | None
    authenticated: bool
    recipients: tuple[str, ...]
    now: float  # epoch seconds; the caller reads the clock


def header_block_end(data: bytes) -> tuple[int, bool]:
    """Offset where the header block ends, and whether a blank line follows it.

    The block is the run of header fields (and their folded continuation lines) at
    the start of *data*; it ends at the empty line (RFC 5322 2.1), at the first line
    that is not a header field, or at the end of the data.  One regular expression,
    so a header block of a megabyte costs milliseconds, not a Python loop per line.
    """
    end = _HEADER_RUN.match(data).end()  # type: ignore[union-attr]  # matches at least ""
    return end, data.startswith(CRLF, end)


def header_names(data: bytes, end: int | None = None) -> set[str]:
    """Lower-cased names of the fields in the header block only (never the body);
    *end* is header_block_end's offset when the caller already has it."""
    if end is None:
        end, _ = header_block_end(data)
    return {name.decode("ascii").lower() for name in _NAME.findall(data, 0, end)}


def _clean_helo(helo: str | None) -> str:
    # Client-supplied: keep it from breaking the comment syntax of the field.
    if not helo:
        return "unknown"
    return _HELO_SAFE.sub("?", helo)[:255]


def _address_literal(ip: str) -> str:
    return f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"


def received_field(info: ReceivedInfo) -> bytes:
    """The ``Received:`` field (RFC 5321 4.4), folded, ending in CRLF.

    ``with`` is ESMTPS or ESMTPSA (RFC 3848); the TLS comment follows Postfix's
    ``(using TLSv1.3 with cipher ...)`` so existing log parsers understand it.
    ``for <rcpt>`` only with exactly one recipient, so Bcc lists are not disclosed.
    """
    lines = [
        f"Received: from {_clean_helo(info.helo)} (unknown {_address_literal(info.client_ip)})"
    ]
    if info.tls_version:
        bits = f" ({info.tls_bits}/{info.tls_bits} bits)" if info.tls_bits else ""
        lines.append(f"\t(using {info.tls_version} with cipher {info.tls_cipher}{bits})")
    protocol = "ESMTPSA" if info.authenticated else "ESMTPS"
    lines.append(f"\tby {info.hostname} (tls-relay) with {protocol} id {info.queue_id}")
    tail = f"; {format_date(info.now)}"
    if len(info.recipients) == 1 and info.recipients[0].isascii():
        lines.append(f"\tfor <{info.recipients[0]}>{tail}")
    else:
        lines[-1] += tail
    return ("\r\n".join(lines) + "\r\n").encode("ascii", errors="replace")


def prepare(data: bytes, info: ReceivedInfo) -> bytes:
    """The bytes to spool: Received prepended, Message-ID and Date added when missing."""
    end, has_blank = header_block_end(data)
    names = header_names(data, end)
    added = b""
    if "message-id" not in names:
        added += f"Message-ID: <{info.queue_id}@{info.hostname}>\r\n".encode("ascii")
    if "date" not in names:
        added += f"Date: {format_date(info.now)}\r\n".encode("ascii")
    separator = b""
    if not has_blank and end < len(data):
        separator = CRLF  # body text with no header block before it: keep it the body
    head = data[:end]
    if head and not head.endswith(CRLF):
        head += CRLF  # last header line had no line ending (message ended there)
    return received_field(info) + head + added + separator + data[end:]
