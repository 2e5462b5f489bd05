"""STARTTLS SMTP load generator: C concurrent connections x M messages of S bytes.

Role: offer mail to the system under test the way an internal application would, over
STARTTLS with a full handshake on every connection (no session is ever reused, tickets
are refused), one recipient per message, a unique Message-ID per message
(``<RUN.CONN.SEQ@loadgen.bench.invalid>``), and record per message:

    t_start  monotonic time the MAIL command was written
    t_sent   the end-of-data dot handed to the transport (after ``drain()``)
    t_250    the reply to the dot received

Accept latency = t_250 - t_sent.  Times are ``time.monotonic()`` (CLOCK_MONOTONIC, shared
by every process on the machine) so the driver can match them with the sink's arrivals.

Closed loop by default (each connection sends its next message as soon as the previous
one got its reply).  With ``--rate R`` the run is open loop: message k is due at
t0 + k/R and goes out on whichever connection is free (the lag behind schedule is
recorded too, so an overloaded server shows up instead of hiding).
PIPELINING (RFC 2920) is used for MAIL/RCPT/DATA when the server offers it, as real
clients do; ``--no-pipelining`` turns it off.

Writes a JSON result file (``--out``); exit code 0 unless the run could not start.
``--shape`` picks the message's shape (bench.messages: plain text, very short lines, a
huge header block, header only); the run records every reply to end-of-data, so a 5xx
for a shape is an outcome (``rejected``), not an error.

Not: a conformance tester.  Messages are 7-bit text; lines never start with ".".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import ssl
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from bench import aio
from bench.messages import DOMAIN, SENDER, SHAPES, head, message_id, shared_part


def client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the SUT's cert is self-signed; we measure, not verify
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_TICKET  # full handshake per connection, no resumption
    return ctx


class SmtpError(Exception):
    pass


@dataclass
class Result:
    messages: list[list[Any]] = field(default_factory=list)  # [msgid, t_start, t_sent, t_250]
    rejected: list[list[Any]] = field(default_factory=list)  # [msgid, stage, reply]
    errors: list[str] = field(default_factory=list)
    lag: list[float] = field(default_factory=list)  # rate mode: t_start - due time
    handshakes: int = 0
    pipelining: bool = False
    stage: dict[int, str] = field(default_factory=dict)  # per connection, for error messages


async def _reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise SmtpError("connection closed by server")
        lines.append(line)
        if len(line) < 4 or line[3:4] != b"-":
            break
    try:
        code = int(lines[-1][:3])
    except ValueError as exc:
        raise SmtpError(f"bad reply {lines[-1][:80]!r}") from exc
    return code, b"".join(lines)


class Plan:
    """Which message to send next: fixed per connection, or a shared open-loop schedule."""

    def __init__(self, conns: int, msgs: int, rate: float | None) -> None:
        self.conns = conns
        self.msgs = msgs
        self.rate = rate
        self.total = conns * msgs
        self.next = 0
        self.t0 = 0.0

    def take(self, conn: int, done_on_conn: int) -> tuple[int, int, float] | None:
        """(conn_id_for_msgid, seq, due) or None when this connection is done."""
        if self.rate is None:
            if done_on_conn >= self.msgs:
                return None
            return conn, done_on_conn, 0.0
        if self.next >= self.total:
            return None
        k = self.next
        self.next += 1
        return conn, k, self.t0 + k / self.rate


class Smtp:
    """One client connection: commands, replies, the STARTTLS opening."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def reply(self, timeout: float) -> tuple[int, bytes]:
        return await asyncio.wait_for(_reply(self.reader), timeout)

    async def cmd(self, line: bytes, timeout: float) -> tuple[int, bytes]:
        self.writer.write(line)
        return await self.reply(timeout)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
            await asyncio.wait_for(self.writer.wait_closed(), 5.0)


