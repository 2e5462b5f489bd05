"""DATA transparency without regexes gives exactly what aiosmtplib would send."""

from __future__ import annotations

from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given
from hypothesis import strategies as st

from relay.delivery.wiredata import dot_stuff
from relay.mailformat import crlf_only

line = st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@given(st.lists(line, max_size=20), st.booleans())
def test_same_bytes_as_aiosmtplib_for_crlf_data(lines: list[bytes], final_crlf: bool) -> None:
    data = b"\r\n".join(lines) + (b"\r\n" if final_crlf and lines else b"")
    assert crlf_only(data)
    theirs = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(data)) + b".\r\n"
    assert dot_stuff(data) == theirs


def test_bare_newlines_are_not_crlf_only() -> None:
    assert not crlf_only(b"a\nb\r\n")
    assert not crlf_only(b"a\rb\r\n")
    assert crlf_only(b"a\r\nb\r\n")


def test_leading_and_inner_periods() -> None:
    assert dot_stuff(b".a\r\n.\r\nb\r\n") == b"..a\r\n..\r\nb\r\n.\r\n"
