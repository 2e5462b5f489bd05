"""Outbound SMTP session: one connection to one MX address, made safe before use.

Role: connect (RFC 5321 §4.5.3.2 timeouts), greet, EHLO, STARTTLS (RFC 3207) with the
level's client context (or implicit TLS for a route that says so, RFC 8314), report the
handshake facts to :func:`relay.tlspolicy.verdict.decide`, EHLO again, optionally AUTH to a route's
next hop; then MAIL / RCPT / DATA for a group of recipients, classifying every reply
where it is seen (2xx delivered, 4xx transient, 5xx permanent).

Plaintext is structurally impossible: aiosmtplib runs with ``start_tls=False`` and
``use_tls=False`` (its default STARTTLS is opportunistic), this module issues STARTTLS
itself, returns a failure unless a verdict said ok, and :func:`transact` refuses to
send MAIL on a transport without TLS.  There is no plaintext retry anywhere.

Not: choosing MX hosts, pooling, concurrency limits or logging (relay.delivery.deliverer),
the transaction (relay.delivery.transaction), policy judgements (relay.tlspolicy),
retry timing (relay.queue.retry).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import ssl
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib import SMTPException, SMTPResponseException

from relay.config import DeliveryConfig, RouteAuth
from relay.delivery.outcome import reply_text
from relay.tlspolicy.contexts import describe_handshake_error, observe
from relay.tlspolicy.verdict import Observed, Requirement, Verdict, decide


@dataclass(frozen=True)
class Target:
    """One address of one MX host (or of a route's next hop)."""

    host: str  # MX host name: SNI and the name `verify` checks
    ip: str
    port: int
    implicit_tls: bool = False
    auth: RouteAuth | None = None

    @property
    def label(self) -> str:
        return f"{self.host}[{self.ip}]:{self.port}"


@dataclass
class Trace:
    """Where an attempt is, so a deadline or log line can say what it was waiting for."""

    stage: str = "start"


@dataclass(frozen=True)
class Failure:
    """The session could not be made safe to use; every recipient may try the next MX."""

    reason: str
    observed: Observed | None = None
    verdict: Verdict | None = None
    local_ip: str | None = None  # our address on the connection, when there was one


@dataclass
class OutboundSession:
    smtp: aiosmtplib.SMTP
    target: Target
    observed: Observed
    messages: int = 0
    idle_since: float = 0.0  # loop time it went back to the pool

    @property
    def tls(self) -> str:
        return f"{self.observed.tls_version} {self.observed.cipher}"


# ---- opening a session -----------------------------------------------------------------


async def _tcp_connect(target: Target, timeout: float) -> socket.socket:
    """Connect a non-blocking socket to the target address (RFC 5321 §4.5.3.2 does not
    fix a connect timeout; delivery.connect_timeout bounds it)."""
    family = socket.AF_INET6 if ":" in target.ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_connect(sock, (target.ip, target.port))
    except BaseException:
        sock.close()
        raise
    return sock


async def open_session(
    target: Target,
    req: Requirement,
    ctx: ssl.SSLContext,
    verify: bool,
    cfg: DeliveryConfig,
    local_hostname: str,
    trace: Trace,
) -> tuple[OutboundSession, Verdict] | Failure:
    """A TLS-protected session whose verdict is ok, or a Failure; never plaintext."""
    trace.stage = f"connect to {target.label}"
    try:
        sock = await _tcp_connect(target, cfg.connect_timeout)
    except (OSError, TimeoutError) as exc:
        return Failure(f"cannot connect to {target.label}: {exc or type(exc).__name__}")
    local_ip = str(sock.getsockname()[0])  # the sending MTA's IP (RFC 8460 4.4)
    smtp = aiosmtplib.SMTP(
        hostname=target.host if target.implicit_tls else None,  # SNI for implicit TLS
        sock=sock,
        use_tls=target.implicit_tls,
        start_tls=False,  # never aiosmtplib's opportunistic STARTTLS: we do it below
        tls_context=ctx if target.implicit_tls else None,
        timeout=cfg.command_timeout,
        local_hostname=local_hostname,
    )
    try:
        result = await _secure(smtp, target, req, ctx, verify, trace)
    except BaseException:
        smtp.close()
        raise
    if isinstance(result, Failure):
        await polite_quit(smtp)
        return dataclasses.replace(result, local_ip=local_ip)
    return OutboundSession(smtp, target, result[0]), result[1]


async def _secure(
    smtp: aiosmtplib.SMTP,
    target: Target,
    req: Requirement,
    ctx: ssl.SSLContext,
    verify: bool,
    trace: Trace,
) -> tuple[Observed, Verdict] | Failure:
    observed = await _handshake(smtp, target, ctx, verify, trace)
    if isinstance(observed, Failure):
        return observed
    verdict = decide(req, observed)
    if not verdict.ok or smtp.get_transport_info("ssl_object") is None:
        return Failure(f"{verdict.reason} ({target.label})", observed, verdict)
    try:
        # RFC 3207 §4.2: discard what was learnt before TLS; ask again.
        trace.stage = f"EHLO after TLS at {target.label}"
        await smtp.ehlo()
        if target.auth is not None:
            # RFC 4954 §4: credentials only ever travel inside the TLS session.
            trace.stage = f"AUTH at {target.label}"
            await smtp.login(target.auth.username, target.auth.password)
    except SMTPResponseException as exc:
        return Failure(f"{reply_text(exc.code, exc.message, target)} after TLS", observed, verdict)
    except (SMTPException, OSError) as exc:
        return Failure(f"{target.label} failed after TLS: {exc}", observed, verdict)
    return observed, verdict


async def _handshake(
    smtp: aiosmtplib.SMTP, target: Target, ctx: ssl.SSLContext, verify: bool, trace: Trace
) -> Observed | Failure:
    """Greeting, EHLO, STARTTLS and the handshake; the facts as an Observed (also for
    the ways it can fail that policy.decide words), or a Failure for the others."""
    implicit = target.implicit_tls
    trace.stage = f"{'TLS handshake and ' if implicit else ''}greeting from {target.label}"
    try:
        await smtp.connect()
    except SMTPResponseException as exc:
        # RFC 5321 §3.1: a 554 (or any non-220) greeting means no service here.
        return Failure(f"greeting {reply_text(exc.code, exc.message, target)}")
    except (SMTPException, OSError) as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, ssl.SSLError) else None
        if implicit and cause is not None:
            return Observed(
                False, handshake_error=describe_handshake_error(cause), implicit_tls=True
            )
        return Failure(f"no greeting from {target.label}: {exc}")
    if not implicit:
        result = await _starttls(smtp, target, ctx, trace)
        if result is not None:
            return result
    sslobj = smtp.get_transport_info("ssl_object")
    if sslobj is None:
        return Failure(f"no TLS session with {target.label}; refusing plaintext")
    return observe(sslobj, verified=verify, implicit_tls=implicit)


