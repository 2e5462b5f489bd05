"""Which MX hosts of a domain may be tried, under the policies they publish.

Role: :func:`targets` lists the addresses to try (a route's next hop, or the MX hosts);
:func:`requiretls_hosts` keeps, for a REQUIRETLS message, only MX hosts found
through DNSSEC or named by an MTA-STS enforce policy (RFC 8689 4.2.1);
:func:`dane_hosts` looks up the TLSA RRset of each MX host whose addresses are
DNSSEC-secure (RFC 7672 2.2) and keeps it in the delivery's Progress, deferring a
host whose lookup failed; :func:`sts_hosts` applies an MTA-STS policy's ``mx``
patterns (RFC 8461 4.1) to the hosts DANE does not cover (RFC 8461 2).
Not: the TLS requirement per host (relay.tlspolicy.verdict.requirement), connecting,
or the MTA-STS and TLSA lookups themselves (relay.tlspolicy.ststore,
relay.delivery.mx).
"""

from __future__ import annotations

import asyncio
import logging

from relay.config import DeliveryConfig, Route
from relay.delivery.mx import MxHost, MxResolver, MxStatus
from relay.delivery.outcome import Cause, Status
from relay.delivery.progress import Progress, log_attempt
from relay.delivery.session import Target
from relay.domains import Domain
from relay.log import event
from relay.metrics import Metrics
from relay.tlspolicy.dane import TlsaStatus
from relay.tlspolicy.mtasts import Mode, mx_allowed
from relay.tlspolicy.verdict import Verdict

log = logging.getLogger("relay.delivery")

DNSSEC_INVALID = "dnssec-invalid"  # RFC 8460 4.3.2
MAX_ADDRESSES_PER_HOST = 4  # RFC 5321 §5.1: try addresses in order, but bound the effort


async def targets(
    progress: Progress,
    domain: Domain,
    route: Route | None,
    resolver: MxResolver,
    cfg: DeliveryConfig,
    dane: bool,
    metrics: Metrics,
) -> list[Target]:
    """Addresses to try, in order: a route's next hop, or the MX hosts the domain's
    published policies allow (*dane*: DANE is active); empty, with outcomes or reasons
    set, if none."""
    if route is not None:
        host = route.host.strip("[]")  # "[host]": its addresses, no MX lookup
        progress.trace.stage = f"address lookup of next hop {host}"
        addresses = await resolver.addresses(host)
        if not addresses:
            progress.fail(f"next hop {host} for {domain} has no address", Cause.DNS)
        return [
            Target(host, ip, route.port, route.implicit_tls, route.auth)
            for ip in addresses[:MAX_ADDRESSES_PER_HOST]
        ]
    progress.trace.stage = f"MX lookup of {domain}"
    result = await resolver.resolve(domain)
    if result.status is not MxStatus.OK:
        status = Status.PERMANENT if result.status is MxStatus.PERMANENT else Status.TRANSIENT
        progress.settle(status, result.reason, Cause.DNS)  # before any host: every recipient
        return []
    hosts = list(result.hosts[: cfg.max_mx_hosts])
    if progress.requiretls:
        hosts = requiretls_hosts(progress, domain, hosts, dane and result.secure)
    if dane and not progress.relaxed:
        hosts = await dane_hosts(progress, hosts, result.secure, resolver, cfg.port, metrics)
    if not progress.relaxed:  # TLS-Required: No: the domain's MTA-STS does not apply
        hosts = sts_hosts(progress, domain, hosts)
    targets: list[Target] = []
    for mx in hosts:
        addresses = mx.addresses or await resolver.addresses(mx.name)
        targets += [Target(mx.name, ip, cfg.port) for ip in addresses[:MAX_ADDRESSES_PER_HOST]]
    if not targets:
        reason = f"no MX host of {domain} has an address {result.reason}".strip()
        progress.fail(reason, Cause.DNS)
    return targets


def _dane_applies(progress: Progress, host: str) -> bool:
    """The host has usable DNSSEC-validated TLSA records: DANE, not MTA-STS, judges it."""
    tlsa = progress.tlsa.get(host)
    return tlsa is not None and bool(tlsa.usable)


