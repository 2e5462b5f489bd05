"""DATA scanner: end marker, dot-stuffing, limits, bare CR/LF/NUL, pipelined leftovers,
any chunking; the content comes out piece by piece and nothing grows with the message."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from relay.intake.datareader import DataProblem, DataScanner, read_data
from relay.intake.replies import BARE_NEWLINE


def stuff(lines: list[bytes]) -> bytes:
    """What a client sends: RFC 5321 4.5.2 dot-stuffing plus the end marker."""
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines) + b".\r\n"


def scan(wire: bytes, sizes: list[int], max_size: int = 10_000) -> tuple[DataScanner, bytes, bytes]:
    """The scanner after *wire* fed in pieces of *sizes*; the content; what followed."""
    scanner = DataScanner(max_size)
    content, leftover, pos = b"", b"", 0
    for n in [*sizes, len(wire)]:
        if scanner.done or pos >= len(wire):
            break
        piece, leftover = scanner.feed(wire[pos : pos + max(1, n)])
        content += piece
        pos += max(1, n)
    return scanner, content, leftover + wire[pos:]


@pytest.mark.parametrize(
    ("wire", "content", "rest"),
    [
        (b".\r\n", b"", b""),  # empty message
        (b"a\r\n.\r\n", b"a\r\n", b""),
        (b"a\r\n.\r\nMAIL FROM:<x@y>\r\n", b"a\r\n", b"MAIL FROM:<x@y>\r\n"),
        (b"..a\r\n..\r\n.\r\n", b".a\r\n.\r\n", b""),  # dot-stuffed lines
        (b"x\r\n\r\n..\r\n...\r\n.\r\n", b"x\r\n\r\n.\r\n..\r\n", b""),
    ],
)
def test_table(wire: bytes, content: bytes, rest: bytes) -> None:
    for size in (1, 2, 3, 5, 1000):
        scanner, got, leftover = scan(wire, [size] * len(wire))
        assert scanner.done and scanner.problem is DataProblem.NONE
        assert got == content and scanner.size == len(content)
        assert leftover == rest


@pytest.mark.parametrize(
    "wire",
    [
        b"a\n.\nb\r\n.\r\n",  # LF.LF does not end data, and is refused
        b"a\r.\rb\r\n.\r\n",  # CR.CR likewise
        b"a\r\n.\nb\r\n.\r\n",  # CRLF.LF
        b"a\r\n\x00.\r\nb\r\n.\r\n",
        b"a\nb\r\n.\r\n",
        b"a\r\r\n.\r\n",
        b"end\r\r\n.\r\n",
        b"nul\x00\r\n.\r\n",
    ],
)
def test_bare_cr_lf_nul_are_refused_and_read_to_the_end(wire: bytes) -> None:
    for size in (1, 2, 3, 1000):
        scanner, _, leftover = scan(wire + b"QUIT\r\n", [size] * len(wire))
        assert scanner.done and scanner.problem is DataProblem.BARE_NEWLINE
        assert leftover == b"QUIT\r\n"
    assert str(BARE_NEWLINE).startswith("550 5.6.0 ")


@given(st.binary(max_size=200), st.integers(min_value=1, max_value=7))
def test_bare_check_matches_a_line_by_line_definition(data: bytes, size: int) -> None:
    assume(b"\r\n.\r\n" not in b"\r\n" + data and not data.startswith(b".\r\n"))
    wire = data + (b".\r\n" if data.endswith(b"\r\n") or not data else b"\r\n.\r\n")
    stripped = (wire[:-3]).replace(b"\r\n", b"")
    clean = b"\r" not in stripped and b"\n" not in stripped and b"\x00" not in wire
    scanner, _, _ = scan(wire, [size] * len(wire), max_size=1 << 20)
    assert scanner.done
    assert (scanner.problem is not DataProblem.BARE_NEWLINE) == clean


def test_too_big_is_read_to_the_end_and_kept_nowhere() -> None:
    wire = b"x" * 50 + b"\r\n" + b"y" * 5000 + b"\r\n.\r\nQUIT\r\n"
    scanner, content, leftover = scan(wire, [64] * 200, max_size=100)
    assert scanner.done and scanner.problem is DataProblem.TOO_BIG
    assert len(content) <= 100 and leftover == b"QUIT\r\n"


@pytest.mark.parametrize("size", [1, 7, 999, 4096])
def test_line_limit_is_1000_octets_with_crlf(size: int) -> None:
    for prefix in (b"", b"short\r\n" * 3, b"x" * 1500 + b"\r\n"[:0]):
        ok, _, _ = scan(prefix[:0] + b"a" * 998 + b"\r\n" + b"b\r\n.\r\n", [size] * 3000)
        assert ok.problem is DataProblem.NONE
    for wire in (
        b"a" * 999 + b"\r\n.\r\n",
        b"ok\r\n" * 300 + b"a" * 999 + b"\r\nok\r\n.\r\n",  # in the middle
        b"ok\r\n" + b"a" * 5000 + b"\r\n.\r\n",  # across many chunks
    ):
        bad, _, _ = scan(wire, [size] * 6000)
        assert bad.problem is DataProblem.LINE_TOO_LONG, wire[:20]


lines = st.lists(
    st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"r").replace(b"\n", b"n")),
    max_size=30,
)


@given(lines, st.lists(st.integers(min_value=1, max_value=64), max_size=60), st.binary(max_size=20))
def test_any_chunking_round_trips(msg: list[bytes], sizes: list[int], after: bytes) -> None:
    assume(all(b"\x00" not in ln for ln in msg))
    wire = stuff(msg) + after
    scanner, content, leftover = scan(wire, sizes, max_size=1 << 20)
    assert scanner.done and scanner.problem is DataProblem.NONE
    assert content == b"".join(ln + b"\r\n" for ln in msg)
    assert leftover == after


def test_the_scanner_keeps_nothing_of_the_message() -> None:
    scanner = DataScanner(1 << 30)
    for _ in range(100):
        scanner.feed(b"0123456789abcdef\r\n" * 4000)
        assert len(scanner._buf) < len(b"\r\n.\r\n")


async def test_reader_keeps_pipelined_commands_in_order() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"hello\r\n.\r\nRSET\r\nQUIT\r\n")
    pieces: list[bytes] = []

    async def sink(piece: bytes) -> None:
        pieces.append(piece)

    scanner = await read_data(reader, 1000, sink)
    assert scanner.done and b"".join(pieces) == b"hello\r\n"
    assert await reader.readuntil(b"\r\n") == b"RSET\r\n"
    assert await reader.readuntil(b"\r\n") == b"QUIT\r\n"


async def test_reader_eof_before_marker_raises() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"half a message\r\n")
    reader.feed_eof()

    async def sink(piece: bytes) -> None:
        pass

    with pytest.raises(asyncio.IncompleteReadError):
        await read_data(reader, 1000, sink)
