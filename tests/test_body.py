"""relay.body: a message's data in memory or on disk, and dot-stuffing it in pieces."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.body import CHUNK, Body, stuffed
from relay.delivery.wiredata import dot_stuff

DATA = b"Subject: x\r\nX-A: \xc3\xa4\r\n\r\nbody\r\n.dot\r\n"

pieces_of = st.lists(st.sampled_from([b".", b"\r\n", b"a", b"..", b"\r\n.", b"x\r\n", b"\r"]))


@given(pieces_of, st.lists(st.integers(min_value=0, max_value=60), max_size=5))
def test_stuffing_in_pieces_is_stuffing_it_whole(parts: list[bytes], cuts: list[int]) -> None:
    data = b"".join(parts)
    bounds = sorted({min(c, len(data)) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *bounds], [*bounds, len(data)], strict=True)]
    assert b"".join(stuffed(pieces)) == dot_stuff(data)


def test_in_memory() -> None:
    body = Body.of(DATA)
    assert body.size == len(DATA) and body.eight_bit and body.whole() is DATA
    assert body.head == b"Subject: x\r\nX-A: \xc3\xa4\r\n\r\n"
    assert not Body.of(b"a\r\n").eight_bit and Body.of(b"a\r\n").head == b"a\r\n"


async def test_on_disk_reads_in_pieces(tmp_path: Path) -> None:
    data = b"Subject: big\r\n\r\n" + b"x" * (2 * CHUNK + 10) + b"\r\n\xff\r\n"
    path = tmp_path / "m"
    path.write_bytes(b"HEADER" + data + b"ENVELOPE")
    body = Body.on_disk(str(path), 6, len(data))
    assert body.data is None and body.size == len(data) and body.eight_bit
    assert body.head == b"Subject: big\r\n\r\n"
    got = [piece async for piece in body.pieces()]
    assert len(got) == 3 and max(map(len, got)) == CHUNK and b"".join(got) == data
    assert body.whole() == data
    path.write_bytes(b"HEADER" + data[:100])  # cut short behind our back
    with pytest.raises(OSError, match="truncated"):
        _ = [piece async for piece in body.pieces()]


def test_on_disk_with_the_8_bit_flag_known_reads_only_the_head(tmp_path: Path) -> None:
    data = b"Subject: x\r\n\r\n" + b"a" * (3 * CHUNK)
    path = tmp_path / "m"
    path.write_bytes(data[: CHUNK + 10])  # the rest is missing: never read
    body = Body.on_disk(str(path), 0, len(data), eight_bit=True)
    assert body.eight_bit and body.head == b"Subject: x\r\n\r\n"
    with pytest.raises(OSError, match="truncated"):
        Body.on_disk(str(path), 0, len(data))  # unknown: every octet is looked at
