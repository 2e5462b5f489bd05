"""``tls-relay policy DOMAIN``: what delivery to a domain would require, as text.

Role: for an operator, show the route or the MX hosts (with preferences and addresses, or
the DNS failure), the effective TLS level, its minimum version and where it came from,
the names accepted for ``secure``, and the state of MTA-STS and DANE.

Not: connecting to any MX, changing the queue, or deciding anything delivery does not
decide the same way: it reuses :mod:`relay.delivery.mx` and :mod:`relay.tlspolicy.verdict`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from relay.config import Config, Route, TlsLevel
from relay.delivery.mx import MxResolver, MxResult, MxStatus, route_for
from relay.domains import Domain, normalize_domain
from relay.tlspolicy.mtasts import Mode, mx_allowed
from relay.tlspolicy.ststore import StsState
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
    dane = NOT_IMPLEMENTED if cfg.policy.dane else "disabled in config"
    lines.append(f"DANE: {dane}")
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


async def _gather(
    cfg: Config, domain: Domain, resolver: MxResolver
) -> tuple[Route | None, tuple[str, ...], MxResult | None, StsState | None]:
    route = route_for(cfg.delivery.routes, domain)
    if route is not None:
        return route, await resolver.addresses(route.host), None, None
    state = None
    if cfg.policy.mta_sts:
        from relay.app import mta_sts  # the same wiring as serve

        store = mta_sts(cfg, resolver)
        try:
            state = await store.for_domain(domain)
        finally:
            await store.close()
    return None, (), await resolver.resolve(domain), state


def _inputs(
    cfg: Config, domain: str, resolver: MxResolver | None
) -> tuple[Domain, Route | None, tuple[str, ...], MxResult | None, StsState | None]:
    """The domain's normal form and what DNS (and MTA-STS) say about it right now."""
    name = normalize_domain(domain)
    if resolver is None:
        resolver = MxResolver(cfg.delivery.resolver, max_hosts=cfg.delivery.max_mx_hosts)
    return name, *asyncio.run(_gather(cfg, name, resolver))


def report_json(cfg: Config, domain: str, resolver: MxResolver | None = None) -> dict[str, Any]:
    """``tls-relay policy DOMAIN --json``: every input and, per MX host (or the route's
    next hop), the effective requirement and its source."""
    name, route, next_hop_addrs, mx, sts = _inputs(cfg, domain, resolver)
    policy = sts.policy if sts is not None else None
    hosts: list[dict[str, Any]] = []
    if route is not None:
        req = requirement(cfg.policy, name, route.host)
        hosts.append({"name": route.host, "addresses": list(next_hop_addrs), **_req_json(req)})
    for host in mx.hosts if mx is not None else ():
        allowed = policy is None or mx_allowed(policy, host.name)
        skipped = not allowed and policy is not None and policy.mode is Mode.ENFORCE
        req = requirement(cfg.policy, name, host.name, policy)
        entry = {"name": host.name, "preference": host.preference}
        entry |= {"addresses": list(host.addresses), "mta_sts_allowed": allowed}
        hosts.append({**entry, "skipped": skipped, **_req_json(req)})
    return {
        "domain": name,
        "route": None
        if route is None
        else {"via": f"[{route.host}]:{route.port}", "implicit_tls": route.implicit_tls},
        "mx": None
        if mx is None
        else {"status": mx.status.value, "implicit": mx.implicit, "reason": mx.reason or None},
        "mta_sts": _sts_json(sts, cfg),
        "dane": {"enabled": cfg.policy.dane, "implemented": False},
        "hosts": hosts,
    }


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
    name, route, next_hop_addrs, mx, sts = _inputs(cfg, domain, resolver)
    lines = [f"domain: {name}"]
    if route is not None:
        lines += _route_lines(route, next_hop_addrs)
    else:
        assert mx is not None
        lines.append("route: none (MX lookup)")
        lines += _mx_lines(mx, cfg.delivery.port)
    # The level does not depend on which MX is tried; only the name to verify does.
    policy = sts.policy if sts is not None else None
    req = requirement(cfg.policy, name, route.host if route is not None else name, policy)
    lines += _policy_lines(req, cfg, routed=route is not None)
    lines += _sts_lines(sts, cfg, route is not None, mx)
    return "\n".join(lines)
