"""The listener: TLS-only SMTP intake that writes accepted mail to the spool.

Role: one :class:`Listener` per configured ``listeners`` entry.  It owns the
listening socket (plaintext greeting + STARTTLS, or TLS from the first byte), the
set of live sessions (:mod:`relay.intake.session`), and :class:`Intake`, the handler that
turns a finished DATA into a spooled message: reject bare CR/LF/NUL
(:mod:`relay.intake.message`), add Received / Message-ID / Date, build the envelope,
``Spool.store_soon`` (durable when its future is done) and only then answer
``250 2.0.0 Ok: queued as <ID>``.  After that it calls ``on_queued(qid)`` so the
scheduler can start on the message.

Not: delivery, retries or any decision about destinations.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

from relay import config
from relay.errors import RelayError, SpoolError, SpoolFullError
from relay.intake import hello, message, replies
from relay.intake.auth import PasswordChecker
from relay.intake.datareader import DataProblem
from relay.intake.gate import Gate, client_address
from relay.intake.hello import HelloGate
from relay.intake.reception import Reception
from relay.intake.session import IntakeEnvelope, Phase, RelaySMTP
from relay.intake.settings import SessionSettings, log_handshake_failure
from relay.log import event
from relay.metrics import Metrics
from relay.queue.envelope import QueueEnvelope, Recipient
from relay.queue.spool import Spool
from relay.workers import bind

log = logging.getLogger("relay.listener")

STOP_GRACE = 10.0  # stop(): how long a message being stored may take to finish
HANDSHAKE_TIMEOUT = 10.0  # implicit TLS: seconds a client gets for its handshake
ACCEPT_PAUSE = 0.1  # after a failed accept (out of file descriptors): seconds to wait


class Intake:
    """aiosmtpd handler: what happens when DATA is complete."""

    def __init__(
        self,
        cfg: config.Config,
        spool: Spool,
        on_queued: Callable[[str], None],
        metrics: Metrics,
    ) -> None:
        self._cfg = cfg
        self._spool = spool
        self._on_queued = on_queued
        self._metrics = metrics
        self.storing: set[asyncio.Future[None]] = set()

    async def handle_exception(self, error: Exception) -> str:
        log.error("session error: %r", error, exc_info=error)
        return str(replies.INTERNAL_ERROR)

    def begin(self, server: RelaySMTP, envelope: IntakeEnvelope) -> Reception:
        """DATA is about to be read: the message gets its queue id and Received field."""
        qid = self._spool.new_id()
        client = server.client_info()
        tls = server.tls_info()
        info = message.ReceivedInfo(
            hostname=self._cfg.hostname,
            queue_id=qid,
            client_ip=client.ip,
            helo=client.helo,
            tls_version=tls[0] if tls else None,
            tls_cipher=tls[1] if tls else None,
            tls_bits=tls[2] if tls else None,
            authenticated=client.user is not None,
            recipients=tuple(envelope.rcpt_tos),
            now=self._spool.clock(),
        )
        return Reception(self._spool, qid, info)

    async def handle(
        self, server: RelaySMTP, envelope: IntakeEnvelope, got: Reception, problem: DataProblem
    ) -> str:
        """The data ended: the reply, after the message is durable (or why not)."""
        refusal = self._refusal(server, got, problem)
        if refusal is not None:
            got.abort()
            return refusal
        server.phase = Phase.STORING
        spooled = self._envelope(server, envelope, got)
        # Shielded, and waited for by stop(): once storing began it finishes even if
        # the client goes away, and a message that reached the disk is announced.
        task = asyncio.ensure_future(self._durable(got, spooled))
        self.storing.add(task)
        task.add_done_callback(lambda done: self._stored(done, spooled))
        try:
            await asyncio.shield(task)
        except SpoolFullError as exc:
            event(log, "spool_failed", logging.ERROR, queue_id=spooled.id, error=exc)
            self._metrics.rejected.labels(reason="spool_full").inc()
            return str(replies.SPOOL_FULL)
        except SpoolError as exc:
            event(log, "spool_failed", logging.ERROR, queue_id=spooled.id, error=exc)
            self._metrics.rejected.labels(reason="spool_error").inc()
            return str(replies.SPOOL_FAILED)
        server.messages += 1
        self._metrics.accepted.inc()
        return f"250 2.0.0 Ok: queued as {spooled.id}"

    def _refusal(self, server: RelaySMTP, got: Reception, problem: DataProblem) -> str | None:
        if problem is DataProblem.BARE_NEWLINE:
            event(log, "message_rejected", client=server.client_info().ip, reason="bare CR/LF/NUL")
            self._metrics.rejected.labels(reason="bad_data").inc()
            return str(replies.BARE_NEWLINE)
        if got.header_too_large:
            event(log, "message_rejected", client=server.client_info().ip, reason="header size")
            self._metrics.rejected.labels(reason="header_too_large").inc()
            return str(replies.HEADER_TOO_LARGE)
        if server.shutdown_requested:
            self._metrics.rejected.labels(reason="shutdown").inc()
            return str(replies.SHUTTING_DOWN)
        return None

    def _envelope(
        self, server: RelaySMTP, envelope: IntakeEnvelope, got: Reception
    ) -> QueueEnvelope:
        recipients = [
            Recipient(address=addr, options=list(opts))
            for addr, opts in zip(envelope.rcpt_tos, envelope.rcpt_params, strict=True)
        ]
        return QueueEnvelope(
            id=got.qid,
            created=got.info.now,
            sender=envelope.mail_from or "",
            recipients=recipients,
            mail_options=list(envelope.mail_options),
            client=server.client_info(),
            size=got.size,
        )

    async def _durable(self, got: Reception, spooled: QueueEnvelope) -> None:
        """The rest of the data written, then the message made durable: in one write
        when it was kept in memory, else the streamed file committed.  SpoolError (or
        SpoolFullError) when that failed; then nothing of it is left."""
        try:
            await got.finish()
            spooled.size = got.size
            data = got.data()
            if data is not None:
                await self._spool.store_soon(spooled, data)
            else:
                spooled.eight_bit = got.eight_bit  # spares each delivery pass a full read
                await got.commit(spooled)  # raises what went wrong while streaming, too
        except BaseException:
            got.abort()
            raise

    def _stored(self, task: asyncio.Future[None], spooled: QueueEnvelope) -> None:
        self.storing.discard(task)
        if task.cancelled() or task.exception() is not None:
            return
        client = spooled.client
        event(
            log,
            "message_queued",
            queue_id=spooled.id,
            client=client.ip if client else None,
            user=client.user if client else None,
            tls=client.tls_version if client else None,
            cipher=client.tls_cipher if client else None,
            sender=spooled.sender or "<>",
            size=spooled.size,
            nrcpt=len(spooled.recipients),
        )
        try:
            self._on_queued(spooled.id)
        except Exception:  # the scheduler's problem must not cost us the reply
            log.exception("on_queued failed for %s", spooled.id)


class Listener:
    """One listening socket and its sessions."""

    def __init__(
        self,
        cfg: config.Config,
        listener: config.ListenerConfig,
        spool: Spool,
        passwords: PasswordChecker | None,
        on_queued: Callable[[str], None],
        ssl_context: ssl.SSLContext,
        gate: Gate,
        metrics: Metrics,
        *,
        sock: socket.socket | None = None,
    ) -> None:
        self.config = listener
        self._sock = sock  # bound by relay.workers' supervisor, shared by the workers
        self._intake = Intake(cfg, spool, on_queued, metrics)
        self._settings = SessionSettings(
            hostname=cfg.hostname,
            listener_name=listener.address,
            implicit_tls=listener.tls is config.ListenerTls.IMPLICIT,
            ssl_context=ssl_context,
            limits=cfg.limits,
            gate=gate,
            passwords=passwords,
            metrics=metrics,
            hello_gate=HelloGate(ssl_context),
        )
        self._server: asyncio.Server | None = None  # STARTTLS listeners
        self._listening: socket.socket | None = None  # implicit-TLS listeners: own accept loop
        self._accepting: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()
        self._stopping = False

    def reload(self, ssl_context: ssl.SSLContext, passwords: PasswordChecker | None) -> None:
        """SIGHUP: new connections get *ssl_context* and check *passwords*; sessions
        already established keep what they started with."""
        self._settings.ssl_context = ssl_context
        self._settings.hello_gate = HelloGate(ssl_context)
        self._settings.passwords = passwords

    @property
    def sessions(self) -> set[RelaySMTP]:
        return self._settings.sessions

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        if self._listening is not None:
            return int(self._listening.getsockname()[1])
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    def _protocol(self) -> RelaySMTP:
        return RelaySMTP(self._intake, self._settings)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self._settings.implicit_tls:
                self._listening = self._sock or bind(self.config.host, self.config.port)
                self._accepting = loop.create_task(self._accept(self._listening))
            else:
                where: dict[str, Any] = (
                    {"sock": self._sock}
                    if self._sock is not None  # bound once by the workers' supervisor
                    else {"host": self.config.host, "port": self.config.port, "reuse_address": True}
                )
                self._server = await loop.create_server(self._protocol, **where)
        except OSError as exc:
            raise RelayError(f"cannot listen on {self.config.address}: {exc}") from exc
        event(log, "listener_start", address=self.config.address, tls=self.config.tls.value)

    # -- implicit TLS (RFC 8314): admission at accept, then the handshake -----------------
    async def _accept(self, listening: socket.socket) -> None:
        """The accept loop of an implicit-TLS listener.  asyncio's own TLS server would
        count a connection only once its handshake finished (a cheap way to hold many
        handshakes open) and could answer an over-cap client only after a handshake."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(listening)
            except OSError as exc:  # EMFILE and the like: wait a moment, go on
                event(log, "accept_failed", logging.WARNING, address=self.config.address, error=exc)
                await asyncio.sleep(ACCEPT_PAUSE)
                continue
            task = loop.create_task(self._handshake(conn, str(peer[0])))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conn: socket.socket, client: str) -> None:
        """Count the connection now; over a cap close it at once (a 421 would need the
        handshake it avoids); else the TLS handshake, bounded, inside the slot."""
        addr = client_address(client)
        gate = self._settings.gate
        if self._stopping or not gate.admit(addr):
            conn.close()
            event(log, "session_refused", client=client, reason="connection limit")
            return
        timeout = min(HANDSHAKE_TIMEOUT, self._settings.limits.command_timeout)
        made: list[RelaySMTP] = []

        def session() -> RelaySMTP:
            made.append(RelaySMTP(self._intake, self._settings, preadmitted=True))
            return made[-1]

        loop = asyncio.get_running_loop()
        try:
            # The ClientHello, looked at first: HelloRefused (after the alert) when the
            # handshake cannot work; logged below like any failed handshake.
            left = await hello.screen(conn, self._settings.hello_gate, timeout)
            await loop.connect_accepted_socket(
                session, conn, ssl=self._settings.ssl_context, ssl_handshake_timeout=left
            )
        except BaseException as error:
            # Once the session started it owns the slot (and frees it itself): a
            # cancellation at shutdown can land after connection_made.
            if not (made and made[0].owns_slot):
                gate.release(addr)
                conn.close()
            if not isinstance(error, OSError):  # SSLError, resets, the timeout: logged
                raise
            log_handshake_failure(self._settings, client, error)

    async def stop(self) -> None:
        """Stop accepting; sessions get 421 (one in DATA stores nothing); spool writes finish."""
        if self._server is None and self._listening is None:
            return
        self._stopping = True
        await self._stop_accepting()
        if self._server is not None:
            self._server.close()
        for session in list(self.sessions):
            session.shutdown()
        if self._intake.storing:
            await asyncio.wait(set(self._intake.storing), timeout=STOP_GRACE)
        for _ in range(100):  # bounded: sessions that stored close after their reply
            if not self.sessions:
                break
            await asyncio.sleep(0.05)
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), timeout=1.0)
        event(log, "listener_stop", address=self.config.address, open_sessions=len(self.sessions))
        self._server = None

    async def _stop_accepting(self) -> None:
        """Implicit TLS: end the accept loop and the handshakes in progress."""
        tasks = [t for t in (self._accepting, *self._handshakes) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        if self._listening is not None:
            self._listening.close()
            self._listening = None
