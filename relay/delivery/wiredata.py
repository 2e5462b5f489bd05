"""Sending a message's data: DATA without re-scanning it with regular expressions,
or BDAT (RFC 3030 CHUNKING) without touching it at all.

Role: aiosmtplib's ``SMTP.data()`` normalises line endings and dot-stuffs with
two regular expressions over the whole message (about 0.2 s of CPU for 10 MiB
in the benchmark).  Intake already guarantees CRLF-only data (relay.intake.datareader
refuses bare CR/LF), so here transparency (RFC 5321 §4.5.2) is one
``bytes.replace``.  The command/reply sequence is aiosmtplib's own, including
marking a reply as expected before each write (its STARTTLS response-injection
fix, 5.1.3).  Anything unexpected - data that is not CRLF-only, an aiosmtplib
whose internals differ - falls back to ``SMTP.data()``.  To a server that offers
CHUNKING the stored octets go as they are after ``BDAT <size> LAST``
(:func:`send_bdat`): no stuffing pass, no end marker, no scan.

:func:`pipelined` sends a group of commands in one write (RFC 2920 PIPELINING) and
collects their replies in order.  aiosmtplib reads one reply per command and drops
bytes that arrive while a parsed reply awaits pickup, so for the group the transport
is handed to a small collector protocol (``transport.set_protocol``, public API) and
handed back after the last reply.

Not: deciding what a reply means (relay.delivery.transaction classifies it).
"""

from __future__ import annotations

import asyncio
import collections
import re

import aiosmtplib
from aiosmtplib import (
    SMTPDataError,
    SMTPException,
    SMTPReadTimeoutError,
    SMTPResponse,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)
from aiosmtplib.protocol import SMTPProtocol

from relay.body import Body, Stuffer
from relay.mailformat import crlf_only

CRLF = b"\r\n"
MAX_REPLY_LINE = 8192  # as aiosmtplib
MAX_REPLIES_BYTES = 4 * MAX_REPLY_LINE + 64 * 1024  # a group's replies, buffered at most
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")  # aiosmtplib's command-injection check


class DataUnreadable(SMTPServerDisconnected):
    """The message data could not be read from its spool file; the session was closed
    before the data ended, so the server takes nothing of it."""


def dot_stuff(data: bytes) -> bytes:
    """RFC 5321 4.5.2: double a leading period on every line; add the end marker."""
    body = b"." + data if data.startswith(b".") else data
    body = body.replace(b"\r\n.", b"\r\n..")
    if not body.endswith(CRLF):
        body += CRLF
    return body + b".\r\n"


async def send_data(
    smtp: aiosmtplib.SMTP, data: bytes | Body, timeout: float, *, started: bool = False
) -> SMTPResponse:
    """DATA, the message, and the final reply, as ``SMTP.data()`` does.  With
    *started*, DATA already got its 354 (it ended a pipelined group): only the
    message and the final reply.  A message on disk goes a piece at a time, each
    written once the transport has room (relay.body), never whole in memory."""
    body = data if isinstance(data, Body) else Body.of(data)
    usable = _usable(smtp)
    if usable is None or (body.data is not None and not crlf_only(body.data)):
        if started or body.data is None:  # never send such data raw, nor a file whole
            smtp.close()
            raise SMTPServerDisconnected("message data cannot be sent safely; connection closed")
        return await smtp.data(body.data, timeout=timeout)
    protocol, lock = usable
    try:
        async with lock:
            if not started:
                protocol._response_pending = True
                protocol.write(b"DATA\r\n")
                start = await protocol.read_response(timeout=timeout)
                if start.code != 354:
                    raise SMTPDataError(start.code, start.message)
            protocol._response_pending = True
            if body.data is not None:
                protocol.write(dot_stuff(body.data))
            else:
                await write_body(smtp, protocol, body, timeout, stuff=True)
            return await _final_reply(protocol, timeout)
    except (SMTPServerDisconnected, SMTPTimeoutError):
        smtp.close()
        raise


