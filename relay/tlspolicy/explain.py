"""``tls-relay policy DOMAIN``: what delivery to a domain would require, as text.

Role: for an operator, show the route or the MX hosts (with preferences and addresses, or
the DNS failure), the configured TLS level, its minimum version and where it came from,
the names accepted for ``secure``, the state of MTA-STS and DANE (DNSSEC status of the
resolver and of each answer, TLSA records and whether usable), and per MX host the
effective requirement and its source (static, mta-sts, dane).

Not: connecting to any MX, changing the queue, or deciding anything delivery does not
decide the same way: it reuses :mod:`relay.delivery.mx` and :mod:`relay.tlspolicy.verdict`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from relay.config import Config, Route, TlsLevel
from relay.delivery.mx import MxHost, MxResolver, MxResult, MxStatus, route_for
from relay.domains import Domain, normalize_domain
from relay.tlspolicy.dane import TlsaSet, TlsaStatus
from relay.tlspolicy.mtasts import Mode, mx_allowed
from relay.tlspolicy.ststore import StsState
from relay.tlspolicy.verdict import Requirement, requirement


@dataclass
class Inputs:
    """What DNS, DNSSEC and MTA-STS say about a domain right now."""

    domain: Domain
    route: Route | None = None
    next_hop: tuple[str, ...] = ()  # the route's next-hop addresses
    mx: MxResult | None = None
    sts: StsState | None = None
    dnssec: str | None = "disabled in config"  # None: the resolver validates
    tlsa: dict[str, TlsaSet] = field(default_factory=dict)  # per secure MX host

    def requirement(self, cfg: Config, host: str) -> Requirement:
        """The same requirement delivery computes for *host*."""
        policy = self.sts.policy if self.sts is not None else None
        secure_mx = self.mx is not None and self.mx.secure
        return requirement(cfg.policy, self.domain, host, policy, self.tlsa.get(host), secure_mx)

    def skipped(self, host: str) -> bool:
        """MTA-STS enforce skips a host its patterns do not name, unless DANE covers it."""
        policy = self.sts.policy if self.sts is not None else None
        if policy is None or policy.mode is not Mode.ENFORCE or mx_allowed(policy, host):
            return False
        tlsa = self.tlsa.get(host)
        return tlsa is None or not tlsa.usable


def _version(req: Requirement) -> str:
    return req.min_version.name.replace("_", ".")


def _route_lines(route: Route, addresses: tuple[str, ...]) -> list[str]:
    tls = "implicit TLS" if route.implicit_tls else "STARTTLS required"
    auth = f", AUTH as {route.auth.username}" if route.auth else ""
    addrs = ", ".join(addresses) if addresses else "(no address found)"
    return [
        f"route: {', '.join(route.domains)} via [{route.host}]:{route.port} ({tls}{auth})",
        "  no MX lookup for routed domains",
        f"  next hop {route.host}: {addrs}",
    ]


def _mx_lines(result: MxResult, port: int) -> list[str]:
    if result.status is MxStatus.PERMANENT:
        return [f"MX: permanent failure: {result.reason}", "  recipients would bounce at once"]
    if result.status is MxStatus.TRANSIENT:
        return [f"MX: transient failure: {result.reason}", "  delivery would defer and retry"]
    title = "MX hosts (implicit MX, RFC 5321 §5.1)" if result.implicit else "MX hosts"
    lines = [f"{title}, delivery port {port}:"]
    for host in result.hosts:
        secure = "  (addresses DNSSEC-secure)" if host.secure else ""
        lines.append(f"  {host.preference:>5} {host.name}  {', '.join(host.addresses)}{secure}")
    if result.reason:
        lines.append(f"  note: {result.reason}")
    return lines


def _policy_lines(req: Requirement, routed: bool) -> list[str]:
    """The configured floor, worded as delivery checks it (relay.tlspolicy.verdict)."""
    lines = [
        f"TLS level: {req.level.label} (from {req.source})",
        f"minimum TLS version: {_version(req)}",
    ]
    if TlsLevel.VERIFY <= req.level <= TlsLevel.SECURE:
        lines.append("certificate: chain must verify against the CA bundle")
    if req.level == TlsLevel.VERIFY:
        host = f"the next hop {req.mx_host}" if routed else "the MX host name"
        lines.append(f"  and a name must match {host} (also sent as SNI)")
    if req.level == TlsLevel.SECURE:
        # As Postfix: one of these names, not the MX name, which DNS could have spoofed.
        lines.append(f"  and a name must match one of: {', '.join(req.secure_names)}")
        lines.append("  (the MX host name alone does not do; it is sent as SNI)")
    if req.level >= TlsLevel.DANE:
        lines.append("certificate: must match a usable DNSSEC-validated TLSA record of the MX")
        lines.append("  host (RFC 7672); without one, delivery defers (dane-required)")
    return lines


def _dane_lines(inputs: Inputs, cfg: Config) -> list[str]:
    if not cfg.policy.dane:
        return ["DANE: disabled in config"]
    if inputs.route is not None:
        return ["DANE: not used for a routed domain (the next hop is the operator's choice)"]
    if inputs.dnssec is not None:
        return [f"DANE: off: {inputs.dnssec}"]
    mx_secure = inputs.mx is not None and inputs.mx.secure
    lines = [
        "DANE: on (the resolver validates DNSSEC); MX RRset "
        + ("secure" if mx_secure else "not DNSSEC-signed")
    ]
    for host in inputs.mx.hosts if inputs.mx is not None else ():
        tlsa = inputs.tlsa.get(host.name)
        if tlsa is None:
            lines.append(f"  {host.name}: addresses not DNSSEC-secure: no TLSA lookup")
            continue
        lines.append(f"  {tlsa.name}: {_tlsa_text(tlsa)}")
        usable = set(tlsa.usable)
        for record in tlsa.records:
            lines.append(f"    {record}  ({'usable' if record in usable else 'unusable'})")
    return lines


def _tlsa_text(tlsa: TlsaSet) -> str:
    if tlsa.status is TlsaStatus.SECURE:
        return f"secure, {len(tlsa.records)} record(s), {len(tlsa.usable)} usable"
    if tlsa.status is TlsaStatus.FAILED:
        return f"{tlsa.detail}: the host would be deferred"
    return tlsa.detail


def _host_lines(inputs: Inputs, cfg: Config) -> list[str]:
    hosts = inputs.mx.hosts if inputs.mx is not None else ()
    if not hosts:
        return []
    lines = ["per MX host (what delivery requires):"]
    for host in hosts:
        tlsa = inputs.tlsa.get(host.name)
        if tlsa is not None and tlsa.status is TlsaStatus.FAILED:
            lines.append(f"  {host.name}: deferred (TLSA lookup failed)")
        elif inputs.skipped(host.name):
            lines.append(f"  {host.name}: skipped (not in the MTA-STS policy)")
        else:
            req = inputs.requirement(cfg, host.name)
            why = f"source {req.policy_source.value}: {req.source}"
            lines.append(f"  {host.name}: level {req.level.label} ({why})")
    return lines


def _sts_lines(state: StsState | None, cfg: Config, routed: bool, mx: MxResult | None) -> list[str]:
    if not cfg.policy.mta_sts:
        return ["MTA-STS: disabled in config"]
    if routed or state is None:
        return ["MTA-STS: not used for a routed domain (the next hop is the operator's choice)"]
    if state.policy is None:
        if state.failure:
            return [f"MTA-STS: no policy applies: {state.failure} ({state.result_type})"]
        return ["MTA-STS: no policy (no _mta-sts TXT record, or mode none)"]
    policy = state.policy
    origin = "from the cache" if state.origin == "cache" else "fetched now"
    lines = [
        f"MTA-STS: mode {policy.mode}, id {state.id}, max_age {policy.max_age}s ({origin})",
        f"  mx patterns: {', '.join(policy.mx)}",
    ]
    for host in mx.hosts if mx is not None else ():
        if mx_allowed(policy, host.name):
            lines.append(f"  {host.name}: allowed; certificate must be valid for it (WebPKI)")
        elif policy.mode is Mode.ENFORCE:
            lines.append(f"  {host.name}: not in the policy: skipped (enforce)")
        else:
            lines.append(f"  {host.name}: not in the policy: reported, still used (testing)")
    return lines


async def _gather(cfg: Config, domain: Domain, resolver: MxResolver) -> Inputs:
    inputs = Inputs(domain, route_for(cfg.delivery.routes, domain))
    if inputs.route is not None:
        inputs.next_hop = await resolver.addresses(inputs.route.host)
        return inputs
    if cfg.policy.dane:
        inputs.dnssec = await resolver.probe_dnssec()  # as serve does before delivering
    if cfg.policy.mta_sts:
        from relay.app import mta_sts  # the same wiring as serve

        store = mta_sts(cfg, resolver)
        try:
            inputs.sts = await store.for_domain(domain)
        finally:
            await store.close()
    inputs.mx = await resolver.resolve(domain)
    secure = [h for h in inputs.mx.hosts if h.secure]
    if resolver.validated and secure:
        found = await asyncio.gather(*(resolver.tlsa(h.name, cfg.delivery.port) for h in secure))
        inputs.tlsa = {h.name: t for h, t in zip(secure, found, strict=True)}
    return inputs


def _inputs(cfg: Config, domain: str, resolver: MxResolver | None) -> Inputs:
    """The domain's normal form and what DNS (and MTA-STS) say about it right now."""
    name = normalize_domain(domain)
    if resolver is None:
        resolver = MxResolver(
            cfg.delivery.resolver, max_hosts=cfg.delivery.max_mx_hosts, dnssec=cfg.policy.dane
        )
    return asyncio.run(_gather(cfg, name, resolver))