async def dane_hosts(
    progress: Progress,
    hosts: list[MxHost],
    mx_secure: bool,
    resolver: MxResolver,
    port: int,
    metrics: Metrics,
) -> list[MxHost]:
    """RFC 7672 2.2: the TLSA RRset of each MX host whose addresses are secure,
    looked up together.  A host whose lookup failed (SERVFAIL, bogus, timeout) is
    deferred: never tried without the DANE it may publish."""
    progress.mx_secure = mx_secure
    secure = [mx for mx in hosts if mx.secure]
    if len(secure) == 1:  # the common case: no task per message just to run one lookup
        found = [await resolver.tlsa(secure[0].name, port)]
    else:
        found = await asyncio.gather(*(resolver.tlsa(mx.name, port) for mx in secure))
    usable: list[MxHost] = []
    for mx in hosts:
        tlsa = found[secure.index(mx)] if mx.secure else None
        if tlsa is not None:
            progress.tlsa[mx.name] = tlsa
        if tlsa is None or tlsa.status is not TlsaStatus.FAILED:
            usable.append(mx)
            continue
        reason = f"MX {mx.name} skipped: {tlsa.detail} for {tlsa.name} (RFC 7672 2.2)"
        progress.fail(reason, Cause.TLS)
        target = Target(mx.name, mx.addresses[0] if mx.addresses else "", port)
        verdict = Verdict(False, None, reason, DNSSEC_INVALID)
        metrics.tls_failures.labels(result_type=DNSSEC_INVALID).inc()
        log_attempt(
            progress, progress.pending(), Status.TRANSIENT, reason, target, None, None, verdict
        )
    return usable


def sts_hosts(progress: Progress, domain: Domain, hosts: list[MxHost]) -> list[MxHost]:
    """RFC 8461 4.1: under an MTA-STS policy, MX hosts its ``mx`` patterns do not
    allow are skipped (enforce) or reported (testing).  Enforce and none allowed:
    every recipient is deferred, saying so."""
    state = progress.sts
    if state is None or state.policy is None:
        return hosts
    policy = state.policy
    # RFC 8461 2: a host DANE applies to is not subject to the MTA-STS policy.
    refused = [
        mx.name
        for mx in hosts
        if not mx_allowed(policy, mx.name) and not _dane_applies(progress, mx.name)
    ]
    if not refused:
        return hosts
    event(
        log,
        "mta_sts_mx_refused",
        logging.WARNING,
        queue_id=progress.queue_id,
        domain=domain,
        mode=policy.mode,
        id=state.id,
        refused=",".join(refused),
        patterns=",".join(policy.mx),
    )
    if policy.mode is not Mode.ENFORCE:
        return hosts  # testing: reported, delivery goes on under the floor
    allowed = [mx for mx in hosts if mx.name not in refused]
    if not allowed:
        reason = (
            f"the MTA-STS policy of {domain} (enforce, id {state.id}) allows none of "
            f"its MX hosts ({', '.join(refused)}; patterns {', '.join(policy.mx)})"
        )
        progress.settle(Status.TRANSIENT, reason, Cause.TLS)
    return allowed


def requiretls_hosts(
    progress: Progress, domain: Domain, hosts: list[MxHost], mx_secure: bool
) -> list[MxHost]:
    """RFC 8689 4.2.1: a REQUIRETLS message goes only to MX hosts found through DNSSEC
    (*mx_secure*) or named by an MTA-STS policy in mode enforce; none such means the
    message is returned (5.7.30) without any connection."""
    if mx_secure:
        return hosts
    state = progress.sts
    policy = state.policy if state is not None else None
    if policy is None and state is not None and state.failure is not None:
        # Whether the domain has a policy is unknown for now: ask again later.
        reason = f"REQUIRETLS: the MTA-STS policy of {domain} is unknown: {state.failure}"
        progress.settle(Status.TRANSIENT, reason, Cause.TLS)
        return []
    allowed = [] if policy is None or policy.mode is not Mode.ENFORCE else hosts
    allowed = [mx for mx in allowed if policy is not None and mx_allowed(policy, mx.name)]
    if allowed:
        return allowed
    reason = (
        f"REQUIRETLS: the MX hosts of {domain} were found neither through DNSSEC nor "
        "through an MTA-STS policy in mode enforce (RFC 8689 4.2.1)"
    )
    progress.settle(Status.PERMANENT, reason, Cause.TLS, "5.7.30")
    return []
