"""End to end: DANE (RFC 7672) with real peers - `tls-relay serve`, Debian's Postfix as
the MX with a certificate per case, and a real DNSSEC chain: nsd serving a signed
private root (with an unsigned and a bogus child zone) behind unbound validating on
loopback (tests/fixtures/dnssec.py).  Every negative case asserts that Postfix got no
mail and saw no MAIL command.  Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.e2e.test_delivery_e2e import SETTLE, deferred, delivery_lines, submit_smtputf8
from tests.e2e.test_queue_e2e import wait_for
from tests.fixtures.dnssec import DnssecLab, DnssecLabFactory
from tests.fixtures.postfix import PostfixMx, available, postfix_instance
from tests.fixtures.relay_proc import RelayFactory, RelayProcess

pytestmark = [pytest.mark.e2e, pytest.mark.postfix]

MX = "mx.dane.test"


def spki_sha256(cert: x509.Certificate) -> str:
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def served_chain(mx: PostfixMx) -> list[x509.Certificate]:
    """The certificates Postfix sends, leaf first (its mx.pem: key, then the chain)."""
    return x509.load_pem_x509_certificates((mx.conf / "mx.pem").read_bytes())


def ee_tlsa(mx: PostfixMx) -> str:
    return f"3 1 1 {spki_sha256(served_chain(mx)[0])}"


def ta_tlsa(mx: PostfixMx) -> str:
    return f"2 1 1 {spki_sha256(served_chain(mx)[1])}"


def mx_records(domain: str, host: str, port: int, tlsa: str | None) -> list[str]:
    """MX, A and (when given) TLSA records for *domain* served by *host*."""
    lines = [f"{domain}. 60 IN MX 10 {host}.", f"{host}. 60 IN A 127.0.0.1"]
    if tlsa is not None:
        lines.append(f"_{port}._tcp.{host}. 60 IN TLSA {tlsa}")
    return lines


def dane_config(
    lab: DnssecLab, mx_port: int, policy: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Floor `encrypt` (what DANE adds is what is tested), MTA-STS off, DANE on."""
    return {
        "delivery": {
            "resolver": {"nameservers": [lab.host], "port": lab.port, "timeout": "3s"},
            "port": mx_port,
        },
        "policy": policy or {"default": {"level": "encrypt"}, "mta_sts": False, "dane": True},
        "queue": {"retry": ["1h"], "shutdown_grace": "5s"},
    }


@pytest.fixture
def peer(ca: trustme.CA) -> Iterator[PostfixMx]:
    """Postfix with a certificate for mx.dane.test from an intermediate CA, so it sends
    [leaf, intermediate] and a DANE-TA record can name the intermediate."""
    if not available():
        pytest.skip("needs Debian's postfix binaries and root")
    with postfix_instance(ca.create_child_ca(), names=(MX,)) as mx:
        yield mx


def mail_commands(mx: PostfixMx) -> int:
    """MAIL commands Postfix's smtpd accepted: each opens a queue file and logs
    ``QUEUEID: client=...`` (a pooled session has not logged its disconnect yet)."""
    return len(re.findall(r"smtpd\[\d+\]: \w+: client=", mx.log_text()))


def no_mail_command(mx: PostfixMx) -> None:
    """Postfix got nothing, and no session of it saw MAIL."""
    time.sleep(SETTLE)
    assert mx.messages() == []
    assert mail_commands(mx) == 0


def start_relay(relay: RelayFactory, lab: DnssecLab, mx: PostfixMx, **kw: Any) -> RelayProcess:
    proc = relay(extra_config=dane_config(lab, mx.port, **kw))
    assert "dane_enabled" in proc.wait_log("dane_enabled")
    return proc


def check_config(proc: RelayProcess) -> subprocess.CompletedProcess[str]:
    return proc.command("check-config")


def send(proc: RelayProcess, rcpt: str) -> None:
    submit_smtputf8(proc, "app@corp.test", rcpt, f"dane to {rcpt}")


# ---- DANE-EE ---------------------------------------------------------------------------------


