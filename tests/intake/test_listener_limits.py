"""Listener limits and security regressions: smuggling, STARTTLS injection, caps,
timeouts, spool failures and shutdown.  In-process relay, real loopback sockets."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from relay.errors import SpoolError, SpoolFullError
from relay.intake.session import Phase
from relay.queue.envelope import QueueEnvelope
from relay.queue.spool import Spool
from tests.fixtures.intake import IntakeFactory
from tests.fixtures.rawsmtp import (
    SMUGGLING_VARIANTS,
    RawSMTP,
    replies_until_quit,
    session,
    smuggling_payload,
)

HOST = "127.0.0.1"


def read_replies(raw: RawSMTP, count: int) -> list[tuple[int, str]]:
    return [raw.reply() for _ in range(count)]


@pytest.mark.parametrize("variant", SMUGGLING_VARIANTS, ids=repr)
async def test_smuggling_yields_one_message(intake: IntakeFactory, variant: bytes) -> None:
    h = await intake()

    def run() -> list[tuple[int, str]]:
        with session(HOST, h.starttls_port, h.client_context()) as raw:
            raw.send(smuggling_payload(variant))  # one write: everything pipelined
            return replies_until_quit(raw)

    replies = await asyncio.to_thread(run)
    queued = [text for code, text in replies if text.startswith("2.0.0 Ok: queued")]
    assert len(queued) == 1, replies
    assert (550, "5.6.0 Bare CR, bare LF or NUL in message data; use CRLF line endings") in replies
    (qid,) = h.spool.ids()
    env = h.spool.load(qid)
    assert [r.address for r in env.recipients] == ["second@b.test"]
    assert b"smuggled" not in h.spool.read_data(qid)


@pytest.mark.parametrize("inject", [b"EHLO evil.test\r\n", b"MAIL FROM:<x@y.test>\r\n"])
async def test_starttls_injection_discarded(intake: IntakeFactory, inject: bytes) -> None:
    """Commands pipelined with STARTTLS in the same packet are never executed (RFC 3207 6)."""
    h = await intake()

    def run() -> tuple[bytes, tuple[int, str]]:
        with RawSMTP(HOST, h.starttls_port) as raw:
            raw.greet()
            raw.cmd("EHLO c.test")
            raw.send(b"STARTTLS\r\n" + inject)
            assert raw.reply()[0] == 220
            raw.sock = h.client_context().wrap_socket(raw.sock, server_hostname="localhost")
            leftover = raw.pending(0.5)  # a reply to the injected command would show here
            return leftover, raw.cmd("MAIL FROM:<a@b.test>")

    leftover, mail = await asyncio.to_thread(run)
    assert leftover == b""
    assert mail == (503, "5.5.1 Error: send EHLO first")  # injected EHLO was not run either


async def test_bare_lf_rejected(intake: IntakeFactory) -> None:
    h = await intake()

    def run() -> list[tuple[int, str]]:
        with session(HOST, h.starttls_port, h.client_context()) as raw:
            raw.send(b"MAIL FROM:<a@a.test>\r\nRCPT TO:<b@b.test>\r\nDATA\r\n")
            raw.send(b"Subject: x\r\n\r\nline one\nline two\r\n.\r\nNOOP\r\n")
            return read_replies(raw, 5)

    replies = await asyncio.to_thread(run)
    assert replies[3][0] == 550 and replies[3][1].startswith("5.6.0")
    assert replies[4][0] == 250  # the session goes on
    assert h.spool.ids() == []


async def test_too_many_recipients_keeps_accepted(intake: IntakeFactory) -> None:
    h = await intake(limits={"max_recipients": 2})

    def run() -> list[tuple[int, str]]:
        with session(HOST, h.starttls_port, h.client_context()) as raw:
            raw.send(b"MAIL FROM:<a@a.test>\r\n")
            raw.send(b"RCPT TO:<1@b.test>\r\nRCPT TO:<2@b.test>\r\nRCPT TO:<3@b.test>\r\n")
            raw.send(b"DATA\r\nSubject: x\r\n\r\nx\r\n.\r\n")
            return read_replies(raw, 6)

    replies = await asyncio.to_thread(run)
    assert [c for c, _ in replies] == [250, 250, 250, 452, 354, 250]
    assert replies[3][1] == "4.5.3 Too many recipients"
    env = h.spool.load(h.spool.ids()[0])
    assert [r.address for r in env.recipients] == ["1@b.test", "2@b.test"]


async def test_oversize_data_is_552(intake: IntakeFactory) -> None:
    h = await intake(limits={"max_message_size": 1000})

    def run() -> list[tuple[int, str]]:
        with session(HOST, h.starttls_port, h.client_context()) as raw:
            assert "SIZE 1000" in raw.cmd("EHLO c.test")[1]
            raw.send(b"MAIL FROM:<a@a.test>\r\nRCPT TO:<b@b.test>\r\nDATA\r\n")
            raw.send(b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 0)
            raw.send((b"y" * 78 + b"\r\n") * 30 + b".\r\nNOOP\r\n")
            return read_replies(raw, 5)

    replies = await asyncio.to_thread(run)
    assert replies[3] == (552, "5.3.4 Message too big for system")
    assert replies[4][0] == 250 and h.spool.ids() == []


async def test_connection_cap_per_ip(intake: IntakeFactory) -> None:
    """Over the per-IP cap a STARTTLS client gets 421 4.7.0; an implicit-TLS client is
    closed at once, before any handshake (a 421 would need one); the caps are shared."""
    h = await intake(limits={"max_connections_per_ip": 1, "max_connections": 5})

    def run() -> tuple[tuple[int, str], bool, int]:
        with RawSMTP(HOST, h.starttls_port) as first:
            first.greet()
            with RawSMTP(HOST, h.starttls_port) as second:
                refused, closed = second.greet(), second.is_closed()
            with pytest.raises((ssl.SSLError, ConnectionError)):  # no ServerHello, ever
                RawSMTP(HOST, h.implicit_port, implicit=h.client_context()).close()
            first.cmd("QUIT")
        for _ in range(50):  # bounded
            if h.gate.connections == 0:
                break
            time.sleep(0.05)
        with RawSMTP(HOST, h.starttls_port) as third:
            return refused, closed, third.greet()[0]

    refused, closed, later = await asyncio.to_thread(run)
    assert refused == (421, "4.7.0 Too many connections, try again later") and closed
    assert later == 220


async def test_implicit_tls_counts_from_accept_with_a_short_handshake_timeout(
    intake: IntakeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A connection to the implicit-TLS port holds its slot from accept, before any
    handshake; one that never sends a ClientHello is closed at the handshake timeout
    (here the command timeout, 0.5 s, as it is shorter) and the slot is free again."""
    h = await intake(limits={"max_connections_per_ip": 1, "command_timeout": 0.5})

    def run() -> tuple[int, tuple[int, str], bytes, float]:
        silent = socket.create_connection((HOST, h.implicit_port), timeout=5)
        for _ in range(50):  # bounded: the accept is seen within moments
            if h.gate.connections == 1:
                break
            time.sleep(0.02)
        held = h.gate.connections
        with RawSMTP(HOST, h.starttls_port) as other:
            refused = other.greet()
        started = time.monotonic()
        eof = silent.recv(100)  # the relay gives up on the handshake
        waited = time.monotonic() - started
        silent.close()
        return held, refused, eof, waited

    held, refused, eof, waited = await asyncio.to_thread(run)
    assert held == 1 and refused[0] == 421
    assert eof == b"" and waited < 5
    for _ in range(50):
        if h.gate.connections == 0:
            break
        await asyncio.sleep(0.02)
    assert h.gate.connections == 0
    assert any("tls_handshake_failed" in r.getMessage() for r in caplog.records)


