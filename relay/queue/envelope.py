"""What the queue knows about a message: its envelope, recipients and attempts.

Role: the :class:`QueueEnvelope` stored in each message file and in its state file
(sender, recipients with their :class:`RcptState` and attempt history, the client it
came from), and its JSON form (version 1, documented in ARCHITECTURE.md).  String
states are enums whose values are what the JSON holds, so the spool format is the
same as before they were enums.
Not: files or locks (relay.queue.spool), or deciding a recipient's next state
(relay.queue.outcomes).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any

from relay.errors import CorruptMessage

ENVELOPE_VERSION = 1
HISTORY_LIMIT = 25  # attempts remembered per recipient; older ones are dropped


class RcptState(enum.StrEnum):
    QUEUED = "queued"  # not tried yet
    DEFERRED = "deferred"  # tried, transient failure, will retry
    DELIVERED = "delivered"  # final: the MX accepted it
    BOUNCED = "bounced"  # final: permanent failure or expired; DSN sent (unless null sender)

    @property
    def final(self) -> bool:
        return self in (RcptState.DELIVERED, RcptState.BOUNCED)


class AttemptOutcome(enum.StrEnum):
    """What one attempt for one recipient came to (the history in the envelope)."""

    DELIVERED = "delivered"  # the MX accepted it
    TRANSIENT = "transient"  # a 4xx, a TLS or policy failure, no answer: retried
    PERMANENT = "permanent"  # a 5xx: bounced
    EXPIRED = "expired"  # out of queue lifetime: bounced
    OPERATOR = "operator"  # `tls-relay queue bounce`

    @property
    def contacted_mx(self) -> bool:
        """Whether an MX was talked to (a DSN's Remote-MTA and Diagnostic-Code)."""
        return self in (self.DELIVERED, self.TRANSIENT, self.PERMANENT)


@dataclass
class Attempt:
    at: float
    outcome: AttemptOutcome
    reason: str
    mx: str | None = None
    ip: str | None = None
    tls: str | None = None
    reply: str | None = None  # the MX's reply ("550 5.1.1 text") as data, for DSNs
    status: str | None = None  # RFC 3463 code decided locally (e.g. 5.7.30), for DSNs


@dataclass
class Recipient:
    address: str
    options: list[str] = field(default_factory=list)
    state: RcptState = RcptState.QUEUED
    attempts: int = 0
    next_attempt: float = 0.0
    last_reason: str | None = None
    history: list[Attempt] = field(default_factory=list)

    def record(self, attempt: Attempt) -> None:
        self.history.append(attempt)
        del self.history[:-HISTORY_LIMIT]
        self.last_reason = attempt.reason


@dataclass
class ClientInfo:
    ip: str
    port: int
    helo: str | None = None
    user: str | None = None
    tls_version: str | None = None
    tls_cipher: str | None = None
    listener: str | None = None


@dataclass
class QueueEnvelope:
    id: str
    created: float
    sender: str  # "" is the null reverse-path <>
    recipients: list[Recipient]
    mail_options: list[str] = field(default_factory=list)
    client: ClientInfo | None = None
    size: int = 0
    bounce: bool = False  # this message is itself a DSN
    warned: bool = False  # a delay warning was sent
    # Whether any data octet is 8-bit; known (and stored) only for a message streamed to
    # disk (layout 2): delivery then need not read all of it to find out.
    eight_bit: bool | None = None
    held: bool = False  # derived from where the envelope sits; not serialised

    @property
    def done(self) -> bool:
        return all(r.state.final for r in self.recipients)

    def to_json(self) -> bytes:
        # By hand rather than dataclasses.asdict (a recursive deep copy): this runs
        # for every accepted message.  test_spool round-trips every field.
        raw = dict(vars(self))
        raw.pop("held")
        if raw["eight_bit"] is None:
            raw.pop("eight_bit")  # layout 1 envelopes stay as older releases read them
        raw["recipients"] = [
            {**vars(r), "history": [vars(a) for a in r.history]} for r in self.recipients
        ]
        raw["client"] = vars(self.client) if self.client is not None else None
        raw["version"] = ENVELOPE_VERSION
        return json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, blob: bytes, held: bool = False) -> QueueEnvelope:
        try:
            raw: dict[str, Any] = json.loads(blob)
            if raw.pop("version", None) != ENVELOPE_VERSION:
                raise ValueError("unknown envelope version")
            client = raw.pop("client", None)
            rcpts = [_recipient(r) for r in raw.pop("recipients")]
            env = cls(recipients=rcpts, client=ClientInfo(**client) if client else None, **raw)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise CorruptMessage(f"envelope cannot be parsed: {exc}") from exc
        env.held = held
        if not env.id or not env.recipients:
            raise CorruptMessage("envelope has no id or no recipients")
        return env


def _attempt(raw: dict[str, Any]) -> Attempt:
    outcome = AttemptOutcome(raw.pop("outcome"))
    return Attempt(outcome=outcome, **raw)


def _recipient(raw: dict[str, Any]) -> Recipient:
    history = [_attempt(a) for a in raw.pop("history", [])]
    state = RcptState(raw.pop("state"))
    return Recipient(state=state, history=history, **raw)
