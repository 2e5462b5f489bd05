"""BDAT (RFC 3030 CHUNKING) toward an MX that offers it: the stored octets go as they
are, a small message in the same write as MAIL and RCPT (one round trip), a large one
after the RCPT replies; every reply means what it means with DATA.  Against a
scripted peer that records the commands and chunks (the real Postfix and Exim cases
are in test_deliverer, test_streaming and the e2e receiving-MTA matrix)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from aiosmtplib import SMTPReadTimeoutError, SMTPResponse, SMTPServerDisconnected

from relay.app import new_deliverer
from relay.body import Body
from relay.delivery.outcome import Status
from relay.delivery.session import Target
from relay.delivery.transaction import INLINE_MAX
from relay.delivery.txresult import TxResult, inline_replies
from relay.metrics import Metrics
from tests.delivery.test_deliverer import (
    ENVELOPE_REPLIES,
    MESSAGE,
    PEER1,
    PEER2,
    FakeResolver,
    _tls_peer,
    extensions,
    make_cfg,
    policy,
    send,
    send_each,
)
from tests.fixtures.badpeers import SmtpPeer, server_context, start
from tests.fixtures.net import free_port

RESOLVER = {"example.test": [("mx1.example.test", PEER1)]}
DOTS = MESSAGE + b".\r\n..\r\n. .\r\nend\r\n"  # what DATA would stuff: BDAT must not


def chunking(pipelining: bool) -> tuple[str, ...]:
    return (*extensions(pipelining), "CHUNKING")


@pytest.mark.parametrize("pipelining", [True, False])
async def test_a_small_message_goes_as_it_is_in_one_write(
    ca: trustme.CA, ca_file: Path, peers: list, pipelining: bool
) -> None:
    peer = await _tls_peer(peers, ca, extensions=chunking(pipelining))
    d = new_deliverer(
        make_cfg(peer.port, ca_file), policy(), "r.test", FakeResolver(RESOLVER), Metrics()
    )
    outcomes = await send(d, ["a@example.test", "b@example.test"], data=DOTS)
    assert [o.status for o in outcomes] == [Status.DELIVERED] * 2, outcomes[0].reason
    (got,) = peer.messages
    assert got.data == DOTS and got.recipients == ["a@example.test", "b@example.test"]
    assert peer.chunks == [len(DOTS)]
    verbs = peer.verbs(tls=True)
    assert "DATA" not in verbs and f"BDAT {len(DOTS)} LAST" in [c.line for c in peer.commands]
    if pipelining:  # RFC 3030 4.2: MAIL, RCPT, RCPT and BDAT with its data, one write
        assert peer.pipelined[:4] == ["MAIL", "RCPT", "RCPT", "BDAT"]
    else:
        assert "MAIL" not in peer.pipelined and "RCPT" not in peer.pipelined


async def test_a_large_message_waits_for_the_rcpt_replies(
    ca: trustme.CA, ca_file: Path, peers: list, tmp_path: Path
) -> None:
    """Over INLINE_MAX, nothing of the data goes before a recipient is accepted; it goes
    from the spool file as it is, in pieces, as one BDAT LAST chunk."""
    line = b"0123456789 .abcdefghijklmnopqrstuvwxyz\r\n"
    data = MESSAGE + b"." * 10 + b"\r\n" + line * (3 * INLINE_MAX // len(line))
    path = tmp_path / "m"
    path.write_bytes(b"head\n" + data + b"tail")
    body = Body.on_disk(str(path), 5, len(data))
    peer = await _tls_peer(peers, ca, extensions=chunking(True), size=10 * len(data))
    d = new_deliverer(
        make_cfg(peer.port, ca_file), policy(), "r.test", FakeResolver(RESOLVER), Metrics()
    )
    try:
        outcomes = await d.deliver(
            "Q1", "app@src.test", (), "example.test", [("a@example.test", ())], body
        )
    finally:
        await d.close()
    assert [o.status for o in outcomes] == [Status.DELIVERED], outcomes[0].reason
    assert peer.messages[0].data == data and peer.chunks == [len(data)]
    # MAIL and RCPT in one write, which RCPT ended: BDAT waited for their replies.
    assert peer.pipelined[0] == "MAIL" and "RCPT" not in peer.pipelined


@pytest.mark.parametrize(
    ("kw", "expected", "delivered"),
    [
        *ENVELOPE_REPLIES,
        (
            {"rcpt_replies": {"a@example.test": "550 5.1.1 no such user"}},
            [Status.PERMANENT, Status.DELIVERED],
            1,
        ),
        (
            {"rcpt_replies": {f"{r}@example.test": "550 5.1.1 no such user" for r in "ab"}},
            [Status.PERMANENT] * 2,
            0,
        ),
    ],
)
@pytest.mark.parametrize("pipelining", [True, False])
async def test_replies_decide_as_with_data(
    kw: dict,
    expected: list[Status],
    delivered: int,
    ca: trustme.CA,
    ca_file: Path,
    peers: list,
    pipelining: bool,
) -> None:
    """A refused sender or recipients: the BDAT refusal that follows is not what
    decides them.  A refused BDAT decides every accepted recipient."""
    peer = await _tls_peer(peers, ca, extensions=chunking(pipelining), **kw)
    d = new_deliverer(
        make_cfg(peer.port, ca_file), policy(), "r.test", FakeResolver(RESOLVER), Metrics()
    )
    outcomes = await send(d, ["a@example.test", "b@example.test"])
    assert [o.status for o in outcomes] == expected, [o.reason for o in outcomes]
    reply = next(iter(kw.values()))
    code = (reply if isinstance(reply, str) else next(iter(reply.values())))[:3]
    assert f'"{code} ' in outcomes[0].reason, outcomes
    assert len(peer.messages) == delivered
    assert "DATA" not in peer.verbs(tls=True)


@pytest.mark.parametrize("pipelining", [True, False])
async def test_a_pooled_session_carries_bdat_transactions(
    ca: trustme.CA, ca_file: Path, peers: list, pipelining: bool
) -> None:
    """RSET, MAIL, RCPT and BDAT with the data: one write for each reused session's
    message; refused recipients in between leave the session usable."""
    peer = await _tls_peer(
        peers,
        ca,
        extensions=chunking(pipelining),
        rcpt_replies={"r1@example.test": "550 5.1.1 no such user"},
    )
    d = new_deliverer(
        make_cfg(peer.port, ca_file), policy(), "r.test", FakeResolver(RESOLVER), Metrics()
    )
    statuses = await send_each(d, 3, DOTS)
    assert statuses == [Status.DELIVERED, Status.PERMANENT, Status.DELIVERED]
    assert peer.connections == 1
    assert [m.recipients for m in peer.messages] == [["r0@example.test"], ["r2@example.test"]]
    assert all(m.data == DOTS for m in peer.messages)
    if pipelining:
        group = ["MAIL", "RCPT", "BDAT"] + ["RSET", "MAIL", "RCPT", "BDAT"] * 2
        assert peer.pipelined == group


async def test_a_peer_gone_during_bdat_defers_without_trying_the_next_mx(
    ca: trustme.CA, ca_file: Path, peers: list
) -> None:
    """RFC 1047: once the data went, a lost reply may hide a delivery: every recipient
    not refused is deferred (at worst a duplicate later), none goes to another MX now."""
    peer = await _tls_peer(peers, ca, extensions=chunking(True), data_reply="")
    port2 = free_port(PEER2)
    ctx = server_context(ca.issue_cert("mx2.example.test"))
    other = await start(peers, SmtpPeer(PEER2, port2, tls_context=ctx, extensions=chunking(True)))
    both = {"example.test": [("mx1.example.test", PEER1), ("mx2.example.test", PEER2)]}
    cfg = make_cfg(peer.port, ca_file)
    assert other.port == port2
    d = new_deliverer(cfg, policy(), "r.test", FakeResolver(both), Metrics())
    outcomes = await send(d, ["a@example.test", "b@example.test"])
    assert [o.status for o in outcomes] == [Status.TRANSIENT] * 2
    assert all("connection lost during BDAT" in o.reason for o in outcomes), outcomes
    assert peer.connections == 1 and other.connections == 0


async def test_an_unreadable_spool_file_defers_without_new_sessions(
    ca: trustme.CA, ca_file: Path, peers: list, tmp_path: Path
) -> None:
    """A small message on disk whose file ends early: the session is closed before the
    chunk is complete (the MX takes nothing), the message is deferred, and the pooled
    session it used is not mistaken for a dead one (no fresh sessions, no next MX)."""
    peer = await _tls_peer(peers, ca, extensions=chunking(True))
    path = tmp_path / "m"
    path.write_bytes(b"head\n" + DOTS)
    broken = Body.on_disk(str(path), 5, len(DOTS), eight_bit=False)
    path.write_bytes(b"head\n" + DOTS[:20])  # the file ends early now
    d = new_deliverer(
        make_cfg(peer.port, ca_file), policy(), "r.test", FakeResolver(RESOLVER), Metrics()
    )
    try:
        for n, (data, status) in enumerate(((DOTS, Status.DELIVERED), (broken, Status.TRANSIENT))):
            (out,) = await d.deliver(
                f"Q{n}", "app@src.test", (), "example.test", [(f"r{n}@example.test", ())], data
            )
            assert out.status is status, out.reason
    finally:
        await d.close()
    assert "could not be read" in out.reason, out.reason
    assert peer.connections == 1 and len(peer.messages) == 1


# ---- the replies to a group whose data went with it: every combination ----------------


class _Smtp:
    """Stands in for aiosmtplib.SMTP where inline_replies only asks and closes."""

    def __init__(self) -> None:
        self.is_connected = True

    def close(self) -> None:
        self.is_connected = False


def _combinations() -> Iterator[tuple[bool, tuple[int, ...], str]]:
    codes = (250, 421, 451, 503, 550)
    for reset in (False, True):
        lines = reset + 1 + 2 + 1  # [RSET,] MAIL, two RCPTs, BDAT
        for k in range(lines + 1):
            for got in itertools.product(codes, repeat=k):
                ends = ("none",) if k == lines else ("disconnected", "timeout")
                for end in ends + (("desync",) if k == lines else ()):
                    yield reset, got, end


def test_inline_bdat_replies_never_claim_more_than_the_mx_said() -> None:
    """Whatever the MX answered to [RSET,] MAIL, RCPT a, RCPT b, BDAT LAST (whose data
    went in the same write), and however the group ended:
    - every recipient is decided, or the session error sends it on (never dropped);
    - DELIVERED only with 250 to MAIL, to its RCPT and to BDAT;
    - once the data may have been taken (no refusal seen, a reply missing), nobody is
      sent to another MX now, nor over a fresh session - except a pooled session that
      answered nothing (or only 421) and then closed: it was gone before the write;
    - after a refused RSET, or replies out of step with the commands, no bounce."""
    target = Target("mx.example.test", "192.0.2.1", 25)
    errors = {
        "none": None,
        "disconnected": SMTPServerDisconnected("Connection lost"),
        "timeout": SMTPReadTimeoutError("Timed out waiting for server response"),
        "desync": SMTPServerDisconnected("unsolicited data after the pipelined replies"),
    }
    checked = 0
    for reset, got, end in _combinations():
        result, smtp = TxResult(), _Smtp()
        replies = [SMTPResponse(code, "x") for code in got]
        inline_replies(smtp, replies, errors[end], [0, 1], 2, reset, target, result)  # type: ignore[arg-type]
        case = f"reset={reset} replies={got} end={end} -> {result}"
        said = dict(enumerate(got[1:] if reset else got))  # 0: MAIL, 1-2: RCPTs, 3: BDAT
        undecided = [i for i in (0, 1) if i not in result.decided]
        assert not undecided or result.session_error is not None, case
        for i, decision in result.decided.items():
            if decision.status is Status.DELIVERED:
                assert said.get(0) == said.get(1 + i) == said.get(3) == 250, case
                assert end in ("none",), case
            if decision.status is Status.PERMANENT and reset and got[:1] != (250,):
                assert said.get(3) == 250, case
            if decision.status is Status.PERMANENT:
                assert end != "desync", case
        maybe_taken = all(code == 250 for code in got) and end != "none"
        if maybe_taken and (result.session_error is not None or result.stale):
            assert reset and len(got) == 0 and end == "disconnected", case
        if result.stale:
            assert reset and end == "disconnected" and got in ((), (421,)), case
        checked += 1
    assert checked > 1000
