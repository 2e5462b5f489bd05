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

Not: deciding when to deliver (scheduler.py) or what a reply means (delivery.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import errno
import fcntl
import itertools
import json
import logging
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from relay.errors import CorruptMessage, MessageBusy, MessageNotFound, SpoolError, SpoolFullError
from relay.log import event
from relay.safeio import TMP_PREFIX, Committer, atomic_write, fsync_dir, temp_name, write_all

log = logging.getLogger("relay.spool")

ENVELOPE_VERSION = 1
MAGIC = b"TLS-RELAY-MESSAGE 1 "  # + envelope length, LF; then envelope, then data
FRESH_MAX = 512  # messages kept in memory between store and first delivery pass
FRESH_MAX_BYTES = 64 * 1024 * 1024
LOOP_WRITE_MAX = 256 * 1024  # store_soon: bigger messages are written by a worker thread
HISTORY_LIMIT = 25  # attempts remembered per recipient; older ones are dropped
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_ids = random.Random(secrets.randbits(128))  # noqa: S311 - ids must be unique, not secret
# Forked workers (relay.workers) must not share one sequence of ids.
os.register_at_fork(after_in_child=lambda: _ids.seed(secrets.randbits(128)))


class RcptState(enum.StrEnum):
    QUEUED = "queued"  # not tried yet
    DEFERRED = "deferred"  # tried, transient failure, will retry
    DELIVERED = "delivered"  # final: the MX accepted it
    BOUNCED = "bounced"  # final: permanent failure or expired; DSN sent (unless null sender)

    @property
    def final(self) -> bool:
        return self in (RcptState.DELIVERED, RcptState.BOUNCED)


@dataclass
class Attempt:
    at: float
    outcome: str  # "delivered" | "transient" | "permanent" | "expired" | "operator"
    reason: str
    mx: str | None = None
    ip: str | None = None
    tls: str | None = None
    reply: str | None = None  # the MX's reply ("550 5.1.1 text") as data, for DSNs


@dataclass
class Recipient:
    address: str
    options: list[str] = field(default_factory=list)
    state: RcptState = RcptState.QUEUED
    attempts: int = 0
    next_attempt: float = 0.0
    last_reason: str | None = None
    history: list[Attempt] = field(default_factory=list)

    def record(self, attempt: Attempt) -> None:
        self.history.append(attempt)
        del self.history[:-HISTORY_LIMIT]
        self.last_reason = attempt.reason


@dataclass
class ClientInfo:
    ip: str
    port: int
    helo: str | None = None
    user: str | None = None
    tls_version: str | None = None
    tls_cipher: str | None = None
    listener: str | None = None


@dataclass
class Envelope:
    id: str
    created: float
    sender: str  # "" is the null reverse-path <>
    recipients: list[Recipient]
    mail_options: list[str] = field(default_factory=list)
    client: ClientInfo | None = None
    size: int = 0
    bounce: bool = False  # this message is itself a DSN
    warned: bool = False  # a delay warning was sent
    held: bool = False  # derived from where the envelope sits; not serialised

    @property
    def done(self) -> bool:
        return all(r.state.final for r in self.recipients)

    def to_json(self) -> bytes:
        # By hand rather than dataclasses.asdict (a recursive deep copy): this runs
        # for every accepted message.  test_spool round-trips every field.
        raw = dict(vars(self))
        raw.pop("held")
        raw["recipients"] = [
            {**vars(r), "history": [vars(a) for a in r.history]} for r in self.recipients
        ]
        raw["client"] = vars(self.client) if self.client is not None else None
        raw["version"] = ENVELOPE_VERSION
        return json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, blob: bytes, held: bool = False) -> Envelope:
        try:
            raw: dict[str, Any] = json.loads(blob)
            if raw.pop("version", None) != ENVELOPE_VERSION:
                raise ValueError("unknown envelope version")
            client = raw.pop("client", None)
            rcpts = [_recipient(r) for r in raw.pop("recipients")]
            env = cls(recipients=rcpts, client=ClientInfo(**client) if client else None, **raw)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise CorruptMessage(f"envelope cannot be parsed: {exc}") from exc
        env.held = held
        if not env.id or not env.recipients:
            raise CorruptMessage("envelope has no id or no recipients")
        return env


