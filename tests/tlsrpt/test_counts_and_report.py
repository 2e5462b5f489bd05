"""relay.tlsrpt: counts that survive a restart and merge across workers, and the RFC
8460 report built from them, checked field by field against the RFC's schema."""

from __future__ import annotations

import datetime as dt
import email
import gzip
import json
from pathlib import Path
from typing import Any

from relay.tlspolicy.dane import Tlsa, TlsaSet, TlsaStatus
from relay.tlspolicy.mtasts import parse_policy
from relay.tlsrpt import counts, report
from relay.tlsrpt.counts import TlsCounts

DAY1 = dt.datetime(2026, 12, 1, 12, tzinfo=dt.UTC).timestamp()
STS = parse_policy(b"version: STSv1\nmode: enforce\nmx: *.x.test\nmax_age: 86400\n")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_counts_per_day_and_policy_survive_a_restart_and_merge(tmp_path: Path) -> None:
    clock = Clock(DAY1)
    sts = report.policy_object("x.test", sts=STS)
    none = report.policy_object("y.test")
    w0 = TlsCounts(tmp_path, "0", clock)
    w0.setup()
    w0.success(sts)
    w0.success(sts)
    w0.failure(sts, "certificate-expired", None, "mx1.x.test", "192.0.2.1")
    w0.flush()
    again = TlsCounts(tmp_path, "0", clock)  # a restart: its own file is read back
    again.setup()
    again.failure(sts, "certificate-expired", None, "mx1.x.test", "192.0.2.1")
    again.flush()
    w1 = TlsCounts(tmp_path, "1", clock)  # another worker, its own file
    w1.setup()
    w1.success(sts)
    w1.success(none)
    w1.flush()
    clock.now += 86400  # the next day goes to its own file
    w1.success(none)
    w1.flush()
    assert counts.days(tmp_path) == ["2026-12-01", "2026-12-02"]
    merged = counts.load_day(tmp_path, "2026-12-01")
    (x,) = merged["x.test"]
    assert x.success == 3
    assert x.failures == {("certificate-expired", None, "mx1.x.test", "192.0.2.1"): 2}
    assert merged["y.test"][0].success == 1


def check_schema(doc: dict[str, Any]) -> None:
    """RFC 8460 4.3/4.4: the fields a receiver parses, with their JSON types."""
    assert isinstance(doc["organization-name"], str) and isinstance(doc["contact-info"], str)
    assert isinstance(doc["report-id"], str)
    rng = doc["date-range"]
    for key in ("start-datetime", "end-datetime"):
        dt.datetime.strptime(rng[key], "%Y-%m-%dT%H:%M:%SZ")
    for item in doc["policies"]:
        policy = item["policy"]
        assert policy["policy-type"] in ("tlsa", "sts", "no-policy-found")
        assert isinstance(policy["policy-domain"], str)
        for key in ("policy-string", "mx-host"):
            if key in policy:
                assert all(isinstance(s, str) for s in policy[key])
        summary = item["summary"]
        assert isinstance(summary["total-successful-session-count"], int)
        assert isinstance(summary["total-failure-session-count"], int)
        for detail in item.get("failure-details", []):
            assert isinstance(detail["result-type"], str)
            assert isinstance(detail["failed-session-count"], int)
            for key in ("sending-mta-ip", "receiving-mx-hostname", "receiving-ip"):
                assert key not in detail or isinstance(detail[key], str)


def test_report_follows_rfc_8460(tmp_path: Path) -> None:
    tlsa = TlsaSet("_25._tcp.mx.z.test", TlsaStatus.SECURE, (Tlsa(3, 1, 1, b"\xab" * 32),))
    c = TlsCounts(tmp_path, "0", Clock(DAY1))
    c.setup()
    c.success(report.policy_object("x.test", sts=STS))
    c.failure(report.policy_object("x.test", tlsa), "tlsa-invalid", None, "mx.z.test", "::1")
    c.flush()
    policies = counts.load_day(tmp_path, "2026-12-01")["x.test"]
    doc = report.build("Corp", "mailto:tls@corp.test", "2026-12-01", "id-1", policies)
    check_schema(doc)
    assert doc["date-range"] == {
        "start-datetime": "2026-12-01T00:00:00Z",
        "end-datetime": "2026-12-01T23:59:59Z",
    }
    by_type = {p["policy"]["policy-type"]: p for p in doc["policies"]}
    assert by_type["sts"]["policy"]["mx-host"] == ["*.x.test"]
    assert "mode: enforce" in by_type["sts"]["policy"]["policy-string"]
    assert by_type["tlsa"]["policy"]["policy-string"] == ["3 1 1 " + "ab" * 32]
    assert by_type["tlsa"]["failure-details"] == [
        {
            "result-type": "tlsa-invalid",
            "receiving-mx-hostname": "mx.z.test",
            "receiving-ip": "::1",
            "failed-session-count": 1,
        }
    ]
    assert json.loads(gzip.decompress(report.gzipped(doc))) == doc


def test_tlsrpt_records() -> None:
    good = "v=TLSRPTv1; rua=mailto:tls@x.test,https://r.x.test/v1"
    assert report.parse_tlsrpt([good, "v=spf1 -all"]) == [
        "mailto:tls@x.test",
        "https://r.x.test/v1",
    ]
    assert report.parse_tlsrpt([good, good]) is None  # RFC 8460 3: exactly one
    assert report.parse_tlsrpt(["v=spf1 -all"]) is None
    assert report.parse_tlsrpt(["v=TLSRPTv1; rua=ftp://x"]) == []


def test_the_mail_that_carries_a_report() -> None:
    body = report.gzipped({"report-id": "r1"})
    raw = report.mail(
        "tlsrpt@corp.test",
        "tls@x.test",
        "relay.corp.test",
        "x.test",
        "2026-12-01",
        "r1",
        body,
        DAY1,
    )
    msg = email.message_from_bytes(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "tlsrpt"
    assert (msg["TLS-Report-Domain"], msg["TLS-Report-Submitter"]) == ("x.test", "relay.corp.test")
    assert msg["TLS-Required"] == "No"
    part = next(p for p in msg.walk() if p.get_content_type() == "application/tlsrpt+gzip")
    start = int(dt.datetime(2026, 12, 1, tzinfo=dt.UTC).timestamp())
    assert part.get_filename() == f"relay.corp.test!x.test!{start}!{start + 86400}!r1.json.gz"
    assert part.get_payload(decode=True) == body
