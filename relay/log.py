"""Structured log lines: ``event key=value key="value with spaces"``.

One line per event, greppable, stable keys.  Setup of handlers happens once in
app.py / cli.py; modules only call :func:`event`.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

_SAFE = re.compile(r"[A-Za-z0-9@._\-:/+\[\]<>,=]+")  # printed bare; anything else is quoted


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    text = str(value)
    if _SAFE.fullmatch(text):
        return text
    escaped = (
        text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    )
    return f'"{escaped}"'


def format_event(name: str, **fields: Any) -> str:
    parts = [name]
    parts.extend(f"{key}={_fmt(val)}" for key, val in fields.items())
    return " ".join(parts)


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured line."""
    if logger.isEnabledFor(level):
        logger.log(level, format_event(name, **fields))


def setup(level: str = "INFO") -> None:
    """Log to stderr, one line per event, UTC timestamps."""
    handler = logging.StreamHandler(sys.stderr)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    fmt.converter = __import__("time").gmtime
    handler.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Fields our format never shows; skipping them saves a stack walk per line
    # (logging docs, "Optimization").
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's chatter
