"""Issue 3 end to end: TLS-only delivery from `tls-relay serve` (a subprocess) to MX hosts
found through a real DNS-protocol server on loopback, with a real Postfix as the good MX,
attack peers in front of it, swaks as the submitting client and `tls-relay queue` /
`tls-relay policy` as separate processes.

Only 127.0.0.1 and 127.0.0.2 are ever contacted.  Every MX listens on the same port
(``delivery.port`` is global): Postfix on 127.0.0.1, the bad peers on 127.0.0.2.
"""

from __future__ import annotations

import asyncio
import email
import re
import shutil
import smtplib
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_queue_e2e import queue_json, wait_for
from tests.fixtures.badpeers import SmtpPeer, StripStartTlsProxy, _Server
from tests.fixtures.dns import DnsServer
from tests.fixtures.postfix import MX_NAME, PostfixMx
from tests.fixtures.relay_proc import HOST, RelayFactory, RelayProcess

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.postfix,
    pytest.mark.skipif(shutil.which("swaks") is None, reason="needs Debian's swaks"),
]

BAD_HOST = "127.0.0.2"  # attack peers; Postfix listens on 127.0.0.1 only
SENDER_DOMAIN = "sender.test"  # routed (by MX) back to Postfix, so DSNs can be read
SETTLE = 3.0  # seconds to wait for something that must NOT happen
LOG_WAIT = 10.0  # seconds to wait for a relay log line that must come


# ---- helpers -------------------------------------------------------------------------


def add_postfix_mx(dns: DnsServer, *domains: str) -> None:
    """MX for each domain -> mx.postfix.test (A 127.0.0.1)."""
    dns.add(MX_NAME, "A", "127.0.0.1")
    for domain in domains:
        dns.add(domain, "MX", f"10 {MX_NAME}.")


def delivery_config(
    dns: DnsServer, mx_port: int, ca_file: Path, policy: dict[str, Any] | None = None
) -> dict[str, Any]:
    """extra_config: resolve through the DNS fixture, deliver to *mx_port*, check
    certificates against the test CA, level `verify` by default; one attempt per test."""
    return {
        "delivery": {
            "resolver": {"nameservers": [HOST], "port": dns.port, "timeout": "2s"},
            "port": mx_port,
            "ca_file": str(ca_file),
        },
        "policy": policy or {"default": {"level": "verify"}},
        "queue": {"retry": ["1h"], "shutdown_grace": "5s"},
    }


def swaks(
    proc: RelayProcess, sender: str, rcpts: list[str], subject: str, msgid: str
) -> subprocess.CompletedProcess[str]:
    """Submit over STARTTLS, verifying the relay's certificate against the test CA."""
    data = (
        f"From: {sender}\\nTo: {', '.join(rcpts)}\\nSubject: {subject}\\n"
        f"Message-ID: <{msgid}>\\n\\nhello over TLS\\n"
    )
    cmd = ["swaks", "--server", f"{HOST}:{proc.starttls_port}", "--helo", "app.test"]
    cmd += ["--tls", "--tls-verify", "--tls-ca-path", str(proc.ca_file), "--timeout", "15"]
    cmd += ["--from", sender, "--to", ",".join(rcpts), "--data", data]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"<~\s+250 2\.0\.0 Ok: queued as [0-9A-F]+", done.stdout), done.stdout
    return done


def delivery_lines(proc: RelayProcess, **fields: str) -> list[str]:
    """The relay's `delivery` log lines whose key=value fields match *fields*, once there
    is one (bounded wait): Postfix can store a message before the relay, under load,
    has logged the 250 it got for it."""
    deadline = time.monotonic() + LOG_WAIT
    while True:
        out = [
            line
            for line in proc.log_text().splitlines()
            if " delivery " in line
            and all(re.search(rf"\b{k}={re.escape(v)}(\s|$)", line) for k, v in fields.items())
        ]
        if out or time.monotonic() > deadline:
            return out
        time.sleep(0.05)


