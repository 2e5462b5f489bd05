"""The spool: the relay's only durable storage, and its one durable write path.

Role: keep each accepted message as ONE file and make every change crash-safe.
``queue/<ID>`` (``hold/<ID>`` while held) is the message file: a header line, the
envelope as it was at acceptance, then the message bytes; it is written once
(temp file, fsync, rename, fsync of the directory - group committed) and never
changed.  Later envelope changes (attempts, per-recipient state) go to
``state/<ID>.json``, which supersedes the envelope inside the message file.  A
message exists exactly when its message file exists: one fsync'd file per accepted
message, as in Postfix (the envelope and data used to be two files: twice the
fsyncs on the hot path).

Removal is an unlink without a directory fsync (as in Postfix): a crash right after
a delivery may deliver that message again, never lose it.

Per-message ``flock(2)`` locks on the message file let ``tls-relay queue`` commands
run safely while ``serve`` delivers: whoever changes a message holds its lock.

Not: deciding when to deliver (relay.queue.scheduler) or what a reply means (relay.delivery).
The envelope model is relay.queue.envelope, the in-memory handoff of just-stored
messages relay.queue.fresh, crash recovery relay.queue.recovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import itertools
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from relay.body import Body
from relay.errors import MessageBusy, MessageNotFound, SpoolError, SpoolFullError
from relay.log import event
from relay.queue import msgfile
from relay.queue.envelope import QueueEnvelope
from relay.queue.fresh import FreshMessages, Stamp
from relay.queue.incoming import Incoming
from relay.safeio import Committer, atomic_write, close_soon, fsync_dir, temp_name

log = logging.getLogger("relay.spool")

LOOP_WRITE_MAX = 256 * 1024  # store_soon: bigger messages are written by a worker thread
LOAD_WHOLE = 256 * 1024  # Spool.body: bigger messages stay on disk until sent
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_ids = random.Random(secrets.randbits(128))  # noqa: S311 - ids must be unique, not secret
# Forked workers (relay.workers) must not share one sequence of ids.
os.register_at_fork(after_in_child=lambda: _ids.seed(secrets.randbits(128)))


def durable_write(
    target: Path | str, chunks: bytes | Iterable[bytes], *, replace: bool = True
) -> None:
    """safeio.atomic_write with spool errors: ENOSPC/EDQUOT raise SpoolFullError,
    other OS errors SpoolError; nothing half-written remains either way."""
    try:
        atomic_write(target, chunks, 0o600, replace=replace)
    except OSError as exc:
        raise _spool_error(target, exc) from exc


def _unlink_quietly(*paths: str) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _spool_error(target: Path | str, exc: OSError) -> SpoolError:
    if isinstance(exc, FileExistsError):
        return SpoolError(f"queue id collision: {target} exists already; it was left as it was")
    kind = SpoolFullError if exc.errno in _FULL_ERRNOS else SpoolError
    return kind(f"cannot write {target}: {exc.strerror or exc}")


class Spool:
    """Files under one root directory; see ARCHITECTURE.md for the layout."""

    def __init__(self, root: Path, clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root)
        self.clock = clock
        self.queue_dir = self.root / "queue"
        self.hold_dir = self.root / "hold"
        self.state_dir = self.root / "state"
        self.quarantine_dir = self.root / "quarantine"
        self.control_path = self.root / "control.sock"
        self._queued, self._held = str(self.queue_dir), str(self.hold_dir)
        self._states = str(self.state_dir)
        # Messages this process just stored, for the scheduler's first pass: saves
        # re-reading and re-parsing what is still in memory (see take_fresh).
        self.fresh = FreshMessages()
        self._committer = Committer()

    # -- layout ---------------------------------------------------------------
    def setup(self) -> None:
        dirs = (self.queue_dir, self.hold_dir, self.state_dir, self.quarantine_dir)
        for d in dirs:
            try:
                d.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as exc:
                raise SpoolError(f"cannot create spool directory {d}: {exc.strerror}") from exc

    def new_id(self) -> str:
        """Sortable by arrival: microseconds since the epoch in hex, then 24 random
        bits (unique, not secret: a PRNG seeded from os.urandom, no syscall each)."""
        return f"{int(self.clock() * 1_000_000):013X}{_ids.getrandbits(24):06X}"

    def _mpath(self, qid: str, held: bool = False) -> str:
        """message_path as a string: the hot path skips pathlib."""
        return f"{self._held if held else self._queued}/{_checked(qid)}"

    def _spath(self, qid: str) -> str:
        return f"{self._states}/{_checked(qid)}.json"

    def message_path(self, qid: str, held: bool = False) -> Path:
        return Path(self._mpath(qid, held))

    def state_path(self, qid: str) -> Path:
        return Path(self._spath(qid))

    def _find(self, qid: str) -> tuple[Path, bool]:
        """The message file of *qid* and whether it is held."""
        for held in (False, True):
            path = self.message_path(qid, held)
            if path.exists():
                return path, held
        raise MessageNotFound(f"no such message: {qid}")

    # -- writes -----------------------------------------------------------------
    def store(self, envelope: QueueEnvelope, data: bytes | Iterable[bytes]) -> None:
        """Make a new message durable: one file, header + envelope + data."""
        head = msgfile.head_v1(envelope)
        chunks = [head, data] if isinstance(data, bytes) else itertools.chain([head], data)
        path = self._mpath(envelope.id)
        durable_write(path, chunks, replace=False)  # a queue id collision must not overwrite
        if isinstance(data, bytes):
            with contextlib.suppress(OSError):
                self.fresh.remember(envelope, data, _stamp(os.stat(path)))

    def take_fresh(self, qid: str) -> tuple[QueueEnvelope, bytes] | None:
        """The envelope and data this process stored for *qid*, if nobody (e.g. a
        `queue` command) changed the message since: same message file in queue/
        (inode, mtime, size) and no state file.  Call with the message locked."""
        fresh = self.fresh.take(qid)
        if fresh is None:
            return None
        if fresh.locked_since_store:  # every writer takes the lock first: unchanged
            return fresh.envelope, fresh.data
        try:
            stamp = _stamp(os.stat(self._mpath(qid)))
        except OSError:
            return None
        if stamp != fresh.stamp or os.path.exists(self._spath(qid)):
            return None
        return fresh.envelope, fresh.data

    def store_soon(self, envelope: QueueEnvelope, data: bytes) -> asyncio.Future[None]:
        """Start making a new message durable; the future is done when it is (file
        fsync'd, renamed into queue/, directory fsync'd), or fails with SpoolError.

        A small message goes to the Committer thread, which writes it and makes it
        durable batched with others (the event loop never waits on the directory,
        whose creates queue behind those renames and fsyncs); a large one goes to a
        worker thread whole.  The file stays flock'd from the start and is handed to
        the scheduler's first pass with its lock (relay.queue.fresh)."""
        if len(data) > LOOP_WRITE_MAX:
            return asyncio.ensure_future(asyncio.to_thread(self.store, envelope, data))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        target = self._mpath(envelope.id)
        chunks = (msgfile.head_v1(envelope), data)
        commit = self._committer.create(temp_name(target), target, chunks)

        def finish(commit: asyncio.Future[int]) -> None:
            exc = commit.exception()
            if exc is not None:  # nothing of it is left (safeio.Committer.create)
                assert isinstance(exc, OSError)
                done.set_exception(_spool_error(target, exc))
                return
            fd = commit.result()
            self.fresh.remember(envelope, data, _stamp(os.fstat(fd)), fd)  # fd, lock live on
            done.set_result(None)

        commit.add_done_callback(finish)
        return done

    def receive(self, qid: str) -> Incoming:
        """A message file for *qid* written as its data arrives (relay.queue.incoming);
        SpoolError (SpoolFullError) when it cannot even be started."""
        try:
            return Incoming(self._mpath(qid), self._committer, _spool_error)
        except OSError as exc:  # the temp file could not be created
            raise _spool_error(self._mpath(qid), exc) from exc

    def update(self, envelope: QueueEnvelope) -> None:
        """Durably replace the envelope (the message file itself never changes)."""
        durable_write(self.state_path(envelope.id), envelope.to_json())

    def remove(self, qid: str) -> None:
        """Remove a message: its message file first (it stops existing), then its state.

        No directory fsync: a removal lost in a crash means a second delivery, never
        a lost message (Postfix makes the same trade)."""
        try:
            os.unlink(self._mpath(qid))
        except FileNotFoundError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._mpath(qid, held=True))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._spath(qid))

    def hold(self, qid: str) -> None:
        self._move(qid, held=True)

    def release(self, qid: str) -> None:
        self._move(qid, held=False)

    def _move(self, qid: str, held: bool) -> None:
        src, dst = self.message_path(qid, not held), self.message_path(qid, held)
        try:
            os.rename(src, dst)
        except FileNotFoundError as exc:
            raise MessageNotFound(f"no such message in that state: {qid}") from exc
        fsync_dir(dst.parent)
        fsync_dir(src.parent)

    # -- reads ------------------------------------------------------------------
    def load(self, qid: str) -> QueueEnvelope:
        path, held = self._find(qid)
        try:
            blob = self.state_path(qid).read_bytes()
        except FileNotFoundError:
            try:
                with path.open("rb") as fh:
                    blob = msgfile.read_layout(fh, qid).envelope
            except FileNotFoundError as exc:
                raise MessageNotFound(f"no such message: {qid}") from exc
        return QueueEnvelope.from_json(blob, held=held)

    def read_data(self, qid: str) -> bytes:
        path, _ = self._find(qid)
        try:
            with path.open("rb") as fh:
                return msgfile.read_data(fh, msgfile.read_layout(fh, qid))
        except FileNotFoundError as exc:
            raise MessageNotFound(f"no such message: {qid}") from exc

    def body(self, qid: str, eight_bit: bool | None = None) -> Body:
        """The data of *qid* for delivery: read whole up to LOAD_WHOLE octets, else left
        on disk and read in pieces when sent (relay.body); *eight_bit* as the envelope
        says it, when it does.  Blocking."""
        path, _ = self._find(qid)
        try:
            with path.open("rb") as fh:
                layout = msgfile.read_layout(fh, qid)
                if layout.data_length <= LOAD_WHOLE:
                    return Body.of(msgfile.read_data(fh, layout))
        except FileNotFoundError as exc:
            raise MessageNotFound(f"no such message: {qid}") from exc
        return Body.on_disk(str(path), layout.data_offset, layout.data_length, eight_bit)

    def ids(self, held: bool = False) -> list[str]:
        folder = self.hold_dir if held else self.queue_dir
        return sorted(name for name in os.listdir(folder) if not name.startswith("."))

    def exists(self, qid: str) -> bool:
        return any(self.message_path(qid, held).exists() for held in (False, True))

    def stamp(self, qid: str) -> int:
        """Changes whenever the envelope may have changed: the state file's mtime, or
        the message file's for a message never updated.  OSError if gone."""
        try:
            return self.state_path(qid).stat().st_mtime_ns
        except FileNotFoundError:
            return self.message_path(qid).stat().st_mtime_ns

    # -- locking ------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, qid: str, wait: bool = False) -> Iterator[None]:
        """Exclusive per-message lock shared by `serve` and `tls-relay queue`.

        ``wait=False`` raises MessageBusy when another process holds it.
        """
        # A message this process just stored is still locked from store_soon.
        fd = self.fresh.claim_lock(qid)
        if fd >= 0:
            try:
                yield
            finally:
                _release(fd)
            return
        # The message file is the lock target: never replaced while the message
        # exists (hold/release rename it, which keeps the inode and the lock).
        for held in (False, True):
            with contextlib.suppress(FileNotFoundError):
                fd = os.open(self._mpath(qid, held), os.O_RDONLY)
                break
        if fd < 0:
            raise MessageNotFound(f"no such message: {qid}")
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError as exc:
                raise MessageBusy(
                    f"message {qid} is being delivered right now; try again shortly"
                ) from exc
            yield
        finally:
            _release(fd)

    def quarantine(self, qid: str, held: bool, reason: str) -> None:
        """Move a damaged message's files aside; they are never deleted."""
        stamp = f"{int(self.clock())}"
        for src in (self.message_path(qid, held), self.state_path(qid)):
            if src.exists():
                os.replace(src, self.quarantine_dir / f"{src.name}.{stamp}")
        fsync_dir(self.quarantine_dir)
        event(log, "spool_quarantine", level=logging.WARNING, queue_id=qid, reason=reason)

    # -- control channel ---------------------------------------------------------------
    def control_socket(self, worker: int = 0) -> Path:
        """Where `serve` (worker 0, or the only process) or worker *n* listens for kicks."""
        return self.control_path if worker == 0 else self.root / f"control.{worker}.sock"

    def kick(self) -> bool:
        """Ask a running `serve` (every worker) to rescan the queue now.  False if
        nobody listens."""
        paths = [self.control_path, *sorted(self.root.glob("control.*.sock"))]
        reached = False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            for path in paths:
                try:
                    sock.sendto(b"kick", str(path))
                    reached = True
                except OSError:
                    continue
        return reached


def _release(fd: int) -> None:
    """Close a message's lock descriptor: at once, or, when the message was removed
    meanwhile, in a background thread (that close frees the file: safeio.close_soon)."""
    try:
        removed = os.fstat(fd).st_nlink == 0
    except OSError:
        removed = False
    if removed:
        close_soon(fd)
    else:
        os.close(fd)


def _stamp(st: os.stat_result) -> Stamp:
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _checked(qid: str) -> str:
    """Queue ids come from the command line too: never let one escape the spool."""
    if not qid or not qid.isalnum() or len(qid) > 64:
        raise MessageNotFound(f"not a queue id: {qid!r}")
    return qid
