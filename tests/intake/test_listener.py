"""Listener + session integration tests: real sockets on loopback, in-process relay.

TLS gating, AUTH, relay control, envelope validation and what reaches the spool.
Limits, smuggling and injection are in test_listener_limits.py.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import ipaddress
import smtplib
import socket
import ssl
import threading

import pytest

from relay.queue.envelope import RcptState
from tests.fixtures.intake import IntakeFactory
from tests.fixtures.rawsmtp import RawSMTP, session

HOST = "127.0.0.1"
MSG = b"Subject: hi\r\n\r\nhello\r\n"


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def send_one(raw: RawSMTP, rcpts: list[str], data: bytes = MSG, sender: str = "app@a.test") -> int:
    assert raw.cmd(f"MAIL FROM:<{sender}>")[0] == 250
    for rcpt in rcpts:
        assert raw.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
    assert raw.cmd("DATA")[0] == 354
    raw.send(data + b".\r\n")
    return raw.reply()[0]


async def test_starttls_accepts_and_spools(intake: IntakeFactory) -> None:
    h = await intake()

    def run() -> tuple[int, str]:
        with session(HOST, h.starttls_port, h.client_context()) as raw:
            raw.cmd("MAIL FROM:<app@a.test> BODY=8BITMIME SIZE=100")
            raw.cmd("RCPT TO:<Bob@B.Test>")
            raw.cmd("DATA")
            raw.send(MSG + b".\r\n")
            return raw.reply()

    code, text = await asyncio.to_thread(run)
    assert code == 250 and text.startswith("2.0.0 Ok: queued as ")
    qid = text.rsplit(" ", 1)[1]
    assert h.queued == [qid] and h.spool.ids() == [qid]
    env = h.spool.load(qid)
    assert env.sender == "app@a.test"
    assert env.mail_options == ["BODY=8BITMIME", "SIZE=100"]
    assert [(r.address, r.state) for r in env.recipients] == [("Bob@b.test", RcptState.QUEUED)]
    assert env.client is not None and env.client.ip == "127.0.0.1"
    assert env.client.helo == "client.test" and env.client.user is None
    assert env.client.tls_version in ("TLSv1.2", "TLSv1.3") and env.client.tls_cipher
    data = h.spool.read_data(qid)
    assert env.size == len(data)
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    assert head.startswith("Received: from client.test (unknown [127.0.0.1])")
    assert f"(using {env.client.tls_version} with cipher {env.client.tls_cipher}" in head
    assert f"with ESMTPS id {qid}" in head and "for <Bob@b.test>;" in head
    assert f"Message-ID: <{qid}@relay.test>" in head and "\r\nDate: " in head
    assert data.endswith(b"\r\n\r\nhello\r\n")


@pytest.mark.parametrize(
    "command",
    [
        "MAIL FROM:<a@b.test>",
        "RCPT TO:<a@b.test>",
        "DATA",
        "AUTH PLAIN AGFsaWNlAHB3",
        "HELP",
        "VRFY a@b.test",
    ],
)
async def test_commands_refused_before_starttls(intake: IntakeFactory, command: str) -> None:
    h = await intake(users={"alice": "pw"})

    def run() -> list[tuple[int, str]]:
        with RawSMTP(HOST, h.starttls_port) as raw:
            raw.greet()
            ehlo = raw.cmd("EHLO c.test")
            assert "STARTTLS" in ehlo[1] and "AUTH" not in ehlo[1]  # RFC 4954: AUTH only in TLS
            return [raw.cmd(command), raw.cmd("HELO c.test"), raw.cmd("RSET"), raw.cmd("NOOP")]

    refused, *allowed = await asyncio.to_thread(run)
    assert refused == (530, "5.7.0 Must issue a STARTTLS command first")
    assert [code for code, _ in allowed] == [250, 250, 250]


@pytest.mark.parametrize("implicit", [False, True])
async def test_second_starttls_is_503(intake: IntakeFactory, implicit: bool) -> None:
    h = await intake()
    port = h.implicit_port if implicit else h.starttls_port

    def run() -> tuple[int, str]:
        with session(HOST, port, h.client_context(), implicit=implicit) as raw:
            ehlo = raw.cmd("EHLO again.test")
            assert "STARTTLS" not in ehlo[1]
            return raw.cmd("STARTTLS")

    assert await asyncio.to_thread(run) == (503, "5.5.1 TLS already active")


@pytest.mark.parametrize("implicit", [False, True])
async def test_auth_plain_inside_tls_relays(intake: IntakeFactory, implicit: bool) -> None:
    h = await intake(networks=["10.99.0.0/16"], users={"alice": "s3cret"})
    port = h.implicit_port if implicit else h.starttls_port

    def run() -> list[int]:
        with session(HOST, port, h.client_context(), implicit=implicit) as raw:
            assert "AUTH LOGIN PLAIN" in raw.cmd("EHLO c.test")[1]
            codes = [raw.cmd("MAIL FROM:<app@a.test>")[0], raw.cmd("RCPT TO:<x@b.test>")[0]]
            raw.cmd("RSET")
            codes.append(raw.cmd(f"AUTH PLAIN {plain('alice', 's3cret')}")[0])
            codes.append(send_one(raw, ["x@b.test"]))
            return codes

    assert await asyncio.to_thread(run) == [250, 530, 235, 250]
    env = h.spool.load(h.spool.ids()[0])
    assert env.client is not None and env.client.user == "alice"
    assert b"with ESMTPSA id" in h.spool.read_data(env.id)


async def test_auth_login_and_smtplib(intake: IntakeFactory) -> None:
    h = await intake(networks=[], users={"bob": "passw0rd"})

    def run() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP_SSL(HOST, h.implicit_port, context=h.client_context()) as client:
            client.ehlo("c.test")
            client.user, client.password = "bob", "passw0rd"
            result = client.auth("LOGIN", client.auth_login)
            return client.sendmail("a@a.test", ["r@b.test"], MSG) or {"ok": result}

    assert (await asyncio.to_thread(run))["ok"][0] == 235
    assert len(h.spool.ids()) == 1


async def test_auth_failures_are_slowed_then_refused(intake: IntakeFactory) -> None:
    h = await intake(networks=[], users={"alice": "right"}, limits={"max_auth_failures": 2})

    def run() -> list[tuple[int, str]]:
        out = []
        with session(HOST, h.implicit_port, h.client_context(), implicit=True) as raw:
            out.append(raw.cmd(f"AUTH PLAIN {plain('alice', 'wrong')}"))
            out.append(raw.cmd(f"AUTH PLAIN {plain('nobody', 'wrong')}"))
            out.append(raw.cmd(f"AUTH PLAIN {plain('alice', 'right')}"))
            assert raw.is_closed()
        return out

    first, second, blocked = await asyncio.to_thread(run)
    assert first == second == (535, "5.7.8 Authentication credentials invalid")
    assert blocked[0] == 421 and blocked[1].startswith("4.7.0")


async def test_auth_failure_limit_holds_under_parallel_connections(intake: IntakeFactory) -> None:
    """Issue 10, item 4: checks still running count against the limit, so eight
    connections from one address guessing at once get at most max_auth_failures 535s."""
    h = await intake(networks=[], users={"alice": "right"}, limits={"max_auth_failures": 2})
    barrier = threading.Barrier(8, timeout=20)

    def guess(n: int) -> int:
        with session(HOST, h.implicit_port, h.client_context(), implicit=True) as raw:
            raw.cmd("EHLO c.test")
            barrier.wait()  # all eight send AUTH at the same moment
            return raw.cmd(f"AUTH PLAIN {plain('alice', f'wrong{n}')}")[0]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(await asyncio.to_thread(lambda: list(pool.map(guess, range(8)))))
    assert codes.count(535) <= 2, codes
    assert codes.count(421) >= 6, codes
    assert h.gate.auth_failures(ipaddress.ip_address(HOST)) <= 2


async def test_an_over_long_auth_response_gets_500(intake: IntakeFactory) -> None:
    h = await intake(networks=[], users={"alice": "right"})

    def run() -> tuple[tuple[int, str], tuple[int, str]]:
        with session(HOST, h.implicit_port, h.client_context(), implicit=True) as raw:
            assert raw.cmd("AUTH LOGIN")[0] == 334
            too_long = raw.cmd("QUFB" * 5000)  # a 20 000-character "user name"
            return too_long, raw.cmd("NOOP")

    too_long, after = await asyncio.to_thread(run)
    assert too_long[0] == 500 and too_long[1].startswith("5.5.6"), too_long
    assert after[0] == 250  # the session goes on


async def test_auth_not_offered_without_users(intake: IntakeFactory) -> None:
    h = await intake(networks=[])

    def run() -> list[tuple[int, str]]:
        with session(HOST, h.implicit_port, h.client_context(), implicit=True) as raw:
            assert "AUTH" not in raw.cmd("EHLO c.test")[1]
            return [
                raw.cmd("AUTH PLAIN AGEAYg=="),
                raw.cmd("MAIL FROM:<>"),
                raw.cmd("RCPT TO:<a@b.test>"),
            ]

    auth, mail, rcpt = await asyncio.to_thread(run)
    assert auth[0] == 502 and mail[0] == 250
    assert rcpt == (554, "5.7.1 Relay access denied")  # default deny: nobody may relay


async def test_relay_checked_per_transaction(intake: IntakeFactory) -> None:
    """Networks allow unauthenticated relay, each RCPT of each transaction is checked."""
    h = await intake(networks=["127.0.0.1/32"])

    def run() -> list[int]:
        with session(HOST, h.starttls_port, h.client_context()) as raw:
            return [send_one(raw, ["a@b.test"]), send_one(raw, ["c@d.test", "e@f.test"])]

    assert await asyncio.to_thread(run) == [250, 250]
    assert len(h.spool.ids()) == 2


@pytest.mark.parametrize(
    ("command", "code"),
    [
        ("MAIL FROM:<@a.test,@b.test:u@c.test>", 553),
        ("MAIL FROM:<u%c.test@a.test>", 553),
        ("MAIL FROM:<c.test!u@a.test>", 553),
        ("MAIL FROM:<nodomain>", 553),
        ("MAIL FROM:u@a.test", 501),
        ("MAIL FROM:<jörg@a.test>", 553),
        ("MAIL FROM:<a@b.test> FOO=1", 555),
        ("MAIL FROM:<a@b.test> SIZE=99999999999", 552),
        ("MAIL FROM:<" + "x" * 65 + "@a.test>", 553),
    ],
)
async def test_bad_senders(intake: IntakeFactory, command: str, code: int) -> None:
    h = await intake()

    def run() -> tuple[int, str]:
        with session(HOST, h.starttls_port, h.client_context()) as raw:
            return raw.cmd(command)

    assert (await asyncio.to_thread(run))[0] == code


@pytest.mark.parametrize(
    ("rcpt", "code"),
    [
        ("<>", 501),
        ("<u@[127.0.0.1]>", 553),
        ("<@x.test:u@y.test>", 553),
        ("<postmaster>", 553),
        ("<a@b.test> XFOO=1", 555),
        ("<a%b@c.test>", 553),
    ],
)
async def test_bad_recipients(intake: IntakeFactory, rcpt: str, code: int) -> None:
    h = await intake()

    def run() -> tuple[int, str]:
        with session(HOST, h.starttls_port, h.client_context()) as raw:
            assert raw.cmd("MAIL FROM:<>")[0] == 250
            return raw.cmd(f"RCPT TO:{rcpt}")

    assert (await asyncio.to_thread(run))[0] == code


async def test_smtputf8_only_with_parameter(intake: IntakeFactory) -> None:
    h = await intake()

    def run() -> list[int]:
        with session(HOST, h.starttls_port, h.client_context()) as raw:
            codes = [raw.cmd("MAIL FROM:<jörg@a.test> SMTPUTF8")[0]]
            codes.append(raw.cmd("RCPT TO:<märta@b.test>")[0])
            return codes

    assert await asyncio.to_thread(run) == [250, 250]


async def test_null_sender_and_message_id_kept(intake: IntakeFactory) -> None:
    h = await intake()
    msg = b"Message-ID: <own@x.test>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nbody\r\n"

    def run() -> int:
        with session(HOST, h.starttls_port, h.client_context()) as raw:
            return send_one(raw, ["a@b.test", "c@d.test"], msg, sender="")

    assert await asyncio.to_thread(run) == 250
    qid = h.spool.ids()[0]
    data = h.spool.read_data(qid)
    assert data.count(b"Message-ID:") == 1 and data.count(b"\r\nDate:") == 1
    assert b"for <" not in data  # two recipients: no "for" clause (Bcc privacy)
    assert h.spool.load(qid).sender == ""


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no ::1")
@pytest.mark.parametrize(("networks", "code"), [(["::1/128"], 250), (["127.0.0.0/8"], 554)])
async def test_ipv6_client_and_networks(
    intake: IntakeFactory, networks: list[str], code: int
) -> None:
    h = await intake(networks=networks, host="::1")

    def run() -> tuple[int, str]:
        with session("::1", h.starttls_port, h.client_context()) as raw:
            raw.cmd("MAIL FROM:<a@a.test>")
            return raw.cmd("RCPT TO:<b@b.test>")

    assert (await asyncio.to_thread(run))[0] == code


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_tls_below_1_2_refused(intake: IntakeFactory) -> None:
    h = await intake()
    ctx = h.client_context()
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")

    def run() -> None:
        with RawSMTP(HOST, h.implicit_port, implicit=ctx):
            pass

    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.to_thread(run)


async def test_pipelined_group_is_answered_in_one_record(intake: IntakeFactory) -> None:
    """RFC 2920: MAIL/RCPT replies wait for the rest of a pipelined group and leave
    together (one TLS record: one recv gets all four); a lone command is answered
    at once, and a rejected RCPT in the group keeps its place."""
    h = await intake()

    def run() -> tuple[bytes, tuple[int, str], tuple[int, str]]:
        with session(HOST, h.starttls_port, h.client_context()) as raw:
            raw.send(
                b"MAIL FROM:<app@a.test>\r\nRCPT TO:<b@b.test>\r\nRCPT TO:<bad address>\r\nDATA\r\n"
            )
            first = raw.sock.recv(65536)
            raw.send(MSG + b".\r\n")
            stored = raw.reply()
            alone = raw.cmd("MAIL FROM:<app@a.test>")  # nothing buffered after it
            return first, stored, alone

    first, stored, alone = await asyncio.to_thread(run)
    codes = [line[:3] for line in first.split(b"\r\n") if line]
    assert codes == [b"250", b"250", b"553", b"354"]
    assert stored[0] == 250 and alone[0] == 250


async def test_duplicate_recipients_are_accepted_and_kept_once(intake: IntakeFactory) -> None:
    """Issue 15: a recipient given twice (in any domain spelling) is delivered once,
    as Postfix's duplicate filter does; both RCPTs get 250."""
    h = await intake()

    def run() -> int:
        with session(HOST, h.starttls_port, h.client_context()) as raw:
            return send_one(raw, ["a@x.test", "b@x.test", "a@X.Test", "a@x.test"])

    assert await asyncio.to_thread(run) == 250
    env = h.spool.load(h.spool.ids()[0])
    assert [r.address for r in env.recipients] == ["a@x.test", "b@x.test"]