def bdat_line(body: Body) -> bytes:
    """RFC 3030: the whole message as one last chunk."""
    return b"BDAT %d LAST\r\n" % body.size


async def send_bdat(smtp: aiosmtplib.SMTP, body: Body, timeout: float) -> SMTPResponse:
    """``BDAT <size> LAST``, the message as it is stored - no dot-stuffing, no end
    marker, no scan: the server counts octets (RFC 3030) - and the final reply."""
    usable = _usable(smtp)
    if usable is None:
        smtp.close()
        raise SMTPServerDisconnected("message data cannot be sent safely; connection closed")
    protocol, lock = usable
    try:
        async with lock:
            protocol._response_pending = True
            protocol.write(bdat_line(body))
            await write_body(smtp, protocol, body, timeout, stuff=False)
            return await _final_reply(protocol, timeout)
    except (SMTPServerDisconnected, SMTPTimeoutError):
        smtp.close()
        raise


def _usable(smtp: aiosmtplib.SMTP) -> tuple[SMTPProtocol, asyncio.Lock] | None:
    """The connected protocol and its command lock, when aiosmtplib's internals are
    the ones relay.internals lists; else None (the data cannot be sent our way)."""
    protocol = smtp.protocol
    lock = getattr(protocol, "_command_lock", None)
    if protocol is None or lock is None or not hasattr(protocol, "_response_pending"):
        return None
    return protocol, lock


async def _final_reply(protocol: SMTPProtocol, timeout: float) -> SMTPResponse:
    reply = await protocol.read_response(timeout=timeout)
    if reply.code != 250:
        raise SMTPDataError(reply.code, reply.message)
    return reply


async def write_body(
    smtp: aiosmtplib.SMTP, protocol: SMTPProtocol, body: Body, timeout: float, *, stuff: bool
) -> None:
    """The message, a piece at a time, each once the transport has room: dot-stuffed
    with its end marker for DATA (*stuff*), or as it is for BDAT.  Anything wrong on
    the way - a piece that is not CRLF-only for DATA, the file unreadable, an MX that
    stops reading - closes the session before the end, so the server never takes a
    truncated or unsafe message."""
    stuffer = Stuffer() if stuff else None
    pieces = body.pieces()
    try:
        while True:
            try:
                piece = await anext(pieces)
            except StopAsyncIteration:
                break
            except OSError as exc:  # the spool file, not the connection
                smtp.close()
                raise DataUnreadable(f"message data could not be read: {exc}") from exc
            out = piece if stuffer is None else stuffer.feed(piece)
            if stuffer is not None and not crlf_only(out):
                raise OSError("message data is not CRLF-only")
            protocol.write(out)
            async with asyncio.timeout(timeout):  # an MX that stops reading
                await protocol._drain_helper()  # the transport has room again
        end = b"" if stuffer is None else stuffer.end()
        if not crlf_only(end):
            raise OSError("message data is not CRLF-only")
    except DataUnreadable:
        raise
    except OSError as exc:  # TimeoutError and ConnectionError included
        smtp.close()
        raise SMTPServerDisconnected(f"message data could not be sent: {exc}") from exc
    finally:
        await pieces.aclose()
    if end:
        protocol.write(end)


def command(verb: bytes, path: str, params: list[str], encoding: str) -> bytes:
    """``MAIL FROM:<path> PARAM ...`` as one CRLF-terminated line.  *path* was
    validated at intake (relay.intake.addresses) and is sent as it is - aiosmtplib's
    quote_address would re-parse it with email.utils.  ValueError for control
    characters (command injection) or an address the encoding cannot carry."""
    line = b" ".join([verb + b"<" + path.encode(encoding) + b">", *(p.encode() for p in params)])
    if _CONTROL.search(line):
        raise ValueError("command contains a prohibited control character")
    return line + CRLF