def test_dane_ee_match_delivers_and_mismatch_defers(
    relay: RelayFactory, dnssec_lab: DnssecLabFactory, peer: PostfixMx
) -> None:
    wrong = "3 1 1 " + "ab" * 32
    lab = dnssec_lab(
        secure=[
            *mx_records("dane.test", MX, peer.port, ee_tlsa(peer)),
            *mx_records("wrong.test", "mx.wrong.test", peer.port, wrong),
        ]
    )
    proc = start_relay(relay, lab, peer)
    send(proc, "a@dane.test")
    got = peer.wait_messages(1, timeout=30)
    assert [m.recipient for m in got] == ["a@dane.test"]
    (line,) = delivery_lines(proc, rcpt="a@dane.test", outcome="delivered")
    assert "policy=dane" in line and "level_required=dane" in line and "level_met=dane" in line

    send(proc, "b@wrong.test")
    r = wait_for(lambda: _deferred_rcpt(proc, "b@wrong.test"), "b@wrong.test to be deferred")
    assert "matches none of the 1 usable TLSA record(s)" in str(r["last_reason"])
    (line,) = delivery_lines(proc, rcpt="b@wrong.test")
    assert "result_type=tlsa-invalid" in line and "policy=dane" in line
    time.sleep(SETTLE)
    assert [m.recipient for m in peer.messages()] == ["a@dane.test"]
    assert mail_commands(peer) == 1  # a@ only


def _deferred_rcpt(proc: RelayProcess, rcpt: str) -> dict[str, Any] | None:
    from tests.e2e.test_queue_e2e import queue_json

    for item in queue_json(proc):
        for r in item["recipients"]:
            if r["address"] == rcpt and r["state"] == "deferred":
                return dict(r)
    return None


# ---- DANE-TA ---------------------------------------------------------------------------------


def delivered_line(
    relay: RelayFactory, dnssec_lab: DnssecLabFactory, peer: PostfixMx, tlsa: str
) -> str:
    """Deliver one message to dane.test (MX mx.dane.test with *tlsa*); its log line."""
    lab = dnssec_lab(secure=mx_records("dane.test", MX, peer.port, tlsa))
    proc = start_relay(relay, lab, peer)
    send(proc, "a@dane.test")
    assert [m.recipient for m in peer.wait_messages(1, timeout=30)] == ["a@dane.test"]
    (line,) = delivery_lines(proc, rcpt="a@dane.test", outcome="delivered")
    return line


def test_dane_ta_with_the_mx_name_delivers(
    relay: RelayFactory, dnssec_lab: DnssecLabFactory, peer: PostfixMx
) -> None:
    line = delivered_line(relay, dnssec_lab, peer, ta_tlsa(peer))
    assert "policy=dane" in line and "level_met=dane" in line


def test_dane_ta_with_a_wrong_name_defers(
    relay: RelayFactory, dnssec_lab: DnssecLabFactory, peer: PostfixMx
) -> None:
    """The TA matches, but the certificate (mx.dane.test) does not name this MX host
    nor its domain: RFC 7672 3.2.2 - defer, or any host of that CA could pose as it."""
    other = "mx.other.test"
    lab = dnssec_lab(secure=mx_records("other.test", other, peer.port, ta_tlsa(peer)))
    proc = start_relay(relay, lab, peer)
    send(proc, "a@other.test")
    r = wait_for(lambda: deferred(proc), "the recipient to be deferred")
    assert "DANE-TA: the certificate is not valid for mx.other.test or other.test" in str(
        r["last_reason"]
    )
    (line,) = delivery_lines(proc, rcpt="a@other.test")
    assert "result_type=certificate-host-mismatch" in line
    no_mail_command(peer)


# ---- what does not authenticate ------------------------------------------------------------


def test_unusable_only_tlsa_means_tls_without_authentication(
    relay: RelayFactory, dnssec_lab: DnssecLabFactory, peer: PostfixMx
) -> None:
    pkix_ee = "1 1 1 " + spki_sha256(served_chain(peer)[0])
    line = delivered_line(relay, dnssec_lab, peer, pkix_ee)
    assert "policy=static" in line and "level_required=encrypt" in line


def test_insecure_delegation_ignores_its_tlsa(
    relay: RelayFactory, dnssec_lab: DnssecLabFactory, peer: PostfixMx
) -> None:
    """An unsigned zone's TLSA record could be forged: not DANE (RFC 7672 2.2.2)."""
    host = "mx.insecure.test"
    lab = dnssec_lab(
        secure=[f"plain.test. 60 IN MX 10 {host}."],
        insecure=[
            f"{host}. 60 IN A 127.0.0.1",
            f"_{peer.port}._tcp.{host}. 60 IN TLSA 3 1 1 {'ab' * 32}",
        ],
    )
    proc = start_relay(relay, lab, peer)
    send(proc, "a@plain.test")
    assert [m.recipient for m in peer.wait_messages(1, timeout=30)] == ["a@plain.test"]
    (line,) = delivery_lines(proc, rcpt="a@plain.test", outcome="delivered")
    assert "policy=static" in line


