"""Interop (issue 15): the clients people submit with - swaks, Python's smtplib, curl and
msmtp from Debian - against both listeners of `tls-relay serve` (STARTTLS on the
submission port, implicit TLS), each verifying the relay's certificate.  Every message
must reach the spool with its recipient.  Only 127.0.0.1 is used."""

from __future__ import annotations

import shutil
import smtplib
import subprocess
from pathlib import Path

import pytest

from tests.e2e.test_intake import swaks
from tests.fixtures.relay_proc import HOST, RelayFactory, RelayProcess

pytestmark = [pytest.mark.e2e]

MESSAGE = b"From: app@a.test\r\nTo: bob@b.test\r\nSubject: interop\r\n\r\nhello\r\n"


def via_smtplib(proc: RelayProcess, implicit: bool, rcpt: str, tmp: Path) -> None:
    ctx = proc.client_context()
    if implicit:
        with smtplib.SMTP_SSL(HOST, proc.implicit_port, context=ctx, timeout=15) as c:
            assert c.sendmail("app@a.test", [rcpt], MESSAGE) == {}
    else:
        with smtplib.SMTP(HOST, proc.starttls_port, timeout=15) as c:
            c.starttls(context=ctx)
            assert c.sendmail("app@a.test", [rcpt], MESSAGE) == {}


def via_swaks(proc: RelayProcess, implicit: bool, rcpt: str, tmp: Path) -> None:
    result = swaks(proc, "--to", rcpt, implicit=implicit)
    assert result.returncode == 0, result.stdout + result.stderr


def via_curl(proc: RelayProcess, implicit: bool, rcpt: str, tmp: Path) -> None:
    body = tmp / "curl.eml"
    body.write_bytes(MESSAGE)
    url = (
        f"smtps://localhost:{proc.implicit_port}"
        if implicit
        else f"smtp://localhost:{proc.starttls_port}"
    )
    cmd = ["curl", "-sS", "--url", url, "--connect-to", f"localhost::{HOST}:"]
    cmd += ["--cacert", str(proc.ca_file), "--mail-from", "app@a.test", "--mail-rcpt", rcpt]
    cmd += ["--upload-file", str(body)]
    if not implicit:
        cmd.append("--ssl-reqd")  # STARTTLS, or fail: never plaintext
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr


def via_msmtp(proc: RelayProcess, implicit: bool, rcpt: str, tmp: Path) -> None:
    conf = tmp / "msmtprc"
    conf.write_text(
        "defaults\n"
        "tls on\n"
        f"tls_trust_file {proc.ca_file}\n"
        f"tls_starttls {'off' if implicit else 'on'}\n"
        "account relay\n"
        "host localhost\n"
        f"port {proc.implicit_port if implicit else proc.starttls_port}\n"
        "from app@a.test\n"
        "account default : relay\n"
    )
    conf.chmod(0o600)
    out = subprocess.run(
        ["msmtp", "-C", str(conf), rcpt],
        input=MESSAGE,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr.decode()


CLIENTS = {"smtplib": via_smtplib, "swaks": via_swaks, "curl": via_curl, "msmtp": via_msmtp}


def test_every_client_on_every_listener(relay: RelayFactory, tmp_path: Path) -> None:
    for tool in ("swaks", "curl", "msmtp"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs Debian's {tool} (make deps)")
    proc = relay()
    sent = []
    for name, send in CLIENTS.items():
        for implicit in (False, True):
            rcpt = f"{name}-{'implicit' if implicit else 'starttls'}@b.test"
            send(proc, implicit, rcpt, tmp_path)
            sent.append(rcpt)
    spool = proc.spool()
    got = sorted(r.address for q in spool.ids() for r in spool.load(q).recipients)
    assert got == sorted(sent)


def test_the_readme_lists_these_clients() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    row = next(line for line in readme.splitlines() if "submitting clients" in line)
    assert all(name in row for name in ("swaks", "smtplib", "curl", "msmtp"))
    assert set(CLIENTS) == {"swaks", "smtplib", "curl", "msmtp"}
