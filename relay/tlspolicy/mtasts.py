"""MTA-STS (RFC 8461): the TXT record, the policy text, and the MX hosts a policy allows.

Role: pure parsing and matching, strict where the RFC is: :func:`parse_txt` reads the
``_mta-sts.DOMAIN`` TXT strings (exactly one ``v=STSv1`` record, an ``id`` of 1-32
letters and digits), :func:`parse_policy` the body of
``https://mta-sts.DOMAIN/.well-known/mta-sts.txt`` (version, mode, ``mx`` patterns,
``max_age``; CRLF or LF; unknown keys ignored as extensions), and
:func:`mx_allowed` whether an MX host matches the policy's ``mx`` patterns
(``*.example.com`` covers exactly one label).  Every refusal says why, worded for a
log line and an RFC 8460 report.
Not: DNS or HTTPS (the fetcher), the cache, or what a policy means for a delivery
(relay.tlspolicy.verdict).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass

from relay.domains import Domain, dns_name
from relay.errors import RelayError

VERSION = "STSv1"
MAX_AGE_CAP = 31_557_600  # RFC 8461 3.2: about one year; larger values are capped
MAX_POLICY_BYTES = 64 * 1024  # RFC 8461 3.3: a larger body is an error, not truncated

_WSP = " \t"
_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
_LDH = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_POLICY_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_DIGITS = re.compile(r"[0-9]{1,10}")


class StsError(RelayError, ValueError):
    """A TXT record or policy that RFC 8461 calls invalid; the message says why."""


class Mode(enum.StrEnum):
    ENFORCE = "enforce"  # MX hosts must match and present a WebPKI-valid certificate
    TESTING = "testing"  # evaluated and reported; delivery goes on
    NONE = "none"  # no policy: replaces a cached one


@dataclass(frozen=True)
class StsPolicy:
    mode: Mode
    mx: tuple[str, ...]  # lower-case patterns: "mx.example.com" or "*.example.com"
    max_age: int  # seconds, capped at MAX_AGE_CAP
    text: str  # the policy as served, for TLS reports (RFC 8460 4.4)


def parse_txt(strings: Sequence[str]) -> str | None:
    """The policy id of the ``_mta-sts`` TXT RRset, each record's strings already joined.
    None when no record starts with ``v=STSv1`` (no policy); StsError when there is
    more than one, or the one is not valid (RFC 8461 3.1: the sender then assumes no
    policy is available - the caller decides what a cached policy does)."""
    records = [r for r in strings if r.startswith("v=STSv1")]
    if not records:
        return None
    if len(records) > 1:
        raise StsError(f"{len(records)} TXT records start with v=STSv1; exactly one may")
    return _txt_id(records[0])


def _txt_id(record: str) -> str:
    fields = [f.strip(_WSP) for f in record.split(";")]
    if fields and fields[-1] == "":
        fields.pop()  # a trailing separator is allowed
    if not fields or fields[0] != "v=STSv1":
        raise StsError(f"TXT record does not start with v=STSv1: {record!r}")
    found: str | None = None
    for field in fields[1:]:
        name, eq, value = field.partition("=")
        if name == "id":
            if found is not None:
                raise StsError("TXT record has more than one id")
            if not _ID.fullmatch(value):
                raise StsError(f"TXT record id must be 1 to 32 letters or digits: {value!r}")
            found = value
        elif not eq or not _EXT_NAME.fullmatch(name) or not _EXT_VALUE.fullmatch(value):
            raise StsError(f"TXT record field is not valid: {field!r}")
    if found is None:
        raise StsError("TXT record has no id")
    return found


def parse_policy(body: bytes) -> StsPolicy:
    """The policy file's body, strictly (RFC 8461 3.2); StsError with the reason."""
    if len(body) > MAX_POLICY_BYTES:
        raise StsError(f"policy is larger than {MAX_POLICY_BYTES} bytes")
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError as exc:
        raise StsError("policy is not ASCII text") from exc
    fields: dict[str, str] = {}
    mx: list[str] = []
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r").strip(_WSP)
        if not line:
            continue
        key, colon, value = line.partition(":")
        key, value = key.strip(_WSP), value.strip(_WSP)
        if not colon or not _POLICY_KEY.fullmatch(key):
            raise StsError(f"policy line {number} is not 'key: value': {line[:80]!r}")
        if key == "mx":
            mx.append(_mx_pattern(value))
        elif key in ("version", "mode", "max_age"):
            if key in fields:
                raise StsError(f"policy has more than one {key}")
            fields[key] = value
        # Any other key is an extension (RFC 8461 3.2): ignored.
    return _policy(fields, mx, text)


def _policy(fields: dict[str, str], mx: list[str], text: str) -> StsPolicy:
    if fields.get("version") != VERSION:
        raise StsError(f"policy version must be {VERSION}, not {fields.get('version')!r}")
    try:
        mode = Mode(fields.get("mode", ""))
    except ValueError as exc:
        raise StsError(
            f"policy mode must be enforce, testing or none: {fields.get('mode')!r}"
        ) from exc
    age = fields.get("max_age", "")
    if not _DIGITS.fullmatch(age) or int(age) == 0:
        raise StsError(f"policy max_age must be a positive whole number of seconds: {age!r}")
    if not mx and mode is not Mode.NONE:
        raise StsError(f"policy in mode {mode} names no mx")
    return StsPolicy(mode, tuple(mx), min(int(age), MAX_AGE_CAP), text)


def _mx_pattern(value: str) -> str:
    """``mx.example.com`` or ``*.example.com``, LDH labels, as lower-case A-labels."""
    name = value.lower().removesuffix(".")
    labels = name.removeprefix("*.").split(".")
    if "*" in name.removeprefix("*.") or len(labels) < 2 or not all(map(_LDH.fullmatch, labels)):
        raise StsError(f"policy mx pattern is not a host name or *.domain: {value!r}")
    return name


def mx_allowed(policy: StsPolicy, host: str) -> bool:
    """Does *host* (an MX host name) match one of the policy's ``mx`` patterns?
    RFC 8461 4.1: a leading ``*.`` matches exactly one label, never the bare parent;
    names compare case-insensitively, as A-labels."""
    name: Domain = dns_name(host)
    for pattern in policy.mx:
        if pattern.startswith("*."):
            first, dot, rest = name.partition(".")
            if dot and first and rest == pattern[2:]:
                return True
        elif name == pattern:
            return True
    return False
