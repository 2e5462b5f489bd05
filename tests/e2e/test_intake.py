"""End to end: ``tls-relay serve`` as a subprocess, driven by swaks (Debian package).

Accepting over STARTTLS and implicit TLS, AUTH, and the refusals a client sees;
the spool is inspected after the fact.  Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.fixtures.relay_proc import RelayFactory, RelayProcess

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("swaks") is None, reason="needs Debian's swaks"),
]

QUEUED = re.compile(r"<~\s+250 2\.0\.0 Ok: queued as ([0-9A-F]+)")


def swaks(
    proc: RelayProcess, *args: str, implicit: bool = False, tls: bool = True
) -> subprocess.CompletedProcess[str]:
    port = proc.implicit_port if implicit else proc.starttls_port
    cmd = ["swaks", "--server", f"127.0.0.1:{port}", "--helo", "app.test"]
    cmd += ["--from", "app@a.test", "--timeout", "15"]
    cmd += ["--tls-verify", "--tls-ca-path", str(proc.ca_file)]
    if implicit:
        cmd.append("--tlsc")
    elif tls:
        cmd.append("--tls")
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60, check=False)


def queued_id(result: subprocess.CompletedProcess[str]) -> str:
    match = QUEUED.search(result.stdout)
    assert match, result.stdout + result.stderr
    return match.group(1)


def test_starttls_message_spooled_with_headers(relay: RelayFactory) -> None:
    proc = relay()
    data = "Subject: e2e\\nFrom: app@a.test\\n\\nhello from swaks\\n"
    result = swaks(proc, "--to", "Bob@B.Test", "--data", data)
    assert result.returncode == 0, result.stdout
    qid = queued_id(result)
    spool = proc.spool()
    env = spool.load(qid)
    assert env.sender == "app@a.test"
    assert [r.address for r in env.recipients] == ["Bob@b.test"]
    assert env.client is not None and env.client.ip == "127.0.0.1" and env.client.helo == "app.test"
    assert env.client.tls_version in ("TLSv1.2", "TLSv1.3") and env.client.tls_cipher
    raw = spool.read_data(qid)
    head, body = raw.split(b"\r\n\r\n", 1)
    text = head.decode()
    assert text.startswith("Received: from app.test (unknown [127.0.0.1])")
    assert f"(using {env.client.tls_version} with cipher {env.client.tls_cipher}" in text
    assert f"by relay.test (tls-relay) with ESMTPS id {qid}" in text
    assert f"\r\nMessage-ID: <{qid}@relay.test>\r\n" in text and "\r\nDate: " in text
    assert body.startswith(b"hello from swaks\r\n")
    log = proc.wait_log("session_close client=127.0.0.1", "messages=1")
    assert re.search(
        rf"message_queued queue_id={qid} client=127.0.0.1 user=- tls=TLSv1\.[23] ", log
    )
    assert "session_close client=127.0.0.1" in log and "messages=1" in log


def test_implicit_tls_with_auth_from_outside_networks(relay: RelayFactory) -> None:
    proc = relay(networks=["10.99.0.0/16"], users={"alice": "correct horse"})
    auth = ["--auth", "PLAIN", "--auth-user", "alice", "--auth-password", "correct horse"]
    result = swaks(proc, "--to", "x@b.test", *auth, implicit=True)
    assert result.returncode == 0, result.stdout
    assert "235 2.7.0 Authentication successful" in result.stdout
    env = proc.spool().load(queued_id(result))
    assert env.client is not None and env.client.user == "alice"
    assert b" with ESMTPSA id " in proc.spool().read_data(env.id)
    assert "correct horse" not in proc.log_text()  # never a password in the log


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_over_starttls(relay: RelayFactory, mechanism: str) -> None:
    proc = relay(networks=[], users={"bob": "hunter2"})
    auth = ["--auth", mechanism, "--auth-user", "bob", "--auth-password", "hunter2"]
    result = swaks(proc, "--to", "x@b.test", *auth)
    assert result.returncode == 0, result.stdout
    queued_id(result)


def test_wrong_password_is_535(relay: RelayFactory) -> None:
    proc = relay(networks=[], users={"bob": "hunter2"})
    auth = ["--auth", "PLAIN", "--auth-user", "bob", "--auth-password", "guess"]
    result = swaks(proc, "--to", "x@b.test", *auth)
    assert result.returncode == 28, result.stdout  # swaks: error in AUTH transaction
    assert "535 5.7.8 Authentication credentials invalid" in result.stdout
    assert proc.spool().ids() == []


def test_plaintext_mail_refused_530(relay: RelayFactory) -> None:
    proc = relay()
    result = swaks(proc, "--to", "x@b.test", tls=False)
    assert result.returncode == 23, result.stdout  # swaks: error in MAIL transaction
    assert "530 5.7.0 Must issue a STARTTLS command first" in result.stdout
    assert proc.spool().ids() == []


def test_auth_offered_only_inside_tls(relay: RelayFactory) -> None:
    proc = relay(networks=[], users={"bob": "hunter2"})
    result = swaks(proc, "--quit-after", "EHLO", tls=False)
    assert "STARTTLS" in result.stdout and "AUTH" not in result.stdout
    result = swaks(proc, "--quit-after", "EHLO")
    assert "AUTH LOGIN PLAIN" in result.stdout


def test_unauthenticated_relay_from_outside_refused(relay: RelayFactory) -> None:
    proc = relay(networks=["10.99.0.0/16"], users={"bob": "hunter2"})
    result = swaks(proc, "--to", "x@b.test")
    assert result.returncode == 24, result.stdout  # swaks: no RCPTs accepted
    assert "530 5.7.0 Authentication required" in result.stdout


def test_default_deny_without_networks_and_users(relay: RelayFactory) -> None:
    proc = relay(networks=[])
    result = swaks(proc, "--to", "x@b.test")
    assert result.returncode == 24, result.stdout
    assert "554 5.7.1 Relay access denied" in result.stdout


def test_oversize_message_552(relay: RelayFactory) -> None:
    proc = relay(limits={"max_message_size": "2KiB"})
    result = swaks(proc, "--to", "x@b.test", "--body", "z" * 70 + "\\n" + ("y" * 76 + "\\n") * 60)
    assert result.returncode == 26, result.stdout  # swaks: mail not accepted after DATA
    assert "SIZE 2048" in result.stdout
    assert "552 5.3.4 Message too big for system" in result.stdout
    assert proc.spool().ids() == []


def test_too_many_recipients_452_keeps_the_rest(relay: RelayFactory) -> None:
    proc = relay(limits={"max_recipients": 2})
    result = swaks(proc, "--to", "one@b.test,two@c.test,three@d.test")
    assert "452 4.5.3 Too many recipients" in result.stdout
    env = proc.spool().load(queued_id(result))
    assert [r.address for r in env.recipients] == ["one@b.test", "two@c.test"]


def test_sigterm_exits_zero(relay: RelayFactory) -> None:
    proc = relay()
    assert proc.stop() == 0
    log = proc.log_text()
    assert "relay_stopping reason=signal" in log and "relay_stopped" in log
