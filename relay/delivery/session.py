"""Outbound SMTP session: one connection to one MX address, TLS first, then one
transaction at a time.

Role: connect (RFC 5321 §4.5.3.2 timeouts), greet, EHLO, STARTTLS (RFC 3207) with the
level's client context (or implicit TLS for a route that says so, RFC 8314), report the
handshake facts to :func:`relay.policy.decide`, EHLO again, optionally AUTH to a route's
next hop; then MAIL / RCPT / DATA for a group of recipients, classifying every reply
where it is seen (2xx delivered, 4xx transient, 5xx permanent).

Plaintext is structurally impossible: aiosmtplib runs with ``start_tls=False`` and
``use_tls=False`` (its default STARTTLS is opportunistic), this module issues STARTTLS
itself, returns a failure unless a verdict said ok, and :func:`transact` refuses to
send MAIL on a transport without TLS.  There is no plaintext retry anywhere.

Not: choosing MX hosts, pooling, concurrency limits or logging (delivery.py), policy
judgements (policy.py), retry timing (scheduler/retry.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiosmtplib
from aiosmtplib import SMTPException, SMTPResponseException

from relay.config import DeliveryConfig, RouteAuth
from relay.outbound_tls import describe_handshake_error, observe
from relay.policy import Observed, Requirement, Verdict, decide
from relay.wiredata import command, pipelined, send_data


class Status(enum.StrEnum):
    DELIVERED = "delivered"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


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


@dataclass
class Session:
    smtp: aiosmtplib.SMTP
    target: Target
    observed: Observed
    messages: int = 0
    idle_since: float = 0.0  # loop time it went back to the pool

    @property
    def tls(self) -> str:
        return f"{self.observed.tls_version} {self.observed.cipher}"


@dataclass(frozen=True)
class Decision:
    status: Status
    reason: str
    reply: str | None = None  # the MX's reply as sent ("550 5.1.1 text"), for DSNs


@dataclass
class TxResult:
    """Per-recipient decisions (by index into the recipients given to :func:`transact`).
    ``session_error``: the session failed before these recipients were decided; the
    undecided ones may try the next MX.  ``reusable``: the session may carry another
    transaction (after an RSET, which :func:`transact` sends first on a reused one)."""

    decided: dict[int, Decision] = field(default_factory=dict)
    session_error: str | None = None
    reusable: bool = False
    # A reused session turned out dead or unfit before any message data went out:
    # nothing was decided, and the same recipients may go over a fresh session.
    stale: bool = False


def reply_text(code: int, message: str, target: Target) -> str:
    """``"550 5.1.1 text" from host[ip]:port`` — the reply as the MX gave it, one line."""
    text = " ".join(message.split())
    return f'"{code} {text}" from {target.label}'


def raw_reply(code: int, message: str) -> str:
    """The reply as one line, ``550 5.1.1 text``; kept as data for DSNs (RFC 3464 2.3.6)."""
    return f"{code} {' '.join(message.split())}"


def classify(code: int) -> Status:
    """RFC 5321 §4.2.1: 2yz completion, 4yz transient negative, 5yz permanent negative."""
    if 200 <= code < 300:
        return Status.DELIVERED
    return Status.PERMANENT if 500 <= code < 600 else Status.TRANSIENT


def decision_for(code: int, message: str, target: Target) -> Decision:
    """What an MX reply decides for the recipients it applies to."""
    return Decision(classify(code), reply_text(code, message, target), raw_reply(code, message))


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
) -> tuple[Session, Verdict] | Failure:
    """A TLS-protected session whose verdict is ok, or a Failure; never plaintext."""
    trace.stage = f"connect to {target.label}"
    try:
        sock = await _tcp_connect(target, cfg.connect_timeout)
    except (OSError, TimeoutError) as exc:
        return Failure(f"cannot connect to {target.label}: {exc or type(exc).__name__}")
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
        return result
    return Session(smtp, target, result[0]), result[1]


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


@dataclass(frozen=True)
class Envelope:
    sender: str
    mail_options: Sequence[str]
    recipients: Sequence[tuple[str, Sequence[str]]]
    data: bytes


# ---- one transaction -------------------------------------------------------------------


def _keyword(option: str) -> tuple[str, str]:
    key, _, value = option.partition("=")
    return key.upper(), value


def _mail_options(env: Envelope, smtp: aiosmtplib.SMTP, target: Target) -> list[str] | str:
    """MAIL FROM parameters this MX may receive, or why the message cannot go there."""
    opts: list[str] = []
    for option in env.mail_options:
        key, value = _keyword(option)
        if key == "SMTPUTF8":
            # RFC 6531 §3.4: an SMTPUTF8 message must not go to a server without it.
            if not smtp.supports_extension("smtputf8"):
                return f"destination lacks SMTPUTF8, which the message needs ({target.label})"
            opts.append("SMTPUTF8")
        elif key == "BODY" and value.upper() == "8BITMIME":
            # RFC 6152 §3: 8-bit data only to a server that advertises 8BITMIME.
            if not smtp.supports_extension("8bitmime"):
                return f"destination lacks 8BITMIME, which the message needs ({target.label})"
            opts.append("BODY=8BITMIME")
        elif key == "BODY" and value.upper() == "BINARYMIME":
            return "BODY=BINARYMIME needs BDAT (RFC 3030), which this relay does not send"
        elif key in ("RET", "ENVID") and smtp.supports_extension("dsn"):
            opts.append(option)  # RFC 3461 §4; dropped for a non-DSN server (§5.2.1)
        # SIZE is recomputed below; anything else is not ours to pass on.
    if smtp.supports_extension("size"):
        opts.insert(0, f"SIZE={len(env.data)}")  # RFC 1870 §6
    return opts


def _size_problem(env: Envelope, smtp: aiosmtplib.SMTP, target: Target) -> str | None:
    """RFC 1870 §4: respect the SIZE the MX advertises (0 or absent: no stated limit)."""
    advertised = smtp.esmtp_extensions.get("size", "").strip()
    limit = int(advertised) if advertised.isdigit() else 0
    if limit and len(env.data) > limit:
        return f"message size {len(env.data)} exceeds the limit of {limit} bytes of {target.label}"
    return None


def _rcpt_options(options: Sequence[str], smtp: aiosmtplib.SMTP) -> list[str]:
    """RFC 3461 §4.1/§4.2 NOTIFY and ORCPT, only to a DSN server (§5.2.1)."""
    if not smtp.supports_extension("dsn"):
        return []
    return [opt for opt in options if _keyword(opt)[0] in ("NOTIFY", "ORCPT")]


def _all(
    result: TxResult, count: int, status: Status, reason: str, reply: str | None = None
) -> TxResult:
    for i in range(count):
        result.decided.setdefault(i, Decision(status, reason, reply))
    return result


async def transact(
    session: Session, env: Envelope, cfg: DeliveryConfig, trace: Trace, *, reset: bool = False
) -> TxResult:
    """MAIL, RCPT per recipient, DATA (RFC 5321 §3.3); every reply classified here.

    *reset*: the session was used before; RSET first (RFC 5321 §4.1.1.5), which also
    proves it is still alive - if not, ``stale`` says so.  A server that offers
    PIPELINING gets [RSET,] MAIL, the RCPTs and DATA in one write (RFC 2920)."""
    smtp, target, count = session.smtp, session.target, len(env.recipients)
    result = TxResult()
    if smtp.get_transport_info("ssl_object") is None:  # defence in depth: never plaintext
        result.session_error = f"refusing MAIL to {target.label}: the session is not TLS"
        return result
    opts = _mail_options(env, smtp, target)
    problem = opts if isinstance(opts, str) else _size_problem(env, smtp, target)
    if problem is not None or isinstance(opts, str):
        result.reusable = True  # nothing was sent
        return _all(result, count, Status.PERMANENT, problem or "unsendable")
    encoding = "utf-8" if "SMTPUTF8" in opts else "ascii"
    if smtp.supports_extension("pipelining"):
        await _pipelined(smtp, env, opts, encoding, cfg, target, trace, result, reset)
        return result
    if reset:
        trace.stage = f"RSET on a reused session to {target.label}"
        if not await _rset(smtp):
            result.stale = True
            result.session_error = f"reused session to {target.label} is gone"
            return result
    try:
        trace.stage = f"MAIL FROM at {target.label}"
        await smtp.mail(env.sender, options=opts, encoding=encoding)
    except SMTPResponseException as exc:
        reason = reply_text(exc.code, exc.message, target)
        if exc.code == 421 or exc.code < 500:
            result.session_error = reason  # RFC 5321 §4.2.1: this MX is busy; try the next
            return result
        result.reusable = smtp.is_connected
        return _all(result, count, Status.PERMANENT, reason, raw_reply(exc.code, exc.message))
    except ValueError as exc:  # not encodable / control characters: no MX will take it
        result.reusable = smtp.is_connected
        return _all(result, count, Status.PERMANENT, f"sender {env.sender!r} cannot be sent: {exc}")
    except (SMTPException, OSError) as exc:
        result.session_error = f"MAIL FROM failed at {target.label}: {exc}"
        return result
    accepted = await _recipients(smtp, env, encoding, target, trace, result)
    if result.session_error is not None:
        return result
    if not accepted:
        result.reusable = await _rset(smtp)  # RFC 5321 §4.1.1.5: end the empty transaction
        return result
    await _data(smtp, env, accepted, cfg, target, trace, result)
    return result


async def _pipelined(
    smtp: aiosmtplib.SMTP,
    env: Envelope,
    opts: list[str],
    encoding: str,
    cfg: DeliveryConfig,
    target: Target,
    trace: Trace,
    result: TxResult,
    reset: bool,
) -> None:
    """[RSET,] MAIL, RCPT..., DATA in one write; then the message if DATA got 354.

    The replies mean what they mean in the one-by-one exchange; nothing of the
    message is sent unless MAIL, at least one RCPT and DATA were accepted."""
    count = len(env.recipients)
    try:
        lines = [command(b"MAIL FROM:", env.sender, opts, encoding)]
    except ValueError as exc:  # not encodable / control characters: no MX will take it
        result.reusable = smtp.is_connected
        _all(result, count, Status.PERMANENT, f"sender {env.sender!r} cannot be sent: {exc}")
        return
    sent: list[int] = []
    for i, (address, options) in enumerate(env.recipients):
        try:
            lines.append(command(b"RCPT TO:", address, _rcpt_options(options, smtp), encoding))
        except ValueError as exc:
            result.decided[i] = Decision(Status.PERMANENT, f"recipient cannot be sent: {exc}")
            continue
        sent.append(i)
    if not sent:
        result.reusable = smtp.is_connected  # nothing was sent
        return
    lines = ([b"RSET\r\n"] if reset else []) + lines + [b"DATA\r\n"]
    trace.stage = f"MAIL/RCPT/DATA (pipelined) at {target.label}"
    replies, error = await pipelined(smtp, lines, cfg.command_timeout)
    lost = f"connection lost at {target.label}: {error}"
    if reset:
        rset = replies.pop(0) if replies else None
        if rset is None or rset.code != 250:
            smtp.close()  # gone or unfit for reuse; what it said to the rest does not count
            result.stale = True
            result.session_error = lost if rset is None else f"{target.label} refused RSET"
            return
    if not replies:
        result.session_error = lost
        return
    mail, rcpts, data = replies[0], replies[1 : 1 + len(sent)], replies[1 + len(sent) :]
    if mail.code != 250:
        if data and data[0].code == 354:
            smtp.close()  # it waits for a message we will not send: end the session
        reason = reply_text(mail.code, mail.message, target)
        if mail.code == 421 or mail.code < 500:
            result.session_error = reason  # RFC 5321 §4.2.1: this MX is busy; try the next
            return
        result.reusable = smtp.is_connected
        _all(result, count, Status.PERMANENT, reason, raw_reply(mail.code, mail.message))
        return
    accepted: list[int] = []
    for i, reply in zip(sent, rcpts, strict=False):
        decision = decision_for(reply.code, reply.message, target)
        if reply.code == 421:
            smtp.close()
            result.session_error = decision.reason  # the MX is closing: try the next MX
            return
        if reply.code in (250, 251):
            accepted.append(i)
        else:
            result.decided[i] = decision
    if not data:  # the connection broke before every reply came: nothing was sent
        result.session_error = lost
        return
    if data[0].code != 354:
        decision = decision_for(data[0].code, data[0].message, target)
        if data[0].code == 421 and accepted:
            smtp.close()
            result.session_error = decision.reason
            return
        for i in accepted:
            result.decided[i] = decision
        result.reusable = smtp.is_connected
    elif not accepted:
        smtp.close()  # 354 although no recipient was accepted: end the session instead
    else:
        await _data(smtp, env, accepted, cfg, target, trace, result, started=True)


async def _recipients(
    smtp: aiosmtplib.SMTP,
    env: Envelope,
    encoding: str,
    target: Target,
    trace: Trace,
    result: TxResult,
) -> list[int]:
    accepted: list[int] = []
    for i, (address, options) in enumerate(env.recipients):
        try:
            trace.stage = f"RCPT TO at {target.label}"
            await smtp.rcpt(address, options=_rcpt_options(options, smtp), encoding=encoding)
        except SMTPResponseException as exc:
            decision = decision_for(exc.code, exc.message, target)
            if exc.code == 421 or not smtp.is_connected:
                result.session_error = decision.reason  # the MX closed: try the next MX
                return accepted
            result.decided[i] = decision
            continue
        except ValueError as exc:
            result.decided[i] = Decision(Status.PERMANENT, f"recipient cannot be sent: {exc}")
            continue
        except (SMTPException, OSError) as exc:
            result.session_error = f"RCPT TO failed at {target.label}: {exc}"
            return accepted
        accepted.append(i)
    return accepted


async def _data(
    smtp: aiosmtplib.SMTP,
    env: Envelope,
    accepted: list[int],
    cfg: DeliveryConfig,
    target: Target,
    trace: Trace,
    result: TxResult,
    *,
    started: bool = False,
) -> None:
    """DATA (or, *started*, just the message after a 354 already received); its
    reply applies to every accepted recipient (RFC 5321 §3.3)."""
    trace.stage = f"DATA at {target.label}"
    try:
        # RFC 5321 §4.5.3.2.6: up to 10 minutes for the reply to the final dot.
        reply = await send_data(smtp, env.data, 2 * cfg.command_timeout, started=started)
    except SMTPResponseException as exc:
        decision = decision_for(exc.code, exc.message, target)
        result.reusable = smtp.is_connected
    except (SMTPException, OSError) as exc:
        # The MX may have taken the message before the connection broke (RFC 1047):
        # defer rather than try another MX now, so a duplicate is the worst case.
        decision = Decision(
            Status.TRANSIENT, f"connection lost during DATA at {target.label}: {exc}"
        )
    else:
        decision = Decision(
            Status.DELIVERED,
            reply_text(reply.code, reply.message, target),
            raw_reply(reply.code, reply.message),
        )
        result.reusable = True
    for i in accepted:
        result.decided[i] = decision


async def _rset(smtp: aiosmtplib.SMTP) -> bool:
    try:
        await smtp.rset()
    except (SMTPException, OSError):
        smtp.close()
        return False
    return True