async def test_ehlo_advertises_enhanced_status_codes(intake: IntakeFactory) -> None:
    """RFC 2034: every reply carries an enhanced code, so EHLO says so."""
    h = await intake()

    def run() -> str:
        with session(HOST, h.starttls_port, h.client_context()) as raw:
            return raw.cmd("EHLO c.test")[1]

    assert "ENHANCEDSTATUSCODES" in (await asyncio.to_thread(run)).split("\n")


async def test_requiretls_is_offered_inside_tls_and_kept_in_the_envelope(
    intake: IntakeFactory,
) -> None:
    """RFC 8689 4.1: REQUIRETLS in EHLO only inside TLS; MAIL FROM:<a> REQUIRETLS is
    accepted and kept for delivery; the parameter takes no value."""
    h = await intake()

    def run() -> tuple[str, str, int, int]:
        raw = RawSMTP(HOST, h.starttls_port)
        with raw:
            raw.greet()
            before = raw.cmd("EHLO c.test")[1]
            raw.starttls(h.client_context())
            inside = raw.cmd("EHLO c.test")[1]
            bad = raw.cmd("MAIL FROM:<app@a.test> REQUIRETLS=yes")[0]
            good = raw.cmd("MAIL FROM:<app@a.test> REQUIRETLS")[0]
            assert raw.cmd("RCPT TO:<b@b.test>")[0] == 250
            assert raw.cmd("DATA")[0] == 354
            raw.send(MSG + b".\r\n")
            assert raw.reply()[0] == 250
        return before, inside, bad, good

    before, inside, bad, good = await asyncio.to_thread(run)
    assert "REQUIRETLS" not in before.split("\n") and "REQUIRETLS" in inside.split("\n")
    assert (bad, good) == (501, 250)
    env = h.spool.load(h.spool.ids()[0])
    assert "REQUIRETLS" in env.mail_options