async def open_starttls(
    host: str, port: int, ctx: ssl.SSLContext, t_io: float, stage: dict[int, str], conn: int
) -> tuple[Smtp, bytes]:
    """Connect, greeting, EHLO, STARTTLS, handshake, EHLO: the session and its last
    EHLO reply.  *stage* tracks where the session is (for error messages)."""
    stage[conn] = "connect"
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, limit=1 << 16), t_io
    )
    smtp = Smtp(reader, writer)
    try:
        code, text = await smtp.reply(t_io)
        if code != 220:
            raise SmtpError(f"greeting {text[:100]!r}")
        code, text = await smtp.cmd(b"EHLO loadgen.bench.invalid\r\n", t_io)
        if code != 250 or b"STARTTLS" not in text.upper():
            raise SmtpError(f"EHLO (no STARTTLS?) {text[:200]!r}")
        stage[conn] = "starttls"
        code, text = await smtp.cmd(b"STARTTLS\r\n", t_io)
        if code != 220:
            raise SmtpError(f"STARTTLS {text[:100]!r}")
        stage[conn] = "tls-handshake"
        await asyncio.wait_for(writer.start_tls(ctx), t_io)
        stage[conn] = "ehlo-tls"
        code, text = await smtp.cmd(b"EHLO loadgen.bench.invalid\r\n", t_io)
        if code != 250:
            raise SmtpError(f"EHLO after TLS {text[:100]!r}")
    except BaseException:
        await smtp.close()
        raise
    return smtp, text


async def envelope(
    smtp: Smtp, cid: int, size: int, pipelining: bool, t_io: float
) -> list[tuple[int, bytes]]:
    """MAIL, RCPT, DATA: in one write when *pipelining*, else one by one, stopping at
    the first failure.  The replies, in order."""
    mail = f"MAIL FROM:<{SENDER}> SIZE={size}\r\n".encode()
    rcpt = f"RCPT TO:<rcpt{cid}@{DOMAIN}>\r\n".encode()
    if pipelining:
        smtp.writer.write(mail + rcpt + b"DATA\r\n")
        return [await smtp.reply(t_io) for _ in range(3)]
    replies = []
    for line in (mail, rcpt, b"DATA\r\n"):
        r = await smtp.cmd(line, t_io)
        replies.append(r)
        if r[0] >= 400:
            break
    return replies


async def send_data(
    smtp: Smtp, parts: tuple[bytes, ...], timeout: float
) -> tuple[int, bytes, float]:
    """The message and the end-of-data dot, then the reply: (code, text, when the dot
    was handed to the transport).  A server that refuses a message may reply and close
    before it has read all of it: then its reply, if it sent one, is returned (code 0
    if none)."""
    try:
        for part in parts:
            smtp.writer.write(part)
        smtp.writer.write(b".\r\n")
        await smtp.writer.drain()
    except OSError as exc:
        t_sent = time.monotonic()
        try:
            return (*await smtp.reply(5.0), t_sent)
        except (SmtpError, OSError, TimeoutError):
            return 0, f"connection lost while sending: {type(exc).__name__}".encode(), t_sent
    t_sent = time.monotonic()
    return (*await smtp.reply(timeout), t_sent)


async def session(
    conn: int,
    args: argparse.Namespace,
    plan: Plan,
    body: bytes,
    ctx: ssl.SSLContext,
    res: Result,
) -> None:
    t_io = args.io_timeout
    smtp, ehlo = await open_starttls(args.host, args.port, ctx, t_io, res.stage, conn)
    res.handshakes += 1
    pipelining = b"PIPELINING" in ehlo.upper() and not args.no_pipelining
    res.pipelining = pipelining
    try:
        sent = 0
        while (item := plan.take(conn, sent)) is not None:
            sent += 1
            await one_message(smtp, item, args, body, pipelining, res)
            res.stage[conn] = "after message"
        with contextlib.suppress(SmtpError, OSError, TimeoutError):
            await smtp.cmd(b"QUIT\r\n", 5.0)
    finally:
        await smtp.close()


