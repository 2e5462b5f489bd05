"""Outbound TLS: client contexts per TLS level, and the facts a handshake proved.

Role: build (and cache) the client ``ssl.SSLContext`` a delivery attempt needs for a
:class:`relay.tlspolicy.verdict.Requirement` — ``encrypt``: no certificate check; ``verify`` and
``secure``: chain checked against ``delivery.ca_file`` (or the system bundle); the
protocol floor is the requirement's ``min_version``, so an MX that cannot do it fails
the handshake.  Host names are *not* checked by OpenSSL (``check_hostname`` off): the
policy module matches the names this module extracts from the peer certificate.
Turn a finished handshake into a :class:`relay.tlspolicy.verdict.Observed`.

Not: deciding whether a session is good enough (policy.decide does that), SMTP, or
server-side contexts (relay.intake.tlscontext).
"""

from __future__ import annotations

import _ssl
import datetime
import hashlib
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from relay.config import TlsLevel
from relay.tlspolicy.verdict import Observed, Requirement

ContextKey = tuple[bool, ssl.TLSVersion]


def context_key(req: Requirement) -> ContextKey:
    """(chain verified?, protocol floor): all that distinguishes two client contexts.
    Under DANE only a `verify`/`secure` floor asks the CA store; the TLSA match is
    made by policy.decide on the chain the peer sent."""
    verify = TlsLevel.VERIFY <= req.webpki_level <= TlsLevel.SECURE
    return verify, req.min_version


def trust_store_context(ca_file: Path | None) -> ssl.SSLContext:
    """A client context that trusts the `verify` CA store and checks names: *ca_file*
    alone when it is set - it replaces the system store, as Postfix's smtp_tls_CAfile
    does with tls_append_default_CAfile off: an operator who names the CAs to trust
    means those, and no others - else the system store.  SMTP's client contexts and
    the MTA-STS policy fetch (RFC 8461 3.3) both start here."""
    if ca_file is None:
        return ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no default (system) CAs loaded
    ctx.load_verify_locations(cafile=str(ca_file))
    return ctx


def client_context(
    verify: bool, min_version: ssl.TLSVersion, ca_file: Path | None
) -> ssl.SSLContext:
    """A client context for one (verify, floor) pair, on the `verify` CA store."""
    ctx = trust_store_context(ca_file)
    # Names are matched by policy.decide against the MX host or the recipient domain
    # (RFC 7817 §3: "secure" may need a name other than the one we connected to).
    ctx.check_hostname = False
    if verify:
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        # RFC 7435 opportunistic security: "encrypt" protects against passive
        # eavesdroppers only, so the certificate is not checked.
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = min_version
    ctx.options |= ssl.OP_NO_COMPRESSION  # RFC 7457 §2.6 (CRIME)
    return ctx


class ClientContexts:
    """Builds each client context once per Deliverer (loading a CA bundle is costly)."""

    def __init__(self, ca_file: Path | None) -> None:
        self._ca_file = ca_file
        self._cache: dict[ContextKey, ssl.SSLContext] = {}

    def for_requirement(self, req: Requirement) -> tuple[ContextKey, ssl.SSLContext]:
        key = context_key(req)
        ctx = self._cache.get(key)
        if ctx is None:
            ctx = client_context(key[0], key[1], self._ca_file)
            self._cache[key] = ctx
        return key, ctx


def cert_names(der: bytes) -> tuple[str, ...]:
    """dNSName SANs of a DER certificate; the subject CN only when there is no SAN
    extension at all (RFC 6125 §6.4.4).  Empty if the certificate cannot be parsed."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return ()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return tuple(str(cn.value) for cn in cns)
    except ValueError:
        return ()
    return tuple(san.value.get_values_for_type(x509.DNSName))


def fingerprint(der: bytes) -> str:
    """SHA-256 of the DER certificate, lower-case hex (as logged and pinned)."""
    return hashlib.sha256(der).hexdigest()


def peer_chain(sslobj: ssl.SSLObject | ssl.SSLSocket) -> tuple[bytes, ...]:
    """The certificates the peer sent, DER, leaf first (unverified: DANE-TA judges
    them).  Python 3.13 has it public; before, the _ssl object has it (see
    relay.internals)."""
    public = getattr(sslobj, "get_unverified_chain", None)
    if public is not None:
        return tuple(public() or ())
    inner = getattr(sslobj, "_sslobj", None)
    if inner is None:
        return ()
    certs = inner.get_unverified_chain() or ()
    return tuple(c.public_bytes(_ssl.ENCODING_DER) for c in certs)


def observe(sslobj: ssl.SSLObject | ssl.SSLSocket, verified: bool, implicit_tls: bool) -> Observed:
    """The facts of a completed handshake, for policy.decide."""
    der = sslobj.getpeercert(binary_form=True)
    cipher = sslobj.cipher()
    chain = peer_chain(sslobj)
    if der and (not chain or chain[0] != der):
        chain = (der, *chain)
    return Observed(
        starttls_offered=not implicit_tls,
        starttls_code=None if implicit_tls else 220,
        chain_verified=verified,
        tls_version=sslobj.version(),
        cipher=cipher[0] if cipher else None,
        cert_names=cert_names(der) if der else (),
        cert_fingerprint=fingerprint(der) if der else None,
        implicit_tls=implicit_tls,
        peer_chain=chain,
        at=datetime.datetime.now(datetime.UTC),
    )


def describe_handshake_error(exc: BaseException) -> str:
    """One line for a failed handshake: the OpenSSL reason, not a Python repr."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return str(exc) or type(exc).__name__
