"""The ESMTP parameters one transaction carries to one MX: what it may receive.

Role: MAIL FROM's parameters for this server (SMTPUTF8, BODY=8BITMIME, REQUIRETLS,
DSN's RET/ENVID, SIZE) or why the message cannot go there; RCPT's (DSN's NOTIFY and
ORCPT, RFC 3461); the SIZE the server advertises (RFC 1870).
Not: sending anything, or converting the message (relay.delivery.transaction,
relay.delivery.downgrade).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import aiosmtplib

from relay.delivery.session import Target

if TYPE_CHECKING:
    from relay.delivery.transaction import Transaction

# RFC 6531 (the IANA registry's X.6.7): a UTF-8 address or header cannot go to a server
# without SMTPUTF8; Postfix's "SMTPUTF8 is required, but was not offered" says the same.
SMTPUTF8_NEEDED = "5.6.7"


def _keyword(option: str) -> tuple[str, str]:
    key, _, value = option.partition("=")
    return key.upper(), value


def mail_options(tx: Transaction, smtp: aiosmtplib.SMTP, target: Target) -> list[str] | str:
    """MAIL FROM parameters this MX may receive, or why the message cannot go there."""
    opts: list[str] = []
    for option in tx.mail_options:
        key, value = _keyword(option)
        if key == "SMTPUTF8":
            if smtp.supports_extension("smtputf8"):
                opts.append("SMTPUTF8")
            elif needs_smtputf8(tx):
                # RFC 6531 §3.4: UTF-8 addresses or headers must not go to a server without it.
                return f"destination lacks SMTPUTF8, which the message needs ({target.label})"
            # else: declared but not needed (all ASCII): sent without it, as Postfix does.
        elif key == "BODY" and value.upper() == "8BITMIME":
            # RFC 6152 §3: 8-bit data only to a server that advertises 8BITMIME (transact
            # converts the message to 7 bit, without this option, for one that does not).
            if not smtp.supports_extension("8bitmime"):
                return f"destination lacks 8BITMIME, which the message needs ({target.label})"
            opts.append("BODY=8BITMIME")
        elif key == "REQUIRETLS":
            # RFC 8689 4.2.1: only to a server that offers it (delivery checks first).
            if not smtp.supports_extension("requiretls"):
                return f"destination lacks REQUIRETLS, which the message requires ({target.label})"
            opts.append("REQUIRETLS")
        elif key == "BODY" and value.upper() == "BINARYMIME":
            return "BODY=BINARYMIME needs BDAT (RFC 3030), which this relay does not send"
        elif key in ("RET", "ENVID") and smtp.supports_extension("dsn"):
            opts.append(option)  # RFC 3461 §4; dropped for a non-DSN server (§5.2.1)
        # SIZE is recomputed below; anything else is not ours to pass on.
    if smtp.supports_extension("size"):
        opts.insert(0, f"SIZE={tx.data.size}")  # RFC 1870 §6
    return opts


def needs_smtputf8(tx: Transaction) -> bool:
    """Does the message really use RFC 6531/6532: a non-ASCII address in the envelope or
    non-ASCII text in its header section?  (8-bit body text is 8BITMIME's business.)"""
    if not tx.sender.isascii() or any(not r.isascii() for r, _ in tx.recipients):
        return True
    return not tx.data.head.isascii()


def size_problem(tx: Transaction, smtp: aiosmtplib.SMTP, target: Target) -> str | None:
    """RFC 1870 §4: respect the SIZE the MX advertises (0 or absent: no stated limit)."""
    advertised = smtp.esmtp_extensions.get("size", "").strip()
    limit = int(advertised) if advertised.isdigit() else 0
    if limit and tx.data.size > limit:
        return f"message size {tx.data.size} exceeds the limit of {limit} bytes of {target.label}"
    return None


def rcpt_options(options: Sequence[str], smtp: aiosmtplib.SMTP) -> list[str]:
    """RFC 3461 §4.1/§4.2 NOTIFY and ORCPT, only to a DSN server (§5.2.1)."""
    if not smtp.supports_extension("dsn"):
        return []
    return [opt for opt in options if _keyword(opt)[0] in ("NOTIFY", "ORCPT")]