def deferred(proc: RelayProcess) -> dict[str, Any] | None:
    """The only message's first recipient once it is deferred (from `queue list --json`)."""
    items = queue_json(proc)
    if items and items[0]["recipients"][0]["state"] == "deferred":
        return dict(items[0]["recipients"][0])
    return None


def postfix_nrcpts(mx: PostfixMx) -> list[int]:
    """nrcpt= of every message Postfix's qmgr took in: one per SMTP transaction."""
    return sorted(int(n) for n in re.findall(r"nrcpt=(\d+) \(queue active\)", mx.log_text()))


class _PeerThread:
    """Runs a badpeers server on its own event loop in a thread (the tests are sync)."""

    def __init__(self, peer: _Server) -> None:
        self.peer = peer
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.peer.start(), self.loop).result(10)

    def stop(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.peer.stop(), self.loop).result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            if not self.thread.is_alive():
                self.loop.close()


@pytest.fixture
def peers() -> Iterator[Callable[[_Server], _Server]]:
    """``peers(peer)`` starts a bad peer in a background loop; all stop at teardown."""
    started: list[_PeerThread] = []

    def start(peer: _Server) -> _Server:
        runner = _PeerThread(peer)
        runner.start()
        started.append(runner)
        return peer

    yield start
    for runner in started:
        runner.stop()


def bad_peer(kind: str, port: int) -> _Server:
    if kind == "strip":  # downgrade: a MITM deletes STARTTLS from Postfix's EHLO reply
        return StripStartTlsProxy(BAD_HOST, port, (HOST, port))
    return SmtpPeer(BAD_HOST, port, starttls="none", name="bad.evil.test")


# ---- 1. swaks -> relay -> Postfix over verified TLS ------------------------------------


def test_two_domains_arrive_at_postfix_over_tls(
    relay: RelayFactory,
    postfix_mx: PostfixMx,
    dns_server: DnsServer,
    ca_file: Path,
) -> None:
    add_postfix_mx(dns_server, "a.test", "b.test")
    proc = relay(extra_config=delivery_config(dns_server, postfix_mx.port, ca_file))
    rcpts = ["alice@a.test", "bob@a.test", "carol@b.test"]
    swaks(proc, "app@corp.test", rcpts, "two domains", "two-domains@corp.test")

    got = postfix_mx.wait_messages(3, timeout=30)
    assert sorted(m.recipient for m in got) == sorted(rcpts)
    for m in got:
        assert m.message["Subject"] == "two domains"
        assert m.message["Message-ID"] == "<two-domains@corp.test>"
        assert m.return_path == "<app@corp.test>"
        received = [str(r) for r in m.message.get_all("Received", [])]
        # Postfix's own (TLS from the relay), then the relay's (TLS from swaks).
        assert any(
            "(tls-relay) with ESMTPS" in r and re.search(r"using TLSv1\.[23] with cipher \S+", r)
            for r in received
        ), received
        # ESMTPS: Postfix took it over TLS (RFC 3848).
        assert any("by mx.postfix.test (Postfix) with ESMTPS" in r for r in received), received
    # One transaction per recipient domain: a.test with two recipients, b.test with one.
    assert postfix_nrcpts(postfix_mx) == [1, 2]
    log = postfix_mx.wait_log("TLS connection established from")
    assert re.search(r"TLS connection established from \S+\[127\.0\.0\.1\]: TLSv1\.[23]", log)

    wait_for(lambda: queue_json(proc) == [] or None, "the queue to empty")
    lines = delivery_lines(proc, outcome="delivered")
    assert sorted(re.findall(r" rcpt=(\S+)", "\n".join(lines))) == [
        "alice@a.test,bob@a.test",
        "carol@b.test",
    ], lines
    for line in lines:
        assert f"mx={MX_NAME} ip=127.0.0.1 port={postfix_mx.port}" in line
        assert "level_required=verify level_met=verify" in line
        assert re.search(r"tls=TLSv1\.[23] cipher=\S+ cert_sha256=[0-9a-fA-F:]{64,}", line), line
    assert proc.stop() == 0


