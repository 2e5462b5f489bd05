"""Safe file writes: the one durable write path every part of tls-relay uses.

Role: :func:`atomic_write` - temporary file in the target's directory, fsync,
rename over the target, fsync the directory - so a file is, after return, on
disk whole, or unchanged.  Directory fsyncs from concurrent writers are group
committed (:class:`DirSync`).  Raises OSError; callers turn it into their own
error (spool: SpoolError / SpoolFullError; users file; certificates).

:class:`Committer` is the event loop's variant for the spool's hot path: the
loop writes a temp file itself, and one thread does the fsync, the rename and the
directory fsync for every file queued meanwhile - one thread hop per batch, and
a few GIL hand-offs per file instead of one per syscall of atomic_write.

Not: knowing what the files mean (relay.queue.spool, relay.intake.users, relay.certs do).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import itertools
import os
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from relay import threads

TMP_PREFIX = ".tmp-"
_tmp_serial = itertools.count()  # next() is atomic under the GIL
_pid = os.getpid()  # a syscall each time otherwise; forked workers get their own


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def _fsync_dir_now(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirSync:
    """Group commit for one directory's fsync.

    Renames and unlinks become durable with an fsync of their directory.  When
    several threads need that at once, one fsync that *starts after* a caller's
    change covers it: callers queue behind the sync in progress and the next one
    covers all of them.  Every caller still returns only after a covering fsync
    succeeded, so 250-after-fsync holds; it just costs one fsync per batch.
    """

    def __init__(self, path: Path, fsync: Callable[[Path], None] = _fsync_dir_now) -> None:
        self.path = path
        self._fsync = fsync
        self._cond = threading.Condition()
        self._requested = 0  # ticket of the latest caller
        self._synced = 0  # every ticket <= this is durable
        self._running = False

    def sync(self) -> None:
        with self._cond:
            self._requested += 1
            ticket = self._requested
            while self._synced < ticket:
                if not self._running:
                    break
                self._cond.wait()
            else:
                return
            self._running = True
            covers = self._requested
        ok = False
        try:
            self._fsync(self.path)
            ok = True
        finally:
            with self._cond:
                self._running = False
                if ok:
                    self._synced = max(self._synced, covers)
                self._cond.notify_all()


_DIR_SYNCS: dict[str, DirSync] = {}
_DIR_SYNCS_LOCK = threading.Lock()


def fsync_dir(path: Path | str) -> None:
    """fsync a directory, batched with concurrent callers (see DirSync)."""
    key = os.fspath(path)
    with _DIR_SYNCS_LOCK:
        syncer = _DIR_SYNCS.get(key)
        if syncer is None:
            syncer = _DIR_SYNCS[key] = DirSync(Path(key))
    syncer.sync()


def atomic_write(
    target: Path | str, chunks: bytes | Iterable[bytes], mode: int = 0o600, *, replace: bool = True
) -> None:
    """Write *target* durably and atomically; OSError on failure, no temp file left.
    ``replace=False``: FileExistsError if *target* exists, which is left untouched."""
    tmp = temp_name(os.fspath(target))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            write_all(fd, [chunks] if isinstance(chunks, bytes) else chunks)
            os.fsync(fd)
        finally:
            os.close(fd)
        place(tmp, os.fspath(target), replace=replace)
        fsync_dir(os.path.dirname(tmp))
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def place(tmp: str, target: str, *, replace: bool) -> None:
    """Give the finished temp file its name.  ``replace=False`` never overwrites: a
    hard link fails with FileExistsError when *target* exists (rename would silently
    replace it), then the temp name goes."""
    if replace:
        os.replace(tmp, target)
        return
    os.link(tmp, target)
    with contextlib.suppress(OSError):  # a leftover temp name is removed at recovery
        os.unlink(tmp)


def write_all(fd: int, chunks: Iterable[bytes]) -> None:
    """os.write until every byte of every chunk is written; OSError as raised."""
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view) :]


def temp_name(target: str) -> str:
    """A temp file name next to *target* (recovery removes TMP_PREFIX names).
    O_EXCL makes it safe; pid + counter make it unique without a syscall."""
    folder, name = os.path.split(target)
    return os.path.join(folder, f"{TMP_PREFIX}{name}.{_pid}.{next(_tmp_serial)}")


_closing: queue.SimpleQueue[list[int]] = queue.SimpleQueue()
_closer: list[threading.Thread] = []
_held: collections.deque[int] = collections.deque()  # given on the loop, handed over together
_handing: list[asyncio.AbstractEventLoop | None] = [None]  # the loop a hand-over waits on
CLOSE_BATCH = 0.02  # seconds they may wait there: one thread wake-up per batch


def close_soon(fd: int) -> None:
    """Close *fd* in a background thread.  For the descriptor of a file already
    unlinked (a delivered message): its last close frees the inode, which on ext4
    waits for the journal, and must not stall the event loop.  Descriptors given on
    an event loop go to the thread together, at most CLOSE_BATCH seconds later: a
    thread wake-up (and GIL hand-over) per delivered message cost about 3 % of the
    relay's CPU at 2 KiB.  Nobody else can want such a descriptor's flock: the file
    has no name any more."""
    if not _closer or not _closer[0].is_alive():  # first use, or a forked worker
        _closer[:] = [threading.Thread(target=_close_forever, name="spool-close", daemon=True)]
        _closer[0].start()
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not on an event loop: now
        _closing.put([fd])
        return
    _held.append(fd)
    if _handing[0] is not loop:  # none waiting, or on a loop that may be gone (tests)
        _handing[0] = loop
        loop.call_later(CLOSE_BATCH, _hand_over)


def _hand_over() -> None:
    """The held descriptors to the closing thread (also at the end of ``serve``: a
    loop that stops first never runs its hand-over)."""
    _handing[0] = None
    fds = []
    with contextlib.suppress(IndexError):
        while True:
            fds.append(_held.popleft())  # each pop atomic: one appended meanwhile stays
    if fds:
        _closing.put(fds)


flush_closes = _hand_over


def _close_forever() -> None:
    threads.batch()
    while True:
        for fd in _closing.get():
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass
class _Job:
    fd: int  # the temp file, written (submit), or -1 until the thread makes it (create)
    tmp: str
    target: str
    chunks: Sequence[bytes] | None  # create: what the thread writes into *tmp* first
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future[int]
    outcome: OSError | None = None


class Committer:
    """Makes new files durable, in batches, off the event loop.

    ``submit(fd, tmp, target)``: *fd* is a temp file the caller wrote; the future is
    done once it is fsync'd, *tmp* renamed to *target* and the directory fsync'd, or
    fails with the OSError (the caller then closes *fd* and removes *tmp*/*target*).
    ``create(tmp, target, chunks)``: the same, but the thread also creates *tmp* and
    writes *chunks*, so the event loop never touches the directory (its creates wait
    for the renames and fsyncs of the same directory here); the future gives the open
    descriptor, flock'd; on failure nothing of it is left.  One daemon thread takes
    every job queued while it worked on the last batch: on ext4 the first fsync of a
    batch commits the journal for the rest, and the batch shares one directory fsync.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def submit(self, fd: int, tmp: str, target: str) -> asyncio.Future[int]:
        return self._put(fd, tmp, target, None)

    def create(self, tmp: str, target: str, chunks: Sequence[bytes]) -> asyncio.Future[int]:
        return self._put(-1, tmp, target, chunks)

    def _put(
        self, fd: int, tmp: str, target: str, chunks: Sequence[bytes] | None
    ) -> asyncio.Future[int]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[int] = loop.create_future()
        self._start()
        self._jobs.put(_Job(fd, tmp, target, chunks, loop, done))
        return done

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="spool-commit", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        threads.batch()  # its wake-ups do not preempt the event loop
        while True:
            batch = [self._jobs.get()]
            with contextlib.suppress(queue.Empty):
                while len(batch) < 1024:
                    batch.append(self._jobs.get_nowait())
            _commit_batch(batch)
            for job in batch:
                with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                    job.loop.call_soon_threadsafe(_settle, job.done, job.fd, job.outcome)


def _commit_batch(jobs: list[_Job]) -> None:
    for job in jobs:
        try:
            if job.chunks is not None:
                job.fd = _create(job.tmp, job.chunks)
            os.fsync(job.fd)
            place(job.tmp, job.target, replace=False)  # new files only: never over another
        except OSError as exc:
            job.outcome = exc
    for folder in {os.path.dirname(j.target) for j in jobs if j.outcome is None}:
        try:
            fsync_dir(folder)
        except OSError as exc:
            for job in jobs:
                if job.outcome is None and os.path.dirname(job.target) == folder:
                    job.outcome = exc
    for job in jobs:
        if job.chunks is not None and job.outcome is not None and job.fd >= 0:
            os.close(job.fd)  # ours to clean up: before or after the rename
            job.fd = -1
            collided = isinstance(job.outcome, FileExistsError)  # the target is another's
            for path in (job.tmp,) if collided else (job.tmp, job.target):
                with contextlib.suppress(OSError):
                    os.unlink(path)


def _create(tmp: str, chunks: Sequence[bytes]) -> int:
    """*tmp* created, written and flock'd (locked until the caller closes it)."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        write_all(fd, chunks)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return fd


def _settle(done: asyncio.Future[int], fd: int, outcome: OSError | None) -> None:
    if done.done():  # nobody waits any more (cancelled): a lock we made is not kept
        if outcome is None and fd >= 0 and done.cancelled():
            os.close(fd)
        return
    if outcome is None:
        done.set_result(fd)
    else:
        done.set_exception(outcome)
