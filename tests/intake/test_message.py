"""relay.intake.message: header surgery on bytes."""

from __future__ import annotations

import dataclasses

from hypothesis import given
from hypothesis import strategies as st

from relay.intake.message import (
    ReceivedInfo,
    header_block_end,
    header_names,
    prepare,
    received_field,
)
from relay.mailformat import crlf_only, format_date

NOW = 1_704_164_645.0  # Tue, 02 Jan 2024 03:04:05 +0000
INFO = ReceivedInfo(
    hostname="relay.example",
    queue_id="18C6B0F1A2B3C4D5E6",
    client_ip="192.0.2.7",
    helo="app.example",
    tls_version="TLSv1.3",
    tls_cipher="TLS_AES_256_GCM_SHA384",
    tls_bits=256,
    authenticated=False,
    recipients=("bob@example.org",),
    now=NOW,
)


def test_format_date() -> None:
    assert format_date(NOW) == "Tue, 02 Jan 2024 03:04:05 +0000"


def test_received_field_layout() -> None:
    assert received_field(INFO) == (
        b"Received: from app.example (unknown [192.0.2.7])\r\n"
        b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))\r\n"
        b"\tby relay.example (tls-relay) with ESMTPS id 18C6B0F1A2B3C4D5E6\r\n"
        b"\tfor <bob@example.org>; Tue, 02 Jan 2024 03:04:05 +0000\r\n"
    )


def test_received_field_variants() -> None:
    info = dataclasses.replace(
        INFO,
        client_ip="2001:db8::1",
        helo="evil (x)\\",
        authenticated=True,
        recipients=("a@x", "b@y"),
    )
    field = received_field(info).decode()
    assert field.startswith("Received: from evil??x?? (unknown [IPv6:2001:db8::1])")
    assert "with ESMTPSA id" in field and "for <" not in field  # no Bcc disclosure
    assert field.endswith("18C6B0F1A2B3C4D5E6; Tue, 02 Jan 2024 03:04:05 +0000\r\n")
    assert all(len(line) < 100 for line in field.split("\r\n"))
    assert received_field(dataclasses.replace(INFO, helo=None)).startswith(
        b"Received: from unknown "
    )


def test_header_block() -> None:
    data = b"Subject: a\r\nX-Long: one\r\n two\r\n\r\nDate: in the body\r\n"
    assert header_block_end(data) == (data.index(b"\r\n\r\n") + 2, True)
    assert header_names(data) == {"subject", "x-long"}
    assert header_block_end(b"no header here\r\n") == (0, False)
    assert header_block_end(b"Subject: only\r\n") == (15, False)
    assert header_names(b"MESSAGE-id : <x@y>\r\n\r\n") == {"message-id"}


def test_prepare_adds_missing_headers_in_the_header_block() -> None:
    data = b"Subject: hi\r\n\r\nMessage-ID: <in-body@x>\r\nDate: body\r\n"
    out = prepare(data, INFO)
    received = received_field(INFO)
    assert out.startswith(received)
    head, body = out[len(received) :].split(b"\r\n\r\n", 1)
    assert head == (
        b"Subject: hi\r\nMessage-ID: <18C6B0F1A2B3C4D5E6@relay.example>\r\n"
        b"Date: Tue, 02 Jan 2024 03:04:05 +0000"
    )
    assert body == b"Message-ID: <in-body@x>\r\nDate: body\r\n"


def test_prepare_keeps_existing_headers_case_insensitively() -> None:
    data = b"message-ID: <own@x>\r\nDATE: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nbody\r\n"
    assert prepare(data, INFO) == received_field(INFO) + data


def test_prepare_without_header_block() -> None:
    out = prepare(b"just text\r\n", INFO)
    tail = out[len(received_field(INFO)) :]
    assert tail.startswith(b"Message-ID: <") and tail.endswith(b"\r\n\r\njust text\r\n")
    empty = prepare(b"", INFO)[len(received_field(INFO)) :]
    assert empty.startswith(b"Message-ID: ") and empty.endswith(b"+0000\r\n")


@given(st.binary(max_size=300).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"\r\n")))
def test_prepare_only_adds(data: bytes) -> None:
    out = prepare(data, INFO)
    assert out.startswith(received_field(INFO))
    assert (crlf_only(out) and b"\x00" not in out) or not crlf_only(data) or b"\x00" in data
    # Only whole lines are added (Received, Message-ID, Date, a separating empty line):
    # the original lines are all there, in order.  (Comparing with the CRLFs removed
    # failed for a header block followed by a non-header line, found by Hypothesis.)
    out_lines = iter(out.split(b"\r\n"))
    assert all(line in out_lines for line in data.split(b"\r\n"))
    assert len(out) >= len(data)
