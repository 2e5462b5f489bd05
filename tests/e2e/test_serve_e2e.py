"""End to end on the production event loop: `tls-relay serve` (uvloop, its default).

Admission and the 421s a client must see: over a connection cap, after an idle
timeout, at SIGTERM; and a client that connects and leaves at once never keeps its
slot.  These once failed only on uvloop (a transport type check dropped the 421s; an
EOF that arrived before the session's task ran kept the slot), which the in-process
tests, then on the standard loop only, could not see.  Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import datetime as dt
import os
import smtplib
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import trustme
import yaml

from tests.fixtures.net import free_port
from tests.fixtures.rawsmtp import RawSMTP
from tests.fixtures.relay_proc import BIN, HOST, RelayFactory, RelayProcess

pytestmark = pytest.mark.e2e


def _no_tracebacks(proc: RelayProcess) -> None:
    text = proc.log_text()
    assert "Traceback" not in text and "AssertionError" not in text, text[-3000:]


def test_serve_runs_on_uvloop(relay: RelayFactory) -> None:
    proc = relay()
    proc.wait_log("relay_started")
    assert "loop=uvloop" in proc.log_text()


def test_over_the_per_ip_cap_a_client_gets_421(relay: RelayFactory) -> None:
    proc = relay(limits={"max_connections_per_ip": 2, "max_connections": 10})
    with RawSMTP(HOST, proc.starttls_port) as one, RawSMTP(HOST, proc.starttls_port) as two:
        assert one.greet()[0] == 220 and two.greet()[0] == 220
        with RawSMTP(HOST, proc.starttls_port) as three:
            assert three.greet() == (421, "4.7.0 Too many connections, try again later")
    _no_tracebacks(proc)


def test_connect_and_close_never_keeps_a_slot(relay: RelayFactory) -> None:
    proc = relay(limits={"max_connections_per_ip": 1, "max_connections": 10})
    for _ in range(20):
        socket.create_connection((HOST, proc.starttls_port), timeout=5).close()
    code = 0
    for _ in range(50):  # bounded: 5 s for the relay to see the closes
        with RawSMTP(HOST, proc.starttls_port) as raw:
            code = raw.greet()[0]
        if code == 220:
            break
        time.sleep(0.1)
    assert code == 220
    _no_tracebacks(proc)


def test_an_idle_client_gets_421_at_the_command_timeout(relay: RelayFactory) -> None:
    proc = relay(limits={"command_timeout": "1s"})
    with RawSMTP(HOST, proc.starttls_port) as raw:
        assert raw.greet()[0] == 220
        started = time.monotonic()
        assert raw.reply() == (421, "4.4.2 Timeout, closing connection")
        assert time.monotonic() - started < 8
    _no_tracebacks(proc)


def test_sigterm_sends_421_to_connected_clients(relay: RelayFactory) -> None:
    proc = relay()
    with RawSMTP(HOST, proc.starttls_port) as raw:
        assert raw.greet()[0] == 220
        assert raw.cmd("EHLO app.test")[0] == 250
        assert proc.stop() == 0
        assert raw.reply() == (421, "4.3.2 Service shutting down, closing connection")


def test_serve_says_when_dane_stays_off(relay: RelayFactory) -> None:
    """dane: true with a resolver that does not answer: the probe fails, serve says so
    (WARNING, with the reason) and keeps running; nothing is said with dane: false."""
    proc = relay(extra_config={"policy": {"mta_sts": False, "dane": True}})
    line = next(x for x in proc.wait_log("dane_disabled").splitlines() if "dane_disabled" in x)
    assert "WARNING" in line and " dane_disabled " in line
    assert "the DNSSEC probe ('. NS' at 127.0.0.1) failed" in line
    assert proc.running
    quiet = relay(extra_config={"policy": {"mta_sts": False, "dane": False}})
    quiet.wait_log("relay_started")
    time.sleep(0.5)
    assert " dane_disabled " not in quiet.log_text() and " dane_enabled " not in quiet.log_text()


def test_a_second_serve_on_the_same_spool_stops_before_touching_it(
    relay: RelayFactory, tmp_path: Path
) -> None:
    proc = relay()
    proc.wait_log("relay_started")
    control = proc.spool_dir / "control.sock"
    before = control.stat().st_ino
    other = dict(proc.config)
    other["listeners"] = [{"address": f"{HOST}:{free_port()}", "tls": "starttls"}]
    other_path = tmp_path / "second.yaml"
    other_path.write_text(yaml.safe_dump(other))
    (proc.spool_dir / "queue" / ".tmp-left-by-first").write_bytes(b"x")  # recovery would remove
    done = subprocess.run(
        [str(BIN), "serve", "-c", str(other_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1
    assert f"spool {proc.spool_dir} is in use by another tls-relay serve (pid " in done.stderr
    assert "Traceback" not in done.stderr
    assert control.stat().st_ino == before  # the first one's control socket is untouched
    assert (proc.spool_dir / "queue" / ".tmp-left-by-first").exists()  # no recovery ran
    with RawSMTP(HOST, proc.starttls_port) as raw:
        assert raw.greet()[0] == 220
    assert proc.stop() == 0


def test_implicit_tls_counts_from_accept_and_closes_over_the_cap_at_once(
    relay: RelayFactory,
) -> None:
    """On serve: a silent connection to the implicit-TLS port takes the IP's only slot
    before any handshake; the next implicit client is closed without a handshake and
    a STARTTLS client gets 421; when the silent one leaves, the slot is free again."""
    proc = relay(limits={"max_connections_per_ip": 1, "max_connections": 10})
    silent = socket.create_connection((HOST, proc.implicit_port), timeout=5)
    try:
        time.sleep(0.3)  # bounded: the relay has accepted it by then
        with pytest.raises((ssl.SSLError, ConnectionError)):
            RawSMTP(HOST, proc.implicit_port, implicit=proc.client_context()).close()
        with RawSMTP(HOST, proc.starttls_port) as raw:
            assert raw.greet()[0] == 421
    finally:
        silent.close()
    code = 0
    for _ in range(50):  # bounded: 5 s
        with RawSMTP(HOST, proc.implicit_port, implicit=proc.client_context()) as raw:
            code = raw.greet()[0]
        if code == 220:
            break
        time.sleep(0.1)
    assert code == 220
    assert "tls_handshake_failed" in proc.log_text()
    _no_tracebacks(proc)


def test_a_certificate_expiring_soon_is_warned_about(
    relay: RelayFactory, ca: trustme.CA, tmp_path: Path
) -> None:
    """Issue 13: a warning at start (and daily) and in check-config, which exits 0."""
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(days=10)
    leaf = ca.issue_cert("localhost", "127.0.0.1", not_after=soon)
    cert, key = tmp_path / "soon.pem", tmp_path / "soon.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    proc = relay(extra_config={"tls": {"cert": str(cert), "key": str(key)}})
    log = proc.wait_log(" certificate_expiring ")
    line = next(x for x in log.splitlines() if " certificate_expiring " in x)
    assert "WARNING" in line and "certificate expires in 9 days" in line
    out = proc.command("check-config")
    assert out.returncode == 0 and "warning: " in out.stdout and "expires in 9 days" in out.stdout


def test_helper_threads_do_not_preempt_the_event_loop(relay: RelayFactory) -> None:
    """relay.threads on the real serve: once a message was accepted, the spool's
    commit thread runs SCHED_BATCH under its own name; the event loop's thread, and
    asyncio's executor that moves large messages' pieces, keep the normal policy."""
    proc = relay()
    proc.wait_log("relay_started")
    with smtplib.SMTP(HOST, proc.starttls_port, timeout=15) as client:
        client.starttls(context=proc.client_context())
        client.sendmail("a@src.test", ["b@example.test"], b"Subject: t\r\n\r\nhi\r\n")
    proc.wait_log("message_queued")
    assert proc.proc is not None
    pid = proc.proc.pid
    names = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        names[name] = names.get(name, set()) | {os.sched_getscheduler(int(tid))}
    assert os.sched_getscheduler(pid) == os.SCHED_OTHER
    assert names["spool-commit"] == {os.SCHED_BATCH}, names
