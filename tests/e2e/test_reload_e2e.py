"""End to end: SIGHUP reloads `tls-relay serve` (issue 13) - a new certificate for the
next handshake while an open session goes on, a broken config kept out with every
error logged, restart-only changes named; with `workers: 2` every worker reloads."""

from __future__ import annotations

import signal
import smtplib
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from cryptography import x509

from tests.fixtures.relay_proc import HOST, RelayFactory, RelayProcess

pytestmark = [pytest.mark.e2e]


def write_cert(ca: trustme.CA, cert: Path, key: Path) -> int:
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number


def served_serial(proc: RelayProcess) -> int:
    raw = socket.create_connection((HOST, proc.implicit_port), timeout=10)
    with raw, proc.client_context().wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def edit(proc: RelayProcess, change: dict[str, Any]) -> None:
    doc = yaml.safe_load(proc.config_path.read_text())
    doc.update(change)
    proc.config_path.write_text(yaml.safe_dump(doc))


def test_a_new_certificate_for_new_connections_while_a_session_goes_on(
    relay: RelayFactory, ca: trustme.CA, tmp_path: Path
) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    first = write_cert(ca, cert, key)
    proc = relay(extra_config={"tls": {"cert": str(cert), "key": str(key)}})
    assert served_serial(proc) == first
    open_session = smtplib.SMTP(HOST, proc.starttls_port, timeout=15)
    open_session.starttls(context=proc.client_context())
    second = write_cert(ca, cert, key)
    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGHUP)
    proc.wait_log(" reload_done ")
    assert served_serial(proc) == second
    refused = open_session.sendmail("app@a.test", ["bob@b.test"], b"Subject: s\r\n\r\nhi\r\n")
    assert refused == {}  # the established session was not dropped
    open_session.quit()


def test_a_broken_config_is_kept_out_and_every_error_logged(relay: RelayFactory) -> None:
    proc = relay()
    edit(proc, {"limits": {"max_recipients": -1}, "policy": {"default": {"level": "may"}}})
    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGHUP)
    log = proc.wait_log(" reload_kept ")
    failed = [line for line in log.splitlines() if " reload_failed " in line]
    assert len(failed) == 2
    assert any("limits.max_recipients" in line for line in failed)
    assert any("plaintext is never allowed" in line for line in failed)
    assert proc.running
    ctx = ssl.create_default_context(cafile=str(proc.ca_file))
    with smtplib.SMTP(HOST, proc.starttls_port, timeout=15) as client:
        client.starttls(context=ctx)
        assert client.noop()[0] == 250


def test_restart_only_changes_are_named_and_policy_applied(relay: RelayFactory) -> None:
    proc = relay()
    edit(
        proc,
        {
            "limits": {"max_recipients": 7},
            "policy": {"domains": {"partner.test": {"level": "verify"}}},
        },
    )
    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGHUP)
    log = proc.wait_log(" reload_needs_restart ")
    line = next(x for x in log.splitlines() if " reload_needs_restart " in x)
    assert "changed=limits" in line and "policy" not in line.split("changed=")[1]


def test_workers_each_reload(relay: RelayFactory) -> None:
    proc = relay(extra_config={"workers": 2})
    proc.wait_log("workers_started count=2")
    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGHUP)
    proc.wait_log(" reload_forwarded ")
    for _ in range(100):  # bounded: 10 s
        if proc.log_text().count(" reload_done ") >= 2:
            break
        time.sleep(0.1)
    assert proc.log_text().count(" reload_done ") == 2
