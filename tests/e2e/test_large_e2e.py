"""Large mail through `tls-relay serve` to a real Postfix MX: an 8 MiB message is
streamed to the spool as it arrives, stays on disk, goes out piece by piece, and
arrives byte for byte (dot-stuffed lines at any offset included)."""

from __future__ import annotations

import re

import pytest

from tests.e2e.test_queue_e2e import DOMAIN, route_to, send, wait_for
from tests.fixtures.postfix import PostfixMx
from tests.fixtures.relay_proc import RelayFactory

pytestmark = [pytest.mark.e2e, pytest.mark.postfix]
MIB = 1024 * 1024


def test_an_8_mib_message_arrives_byte_for_byte(relay: RelayFactory, postfix_mx: PostfixMx) -> None:
    proc = relay(extra_config={**route_to(postfix_mx)}, limits={"max_message_size": 32 * MIB})
    line = b"line with a \xc3\xa4 and some text to fill it up, seventy-odd octets\r\n"
    body = b"".join((b"." if n % 997 == 0 else b"") + line for n in range(8 * MIB // len(line)))
    data = b"From: app@corp.test\r\nSubject: big\r\nMessage-ID: <big@corp.test>\r\n\r\n" + body
    send(proc, "app@corp.test", [f"big@{DOMAIN}"], data)
    (got,) = postfix_mx.wait_messages(1, timeout=60)
    stored = got.raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert stored.endswith(b"\r\n\r\n" + body)
    wait_for(lambda: proc.spool().ids() == [] or None, "the queue to empty")
    queued = re.search(r"message_queued .* size=(\d+)", proc.log_text())
    assert queued is not None and len(data) < int(queued.group(1)) < len(data) + 1024
    assert proc.stop() == 0
