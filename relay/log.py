"""Structured log lines: ``event key=value key="value with spaces"``.

One line per event, greppable, stable keys.  Setup of handlers happens once in
relay.app / relay.cli; modules only call :func:`event`.
"""

from __future__ import annotations

import contextlib
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
        direct = _direct[0]
        if direct is not None and level < logging.WARNING and direct.alone(logger):
            direct.write(logger.name, level, format_event(name, **fields))
        else:
            logger.log(level, format_event(name, **fields))


class _DirectLine:
    """The line :func:`setup`'s handler would write, written without building a
    LogRecord and passing it through the logging machinery: that machinery cost about
    a tenth of the relay's CPU at a few INFO lines per 2 KiB message.  Used only while
    that handler is the only one (so a test's log capture, or any handler added
    later, sees every line through logging as before), and never for WARNING and
    above (exceptions and stack traces stay logging's)."""

    def __init__(self, handler: logging.StreamHandler) -> None:  # type: ignore[type-arg]
        self.handler = handler
        self.formatter = LineFormatter()

    def alone(self, logger: logging.Logger) -> bool:
        """Whether a record from *logger* would reach our handler, unfiltered, and
        nothing else: no handler or filter on the way up to the root, none stopping
        propagation, our handler the root's only one."""
        handler, root = self.handler, logging.root
        if root.handlers != [handler] or handler.filters or root.filters or handler.level:
            return False
        node: logging.Logger | None = logger
        while node is not None and node is not root:
            if node.handlers or node.filters or not node.propagate:
                return False
            node = node.parent
        return True

    def write(self, name: str, level: int, message: str) -> None:
        handler = self.handler
        with handler.lock:  # type: ignore[union-attr]  # also guards the formatter's cache
            line = self.formatter.line(time.time(), logging.getLevelName(level), name, message)
            try:
                handler.stream.write(line + handler.terminator)
                handler.flush()
            except Exception:  # as logging.Handler.handleError: never raise into callers
                if logging.raiseExceptions:
                    with contextlib.suppress(Exception):  # stderr itself may be the broken one
                        sys.stderr.write(f"--- logging error writing {line!r}\n")


_direct: list[_DirectLine | None] = [None]


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

    def line(self, created: float, levelname: str, name: str, message: str) -> str:
        """The line for a record with these fields (no exception or stack)."""
        second = int(created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(second))
        msecs = int((created - second) * 1000)
        return f"{self._stamp},{msecs:03d} {levelname} {name} {message}"

    def format(self, record: logging.LogRecord) -> str:
        line = self.line(record.created, record.levelname, record.name, record.getMessage())
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
    _direct[0] = _DirectLine(handler)
    root.setLevel(level)
    # Fields our format never shows; skipping them saves a stack walk per line
    # (logging docs, "Optimization").
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's chatter
