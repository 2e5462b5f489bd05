"""Large and oddly shaped messages through the in-process listener: streamed to the
spool file as they arrive (message file layout 2), stored intact, bounded header block,
nothing left behind when the client goes away or the data is refused."""

from __future__ import annotations

import asyncio
import os

import pytest

from relay.errors import SpoolFullError
from relay.intake.reception import HEADER_LIMIT, MEMORY_MAX
from relay.queue import msgfile
from relay.queue.incoming import Incoming
from tests.fixtures.intake import Harness, IntakeFactory
from tests.fixtures.rawsmtp import session

HOST = "127.0.0.1"
MIB = 1024 * 1024


def send(h: Harness, data: bytes, *, stop_after: int | None = None) -> tuple[int, str]:
    """One message (already ending in CRLF); with *stop_after*, vanish after that many
    octets of data."""
    with session(HOST, h.starttls_port, h.client_context()) as raw:
        assert raw.cmd("MAIL FROM:<app@a.test>")[0] == 250
        assert raw.cmd("RCPT TO:<bob@b.test>")[0] == 250
        assert raw.cmd("DATA")[0] == 354
        if stop_after is not None:
            raw.send(data[:stop_after])
            return 0, "gone"
        for pos in range(0, len(data), MIB):  # several writes, as a client sends
            raw.send(data[pos : pos + MIB])
        raw.send(b".\r\n")
        return raw.reply()


def body(size: int, line: bytes = b"0123456789" * 7 + b"\r\n") -> bytes:
    return b"Subject: big\r\nFrom: app@a.test\r\n\r\n" + line * (size // len(line))


def layout(h: Harness, qid: str) -> msgfile.Layout:
    with h.spool.message_path(qid).open("rb") as fh:
        return msgfile.read_layout(fh, qid)


async def test_a_large_message_is_streamed_to_disk_and_stored_intact(
    intake: IntakeFactory,
) -> None:
    h = await intake(limits={"max_message_size": 64 * MIB})
    data = body(8 * MIB) + b"..a stuffed line\r\n"  # sent dot-stuffed: stored as ".a ..."
    code, text = await asyncio.to_thread(send, h, data)
    assert code == 250, text
    qid = text.rsplit(" ", 1)[1]
    stored = h.spool.read_data(qid)
    assert stored.startswith(b"Received: from client.test")
    original = data.replace(b"\r\n..a stuffed", b"\r\n.a stuffed")
    assert stored.endswith(original[original.index(b"\r\n\r\n") :])
    assert b"\r\nMessage-ID: <" in stored[: stored.index(b"\r\n\r\n")]
    env = h.spool.load(qid)
    assert env.size == len(stored) and h.queued == [qid]
    assert env.eight_bit is False  # known for a streamed message: delivery need not scan it
    found = layout(h, qid)
    assert found.data_offset == msgfile.V2_HEADER_LEN and found.data_length == len(stored)
    assert not [n for n in os.listdir(h.spool.queue_dir) if n.startswith(".")]


async def test_a_small_message_stays_on_the_one_write_path(intake: IntakeFactory) -> None:
    h = await intake()
    code, text = await asyncio.to_thread(send, h, body(MEMORY_MAX // 2))
    assert code == 250
    qid = text.rsplit(" ", 1)[1]
    found = layout(h, qid)
    assert found.data_offset > msgfile.V2_HEADER_LEN  # layout 1: the envelope comes first
    assert b"eight_bit" not in found.envelope  # as older releases wrote it


@pytest.mark.parametrize("shape", ["short lines", "one header line per field"])
async def test_odd_shapes_are_stored_byte_for_byte(intake: IntakeFactory, shape: str) -> None:
    h = await intake(limits={"max_message_size": 64 * MIB})
    if shape == "short lines":
        data = b"Subject: s\r\n\r\n" + b"a\r\n" * (3 * MIB // 3) + b"\xc3\xa4\r\n"
    else:
        data = b"".join(b"X-H%d: v\r\n" % n for n in range(HEADER_LIMIT // 28)) + b"\r\nb\r\n"
    code, text = await asyncio.to_thread(send, h, data)
    assert code == 250, text
    stored = h.spool.read_data(text.rsplit(" ", 1)[1])
    blank = data.index(b"\r\n\r\n")
    assert data[: blank + 2] in stored  # the header fields as sent, then ours
    assert stored.endswith(data[blank:])
    env = h.spool.load(text.rsplit(" ", 1)[1])
    assert env.eight_bit is (shape == "short lines")  # only that one has an 8-bit line


async def test_a_header_block_past_the_limit_is_refused(intake: IntakeFactory) -> None:
    h = await intake(limits={"max_message_size": 64 * MIB})
    data = b"".join(b"X-Filler-%07d: value\r\n" % n for n in range(2 * HEADER_LIMIT // 26))
    code, text = await asyncio.to_thread(send, h, data + b"\r\nbody\r\n")
    assert (code, text) == (552, "5.3.4 Message header block exceeds 1 MiB")
    assert h.spool.ids() == [] and h.queued == []
    assert os.listdir(h.spool.queue_dir) == []


async def test_a_client_that_vanishes_mid_data_leaves_nothing(intake: IntakeFactory) -> None:
    h = await intake(limits={"max_message_size": 64 * MIB})
    await asyncio.to_thread(send, h, body(6 * MIB), stop_after=5 * MIB)
    for _ in range(200):  # the session notices the close, then removes its temp file
        if not os.listdir(h.spool.queue_dir):
            break
        await asyncio.sleep(0.02)
    assert os.listdir(h.spool.queue_dir) == [] and h.queued == []


async def test_bare_lf_deep_in_a_large_message_is_refused(intake: IntakeFactory) -> None:
    h = await intake(limits={"max_message_size": 64 * MIB})
    data = body(4 * MIB) + b"bare\nline\r\n"
    code, text = await asyncio.to_thread(send, h, data)
    assert code == 550 and text.startswith("5.6.0")
    assert os.listdir(h.spool.queue_dir) == []


@pytest.mark.parametrize("where", ["creating the file", "the first write"])
async def test_a_spool_failure_while_streaming_is_452_never_250(
    intake: IntakeFactory, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The review's H1: a failed first flush once left the data empty and stored the
    envelope alone, with a 250."""
    h = await intake(limits={"max_message_size": 64 * MIB})
    full = SpoolFullError("cannot write: No space left on device")
    if where == "creating the file":

        def refuse(qid: str) -> Incoming:
            raise full

        monkeypatch.setattr(h.spool, "receive", refuse)
    else:

        async def fail(self: Incoming, pieces: object) -> None:
            raise full

        monkeypatch.setattr(Incoming, "write", fail)
    code, text = await asyncio.to_thread(send, h, body(4 * MIB))
    assert (code, text) == (452, "4.3.1 Insufficient system storage")
    assert h.spool.ids() == [] and h.queued == []
    assert os.listdir(h.spool.queue_dir) == []
