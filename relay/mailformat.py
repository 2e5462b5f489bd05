"""Pure helpers on message text shared by intake, delivery and the queue.

Role: the one CRLF check (intake refuses anything else; delivery relies on it to
dot-stuff with one ``bytes.replace``) and the one RFC 5322 date formatter (the Date
field intake adds, the DSNs the queue writes).
Not: header surgery (relay.intake.message) or MIME.
"""

from __future__ import annotations

import email.utils

CRLF = b"\r\n"


def crlf_only(data: bytes) -> bool:
    """Every CR and every LF belongs to a CRLF pair (bytes.count: C speed)."""
    pairs = data.count(CRLF)
    return data.count(b"\r") == pairs and data.count(b"\n") == pairs


def format_date(now: float) -> str:
    """RFC 5322 3.3 date-time, UTC: ``Tue, 02 Jan 2024 03:04:05 +0000``."""
    return email.utils.formatdate(now, usegmt=False).replace("-0000", "+0000")
