"""DATA scanner: end marker, dot-stuffing, limits, pipelined leftovers, any chunking."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.intake.datareader import DataProblem, DataScanner, read_data


def stuff(lines: list[bytes]) -> bytes:
    """What a client sends: RFC 5321 4.5.2 dot-stuffing plus the end marker."""
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines) + b".\r\n"


def scan(wire: bytes, sizes: list[int], max_size: int = 10_000) -> tuple[DataScanner, bytes]:
    scanner = DataScanner(max_size)
    leftover = b""
    pos = 0
    for n in [*sizes, len(wire)]:
        if scanner.done or pos >= len(wire):
            break
        leftover = scanner.feed(wire[pos : pos + max(1, n)])
        pos += max(1, n)
    return scanner, leftover + wire[pos:]


@pytest.mark.parametrize(
    ("wire", "content", "rest"),
    [
        (b".\r\n", b"", b""),  # empty message
        (b"a\r\n.\r\n", b"a\r\n", b""),
        (b"a\r\n.\r\nMAIL FROM:<x@y>\r\n", b"a\r\n", b"MAIL FROM:<x@y>\r\n"),
        (b"..a\r\n..\r\n.\r\n", b".a\r\n.\r\n", b""),  # dot-stuffed lines
        (b"a\n.\nb\r\n.\r\n", b"a\n.\nb\r\n", b""),  # LF.LF does not end data
        (b"a\r.\rb\r\n.\r\n", b"a\r.\rb\r\n", b""),  # CR.CR does not end data
        (b"a\r\n.\nb\r\n.\r\n", b"a\r\n\nb\r\n", b""),  # CRLF.LF: no end; line unstuffed
        (b"a\r\n\x00.\r\nb\r\n.\r\n", b"a\r\n\x00.\r\nb\r\n", b""),
    ],
)
def test_table(wire: bytes, content: bytes, rest: bytes) -> None:
    for size in (1, 2, 3, 5, 1000):
        scanner, leftover = scan(wire, [size] * len(wire))
        assert scanner.done and scanner.problem is DataProblem.NONE
        assert scanner.content == content
        assert leftover == rest


def test_too_big_is_read_to_the_end_and_kept_nowhere() -> None:
    wire = b"x" * 50 + b"\r\n" + b"y" * 5000 + b"\r\n.\r\nQUIT\r\n"
    scanner, leftover = scan(wire, [64] * 200, max_size=100)
    assert scanner.done and scanner.problem is DataProblem.TOO_BIG
    assert scanner.content is None and leftover == b"QUIT\r\n"


def test_line_limit_is_1000_octets_with_crlf() -> None:
    ok, _ = scan(b"a" * 998 + b"\r\n.\r\n", [4096])
    assert ok.problem is DataProblem.NONE
    bad, _ = scan(b"a" * 999 + b"\r\n.\r\n", [4096])
    assert bad.problem is DataProblem.LINE_TOO_LONG and bad.content is None


lines = st.lists(
    st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"r").replace(b"\n", b"n")),
    max_size=30,
)


@given(lines, st.lists(st.integers(min_value=1, max_value=64), max_size=60), st.binary(max_size=20))
def test_any_chunking_round_trips(msg: list[bytes], sizes: list[int], after: bytes) -> None:
    wire = stuff(msg) + after
    scanner, leftover = scan(wire, sizes, max_size=1 << 20)
    assert scanner.done
    assert scanner.content == b"".join(ln + b"\r\n" for ln in msg)
    assert leftover == after


async def test_reader_keeps_pipelined_commands_in_order() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"hello\r\n.\r\nRSET\r\nQUIT\r\n")
    scanner = await read_data(reader, 1000)
    assert scanner.content == b"hello\r\n"
    assert await reader.readuntil(b"\r\n") == b"RSET\r\n"
    assert await reader.readuntil(b"\r\n") == b"QUIT\r\n"


async def test_reader_eof_before_marker_raises() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"half a message\r\n")
    reader.feed_eof()
    with pytest.raises(asyncio.IncompleteReadError):
        await read_data(reader, 1000)
