"""Structured log lines and their formatter."""

from __future__ import annotations

import logging
import sys
import time

import pytest

from relay import log as relaylog
from relay.log import LineFormatter, event, format_event


@pytest.mark.parametrize("created", [0.0, 1700000000.0, 1700000000.9999, 1764398000.123456])
def test_line_formatter_prints_what_the_stdlib_format_would(created: float) -> None:
    reference = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    reference.converter = time.gmtime
    ours = LineFormatter()
    record = logging.LogRecord("relay.x", logging.INFO, __file__, 1, "hello %s", ("w",), None)
    record.created, record.msecs = created, (created - int(created)) * 1000
    assert ours.format(record) == reference.format(record)
    assert ours.format(record) == reference.format(record)  # cached second, same text


def test_line_formatter_keeps_tracebacks() -> None:
    reference = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    reference.converter = time.gmtime
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("relay.x", logging.ERROR, __file__, 1, "bug", (), sys.exc_info())
    assert LineFormatter().format(record) == reference.format(record)
    assert "ValueError: boom" in LineFormatter().format(record)


def test_values_with_spaces_or_quotes_are_quoted() -> None:
    line = format_event("ev", a="plain", b="two words", c='q"uote', d=None, e="", f="ü")
    assert line == 'ev a=plain b="two words" c="q\\"uote" d=- e="" f="ü"'


def test_client_values_cannot_forge_lines_or_drive_a_terminal() -> None:
    """User names, HELO names and addresses come from clients: every control character
    is escaped, so a value can neither start a second log line nor send a terminal
    escape sequence."""
    forged = "2026-01-01 00:00:00,000 INFO relay.listener auth_ok user=root"
    hostile = f"bob\r\n{forged}\x1b[2J\x85\u2028\x7f\udcff"
    line = format_event("auth_failed", user=hostile)
    assert line.isprintable()
    assert line == (
        'auth_failed user="bob\\r\\n2026-01-01 00:00:00,000 INFO relay.listener auth_ok '
        'user=root\\x1b[2J\\x85\\u2028\\x7f\\udcff"'
    )


def test_info_events_bypass_logging_but_read_the_same(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """relay.log.setup's handler alone: an INFO event is written directly, in the
    very format the handler uses; with any other handler present (a test's capture,
    an operator's), every event goes through logging, so nothing is missed."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, relaylog._direct[0])
    logger = logging.getLogger("relay.test.direct")
    try:
        relaylog.setup("INFO")
        (handler,) = root.handlers
        records: list[logging.LogRecord] = []
        handler.emit = records.append  # type: ignore[method-assign]  # the machinery, if used
        event(logger, "hello", who="a b")
        assert records == []  # bypassed
        direct = capsys.readouterr().err
        handler.emit = logging.StreamHandler.emit.__get__(handler)  # type: ignore[method-assign]
        logger.info('hello who="a b"')  # the same line through logging
        assert capsys.readouterr().err[24:] == direct[24:]  # all but the time
        assert direct.endswith(' INFO relay.test.direct hello who="a b"\n')
        other: list[logging.LogRecord] = []
        extra = logging.Handler()
        extra.emit = other.append  # type: ignore[method-assign]
        root.addHandler(extra)
        event(logger, "seen")
        assert [r.getMessage() for r in other] == ["seen"]
        event(logger, "warned", logging.WARNING)  # WARNING and up: always logging's
        assert [r.getMessage() for r in other] == ["seen", "warned"]
    finally:
        root.handlers[:], root.level, relaylog._direct[0] = saved[0], saved[1], saved[2]


def test_the_direct_path_respects_every_logger_on_the_way_and_a_broken_stream(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A handler, a filter or propagate=False on a parent logger ("relay") sends the
    line through logging; a stream that fails to write never raises into the caller."""
    root, parent = logging.getLogger(), logging.getLogger("relay.test")
    saved = (root.handlers[:], root.level, relaylog._direct[0])
    logger = logging.getLogger("relay.test.parents")
    try:
        relaylog.setup("INFO")
        direct = relaylog._direct[0]
        assert direct is not None and direct.alone(logger)
        seen: list[logging.LogRecord] = []
        extra = logging.Handler()
        extra.emit = seen.append  # type: ignore[method-assign]
        parent.addHandler(extra)
        assert not direct.alone(logger)
        event(logger, "via-parent")
        assert [r.getMessage() for r in seen] == ["via-parent"]
        parent.removeHandler(extra)
        parent.propagate = False
        assert not direct.alone(logger)
        parent.propagate = True

        class Broken:
            def write(self, text: str) -> None:
                raise BrokenPipeError("gone")

            def flush(self) -> None:
                raise BrokenPipeError("gone")

        direct.handler.stream = Broken()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("sys.stderr", Broken())
            event(logger, "lost quietly")  # must not raise
    finally:
        parent.propagate = True
        root.handlers[:], root.level, relaylog._direct[0] = saved[0], saved[1], saved[2]
        capsys.readouterr()
