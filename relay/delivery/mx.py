"""MX lookup: where mail for a domain goes, as an :class:`MxResult` value.

Role: resolve a recipient domain's MX hosts (RFC 5321 §5.1) with dnspython's async
resolver, order them, cap them, and resolve each host's A and AAAA addresses; classify
every outcome where it is seen: OK, PERMANENT (NXDOMAIN, null MX) or TRANSIENT
(SERVFAIL, timeout, no usable host yet).  Also the pure route matcher
:func:`route_for` for ``delivery.routes`` (next hops that bypass MX lookup).

Not: TLS, policy, MTA-STS or DANE; connecting to the hosts; retries (the scheduler
decides when to ask again); caching beyond one call.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.resolver

from relay.config import ResolverConfig, Route
from relay.domains import Domain, dns_name


class MxStatus(enum.Enum):
    OK = "ok"
    PERMANENT = "permanent"  # bounce the recipients now (RFC 5321 §5.1, RFC 7505)
    TRANSIENT = "transient"  # try again later (RFC 5321 §4.5.4.1)


@dataclass(frozen=True)
class MxHost:
    name: Domain  # lower-case, no trailing dot (relay.domains.dns_name)
    preference: int
    addresses: tuple[str, ...]  # IPv4 then IPv6 literals


@dataclass(frozen=True)
class MxResult:
    status: MxStatus
    hosts: tuple[MxHost, ...]  # in the order to try; empty unless status is OK
    reason: str  # one sentence; for OK, notes on skipped or capped hosts (may be "")
    implicit: bool = False  # no MX RRset: the domain itself is the MX (RFC 5321 §5.1)


def _ip_literal(name: str) -> str | None:
    """The address if *name* is an IP literal ("192.0.2.1", "[::1]", "[IPv6:::1]")."""
    text = name.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        if text.lower().startswith("ipv6:"):
            text = text[5:]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def route_for(routes: Sequence[Route], domain: Domain) -> Route | None:
    """The route for *domain*: an entry equal to it wins; otherwise the longest
    ".suffix" entry it is a subdomain of (".example.com" matches "a.example.com",
    not "example.com" itself); None if no route applies.  Entries and *domain* are
    in the one normal form (relay.domains)."""
    wanted = domain
    best: Route | None = None
    best_len = -1
    for route in routes:
        for entry in route.domains:
            if entry == wanted:
                return route
            if entry.startswith(".") and wanted.endswith(entry) and len(entry) > best_len:
                best, best_len = route, len(entry)
    return best


class _Lookup(enum.Enum):
    """How one A/AAAA/MX query ended, before classification."""

    ANSWER = "answer"
    NODATA = "nodata"  # name exists, no records of the type
    NXDOMAIN = "nxdomain"
    TRANSIENT = "transient"


@dataclass(frozen=True)
class _HostAddrs:
    addresses: tuple[str, ...]
    outcome: _Lookup  # ANSWER if any address; else the most hopeful failure
    detail: str


class MxResolver:
    """Resolve MX hosts and addresses through one dnspython async resolver.

    ``cfg`` names the nameservers (``delivery.resolver``); None means the system
    resolver (/etc/resolv.conf).  ``rng`` orders equal-preference MX hosts; tests
    pass a seeded ``random.Random``.
    """

    def __init__(
        self,
        cfg: ResolverConfig | None,
        max_hosts: int = 5,
        rng: random.Random | None = None,
    ) -> None:
        if max_hosts < 1:
            raise ValueError(f"max_hosts must be at least 1 (got {max_hosts})")
        self.max_hosts = max_hosts
        self._rng = rng if rng is not None else random.SystemRandom()
        self._setup_error: str | None = None
        if cfg is None:
            try:
                self._resolver = dns.asyncresolver.Resolver()
            except dns.exception.DNSException as exc:
                # No usable /etc/resolv.conf: every lookup is transient until it is fixed.
                self._resolver = dns.asyncresolver.Resolver(configure=False)
                self._setup_error = f"system resolver unusable: {exc}"
        else:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = list(cfg.nameservers)
            self._resolver.port = cfg.port
            self._resolver.lifetime = cfg.timeout
            # Per-try timeout below the lifetime, so a lost UDP datagram is retried.
            self._resolver.timeout = min(2.0, cfg.timeout)
        self._resolver.cache = None  # the scheduler asks again on each attempt; no stale data

    # ---- public ------------------------------------------------------------------------------

    async def resolve(self, domain: Domain) -> MxResult:
        """The MX hosts for *domain*, ordered, capped, each with its addresses."""
        name = domain
        if not name or _ip_literal(name) is not None:
            return MxResult(
                MxStatus.PERMANENT, (), f"{domain!r} is not a domain name that can have MX records"
            )
        try:
            dns.name.from_text(name + ".")
        except dns.exception.DNSException as exc:
            # A malformed name (label over 63 octets, ...) will never resolve: permanent.
            return MxResult(MxStatus.PERMANENT, (), f"{domain!r} is not a valid domain name: {exc}")
        if self._setup_error:
            return MxResult(MxStatus.TRANSIENT, (), self._setup_error)
        answer, outcome, detail = await self._query(name, "MX")
        if outcome is _Lookup.NXDOMAIN:
            # RFC 5321 §5.1: a non-existent domain MUST be reported as an error.
            return MxResult(MxStatus.PERMANENT, (), f"domain {name} does not exist (NXDOMAIN)")
        if outcome is _Lookup.TRANSIENT:
            # RFC 5321 §5.1: a temporary error means queue and retry later.
            return MxResult(MxStatus.TRANSIENT, (), f"MX lookup for {name} failed: {detail}")
        if outcome is _Lookup.NODATA:
            return await self._implicit_mx(name)
        assert answer is not None
        records = [(int(rd.preference), dns_name(rd.exchange.to_text())) for rd in answer]
        return await self._explicit_mx(name, records)

    async def addresses(self, host: str) -> tuple[str, ...]:
        """A then AAAA addresses of *host* (also for routes' next hops); an IP literal is
        returned as is.  Empty when the name has no address or the lookup failed."""
        literal = _ip_literal(host)
        if literal is not None:
            return (literal,)
        if self._setup_error:
            return ()
        return (await self._host_addresses(dns_name(host))).addresses

    async def txt(self, name: str) -> tuple[str, ...] | None:
        """The TXT records of *name*, each record's strings joined (RFC 8461 3.1):
        empty when there are none (NXDOMAIN or no TXT), None when the lookup failed."""
        if self._setup_error:
            return None
        answer, outcome, _ = await self._query(name, "TXT")
        if outcome is _Lookup.TRANSIENT:
            return None
        if answer is None:
            return ()
        return tuple(
            b"".join(rd.strings).decode("utf-8", "replace")
            for rd in answer
            if isinstance(rd, dns.rdtypes.ANY.TXT.TXT)
        )

    # ---- MX sets -----------------------------------------------------------------------------

    async def _implicit_mx(self, name: Domain) -> MxResult:
        # RFC 5321 §5.1: an empty MX list means an implicit MX of preference 0: the domain.
        found = await self._host_addresses(name)
        if found.addresses:
            host = MxHost(name, 0, found.addresses)
            return MxResult(
                MxStatus.OK, (host,), f"no MX records: implicit MX {name} (RFC 5321 §5.1)", True
            )
        if found.outcome is _Lookup.TRANSIENT:
            return MxResult(
                MxStatus.TRANSIENT,
                (),
                f"no MX records for {name} and its address lookup failed: {found.detail}",
                True,
            )
        # RFC 5321 §5.1: the implicit MX is unusable: report an error.
        return MxResult(
            MxStatus.PERMANENT,
            (),
            f"domain {name} has neither MX nor A/AAAA records; it does not accept mail",
            True,
        )

    async def _explicit_mx(self, domain: Domain, records: list[tuple[int, Domain]]) -> MxResult:
        notes: list[str] = []
        if all(exchange == "" for _, exchange in records):
            # RFC 7505 §3: a single "0 ." MX says the domain accepts no mail at all.
            return MxResult(
                MxStatus.PERMANENT, (), "domain does not accept mail (null MX, RFC 7505)"
            )
        if any(exchange == "" for _, exchange in records):
            # RFC 7505 §3: a null MX MUST NOT be mixed with others; the "." entry is unusable.
            notes.append("ignored a null MX ('.') mixed with other MX records (RFC 7505 §3)")
            records = [r for r in records if r[1] != ""]
        ordered = self._order(records)
        usable: list[tuple[int, Domain]] = []
        for preference, exchange in ordered:
            if _ip_literal(exchange) is not None:
                # RFC 5321 §5.1: the MX data field MUST contain a domain name, not an address.
                notes.append(
                    f"skipped MX {exchange}: an IP address, not a host name (RFC 5321 §5.1)"
                )
                continue
            usable.append((preference, exchange))
        if len(usable) > self.max_hosts:
            notes.append(f"tried the first {self.max_hosts} of {len(usable)} MX hosts")
            usable = usable[: self.max_hosts]
        found = await asyncio.gather(*(self._host_addresses(ex) for _, ex in usable))
        hosts: list[MxHost] = []
        transient = False
        for (preference, exchange), addrs in zip(usable, found, strict=True):
            if addrs.addresses:
                hosts.append(MxHost(exchange, preference, addrs.addresses))
                continue
            transient = transient or addrs.outcome is _Lookup.TRANSIENT
            notes.append(f"skipped MX {exchange}: {addrs.detail}")
        if hosts:
            return MxResult(MxStatus.OK, tuple(hosts), "; ".join(notes))
        # Never fall back to the domain's own A/AAAA when MX records exist (RFC 5321 §5.1).
        # No usable host is deferred, not bounced: a broken MX set is usually fixed within
        # the queue lifetime, after which the scheduler bounces.
        kind = "DNS lookups failed" if transient else "no MX host has an address"
        detail = "; ".join(notes) if notes else "no MX hosts"
        return MxResult(MxStatus.TRANSIENT, (), f"{kind} for {domain}: {detail}")

    def _order(self, records: Iterable[tuple[int, Domain]]) -> list[tuple[int, Domain]]:
        """By preference; equal preferences in random order (RFC 5321 §5.1); each host once,
        at its lowest preference."""
        best: dict[Domain, int] = {}
        for preference, exchange in records:
            if exchange not in best or preference < best[exchange]:
                best[exchange] = preference
        groups: dict[int, list[Domain]] = {}
        for exchange, preference in sorted(best.items()):
            groups.setdefault(preference, []).append(exchange)
        ordered: list[tuple[int, Domain]] = []
        for preference in sorted(groups):
            names = groups[preference]
            self._rng.shuffle(names)
            ordered.extend((preference, n) for n in names)
        return ordered

    # ---- queries -----------------------------------------------------------------------------

    async def _host_addresses(self, host: str) -> _HostAddrs:
        """A and AAAA of *host*, queried concurrently."""
        (a, a_out, a_detail), (aaaa, aaaa_out, aaaa_detail) = await asyncio.gather(
            self._query(host, "A"), self._query(host, "AAAA")
        )
        addrs = tuple(rd.to_text() for rd in a or ()) + tuple(rd.to_text() for rd in aaaa or ())
        if addrs:
            return _HostAddrs(addrs, _Lookup.ANSWER, "")
        if _Lookup.TRANSIENT in (a_out, aaaa_out):
            detail = a_detail if a_out is _Lookup.TRANSIENT else aaaa_detail
            return _HostAddrs((), _Lookup.TRANSIENT, f"address lookup failed: {detail}")
        if _Lookup.NXDOMAIN in (a_out, aaaa_out):
            # Includes a CNAME pointing nowhere: the chain ends in NXDOMAIN (RFC 5321 §5.1).
            return _HostAddrs((), _Lookup.NXDOMAIN, "no such host (NXDOMAIN)")
        return _HostAddrs((), _Lookup.NODATA, "host has no A or AAAA records")

    async def _query(
        self, name: str, rdtype: str
    ) -> tuple[dns.resolver.Answer | None, _Lookup, str]:
        """One query, its outcome classified; never raises for DNS failures."""
        try:
            qname = dns.name.from_text(name + ".")
            answer = await self._resolver.resolve(
                qname, dns.rdatatype.from_text(rdtype), search=False
            )
        except dns.resolver.NXDOMAIN:
            return None, _Lookup.NXDOMAIN, "NXDOMAIN"
        except dns.resolver.NoAnswer:
            return None, _Lookup.NODATA, f"no {rdtype} records"
        except dns.resolver.LifetimeTimeout:
            return None, _Lookup.TRANSIENT, f"{rdtype} query timed out"
        except dns.resolver.NoNameservers as exc:
            # SERVFAIL, REFUSED, or no nameserver left to ask.
            return None, _Lookup.TRANSIENT, f"{rdtype} query: {_servfail_detail(exc)}"
        except (dns.exception.DNSException, OSError) as exc:
            return None, _Lookup.TRANSIENT, f"{rdtype} query failed: {exc}"
        return answer, _Lookup.ANSWER, ""


def _servfail_detail(exc: dns.resolver.NoNameservers) -> str:
    """A short reason from a NoNameservers error: 'SERVFAIL' etc. from the last server."""
    errors = exc.kwargs.get("errors") or []
    for *_, error, response in reversed(errors):
        if response is not None:
            return f"nameserver answered {dns.rcode.to_text(response.rcode())}"
        if error is not None:
            return f"nameserver failed: {error}"
    return "no nameservers available"
