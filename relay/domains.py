"""Domain names in one normal form, wherever a domain is compared or used as a key.

Role: :func:`normalize_domain` turns any spelling of a domain - U-labels
(``bücher.test``), fullwidth or other compatibility forms that UTS #46 maps
(fullwidth letters and dots), mixed case, a trailing root dot - into one
:data:`Domain`: IDNA 2008 A-labels (``xn--bcher-kva.test``), lower case, no trailing
dot; it refuses what is not a valid host name.  Intake applies it to every address,
config loading to every domain key, so the TLS policy, routes, concurrency slots,
session pools (and MTA-STS/DANE) all compare the same strings.  A Unicode spelling of
a configured domain once skipped that domain's policy because two places compared
raw strings; mypy now rejects a raw ``str`` where a :data:`Domain` is the key.
:func:`dns_name` is the lenient form for names that come from DNS answers (already
ASCII).  :func:`is_dns_name` is the host name syntax config values are checked against.
Not: DNS lookups, or address syntax (relay.intake.addresses).
"""

from __future__ import annotations

import re
from typing import NewType

import idna

from relay.errors import InvalidDomain

Domain = NewType("Domain", str)

MAX_NAME = 253  # RFC 1035 2.3.4: 255 octets on the wire, 253 as text without the root dot
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")  # RFC 1035 2.3.1 letter-digit-hyphen


def normalize_domain(name: str) -> Domain:
    """The one normal form of *name* (see the module docstring); InvalidDomain with
    the reason when it is not a valid host name under IDNA 2008 / UTS #46."""
    text = name.strip()
    text = text[:-1] if text.endswith(".") else text
    if text.isascii() and _plain_ascii(text):
        return Domain(text.lower())  # the common case, as UTS #46 would map it
    try:
        # UTS #46 mapping (case folding, fullwidth and other compatibility forms),
        # non-transitional (IDNA 2008: "ß" stays "ß"), STD3 rules: LDH host names only.
        mapped = idna.uts46_remap(text, std3_rules=True, transitional=False)
        mapped = mapped[:-1] if mapped.endswith(".") else mapped  # "。" maps to a root dot
        result = ".".join(_a_label(label) for label in mapped.split("."))
    except (idna.IDNAError, UnicodeError) as exc:
        raise InvalidDomain(f"{name!r} is not a valid domain name: {exc}") from exc
    if not result or len(result) > MAX_NAME:
        raise InvalidDomain(f"{name!r} is not a valid domain name: too long or empty")
    return Domain(result)


def _a_label(label: str) -> str:
    """One mapped label in A-label form.  A plain LDH label is kept as it is, even
    with "--" in the third and fourth position (IDNA 2008 reserves those for new
    prefixes, but DNS has such names and Postfix delivers to them); an "xn--" label
    must be a valid A-label, a Unicode one must make one."""
    if _LABEL.fullmatch(label) and not label.startswith("xn--"):
        return label
    if not label:
        raise idna.IDNAError("Empty label")
    return idna.alabel(label).decode("ascii").lower()


def _plain_ascii(text: str) -> bool:
    """LDH labels that IDNA leaves as they are (no "xn--" A-label to check)."""
    if not text or len(text) > MAX_NAME:
        return False
    return all(_LABEL.fullmatch(label) and label[:4].lower() != "xn--" for label in text.split("."))


def dns_name(name: str) -> Domain:
    """A name from a DNS answer (MX exchange): lower case, no trailing dot.  Already
    ASCII on the wire; not re-validated, so an odd MX name cannot crash a lookup."""
    return Domain(name.strip().lower().removesuffix("."))


def domain_of(address: str) -> Domain:
    """The normalised domain of an address (``local@domain``); InvalidDomain if bad."""
    return normalize_domain(address.rpartition("@")[2])


def is_dns_name(name: str) -> bool:
    """RFC 1035 section 2.3.1 host name (letters, digits, hyphens), not an IP literal."""
    name = name[:-1] if name.endswith(".") else name
    if not name or len(name) > MAX_NAME or name.replace(".", "").isdigit():
        return False
    return all(_LABEL.fullmatch(label) for label in name.split("."))
