"""Idle outbound TLS sessions kept for the next message to the same MX address.

Role: after a transaction a session that may carry another one waits here, keyed by
(target address and port, TLS mode, AUTH identity; client context), at most
``max_idle`` per key, and is retired (QUIT) after IDLE_TIMEOUT seconds by one sweeper
timer for the whole pool.  A pooled session is handed out again only after the
deliverer re-checks the verdict for the new requirement; reusing saves a TCP and a
TLS handshake per message.
Not: deciding whether a session is fit (relay.tlspolicy.verdict.decide), or proving
it alive (the RSET that starts the next transaction does that).
"""

from __future__ import annotations

import asyncio

from relay.delivery.session import OutboundSession, Target, polite_quit
from relay.tlspolicy.contexts import ContextKey

IDLE_TIMEOUT = 10.0  # seconds an idle pooled session is kept
QUIT_TIMEOUT = 5.0


PoolKey = tuple[Target, ContextKey]  # address, port, TLS mode, AUTH identity; context


class SessionPool:
    """Idle TLS sessions per (target, context key); bounded per key, expiring."""

    def __init__(self, max_idle: int, idle_timeout: float = IDLE_TIMEOUT) -> None:
        # As many idle sessions per MX address as may be busy at once
        # (per_domain_concurrency): fewer would close and reopen TLS sessions
        # under steady load, which costs a full handshake each time.
        self.max_idle = max(1, max_idle)
        self.idle_timeout = idle_timeout
        self._idle: dict[PoolKey, list[OutboundSession]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    def take(self, key: PoolKey) -> OutboundSession | None:
        sessions = self._idle.get(key)
        while sessions:
            session = sessions.pop()
            if session.smtp.is_connected:
                return session
            session.smtp.close()
        self._idle.pop(key, None)
        return None

    def put(self, key: PoolKey, session: OutboundSession) -> None:
        sessions = self._idle.setdefault(key, [])
        if len(sessions) >= self.max_idle:
            self._retire(key, sessions[0])
        loop = asyncio.get_running_loop()
        session.idle_since = loop.time()
        sessions.append(session)
        if self._sweeper is None:  # one timer for the pool, not one per put
            self._sweeper = loop.call_later(self.idle_timeout, self._sweep)

    def _sweep(self) -> None:
        """Retire sessions idle for idle_timeout; look again while any are pooled."""
        self._sweeper = None
        now = asyncio.get_running_loop().time()
        for key, sessions in list(self._idle.items()):
            for session in [s for s in sessions if now - s.idle_since >= self.idle_timeout]:
                self._retire(key, session)
        if any(self._idle.values()):
            oldest = min(s.idle_since for sessions in self._idle.values() for s in sessions)
            delay = max(0.1, oldest + self.idle_timeout - now)
            self._sweeper = asyncio.get_running_loop().call_later(delay, self._sweep)

    def _retire(self, key: PoolKey, session: OutboundSession) -> None:
        sessions = self._idle.get(key, [])
        if session in sessions:
            sessions.remove(session)
        task = asyncio.get_running_loop().create_task(polite_quit(session.smtp, QUIT_TIMEOUT))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for key, sessions in list(self._idle.items()):
            for session in list(sessions):
                self._retire(key, session)
        self._idle.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
