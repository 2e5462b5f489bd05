"""The layout of a message file in the spool: a header line, the envelope, the data.

Role: two layouts, both read everywhere.  Version 1, written when the whole message
is in memory (``Spool.store``, ``store_soon``): ``TLS-RELAY-MESSAGE 1 <envelope
length>\\n``, the envelope JSON, then the data.  Version 2, written when the data is
streamed to disk as it arrives and the envelope is only final at the end
(relay.queue.incoming): ``TLS-RELAY-MESSAGE 2 <data length, 16 digits>\\n``, the
data, then the envelope JSON to the end of the file; the header line has a fixed
width so it is written first and filled in before the file is made durable.
Not: where files live, locking or durability (relay.queue.spool).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import BinaryIO

from relay.errors import CorruptMessage
from relay.queue.envelope import QueueEnvelope

MAGIC_V1 = b"TLS-RELAY-MESSAGE 1 "  # + envelope length, LF; then envelope, then data
MAGIC_V2 = b"TLS-RELAY-MESSAGE 2 "  # + data length in 16 digits, LF; data, then envelope
V2_DIGITS = 16
V2_HEADER_LEN = len(MAGIC_V2) + V2_DIGITS + 1


@dataclass(frozen=True)
class Layout:
    envelope: bytes  # the envelope JSON as stored in the message file
    data_offset: int
    data_length: int


def head_v1(envelope: QueueEnvelope) -> bytes:
    """Version 1's header line and envelope; the data follows."""
    blob = envelope.to_json()
    return b"%s%d\n%s" % (MAGIC_V1, len(blob), blob)


def header_v2(data_length: int) -> bytes:
    """Version 2's fixed-width header line (before the data)."""
    return b"%s%0*d\n" % (MAGIC_V2, V2_DIGITS, data_length)


def read_layout(fh: BinaryIO, qid: str) -> Layout:
    """Where the envelope and the data of the message file *fh* are."""
    line = fh.readline(64)
    if line.startswith(MAGIC_V1) and line.endswith(b"\n"):
        length = _number(line[len(MAGIC_V1) : -1], qid)
        blob = fh.read(length)
        if len(blob) != length:
            raise CorruptMessage(f"message {qid} is truncated")
        offset = len(line) + length
        return Layout(blob, offset, os.fstat(fh.fileno()).st_size - offset)
    if line.startswith(MAGIC_V2) and len(line) == V2_HEADER_LEN and line.endswith(b"\n"):
        length = _number(line[len(MAGIC_V2) : -1], qid)
        fh.seek(V2_HEADER_LEN + length)
        blob = fh.read()
        if not blob:
            raise CorruptMessage(f"message {qid} is truncated")
        return Layout(blob, V2_HEADER_LEN, length)
    raise CorruptMessage(f"message {qid} has no spool header")


def _number(text: bytes, qid: str) -> int:
    try:
        return int(text)
    except ValueError as exc:
        raise CorruptMessage(f"message {qid} has a bad spool header") from exc


def read_data(fh: BinaryIO, layout: Layout) -> bytes:
    fh.seek(layout.data_offset)
    data = fh.read(layout.data_length)
    if len(data) != layout.data_length:
        raise CorruptMessage("message data is truncated")
    return data
