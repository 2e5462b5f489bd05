"""STARTTLS SMTP sink: counts each message's Message-ID, records when it arrived, discards it.

Role: the "MX" the systems under test deliver to.  A hand-written asyncio Protocol
(uvloop when installed), much cheaper per message than aiosmtpd: no parsing beyond the
command verb, no copy of the message body except its first 64 KiB (for the Message-ID).
STARTTLS goes through ``loop.start_tls``; TLS 1.3 session tickets are off, so every
connection is a full handshake and nothing is spent on tickets nobody uses.

Run as its own process (``python -m bench.sink --port 0 --cert C --key K``).  It prints
``READY <port>`` on stdout, then answers one-line commands on stdin:

    count          -> "count <unique> <duplicates> <unknown>"
    reset          -> "ok"   forget arrivals, restart the CPU clock (after a warm-up)
    dump PATH      -> "ok"   write arrivals + CPU seconds as JSON to PATH
    quit / EOF     -> exit

Arrival time = ``time.monotonic()`` (the same clock in every process) at the end of the
data (DATA's dot, BDAT LAST's last octet), just before the 250.  ``--no-pipelining`` /
``--no-chunking``: the EHLO reply leaves PIPELINING (RFC 2920) / CHUNKING (RFC 3030,
offered by default as Postfix >= 3.4 and Exim do) out.  The sink counts
``early_commands``: command lines (or DATA's message bytes) that arrived before the
reply to the command ahead was written: a pipelined group, or, without PIPELINING, a
client that pipelines anyway (RFC 2920 forbids it), which the driver reports.

Not: a validating SMTP server; it accepts any MAIL/RCPT and never rejects.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import ssl
import sys
import time
from typing import Any

from bench import aio

_CMD, _DATA, _TLSWAIT, _CLOSED, _BDAT = 0, 1, 2, 3, 4
_END = b"\r\n.\r\n"
_HDR_KEEP = 65536
_MSGID = re.compile(rb"^message-id:[ \t]*<([^>\r\n]+)>", re.IGNORECASE | re.MULTILINE)
_NAME = b"sink.bench.invalid"  # must differ from the SUT's own name (Postfix loop check)


def ehlo_reply(tls: bool, pipelining: bool, chunking: bool = True) -> bytes:
    """The EHLO reply: STARTTLS before TLS, PIPELINING only if *pipelining*,
    CHUNKING (RFC 3030, as Postfix >= 3.4 and Exim offer it) only if *chunking*."""
    lines = [b"250-" + _NAME, b"250-SIZE 209715200", b"250-8BITMIME"]
    if pipelining:
        lines.insert(1, b"250-PIPELINING")
    if chunking:
        lines.append(b"250-CHUNKING")
    if not tls:
        lines.append(b"250-STARTTLS")
    return b"\r\n".join([*lines, b"250 ENHANCEDSTATUSCODES", b""])


class Stats:
    def __init__(self) -> None:
        self.arrivals: dict[str, float] = {}
        self.duplicates = 0
        self.unknown = 0  # messages without a Message-ID we could read (e.g. bounces)
        self.unknown_samples: list[str] = []
        self.bytes = 0
        self.connections = 0
        self.tls_handshakes = 0
        self.early_commands = 0  # sent before the previous reply was written (see doc)
        self.cpu0 = _cpu()
        self.t0 = time.monotonic()

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]

    def record(self, header: bytes, nbytes: int) -> None:
        now = time.monotonic()
        self.bytes += nbytes
        end = header.find(b"\r\n\r\n")
        m = _MSGID.search(header, 0, end if end >= 0 else len(header))
        if m is None:
            self.unknown += 1
            if len(self.unknown_samples) < 3:
                self.unknown_samples.append(header[:600].decode("latin-1"))
            return
        key = m.group(1).decode("ascii", "replace")
        if key in self.arrivals:
            self.duplicates += 1
        else:
            self.arrivals[key] = now


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class SinkProtocol(asyncio.Protocol):
    __slots__ = (
        "buf",
        "chunk_last",
        "chunk_left",
        "ehlo",
        "hdr",
        "mode",
        "nbytes",
        "stats",
        "tail",
        "tls",
        "tlsctx",
        "transport",
    )

    def __init__(
        self,
        stats: Stats,
        tlsctx: ssl.SSLContext,
        pipelining: bool = True,
        chunking: bool = True,
    ) -> None:
        self.stats = stats
        self.ehlo = (
            ehlo_reply(False, pipelining, chunking),
            ehlo_reply(True, pipelining, chunking),
        )
        self.chunk_left = 0  # BDAT: octets of the chunk still to come
        self.chunk_last = False  # ... and whether it ends the message
        self.tlsctx = tlsctx
        self.transport: Any = None
        self.buf = b""
        self.mode = _CMD
        self.tls = False
        self.hdr = bytearray()
        self.tail = b"\r\n"
        self.nbytes = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.stats.connections += 1
        transport.write(b"220 " + _NAME + b" ESMTP bench sink\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        self.mode = _CLOSED
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.mode == _DATA:
            data = self._data(data)
            if not data:
                return
        elif self.mode == _BDAT:
            data = self._chunk(data)
            if not data:
                return
        elif self.mode == _TLSWAIT:
            # Decrypted bytes delivered by the TLS layer before start_tls() returned to
            # us (stdlib asyncio does this when EHLO rides with the client's Finished).
            # Plaintext sent after STARTTLS never gets here: reading was paused and the
            # buffer cleared when STARTTLS was read (RFC 3207 injection defence).
            self.buf += data
            return
        elif self.mode != _CMD:
            return
        self.buf += data
        self._commands()

    # ---- command mode -------------------------------------------------------------
    def _commands(self) -> None:
        out: list[bytes] = []
        transport = self.transport
        while self.mode == _CMD:
            i = self.buf.find(b"\n")
            if i < 0:
                if len(self.buf) > 8192:
                    transport.write(b"500 line too long\r\n")
                    transport.close()
                    self.mode = _CLOSED
                    return
                break
            line = self.buf[:i]
            self.buf = self.buf[i + 1 :]
            if out:  # the reply to the command before this one is not written yet
                self.stats.early_commands += 1
            verb = line[:4].upper()
            if verb in (b"MAIL", b"RCPT"):
                out.append(b"250 2.1.0 Ok\r\n")
                if verb == b"MAIL":  # a new message: its BDAT chunks add up from here
                    self.hdr, self.nbytes = bytearray(), 0
            elif verb in (b"DATA", b"BDAT"):
                self._message(line, out)
                out, transport = [], self.transport
            elif verb == b"EHLO":
                out.append(self.ehlo[self.tls])
            elif verb == b"HELO":
                out.append(b"250 " + _NAME + b"\r\n")
            elif verb in (b"RSET", b"NOOP"):
                out.append(b"250 2.0.0 Ok\r\n")
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 Bye\r\n")
                transport.write(b"".join(out))
                transport.close()
                self.mode = _CLOSED
                return
            elif line[:8].upper().startswith(b"STARTTLS") and not self.tls:
                transport.pause_reading()
                out.append(b"220 2.0.0 Ready to start TLS\r\n")
                transport.write(b"".join(out))
                self.buf = b""
                self.mode = _TLSWAIT
                asyncio.get_running_loop().create_task(self._starttls(transport))
                return
            else:
                out.append(b"502 5.5.2 Command not recognized\r\n")
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def _message(self, line: bytes, out: list[bytes]) -> None:
        """DATA (after its 354) or BDAT: write the replies so far, take message bytes."""
        if line[:4].upper() == b"DATA":
            out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            self.mode, self.hdr, self.tail, self.nbytes = _DATA, bytearray(), b"\r\n", 0
        else:  # RFC 3030: the chunk's octets follow the command at once
            parts = line.split()
            self.chunk_left = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            self.chunk_last = len(parts) > 2 and parts[2].upper().startswith(b"LAST")
            self.mode = _BDAT
        if out:
            self.transport.write(b"".join(out))
        rest, self.buf = self.buf, b""
        if rest and self.mode == _DATA:  # message bytes sent before the 354
            self.stats.early_commands += 1
        if rest:
            self.buf = self._data(rest) if self.mode == _DATA else self._chunk(rest)

    async def _starttls(self, transport: Any) -> None:
        loop = asyncio.get_running_loop()
        try:
            new = await loop.start_tls(
                transport, self, self.tlsctx, server_side=True, ssl_handshake_timeout=30.0
            )
        except Exception:
            transport.abort()
            self.mode = _CLOSED
            return
        if new is None:
            return
        self.stats.tls_handshakes += 1
        self.transport = new
        self.tls = True
        self.mode = _CMD
        if self.buf:
            self._commands()

    # ---- data mode ----------------------------------------------------------------
    def _chunk(self, data: bytes) -> bytes:
        """Consume BDAT chunk octets; return what follows the chunk."""
        take = min(self.chunk_left, len(data))
        body = data[:take]
        if len(self.hdr) < _HDR_KEEP:
            self.hdr += body[: _HDR_KEEP - len(self.hdr)]
        self.nbytes += take
        self.chunk_left -= take
        if self.chunk_left:
            return b""
        self.mode = _CMD
        if take < len(data):  # a command sent before the reply to this chunk
            self.stats.early_commands += 1
        if not self.chunk_last:
            if self.transport is not None:
                self.transport.write(b"250 2.0.0 Ok: chunk\r\n")
            return data[take:]
        self.stats.record(bytes(self.hdr), self.nbytes)
        self.hdr, self.nbytes = bytearray(), 0
        if self.transport is not None:
            self.transport.write(b"250 2.0.0 Ok: queued\r\n")
        return data[take:]

    def _data(self, data: bytes) -> bytes:
        """Consume message bytes; return what follows the end-of-data dot (pipelined)."""
        tail = self.tail
        end = -1
        j = (tail + data[:4]).find(_END)
        if j >= 0:
            end = j + 5 - len(tail)
        else:
            k = data.find(_END)
            if k >= 0:
                end = k + 5
        body = data if end < 0 else data[:end]
        if len(self.hdr) < _HDR_KEEP:
            self.hdr += body[: _HDR_KEEP - len(self.hdr)]
        self.nbytes += len(body)
        if end < 0:
            self.tail = data[-4:] if len(data) >= 4 else (tail + data)[-4:]
            return b""
        self.stats.record(bytes(self.hdr), self.nbytes)
        if end < len(data):  # a command sent before the 250 for this message
            self.stats.early_commands += 1
        self.mode = _CMD
        self.hdr = bytearray()
        if self.transport is not None:
            self.transport.write(b"250 2.0.0 Ok: queued\r\n")
        return data[end:]


def server_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0  # TLS 1.3: no session tickets (no resumption, no wasted work)
    return ctx


async def _control(stats: Stats, server: asyncio.AbstractServer) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout
    while True:
        line = await reader.readline()
        if not line:
            break
        cmd, _, arg = line.decode().strip().partition(" ")
        if cmd == "count":
            reply = f"count {len(stats.arrivals)} {stats.duplicates} {stats.unknown}"
        elif cmd == "reset":
            stats.reset()
            reply = "ok"
        elif cmd == "dump":
            doc = {
                "arrivals": stats.arrivals,
                "duplicates": stats.duplicates,
                "unknown": stats.unknown,
                "unknown_samples": stats.unknown_samples,
                "bytes": stats.bytes,
                "connections": stats.connections,
                "tls_handshakes": stats.tls_handshakes,
                "early_commands": stats.early_commands,
                "cpu_seconds": _cpu() - stats.cpu0,
                "wall_seconds": time.monotonic() - stats.t0,
                "loop": type(asyncio.get_running_loop()).__module__,
            }
            tmp = arg + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(doc, fh)
            os.replace(tmp, arg)
            reply = "ok"
        elif cmd == "quit":
            break
        else:
            reply = f"error unknown command {cmd!r}"
        out.write(reply + "\n")
        out.flush()
    server.close()


async def main_async(args: argparse.Namespace) -> None:
    if not args.host.startswith("127."):
        raise SystemExit("sink binds 127.0.0.0/8 only")
    stats = Stats()
    ctx = server_context(args.cert, args.key)
    loop = asyncio.get_running_loop()
    pipelining, chunking = not args.no_pipelining, not args.no_chunking
    server = await loop.create_server(
        lambda: SinkProtocol(stats, ctx, pipelining, chunking),
        args.host,
        args.port,
        backlog=1024,
        reuse_address=True,
    )
    port = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"READY {port}\n")
    sys.stdout.flush()
    try:
        await asyncio.wait_for(_control(stats, server), timeout=args.max_lifetime)
    except TimeoutError:
        sys.stderr.write("sink: max lifetime reached, exiting\n")
    server.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="STARTTLS SMTP sink for the benchmark")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--no-uvloop", action="store_true")
    p.add_argument("--no-pipelining", action="store_true", help="EHLO without PIPELINING")
    p.add_argument("--no-chunking", action="store_true", help="EHLO without CHUNKING")
    p.add_argument("--max-lifetime", type=float, default=3600.0, help="exit after this many s")
    args = p.parse_args(argv)
    aio.run(main_async(args), not args.no_uvloop)


if __name__ == "__main__":
    main()
