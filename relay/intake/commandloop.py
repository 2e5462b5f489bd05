"""The SMTP command loop under every intake session: read a line, dispatch, reply.

Role: :class:`CommandLoop` is aiosmtpd's ``SMTP`` protocol with its command loop
replaced (:meth:`~CommandLoop._handle_client`: no PROXY protocol, no per-command
call limits, no per-line log calls - they ran a regex over every line even with the
logger silenced), replies grouped as RFC 2920 allows (:meth:`~CommandLoop.push`),
one lazily re-armed session timer (:meth:`~CommandLoop._reset_timeout`), and
aiosmtpd's own reply texts given RFC 3463 enhanced status codes.  The aiosmtpd
internals it relies on are listed, with the reason for each, in
:mod:`relay.internals`.

STARTTLS swaps the transport under aiosmtpd's streams here (:meth:`CommandLoop._start_tls`).
Not: which commands are allowed when, AUTH or the transaction (relay.intake.session).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, AnyStr, cast

from aiosmtpd.smtp import BOGUS_LIMIT, SMTP, TLSSetupException

from relay.config import Limits
from relay.intake import hello, replies
from relay.intake.hello import HelloGate
from relay.intake.replies import Reply
from relay.log import event

log = logging.getLogger("relay.listener")

COMMAND_LINE = 512  # RFC 5321 4.5.3.1.4, CRLF included
# MAIL grows by its parameters: SIZE (RFC 1870, 26), SMTPUTF8 (RFC 6531, 10), BODY (RFC 6152, 14)
MAIL_LINE = COMMAND_LINE + 26 + 10 + 14

# aiosmtpd's own replies, given RFC 3463 enhanced codes like ours.
_AIOSMTPD_REPLIES = {
    "250 OK": "250 2.0.0 Ok",
    "221 Bye": "221 2.0.0 Bye",
    "500 Error: bad syntax": "500 5.5.2 Error: bad syntax",
    "500 Command line too long": "500 5.5.2 Command line too long",
    "500 Line too long (see RFC5321 4.5.3.1.6)": "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6)",
    "503 Error: send HELO first": "503 5.5.1 Error: send EHLO first",
    "503 Error: need RCPT command": "503 5.5.1 Error: need RCPT command",
    "501 Syntax: DATA": "501 5.5.4 Syntax: DATA",
    "552 Error: Too much mail data": str(replies.TOO_MUCH_DATA),
}

Command = Callable[[str | None], Awaitable[None]]


class CommandLoop(SMTP):
    """aiosmtpd's protocol with tls-relay's command loop; subclassed per session."""

    def __init__(
        self,
        handler: Any,
        *,
        hostname: str,
        limits: Limits,
        starttls_context: ssl.SSLContext | None,
        hello_gate: HelloGate | None = None,
    ) -> None:
        super().__init__(
            handler,
            hostname=hostname,
            ident="ESMTP tls-relay",
            data_size_limit=limits.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=starttls_context,
            require_starttls=False,  # the session's command guard enforces it, with 5.7.0
            timeout=limits.command_timeout,
            loop=asyncio.get_running_loop(),
        )
        self.hello_gate = hello_gate  # STARTTLS: ClientHellos that cannot succeed get an alert
        self.command_size_limits = {"MAIL": MAIL_LINE}  # others: COMMAND_LINE
        self.commands = 0  # every line read as a command, known or not
        self._max_commands = limits.max_commands
        self.peer: tuple[str, int] = ("", 0)  # the client's address, for log lines
        self._out: list[bytes] = []  # replies held back for a pipelined group (push)
        self._deadline = 0.0  # when the session times out (_reset_timeout)
        self._may_hold = False  # the running command's reply may wait (RFC 2920)
        self._tls: tuple[str, str, int] | None = None  # version, cipher, bits

    # -- the loop ----------------------------------------------------------------------
    async def _handle_client(self) -> None:
        """aiosmtpd's command loop, minus what this relay never enables (PROXY
        protocol, per-command call limits, require_starttls, a STARTTLS hook) and
        minus its per-line log calls.  Replies and limits are aiosmtpd's."""
        assert self.session is not None and not self._enforce_call_limit
        assert self._proxy_timeout is None and self.enable_SMTPUTF8
        await self.push(f"220 {self.hostname} {self.__ident__}")
        self._bogus_budget = BOGUS_LIMIT
        while self.transport is not None:
            try:
                found = await self._next_command()
                if found is None:
                    continue
                command, method, arg = found
                if method is None:
                    await self._bogus(f'500 Error: command "{command}" not recognized')
                    continue
                self._reset_timeout()
                await method(arg)
            except (asyncio.CancelledError, ConnectionResetError):
                self._writer.close()
                raise
            except Exception as error:  # as aiosmtpd: the handler words the reply
                await self._handle_error(error)

    async def _next_command(self) -> tuple[str, Command | None, str | None] | None:
        """Read one command line: (verb, its method or None if unknown, argument),
        or None after replying to a line that is no command at all.  Every line
        counts toward max_commands, empty and unknown ones too (else a client could
        hold its slot forever with them)."""
        assert self.session is not None
        line = await self.read_line()
        self.commands += 1
        if self.commands > self._max_commands:
            event(log, "session_limit", client=self.peer[0], reason="max_commands")
            await self.close_with(replies.TOO_MANY_COMMANDS)
            return None
        if line is None:  # over the stream limit, already drained
            await self.push("500 Command line too long")
            return None
        verb, _, arg_bytes = line.partition(b" ")
        try:
            command = verb.upper().decode("ascii")
        except UnicodeDecodeError:
            command = ""
        if not command:  # an empty line, or no verb at all: a bogus command
            await self._bogus("500 Error: bad syntax")
            return None
        arg = str(arg_bytes.strip(), "utf-8", "surrogateescape") if arg_bytes else None
        extended = self.session.extended_smtp
        limit = self.command_size_limits.get(command, COMMAND_LINE) if extended else COMMAND_LINE
        if len(line) > limit:
            await self.push("500 Command line too long")
            return None
        return command, self._smtp_methods.get(command), arg

    async def _bogus(self, reply: str) -> None:
        """Reply to a line that is no command we know; after BOGUS_LIMIT of them the
        session ends (aiosmtpd's rule, applied to empty lines too)."""
        self._bogus_budget -= 1
        if self._bogus_budget < 1:
            await self.close_with(replies.TOO_MANY_BOGUS)
            return
        await self.push(reply)

    async def _handle_error(self, error: Exception) -> None:
        assert self.transport is not None
        if isinstance(error, TLSSetupException):
            self.transport.close()
            self.connection_lost(error)
            return
        try:
            status = await self.handle_exception(error)
        except Exception:
            log.exception("handle_exception failed")
            status = "500 Error: Cannot describe error"
        await self.push(status)

    async def read_line(self) -> bytes | None:
        """One line from the client without its CRLF (a command, or an AUTH exchange),
        or None when it was longer than the stream limit; the rest of that line is read
        and dropped."""
        try:
            line: bytes = await self._reader.readuntil()
        except asyncio.LimitOverrunError as error:
            await self._discard_long_line(error.consumed)
            return None
        return line.rstrip(b"\r\n")

    async def _discard_long_line(self, consumed: int) -> None:
        """Read past a command line over the stream limit (aiosmtpd does the same)."""
        await self._reader.read(consumed)
        for _ in range(1 << 20):  # bounded: the stream limit times this is far beyond sane
            try:
                await self._reader.readuntil()
                return
            except asyncio.LimitOverrunError as again:
                await self._reader.read(again.consumed)

    # -- replies -------------------------------------------------------------------------
    async def push(self, status: AnyStr) -> None:
        """Queue one reply line; send what is queued unless RFC 2920 lets us wait.

        A reply to MAIL, RCPT or RSET is held back while another pipelined command
        line is already buffered: the whole group's replies then leave in one TLS
        record and one send, as Postfix's smtpd does.  Every other reply - and any
        reply when no complete line is waiting - is sent at once, so a client that
        waits for us is never kept waiting.
        """
        if isinstance(status, str):
            text = _AIOSMTPD_REPLIES.get(status, status)
            line = text.encode("utf-8" if self.enable_SMTPUTF8 else "ascii")
        else:
            line = bytes(status)
        self._out.append(line + b"\r\n")
        if self._may_hold and b"\n" in self._reader._buffer:  # type: ignore[attr-defined]
            return
        self._writer.write(b"".join(self._out))
        self._out.clear()
        await self._writer.drain()

    def _write_raw(self, data: bytes) -> None:
        """Write outside the command loop (timeouts, shutdown), after held replies."""
        data, self._out = b"".join(self._out) + data, []
        # Not isinstance(asyncio.WriteTransport): uvloop's transports are not subclasses,
        # and that check once silently dropped every timeout and shutdown 421 on uvloop.
        transport = cast(asyncio.WriteTransport | None, self.transport)
        if transport is not None and not transport.is_closing():
            transport.write(data)

    async def reply(self, reply: Reply) -> None:
        await self.push(str(reply))

    async def close_with(self, reply: Reply) -> None:
        """From inside the session: send *reply*, stop reading, close."""
        await self.reply(reply)
        self._abort()

    def _closing(self) -> None:
        """The relay is closing this session (a hook: the session frees its slot)."""

    def _handshake_failed(self, error: BaseException) -> None:
        """A client's TLS handshake failed (a hook: the session logs it, throttled)."""

    def _abort(self) -> None:
        self._closing()
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()
        if self.transport is not None:
            self.transport.close()

    # -- TLS ---------------------------------------------------------------------------------
    def _note_tls(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            cipher = ssl_object.cipher()
            self._tls = (str(ssl_object.version()), str(cipher[0]), int(cipher[2]))
            self._tls_started(self._tls[0], self._tls[1])

    def _tls_started(self, version: str, cipher: str) -> None:
        """The session is now inside TLS (a hook: the session counts it)."""

    def _log_tls(self) -> dict[str, Any]:
        version, cipher, _ = self._tls or (None, None, None)
        return {"tls": version, "cipher": cipher}

    def tls_active(self) -> bool:
        return self._tls is not None

    def tls_info(self) -> tuple[str, str, int] | None:
        return self._tls

    async def _hello_refused(self, plain: asyncio.Transport, timeout: float) -> float | None:
        """None when the client's ClientHello was refused with an alert (relay.intake.hello)
        or none came in time (the session is then closed); else the seconds left of
        *timeout* for the handshake."""
        assert self.hello_gate is not None
        fd = plain.get_extra_info("socket").fileno()
        sock = socket.socket(fileno=os.dup(fd))  # the transport's own fd is not ours to poll
        try:
            return await hello.screen(sock, self.hello_gate, timeout)
        except OSError as error:  # HelloRefused (the alert is sent) or TimeoutError
            self._handshake_failed(error)
            self._abort()
            return None
        finally:
            sock.close()

    # -- STARTTLS (RFC 3207) -------------------------------------------------------------
    async def _start_tls(self, handshake_timeout: float) -> asyncio.BaseTransport | None:
        """RFC 3207 on the event loop's own TLS transport (``loop.start_tls``).

        aiosmtpd swaps in asyncio's pure-Python ``sslproto`` even on uvloop; uvloop's
        native TLS costs far less per record.  Everything the client sent after the
        STARTTLS line is plaintext and is discarded (RFC 3207 section 6, STARTTLS
        command injection): the buffer is cleared and the transport handed over in
        one step, with no await in between, so no plaintext byte can slip through.
        The TLS transport, or None when the handshake failed (the session is closed).
        """
        plain = cast(asyncio.Transport, self.transport)  # uvloop's is not a subclass
        assert plain is not None and self.tls_context is not None
        plain.pause_reading()  # the ClientHello stays in the socket, for the gate and TLS
        await self.push("220 2.0.0 Ready to start TLS")
        if self.hello_gate is not None:
            left = await self._hello_refused(plain, handshake_timeout)
            if left is None:
                return None
            handshake_timeout = left
        self._reader._buffer.clear()  # type: ignore[attr-defined]
        try:
            tls = await self.loop.start_tls(
                plain,
                self,
                self.tls_context,
                server_side=True,
                ssl_handshake_timeout=handshake_timeout,
            )
        except OSError as error:  # SSLError, resets and the handshake timeout
            self._handshake_failed(error)
            self._abort()
            return None
        if tls is None or plain.is_closing():
            self._abort()
            return None
        self._original_transport = plain  # aiosmtpd closes it in connection_lost
        self.transport = tls
        self._reader._transport = tls  # type: ignore[attr-defined]
        self._writer._transport = tls  # type: ignore[attr-defined]
        # RFC 3207 4.2: the client must start over with EHLO; forget what it said.
        self._set_rset_state()  # type: ignore[no-untyped-call]
        peer = self.session.peer if self.session else None
        self.session = self._create_session()
        self.session.peer = peer
        self.session.ssl = {"ssl_object": tls.get_extra_info("ssl_object")}
        self._tls_handshake_okay = True
        self._reset_timeout()
        return tls

    def phase_name(self) -> str:
        """What the session is doing, for log lines (subclasses know more)."""
        return "command"

    # -- the session timer -----------------------------------------------------------------
    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd re-arms a timer on every command (a cancel and a new heap entry);
        here the deadline moves and the one timer is re-armed only when it fires
        early, or when the new deadline is sooner than the armed one."""
        deadline = self.loop.time() + (duration or self._timeout_duration)
        self._deadline = deadline
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(deadline, self._timeout_cb)

    def _timeout_cb(self) -> None:
        if self.transport is None:
            return
        if self.loop.time() < self._deadline:  # activity since: wait for the rest
            self._timeout_handle = self.loop.call_at(self._deadline, self._timeout_cb)
            return
        # RFC 5321 4.5.3.2 timeouts; 421 so the client knows why (RFC 5321 3.8).
        self._write_raw(b"421 4.4.2 Timeout, closing connection\r\n")
        event(log, "session_timeout", client=self.peer[0], phase=self.phase_name())
        self._closing()
        super()._timeout_cb()  # type: ignore[no-untyped-call]
