"""One SMTP session on a listener: the aiosmtpd protocol, hardened for a TLS-only relay.

Role: everything about a single client connection up to the end of DATA - TLS
state (STARTTLS, RFC 3207, and implicit TLS, RFC 8314), the command guard (nothing
but EHLO/HELO/NOOP/RSET/QUIT/STARTTLS before TLS; a cap on commands per session),
AUTH PLAIN/LOGIN inside TLS (RFC 4954) with per-IP failure throttling, MAIL/RCPT
validation through :mod:`relay.intake.addresses`, relay control per recipient, limits and
timeouts.  What happens with a finished message is the handler's job
(``relay.intake.listener.Intake.handle_DATA``); the command loop, reply grouping
and session timer underneath are :mod:`relay.intake.commandloop`'s.

What aiosmtpd (>= 1.4.6) already does right and we rely on: DATA ends only at
CRLF.CRLF (SMTP smuggling), and leftover plaintext is discarded when STARTTLS
completes (STARTTLS command injection, RFC 3207 section 6) - both have regression
tests.  What we replace: EHLO (aiosmtpd offers no AUTH on implicit TLS), MAIL/RCPT
address parsing (aiosmtpd drops source routes silently), AUTH (scrypt must not
block the event loop: auth.py) and the STARTTLS gate (needs HELO/RSET, 5.7.0).

Not: spooling, header surgery, or listening sockets (relay.intake.listener).
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiosmtpd.smtp import Envelope as SmtpEnvelope

from relay.intake import addresses, auth, datareader, replies
from relay.intake.auth import AuthExchange
from relay.intake.commandloop import CommandLoop
from relay.intake.gate import IPAddress, client_address
from relay.intake.replies import Reply
from relay.intake.settings import SessionSettings, log_handshake_failure
from relay.log import event
from relay.queue.envelope import ClientInfo

log = logging.getLogger("relay.listener")


# RFC 3207 section 4: before TLS only these; the rest gets 530 5.7.0.
ALLOWED_BEFORE_TLS = frozenset({"EHLO", "HELO", "NOOP", "RSET", "QUIT", "STARTTLS"})
# RFC 2920 3.1: commands whose reply may wait for the rest of a pipelined group.
PIPELINABLE = frozenset({"MAIL", "RCPT", "RSET"})


class Phase(enum.Enum):
    COMMAND = "command"
    DATA = "data"  # 354 sent, reading message data
    STORING = "storing"  # data complete, spool write in progress: must not be interrupted


class IntakeEnvelope(SmtpEnvelope):
    """aiosmtpd's envelope plus the parameters of each RCPT (it keeps one flat list)."""

    def __init__(self) -> None:
        super().__init__()
        self.rcpt_params: list[list[str]] = []


