"""One message as it arrives: its header block annotated, its data on the way to disk.

Role: :class:`Reception` takes the content pieces of a DATA section
(relay.intake.datareader) in order.  It collects the header block (at most
HEADER_LIMIT octets: a larger one is refused, as Exim's ``header_maxsize`` does,
rather than cut, which would change what a sender may have signed), adds
``Received:`` and any missing ``Message-ID:``/``Date:`` (relay.intake.message), and
passes everything on.  A message that stays within MEMORY_MAX is kept in memory and
stored in one write (``Spool.store_soon``, the fast path); past that, it goes to the
spool file as it arrives (``Spool.receive``, relay.queue.incoming), a FLUSH at a
time, so intake memory does not grow with message size.  Nothing becomes a message
before ``store_soon`` or :meth:`Reception.commit` succeeded: an abort (client gone,
bad data, shutdown) leaves nothing behind.  It also notes whether any octet is 8-bit,
which the envelope of a streamed message keeps for delivery.
Not: reading the wire (relay.intake.datareader), replies (relay.intake.listener).
"""

from __future__ import annotations

from relay.errors import SpoolError
from relay.intake import message
from relay.mailformat import CRLF
from relay.queue.envelope import QueueEnvelope
from relay.queue.incoming import Incoming
from relay.queue.spool import LOOP_WRITE_MAX, Spool

HEADER_LIMIT = 1024 * 1024  # octets of header block accepted (Exim's header_maxsize)
MEMORY_MAX = LOOP_WRITE_MAX  # a message up to this size is stored in one write
FLUSH = 256 * 1024  # octets gathered before each write to the spool file


class HeaderTooLarge(Exception):
    """The header block goes on past HEADER_LIMIT."""


class Reception:
    def __init__(self, spool: Spool, qid: str, info: message.ReceivedInfo) -> None:
        self.spool = spool
        self.qid = qid
        self.info = info
        self.size = 0  # octets of the message as it will be stored
        self.eight_bit = False  # some octet of it is above 127
        self.header_too_large = False
        self.error: SpoolError | None = None  # the spool refused a write: keep nothing
        self._head: bytearray | None = bytearray()  # None once the header block is done
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._incoming: Incoming | None = None

    @property
    def failed(self) -> bool:
        return self.header_too_large or self.error is not None

    async def feed(self, piece: bytes) -> None:
        """The next content piece (after a failure: read and dropped)."""
        if self.failed:
            return
        if self._head is not None:
            seen = max(0, len(self._head) - 3)  # an empty line may straddle the pieces
            self._head += piece
            if not _head_complete(self._head, seen):
                return
            piece = self._annotate()
            if self.failed:
                return
        await self._add(piece)

    def _annotate(self) -> bytes:
        """The collected start of the message with our fields added; the rest passes."""
        assert self._head is not None
        head, self._head = bytes(self._head), None
        try:
            return prepare_head(head, self.info)
        except HeaderTooLarge:
            self.header_too_large = True
            return b""

    async def _add(self, piece: bytes) -> None:
        self._pending.append(piece)
        self._pending_size += len(piece)
        self.size += len(piece)
        self.eight_bit = self.eight_bit or not piece.isascii()
        if self.size > MEMORY_MAX and self._pending_size >= FLUSH:
            await self._flush()

    async def _flush(self) -> None:
        try:
            if self._incoming is None:
                self._incoming = self.spool.receive(self.qid)
            await self._incoming.write(self._pending)
        except SpoolError as exc:
            self.error = exc
            self.abort()
        self._pending, self._pending_size = [], 0

    async def finish(self) -> None:
        """The data ended: annotate a message that was all header, write what is left."""
        if self._head is not None and not self.failed:
            await self._add(self._annotate())
        if self._incoming is not None and not self.failed:
            await self._flush()

    def data(self) -> bytes | None:
        """The whole message, when it was kept in memory; None when it is on disk, or
        when a write failed (then :meth:`commit` raises what went wrong)."""
        if self._incoming is not None or self.error is not None:
            return None
        return b"".join(self._pending)

    async def commit(self, envelope: QueueEnvelope) -> None:
        """Make the message on disk a message with *envelope* (SpoolError if not)."""
        if self.error is not None:
            raise self.error
        assert self._incoming is not None, "a message kept in memory goes to store_soon"
        await self._incoming.commit(envelope)

    def abort(self) -> None:
        """Nothing of it stays (the temp file, if any, goes)."""
        if self._incoming is not None:
            self._incoming.abort()
        self._pending, self._pending_size = [], 0


def _head_complete(head: bytearray, seen: int) -> bool:
    """Whether the header block can be judged: it ended (an empty line after octet
    *seen*, or no header at all), or HEADER_LIMIT is reached."""
    return head.startswith(CRLF) or len(head) >= HEADER_LIMIT or head.find(b"\r\n\r\n", seen) >= 0


def prepare_head(start: bytes, info: message.ReceivedInfo) -> bytes:
    """*start* (the header block and whatever followed it so far) annotated; raises
    HeaderTooLarge when header fields fill all of HEADER_LIMIT."""
    if len(start) >= HEADER_LIMIT:
        whole = start[: start.rfind(CRLF) + 2]  # judge complete lines only
        end, blank = message.header_block_end(whole)
        if not blank and end == len(whole):
            raise HeaderTooLarge
    return message.prepare(start, info)
