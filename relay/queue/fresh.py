"""Messages this process just stored, kept in memory for the scheduler's first pass.

Role: between ``Spool.store_soon`` and the first delivery pass a message's envelope
and data are still in memory; keeping them (bounded by count and bytes) saves
re-reading and re-parsing the file at once.  A message written by ``store_soon``
also stays ``flock``'d from the moment it was written: the file descriptor that
holds the lock lives here until the scheduler's pass takes it over
(:meth:`FreshMessages.claim_lock`), so no ``tls-relay queue`` command can change
the message in between.
Not: deciding whether a remembered copy is still current (``Spool.take_fresh``
compares it with the file) or any file I/O besides closing the lock descriptors.
"""

from __future__ import annotations

import collections
import os
import threading
from dataclasses import dataclass

from relay.queue.envelope import QueueEnvelope

FRESH_MAX = 512  # messages kept in memory between store and first delivery pass
FRESH_MAX_BYTES = 64 * 1024 * 1024

Stamp = tuple[int, int, int]  # inode, mtime_ns, size of the message file


@dataclass
class Fresh:
    stamp: Stamp
    envelope: QueueEnvelope
    data: bytes
    fd: int = -1  # the message file, flock'd since it was written; -1 once handed on
    locked_since_store: bool = False  # claim_lock used fd: nobody can have changed it


class FreshMessages:
    """A bounded, thread-safe map of queue id to :class:`Fresh` (the Committer thread
    and ``Spool.store`` in worker threads add to it; the loop takes from it)."""

    def __init__(self) -> None:
        self._items: collections.OrderedDict[str, Fresh] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def remember(self, envelope: QueueEnvelope, data: bytes, stamp: Stamp, fd: int = -1) -> None:
        """Keep *envelope* and *data*; the oldest are dropped past the bounds."""
        with self._lock:
            self._items[envelope.id] = Fresh(stamp, envelope, data, fd)
            self._bytes += len(data)
            while self._items and (len(self._items) > FRESH_MAX or self._bytes > FRESH_MAX_BYTES):
                _, dropped = self._items.popitem(last=False)
                self._drop(dropped)

    def take(self, qid: str) -> Fresh | None:
        """Remove and return what is remembered for *qid* (its lock released)."""
        with self._lock:
            fresh = self._items.pop(qid, None)
            if fresh is not None:
                self._drop(fresh)
        return fresh

    def claim_lock(self, qid: str) -> int:
        """The descriptor that still holds *qid*'s lock since it was stored, now the
        caller's to close; -1 when there is none."""
        with self._lock:
            fresh = self._items.get(qid)
            if fresh is None or fresh.fd < 0:
                return -1
            fd, fresh.fd, fresh.locked_since_store = fresh.fd, -1, True
            return fd

    def clear(self) -> None:
        """Drop everything and release every lock still held (at stop)."""
        with self._lock:
            while self._items:
                self._drop(self._items.popitem()[1])

    def _drop(self, fresh: Fresh) -> None:
        self._bytes -= len(fresh.data)
        if fresh.fd >= 0:
            os.close(fresh.fd)  # releases the lock taken at store time
            fresh.fd = -1