async def _starttls(
    smtp: aiosmtplib.SMTP, target: Target, ctx: ssl.SSLContext, trace: Trace
) -> Observed | Failure | None:
    """EHLO and STARTTLS (RFC 3207 §4); None when TLS is up."""
    try:
        trace.stage = f"EHLO at {target.label}"
        await smtp.ehlo()
    except SMTPResponseException as exc:
        # No EHLO means no STARTTLS: never fall back to HELO and plaintext.
        return Failure(f"EHLO refused, so no STARTTLS: {reply_text(exc.code, exc.message, target)}")
    except (SMTPException, OSError) as exc:
        return Failure(f"EHLO failed at {target.label}: {exc}")
    if not smtp.supports_extension("starttls"):
        return Observed(starttls_offered=False)
    try:
        trace.stage = f"STARTTLS at {target.label}"
        await smtp.starttls(tls_context=ctx, server_hostname=target.host)
    except SMTPResponseException as exc:
        return Observed(True, starttls_code=exc.code)
    except (ssl.SSLError, SMTPException, OSError) as exc:
        return Observed(True, starttls_code=220, handshake_error=describe_handshake_error(exc))
    return None


async def polite_quit(smtp: aiosmtplib.SMTP, timeout: float = 5.0) -> None:
    """QUIT (RFC 5321 §4.1.1.10) if still connected, bounded; then close."""
    if smtp.is_connected:
        with contextlib.suppress(SMTPException, OSError):
            await smtp.quit(timeout=timeout)
    smtp.close()
