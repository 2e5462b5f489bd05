"""8-bit to 7-bit conversion for a next hop without 8BITMIME (RFC 6152 §3, as Postfix).

Role: :func:`needs_8bitmime` says whether a message carries 8-bit data (declared
``BODY=8BITMIME`` or not); :func:`to_7bit` re-encodes every body part with 8-bit
content - quoted-printable for ``text/*``, base64 for anything else - with the
standard library's ``email`` package, leaving headers exactly as they were (no
refolding) and 7-bit parts untouched.  None when the message cannot be converted
(8-bit in the header section, which is SMTPUTF8's business, or a structure the parser
cannot take): the caller then refuses, as before.
Not: SMTP, or choosing when to convert (relay.delivery.transaction).
"""

from __future__ import annotations

import email
import email.encoders
import email.generator
import email.policy
import io
from collections.abc import Sequence
from email.message import Message

from relay.body import Body

_POLICY = email.policy.compat32.clone(linesep="\r\n")


def needs_8bitmime(mail_options: Sequence[str], data: bytes | Body) -> bool:
    declared = any(o.upper() == "BODY=8BITMIME" for o in mail_options)
    return declared or (data.eight_bit if isinstance(data, Body) else not data.isascii())


def to_7bit(data: bytes) -> bytes | None:
    end = data.find(b"\r\n\r\n")
    if end < 0 or not data[:end].isascii():
        return None
    try:
        msg = email.message_from_bytes(data, policy=_POLICY)
        changed = False
        containers: list[Message] = []
        for part in msg.walk():
            if not part.is_multipart():
                changed = _seven_bit(part) or changed
            elif str(part.get("Content-Transfer-Encoding", "")).strip().lower() == "8bit":
                containers.append(part)
        if not changed:
            return data  # declared 8BITMIME, but nothing 8-bit in it
        for part in containers:  # RFC 2045 6.4: a multipart says what its parts now are
            part.replace_header("Content-Transfer-Encoding", "7bit")
        if "MIME-Version" not in msg:
            msg["MIME-Version"] = "1.0"  # RFC 2045 4: the new encoding means something
        out = io.BytesIO()
        generator = email.generator.BytesGenerator(
            out, mangle_from_=False, maxheaderlen=0, policy=_POLICY
        )
        generator.flatten(msg)
    except (ValueError, TypeError, LookupError):
        return None
    result = out.getvalue()
    return result if result.isascii() else None


def _seven_bit(part: Message) -> bool:
    """Re-encode *part* when its content is 8-bit; whether it did."""
    raw = part.get_payload(decode=True)
    if not isinstance(raw, bytes):
        return False
    cte = str(part.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    if cte in ("base64", "quoted-printable") or raw.isascii():
        return False
    del part["Content-Transfer-Encoding"]
    part.set_payload(raw)
    if part.get_content_maintype() == "text":
        email.encoders.encode_quopri(part)
    else:
        email.encoders.encode_base64(part)
    return True