def _recipient(raw: dict[str, Any]) -> Recipient:
    history = [Attempt(**a) for a in raw.pop("history", [])]
    state = RcptState(raw.pop("state"))
    return Recipient(state=state, history=history, **raw)


def durable_write(target: Path | str, chunks: bytes | Iterable[bytes], mode: int = 0o600) -> None:
    """safeio.atomic_write with spool errors: ENOSPC/EDQUOT raise SpoolFullError,
    other OS errors SpoolError; nothing half-written remains either way."""
    try:
        atomic_write(target, chunks, mode)
    except OSError as exc:
        raise _spool_error(target, exc) from exc


def _unlink_quietly(*paths: str) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _spool_error(target: Path | str, exc: OSError) -> SpoolError:
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
        self._fresh: collections.OrderedDict[str, _Fresh] = collections.OrderedDict()
        self._fresh_bytes = 0
        self._fresh_lock = threading.Lock()
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
    def store(self, envelope: Envelope, data: bytes | Iterable[bytes]) -> None:
        """Make a new message durable: one file, header + envelope + data."""
        head = _head(envelope)
        chunks = [head, data] if isinstance(data, bytes) else itertools.chain([head], data)
        path = self._mpath(envelope.id)
        durable_write(path, chunks)
        if isinstance(data, bytes):
            with contextlib.suppress(OSError):
                self._remember(envelope, data, _stamp(os.stat(path)))

    def _remember(
        self, envelope: Envelope, data: bytes, stamp: tuple[int, int, int], fd: int = -1
    ) -> None:
        with self._fresh_lock:
            self._fresh[envelope.id] = _Fresh(stamp, envelope, data, fd)
            self._fresh_bytes += len(data)
            while self._fresh and (
                len(self._fresh) > FRESH_MAX or self._fresh_bytes > FRESH_MAX_BYTES
            ):
                _, dropped = self._fresh.popitem(last=False)
                self._drop(dropped)

    def _drop(self, fresh: _Fresh) -> None:
        self._fresh_bytes -= len(fresh.data)
        if fresh.fd >= 0:
            os.close(fresh.fd)  # releases the lock taken at store time
            fresh.fd = -1

    def forget_fresh(self) -> None:
        """Drop every just-stored message from memory and release its lock (stop)."""
        with self._fresh_lock:
            while self._fresh:
                self._drop(self._fresh.popitem()[1])

    def take_fresh(self, qid: str) -> tuple[Envelope, bytes] | None:
        """The envelope and data this process stored for *qid*, if nobody (e.g. a
        `queue` command) changed the message since: same message file in queue/
        (inode, mtime, size) and no state file.  Call with the message locked."""
        with self._fresh_lock:
            fresh = self._fresh.pop(qid, None)
            if fresh is not None:
                self._drop(fresh)
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

    def store_soon(self, envelope: Envelope, data: bytes) -> asyncio.Future[None]:
        """Start making a new message durable; the future is done when it is (file
        fsync'd, renamed into queue/, directory fsync'd), or fails with SpoolError.

        A small message is written by the loop itself into the page cache and the
        Committer thread makes it durable, batched with others; a large one goes to
        a worker thread whole, so the loop never copies megabytes."""
        if len(data) > LOOP_WRITE_MAX:
            return asyncio.ensure_future(asyncio.to_thread(self.store, envelope, data))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        head = _head(envelope)
        target = self._mpath(envelope.id)
        tmp = temp_name(target)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            done.set_exception(_spool_error(target, exc))
            return done
        try:
            write_all(fd, (head, data))
            stamp = _stamp(os.fstat(fd))
            # Locked from the start and handed to the scheduler's first pass (lock()).
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            commit = self._committer.submit(fd, tmp, target)
        except OSError as exc:
            os.close(fd)
            _unlink_quietly(tmp)
            done.set_exception(_spool_error(target, exc))
            return done

        def finish(commit: asyncio.Future[None]) -> None:
            exc = commit.exception()
            if exc is None:
                self._remember(envelope, data, stamp, fd)  # fd (and lock) live on there
                done.set_result(None)
                return
            os.close(fd)
            _unlink_quietly(tmp, target)  # it failed before or after the rename
            assert isinstance(exc, OSError)
            done.set_exception(_spool_error(target, exc))

        commit.add_done_callback(finish)
        return done

    def update(self, envelope: Envelope) -> None:
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
    def load(self, qid: str) -> Envelope:
        path, held = self._find(qid)
        try:
            blob = self.state_path(qid).read_bytes()
        except FileNotFoundError:
            try:
                with path.open("rb") as fh:
                    blob = _read_head(fh, qid)
            except FileNotFoundError as exc:
                raise MessageNotFound(f"no such message: {qid}") from exc
        return Envelope.from_json(blob, held=held)

    def read_data(self, qid: str) -> bytes:
        path, _ = self._find(qid)
        try:
            with path.open("rb") as fh:
                _read_head(fh, qid)
                return fh.read()
        except FileNotFoundError as exc:
            raise MessageNotFound(f"no such message: {qid}") from exc

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
        with self._fresh_lock:
            fresh = self._fresh.get(qid)
            fd = fresh.fd if fresh is not None else -1
            if fresh is not None and fd >= 0:
                fresh.fd, fresh.locked_since_store = -1, True
        if fd >= 0:
            try:
                yield
            finally:
                os.close(fd)
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
            os.close(fd)

    # -- recovery -----------------------------------------------------------------
    def recover(self) -> list[str]:
        """Startup clean-up after a crash.  Returns one line per action taken.

        Temp files are removed (a message whose temp file never got its rename
        never got a 250); a state file without its message is removed; a message
        whose header or envelope cannot be parsed is moved to quarantine (never
        deleted) so an operator can look at it.
        """
        self.setup()
        actions: list[str] = []
        for folder in (self.queue_dir, self.hold_dir, self.state_dir):
            for tmp in folder.glob(f"{TMP_PREFIX}*"):
                tmp.unlink(missing_ok=True)
                actions.append(f"removed temp file {tmp.name}")
        live: set[str] = set()
        for held in (False, True):
            for qid in self.ids(held):
                problem = self._check_one(qid)
                if problem is None:
                    live.add(qid)
                    continue
                self.quarantine(qid, held, problem)
                actions.append(f"quarantined {qid}: {problem}")
        for state in self.state_dir.iterdir():
            if state.name.endswith(".json") and state.name[:-5] not in live:
                state.unlink(missing_ok=True)
                actions.append(f"removed state without message {state.name}")
        for line in actions:
            event(log, "spool_recover", action=line)
        return actions

    def _check_one(self, qid: str) -> str | None:
        try:
            self.load(qid)
            self.read_data(qid)
        except CorruptMessage as exc:
            return str(exc)
        except (OSError, ValueError, MessageNotFound) as exc:
            return f"unreadable message: {exc}"
        return None

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


