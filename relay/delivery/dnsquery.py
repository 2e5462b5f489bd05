"""DNS queries for delivery, each outcome classified, with DNSSEC status when asked.

Role: one dnspython async resolver built from ``delivery.resolver`` (or the system's
/etc/resolv.conf); :meth:`DnsClient.query` asks one question and returns a
:class:`Reply` - the answer, how the query ended (:class:`Lookup`), a short reason,
and whether the resolver vouched for it with the AD bit (RFC 4035 §3.2.3, RFC 6840
§5.7).  With ``dnssec`` on, every query carries the DO bit and the AD bit, as
Postfix's resolver does for DANE; the AD bit of a reply is believed only because the
caller checked that the resolver is on loopback and validates
(:func:`relay.delivery.mx.MxResolver.probe_dnssec`).

:class:`TtlCache` keeps what callers built from answers for the answers' TTL.
Not: MX ordering or TLSA semantics (relay.delivery.mx), DNSSEC validation itself.
"""

from __future__ import annotations

import enum
import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.resolver

from relay.config import ResolverConfig

EDNS_PAYLOAD = 1232  # the DNS flag day 2020 size: no IP fragmentation


class Lookup(enum.Enum):
    """How one query ended, before the caller classifies it."""

    ANSWER = "answer"
    NODATA = "nodata"  # name exists, no records of the type
    NXDOMAIN = "nxdomain"
    TRANSIENT = "transient"  # SERVFAIL (also: DNSSEC bogus at a validator), timeout, ...


@dataclass(frozen=True)
class Reply:
    answer: dns.resolver.Answer | None  # set when outcome is ANSWER
    outcome: Lookup
    detail: str  # "" for ANSWER
    secure: bool = False  # AD set on the response (only asked for with dnssec on)
    ttl: int = 0  # seconds the answer (or the denial, RFC 2308) may be reused


def _has_ad(response: object) -> bool:
    return isinstance(response, dns.message.Message) and bool(response.flags & dns.flags.AD)


def _negative_ttl(response: object) -> int:
    """RFC 2308 §5: a denial may be reused for min(SOA TTL, SOA MINIMUM); 0 without SOA."""
    if not isinstance(response, dns.message.Message):
        return 0
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return int(min(rrset.ttl, rrset[0].minimum))
    return 0


class DnsClient:
    """Queries through one resolver; see the module docstring."""

    def __init__(self, cfg: ResolverConfig | None, dnssec: bool = False) -> None:
        self.setup_error: str | None = None
        if cfg is None:
            try:
                self._resolver = dns.asyncresolver.Resolver()
            except dns.exception.DNSException as exc:
                # No usable /etc/resolv.conf: every lookup is transient until it is fixed.
                self._resolver = dns.asyncresolver.Resolver(configure=False)
                self.setup_error = f"system resolver unusable: {exc}"
        else:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = list(cfg.nameservers)
            self._resolver.port = cfg.port
            self._resolver.lifetime = cfg.timeout
            # Per-try timeout below the lifetime, so a lost UDP datagram is retried.
            self._resolver.timeout = min(2.0, cfg.timeout)
        self._resolver.cache = None  # callers keep results (TtlCache), not raw answers
        self.dnssec = dnssec
        if dnssec:
            # DO: the resolver keeps DNSSEC data; AD in the query: report validation.
            self._resolver.use_edns(0, dns.flags.DO, EDNS_PAYLOAD)
            self._resolver.flags = dns.flags.RD | dns.flags.AD

    @property
    def nameservers(self) -> tuple[str, ...]:
        return tuple(str(ns) for ns in self._resolver.nameservers)

    @property
    def port(self) -> int:
        return int(self._resolver.port)

    def on_loopback(self) -> bool:
        """Every nameserver is a loopback address: the only place an AD bit can come
        from without crossing a network an attacker could sit on (RFC 4035 §4.9.3)."""
        if not self.nameservers:
            return False
        for ns in self.nameservers:
            try:
                if not ipaddress.ip_address(ns).is_loopback:
                    return False
            except ValueError:
                return False  # a DoH/DoT URL or a name: not a loopback address
        return True

    async def query(self, name: str, rdtype: str) -> Reply:
        """One query, its outcome classified; never raises for DNS failures."""
        if self.setup_error:
            return Reply(None, Lookup.TRANSIENT, self.setup_error)
        try:
            qname = dns.name.from_text(name if name.endswith(".") else name + ".")
            answer = await self._resolver.resolve(
                qname, dns.rdatatype.from_text(rdtype), search=False
            )
        except dns.resolver.NXDOMAIN as exc:
            responses = list((exc.kwargs.get("responses") or {}).values())
            secure = bool(responses) and all(_has_ad(r) for r in responses)
            ttl = min((_negative_ttl(r) for r in responses), default=0)
            return Reply(None, Lookup.NXDOMAIN, "NXDOMAIN", secure, ttl)
        except dns.resolver.NoAnswer as exc:
            response = exc.kwargs.get("response")
            return Reply(
                None,
                Lookup.NODATA,
                f"no {rdtype} records",
                _has_ad(response),
                _negative_ttl(response),
            )
        except dns.resolver.LifetimeTimeout:
            return Reply(None, Lookup.TRANSIENT, f"{rdtype} query timed out")
        except dns.resolver.NoNameservers as exc:
            # SERVFAIL (a validator's answer to bogus data too), REFUSED, or none left.
            return Reply(None, Lookup.TRANSIENT, f"{rdtype} query: {_servfail_detail(exc)}")
        except (dns.exception.DNSException, OSError) as exc:
            return Reply(None, Lookup.TRANSIENT, f"{rdtype} query failed: {exc}")
        ttl = max(0, int(answer.expiration - time.time()))  # the least TTL of the chain
        return Reply(answer, Lookup.ANSWER, "", _has_ad(answer.response), ttl)


class TtlCache:
    """Results built from DNS answers, kept for the least TTL of those answers (at most
    ``MAX_TTL``), so a steady stream of mail to one domain does not ask the resolver
    for its MX, addresses and TLSA records per message; failures are never kept."""

    MAX_TTL = 300.0  # seconds, whatever the records say
    MAX_ENTRIES = 10_000  # then start afresh (a bound, not an eviction policy)

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: dict[tuple[str, str], tuple[float, object]] = {}
        self.generation = 0  # bumped by clear(): results begun before are not kept

    def get(self, key: tuple[str, str]) -> object | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._entries[key]
            return None
        return entry[1]

    def keep(self, key: tuple[str, str], ttl: float, value: object, generation: int) -> None:
        """Keep *value* for *ttl* seconds (capped), unless the cache was cleared since
        *generation* was read (the lookup began under a state that no longer holds)."""
        if ttl <= 0 or generation != self.generation:
            return
        if len(self._entries) >= self.MAX_ENTRIES:
            self._entries.clear()
        self._entries[key] = (self._clock() + min(ttl, self.MAX_TTL), value)

    def clear(self) -> None:
        self._entries.clear()
        self.generation += 1


def _servfail_detail(exc: dns.resolver.NoNameservers) -> str:
    """A short reason from a NoNameservers error: 'SERVFAIL' etc. from the last server."""
    errors = exc.kwargs.get("errors") or []
    for *_, error, response in reversed(errors):
        if response is not None:
            return f"nameserver answered {dns.rcode.to_text(response.rcode())}"
        if error is not None:
            return f"nameserver failed: {error}"
    return "no nameservers available"
