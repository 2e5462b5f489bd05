"""The queue's control socket: ``tls-relay queue`` tells a running ``serve`` to look again.

Role: a Unix datagram socket under the spool (one per worker) on which a b"kick"
makes the scheduler rescan queue/ now, so ``queue retry`` and ``queue release`` take
effect at once.  Without it (it cannot be bound) the periodic rescan still notices.
Not: sending kicks (``Spool.kick``), or what a rescan does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from pathlib import Path

from relay.log import event

log = logging.getLogger("relay.scheduler")


class ControlSocket:
    """Bound at the scheduler's start, closed at its stop."""

    def __init__(self, path: Path, on_kick: Callable[[], None], fallback: str) -> None:
        self.path = path
        self._on_kick = on_kick
        self._fallback = fallback  # what happens instead, for the warning
        self._transport: asyncio.DatagramTransport | None = None

    async def open(self) -> None:
        path = self.path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            if path.is_socket():
                path.unlink()  # left by a previous run
            sock.bind(str(path))
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            self._transport, _ = await loop.create_datagram_endpoint(
                lambda: _Control(self._on_kick), sock=sock
            )
        except OSError as exc:
            sock.close()
            event(
                log,
                "control_socket_unavailable",
                level=logging.WARNING,
                path=path,
                error=exc,
                fallback=self._fallback,
            )

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
            with contextlib.suppress(OSError):
                self.path.unlink()


class _Control(asyncio.DatagramProtocol):
    def __init__(self, on_kick: Callable[[], None]) -> None:
        self.on_kick = on_kick

    def datagram_received(self, data: bytes, addr: object) -> None:
        if data.strip() == b"kick":
            self.on_kick()