def _head(envelope: Envelope) -> bytes:
    """A message file's header line and envelope; the data follows (_read_head)."""
    blob = envelope.to_json()
    return b"%s%d\n%s" % (MAGIC, len(blob), blob)


def _read_head(fh: BinaryIO, qid: str) -> bytes:
    """Read a message file's header line and envelope; *fh* is left at the data."""
    line = fh.readline(64)
    if not line.startswith(MAGIC) or not line.endswith(b"\n"):
        raise CorruptMessage(f"message {qid} has no spool header")
    try:
        length = int(line[len(MAGIC) : -1])
    except ValueError as exc:
        raise CorruptMessage(f"message {qid} has a bad spool header") from exc
    blob = fh.read(length)
    if len(blob) != length:
        raise CorruptMessage(f"message {qid} is truncated")
    return blob


@dataclass
class _Fresh:
    stamp: tuple[int, int, int]
    envelope: Envelope
    data: bytes
    fd: int = -1  # the message file, flock'd since it was written; -1 once handed on
    locked_since_store: bool = False  # lock() used fd: nobody can have changed it


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _checked(qid: str) -> str:
    """Queue ids come from the command line too: never let one escape the spool."""
    if not qid or not qid.isalnum() or len(qid) > 64:
        raise MessageNotFound(f"not a queue id: {qid!r}")
    return qid
