"""Domain names in one normal form, wherever a domain is compared or used as a key.

Role: :func:`normalize_domain`, used by intake, the TLS policy, routes and delivery
so that two spellings of one domain are never two keys; :func:`is_dns_name`, the
host name syntax config values are checked against.
Not: DNS lookups, or path syntax (relay.intake.addresses).
"""

from __future__ import annotations

import re

_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")  # RFC 1035 2.3.1 letter-digit-hyphen


def normalize_domain(name: str) -> str:
    """Lower-case, without the trailing root dot (DNS names are case-insensitive, RFC 4343)."""
    return name.strip().lower().rstrip(".")


def is_dns_name(name: str) -> bool:
    """RFC 1035 section 2.3.1 host name (letters, digits, hyphens), not an IP literal."""
    name = name[:-1] if name.endswith(".") else name
    if not name or len(name) > 253 or name.replace(".", "").isdigit():
        return False
    return all(_LABEL.fullmatch(label) for label in name.split("."))
