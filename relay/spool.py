"""The spool: the relay's only durable storage, and its one durable write path.

Role: keep each accepted message as two files and make every change to them
crash-safe.  ``data/<ID>`` holds the message bytes (immutable once written);
``queue/<ID>.json`` (or ``hold/<ID>.json`` while held) holds the envelope and the
per-recipient state.  A message exists exactly when its envelope file exists:
:meth:`Spool.store` writes and fsyncs the data first and the envelope last, so a
crash in between leaves only an orphaned data file, which :meth:`Spool.recover`
removes (that message never got a 250).

Every write goes through :func:`durable_write`: temporary file in the target
directory, fsync, rename over the target, fsync the directory.

Per-message ``flock(2)`` locks on the data file let ``tls-relay queue`` commands
run safely while ``serve`` delivers: whoever changes a message holds its lock.

Not: deciding when to deliver (scheduler.py) or what a reply means (delivery.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import errno
import fcntl
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay.errors import CorruptMessage, MessageBusy, MessageNotFound, SpoolError, SpoolFullError
from relay.log import event
from relay.safeio import TMP_PREFIX, atomic_write, fsync_dir

log = logging.getLogger("relay.spool")

ENVELOPE_VERSION = 1
FRESH_MAX = 512  # messages kept in memory between store and first delivery pass
FRESH_MAX_BYTES = 64 * 1024 * 1024
HISTORY_LIMIT = 25  # attempts remembered per recipient; older ones are dropped
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


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
        raw = dataclasses.asdict(self)
        raw.pop("held")
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


def durable_write(target: Path, chunks: bytes | Iterable[bytes], mode: int = 0o600) -> None:
    """safeio.atomic_write with spool errors: ENOSPC/EDQUOT raise SpoolFullError,
    other OS errors SpoolError; nothing half-written remains either way."""
    try:
        atomic_write(target, chunks, mode)
    except OSError as exc:
        kind = SpoolFullError if exc.errno in _FULL_ERRNOS else SpoolError
        raise kind(f"cannot write {target}: {exc.strerror or exc}") from exc


class Spool:
    """Files under one root directory; see ARCHITECTURE.md for the layout."""

    def __init__(self, root: Path, clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root)
        self.clock = clock
        self.data_dir = self.root / "data"
        self.queue_dir = self.root / "queue"
        self.hold_dir = self.root / "hold"
        self.quarantine_dir = self.root / "quarantine"
        self.control_path = self.root / "control.sock"
        # Messages this process just stored, for the scheduler's first pass: saves
        # re-reading and re-parsing what is still in memory (see take_fresh).
        self._fresh: collections.OrderedDict[str, _Fresh] = collections.OrderedDict()
        self._fresh_bytes = 0
        self._fresh_lock = threading.Lock()

    # -- layout ---------------------------------------------------------------
    def setup(self) -> None:
        dirs = (self.data_dir, self.queue_dir, self.hold_dir, self.quarantine_dir)
        for d in dirs:
            try:
                d.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as exc:
                raise SpoolError(f"cannot create spool directory {d}: {exc.strerror}") from exc

    def new_id(self) -> str:
        """Sortable by arrival: microseconds since the epoch in hex, then randomness."""
        return f"{int(self.clock() * 1_000_000):013X}{secrets.token_hex(3).upper()}"

    def _env_path(self, qid: str, held: bool = False) -> Path:
        return (self.hold_dir if held else self.queue_dir) / f"{_checked(qid)}.json"

    def data_path(self, qid: str) -> Path:
        return self.data_dir / _checked(qid)

    # -- writes -----------------------------------------------------------------
    def store(self, envelope: Envelope, data: bytes | Iterable[bytes]) -> None:
        """Make a new message durable: data first, envelope last (the commit point)."""
        data_path = self.data_path(envelope.id)
        durable_write(data_path, data)
        env_path = self._env_path(envelope.id)
        try:
            durable_write(env_path, envelope.to_json())
        except SpoolError:
            with contextlib.suppress(OSError):
                data_path.unlink()
            raise
        if isinstance(data, bytes):
            with contextlib.suppress(OSError):
                self._remember(envelope, data, _stamp(os.stat(env_path)))

    def _remember(self, envelope: Envelope, data: bytes, stamp: tuple[int, int, int]) -> None:
        with self._fresh_lock:
            self._fresh[envelope.id] = _Fresh(stamp, envelope, data)
            self._fresh_bytes += len(data)
            while self._fresh and (
                len(self._fresh) > FRESH_MAX or self._fresh_bytes > FRESH_MAX_BYTES
            ):
                _, dropped = self._fresh.popitem(last=False)
                self._fresh_bytes -= len(dropped.data)

    def take_fresh(self, qid: str) -> tuple[Envelope, bytes] | None:
        """The envelope and data this process stored for *qid*, if the envelope file
        is still exactly the one written (same inode, mtime and size): nobody, e.g.
        a `queue` command, changed it since.  Call with the message locked."""
        with self._fresh_lock:
            fresh = self._fresh.pop(qid, None)
            if fresh is not None:
                self._fresh_bytes -= len(fresh.data)
        if fresh is None:
            return None
        try:
            stamp = _stamp(os.stat(self._env_path(qid)))
        except OSError:
            return None
        return (fresh.envelope, fresh.data) if stamp == fresh.stamp else None

    async def store_async(self, envelope: Envelope, data: bytes) -> None:
        await asyncio.to_thread(self.store, envelope, data)

    def update(self, envelope: Envelope) -> None:
        """Durably replace the envelope where it sits (queue or hold)."""
        durable_write(self._env_path(envelope.id, envelope.held), envelope.to_json())

    def remove(self, qid: str) -> None:
        """Remove a message: envelope first (it stops existing), then its data."""
        for path in (self._env_path(qid), self._env_path(qid, held=True)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                fsync_dir(path.parent)
        with contextlib.suppress(FileNotFoundError):
            self.data_path(qid).unlink()

    def hold(self, qid: str) -> None:
        self._move(self._env_path(qid), self._env_path(qid, held=True), qid)

    def release(self, qid: str) -> None:
        self._move(self._env_path(qid, held=True), self._env_path(qid), qid)

    def _move(self, src: Path, dst: Path, qid: str) -> None:
        try:
            os.rename(src, dst)
        except FileNotFoundError as exc:
            raise MessageNotFound(f"no such message in that state: {qid}") from exc
        fsync_dir(dst.parent)
        fsync_dir(src.parent)

    # -- reads ------------------------------------------------------------------
    def load(self, qid: str) -> Envelope:
        for held in (False, True):
            try:
                blob = self._env_path(qid, held).read_bytes()
            except FileNotFoundError:
                continue
            return Envelope.from_json(blob, held=held)
        raise MessageNotFound(f"no such message: {qid}")

    def read_data(self, qid: str) -> bytes:
        try:
            return self.data_path(qid).read_bytes()
        except FileNotFoundError as exc:
            raise CorruptMessage(f"message {qid} has no data file") from exc

    def ids(self, held: bool = False) -> list[str]:
        folder = self.hold_dir if held else self.queue_dir
        return sorted(
            p.name[:-5]
            for p in folder.iterdir()
            if p.name.endswith(".json") and not p.name.startswith(".")
        )

    def exists(self, qid: str) -> bool:
        return self._env_path(qid).exists() or self._env_path(qid, held=True).exists()

    # -- locking ------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, qid: str, wait: bool = False) -> Iterator[None]:
        """Exclusive per-message lock shared by `serve` and `tls-relay queue`.

        ``wait=False`` raises MessageBusy when another process holds it.
        """
        # The data file is the lock target: it is never replaced while the message
        # exists, so no extra lock file is created and removed per message.
        try:
            fd = os.open(self.data_path(qid), os.O_RDONLY)
        except FileNotFoundError as exc:
            raise MessageNotFound(f"no such message: {qid}") from exc
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

        Temp files are removed; data without an envelope never got a 250 and is
        removed; an envelope that cannot be parsed or lost its data is moved to
        quarantine (never deleted) so an operator can look at it.
        """
        self.setup()
        actions: list[str] = []
        for folder in (self.data_dir, self.queue_dir, self.hold_dir):
            for tmp in folder.glob(f"{TMP_PREFIX}*"):
                tmp.unlink(missing_ok=True)
                actions.append(f"removed temp file {tmp.name}")
        live: set[str] = set()
        for held in (False, True):
            for qid in self.ids(held):
                problem = self._check_one(qid, held)
                if problem is None:
                    live.add(qid)
                    continue
                self.quarantine(qid, held, problem)
                actions.append(f"quarantined {qid}: {problem}")
        for data in self.data_dir.iterdir():
            if data.name not in live and not data.name.startswith("."):
                data.unlink(missing_ok=True)
                actions.append(f"removed data without envelope {data.name} (never acknowledged)")
        for line in actions:
            event(log, "spool_recover", action=line)
        return actions

    def _check_one(self, qid: str, held: bool) -> str | None:
        try:
            Envelope.from_json(self._env_path(qid, held).read_bytes(), held=held)
        except CorruptMessage as exc:
            return str(exc)
        except (OSError, ValueError) as exc:
            return f"unreadable envelope: {exc}"
        if not self.data_path(qid).exists():
            return "data file missing"
        return None

    def quarantine(self, qid: str, held: bool, reason: str) -> None:
        """Move a damaged message's files aside; they are never deleted."""
        stamp = f"{int(self.clock())}"
        for src in (self._env_path(qid, held), self.data_path(qid)):
            if src.exists():
                os.replace(src, self.quarantine_dir / f"{src.name}.{stamp}")
        fsync_dir(self.quarantine_dir)
        event(log, "spool_quarantine", level=logging.WARNING, queue_id=qid, reason=reason)

    # -- control channel ---------------------------------------------------------------
    def kick(self) -> bool:
        """Ask a running `serve` to rescan the queue now.  False if none listens."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto(b"kick", str(self.control_path))
            except OSError:
                return False
        return True


@dataclass
class _Fresh:
    stamp: tuple[int, int, int]
    envelope: Envelope
    data: bytes


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _checked(qid: str) -> str:
    """Queue ids come from the command line too: never let one escape the spool."""
    if not qid or not qid.isalnum() or len(qid) > 64:
        raise MessageNotFound(f"not a queue id: {qid!r}")
    return qid
