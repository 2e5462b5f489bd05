"""A message's data as delivery sees it: in memory, or a range of its spool file.

Role: :class:`Body` carries what delivery needs to know about a message without
holding all of it - its size, its header section (``head``: DSNs, ``TLS-Required``,
the SMTPUTF8 check), whether any octet is 8-bit (RFC 6152) - and gives the data
itself either whole (:meth:`Body.whole`, for the rare steps that need it: a 7-bit
conversion, a DSN that returns the full message) or as pieces read from the spool
file a CHUNK at a time in a worker thread (:meth:`Body.pieces`), so sending a
20 MiB message costs about a CHUNK of memory, not 20 MiB.  :func:`stuffed` dot-stuffs
such pieces for the wire (RFC 5321 4.5.2), a period split from its CRLF included.
Not: where the file is or its layout (relay.queue.spool, relay.queue.msgfile).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Iterable, Iterator
from dataclasses import dataclass

CRLF = b"\r\n"
CHUNK = 256 * 1024  # octets read from the spool file at a time
HEAD_MAX = 2 * 1024 * 1024  # a stored header section: 1 MiB from the client, plus ours


@dataclass(frozen=True)
class Body:
    size: int
    head: bytes  # the header section and its empty line (all of a message without one)
    eight_bit: bool  # some octet above 127
    data: bytes | None = None  # the whole message, when it is in memory
    path: str | None = None  # else: where it is, from *offset* on, *size* octets
    offset: int = 0

    @classmethod
    def of(cls, data: bytes) -> Body:
        return cls(len(data), _head(data), not data.isascii(), data=data)

    @classmethod
    def on_disk(cls, path: str, offset: int, size: int, eight_bit: bool | None = None) -> Body:
        """The data of a message file, read here for its head, and for its 8-bit octets
        unless *eight_bit* is known (blocking: call it off the event loop)."""
        found, head = False, b""
        with open(path, "rb") as fh:
            fh.seek(offset)
            left = size
            while left > 0:
                piece = fh.read(min(CHUNK, left))
                if not piece:
                    raise OSError(f"{path}: message data is truncated")
                if len(head) < HEAD_MAX and not head.endswith(b"\r\n\r\n"):
                    head = _head(head + piece[: HEAD_MAX - len(head)])
                elif eight_bit is not None:
                    break  # the head is complete and the rest is not needed now
                found = found or not piece.isascii()
                left -= len(piece)
        return cls(size, head, found if eight_bit is None else eight_bit, path=path, offset=offset)

    def whole(self) -> bytes:
        """All of it (blocking for a message on disk: call it off the event loop)."""
        if self.data is not None:
            return self.data
        assert self.path is not None
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.path}: message data is truncated")
        return data

    async def pieces(self) -> AsyncGenerator[bytes, None]:
        """The data, in memory at once, from disk a CHUNK at a time (OSError if it
        cannot be read)."""
        if self.data is not None:
            yield self.data
            return
        assert self.path is not None
        fh = await asyncio.to_thread(open, self.path, "rb")
        try:
            await asyncio.to_thread(fh.seek, self.offset)
            left = self.size
            while left > 0:
                piece = await asyncio.to_thread(fh.read, min(CHUNK, left))
                if not piece:
                    raise OSError(f"{self.path}: message data is truncated")
                left -= len(piece)
                yield piece
        finally:
            fh.close()


def _head(data: bytes) -> bytes:
    end = data.find(b"\r\n\r\n")
    return data[: end + 4] if end >= 0 else data


class Stuffer:
    """RFC 5321 4.5.2 for data in pieces: every line's leading period doubled, the
    data ended with CRLF, then the end marker - the same octets as dot-stuffing it
    whole (relay.delivery.wiredata.dot_stuff).  A piece is never cut between a CRLF
    and the octet after it, so a period there is seen with its line start, and no
    piece given out starts or ends inside a CRLF."""

    def __init__(self) -> None:
        self._carry = CRLF  # a virtual line start: a period at the very beginning counts
        self._virtual = True  # the virtual CRLF is still in the carry, not yet dropped
        self._last = b""  # the data's last two octets

    def feed(self, piece: bytes) -> bytes:
        self._last = (self._last + piece)[-2:]
        buf = self._carry + piece
        cut = len(buf)
        if buf.endswith(b"\r"):
            cut -= 1
        if buf.endswith(CRLF, 0, cut):
            cut -= 2
        out = buf[:cut].replace(b"\r\n.", b"\r\n..")
        if self._virtual and cut >= 2:
            out, self._virtual = out[2:], False
        self._carry = buf[cut:]
        return out

    def end(self) -> bytes:
        tail = self._carry[2:] if self._virtual else self._carry
        return tail + (b"" if self._last == CRLF else CRLF) + b".\r\n"


def stuffed(pieces: Iterable[bytes]) -> Iterator[bytes]:
    """The wire form of *pieces* (see :class:`Stuffer`), empty pieces left out."""
    stuffer = Stuffer()
    for piece in pieces:
        out = stuffer.feed(piece)
        if out:
            yield out
    yield stuffer.end()
