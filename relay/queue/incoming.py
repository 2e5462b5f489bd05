"""A message being received, written to the spool as it arrives.

Role: for a message too large to hold in memory whole, intake (relay.intake.reception)
writes the data to a temp file in ``queue/`` piece by piece, in a worker thread so the
event loop never waits for the disk, and :meth:`Incoming.commit` adds the envelope,
fills in the fixed-width header (message file layout 2, relay.queue.msgfile) and
makes it a message the same way ``Spool.store_soon`` does: fsync, rename into
``queue/``, directory fsync, group committed.  Until then it is a temp file, which
:meth:`Incoming.abort` (or crash recovery) removes: no message exists before commit,
so nothing that did not get its 250 is ever delivered.
Not: what the data is (relay.intake), or the small-message path (relay.queue.spool).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import Callable, Sequence

from relay.errors import SpoolError
from relay.queue import msgfile
from relay.queue.envelope import QueueEnvelope
from relay.safeio import Committer, temp_name, write_all


class Incoming:
    def __init__(
        self, target: str, committer: Committer, error: Callable[[str, OSError], SpoolError]
    ) -> None:
        self.target = target
        self._error = error  # OSError -> SpoolError / SpoolFullError, as the spool words it
        self.tmp = temp_name(target)
        self.size = 0  # data bytes written so far
        self._committer = committer
        self._busy: asyncio.Future[None] | None = None  # a write, in a thread
        self._committing = False
        self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # Locked until commit() ends: a rescan that sees the renamed file before its
            # directory fsync succeeded must not deliver what the client may get 451 for.
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            write_all(self._fd, (msgfile.header_v2(0),))  # filled in by commit()
        except OSError as exc:
            self._discard(self.tmp)
            raise error(target, exc) from exc

    async def write(self, pieces: Sequence[bytes]) -> None:
        """Append *pieces* to the data (SpoolError: the caller aborts).  A cancelled caller
        does not stop the thread: abort() waits for it before closing the file."""
        self._busy = asyncio.ensure_future(asyncio.to_thread(write_all, self._fd, pieces))
        try:
            await asyncio.shield(self._busy)
        except OSError as exc:
            raise self._error(self.target, exc) from exc
        self.size += sum(map(len, pieces))

    async def commit(self, envelope: QueueEnvelope) -> None:
        """Make the message durable with *envelope* (its size is the data written).
        Raises SpoolError when it could not be; then nothing of it is left."""
        assert envelope.size == self.size, "the envelope must say the size written"
        fd = self._fd
        self._committing = True  # from here on only commit() itself removes the files

        def finish() -> None:
            write_all(fd, (envelope.to_json(),))
            os.pwrite(fd, msgfile.header_v2(self.size), 0)

        try:
            await asyncio.to_thread(finish)
            await self._committer.submit(fd, self.tmp, self.target)
        except FileExistsError as exc:
            self._committing = False
            self._discard(self.tmp)  # a queue id collision: the other message stays
            raise self._error(self.target, exc) from exc
        except OSError as exc:
            self._committing = False
            self._discard(self.tmp, self.target)  # before or after the rename
            raise self._error(self.target, exc) from exc
        os.close(fd)
        self._fd = -1

    def abort(self) -> None:
        """Forget the message: the temp file goes, once a write in progress ended."""
        if self._committing:
            return
        busy = self._busy
        if busy is not None and not busy.done():
            busy.add_done_callback(lambda done: done.cancelled() or done.exception())
            busy.add_done_callback(lambda _: self._discard(self.tmp))
        else:
            self._discard(self.tmp)

    def _discard(self, *paths: str) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            for path in paths:
                with contextlib.suppress(OSError):
                    os.unlink(path)
