"""End to end: the audit trail of `tls-relay serve` delivering to Debian's Postfix, read
back with `tls-relay audit --json` and checked with `tls-relay audit verify` - also after
someone edits a line.  Only 127.0.0.1 is used."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.e2e.test_delivery_e2e import add_postfix_mx, delivery_config, submit_smtputf8
from tests.e2e.test_queue_e2e import queue_json, wait_for
from tests.fixtures.dns import DnsServer
from tests.fixtures.postfix import PostfixMx
from tests.fixtures.relay_proc import RelayFactory, RelayProcess

pytestmark = [pytest.mark.e2e, pytest.mark.postfix]


def audit(proc: RelayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return proc.command("audit", *args)


def postfix_cert_sha256(mx: PostfixMx) -> str:
    leaf = x509.load_pem_x509_certificates((mx.conf / "mx.pem").read_bytes())[0]
    return hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()


def test_every_delivered_recipient_leaves_a_verifiable_record(
    relay: RelayFactory, postfix_mx: PostfixMx, dns_server: DnsServer, ca_file: Path
) -> None:
    add_postfix_mx(dns_server, "example.test", "other.test")
    proc = relay(extra_config=delivery_config(dns_server, postfix_mx.port, ca_file))
    submit_smtputf8(proc, "app@corp.test", "a@example.test", "first")
    submit_smtputf8(proc, "app@corp.test", "b@other.test", "second")
    postfix_mx.wait_messages(2, timeout=30)
    wait_for(lambda: queue_json(proc) == [] or None, "the queue to empty")

    listed = audit(proc, "--json")
    assert listed.returncode == 0, listed.stderr
    got: list[dict[str, Any]] = json.loads(listed.stdout)
    assert sorted(r["recipient"] for r in got) == ["a@example.test", "b@other.test"]
    for r in got:
        assert r["sender"] == "app@corp.test" and r["message_id"].endswith("@relay.test>")
        assert (r["mx_host"], r["mx_ip"]) == ("mx.postfix.test", "127.0.0.1")
        assert r["tls_version"] == "TLSv1.3" and r["cipher"]
        assert r["cert_sha256"] == postfix_cert_sha256(postfix_mx)
        assert (r["level_required"], r["policy_source"]) == ("verify", "static")
        assert r["level_met"] in ("verify", "secure")
        assert r["reply"].startswith("250 ")
    one = audit(proc, "--domain", "OTHER.test")
    assert one.returncode == 0 and "b@other.test" in one.stdout
    assert "a@example.test" not in one.stdout

    ok = audit(proc, "verify")
    assert ok.returncode == 0 and "audit trail OK: 2 records" in ok.stdout

    (day,) = (proc.spool_dir / "audit").glob("*.jsonl")
    lines = day.read_text().splitlines()
    # The first record, whichever recipient it is (the two deliveries may finish in
    # either order): its sender is app@corp.test either way.
    lines[0] = lines[0].replace("app@corp.test", "zpp@corp.test")
    day.write_text("\n".join(lines) + "\n")
    broken = audit(proc, "verify")
    assert broken.returncode == 1
    assert f"{day}:2: chain broken" in broken.stdout
