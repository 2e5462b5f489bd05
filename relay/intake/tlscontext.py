"""TLS contexts: build ``ssl.SSLContext`` objects from validated config.

Role: ``server_context`` for the listeners (STARTTLS and implicit TLS, RFC 3207 /
RFC 8314); the delivery side's client contexts belong here too.
Not: policy decisions (relay.tlspolicy decides what level a destination needs) and not
certificate generation (relay.certs).
"""

from __future__ import annotations

import ssl

from relay.config import ServerTls
from relay.errors import CertificateError

# TLS 1.2 suites: forward secrecy (ECDHE) with AEAD ciphers only.  TLS 1.3 suites
# are not configurable through this string and OpenSSL's defaults are all good.
SERVER_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!SHA1:!DSS:!RC4:!3DES"

FLOOR = ssl.TLSVersion.TLSv1_2  # RFC 8996 deprecates TLS 1.0 and 1.1


def server_context(tls: ServerTls) -> ssl.SSLContext:
    """A server-side context for the listeners: cert loaded, TLS >= 1.2, hardened options."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = max(tls.min_version, FLOOR)
    # RFC 7457 section 2.6 (CRIME): no TLS compression; no client-initiated renegotiation.
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_SINGLE_ECDH_USE
    ctx.set_ciphers(SERVER_CIPHERS)
    pairs = [(tls.cert, tls.key)]
    if tls.rsa_cert is not None and tls.rsa_key is not None:
        # OpenSSL keeps one certificate per key type and serves the one the client's
        # signature algorithms and ciphers allow: ECDSA first, RSA for RSA-only clients.
        pairs.append((tls.rsa_cert, tls.rsa_key))
    for cert, key in pairs:
        try:
            ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
        except (OSError, ssl.SSLError) as exc:
            raise CertificateError(f"cannot load certificate {cert} with key {key}: {exc}") from exc
    return ctx