class RelaySMTP(CommandLoop):
    """One client connection with tls-relay's rules (see the module docstring)."""

    def __init__(
        self, handler: Any, settings: SessionSettings, *, preadmitted: bool = False
    ) -> None:
        super().__init__(
            handler,
            hostname=settings.hostname,
            limits=settings.limits,
            starttls_context=None if settings.implicit_tls else settings.ssl_context,
            hello_gate=None if settings.implicit_tls else settings.hello_gate,
        )
        self.settings = settings
        self._smtp_methods = {
            name: self._guarded(name, method) for name, method in self._smtp_methods.items()
        }
        self.phase = Phase.COMMAND
        self.shutdown_requested = False
        self.messages = 0
        self._admitted = self._lost = self._freed = False
        self._preadmitted = preadmitted  # counted at accept by the listener (implicit TLS)
        self._addr: IPAddress = ipaddress.IPv4Address(0)
        self._last_user: str | None = None

    # -- connection ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Admission: the caps are checked here for a STARTTLS listener; an implicit-TLS
        connection was admitted by the listener at accept, before its handshake."""
        peer = transport.get_extra_info("peername")
        self.peer = (str(peer[0]), int(peer[1]))
        self._addr = client_address(self.peer[0])
        if not self._preadmitted and (
            self.shutdown_requested or not self.settings.gate.admit(self._addr)
        ):
            # Not isinstance(asyncio.Transport): uvloop's transports are not subclasses.
            writer = cast(asyncio.WriteTransport, transport)
            writer.write(f"{replies.TOO_MANY_CONNECTIONS}\r\n".encode())
            writer.close()
            event(log, "session_refused", client=self.peer[0], reason="connection limit")
            return
        self._admitted = True
        self.settings.sessions.add(self)
        self.settings.metrics.sessions.labels(listener=self.settings.listener_name).inc()
        super().connection_made(transport)
        self._note_tls(transport)
        event(log, "session_open", client=self.peer[0], port=self.peer[1], **self._log_tls())

    def _tls_started(self, version: str, cipher: str) -> None:
        self.settings.tls_started(version, cipher)

    def _handshake_failed(self, error: BaseException) -> None:
        """STARTTLS failed (the command loop then closes, which frees the slot): logged,
        throttled per listener."""
        log_handshake_failure(self.settings, self.peer[0], error)

    @property
    def owns_slot(self) -> bool:
        """The session was admitted and frees its connection slot itself."""
        return self._admitted

    def _free_slot(self) -> None:
        """Give the connection slot back, once: when the relay closes a session (not
        only when the peer has answered TLS close_notify), or when it is gone."""
        if self._admitted and not self._freed:
            self._freed = True
            self.settings.gate.release(self._addr)
            self.settings.sessions.discard(self)

    def _closing(self) -> None:
        self._free_slot()

    async def smtp_QUIT(self, arg: str | None) -> None:
        await super().smtp_QUIT(arg)
        self._free_slot()  # the 221 is sent and the transport closing: the slot is free

    def connection_lost(self, error: Exception | None) -> None:
        if not self._admitted or self._lost:
            return
        self._lost = True
        self._free_slot()
        event(
            log,
            "session_close",
            client=self.peer[0],
            port=self.peer[1],
            listener=self.settings.listener_name,
            **self._log_tls(),
            helo=self.session.host_name if self.session else None,
            user=self._last_user,
            commands=self.commands,
            messages=self.messages,
        )
        super().connection_lost(error)

    def eof_received(self) -> bool:
        """The client closed its side: the session is over.  aiosmtpd cancels the
        command loop here and asks to keep the transport half open; on uvloop the EOF
        can arrive before the loop's task first ran, so nobody would ever close the
        transport and the connection slot stayed taken.  False: the transport closes
        now, connection_lost follows and frees the slot."""
        if self._admitted:  # refused at connection_made: aiosmtpd never set up
            super().eof_received()
        return False

    def client_info(self) -> ClientInfo:
        assert self.session is not None
        user = self.session.auth_data if self.session.authenticated else None
        version, cipher, _ = self._tls or (None, None, None)
        return ClientInfo(
            ip=str(self._addr),
            port=self.peer[1],
            helo=self.session.host_name,
            user=user,
            tls_version=version,
            tls_cipher=cipher,
            listener=self.settings.listener_name,
        )

    def phase_name(self) -> str:
        return self.phase.value

    def shutdown(self) -> None:
        """Listener stopping: 421 now, unless a message is being stored (it gets its reply)."""
        self.shutdown_requested = True
        if self.phase is Phase.STORING or self.transport is None:
            return
        self._write_raw(f"{replies.SHUTTING_DOWN}\r\n".encode())
        self._abort()

    def _guarded(
        self, name: str, method: Callable[[str | None], Awaitable[None]]
    ) -> Callable[[str | None], Awaitable[None]]:
        async def run(arg: str | None) -> None:
            if name not in ALLOWED_BEFORE_TLS and not self.tls_active():
                await self.reply(replies.STARTTLS_FIRST)
                return
            self._may_hold = name in PIPELINABLE
            try:
                await method(arg)
            finally:
                self._may_hold = False

        return run

    # -- EHLO / STARTTLS ---------------------------------------------------------------
    async def smtp_EHLO(self, hostname: str | None) -> None:
        if not hostname:
            await self.reply(Reply(501, "5.5.4", "Syntax: EHLO hostname"))
            return
        assert self.session is not None
        self._set_rset_state()  # type: ignore[no-untyped-call]
        self.session.extended_smtp = True
        self.session.host_name = hostname
        lines = [self.hostname, f"SIZE {self.settings.limits.max_message_size}"]
        lines += ["8BITMIME", "SMTPUTF8", "PIPELINING", "ENHANCEDSTATUSCODES"]  # RFC 2034
        lines.append("DSN")  # RFC 3461
        if not self.tls_active():
            lines.append("STARTTLS")
        else:
            lines.append("REQUIRETLS")  # RFC 8689 4.1: only inside TLS
            if self.settings.passwords is not None:
                lines.append("AUTH " + " ".join(auth.MECHANISMS))  # RFC 4954: only inside TLS
        for index, line in enumerate(lines):
            await self.push(f"250{' ' if index == len(lines) - 1 else '-'}{line}")

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if arg:
            await self.reply(replies.SYNTAX_STARTTLS)
        elif self.tls_active():
            await self.reply(replies.TLS_ACTIVE)  # no TLS inside TLS
        else:
            tls = await self._start_tls(self.settings.limits.command_timeout)
            if tls is not None:
                self._note_tls(tls)

    # -- AUTH (RFC 4954) --------------------------------------------------------------
    def _auth_refusal(self, arg: str | None) -> Reply | None:
        assert self.session is not None and self.envelope is not None
        if not self.session.host_name or not self.session.extended_smtp:
            return replies.BAD_SEQUENCE_HELO
        if self.settings.passwords is None:
            return replies.AUTH_UNAVAILABLE
        if self.session.authenticated:
            return replies.AUTH_ALREADY
        if self.envelope.mail_from is not None:
            return replies.AUTH_IN_TRANSACTION  # RFC 4954 4: not during a transaction
        if not arg:
            return replies.AUTH_SYNTAX
        return None

    async def smtp_AUTH(self, arg: str | None) -> None:
        refusal = self._auth_refusal(arg)
        if refusal is not None:
            await self.reply(refusal)
            return
        if self.settings.gate.auth_blocked(self._addr):
            event(log, "auth_refused", logging.WARNING, client=self.peer[0])
            await self.close_with(replies.TOO_MANY_AUTH_FAILURES)
            return
        assert arg is not None and self.settings.passwords is not None and self.session is not None
        mechanism, _, initial = arg.strip().partition(" ")
        exchange = AuthExchange(self.settings.passwords, self.settings.gate, self._addr)
        user = await exchange.run(self, mechanism, initial.strip())
        if user is not None:
            self.session.authenticated = True
            self.session.auth_data = user  # type: ignore[assignment]
            self._last_user = user

    # -- envelope ---------------------------------------------------------------------
    def _create_envelope(self) -> IntakeEnvelope:
        return IntakeEnvelope()

    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.session is not None and self.envelope is not None
        if self.envelope.mail_from is not None:
            await self.reply(replies.NESTED_MAIL)
            return
        mail = addresses.parse_mail(
            arg, extended=self.session.extended_smtp, max_size=self.settings.limits.max_message_size
        )
        if isinstance(mail, Reply):
            await self.reply(mail)
            return
        self.envelope.mail_from = mail.sender
        self.envelope.smtp_utf8 = mail.smtputf8
        self.envelope.mail_options = list(mail.options)
        await self.reply(replies.MAIL_OK)

    def _relay_refusal(self) -> Reply | None:
        """Relay control, per recipient of every transaction: networks, or AUTH."""
        assert self.session is not None
        if self.session.authenticated or self.settings.gate.may_relay_unauthenticated(self._addr):
            return None
        # Default deny: without users nobody outside the networks can ever relay.
        return (
            replies.AUTH_REQUIRED if self.settings.passwords is not None else replies.RELAY_DENIED
        )

    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.session is not None and isinstance(self.envelope, IntakeEnvelope)
        if self.envelope.mail_from is None:
            await self.reply(replies.NEED_MAIL)
            return
        rcpt = addresses.parse_rcpt(
            arg, extended=self.session.extended_smtp, smtputf8=self.envelope.smtp_utf8
        )
        refusal = rcpt if isinstance(rcpt, Reply) else self._relay_refusal()
        if refusal is None and len(self.envelope.rcpt_tos) >= self.settings.limits.max_recipients:
            refusal = replies.TOO_MANY_RECIPIENTS  # RFC 5321 4.5.3.1.10: 452 for the extras
        if refusal is not None:
            if refusal in (replies.AUTH_REQUIRED, replies.RELAY_DENIED):
                address = rcpt[0] if isinstance(rcpt, tuple) else rcpt
                event(log, "relay_denied", client=self.peer[0], rcpt=address)
            await self.reply(refusal)
            return
        assert not isinstance(rcpt, Reply)
        address, options = rcpt
        if address not in self.envelope.rcpt_tos:  # a duplicate is accepted, delivered once
            self.envelope.rcpt_tos.append(address)
            self.envelope.rcpt_params.append(options)
        await self.reply(replies.RCPT_OK)

    async def smtp_DATA(self, arg: str | None) -> None:
        self.phase = Phase.DATA
        self._reset_timeout(self.settings.limits.data_timeout)  # the whole DATA phase
        try:
            await self._data(arg)
        finally:
            self.phase = Phase.COMMAND
        if self.transport is not None:
            self._reset_timeout()
        if self.shutdown_requested:
            await self.close_with(replies.SHUTTING_DOWN)

    async def _data(self, arg: str | None) -> None:
        """aiosmtpd's DATA, with the data read in chunks (see datareader.py)."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        reception = self.event_handler.begin(self, self.envelope)
        try:
            limit = self.settings.limits.max_message_size
            scanner = await datareader.read_data(self._reader, limit, reception.feed)
        except BaseException as exc:
            reception.abort()  # nothing of it stays
            if isinstance(exc, (asyncio.CancelledError, asyncio.IncompleteReadError)):
                self._writer.close()  # the connection went away mid-DATA
            raise
        if scanner.problem in (
            datareader.DataProblem.TOO_BIG,
            datareader.DataProblem.LINE_TOO_LONG,
        ):
            reception.abort()
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            too_big = scanner.problem is datareader.DataProblem.TOO_BIG
            await self.push(
                "552 Error: Too much mail data"
                if too_big
                else "500 Line too long (see RFC5321 4.5.3.1.6)"
            )
            return
        status = await self.event_handler.handle(self, self.envelope, reception, scanner.problem)
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(status)
