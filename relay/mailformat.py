"""Pure helpers on message text shared by intake, delivery and the queue.

Role: the one CRLF check (intake refuses anything else; delivery relies on it to
dot-stuff with one ``bytes.replace``), the one RFC 5322 date formatter (the Date
field intake adds, the DSNs the queue writes) and one header field's value (the
Message-ID the audit trail records).
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


def header_value(data: bytes, name: str, limit: int = 256 * 1024) -> str | None:
    """The first *name* field of the header section of *data* (RFC 5322 2.2), unfolded
    and stripped; None when there is none.  Reads at most *limit* bytes."""
    end = data.find(CRLF + CRLF, 0, limit)
    head = data[: end + 2] if end >= 0 else data[:limit]
    wanted = name.lower().encode("ascii") + b":"
    lines = head.split(CRLF)
    for i, line in enumerate(lines):
        if not line.lower().startswith(wanted):
            continue
        value = line[len(wanted) :]
        for more in lines[i + 1 :]:
            if more[:1] not in (b" ", b"\t"):
                break
            value += b" " + more.strip()
        return value.decode("utf-8", "replace").strip()
    return None
