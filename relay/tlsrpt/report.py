"""RFC 8460 reports, built from counts (pure): the JSON, its gzip file, the mail.

Role: :func:`policy_object` describes the policy a session was judged under (``tlsa``
with the records, ``sts`` with the policy text and ``mx`` patterns, or
``no-policy-found``); :func:`parse_tlsrpt` reads a domain's ``_smtp._tls`` TXT RRset
into its ``rua`` URIs; :func:`build` makes the report object (RFC 8460 4.3-4.4),
:func:`gzipped` and :func:`filename` its file, :func:`mail` the message that carries
it (RFC 8460 5.3: ``multipart/report; report-type="tlsrpt"``, ``TLS-Report-Domain``,
``TLS-Report-Submitter``, and ``TLS-Required: No`` so a broken TLS path does not keep
the report about it from being delivered).
Not: counting (relay.tlsrpt.counts), DNS, sending (relay.tlsrpt.sender).
"""

from __future__ import annotations

import datetime as dt
import email.utils
import gzip
import json
from collections.abc import Iterable, Sequence
from email.message import EmailMessage
from email.policy import SMTP
from typing import Any

from relay.tlspolicy.dane import TlsaSet
from relay.tlspolicy.mtasts import StsPolicy
from relay.tlspolicy.verdict import PolicySource, Requirement, Verdict
from relay.tlsrpt.counts import PolicyCounts, TlsCounts

MEDIA_TYPE = "application/tlsrpt+gzip"


def policy_object(
    domain: str, tlsa: TlsaSet | None = None, sts: StsPolicy | None = None
) -> dict[str, Any]:
    """The RFC 8460 4.3 ``policy`` of a session: DANE when *tlsa* applied, else MTA-STS."""
    if tlsa is not None:
        return {
            "policy-type": "tlsa",
            "policy-string": [str(r) for r in tlsa.records],
            "policy-domain": domain,
        }
    if sts is not None:
        return {
            "policy-type": "sts",
            "policy-string": [line for line in sts.text.splitlines() if line.strip()],
            "policy-domain": domain,
            "mx-host": list(sts.mx),
        }
    return {"policy-type": "no-policy-found", "policy-domain": domain}


def parse_tlsrpt(records: Iterable[str]) -> list[str] | None:
    """RFC 8460 3: the ``rua`` URIs of the one ``v=TLSRPTv1`` record; None when there is
    no such record or more than one (then no report is sent)."""
    found = [r for r in records if r.replace(" ", "").startswith("v=TLSRPTv1;")]
    if len(found) != 1:
        return None
    for part in found[0].split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.strip() == "rua":
            uris = [u.strip() for u in value.split(",") if u.strip()]
            return [u for u in uris if u.startswith(("mailto:", "https:"))]
    return None


def day_range(day: str) -> tuple[dt.datetime, dt.datetime]:
    start = dt.datetime.fromisoformat(day).replace(tzinfo=dt.UTC)
    return start, start + dt.timedelta(days=1)


def _iso(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def build(
    organization: str, contact: str, day: str, report_id: str, counts: Sequence[PolicyCounts]
) -> dict[str, Any]:
    """The report of one policy domain for one UTC day (RFC 8460 4.3)."""
    start, end = day_range(day)
    policies = []
    for c in counts:
        details = [
            {
                k: v
                for k, v in (
                    ("result-type", key[0]),
                    ("sending-mta-ip", key[1]),
                    ("receiving-mx-hostname", key[2]),
                    ("receiving-ip", key[3]),
                    ("failed-session-count", n),
                )
                if v is not None
            }
            for key, n in sorted(c.failures.items(), key=lambda kv: tuple(str(x) for x in kv[0]))
        ]
        policies.append(
            {
                "policy": c.policy,
                "summary": {
                    "total-successful-session-count": c.success,
                    "total-failure-session-count": sum(c.failures.values()),
                },
                "failure-details": details,
            }
        )
    return {
        "organization-name": organization,
        "date-range": {
            "start-datetime": _iso(start),
            "end-datetime": _iso(end - dt.timedelta(seconds=1)),
        },
        "contact-info": contact,
        "report-id": report_id,
        "policies": policies,
    }


def gzipped(report: dict[str, Any]) -> bytes:
    body = json.dumps(report, indent=1).encode()
    return gzip.compress(body, mtime=0)


def filename(submitter: str, domain: str, day: str, report_id: str) -> str:
    """RFC 8460 5.1: ``submitter!policy-domain!begin!end!unique-id.json.gz``."""
    start, end = day_range(day)
    stamps = f"{int(start.timestamp())}!{int(end.timestamp())}"
    return f"{submitter}!{domain}!{stamps}!{report_id}.json.gz"


def mail(
    sender: str,
    to: str,
    submitter: str,
    domain: str,
    day: str,
    unique: str,
    body: bytes,
    now: float,
) -> bytes:
    """The message that carries one report (RFC 8460 5.3); *unique*: letters and digits,
    the report file's unique-id (RFC 8460 5.1)."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = f"Report Domain: {domain} Submitter: {submitter} Report-ID: <{unique}>"
    msg["Date"] = email.utils.formatdate(now)
    msg["Message-ID"] = f"<{unique}.{day}@{submitter}>"
    msg["TLS-Report-Domain"] = domain
    msg["TLS-Report-Submitter"] = submitter
    msg["TLS-Required"] = "No"  # RFC 8460 5.3 / RFC 8689: the report must get through
    msg.set_content(
        f"An aggregate TLS report (RFC 8460) from {submitter} for {domain}, UTC day {day}.\n"
    )
    msg.add_attachment(
        body,
        maintype="application",
        subtype="tlsrpt+gzip",
        filename=filename(submitter, domain, day, unique),
    )
    msg.set_type("multipart/report")  # keeps the boundary
    msg.set_param("report-type", "tlsrpt")
    return msg.as_bytes(policy=SMTP)


def count_session(
    counts: TlsCounts,
    domain: str,
    where: tuple[str | None, str, str],
    req: Requirement,
    verdict: Verdict,
    sts: StsPolicy | None,
) -> None:
    """Count one session judged *verdict* under *req*: a success, or a failure with its
    RFC 8460 result type, under the policy that applied (DANE's TLSA, or MTA-STS).
    *where*: (sending IP or None, MX host, MX IP)."""
    sending_ip, mx_host, mx_ip = where
    dane = req.policy_source is PolicySource.DANE
    policy = policy_object(domain, req.tlsa if dane else None, None if dane else sts)
    if verdict.ok:
        counts.success(policy)
    else:
        kind = verdict.result_type or "validation-failure"
        counts.failure(policy, kind, sending_ip, mx_host, mx_ip)
