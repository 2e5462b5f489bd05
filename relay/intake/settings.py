"""What every session of one listener shares, and its throttled handshake log.

Role: :class:`SessionSettings` is built once per listener (relay.intake.listener) and
read by each of its sessions (relay.intake.session): names, TLS context, limits, the
connection gate, AUTH, metrics and the sessions still open (for shutdown and reload).
Not: anything a single session decides.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from relay.config import Limits
from relay.intake.auth import PasswordChecker
from relay.intake.gate import Gate
from relay.intake.hello import HelloGate
from relay.log import Throttle, event
from relay.metrics import Metrics
from relay.tlspolicy.contexts import describe_handshake_error

if TYPE_CHECKING:
    from relay.intake.session import RelaySMTP

log = logging.getLogger("relay.listener")


@dataclass
class SessionSettings:
    """What every session of one listener shares."""

    hostname: str
    listener_name: str
    implicit_tls: bool
    ssl_context: ssl.SSLContext
    limits: Limits
    gate: Gate
    passwords: PasswordChecker | None  # None: no users file, no AUTH
    metrics: Metrics
    hello_gate: HelloGate  # follows ssl_context: ClientHellos it cannot agree to
    handshake_log: Throttle = field(default_factory=Throttle)  # failed handshakes, per listener
    sessions: set[RelaySMTP] = field(default_factory=set)

    def tls_started(self, version: str, cipher: str) -> None:
        """A client session of this listener is now inside TLS: count it."""
        labels = {"listener": self.listener_name, "version": version, "cipher": cipher}
        self.metrics.inbound_tls.labels(**labels).inc()


def log_handshake_failure(settings: SessionSettings, client: str, error: BaseException) -> None:
    """One line per failed client TLS handshake (STARTTLS or implicit), at most a burst
    per minute per listener, so a scan cannot flood the log."""
    held = settings.handshake_log.allow()
    if held is not None:
        event(
            log,
            "tls_handshake_failed",
            logging.WARNING,
            client=client,
            listener=settings.listener_name,
            error=describe_handshake_error(error),
            suppressed=held or None,
        )