def report_json(cfg: Config, domain: str, resolver: MxResolver | None = None) -> dict[str, Any]:
    """``tls-relay policy DOMAIN --json``: every input and, per MX host (or the route's
    next hop), the effective requirement and its source."""
    inputs = _inputs(cfg, domain, resolver)
    route, mx = inputs.route, inputs.mx
    hosts: list[dict[str, Any]] = []
    if route is not None:
        req = requirement(cfg.policy, inputs.domain, route.host)
        hosts.append({"name": route.host, "addresses": list(inputs.next_hop), **_req_json(req)})
    for host in mx.hosts if mx is not None else ():
        hosts.append(_host_json(inputs, cfg, host))
    return {
        "domain": inputs.domain,
        "route": None
        if route is None
        else {"via": f"[{route.host}]:{route.port}", "implicit_tls": route.implicit_tls},
        "mx": None
        if mx is None
        else {
            "status": mx.status.value,
            "implicit": mx.implicit,
            "reason": mx.reason or None,
            "dnssec_secure": mx.secure,
        },
        "mta_sts": _sts_json(inputs.sts, cfg),
        "dane": {
            "enabled": cfg.policy.dane,
            "active": cfg.policy.dane and route is None and inputs.dnssec is None,
            "not_active_because": inputs.dnssec if cfg.policy.dane and route is None else None,
        },
        "hosts": hosts,
    }