class _Collector(asyncio.Protocol):
    """Takes a connection's incoming bytes for one pipelined group; splits replies."""

    def __init__(self, inner: asyncio.Protocol) -> None:
        self.inner = inner
        self.buffer = bytearray()
        self.replies: collections.deque[SMTPResponse] = collections.deque()
        self.error: Exception | None = None
        self.waiter: asyncio.Future[None] | None = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            while (reply := _split_reply(self.buffer)) is not None:
                self.replies.append(reply)
            if len(self.buffer) > MAX_REPLIES_BYTES:
                raise SMTPResponseException(-1, "Response too long")
        except SMTPResponseException as exc:
            self.error = exc
        self._wake()

    def eof_received(self) -> bool:
        self.error = self.error or SMTPServerDisconnected("Unexpected EOF received")
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.error = self.error or SMTPServerDisconnected("Connection lost")
        self._wake()
        self.inner.connection_lost(exc)  # aiosmtplib's state: not connected

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def next(self, timeout: float) -> SMTPResponse:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.replies:
            if self.error is not None:
                raise self.error
            waiter = self.waiter = loop.create_future()
            timer = loop.call_at(deadline, self._expire, waiter)  # cheaper than wait_for
            try:
                await waiter
            finally:
                timer.cancel()
        return self.replies.popleft()

    def _expire(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(SMTPReadTimeoutError("Timed out waiting for server response"))


def _split_reply(buffer: bytearray) -> SMTPResponse | None:
    """Take one complete (possibly multi-line) reply off the front of *buffer*."""
    offset, lines = 0, []
    while (end := buffer.find(b"\n", offset)) >= 0:
        line = bytes(buffer[offset : end + 1])
        if len(line) > MAX_REPLY_LINE:
            raise SMTPResponseException(-1, "Response too long")
        if not line[:3].isdigit():
            text = line.decode("utf-8", "replace").strip()
            raise SMTPResponseException(-1, f"Malformed SMTP response line: {text}")
        offset = end + 1
        lines.append(line[4:].strip(b" \t\r\n"))
        if line[3:4] != b"-":
            del buffer[:offset]
            return SMTPResponse(int(line[:3]), b"\n".join(lines).decode("utf-8", "surrogateescape"))
    return None


async def pipelined(
    smtp: aiosmtplib.SMTP, lines: list[bytes], timeout: float, body: Body | None = None
) -> tuple[list[SMTPResponse], Exception | None]:
    """RFC 2920: write *lines* (each one command with its CRLF) at once; collect one
    reply per line, in order, each within *timeout*.  Returns the replies and None,
    or - the connection broke, timed out or sent garbage - the replies received
    before that and the error; the connection is then closed.  *body*: the data of
    the BDAT command that ends *lines* (RFC 3030 4.2), sent right after them."""
    protocol = smtp.protocol
    lock = getattr(protocol, "_command_lock", None)
    transport = getattr(protocol, "transport", None)
    if protocol is None or lock is None or transport is None or transport.is_closing():
        return [], SMTPServerDisconnected("Server not connected")
    replies: list[SMTPResponse] = []
    error: Exception | None = None
    async with lock:
        collector = _Collector(protocol)
        transport.set_protocol(collector)
        try:
            if body is not None and body.data is not None:
                transport.write(b"".join([*lines, body.data]))
            else:
                transport.write(b"".join(lines))
                if body is not None:
                    await write_body(smtp, protocol, body, timeout, stuff=False)
            for _ in lines:
                replies.append(await collector.next(timeout))
        except (SMTPException, OSError) as exc:
            error = exc
        except BaseException:
            smtp.close()
            raise
        finally:
            if not transport.is_closing():
                transport.set_protocol(protocol)
        if error is None and (collector.buffer or collector.replies):
            error = SMTPServerDisconnected("unsolicited data after the pipelined replies")
        if error is not None:
            smtp.close()
        return replies, error
