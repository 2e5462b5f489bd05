"""The summary ``tls-relay check-config`` prints: what a valid config will do (pure).

Not: validation (relay.config.load) or anything about delivery at run time.
"""

from __future__ import annotations

from relay import certs
from relay.config import units
from relay.config.model import Config, PolicyConfig, ResolverConfig, Route


def summary(cfg: Config, dane: str | None = None) -> str:
    """A few lines for `check-config`: what this config will do.  *dane*: the line
    on DANE, when the caller probed the resolver (relay.cli)."""
    nets = len(cfg.clients.networks)
    users_file = str(cfg.clients.users_file) if cfg.clients.users_file else "none (no AUTH)"
    queue = cfg.queue
    lines = [
        f"{cfg.source}: OK",
        f"hostname: {cfg.hostname}",
        "listeners: " + ", ".join(f"{x.address} ({x.tls.value})" for x in cfg.listeners),
        f"tls: {cfg.tls.cert}"
        + (f" and RSA {cfg.tls.rsa_cert}" if cfg.tls.rsa_cert else "")
        + f" (minimum {cfg.tls.min_version.name.replace('_', '.')})",
        f"clients: {nets} network{'s' if nets != 1 else ''} may relay; users file {users_file}",
        f"spool: {cfg.spool.path}",
        "workers: " + ("auto (one per usable CPU)" if cfg.workers is None else str(cfg.workers)),
        "queue: retry "
        + ", ".join(units.format_duration(r) for r in queue.retry)
        + f"; give up after {units.format_duration(queue.max_lifetime)}",
        f"delivery: MX port {cfg.delivery.port}, " + _resolver_text(cfg.delivery.resolver),
        *_route_lines(cfg.delivery.routes),
        _policy_line(cfg.policy),
    ]
    lines.append(
        "mta-sts: "
        + (
            f"on (policies from port {cfg.delivery.mta_sts_port}, cached under the spool)"
            if cfg.policy.mta_sts
            else "off"
        )
    )
    lines += [f"warning: {w}" for w in certs.expiry_warnings(cfg.tls.cert, cfg.tls.rsa_cert)]
    if cfg.audit is not None:
        where = cfg.audit.path if cfg.audit.enabled else "off"
        lines.append(f"audit trail: {where}")
    if cfg.tls_reports is not None:
        lines.append(f"tls reports: on (from {cfg.tls_reports.sender})")
    if dane is not None:
        lines.append(dane)
    elif not cfg.policy.dane:
        lines.append("dane: off")
    return "\n".join(lines)


def _resolver_text(resolver: ResolverConfig | None) -> str:
    if resolver is None:
        return "system resolver"
    return f"resolver {', '.join(resolver.nameservers)} port {resolver.port}"


def _route_lines(routes: tuple[Route, ...]) -> list[str]:
    if not routes:
        return ["routes: none (MX lookup for every domain)"]
    return [
        f"route: {', '.join(r.domains)} via [{r.host}]:{r.port}"
        f" ({'implicit' if r.implicit_tls else 'starttls'}{', auth' if r.auth else ''})"
        for r in routes
    ]


def _policy_line(policy: PolicyConfig) -> str:
    default = policy.default
    count = len(policy.domains)
    where = f"from {policy.source}" if policy.source else "inline"
    version = default.min_version.name.replace("_", ".")
    return (
        f"policy: default {default.level.label} ({version}), "
        f"{count} domain{'s' if count != 1 else ''} ({where})"
    )