def _host_json(inputs: Inputs, cfg: Config, host: MxHost) -> dict[str, Any]:
    policy = inputs.sts.policy if inputs.sts is not None else None
    tlsa = inputs.tlsa.get(host.name)
    entry: dict[str, Any] = {"name": host.name, "preference": host.preference}
    entry |= {"addresses": list(host.addresses), "dnssec_secure": host.secure}
    entry["mta_sts_allowed"] = policy is None or mx_allowed(policy, host.name)
    entry["skipped"] = inputs.skipped(host.name)
    entry["tlsa"] = (
        None
        if tlsa is None
        else {
            "name": tlsa.name,
            "status": tlsa.status.value,
            "detail": tlsa.detail or None,
            "records": [str(r) for r in tlsa.records],
            "usable": [str(r) for r in tlsa.usable],
        }
    )
    if tlsa is not None and tlsa.status is TlsaStatus.FAILED:
        entry["deferred"] = True
    return entry | _req_json(inputs.requirement(cfg, host.name))


def _req_json(req: Requirement) -> dict[str, Any]:
    return {
        "level": req.level.label,
        "min_version": _version(req),
        "source": req.policy_source.value,
        "because": req.source,
    }


def _sts_json(state: StsState | None, cfg: Config) -> dict[str, Any]:
    if not cfg.policy.mta_sts or state is None:
        return {"enabled": cfg.policy.mta_sts, "policy": None}
    policy = state.policy
    return {
        "enabled": True,
        "id": state.id,
        "origin": state.origin,
        "failure": state.failure,
        "result_type": state.result_type,
        "policy": None
        if policy is None
        else {"mode": policy.mode.value, "max_age": policy.max_age, "mx": list(policy.mx)},
    }


def report(cfg: Config, domain: str, resolver: MxResolver | None = None) -> str:
    """The text printed by ``tls-relay policy DOMAIN`` (does DNS lookups; no SMTP)."""
    inputs = _inputs(cfg, domain, resolver)
    route = inputs.route
    lines = [f"domain: {inputs.domain}"]
    if route is not None:
        lines += _route_lines(route, inputs.next_hop)
    else:
        assert inputs.mx is not None
        lines.append("route: none (MX lookup)")
        lines += _mx_lines(inputs.mx, cfg.delivery.port)
    # The configured floor; what MTA-STS and DANE add per host is listed below.
    host = route.host if route is not None else inputs.domain
    lines += _policy_lines(requirement(cfg.policy, inputs.domain, host), routed=route is not None)
    lines += _sts_lines(inputs.sts, cfg, route is not None, inputs.mx)
    lines += _dane_lines(inputs, cfg)
    lines += _host_lines(inputs, cfg)
    return "\n".join(lines)
