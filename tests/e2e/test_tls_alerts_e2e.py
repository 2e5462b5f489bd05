"""A handshake that cannot succeed ends with a TLS alert the client can name, not a
bare close: TLS 1.1 clients and clients with no cipher suite in common, on both
listeners, on uvloop (what `serve` runs) and on the standard loop; OpenSSL's s_client
and Python's ssl as the clients.  Only loopback is contacted."""

from __future__ import annotations

import smtplib
import socket
import ssl
import subprocess
import warnings

import pytest

from tests.fixtures.relay_proc import HOST, RelayFactory, RelayProcess

pytestmark = pytest.mark.e2e

LEGACY = "DEFAULT:@SECLEVEL=0"  # lets OpenSSL's client speak TLS 1.1 at all


def client(proc: RelayProcess, kind: str) -> ssl.SSLContext:
    ctx = proc.client_context()
    with warnings.catch_warnings():  # TLS 1.1 is deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        if kind == "tls11":
            ctx.set_ciphers(LEGACY)
            ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        else:  # only a suite without forward secrecy, which the relay does not offer
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            ctx.set_ciphers("AES128-SHA:@SECLEVEL=0")
    return ctx


def handshake_error(proc: RelayProcess, listener: str, ctx: ssl.SSLContext) -> str:
    """The reason Python's ssl gives for the failed handshake on *listener*."""
    try:
        if listener == "implicit":
            with socket.create_connection((HOST, proc.implicit_port), timeout=10) as raw:
                ctx.wrap_socket(raw, server_hostname="localhost").close()
        else:
            with smtplib.SMTP(HOST, proc.starttls_port, timeout=10) as smtp:
                smtp.ehlo("app.test")
                smtp.starttls(context=ctx)
    except ssl.SSLError as exc:
        return str(exc.reason)
    except OSError as exc:
        return f"no alert: {exc!r}"
    return "handshake succeeded"


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_failed_handshakes_end_with_an_alert(
    relay: RelayFactory, monkeypatch: pytest.MonkeyPatch, loop: str
) -> None:
    monkeypatch.setenv("TLS_RELAY_LOOP", loop)
    proc = relay()
    assert f"loop={loop}" in proc.log_text()
    for listener in ("implicit", "starttls"):
        assert handshake_error(proc, listener, client(proc, "tls11")) == (
            "TLSV1_ALERT_PROTOCOL_VERSION"
        )
        assert handshake_error(proc, listener, client(proc, "cipher")) == (
            "SSLV3_ALERT_HANDSHAKE_FAILURE"
        )
        # The same listener still serves a client that can.
        assert handshake_error(proc, listener, proc.client_context()) == "handshake succeeded"
    log = proc.wait_log("this listener needs TLSv1.2 or later", "no cipher suite in common")
    assert 'error="client offers at most TLSv1.1; this listener needs TLSv1.2 or later"' in log
    assert proc.stop() == 0


@pytest.mark.parametrize("listener", ["implicit", "starttls"])
def test_openssl_s_client_names_the_alert(relay: RelayFactory, listener: str) -> None:
    proc = relay()
    port = proc.implicit_port if listener == "implicit" else proc.starttls_port
    args = ["openssl", "s_client", "-connect", f"{HOST}:{port}", "-tls1_1", "-cipher", LEGACY]
    if listener == "starttls":
        args += ["-starttls", "smtp"]
    out = subprocess.run(args, input="", capture_output=True, text=True, timeout=30, check=False)
    assert "alert protocol version" in out.stdout + out.stderr, out.stderr[-2000:]
    assert proc.stop() == 0