async def test_failed_handshakes_are_logged_throttled(
    intake: IntakeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A scan of failed handshakes (here 15 garbage ClientHellos) logs at most a burst
    of ten lines per minute and listener, each with OpenSSL's reason."""
    h = await intake()

    def run() -> None:
        for _ in range(15):
            with socket.create_connection((HOST, h.implicit_port), timeout=5) as sock:
                sock.sendall(b"\x16\x03\x01\x00\x05hello, not TLS\r\n")
                sock.recv(100)  # closed by the relay

    await asyncio.to_thread(run)
    await asyncio.sleep(0.2)
    lines = [r.getMessage() for r in caplog.records if "tls_handshake_failed" in r.getMessage()]
    assert 1 <= len(lines) <= 10, lines
    assert all("error=" in line and "listener=" in line for line in lines)


async def test_a_session_the_relay_closed_frees_its_slot_at_once(intake: IntakeFactory) -> None:
    """After 221 the slot is free, though the client has not answered close_notify
    (nor closed its socket): a slow client cannot keep slots by never finishing."""
    h = await intake(limits={"max_connections_per_ip": 1})

    def run() -> int:
        raw = RawSMTP(HOST, h.implicit_port, implicit=h.client_context())
        try:
            raw.greet()
            assert raw.cmd("QUIT")[0] == 221
            for _ in range(50):  # bounded; the client socket stays open meanwhile
                if h.gate.connections == 0:
                    break
                time.sleep(0.02)
            return h.gate.connections
        finally:
            raw.sock.close()

    assert await asyncio.to_thread(run) == 0


async def test_connect_and_close_frees_the_slot(intake: IntakeFactory) -> None:
    """A client that closes before the greeting must not hold a slot until the timeout."""
    h = await intake(limits={"max_connections_per_ip": 1, "max_connections": 5})

    def run() -> int:
        for _ in range(3):
            socket.create_connection((HOST, h.starttls_port), timeout=5).close()
        time.sleep(0.2)
        for _ in range(100):
            if h.gate.connections == 0:
                break
            time.sleep(0.02)
        with RawSMTP(HOST, h.starttls_port) as raw:
            return raw.greet()[0]

    assert await asyncio.to_thread(run) == 220


async def test_max_commands(intake: IntakeFactory) -> None:
    h = await intake(limits={"max_commands": 5})

    def run() -> list[tuple[int, str]]:
        with RawSMTP(HOST, h.starttls_port) as raw:
            raw.greet()
            raw.send(b"NOOP\r\n" * 6)
            out = read_replies(raw, 6)
            assert raw.is_closed()
            return out

    replies = await asyncio.to_thread(run)
    assert [c for c, _ in replies] == [250] * 5 + [421]


async def test_command_timeout(intake: IntakeFactory) -> None:
    h = await intake(limits={"command_timeout": 0.5})

    def run() -> tuple[int, str]:
        with RawSMTP(HOST, h.starttls_port) as raw:
            raw.greet()
            return raw.reply()  # say nothing; the server gives up

    assert await asyncio.to_thread(run) == (421, "4.4.2 Timeout, closing connection")


async def test_data_timeout_stores_nothing(intake: IntakeFactory) -> None:
    h = await intake(limits={"command_timeout": 30, "data_timeout": 0.5})

    def run() -> tuple[int, str]:
        with session(HOST, h.starttls_port, h.client_context()) as raw:
            raw.send(b"MAIL FROM:<a@a.test>\r\nRCPT TO:<b@b.test>\r\nDATA\r\n")
            read_replies(raw, 3)
            raw.send(b"Subject: slow\r\n\r\npart")
            return raw.reply()

    assert (await asyncio.to_thread(run))[0] == 421
    assert h.spool.ids() == []


class FailingSpool(Spool):
    def __init__(self, root: Path, error: Exception) -> None:
        super().__init__(root)
        self.error = error

    def store(self, envelope: QueueEnvelope, data: object) -> None:
        raise self.error

    def store_soon(self, envelope: QueueEnvelope, data: bytes) -> asyncio.Future[None]:
        failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        failed.set_exception(self.error)
        return failed


@pytest.mark.parametrize(
    ("error", "reply"),
    [
        (SpoolFullError("ENOSPC"), (452, "4.3.1 Insufficient system storage")),
        (SpoolError("EIO"), (451, "4.3.0 Local error in processing, try again later")),
    ],
)
async def test_spool_failure_replies(
    intake: IntakeFactory,
    tmp_path: Path,
    error: Exception,
    reply: tuple[int, str],
) -> None:
    h = await intake(spool=FailingSpool(tmp_path / "failing", error))

    def run() -> tuple[int, str]:
        with session(HOST, h.starttls_port, h.client_context()) as raw:
            raw.send(b"MAIL FROM:<a@a.test>\r\nRCPT TO:<b@b.test>\r\nDATA\r\nx\r\n.\r\n")
            return read_replies(raw, 4)[3]

    assert await asyncio.to_thread(run) == reply
    assert h.queued == []


async def test_stop_during_data_gets_421_and_stores_nothing(intake: IntakeFactory) -> None:
    h = await intake()
    in_data = threading.Event()

    def run() -> tuple[int, str]:
        with session(HOST, h.starttls_port, h.client_context()) as raw:
            raw.send(b"MAIL FROM:<a@a.test>\r\nRCPT TO:<b@b.test>\r\nDATA\r\n")
            read_replies(raw, 3)
            raw.send(b"Subject: half\r\n\r\nhalf a message\r\n")
            in_data.set()
            return raw.reply()

    client = asyncio.create_task(asyncio.to_thread(run))
    await asyncio.to_thread(in_data.wait, 10)
    await asyncio.sleep(0.2)
    await h.stop()
    assert (await client)[0] == 421
    assert h.spool.ids() == []


class SlowSpool(Spool):
    def store(self, envelope: QueueEnvelope, data: object) -> None:
        time.sleep(0.5)
        super().store(envelope, data)  # type: ignore[arg-type]


async def test_stop_while_storing_finishes_the_message(
    intake: IntakeFactory, tmp_path: Path
) -> None:
    h = await intake(spool=SlowSpool(tmp_path / "slow"))

    def run() -> list[tuple[int, str]]:
        with session(HOST, h.starttls_port, h.client_context()) as raw:
            raw.send(b"MAIL FROM:<a@a.test>\r\nRCPT TO:<b@b.test>\r\nDATA\r\nx\r\n.\r\n")
            return read_replies(raw, 5)

    client = asyncio.create_task(asyncio.to_thread(run))
    for _ in range(200):
        if any(s.phase is Phase.STORING for s in h.starttls.sessions):
            break
        await asyncio.sleep(0.01)
    await h.stop()
    replies = await client
    assert replies[3][0] == 250 and replies[4][0] == 421
    assert h.spool.ids() == [replies[3][1].rsplit(" ", 1)[1]]


async def test_activity_moves_the_command_timeout(intake: IntakeFactory) -> None:
    """The timer is re-armed lazily (session._reset_timeout): a client that keeps
    talking is never cut off, one that goes quiet gets 421 one timeout later."""
    h = await intake(limits={"command_timeout": 0.6})

    def run() -> tuple[list[int], tuple[int, str], float]:
        with session(HOST, h.starttls_port, h.client_context()) as raw:
            codes = []
            for _ in range(4):  # 1.2 s of activity, twice the timeout
                time.sleep(0.3)
                codes.append(raw.cmd("NOOP")[0])
            quiet = time.monotonic()
            reply = raw.reply()
            return codes, reply, time.monotonic() - quiet

    codes, reply, waited = await asyncio.to_thread(run)
    assert codes == [250] * 4
    assert reply[0] == 421 and "4.4.2" in reply[1]
    assert 0.4 < waited < 3.0


async def test_command_loop_errors(intake: IntakeFactory) -> None:
    """The command loop's own replies (session._handle_client, as aiosmtpd's)."""
    h = await intake()

    def run() -> list[tuple[int, str]]:
        with session(HOST, h.starttls_port, h.client_context()) as raw:
            got = [raw.cmd(b"")]  # empty line
            got.append(raw.cmd(b"\xffOO bar"))  # verb not ASCII
            got.append(raw.cmd("NOOP " + "x" * 600))  # over 512 octets
            got.append(raw.cmd(b"NOOP " + b"y" * 5000))  # over the stream's line limit
            got.append(raw.cmd("NOOP"))  # still in step after all that
            # The empty line and the non-ASCII verb were bogus commands too: the fifth
            # bogus line (FOO2) ends the session.
            got += [raw.cmd(f"FOO{n}") for n in range(3)]
            assert raw.is_closed()
            return got

    got = await asyncio.to_thread(run)
    assert got[0] == (500, "5.5.2 Error: bad syntax")
    assert got[1] == (500, "5.5.2 Error: bad syntax")
    assert got[2] == (500, "5.5.2 Command line too long")
    assert got[3] == (500, "5.5.2 Command line too long")
    assert got[4][0] == 250
    assert got[5:7] == [(500, f'Error: command "FOO{n}" not recognized') for n in range(2)]
    assert got[7] == (502, "5.5.1 Too many unrecognized commands, goodbye")


async def test_empty_lines_and_unknown_verbs_count_toward_max_commands(
    intake: IntakeFactory,
) -> None:
    """A client must not hold its slot forever with lines that are no commands."""
    h = await intake(limits={"max_commands": 3})

    def run() -> list[tuple[int, str]]:
        with RawSMTP(HOST, h.starttls_port) as raw:
            raw.greet()
            raw.send(b"\r\nXYZZY\r\n\r\nNOOP\r\n")
            out = read_replies(raw, 4)
            assert raw.is_closed()
            return out

    replies = await asyncio.to_thread(run)
    assert [c for c, _ in replies] == [500, 500, 500, 421]


async def test_connect_and_close_on_the_implicit_port_frees_the_slot(
    intake: IntakeFactory,
) -> None:
    h = await intake(limits={"max_connections_per_ip": 1, "max_connections": 5})

    def run() -> int:
        for _ in range(3):
            socket.create_connection((HOST, h.implicit_port), timeout=5).close()
        for _ in range(100):  # bounded: 2 s
            if h.gate.connections == 0:
                break
            time.sleep(0.02)
        return h.gate.connections

    assert await asyncio.to_thread(run) == 0
