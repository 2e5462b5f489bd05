"""`tls-relay policy DOMAIN`: relay.policyreport against the loopback DNS fixture, in
process and through the real command line."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relay import config
from relay.tlspolicy.explain import report, report_json
from tests.fixtures.dns import DnsServer
from tests.fixtures.dnssec import DnssecLab, DnssecLabFactory

TLS_RELAY = Path(sys.executable).parent / "tls-relay"

POLICY = """\
policy:
  default: {{level: encrypt, min_version: TLSv1.2}}
  mta_sts: {mta_sts}
  dane: {dane}
  domains:
    example.test: {{level: secure, match: [".example.test", "mail.partner.test"]}}
    partner.test: {{level: verify, min_version: TLSv1.3}}
    named-hop.test: {{level: verify}}
"""


def write_config(
    tmp_path: Path,
    cert: tuple[Path, Path],
    dns: DnsServer | DnssecLab,
    mta_sts: bool = True,
    dane: bool = True,
) -> Path:
    path = tmp_path / "relay.yaml"
    path.write_text(
        f"""\
hostname: relay.test
listeners:
  - {{address: "127.0.0.1:2525", tls: starttls}}
tls: {{cert: "{cert[0]}", key: "{cert[1]}"}}
spool: {{path: "{tmp_path / "spool"}"}}
delivery:
  port: 2526
  resolver: {{nameservers: ["{dns.host}"], port: {dns.port}, timeout: 2s}}
  routes:
    - {{domains: [partner.test, .partner.test], via: "[127.0.0.1]:2527"}}
    - {{domains: [named-hop.test], via: "hop.named-hop.test:2528", tls: implicit,
        auth: {{username: relayuser, password: s3cret}}}}
