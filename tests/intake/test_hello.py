"""relay.intake.hello: ClientHellos written by OpenSSL's own client (in memory), judged
by the gate, and the gate's verdict checked against what OpenSSL's server then does."""

from __future__ import annotations

import ssl
import warnings
from pathlib import Path

import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st

from relay.intake.hello import (
    HANDSHAKE_FAILURE,
    PROTOCOL_VERSION,
    TLS12,
    TLS13,
    HelloGate,
    parse,
)
from relay.intake.tlscontext import SERVER_CIPHERS

LEGACY = "DEFAULT:@SECLEVEL=0"  # lets OpenSSL's client speak TLS 1.0/1.1 at all


def client_hello(
    low: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
    high: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
    ciphers: str | None = None,
) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    with warnings.catch_warnings():  # TLS 1.0/1.1 are deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version, ctx.maximum_version = low, high
    out = ssl.MemoryBIO()
    end = ctx.wrap_bio(ssl.MemoryBIO(), out)
    with pytest.raises(ssl.SSLWantReadError):
        end.do_handshake()
    return out.read()


def server(tmp_path: Path, ca: trustme.CA, *, rsa: bool = False) -> ssl.SSLContext:
    """The listeners' context as relay.intake.tlscontext builds it: ECDSA, optional RSA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(SERVER_CIPHERS)
    kinds = [trustme.KeyType.ECDSA] + ([trustme.KeyType.RSA] if rsa else [])
    for kind in kinds:
        pem = tmp_path / f"{kind.name}.pem"
        ca.issue_cert("relay.test", key_type=kind).private_key_and_cert_chain_pem.write_to_path(
            str(pem)
        )
        ctx.load_cert_chain(pem)
    return ctx


def openssl_accepts(context: ssl.SSLContext, hello: bytes) -> bool:
    """Whether OpenSSL's server gets past this ClientHello (answers with its flight)."""
    incoming = ssl.MemoryBIO()
    incoming.write(hello)
    end = context.wrap_bio(incoming, ssl.MemoryBIO(), server_side=True)
    try:
        end.do_handshake()
    except ssl.SSLWantReadError:
        return True
    except ssl.SSLError:
        return False
    return True


CASES = [
    # (client, ECDSA only: refused with, ECDSA + RSA: refused with)
    ("default", {}, None, None),
    ("tls12 only", {"high": ssl.TLSVersion.TLSv1_2}, None, None),
    ("tls13 only", {"low": ssl.TLSVersion.TLSv1_3}, None, None),
    (
        "tls11 only",
        {"low": ssl.TLSVersion.TLSv1_1, "high": ssl.TLSVersion.TLSv1_1, "ciphers": LEGACY},
        PROTOCOL_VERSION,
        PROTOCOL_VERSION,
    ),
    (
        "tls10-11",
        {"low": ssl.TLSVersion.TLSv1, "high": ssl.TLSVersion.TLSv1_1, "ciphers": LEGACY},
        PROTOCOL_VERSION,
        PROTOCOL_VERSION,
    ),
    (
        "no shared suite",
        {"high": ssl.TLSVersion.TLSv1_2, "ciphers": "AES128-SHA:@SECLEVEL=0"},
        HANDSHAKE_FAILURE,
        HANDSHAKE_FAILURE,
    ),
    (
        "RSA-only client",
        {"high": ssl.TLSVersion.TLSv1_2, "ciphers": "ECDHE-RSA-AES128-GCM-SHA256"},
        HANDSHAKE_FAILURE,
        None,
    ),
]


@pytest.mark.parametrize(("name", "client", "ecdsa", "both"), CASES, ids=[c[0] for c in CASES])
def test_the_gate_refuses_exactly_what_openssl_would(
    tmp_path: Path, ca: trustme.CA, name: str, client: dict[str, object], ecdsa: int, both: int
) -> None:
    raw = client_hello(**client)  # type: ignore[arg-type]
    hello = parse(raw)
    assert hello is not None, name
    for context, expected in (
        (server(tmp_path, ca), ecdsa),
        (server(tmp_path, ca, rsa=True), both),
    ):
        refusal = HelloGate(context).refusal(hello)
        assert (refusal.alert[-1] if refusal else None) == expected, name
        assert openssl_accepts(context, raw) is (expected is None), name
        if refusal is not None:
            assert refusal.alert[:1] == b"\x15" and refusal.alert[5:6] == b"\x02"  # fatal


def test_what_a_clienthello_says(tmp_path: Path) -> None:
    hello = parse(client_hello())
    assert hello is not None and {TLS12, TLS13} <= hello.versions
    assert 0x1302 in hello.suites  # TLS_AES_256_GCM_SHA384
    old = parse(client_hello(ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1, LEGACY))
    assert old is not None and max(old.versions) == 0x0302


def test_only_a_whole_clienthello_is_judged() -> None:
    raw = client_hello()
    assert parse(raw[:-1]) is None and parse(raw[:3]) is None and parse(b"") is None
    assert parse(b"EHLO relay.test\r\n") is None  # plaintext on the TLS port
    # The same message split over two records (allowed, RFC 8446 5.1) is still read.
    body = raw[5:]
    split = b"".join(
        b"\x16\x03\x01" + len(part).to_bytes(2, "big") + part for part in (body[:50], body[50:])
    )
    assert parse(split) == parse(raw)


@given(st.binary(max_size=600))
def test_parse_never_raises(data: bytes) -> None:
    parse(data)
    parse(b"\x16\x03\x01" + len(data).to_bytes(2, "big") + b"\x01" + data)
