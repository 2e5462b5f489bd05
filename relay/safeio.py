"""Safe file writes: the one durable write path every part of tls-relay uses.

Role: :func:`atomic_write` - temporary file in the target's directory, fsync,
rename over the target, fsync the directory - so a file is, after return, on
disk whole, or unchanged.  Directory fsyncs from concurrent writers are group
committed (:class:`DirSync`).  Raises OSError; callers turn it into their own
error (spool: SpoolError / SpoolFullError; users file; certificates).

Not: knowing what the files mean (spool.py, users.py, certs.py do).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

TMP_PREFIX = ".tmp-"
_tmp_serial = itertools.count()  # next() is atomic under the GIL


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


def atomic_write(target: Path | str, chunks: bytes | Iterable[bytes], mode: int = 0o600) -> None:
    """Write *target* durably and atomically; OSError on failure, no temp file left."""
    folder, name = os.path.split(os.fspath(target))
    # O_EXCL makes the name safe; pid + counter make it unique without a syscall.
    tmp = os.path.join(folder, f"{TMP_PREFIX}{name}.{os.getpid()}.{next(_tmp_serial)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            for chunk in [chunks] if isinstance(chunks, bytes) else chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        fsync_dir(folder)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
