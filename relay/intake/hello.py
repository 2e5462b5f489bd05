"""A TLS alert for clients whose handshake cannot succeed, instead of a bare close.

Role: asyncio's and uvloop's TLS transports close the connection when OpenSSL fails a
server handshake without sending the alert OpenSSL wrote, so a TLS 1.1 client or one
with no cipher we share reports "connection reset" or "EOF" instead of "protocol
version" or "handshake failure".  Before the handshake the listener (implicit TLS)
or the session (after STARTTLS's 220) reads the client's ClientHello without taking
it off the socket (MSG_PEEK, :func:`peek`); :class:`HelloGate` decides from it alone
whether the handshake is bound to fail - no TLS version or no cipher suite in common
with the server context - and if so the caller sends the alert
(:attr:`Refusal.alert`, RFC 8446 6 / RFC 5246 7.2) and closes.  In every other case,
and whenever the bytes are not a complete ClientHello, nothing is decided here and the
event loop's TLS handshake runs as before, on the bytes still unread.

The gate is exact for what it judges: the TLS 1.2 suites it accepts are the ones
the context really negotiates (each tried in an in-memory handshake when the gate is
made, so a suite whose certificate type is not loaded does not count).
Not: the handshake itself, or anything after it (the event loop's TLS transport).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import ssl
import struct
from dataclasses import dataclass

PEEK_MAX = 65536  # bytes looked at; a ClientHello is a few hundred to a few thousand
PEEK_AGAIN = 0.005  # seconds between looks while the ClientHello is still arriving
PEEK_TRIES = 40  # ... at most this many (then: no verdict, the handshake decides)

HANDSHAKE = 22  # TLS record content type
ALERT = 21
CLIENT_HELLO = 1
SUPPORTED_VERSIONS = 43  # extension type, RFC 8446 4.2.1
PROTOCOL_VERSION = 70  # alert descriptions, RFC 8446 6.2
HANDSHAKE_FAILURE = 40
TLS12, TLS13 = 0x0303, 0x0304
NAMES = {0x0300: "SSLv3", 0x0301: "TLSv1", 0x0302: "TLSv1.1", TLS12: "TLSv1.2", TLS13: "TLSv1.3"}


@dataclass(frozen=True)
class ClientHello:
    record_version: int  # of the record that carried it (the alert answers in kind)
    versions: frozenset[int]  # protocol versions offered
    suites: frozenset[int]  # cipher suites offered


class HelloRefused(ConnectionError):
    """The handshake was refused with an alert before it began (the text says why)."""


@dataclass(frozen=True)
class Refusal:
    alert: bytes  # one TLS alert record, fatal
    reason: str  # for the log
    seen: int = 0  # octets the client sent that were looked at (and are still unread)

    def send(self, sock: socket.socket) -> None:
        """Take what was looked at off the socket, then the alert and our FIN: closing
        with unread data would send a reset, which may overtake the alert."""
        with contextlib.suppress(OSError):
            sock.recv(self.seen, socket.MSG_DONTWAIT)
            sock.send(self.alert)
            sock.shutdown(socket.SHUT_WR)


def parse(data: bytes) -> ClientHello | None:
    """The ClientHello at the start of *data*; None if it is not one or not complete."""
    body = _handshake_message(data)
    if body is None or len(body) < 4 or body[0] != CLIENT_HELLO:
        return None
    try:
        return _client_hello(data[1:3], memoryview(body)[4:])
    except (IndexError, struct.error):
        return None  # malformed: OpenSSL will say so


def _handshake_message(data: bytes) -> bytes | None:
    """The first handshake message, joined from as many records as it spans."""
    message, pos = b"", 0
    while pos + 5 <= len(data) and data[pos] == HANDSHAKE:
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        fragment = data[pos + 5 : pos + 5 + length]
        if len(fragment) < length:
            return None
        message += fragment
        pos += 5 + length
        if len(message) >= 4 and len(message) >= 4 + int.from_bytes(message[1:4], "big"):
            return message[: 4 + int.from_bytes(message[1:4], "big")]
    return None


def _client_hello(record_version: bytes, hello: memoryview) -> ClientHello:
    legacy = int.from_bytes(hello[0:2], "big")
    pos = 34 + 1 + hello[34]  # version, random, session id
    n = int.from_bytes(hello[pos : pos + 2], "big")
    suites = frozenset(struct.unpack(f">{n // 2}H", hello[pos + 2 : pos + 2 + n]))
    pos += 2 + n
    pos += 1 + hello[pos]  # compression methods
    versions = frozenset(v for v in NAMES if v <= legacy)  # no extension: up to legacy
    if pos + 2 <= len(hello):
        end = pos + 2 + int.from_bytes(hello[pos : pos + 2], "big")
        pos += 2
        while pos + 4 <= end:
            kind, size = struct.unpack(">HH", hello[pos : pos + 4])
            if kind == SUPPORTED_VERSIONS:
                listed = hello[pos + 5 : pos + 5 + hello[pos + 4]]
                versions = frozenset(struct.unpack(f">{len(listed) // 2}H", listed))
            pos += 4 + size
    return ClientHello(int.from_bytes(record_version, "big"), versions, suites)


class HelloGate:
    """What a server context can agree to, and the ClientHellos it cannot."""

    def __init__(self, context: ssl.SSLContext) -> None:
        low, high = context.minimum_version, context.maximum_version
        self.lowest = max(int(low), 0x0300) if low != ssl.TLSVersion.MINIMUM_SUPPORTED else 0x0300
        self.highest = TLS13 if high == ssl.TLSVersion.MAXIMUM_SUPPORTED else int(high)
        listed = context.get_ciphers()
        self.suites13 = frozenset(c["id"] & 0xFFFF for c in listed if c["protocol"] == "TLSv1.3")
        self.suites12 = frozenset(
            c["id"] & 0xFFFF
            for c in listed
            if c["protocol"] == "TLSv1.2" and _negotiates(context, c["name"])
        )

    def refusal(self, hello: ClientHello) -> Refusal | None:
        common = {v for v in hello.versions if self.lowest <= v <= self.highest}
        if not common:
            known = sorted(v for v in hello.versions if v in NAMES)
            needs = f"this listener needs {NAMES.get(self.lowest, hex(self.lowest))} or later"
            if known and known[-1] < self.lowest:
                reason = f"client offers at most {NAMES[known[-1]]}; {needs}"
            else:
                reason = f"client offers no TLS version this listener speaks; {needs}"
            return Refusal(_alert(hello.record_version, PROTOCOL_VERSION), reason)
        usable = (self.suites13 if TLS13 in common else frozenset()) | (
            self.suites12 if TLS12 in common else frozenset()
        )
        if not hello.suites & usable:
            reason = "no cipher suite in common (we offer ECDHE with AES-GCM or ChaCha20)"
            return Refusal(_alert(hello.record_version, HANDSHAKE_FAILURE), reason)
        return None


def _alert(record_version: int, description: int) -> bytes:
    version = min(max(record_version, 0x0301), TLS12)  # TLS 1.3 records say 1.2
    return struct.pack(">BHHBB", ALERT, version, 2, 2, description)  # level 2: fatal


def _negotiates(context: ssl.SSLContext, suite: str) -> bool:
    """Whether *context* completes a TLS 1.2 handshake with *suite* (in memory)."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    client.minimum_version = client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ciphers(suite)
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    ends = (client.wrap_bio(c_in, c_out), context.wrap_bio(s_in, s_out, server_side=True))
    for _ in range(8):  # a TLS 1.2 handshake is two round trips
        done = 0
        for end in ends:
            try:
                end.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                return False
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if done == 2:
            return True
    return False


