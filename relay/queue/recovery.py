"""Start-up clean-up of the spool after a crash, before anything else touches it.

Role: :func:`recover` removes temp files (a message whose temp file never got its
rename never got a 250), removes state files whose message is gone, and moves a
message whose header or envelope cannot be read to quarantine/ (never deleted), so
that an operator can look at it.  Runs once per start: in ``serve``'s process, or in
the supervisor before it forks workers.
Not: normal queue operation, or repairing a damaged message.
"""

from __future__ import annotations

import logging

from relay.errors import CorruptMessage, MessageNotFound
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
