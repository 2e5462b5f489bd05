"""Reading the DATA section of an SMTP transaction in chunks, not lines, and passing
it on as it arrives.

Role: find the end-of-data marker ``CRLF . CRLF`` (RFC 5321 §4.1.1.4) in a byte
stream with C-speed searches, undo dot-stuffing (§4.5.2), enforce the size limit
(RFC 1870), the 1000-octet line limit (§4.5.3.1.6) and CRLF-only line endings with
no NUL, and give back any bytes that followed the marker (pipelined commands) to the
stream reader.  Each chunk read becomes one content piece handed to a sink at once
(relay.intake.reception writes it to the spool), so memory does not grow with the
message: the scanner keeps at most a few bytes between chunks.

aiosmtpd reads DATA one line at a time, one coroutine step per line: for a
10 MiB message that is ~140 000 awaits and dominated the relay's CPU in the
benchmark.  Here a whole chunk is searched at once.

Only ``CRLF . CRLF`` ends the data, exactly as in aiosmtpd >= 1.4.5; bare CR, bare
LF and NUL are refused (``550 5.6.0``, the equivalent of Postfix's
``smtpd_forbid_bare_newline = reject``), so no smuggling variant (``LF . LF``,
``CR . CR``, ``CRLF . LF`` ...) can end a message early or hide a second one here or
at the next hop, and content a sender may have signed is never rewritten.

Not: header surgery or storing (relay.intake.reception, relay.intake.message), or
replying to the client (relay.intake.session).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable

END = b"\r\n.\r\n"
STUFFED = b"\r\n."  # a line that starts with a period, or the end marker
READ_ALL = 1 << 30  # read() returns at most this much: everything buffered
MAX_LINE = 1000  # octets including CRLF, RFC 5321 4.5.3.1.6
_BLOCK = MAX_LINE // 2  # any LF-free run of MAX_LINE octets covers an aligned block of this


class DataProblem(enum.Enum):
    NONE = "none"
    TOO_BIG = "too big"  # over the size limit: the rest is read and discarded
    LINE_TOO_LONG = "line too long"
    BARE_NEWLINE = "bare CR, bare LF or NUL"


class DataScanner:
    """Chunks of the DATA section in, de-dot-stuffed content pieces out.  No I/O:
    table-testable.  After a problem the rest is read to the end marker and dropped.

    The buffer starts with a virtual CRLF, because the 354 reply's line was ended
    by the client's DATA command line: a message may be just ``.CRLF``.
    """

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.problem = DataProblem.NONE
        self.done = False
        self.size = 0  # content octets passed on (or that would have been)
        self._buf = bytearray(b"\r\n")
        self._virtual = True  # the buffer still starts with the virtual CRLF
        self._line = 0  # octets of the current, unfinished line seen so far

    def feed(self, chunk: bytes) -> tuple[bytes, bytes]:
        """Consume *chunk*: the content it completes (empty after a problem), and the
        bytes after the end marker (empty until it is found)."""
        self._buf += chunk
        # The end marker and every stuffed line start with CRLF "." (RFC 5321 4.5.2):
        # one search finds the first of either, and most chunks have neither.
        dot = self._buf.find(STUFFED)
        idx = -1
        if dot >= 0:
            idx = dot if self._buf.startswith(END, dot) else self._buf.find(END, dot + 1)
        leftover = b""
        if idx >= 0:
            cut = idx + 2  # the content keeps the CRLF before the marker's period
            leftover = bytes(self._buf[idx + len(END) :])
            self.done = True
        else:
            # Keep what could begin the marker, and never end between a CRLF and the
            # octet after it: a period there must be seen with the CRLF to be unstuffed.
            cut = len(self._buf) - (len(END) - 1)
            if cut > 0 and self._buf[cut - 1] == 13:  # CR
                cut -= 1
            if cut > 1 and self._buf[cut - 2 : cut] == b"\r\n":
                cut -= 2
        if cut <= 0:
            return b"", leftover
        region = bytes(self._buf[:cut])
        del self._buf[:cut]
        if self.done:
            self._buf = bytearray()
        return self._content(region, dot >= 0 and dot + len(STUFFED) <= cut), leftover

    def _content(self, region: bytes, stuffed: bool) -> bytes:
        """*stuffed*: some line of *region* starts with a period."""
        if self.problem is DataProblem.NONE:
            self._check(region)
        piece = region.replace(STUFFED, b"\r\n") if stuffed else region  # RFC 5321 4.5.2
        if self._virtual:
            piece, self._virtual = piece[2:], False
        self.size += len(piece)
        if self.problem is DataProblem.NONE and self.size > self.max_size:
            self.problem = DataProblem.TOO_BIG
        if self.problem is not DataProblem.NONE:
            return b""
        return piece

    def _check(self, region: bytes) -> None:
        """Line endings and line lengths of raw *region* (which never ends inside a CRLF)."""
        lf = region.count(b"\n")
        if b"\x00" in region or region.count(b"\r") != lf or region.count(b"\r\n") != lf:
            self.problem = DataProblem.BARE_NEWLINE
        elif _too_long(region, self._line):
            self.problem = DataProblem.LINE_TOO_LONG
        last = region.rfind(b"\n")
        self._line = self._line + len(region) if last < 0 else len(region) - last - 1


def _too_long(region: bytes, carried: int) -> bool:
    """Whether a line (the octets between two LFs, its CR included) reaches MAX_LINE;
    *carried* octets of the first line came in earlier regions."""
    first = region.find(b"\n")
    if first < 0:
        return carried + len(region) >= MAX_LINE
    if carried + first >= MAX_LINE:
        return True
    for block in range(first + 1, len(region), _BLOCK):
        if region.find(b"\n", block, block + _BLOCK) < 0:
            before = region.rfind(b"\n", 0, block)
            after = region.find(b"\n", block + _BLOCK)
            if (len(region) if after < 0 else after) - before - 1 >= MAX_LINE:
                return True
    return False


Sink = Callable[[bytes], Awaitable[None]]


async def read_data(reader: asyncio.StreamReader, max_size: int, sink: Sink) -> DataScanner:
    """Read one DATA section from *reader*, each content piece handed to *sink* while
    there is no problem; pipelined bytes after it stay readable.

    Raises asyncio.IncompleteReadError if the client closes before the end marker.
    """
    scanner = DataScanner(max_size)
    while not scanner.done:
        chunk = await reader.read(READ_ALL)
        if not chunk:
            raise asyncio.IncompleteReadError(b"", None)
        piece, leftover = scanner.feed(chunk)
        if leftover:
            # read(READ_ALL) took everything buffered, and nothing can arrive
            # before this line runs (no await in between): stream order is kept.
            reader.feed_data(leftover)
        if piece:
            await sink(piece)
    return scanner
