"""Appending to the audit trail: one hash-chained JSON line per delivered recipient.

Role: :class:`AuditTrail` writes records to ``DIR/YYYY-MM-DD.jsonl`` (the UTC day of
the record).  Each line carries ``prev``, the SHA-256 of the line before it - across
days, the last line of the previous day's file - so editing, inserting or deleting a
line breaks the chain (:mod:`relay.audit.reader`).  Writes are grouped: records that
arrive while one batch is written and fsync'd go together in the next (like the
spool's commit thread), in one thread of its own.  An ``flock`` on ``DIR/.lock`` makes
appends from several worker processes one chain, each reading the tail under the lock.
A line torn by a crash (no newline: never acknowledged) is cut off before appending.
Not: what a record holds (built by the queue from an Outcome's Evidence), reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from relay import threads
from relay.errors import RelayError

GENESIS = "0" * 64  # `prev` of the first line ever written
TAIL = 65536  # bytes read back from a file's end to find its last line


class AuditError(RelayError):
    """The trail could not be written (disk full, permissions)."""


def line_hash(line: bytes) -> str:
    """SHA-256 of one line as stored, without its newline (what ``prev`` names)."""
    return hashlib.sha256(line).hexdigest()


def encode(record: Mapping[str, Any], prev: str) -> bytes:
    """One line: ASCII JSON (non-ASCII and undecodable reply bytes, which aiosmtplib keeps
    as lone surrogates, are escaped, so no record can fail to encode)."""
    return json.dumps({**record, "prev": prev}, separators=(",", ":")).encode("ascii")


def day_of(record: Mapping[str, Any]) -> str:
    """The UTC day a record belongs to, from its ``time`` (ISO 8601, UTC)."""
    return str(record["time"])[:10]


def day_files(root: Path) -> list[Path]:
    """The trail's files, oldest day first."""
    return sorted(p for p in root.glob("????-??-??.jsonl") if p.is_file())


def last_line(path: Path) -> bytes | None:
    """The last complete line of *path* (None when it has none)."""
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - TAIL))
            tail = fh.read()
    except FileNotFoundError:
        return None
    lines = tail.split(b"\n")
    if len(lines) < 2:  # no newline at all: nothing complete (or a line over TAIL bytes)
        return None
    return lines[-2]  # the last line followed by its newline (after it: "" or a torn one)


class AuditTrail:
    """Appends records; see the module docstring.  ``append`` returns once they are on
    disk (fsync'd), and raises :class:`AuditError` when they could not be."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._pending: list[tuple[list[dict[str, Any]], asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._thread = threads.executor(1, "audit")
        # (file, its size, hash of its last line) after our last write: the next batch
        # skips reading the tail back when no other process wrote in between.
        self._tail: tuple[Path, int, str] | None = None

    def setup(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o750)

    async def append(self, records: Sequence[Mapping[str, Any]]) -> None:
        if not records:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append(([dict(r) for r in records], done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain())
        await asyncio.shield(done)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            records = [r for group, _ in batch for r in group]
            try:
                await loop.run_in_executor(self._thread, self.write, records)
            except BaseException as exc:  # every waiting append hears of it, then go on
                error = AuditError(f"cannot write the audit trail in {self.root}: {exc}")
                for _, done in batch:
                    if not done.done():
                        done.set_exception(error)
                if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
                    raise
                continue
            for _, done in batch:
                if not done.done():
                    done.set_result(None)

    def close(self) -> None:
        self._thread.shutdown(wait=True)

    # ---- the write, in the audit thread (or any process, under the lock) --------------------

    def write(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Append *records* in order, each chained to the line before; fsync'd."""
        with self._locked():
            files = day_files(self.root)
            newest = files[-1].name[:10] if files else ""
            for day, group in _by_day(records):
                # A record stamped before midnight but written after another process
                # started the new day joins the newest file: the chain never forks.
                day = max(day, newest)
                newest = day
                self._append_day(self.root / f"{day}.jsonl", group)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _append_day(self, path: Path, records: Sequence[Mapping[str, Any]]) -> None:
        new = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            size = os.fstat(fd).st_size
            if self._tail is not None and self._tail[:2] == (path, size):
                prev = self._tail[2]  # nobody wrote since our last batch: no read-back
            else:
                _cut_torn_line(fd)
                prev = self._prev_for(path)
            out = bytearray()
            for record in records:
                line = encode(record, prev)
                out += line + b"\n"
                prev = line_hash(line)
            view = memoryview(out)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            self._tail = (path, os.fstat(fd).st_size, prev)
        except BaseException:
            self._tail = None
            raise
        finally:
            os.close(fd)
        if new:
            _fsync_dir(self.root)

    def _prev_for(self, path: Path) -> str:
        line = last_line(path)
        if line is not None:
            return line_hash(line)
        earlier = [p for p in day_files(self.root) if p.name < path.name]
        for older in reversed(earlier):
            fd = os.open(older, os.O_RDWR)
            try:
                _cut_torn_line(fd)  # a crash at 23:59 left it; never acknowledged
            finally:
                os.close(fd)
            line = last_line(older)
            if line is not None:
                return line_hash(line)
        return GENESIS


def _by_day(records: Sequence[Mapping[str, Any]]) -> list[tuple[str, list[Mapping[str, Any]]]]:
    groups: list[tuple[str, list[Mapping[str, Any]]]] = []
    for record in records:
        day = day_of(record)
        dt.date.fromisoformat(day)  # a malformed time is a bug: ValueError, not a bad file
        if groups and groups[-1][0] == day:
            groups[-1][1].append(record)
        else:
            groups.append((day, [record]))
    return groups


def _cut_torn_line(fd: int) -> None:
    """A crash mid-write can leave a last line without its newline: it was never
    fsync'd and acknowledged, so it is cut off rather than chained to."""
    size = os.fstat(fd).st_size
    if size == 0:
        return
    start = max(0, size - TAIL)
    tail = os.pread(fd, size - start, start)
    if tail.endswith(b"\n"):
        return
    cut = tail.rfind(b"\n")
    if cut >= 0 or start == 0:
        os.ftruncate(fd, start + cut + 1)  # cut == -1, start == 0: the whole file is torn


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