async def peek(sock: socket.socket) -> bytes:
    """What the client sent first, left unread for the TLS handshake: waits until the
    socket is readable, then looks again briefly while a ClientHello is incomplete."""
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(sock.fileno(), ready)
    try:
        await readable
    finally:
        loop.remove_reader(sock.fileno())
    data = b""
    for _ in range(PEEK_TRIES):
        try:
            data = sock.recv(PEEK_MAX, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            data = b""
        except OSError:
            return b""
        if not data or parse(data) is not None or not _may_grow(data):
            return data
        await asyncio.sleep(PEEK_AGAIN)
    return data


def _may_grow(data: bytes) -> bool:
    """Whether more bytes could still make *data* a ClientHello."""
    return data[0] == HANDSHAKE and len(data) < PEEK_MAX


async def screen(sock: socket.socket, gate: HelloGate, timeout: float) -> float:
    """Look at what the client on *sock* sent first, within *timeout* seconds, and
    return the seconds left of it for the handshake.  When the handshake cannot work,
    send the alert and raise HelloRefused; TimeoutError when nothing came in time."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(timeout):
        data = await peek(sock)
    hello = parse(data)
    refusal = gate.refusal(hello) if hello is not None else None
    if refusal is not None:
        dataclasses.replace(refusal, seen=len(data)).send(sock)
        raise HelloRefused(refusal.reason)
    return max(timeout - (loop.time() - started), 0.1)
