"""The messages the load generator sends: plain text, and the shapes of issue 14.

Role: bytes only, no I/O.  A message = a small per-message head (the standard header
fields with a unique ``Message-ID``, first, so the sink finds it in its first 64 KiB)
+ a large part shared by every message of a run (built once).  Shapes:

    plain       headers, blank line, body of 78-byte text lines (the table's rows)
    shortlines  headers, blank line, body of ``a`` CRLF lines (3 bytes each)
    bigheader   a header block of ~S bytes of short fields (``X-0000001: hhh``, 16 bytes
                each: many header lines), blank line, a one-line body
    headeronly  the same header block and nothing after it (no blank line, no body)

S is the message size.  Lines never start with "." (no dot-stuffing needed).
Not: sending them (bench.loadgen).
"""

from __future__ import annotations

SENDER = "loadgen@bench.test"
DOMAIN = "bench.test"
LINE = 78  # body line length including CRLF
SHAPES = ("plain", "shortlines", "bigheader", "headeronly")
_TEXT = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefghijklmn\r\n"
_FIELD = b"X-%07d: hhh\r\n"  # 16 bytes a field


def message_id(run: str, conn: int, seq: int) -> str:
    return f"{run}.{conn}.{seq}@loadgen.bench.invalid"


def headers(run: str, conn: int, seq: int) -> bytes:
    """The standard header block, ending with the blank line."""
    return (
        f"From: Load Generator <{SENDER}>\r\n"
        f"To: <rcpt{conn}@{DOMAIN}>\r\n"
        f"Subject: bench {run} {conn}/{seq}\r\n"
        f"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
        f"Message-ID: <{message_id(run, conn, seq)}>\r\n"
        f"MIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset=us-ascii\r\n"
        f"\r\n"
    ).encode()


def head(shape: str, run: str, conn: int, seq: int) -> bytes:
    """The per-message part: the standard fields; for the header shapes without the
    blank line (the shared part continues the header block)."""
    h = headers(run, conn, seq)
    return h[:-2] if shape in ("bigheader", "headeronly") else h


def make_body(size: int, header_len: int) -> bytes:
    """Body bytes so that headers + body is ~size bytes; 76 printable chars per line."""
    n = max(size - header_len, LINE)
    assert len(_TEXT) == LINE
    full, rest = divmod(n, LINE)
    body = _TEXT * full
    if rest >= 3:
        body += b"x" * (rest - 2) + b"\r\n"
    return body


def filler_fields(n_bytes: int) -> bytes:
    """Header fields of 16 bytes each, about *n_bytes* in all (at least one; numbered
    up to 9 999 999, so at most ~152 MiB)."""
    count = min(max(1, n_bytes // 16), 9_999_999)
    return b"".join(_FIELD % i for i in range(count))


def shared_part(shape: str, size: int, head_len: int) -> bytes:
    """What follows the per-message head, so that head + this is ~size bytes."""
    n = max(size - head_len, 3)
    if shape == "plain":
        return make_body(size, head_len)
    if shape == "shortlines":
        return b"a\r\n" * (n // 3)
    if shape == "bigheader":
        return filler_fields(n - 30) + b"\r\nshort body after a big header\r\n"
    if shape == "headeronly":
        return filler_fields(n)
    raise ValueError(f"unknown message shape {shape!r} (choose from {', '.join(SHAPES)})")
