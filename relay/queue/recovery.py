"""Start-up clean-up of the spool after a crash, before anything else touches it.

Role: :func:`claim` takes the spool for one ``serve`` (an flock on ``serve.lock``) before
anything else; :func:`recover` removes temp files (a message whose temp file never got its
rename never got a 250), removes state files whose message is gone, and moves a
message whose header or envelope cannot be read to quarantine/ (never deleted), so
that an operator can look at it.  Runs once per start: in ``serve``'s process, or in
the supervisor before it forks workers.
Not: normal queue operation, or repairing a damaged message.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from relay.errors import CorruptMessage, MessageNotFound, SpoolError
from relay.log import event
from relay.queue.spool import Spool
from relay.safeio import TMP_PREFIX

log = logging.getLogger("relay.spool")


def recover(spool: Spool) -> list[str]:
    """Clean up after a crash; one line per action taken (each is logged too)."""
    spool.setup()
    actions: list[str] = []
    for folder in (spool.queue_dir, spool.hold_dir, spool.state_dir):
        for tmp in folder.glob(f"{TMP_PREFIX}*"):
            tmp.unlink(missing_ok=True)
            actions.append(f"removed temp file {tmp.name}")
    live: set[str] = set()
    for held in (False, True):
        for qid in spool.ids(held):
            problem = _problem(spool, qid)
            if problem is None:
                live.add(qid)
                continue
            spool.quarantine(qid, held, problem)
            actions.append(f"quarantined {qid}: {problem}")
    for state in spool.state_dir.iterdir():
        if state.name.endswith(".json") and state.name[:-5] not in live:
            state.unlink(missing_ok=True)
            actions.append(f"removed state without message {state.name}")
    for line in actions:
        event(log, "spool_recover", action=line)
    return actions


def _problem(spool: Spool, qid: str) -> str | None:
    """Why *qid* cannot be delivered as it is on disk, or None if it can."""
    try:
        spool.load(qid)
        spool.read_data(qid)
    except CorruptMessage as exc:
        return str(exc)
    except (OSError, ValueError, MessageNotFound) as exc:
        return f"unreadable message: {exc}"
    return None


SERVE_LOCK = "serve.lock"  # flock'd by the one `serve` (and its workers) using the spool


def claim(root: Path) -> int:
    """Take the spool for this ``serve`` (and the workers it forks, which inherit the
    descriptor): an exclusive flock on ``serve.lock``, held until the process exits.
    A second ``serve`` on the same spool would run recovery under the first one's
    feet, replace its control socket and deliver its messages twice; it stops here,
    before touching anything, with SpoolError naming the holder.  ``tls-relay queue``
    does not claim: it is safe beside ``serve`` (per-message locks)."""
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(root / SERVE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise SpoolError(f"cannot use spool {root}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise SpoolError(
            f"spool {root} is in use by another tls-relay serve (pid {holder}); "
            "stop that one first, or give this one its own spool.path"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
