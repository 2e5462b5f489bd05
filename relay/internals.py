"""Borrowed internals: every private attribute of a library the relay relies on.

Role: the one list of the private names of aiosmtpd, aiosmtplib, asyncio, ssl and logging
that tls-relay's code uses, with where and why, and :func:`require`, which
``serve`` and ``check-config`` call first: an installed version that lacks one of
them stops the relay at start-up with a sentence naming the library, its version
and the tested range, instead of misbehaving later (a renamed
``SMTPProtocol._command_lock`` would otherwise turn every PIPELINING delivery into a
deferral).  The tested ranges are pinned in pyproject.toml with upper bounds.

Attributes are checked without running the library: methods and class attributes
with ``hasattr`` on the class, instance attributes by reading the class's source
for assignments to ``self.NAME`` (they exist only on live instances).

Not: a compatibility layer - the code uses the names directly, where it needs them.
"""

from __future__ import annotations

import _ssl
import ast
import asyncio.streams
import functools
import inspect
import logging
import platform
import ssl
import textwrap
from dataclasses import dataclass
from importlib import metadata

import aiosmtplib.protocol
from aiosmtpd import smtp as aiosmtpd_smtp

from relay.errors import RelayError


@dataclass(frozen=True)
class Borrowed:
    """One private name: on which class (or module), why, and who uses it."""

    owner: type | object
    name: str
    instance: bool  # set on instances (checked in the source) rather than on the class
    why: str


_SMTP = aiosmtpd_smtp.SMTP
_PROTO = aiosmtplib.protocol.SMTPProtocol
_READER = asyncio.streams.StreamReader
_WRITER = asyncio.streams.StreamWriter
_SSL_OBJECT: type = getattr(_ssl, "_SSLSocket")  # noqa: B009 (typeshed does not list it)

# Distribution name and the range pyproject.toml pins; "python" for the stdlib.
TESTED = {
    "aiosmtpd": ">=1.4.6,<1.5",
    "aiosmtplib": ">=5.1.3,<5.2",
    "python": ">=3.11",
}

BORROWED: dict[str, tuple[Borrowed, ...]] = {
    "aiosmtpd": (
        # relay/intake/commandloop.py: our command loop replaces aiosmtpd's.
        Borrowed(_SMTP, "_handle_client", False, "the command loop the relay replaces"),
        Borrowed(_SMTP, "_handler_coroutine", True, "the loop task, cancelled to close"),
        Borrowed(_SMTP, "_smtp_methods", True, "the dispatch table wrapped by the guard"),
        Borrowed(_SMTP, "_reader", True, "the session's StreamReader"),
        Borrowed(_SMTP, "_writer", True, "the session's StreamWriter"),
        Borrowed(_SMTP, "_enforce_call_limit", True, "asserted off: no per-command limits"),
        Borrowed(_SMTP, "_proxy_timeout", True, "asserted off: no PROXY protocol"),
        Borrowed(_SMTP, "__ident__", True, "the banner text"),
        # relay/intake/commandloop.py: one lazily re-armed session timer.
        Borrowed(_SMTP, "_reset_timeout", False, "re-armed lazily instead of per command"),
        Borrowed(_SMTP, "_timeout_cb", False, "sends 421 before aiosmtpd closes"),
        Borrowed(_SMTP, "_timeout_handle", True, "the timer handle re-armed lazily"),
        Borrowed(_SMTP, "_timeout_duration", True, "the command timeout"),
        # relay/intake/commandloop.py (STARTTLS on the loop's own TLS), session.py (EHLO, DATA).
        Borrowed(_SMTP, "_set_rset_state", False, "forget the transaction (EHLO, STARTTLS)"),
        Borrowed(_SMTP, "_set_post_data_state", False, "end the transaction after DATA"),
        Borrowed(_SMTP, "_create_session", False, "a new session after STARTTLS"),
        Borrowed(_SMTP, "_create_envelope", False, "the envelope with RCPT parameters"),
        Borrowed(_SMTP, "_original_transport", True, "closed by aiosmtpd after STARTTLS"),
        Borrowed(_SMTP, "_tls_handshake_okay", True, "marks STARTTLS done for aiosmtpd"),
    ),
    "aiosmtplib": (
        # relay/delivery/wiredata.py: DATA without aiosmtplib's regex pass, pipelining.
        Borrowed(_PROTO, "_command_lock", True, "held while sending DATA or a pipelined group"),
        Borrowed(_PROTO, "_response_pending", True, "its STARTTLS response-injection guard"),
        Borrowed(_PROTO, "_drain_helper", False, "waits for room while a message streams"),
    ),
    "python": (
        # relay/intake/commandloop.py and session.py.
        Borrowed(_READER, "_buffer", True, "peek for a pipelined line; cleared at STARTTLS"),
        Borrowed(_READER, "_transport", True, "switched to the TLS transport at STARTTLS"),
        Borrowed(_WRITER, "_transport", True, "switched to the TLS transport at STARTTLS"),
        # relay/tlspolicy/contexts.py: the chain the MX sent, for DANE-TA (RFC 7672 3.1.2);
        # public as SSLObject.get_unverified_chain() only from Python 3.13.
        Borrowed(ssl.SSLObject, "_sslobj", True, "the _ssl object behind an SSLObject"),
        Borrowed(_SSL_OBJECT, "get_unverified_chain", False, "the peer's chain as sent"),
        # relay/log.py: logging's documented optimisation.
        Borrowed(logging, "_srcfile", False, "None skips a stack walk per log line"),
    ),
}


def problems() -> list[str]:
    """One sentence per borrowed name the installed libraries lack."""
    found: list[str] = []
    for dist, items in BORROWED.items():
        for item in items:
            if item.instance:
                assigned = _assigned(item.owner)
                # No source to read (a .pyc-only install): this name cannot be checked.
                present = assigned is None or item.name in assigned
            else:
                present = hasattr(item.owner, item.name)
            if not present:
                found.append(_sentence(dist, item))
    return found


def require() -> None:
    """Raise RelayError naming every missing internal (``serve`` and ``check-config``)."""
    missing = problems()
    if missing:
        raise RelayError("; ".join(missing))


def _sentence(dist: str, item: Borrowed) -> str:
    owner = getattr(item.owner, "__qualname__", None) or getattr(item.owner, "__name__", "?")
    version = _version(dist)
    return (
        f"{dist} {version} lacks {owner}.{item.name}, which tls-relay relies on "
        f"({item.why}); install {dist}{TESTED[dist]}, the range tls-relay was tested with"
    )


def _version(dist: str) -> str:
    if dist == "python":
        return platform.python_version()
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "(version unknown)"


@functools.cache
def _assigned(owner: type | object) -> frozenset[str] | None:
    """Names assigned as ``self.NAME`` anywhere in the source of *owner* and its
    bases (instance attributes exist only on live instances); None when no source
    could be read at all."""
    classes = inspect.getmro(owner) if isinstance(owner, type) else ()
    names: set[str] = set()
    read = False
    for cls in classes:
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        except (OSError, TypeError):
            continue
        read = True
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
            ):
                names.add(node.attr)
    return frozenset(names) if read else None