def test_bogus_answers_defer_and_never_contact_the_mx(
    relay: RelayFactory, dnssec_lab: DnssecLabFactory, peer: PostfixMx
) -> None:
    """Expired RRSIGs: the validator answers SERVFAIL.  A bogus TLSA RRset for a secure
    host defers that host (dnssec-invalid); a bogus MX host has no address at all."""
    lab = dnssec_lab(
        secure=[
            f"tlsa.test. 60 IN MX 10 {MX}.",
            f"{MX}. 60 IN A 127.0.0.1",
            f"_{peer.port}._tcp.{MX}. 60 IN CNAME _{peer.port}._tcp.mx.bogus.test.",
            "addr.test. 60 IN MX 10 mx.bogus.test.",
        ],
        bogus=[
            "mx.bogus.test. 60 IN A 127.0.0.1",
            f"_{peer.port}._tcp.mx.bogus.test. 60 IN TLSA {ee_tlsa(peer)}",
        ],
    )
    proc = start_relay(relay, lab, peer)
    send(proc, "a@tlsa.test")
    send(proc, "b@addr.test")
    a = wait_for(lambda: _deferred_rcpt(proc, "a@tlsa.test"), "a@tlsa.test to be deferred")
    assert "TLSA lookup failed" in str(a["last_reason"])
    b = wait_for(lambda: _deferred_rcpt(proc, "b@addr.test"), "b@addr.test to be deferred")
    assert "address lookup failed" in str(b["last_reason"])
    assert "result_type=dnssec-invalid" in delivery_lines(proc, rcpt="a@tlsa.test")[0]
    no_mail_command(peer)
    assert peer.tls_sessions() == 0  # not even connected


def test_dane_only_without_tlsa_defers_without_connecting(
    relay: RelayFactory, dnssec_lab: DnssecLabFactory, peer: PostfixMx
) -> None:
    lab = dnssec_lab(secure=mx_records("bank.test", MX, peer.port, None))
    policy = {
        "default": {"level": "encrypt"},
        "mta_sts": False,
        "dane": True,
        "domains": {"bank.test": {"level": "dane-only"}},
    }
    proc = start_relay(relay, lab, peer, policy=policy)
    send(proc, "a@bank.test")
    r = wait_for(lambda: deferred(proc), "the recipient to be deferred")
    assert "level dane-only required" in str(r["last_reason"])
    (line,) = delivery_lines(proc, rcpt="a@bank.test")
    assert "result_type=dane-required" in line
    no_mail_command(peer)
    assert peer.tls_sessions() == 0


# ---- the resolver must validate --------------------------------------------------------------


def test_a_resolver_that_does_not_validate_keeps_dane_off(
    relay: RelayFactory, dnssec_lab: DnssecLabFactory, peer: PostfixMx
) -> None:
    """Postfix's dnssec_probe: '. NS' without AD - the relay says so, and DANE stays
    off (the TLSA record is not even asked for); mail goes under the floor."""
    records: Sequence[str] = mx_records("dane.test", MX, peer.port, "3 1 1 " + "ab" * 32)
    lab = dnssec_lab(secure=records, validating=False)
    proc = relay(extra_config=dane_config(lab, peer.port))
    log = proc.wait_log("dane_disabled")
    assert "dane_disabled" in log and "came back without the AD bit" in log
    send(proc, "a@dane.test")
    assert [m.recipient for m in peer.wait_messages(1, timeout=30)] == ["a@dane.test"]
    (line,) = delivery_lines(proc, rcpt="a@dane.test", outcome="delivered")
    assert "policy=static" in line


def test_check_config_reports_the_dnssec_probe(
    relay: RelayFactory, dnssec_lab: DnssecLabFactory
) -> None:
    good = dnssec_lab()
    out = check_config(relay(extra_config=dane_config(good, 25), start=False))
    assert out.returncode == 0 and "dane: on (the resolver validates" in out.stdout
    bad = dnssec_lab(validating=False)
    out = check_config(relay(extra_config=dane_config(bad, 25), start=False))
    assert out.returncode == 0
    assert "warning: dane: true, but DANE stays off until the resolver validates" in out.stdout
    assert "came back without the AD bit" in out.stdout
    remote = dane_config(good, 25)
    # Refused before any query (a resolver off loopback is never asked for DNSSEC).
    remote["delivery"]["resolver"]["nameservers"] = ["192.0.2.53"]
    out = check_config(relay(extra_config=remote, start=False))
    assert out.returncode == 0 and "is not on loopback" in out.stdout
