"""Structured log lines: ``event key=value key="value with spaces"``.

One line per event, greppable, stable keys.  Setup of handlers happens once in
relay.app / relay.cli; modules only call :func:`event`.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any

_SAFE = re.compile(r"[A-Za-z0-9@._\-:/+\[\]<>,=]+")  # printed bare; anything else is quoted
# Escaped inside quotes: C0 and C1 controls (terminal escape sequences, CR/LF that
# would forge a second log line), DEL, Unicode line and paragraph separators, and
# lone surrogates (undecodable client bytes).  Values come from clients: user names,
# HELO names, addresses.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _SHORT.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    text = str(value)
    if _SAFE.fullmatch(text):
        return text
    escaped = _CONTROL.sub(_escape, text.replace("\\", "\\\\").replace('"', '\\"'))
    return f'"{escaped}"'


def format_event(name: str, **fields: Any) -> str:
    parts = [name]
    parts.extend(f"{key}={_fmt(val)}" for key, val in fields.items())
    return " ".join(parts)


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured line."""
    if logger.isEnabledFor(level):
        logger.log(level, format_event(name, **fields))


class Throttle:
    """At most *burst* lines per *interval* seconds for one kind of event, so a scan
    (thousands of failed TLS handshakes) cannot flood the log; the next line let
    through says how many were held back."""

    def __init__(
        self, burst: int = 10, interval: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._burst, self._interval, self._clock = burst, interval, clock
        self._start = -interval
        self._used = 0
        self._held = 0

    def allow(self) -> int | None:
        """None: do not log this one.  Otherwise log it, with the returned count of
        lines held back since the last one logged."""
        now = self._clock()
        if now - self._start >= self._interval:
            self._start, self._used = now, 0
        if self._used >= self._burst:
            self._held += 1
            return None
        self._used += 1
        held, self._held = self._held, 0
        return held


class LineFormatter(logging.Formatter):
    """``2026-11-29 06:30:22,123 INFO relay.listener message``, UTC.

    What ``Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")`` with
    gmtime prints, with the date part formatted once per second, not per line
    (a few log lines go with every message the relay handles)."""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(second))
        msecs = int((record.created - second) * 1000)
        line = f"{self._stamp},{msecs:03d} {record.levelname} {record.name} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def setup(level: str = "INFO") -> None:
    """Log to stderr, one line per event, UTC timestamps."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LineFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Fields our format never shows; skipping them saves a stack walk per line
    # (logging docs, "Optimization").
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's chatter
