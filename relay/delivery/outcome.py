"""What an attempt decided for a recipient, classified where the reply was seen.

Role: :class:`Status` (delivered / transient / permanent), the :class:`Decision` a
reply makes for the recipients it applies to (RFC 5321 4.2.1: 2yz, 4yz, 5yz), the
one-line forms of a reply for logs and DSNs, and the :class:`Outcome` per recipient
that the deliverer returns to the queue.  The queue never parses reason text: the
status is data.
Not: SMTP I/O (relay.delivery.transaction) or what the queue does with an outcome
(relay.queue.outcomes).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relay.delivery.session import Target


class Status(enum.StrEnum):
    DELIVERED = "delivered"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


class Cause(enum.StrEnum):
    """Why a recipient was not delivered, in the classes an operator watches (the
    ``tls_relay_deferrals_total`` metric).  Listed most telling first: when several
    MX hosts failed differently, the first class present names the attempt."""

    TLS = "tls"  # TLS or a published policy (MTA-STS, DANE, REQUIRETLS) not met
    REMOTE = "remote"  # the MX replied 4xx/5xx
    CONNECTION = "connection"  # no answer, refused, dropped, too slow
    DNS = "dns"  # MX, address or DNSSEC lookups
    LOCAL = "local"  # ours: no outcome, spool trouble


@dataclass(frozen=True)
class Decision:
    status: Status
    reason: str
    reply: str | None = None  # the MX's reply as sent ("550 5.1.1 text"), for DSNs
    code: str | None = None  # RFC 3463 code decided here (no MX reply), e.g. 5.6.7


@dataclass(frozen=True)
class Evidence:
    """How the session that carried a recipient was protected: what the audit trail
    (relay.audit) records for every delivered recipient."""

    tls_version: str | None
    cipher: str | None
    cert_sha256: str | None  # of the MX's certificate
    level_required: str  # "encrypt" ... "dane-only"
    level_met: str | None
    policy_source: str  # static | mta-sts | dane


@dataclass(frozen=True)
class Outcome:
    recipient: str
    status: Status
    reason: str
    mx_host: str | None = None
    mx_ip: str | None = None
    tls: str | None = None  # "TLSv1.3 TLS_AES_256_GCM_SHA384"
    reply: str | None = None  # the MX's own reply ("550 5.1.1 text"), when there was one
    evidence: Evidence | None = None  # set when an MX session carried the attempt
    status_code: str | None = None  # RFC 3463 code decided here (no MX reply), e.g. 5.7.30
    next_hop_dsn: bool = False  # the MX offered DSN: NOTIFY went on with the recipient
    cause: Cause | None = None  # set when not delivered


def reply_text(code: int, message: str, target: Target) -> str:
    """``"550 5.1.1 text" from host[ip]:port`` — the reply as the MX gave it, one line."""
    text = " ".join(message.split())
    return f'"{code} {text}" from {target.label}'


def raw_reply(code: int, message: str) -> str:
    """The reply as one line, ``550 5.1.1 text``; kept as data for DSNs (RFC 3464 2.3.6)."""
    return f"{code} {' '.join(message.split())}"


def classify(code: int) -> Status:
    """RFC 5321 §4.2.1: 2yz completion, 4yz transient negative, 5yz permanent negative."""
    if 200 <= code < 300:
        return Status.DELIVERED
    return Status.PERMANENT if 500 <= code < 600 else Status.TRANSIENT


def decision_for(code: int, message: str, target: Target) -> Decision:
    """What an MX reply decides for the recipients it applies to."""
    return Decision(classify(code), reply_text(code, message, target), raw_reply(code, message))