async def one_message(
    smtp: Smtp,
    item: tuple[int, int, float],
    args: argparse.Namespace,
    body: bytes,
    pipelining: bool,
    res: Result,
) -> None:
    cid, seq, due = item
    if due and (delay := due - time.monotonic()) > 0:
        await asyncio.sleep(delay)
    msgid = message_id(args.run, cid, seq)
    res.stage[cid] = f"message {seq}"
    t_start = time.monotonic()
    if due:
        res.lag.append(t_start - due)
    replies = await envelope(smtp, cid, len(body) + 400, pipelining, args.io_timeout)
    stage = next((i for i, r in enumerate(replies) if r[0] >= 400), None)
    if stage is not None or replies[-1][0] != 354:
        res.rejected.append([msgid, stage, replies[-1][1][:200].decode("latin-1")])
        if replies[-1][0] == 354:  # cannot happen with one recipient, but be safe
            await smtp.cmd(b".\r\n", args.io_timeout)
        await smtp.cmd(b"RSET\r\n", args.io_timeout)
        return
    parts = (head(args.shape, args.run, cid, seq), body)
    code, text, t_sent = await send_data(smtp, parts, args.data_timeout)
    t_250 = time.monotonic()
    if code == 250:
        res.messages.append([msgid, t_start, t_sent, t_250])
    elif code == 0:
        raise SmtpError(text.decode("latin-1"))
    else:
        res.rejected.append([msgid, "data", text[:200].decode("latin-1")])


async def run(args: argparse.Namespace) -> dict[str, Any]:
    if not args.host.startswith("127."):
        raise SystemExit("loadgen talks to 127.0.0.0/8 only")
    size = args.size
    hdr_len = len(head(args.shape, args.run, 0, 0))
    body = shared_part(args.shape, size, hdr_len)
    ctx = client_context()
    plan = Plan(args.conns, args.msgs, args.rate)
    res = Result()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    plan.t0 = t0

    async def guarded(conn: int) -> None:
        try:
            await session(conn, args, plan, body, ctx, res)
        except (SmtpError, OSError, TimeoutError, ssl.SSLError) as exc:
            res.errors.append(f"conn {conn} at {res.stage.get(conn)}: {type(exc).__name__}: {exc}")

    tasks = [asyncio.create_task(guarded(c)) for c in range(args.conns)]
    _done, pending = await asyncio.wait(tasks, timeout=args.max_seconds)
    for t in pending:
        t.cancel()
    if pending:
        res.errors.append(f"run exceeded {args.max_seconds}s: {len(pending)} connections cancelled")
        await asyncio.gather(*pending, return_exceptions=True)
    t_end = time.monotonic()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "run": args.run,
        "host": args.host,
        "port": args.port,
        "conns": args.conns,
        "msgs_per_conn": args.msgs,
        "size": size,
        "shape": args.shape,
        "message_bytes": hdr_len + len(body),
        "rate": args.rate,
        "pipelining": res.pipelining,
        "t0": t0,
        "t_end": t_end,
        "offered": plan.total,
        "messages": res.messages,
        "rejected": res.rejected,
        "errors": res.errors,
        "lag": res.lag,
        "handshakes": res.handshakes,
        "cpu_seconds": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
        "loop": type(asyncio.get_running_loop()).__module__,
    }


def parse_size(text: str) -> int:
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    mult = {"k": 1024, "m": 1024 * 1024}.get(t[-1:], 1)
    return int(float(t.rstrip("km")) * mult)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="STARTTLS SMTP load generator")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--conns", type=int, default=16)
    p.add_argument("--msgs", type=int, default=200, help="messages per connection")
    p.add_argument("--size", type=parse_size, default=2048, help="e.g. 2k, 100k, 10m")
    p.add_argument("--shape", choices=SHAPES, default="plain", help="see bench.messages")
    p.add_argument("--rate", type=float, default=None, help="offered msg/s (open loop)")
    p.add_argument("--run", default=f"r{os.getpid()}", help="run tag used in Message-IDs")
    p.add_argument("--out", required=True, help="JSON result file")
    p.add_argument("--no-pipelining", action="store_true")
    p.add_argument("--no-uvloop", action="store_true")
    p.add_argument("--io-timeout", type=float, default=60.0)
    p.add_argument("--data-timeout", type=float, default=120.0)
    p.add_argument("--max-seconds", type=float, default=600.0, help="whole-run bound")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    doc = aio.run(run(args), not args.no_uvloop)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(doc, fh)
    os.replace(tmp, args.out)
    n = len(doc["messages"])
    dt = doc["t_end"] - doc["t0"]
    sys.stderr.write(
        f"loadgen: {n}/{doc['offered']} accepted in {dt:.2f}s"
        f" ({n / dt if dt > 0 else 0:.0f} msg/s), {len(doc['rejected'])} rejected,"
        f" {len(doc['errors'])} errors\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
