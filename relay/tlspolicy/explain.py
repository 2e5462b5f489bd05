"""``tls-relay policy DOMAIN``: what delivery to a domain would require, as text.

Role: for an operator, show the route or the MX hosts (with preferences and addresses, or
the DNS failure), the effective TLS level, its minimum version and where it came from,
the names accepted for ``secure``, and the state of MTA-STS and DANE.

Not: connecting to any MX, changing the queue, or deciding anything delivery does not
decide the same way: it reuses :mod:`relay.delivery.mx` and :mod:`relay.tlspolicy.verdict`.
"""

from __future__ import annotations

import asyncio

from relay.config import Config, Route, TlsLevel
from relay.delivery.mx import MxResolver, MxResult, MxStatus, route_for
from relay.domains import Domain, normalize_domain
from relay.tlspolicy.verdict import Requirement, requirement

NOT_IMPLEMENTED = (
    "enabled in config but not implemented in this version "
    "— the static level applies (never lowered)"
)


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
        lines.append(f"  {host.preference:>5} {host.name}  {', '.join(host.addresses)}")
    if result.reason:
        lines.append(f"  note: {result.reason}")
    return lines


def _policy_lines(req: Requirement, cfg: Config, routed: bool) -> list[str]:
    lines = [
        f"TLS level: {req.level.label} (from {req.source})",
        f"minimum TLS version: {_version(req)}",
    ]
    if req.level >= TlsLevel.VERIFY:
        lines.append("certificate: chain must verify against the CA bundle")
        host = f"the next hop {req.mx_host}" if routed else "the MX host name"
        lines.append(f"  and a name must match {host} (also sent as SNI)")
    if req.level == TlsLevel.SECURE:
        lines.append(f"  and a name must match one of: {', '.join(req.secure_names)}")
    if req.level >= TlsLevel.DANE:
        lines.append("  DANE levels are not implemented in this version: delivery will defer")
    mta_sts = NOT_IMPLEMENTED if cfg.policy.mta_sts else "disabled in config"
    dane = NOT_IMPLEMENTED if cfg.policy.dane else "disabled in config"
    lines.append(f"MTA-STS: {mta_sts}")
    lines.append(f"DANE: {dane}")
    return lines


async def _gather(
    cfg: Config, domain: Domain, resolver: MxResolver
) -> tuple[Route | None, tuple[str, ...], MxResult | None]:
    route = route_for(cfg.delivery.routes, domain)
    if route is not None:
        return route, await resolver.addresses(route.host), None
    return None, (), await resolver.resolve(domain)


def report(cfg: Config, domain: str, resolver: MxResolver | None = None) -> str:
    """The text printed by ``tls-relay policy DOMAIN`` (does DNS lookups; no SMTP)."""
    name = normalize_domain(domain)
    if resolver is None:
        resolver = MxResolver(cfg.delivery.resolver, max_hosts=cfg.delivery.max_mx_hosts)
    route, next_hop_addrs, mx = asyncio.run(_gather(cfg, name, resolver))
    lines = [f"domain: {name}"]
    if route is not None:
        lines += _route_lines(route, next_hop_addrs)
    else:
        assert mx is not None
        lines.append("route: none (MX lookup)")
        lines += _mx_lines(mx, cfg.delivery.port)
    # The level does not depend on which MX is tried; only the name to verify does.
    req = requirement(cfg.policy, name, route.host if route is not None else name)
    lines += _policy_lines(req, cfg, routed=route is not None)
    return "\n".join(lines)
