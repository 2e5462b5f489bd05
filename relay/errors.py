"""One exception family for tls-relay.

Every error the relay raises on purpose derives from RelayError, and is chained
with ``raise ... from exc`` where it wraps a lower-level failure.  Delivery
outcomes are *not* exceptions: they are values (see delivery.Outcome) carrying
``permanent`` as data, decided where the reply or error was seen.
"""

from __future__ import annotations


class RelayError(Exception):
    """Root of all tls-relay errors."""


class ConfigError(RelayError):
    """The configuration is invalid.  ``problems`` holds every problem found,
    each already formatted as ``FILE: key.path: problem (got VALUE)``."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class SpoolError(RelayError):
    """A spool operation failed (disk full, I/O error, damaged file)."""


class SpoolFullError(SpoolError):
    """The spool's file system is out of space (ENOSPC / EDQUOT)."""


class MessageNotFound(SpoolError):
    """No message with that queue id is in the spool."""


class MessageBusy(SpoolError):
    """The message is locked by a running delivery; try again shortly."""


class CorruptMessage(SpoolError):
    """A spool file could not be parsed; it belongs in quarantine."""


class UsersFileError(RelayError):
    """The users file is unreadable or malformed."""


class CertificateError(RelayError):
    """A certificate or key could not be generated, read or paired."""


class InvalidDomain(RelayError, ValueError):
    """A name that is not a valid domain under IDNA 2008 / UTS #46 (relay.domains)."""