# ---- 2. downgrade attacks --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["strip", "none"])
def test_downgrade_first_mx_skipped_second_gets_the_mail(
    kind: str,
    relay: RelayFactory,
    postfix_mx: PostfixMx,
    dns_server: DnsServer,
    ca_file: Path,
    peers: Callable[[_Server], _Server],
) -> None:
    bad = peers(bad_peer(kind, postfix_mx.port))
    add_postfix_mx(dns_server)
    dns_server.add("evil.test", "MX", "10 bad.evil.test.", f"20 {MX_NAME}.")
    dns_server.add("bad.evil.test", "A", BAD_HOST)
    proc = relay(extra_config=delivery_config(dns_server, postfix_mx.port, ca_file))
    swaks(proc, "app@corp.test", ["victim@evil.test"], "downgrade", f"dg-{kind}@corp.test")

    (got,) = postfix_mx.wait_messages(1, timeout=30)
    assert got.recipient == "victim@evil.test" and got.message["Subject"] == "downgrade"
    wait_for(lambda: queue_json(proc) == [] or None, "the queue to empty")
    # The bad MX was tried first, and saw EHLO but never an envelope in plaintext.
    assert bad.connections >= 1
    assert "EHLO" in bad.verbs(tls=False)
    assert not bad.plaintext_mail, bad.commands
    (refused,) = delivery_lines(proc, rcpt="victim@evil.test", mx="bad.evil.test")
    assert f"ip={BAD_HOST}" in refused and "outcome=deferred" in refused
    assert "STARTTLS not offered" in refused and "refusing plaintext" in refused
    (ok,) = delivery_lines(proc, rcpt="victim@evil.test", mx=MX_NAME)
    assert "outcome=delivered" in ok and "level_met=verify" in ok
    # Postfix saw exactly one message: the one over TLS, not one through the proxy.
    assert postfix_nrcpts(postfix_mx) == [1]
    assert proc.stop() == 0


@pytest.mark.parametrize("kind", ["strip", "none"])
def test_downgrade_only_mx_bad_stays_deferred(
    kind: str,
    relay: RelayFactory,
    postfix_mx: PostfixMx,
    dns_server: DnsServer,
    ca_file: Path,
    peers: Callable[[_Server], _Server],
) -> None:
    bad = peers(bad_peer(kind, postfix_mx.port))
    dns_server.add("evil.test", "MX", "10 bad.evil.test.")
    dns_server.add("bad.evil.test", "A", BAD_HOST)
    proc = relay(extra_config=delivery_config(dns_server, postfix_mx.port, ca_file))
    swaks(proc, "app@corp.test", ["victim@evil.test"], "no way", f"only-{kind}@corp.test")

    r = wait_for(lambda: deferred(proc), "the recipient to be deferred")
    assert r["address"] == "victim@evil.test" and r["attempts"] == 1
    assert "STARTTLS" in str(r["last_reason"]) and "plaintext" in str(r["last_reason"])
    assert r["next_attempt"] is not None
    time.sleep(SETTLE)
    assert postfix_mx.messages() == []
    assert bad.connections >= 1 and not bad.plaintext_mail, bad.commands
    assert postfix_nrcpts(postfix_mx) == []  # not even through the stripping proxy
    (line,) = delivery_lines(proc, rcpt="victim@evil.test", mx="bad.evil.test")
    assert "outcome=deferred" in line and "STARTTLS not offered" in line
    assert "bounced" not in proc.log_text()
    assert proc.stop() == 0


# ---- 3. null MX and NXDOMAIN bounce at once, the good recipient is delivered ----------


def _dsn_parts(raw: bytes) -> tuple[Message, list[Message]]:
    msg = email.message_from_bytes(raw)
    assert msg.get_content_type() == "multipart/report", msg.get_content_type()
    parts = msg.get_payload()
    assert isinstance(parts, list)
    status = parts[1]
    assert status.get_content_type() == "message/delivery-status"
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    return msg, blocks[1:]  # the per-message block first, then one per recipient


