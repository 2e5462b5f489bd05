"""Health of a running relay: ``/healthz`` (the process serves) and ``/readyz`` (it can
take mail), for load balancers, Kubernetes probes and Docker's HEALTHCHECK.

Role: :class:`Readiness` answers None when the relay is ready, else one sentence why
not: its listeners are not (yet) bound, the spool cannot be written (a probe file is
created and removed in ``queue/``, the directory new messages go to), or the spool's
file system has less free space than :func:`min_free` - twice the largest message, at
least 100 MiB - so a 250 could not be kept.
Not: the HTTP server (relay.metrics) or what is done about it.
"""

from __future__ import annotations

import os
from pathlib import Path

FLOOR = 100 * 1024 * 1024  # bytes free the spool needs at least


def min_free(max_message_size: int) -> int:
    return max(FLOOR, 2 * max_message_size)


class Readiness:
    def __init__(self, spool_queue: Path, max_message_size: int) -> None:
        self.queue = spool_queue
        self.needed = min_free(max_message_size)
        self.listening = False  # set once every listener is bound (App.start)

    def problem(self) -> str | None:
        if not self.listening:
            return "listeners not bound yet"
        probe = self.queue / f".readyz-{os.getpid()}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"x")
            finally:
                os.close(fd)
            probe.unlink()
        except OSError as exc:
            return f"spool {self.queue} is not writable: {exc.strerror or exc}"
        try:
            st = os.statvfs(self.queue)
        except OSError as exc:
            return f"cannot read the free space of {self.queue}: {exc.strerror or exc}"
        free = st.f_bavail * st.f_frsize
        if free < self.needed:
            mib = 1024 * 1024
            return (
                f"spool {self.queue} has {free // mib} MiB free, "
                f"below the {self.needed // mib} MiB it needs"
            )
        return None