"""
        + POLICY.format(mta_sts=str(mta_sts).lower(), dane=str(dane).lower()),
        encoding="utf-8",
    )
    return path


def zone(dns: DnsServer) -> None:
    dns.add("example.test", "MX", "20 mx2.example.test", "10 mx1.example.test")
    dns.add("mx1.example.test", "A", "127.0.0.11")
    dns.add("mx1.example.test", "AAAA", "::1")
    dns.add("mx2.example.test", "A", "127.0.0.12")
    dns.add("implicit.test", "A", "127.0.0.13")
    dns.add("nomail.test", "MX", "0 .")
    dns.add("hop.named-hop.test", "A", "127.0.0.14")


@pytest.fixture
def cfg(tmp_path: Path, server_cert: tuple[Path, Path], dns_server: DnsServer) -> config.Config:
    zone(dns_server)
    return config.load(write_config(tmp_path, server_cert, dns_server))


def test_mx_hosts_level_and_source(cfg: config.Config) -> None:
    text = report(cfg, "Example.TEST.")
    lines = text.splitlines()
    assert lines[0] == "domain: example.test"
    assert "route: none (MX lookup)" in lines
    assert "MX hosts, delivery port 2526:" in lines
    mx1 = next(i for i, line in enumerate(lines) if "mx1.example.test" in line)
    mx2 = next(i for i, line in enumerate(lines) if "mx2.example.test" in line)
    assert mx1 < mx2  # preference order
    assert "10 mx1.example.test  127.0.0.11, ::1" in lines[mx1]
    assert "20 mx2.example.test  127.0.0.12" in lines[mx2]
    assert "TLS level: secure (from static policy domains['example.test'])" in lines
    assert "minimum TLS version: TLSv1.2" in lines
    # `secure` as delivery checks it: a match name, not the MX host name (issue 15).
    assert "  and a name must match the MX host name (also sent as SNI)" not in lines
    assert "  (the MX host name alone does not do; it is sent as SNI)" in lines
    assert any("example.test, .example.test, mail.partner.test" in line for line in lines)
    assert "MTA-STS: no policy (no _mta-sts TXT record, or mode none)" in text
    # The DNS fixture does not validate: the probe says so and DANE stays off.
    assert "DANE: off: the resolver (127.0.0.1) does not validate DNSSEC" in text
    assert "  mx1.example.test: level secure (source static: static policy" in text


def test_default_policy_and_implicit_mx(cfg: config.Config) -> None:
    text = report(cfg, "implicit.test")
    assert "implicit MX" in text
    assert "0 implicit.test  127.0.0.13" in text
    assert "TLS level: encrypt (from static policy default)" in text
    assert "match one of" not in text


def test_route_skips_mx_lookup(cfg: config.Config, dns_server: DnsServer) -> None:
    text = report(cfg, "sub.partner.test")
    assert "route: partner.test, .partner.test via [127.0.0.1]:2527 (STARTTLS required)" in text
    assert "next hop 127.0.0.1: 127.0.0.1" in text
    assert "TLS level: encrypt (from static policy default)" in text
    assert not dns_server.queried("sub.partner.test", "MX")
    text = report(cfg, "partner.test")
    assert "TLS level: verify (from static policy domains['partner.test'])" in text
    assert "minimum TLS version: TLSv1.3" in text
    assert "a name must match the next hop 127.0.0.1" in text
    assert dns_server.queries == []


def test_route_with_named_hop_and_auth(cfg: config.Config, dns_server: DnsServer) -> None:
    text = report(cfg, "named-hop.test")
    assert "via [hop.named-hop.test]:2528 (implicit TLS, AUTH as relayuser)" in text
    assert "next hop hop.named-hop.test: 127.0.0.14" in text
    assert "s3cret" not in text
    assert not dns_server.queried("named-hop.test", "MX")


def test_null_mx_and_nxdomain_are_permanent(cfg: config.Config) -> None:
    text = report(cfg, "nomail.test")
    assert "MX: permanent failure: domain does not accept mail (null MX, RFC 7505)" in text
    assert "TLS level: encrypt" in text  # the policy is still shown
    assert "NXDOMAIN" in report(cfg, "missing.test")


def test_servfail_is_transient(cfg: config.Config, dns_server: DnsServer) -> None:
    dns_server.set_rcode("broken.test", "SERVFAIL")
    text = report(cfg, "broken.test")
    assert "MX: transient failure" in text
    assert "defer" in text


def test_mta_sts_and_dane_disabled(
    tmp_path: Path, server_cert: tuple[Path, Path], dns_server: DnsServer
) -> None:
    zone(dns_server)
    cfg = config.load(write_config(tmp_path, server_cert, dns_server, mta_sts=False, dane=False))
    text = report(cfg, "example.test")
    assert "MTA-STS: disabled in config" in text
    assert "DANE: disabled in config" in text


def test_cli_policy_command(
    tmp_path: Path, server_cert: tuple[Path, Path], dns_server: DnsServer
) -> None:
    zone(dns_server)
    path = write_config(tmp_path, server_cert, dns_server)
    proc = subprocess.run(
        [str(TLS_RELAY), "policy", "example.test", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("domain: example.test\n")
    assert "10 mx1.example.test  127.0.0.11, ::1" in out
    assert "TLS level: secure (from static policy domains['example.test'])" in out
    assert "MTA-STS: no policy" in out
    assert dns_server.queried("example.test", "MX")


def test_cli_policy_json_with_a_cached_mta_sts_policy(
    tmp_path: Path, server_cert: tuple[Path, Path], dns_server: DnsServer
) -> None:
    """--json: every input and per MX host the requirement and its source; the MTA-STS
    policy comes from the durable cache (as serve left it), so nothing is fetched."""
    zone(dns_server)
    path = write_config(tmp_path, server_cert, dns_server)
    cache = tmp_path / "spool" / "mta-sts"
    cache.mkdir(parents=True)
    now = time.time()
    (cache / "example.test.json").write_text(
        json.dumps(
            {
                "version": 1,
                "domain": "example.test",
                "id": "7",
                "fetched": now,
                "expires": now + 86400,
                "policy": "version: STSv1\nmode: enforce\nmx: mx2.example.test\nmax_age: 86400\n",
            }
        )
    )
    proc = subprocess.run(
        [str(TLS_RELAY), "policy", "Example.TEST", "--json", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["domain"] == "example.test" and doc["route"] is None
    assert doc["mta_sts"]["origin"] == "cache" and doc["mta_sts"]["id"] == "7"
    assert doc["mta_sts"]["policy"] == {
        "mode": "enforce",
        "max_age": 86400,
        "mx": ["mx2.example.test"],
    }
    hosts = {h["name"]: h for h in doc["hosts"]}
    assert hosts["mx1.example.test"]["skipped"] is True
    assert not hosts["mx1.example.test"]["mta_sts_allowed"]
    mx2 = hosts["mx2.example.test"]
    assert (mx2["skipped"], mx2["level"], mx2["source"]) == (False, "secure", "mta-sts")
    assert doc["dane"]["enabled"] is True and doc["dane"]["active"] is False
    assert "does not validate DNSSEC" in doc["dane"]["not_active_because"]
    assert mx2["tlsa"] is None and mx2["dnssec_secure"] is False


def test_dane_inputs_per_mx_host_from_a_validating_resolver(
    tmp_path: Path, server_cert: tuple[Path, Path], dnssec_lab: DnssecLabFactory
) -> None:
    """Against nsd + unbound (real DNSSEC): the probe, the MX RRset's status, each
    host's TLSA records (usable or not) and the requirement DANE makes of it."""
    ee = "3 1 1 " + "ab" * 32
    lab = dnssec_lab(
        secure=[
            "dane.test. 60 IN MX 10 mx1.dane.test.",
            "dane.test. 60 IN MX 20 mx2.dane.test.",
            "dane.test. 60 IN MX 30 mx.insecure.test.",
            "mx1.dane.test. 60 IN A 127.0.0.21",
            f"_2526._tcp.mx1.dane.test. 60 IN TLSA {ee}",
            "_2526._tcp.mx1.dane.test. 60 IN TLSA 1 1 1 " + "cd" * 32,
            "mx2.dane.test. 60 IN A 127.0.0.22",
        ],
        insecure=["mx.insecure.test. 60 IN A 127.0.0.23"],
    )
    cfg = config.load(write_config(tmp_path, server_cert, lab, mta_sts=False))
    text = report(cfg, "dane.test")
    assert "10 mx1.dane.test  127.0.0.21  (addresses DNSSEC-secure)" in text
    assert "DANE: on (the resolver validates DNSSEC); MX RRset secure" in text
    assert "  _2526._tcp.mx1.dane.test: secure, 2 record(s), 1 usable" in text
    assert f"    {ee}  (usable)" in text
    assert "  _2526._tcp.mx2.dane.test: no TLSA records (validated)" in text
    assert "  mx.insecure.test: addresses not DNSSEC-secure: no TLSA lookup" in text
    assert "  mx1.dane.test: level dane (source dane: DANE TLSA at _2526._tcp.mx1" in text
    assert "  mx2.dane.test: level encrypt (source static" in text
    doc = report_json(cfg, "dane.test")
    assert doc["dane"]["active"] is True and doc["mx"]["dnssec_secure"] is True
    mx1 = next(h for h in doc["hosts"] if h["name"] == "mx1.dane.test")
    assert mx1["tlsa"]["usable"] == [ee] and mx1["source"] == "dane"