def test_null_mx_and_nxdomain_bounce_at_once(
    relay: RelayFactory,
    postfix_mx: PostfixMx,
    dns_server: DnsServer,
    ca_file: Path,
) -> None:
    add_postfix_mx(dns_server, "a.test", SENDER_DOMAIN)
    dns_server.add("nullmx.test", "MX", "0 .")
    # nosuch.test owns nothing: NXDOMAIN.
    proc = relay(extra_config=delivery_config(dns_server, postfix_mx.port, ca_file))
    sender = f"app@{SENDER_DOMAIN}"
    rcpts = ["ok@a.test", "nobody@nullmx.test", "nobody@nosuch.test"]
    swaks(proc, sender, rcpts, "mixed fate", "mixed@sender.test")

    got = {m.recipient: m for m in postfix_mx.wait_messages(2, timeout=30)}
    assert set(got) == {"ok@a.test", sender}
    assert got["ok@a.test"].message["Subject"] == "mixed fate"
    dsn = got[sender]
    assert dsn.return_path == "<>"
    msg, blocks = _dsn_parts(dsn.raw)
    assert msg["Auto-Submitted"] == "auto-replied"
    failed = {str(b["Final-Recipient"]): b for b in blocks}
    assert set(failed) == {"rfc822; nobody@nullmx.test", "rfc822; nobody@nosuch.test"}
    for block in failed.values():
        assert block["Action"] == "failed" and str(block["Status"]).startswith("5.")
    text = dsn.raw.decode(errors="replace")
    assert "null MX" in text and "NXDOMAIN" in text
    assert "ok@a.test" not in {str(b["Final-Recipient"]) for b in blocks}

    wait_for(lambda: queue_json(proc) == [] or None, "the queue (message and DSN) to empty")
    log = proc.log_text()
    for rcpt in ("nobody@nullmx.test", "nobody@nosuch.test"):
        bounced = rf"queue_state \S+ recipient={re.escape(rcpt)} state=bounced attempts=1"
        assert re.search(bounced, log), log
        (line,) = delivery_lines(proc, rcpt=rcpt)
        assert "outcome=bounced" in line and "mx=-" in line  # no MX was ever contacted
    (line,) = delivery_lines(proc, rcpt="ok@a.test")  # the delivery line is the record
    assert "outcome=delivered" in line
    assert not re.search(r"queue_state \S+ recipient=ok@a\.test", log)  # not twice
    assert "dsn_queued" in log
    assert proc.stop() == 0


# ---- 4. tls-relay policy DOMAIN ---------------------------------------------------------


def policy_cli(proc: RelayProcess, domain: str) -> subprocess.CompletedProcess[str]:
    return proc.command("policy", domain)


def test_policy_command_shows_mx_and_level(
    relay: RelayFactory,
    dns_server: DnsServer,
    ca_file: Path,
) -> None:
    add_postfix_mx(dns_server, "a.test", "b.test")
    dns_server.add("nullmx.test", "MX", "0 .")
    policy = {"default": {"level": "verify"}, "domains": {"b.test": {"level": "secure"}}}
    proc = relay(start=False, extra_config=delivery_config(dns_server, 2525, ca_file, policy))

    a = policy_cli(proc, "A.Test")
    assert a.returncode == 0, a.stdout + a.stderr
    assert "domain: a.test" in a.stdout
    assert re.search(rf"^\s+10 {re.escape(MX_NAME)}\s+127\.0\.0\.1$", a.stdout, re.M), a.stdout
    assert "delivery port 2525" in a.stdout
    assert "TLS level: verify (from static policy default)" in a.stdout
    assert "name must match the MX host name" in a.stdout

    b = policy_cli(proc, "b.test")
    assert b.returncode == 0, b.stdout + b.stderr
    assert MX_NAME in b.stdout
    assert "TLS level: secure (from static policy domains['b.test'])" in b.stdout

    null = policy_cli(proc, "nullmx.test")
    assert "permanent failure" in null.stdout and "null MX" in null.stdout, null.stdout
    assert dns_server.queried("a.test", "MX") and dns_server.queried(MX_NAME, "A")


