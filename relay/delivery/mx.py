"""MX lookup: where mail for a domain goes, as an :class:`MxResult` value.

Role: resolve a recipient domain's MX hosts (RFC 5321 §5.1) through
:class:`relay.delivery.dnsquery.DnsClient`, order them, cap them, and resolve each
host's A and AAAA addresses; classify every outcome where it is seen: OK, PERMANENT
(NXDOMAIN, null MX) or TRANSIENT (SERVFAIL, timeout, no usable host yet).  With DNSSEC
on, say which answers were validated (the MX RRset, each host's addresses), look up a
host's TLSA RRset for DANE (RFC 7672 §2.2) and probe that the resolver validates at
all (:meth:`MxResolver.probe_dnssec`, Postfix's ``dnssec_probe``).  Also the pure
route matcher :func:`route_for` for ``delivery.routes`` (next hops that bypass MX lookup).

Results (MX sets with addresses, TLSA sets) are reused for the least TTL of their
answers, at most 5 minutes (:class:`relay.delivery.dnsquery.TtlCache`); failures never.
Not: TLS or policy verdicts (relay.tlspolicy); connecting to the hosts; retries (the
scheduler decides when to ask again).
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import dns.exception
import dns.name
import dns.rdtypes.ANY.TLSA
import dns.rdtypes.ANY.TXT

from relay.config import ResolverConfig, Route
from relay.delivery.dnsquery import DnsClient, Lookup, Reply, TtlCache
from relay.domains import Domain, dns_name
from relay.tlspolicy.dane import Tlsa, TlsaSet, TlsaStatus


class DnssecState(enum.Enum):
    """What the DNSSEC probes found out about the resolver (Postfix's dnssec_probe)."""

    OFF = "off"  # not asked for (policy dane: false)
    UNKNOWN = "unknown"  # no probe has been answered yet
    VALIDATING = "validating"  # on loopback, '. NS' came back with AD
    NOT_VALIDATING = "not validating"  # off loopback, or answered without AD


class MxStatus(enum.Enum):
    OK = "ok"
    PERMANENT = "permanent"  # bounce the recipients now (RFC 5321 §5.1, RFC 7505)
    TRANSIENT = "transient"  # try again later (RFC 5321 §4.5.4.1)


@dataclass(frozen=True)
class MxHost:
    name: Domain  # lower-case, no trailing dot (relay.domains.dns_name)
    preference: int
    addresses: tuple[str, ...]  # IPv4 then IPv6 literals
    secure: bool = False  # its A/AAAA answers were DNSSEC-validated (RFC 7672 §2.2.2)


@dataclass(frozen=True)
class MxResult:
    status: MxStatus
    hosts: tuple[MxHost, ...]  # in the order to try; empty unless status is OK
    reason: str  # one sentence; for OK, notes on skipped or capped hosts (may be "")
    implicit: bool = False  # no MX RRset: the domain itself is the MX (RFC 5321 §5.1)
    secure: bool = False  # the MX RRset (or its denial) was DNSSEC-validated
    ttl: int = 0  # the least TTL of the answers it was made of


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


@dataclass(frozen=True)
class _HostAddrs:
    addresses: tuple[str, ...]
    outcome: Lookup  # ANSWER if any address; else the most hopeful failure
    detail: str
    secure: bool = False  # every A/AAAA reply was validated
    ttl: int = 0  # the least TTL of the A and AAAA replies


class MxResolver:
    """Resolve MX hosts and addresses through one resolver (:class:`DnsClient`).

    ``cfg`` names the nameservers (``delivery.resolver``); None means the system
    resolver (/etc/resolv.conf).  ``rng`` orders equal-preference MX hosts; tests
    pass a seeded ``random.Random``.  ``dnssec``: ask for validation (DO and AD bits);
    the answers' AD bits count only once :meth:`probe_dnssec` found the resolver on
    loopback and validating (``validated``).
    """

    def __init__(
        self,
        cfg: ResolverConfig | None,
        max_hosts: int = 5,
        rng: random.Random | None = None,
        dnssec: bool = False,
    ) -> None:
        if max_hosts < 1:
            raise ValueError(f"max_hosts must be at least 1 (got {max_hosts})")
        self.max_hosts = max_hosts
        self._rng = rng if rng is not None else random.SystemRandom()
        self._dns = DnsClient(cfg, dnssec)
        self._setup_error = self._dns.setup_error
        self.dnssec_state = DnssecState.UNKNOWN if dnssec else DnssecState.OFF
        self.dnssec_problem: str | None = None  # the last probe's complaint
        self._cache = TtlCache()  # MX results and TLSA sets, for their DNS TTL
        self._probed = asyncio.Event()  # the first verdict on DNSSEC is in
        if not dnssec:
            self._probed.set()  # nothing to wait for

    async def ready(self) -> None:
        """Return once the first DNSSEC probe has ended (at once without DNSSEC):
        a delivery never runs before the relay knows whether DANE is on."""
        await self._probed.wait()

    # ---- DNSSEC ------------------------------------------------------------------------------

    @property
    def validated(self) -> bool:
        """AD bits are believed: the last probe that got an answer proved validation."""
        return self.dnssec_state is DnssecState.VALIDATING

    async def probe_dnssec(self) -> str | None:
        """Check that the resolver validates, as Postfix's ``dnssec_probe``: it must be
        on loopback, and the root's NS RRset must come back with AD set (RFC 4035
        §3.2.3).  Returns None when it does, else why not.  Only an answer changes
        ``dnssec_state``: a probe that fails (timeout, SERVFAIL) keeps the last verdict,
        so nobody can switch DANE off by blocking the root's NS lookup for a moment."""
        try:
            state, why = await self._probe()
        finally:
            self._probed.set()
        self.dnssec_problem = why
        if state is not None and state is not self.dnssec_state:
            self._cache.clear()  # results judged under the other DNSSEC state
            self.dnssec_state = state
        return why

    async def _probe(self) -> tuple[DnssecState | None, str | None]:
        servers = ", ".join(self._dns.nameservers) or "(none)"
        if not self._dns.dnssec:
            return DnssecState.OFF, "DNSSEC was not asked of the resolver"
        if not self._dns.on_loopback():
            return DnssecState.NOT_VALIDATING, (
                f"the resolver ({servers}) is not on loopback: its AD bit could be forged on "
                "the way, so DNSSEC answers cannot be trusted (run a validating resolver such "
                "as unbound on 127.0.0.1)"
            )
        reply = await self._dns.query(".", "NS")
        if reply.outcome is Lookup.TRANSIENT:
            return None, f"the DNSSEC probe ('. NS' at {servers}) failed: {reply.detail}"
        if reply.outcome is not Lookup.ANSWER or not reply.secure:
            return DnssecState.NOT_VALIDATING, (
                f"the resolver ({servers}) does not validate DNSSEC: the probe '. NS' came "
                "back without the AD bit"
            )
        return DnssecState.VALIDATING, None

    def _secure(self, reply: Reply) -> bool:
        return self.validated and reply.secure

    async def tlsa(self, host: str, port: int) -> TlsaSet:
        """The TLSA RRset at ``_PORT._tcp.HOST`` (RFC 7672 §2.2.3: the MX host name,
        port 25 unless a lab connects elsewhere), classified for DANE."""
        name = f"_{port}._tcp.{dns_name(host)}"
        if not self.validated:
            return TlsaSet(name, TlsaStatus.INSECURE, detail="resolver not validating")
        cached = self._cache.get(("TLSA", name))
        if isinstance(cached, TlsaSet):
            return cached
        generation = self._cache.generation
        found, ttl = await self._tlsa(name)
        if found.status is not TlsaStatus.FAILED:
            self._cache.keep(("TLSA", name), ttl, found, generation)
        return found

    async def _tlsa(self, name: str) -> tuple[TlsaSet, int]:
        reply = await self._dns.query(name, "TLSA")
        if reply.outcome is Lookup.TRANSIENT:
            # RFC 7672 §2.2: a failed (or bogus) TLSA lookup for a secure host: defer.
            detail = f"TLSA lookup failed: {reply.detail}"
            return TlsaSet(name, TlsaStatus.FAILED, detail=detail), 0
        if not reply.secure:
            detail = "answer not DNSSEC-validated"
            return TlsaSet(name, TlsaStatus.INSECURE, detail=detail), reply.ttl
        if reply.answer is None:
            detail = "no TLSA records (validated)"
            return TlsaSet(name, TlsaStatus.ABSENT, detail=detail), reply.ttl
        records = tuple(
            Tlsa(int(rd.usage), int(rd.selector), int(rd.mtype), bytes(rd.cert))
            for rd in reply.answer
            if isinstance(rd, dns.rdtypes.ANY.TLSA.TLSA)
        )
        return TlsaSet(name, TlsaStatus.SECURE, records), reply.ttl

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
        cached = self._cache.get(("MX", name))
        if isinstance(cached, MxResult):
            return cached
        generation = self._cache.generation
        result = await self._resolve(name)
        if result.status is MxStatus.OK:  # failures are asked again next time
            self._cache.keep(("MX", name), result.ttl, result, generation)
        return result

    async def _resolve(self, name: Domain) -> MxResult:
        reply = await self._dns.query(name, "MX")
        if reply.outcome is Lookup.NXDOMAIN:
            # RFC 5321 §5.1: a non-existent domain MUST be reported as an error.
            return MxResult(MxStatus.PERMANENT, (), f"domain {name} does not exist (NXDOMAIN)")
        if reply.outcome is Lookup.TRANSIENT:
            # RFC 5321 §5.1: a temporary error means queue and retry later.
            return MxResult(MxStatus.TRANSIENT, (), f"MX lookup for {name} failed: {reply.detail}")
        if reply.outcome is Lookup.NODATA:
            result = await self._implicit_mx(name)
        else:
            assert reply.answer is not None
            records = [(int(rd.preference), dns_name(rd.exchange.to_text())) for rd in reply.answer]
            result = await self._explicit_mx(name, records)
        return replace(result, secure=self._secure(reply), ttl=min(result.ttl, reply.ttl))

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
        reply = await self._dns.query(name, "TXT")
        if reply.outcome is Lookup.TRANSIENT:
            return None
        if reply.answer is None:
            return ()
        return tuple(
            b"".join(rd.strings).decode("utf-8", "replace")
            for rd in reply.answer
            if isinstance(rd, dns.rdtypes.ANY.TXT.TXT)
        )

    # ---- MX sets -----------------------------------------------------------------------------

    async def _implicit_mx(self, name: Domain) -> MxResult:
        # RFC 5321 §5.1: an empty MX list means an implicit MX of preference 0: the domain.
        found = await self._host_addresses(name)
        if found.addresses:
            host = MxHost(name, 0, found.addresses, found.secure)
            reason = f"no MX records: implicit MX {name} (RFC 5321 §5.1)"
            return MxResult(MxStatus.OK, (host,), reason, True, ttl=found.ttl)
        if found.outcome is Lookup.TRANSIENT:
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
                hosts.append(MxHost(exchange, preference, addrs.addresses, addrs.secure))
                continue
            transient = transient or addrs.outcome is Lookup.TRANSIENT
            notes.append(f"skipped MX {exchange}: {addrs.detail}")
        if hosts:
            ttl = min(addrs.ttl for addrs in found)
            return MxResult(MxStatus.OK, tuple(hosts), "; ".join(notes), ttl=ttl)
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
        a, aaaa = await asyncio.gather(self._dns.query(host, "A"), self._dns.query(host, "AAAA"))
        addrs = tuple(rd.to_text() for rd in a.answer or ()) + tuple(
            rd.to_text() for rd in aaaa.answer or ()
        )
        if addrs:
            # Secure when every reply that came back was validated (RFC 7672 §2.2.2).  A
            # failed one (SERVFAIL is also how a validator answers bogus data) must not
            # make a signed host look unsigned, or breaking AAAA would switch DANE off.
            answered = [r for r in (a, aaaa) if r.outcome is not Lookup.TRANSIENT]
            secure = all(self._secure(r) for r in answered)
            # Half failed: not kept, the next attempt asks again.
            ttl = min(r.ttl for r in answered) if len(answered) == 2 else 0
            return _HostAddrs(addrs, Lookup.ANSWER, "", secure, ttl)
        if Lookup.TRANSIENT in (a.outcome, aaaa.outcome):
            detail = a.detail if a.outcome is Lookup.TRANSIENT else aaaa.detail
            return _HostAddrs((), Lookup.TRANSIENT, f"address lookup failed: {detail}")
        if Lookup.NXDOMAIN in (a.outcome, aaaa.outcome):
            # Includes a CNAME pointing nowhere: the chain ends in NXDOMAIN (RFC 5321 §5.1).
            return _HostAddrs((), Lookup.NXDOMAIN, "no such host (NXDOMAIN)")
        return _HostAddrs((), Lookup.NODATA, "host has no A or AAAA records")
