"""A message that stays on disk (relay.body) goes to a real Postfix piece by piece and
arrives intact: with BDAT (RFC 3030) as stored, or with DATA dot-stuffed across the
pieces' boundaries; 8-bit data, SIZE."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from relay.app import new_deliverer
from relay.body import CHUNK, Body
from relay.delivery.outcome import Status
from relay.metrics import Metrics
from tests.delivery.test_deliverer import FakeResolver, make_cfg, policy
from tests.fixtures.postfix import postfix_instance


def big_message() -> bytes:
    head = b"From: app@src.test\r\nSubject: streamed\r\nMessage-ID: <s1@src.test>\r\n\r\n"
    line = b"0123456789 \xc3\xa4 abcdefghijklmnopqrstuvwxyz\r\n"
    data = head + line * ((CHUNK - 4096) // len(line))
    # A period at the start of a line right where the first piece ends, CRLF before it.
    data += b"x" * (CHUNK - len(data) - 2) + b"\r\n"
    data += b".starts the second piece\r\n" + line * 20000 + b".\r\n..\r\nend\r\n"
    return data


@pytest.mark.parametrize("chunking", [True, False], ids=["bdat", "data"])
async def test_a_message_on_disk_reaches_postfix_intact(
    chunking: bool, ca: trustme.CA, ca_file: Path, tmp_path: Path
) -> None:
    data = big_message()
    assert data[CHUNK : CHUNK + 1] == b"." and data[CHUNK - 2 : CHUNK] == b"\r\n"
    path = tmp_path / "message"
    path.write_bytes(b"spool header\n" + data + b"{envelope}")
    body = Body.on_disk(str(path), len(b"spool header\n"), len(data))
    assert body.data is None and body.eight_bit
    resolver = FakeResolver({"example.test": [("mx.postfix.test", "127.0.0.1")]})
    main = {} if chunking else {"smtpd_discard_ehlo_keywords": "chunking"}
    with postfix_instance(ca, main=main) as mx:
        d = new_deliverer(make_cfg(mx.port, ca_file), policy(), "relay.test", resolver, Metrics())
        try:
            outcomes = await d.deliver(
                "Q1",
                "app@src.test",
                ["BODY=8BITMIME"],
                "example.test",
                [("a@example.test", ())],
                body,
            )
        finally:
            await d.close()
        assert [o.status for o in outcomes] == [Status.DELIVERED], outcomes[0].reason
        (got,) = mx.wait_messages(1)
        assert f" {'bdat' if chunking else 'data'}=1 " in mx.wait_log("quit=1")
    stored = got.raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert stored.endswith(data[data.index(b"\r\n\r\n") :])