def test_verify_refuses_postfix_under_another_mx_name(
    relay: RelayFactory,
    postfix_mx: PostfixMx,
    dns_server: DnsServer,
    ca_file: Path,
) -> None:
    """The same Postfix, reached through an MX name its certificate does not carry: under
    `verify` the name check fails, so the recipient is deferred and nothing is sent."""
    dns_server.add("alias.test", "MX", "10 other-mx.alias.test.")
    dns_server.add("other-mx.alias.test", "A", "127.0.0.1")
    proc = relay(extra_config=delivery_config(dns_server, postfix_mx.port, ca_file))
    swaks(proc, "app@corp.test", ["someone@alias.test"], "wrong name", "wrong-name@corp.test")

    r = wait_for(lambda: deferred(proc), "the recipient to be deferred")
    reason = str(r["last_reason"])
    assert "level verify required" in reason
    assert "do not match MX host other-mx.alias.test" in reason
    time.sleep(SETTLE)
    assert postfix_mx.messages() == [] and postfix_nrcpts(postfix_mx) == []
    assert postfix_mx.tls_sessions() == 1  # the handshake happened; no envelope followed it
    (line,) = delivery_lines(proc, rcpt="someone@alias.test")
    assert "level_required=verify level_met=encrypt policy=static outcome=deferred" in line
    assert proc.stop() == 0


def submit_smtputf8(proc: RelayProcess, sender: str, rcpt: str, subject: str) -> None:
    """Python's smtplib, as applications use it: STARTTLS, then MAIL with SMTPUTF8."""
    ctx = ssl.create_default_context(cafile=str(proc.ca_file))
    message = f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n\r\nhello\r\n"
    with smtplib.SMTP(HOST, proc.starttls_port, timeout=15) as client:
        client.starttls(context=ctx)
        refused = client.sendmail(sender, [rcpt], message.encode(), mail_options=["SMTPUTF8"])
        assert refused == {}


def test_unicode_spellings_of_a_secure_domain_get_its_policy(
    relay: RelayFactory,
    postfix_mx: PostfixMx,
    dns_server: DnsServer,
    ca_file: Path,
) -> None:
    """Issue 10, item 1: `xn--bcher-kva.test` is configured `secure` (the certificate
    must name the recipient domain; Postfix's names only its MX host), the default is
    `encrypt`.  Written as a U-label or in fullwidth letters, the domain used to get the
    default and was delivered to the configured domain's own MX; now every spelling is
    that domain: deferred under `secure`, and nothing reaches Postfix."""
    add_postfix_mx(dns_server, "xn--bcher-kva.test")
    policy = {
        "default": {"level": "encrypt"},
        "domains": {"xn--bcher-kva.test": {"level": "secure"}},
    }
    proc = relay(extra_config=delivery_config(dns_server, postfix_mx.port, ca_file, policy))
    fullwidth = "\uff42\u00fc\uff43\uff48\uff45\uff52.test"
    for local, domain in (("u", "bücher.test"), ("f", fullwidth), ("a", "XN--BCHER-KVA.test")):
        submit_smtputf8(proc, "app@corp.test", f"{local}@{domain}", f"spelling {local}")

    def all_deferred() -> list[dict[str, Any]] | None:
        rcpts = [r for item in queue_json(proc) for r in item["recipients"]]
        return rcpts if len(rcpts) == 3 and all(r["state"] == "deferred" for r in rcpts) else None

    rcpts = wait_for(all_deferred, "every spelling to be deferred under `secure`")
    assert sorted(r["address"] for r in rcpts) == [
        "a@xn--bcher-kva.test",
        "f@xn--bcher-kva.test",
        "u@xn--bcher-kva.test",
    ]
    for r in rcpts:
        assert "level secure required" in str(r["last_reason"]), r
    time.sleep(SETTLE)
    assert postfix_mx.messages() == []
    lines = delivery_lines(proc, outcome="deferred")
    assert lines and all("level_required=secure" in line for line in lines), lines
    assert proc.stop() == 0
