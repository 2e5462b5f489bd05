"""The DNSSEC lab (tests/fixtures/dnssec.py) itself: nsd + validating unbound answer
as DANE tests expect - AD for the signed root's data, no AD below an insecure
delegation, SERVFAIL for expired signatures, and never AD without validation."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype

from tests.fixtures.dnssec import DnssecLab, DnssecLabFactory

TLSA_TEXT = "3 1 1 " + "0123456789abcdef" * 4  # DANE-EE SPKI SHA2-256 (RFC 7671)
RECORDS = {
    "secure": [
        "mx.secure.test. 60 IN A 127.0.0.1",
        "secure.test. 60 IN MX 10 mx.secure.test.",
        f"_25._tcp.mx.secure.test. 60 IN TLSA {TLSA_TEXT}",
    ],
    "insecure": ["mx.insecure.test. 60 IN A 127.0.0.1"],
    "bogus": ["mx.bogus.test. 60 IN A 127.0.0.1"],
}


def ask(lab: DnssecLab, name: str, rdtype: str, port: int | None = None) -> dns.message.Message:
    """One query with the DO bit (RFC 3225) to the lab's resolver (or *port*)."""
    query = dns.message.make_query(name, rdtype, want_dnssec=True)
    return dns.query.udp(query, lab.host, port=port or lab.port, timeout=3.0)


def records(response: dns.message.Message, name: str, rdtype: str) -> list[dns.rdata.Rdata]:
    """The answer section's rdata for (*name*, *rdtype*); KeyError if there are none."""
    owner = dns.name.from_text(name)
    rdt = dns.rdatatype.from_text(rdtype)
    return list(response.find_rrset(response.answer, owner, dns.rdataclass.IN, rdt))


def authenticated(response: dns.message.Message) -> bool:
    return bool(response.flags & dns.flags.AD)


def start(dnssec_lab: DnssecLabFactory, validating: bool = True) -> DnssecLab:
    return dnssec_lab(
        secure=RECORDS["secure"],
        insecure=RECORDS["insecure"],
        bogus=RECORDS["bogus"],
        validating=validating,
    )


def test_secure_answers_and_root_ns_are_authenticated(dnssec_lab: DnssecLabFactory) -> None:
    lab = start(dnssec_lab)
    answer = ask(lab, "mx.secure.test.", "A")
    assert answer.rcode() == dns.rcode.NOERROR
    assert authenticated(answer)
    assert [rd.to_text() for rd in records(answer, "mx.secure.test.", "A")] == ["127.0.0.1"]
    root_ns = ask(lab, ".", "NS")  # the relay's start-up DNSSEC probe
    assert root_ns.rcode() == dns.rcode.NOERROR
    assert authenticated(root_ns)
    missing = ask(lab, "nothing.secure.test.", "A")
    assert missing.rcode() == dns.rcode.NXDOMAIN
    assert authenticated(missing)
    authoritative = ask(lab, ".", "SOA", port=lab.authoritative_port)
    assert authoritative.flags & dns.flags.AA
    assert any(rrset.rdtype == dns.rdatatype.RRSIG for rrset in authoritative.answer)


def test_insecure_delegation_answers_without_ad(dnssec_lab: DnssecLabFactory) -> None:
    answer = ask(start(dnssec_lab), "mx.insecure.test.", "A")
    assert answer.rcode() == dns.rcode.NOERROR
    assert answer.answer
    assert not authenticated(answer)


def test_expired_signatures_are_servfail(dnssec_lab: DnssecLabFactory) -> None:
    answer = ask(start(dnssec_lab), "mx.bogus.test.", "A")
    assert answer.rcode() == dns.rcode.SERVFAIL
    assert not answer.answer


def test_tlsa_round_trips(dnssec_lab: DnssecLabFactory) -> None:
    name = "_25._tcp.mx.secure.test."
    answer = ask(start(dnssec_lab), name, "TLSA")
    assert answer.rcode() == dns.rcode.NOERROR
    assert authenticated(answer)
    want = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TLSA, TLSA_TEXT)
    assert records(answer, name, "TLSA") == [want]


def test_non_validating_resolver_never_sets_ad(dnssec_lab: DnssecLabFactory) -> None:
    lab = start(dnssec_lab, validating=False)
    root_ns = ask(lab, ".", "NS")
    assert root_ns.rcode() == dns.rcode.NOERROR
    assert not authenticated(root_ns)
    bogus = ask(lab, "mx.bogus.test.", "A")  # nothing checks the expired signatures
    assert bogus.rcode() == dns.rcode.NOERROR
    assert not authenticated(bogus)
