"""The ``delivery:`` section of relay.yaml: MX port, resolver, routes, limits, timeouts.

Role: validate the outbound side's settings into a
:class:`~relay.config.model.DeliveryConfig`, recording every problem in the caller's
:class:`~relay.config.checks.Ctx` (``delivery.routes[0].via: ...``).  A route's
password is never echoed in an error.
Not: the TLS policy (relay.config.policy), or using any of it (relay.delivery).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from relay.config import checks as check
from relay.config.model import DeliveryConfig, ListenerTls, ResolverConfig, Route, RouteAuth

_DELIVERY_INTS = (
    "concurrency",
    "per_domain_concurrency",
    "max_mx_hosts",
    "max_messages_per_connection",
)
_DELIVERY_DURATIONS = ("connect_timeout", "command_timeout", "attempt_deadline")


def section(ctx: check.Ctx, raw: Any) -> DeliveryConfig:
    """The `delivery:` mapping; problems go to *ctx*, defaults fill what is absent."""
    known = ("port", "mta_sts_port", "resolver", "routes", "connection_reuse", "ca_file")
    data = (
        check.mapping(ctx, "delivery", raw, (*known, *_DELIVERY_INTS, *_DELIVERY_DURATIONS)) or {}
    )
    kwargs: dict[str, Any] = {}
    for key in ("port", "mta_sts_port"):
        if key in data:
            kwargs[key] = check.integer(ctx, f"delivery.{key}", data[key], 1, 65535)
    for key in _DELIVERY_INTS:
        if key in data:
            kwargs[key] = check.integer(ctx, f"delivery.{key}", data[key])
    for key in _DELIVERY_DURATIONS:
        if key in data:
            kwargs[key] = check.duration(ctx, f"delivery.{key}", data[key])
    if "connection_reuse" in data:
        kwargs["connection_reuse"] = check.boolean(
            ctx, "delivery.connection_reuse", data["connection_reuse"]
        )
    if "ca_file" in data:
        kwargs["ca_file"] = check.readable_file(ctx, "delivery.ca_file", data["ca_file"])
    if "resolver" in data:
        kwargs["resolver"] = _resolver(ctx, data["resolver"])
    if "routes" in data:
        kwargs["routes"] = _routes(ctx, data["routes"])
    return DeliveryConfig(**{k: v for k, v in kwargs.items() if v is not None})


def _resolver(ctx: check.Ctx, raw: Any) -> ResolverConfig | None:
    where = "delivery.resolver"
    data = check.mapping(ctx, where, raw, ("nameservers", "port", "timeout"), ("nameservers",))
    if data is None or "nameservers" not in data:
        return None
    servers: list[str] = []
    for i, item in enumerate(
        check.entries(ctx, f"{where}.nameservers", data["nameservers"], True) or []
    ):
        try:
            servers.append(str(ipaddress.ip_address(item)))
        except ValueError:
            ctx.add(f"{where}.nameservers[{i}]", "must be an IP address", item)
    port = check.integer(ctx, f"{where}.port", data["port"], 1, 65535) if "port" in data else 53
    timeout = check.duration(ctx, f"{where}.timeout", data["timeout"]) if "timeout" in data else 5.0
    if not servers or port is None or timeout is None:
        return None
    return ResolverConfig(nameservers=tuple(servers), port=port, timeout=timeout)


def _routes(ctx: check.Ctx, raw: Any) -> tuple[Route, ...]:
    result: list[Route] = []
    for i, item in enumerate(check.entries(ctx, "delivery.routes", raw) or []):
        route = _route(ctx, f"delivery.routes[{i}]", item)
        if route is not None:
            result.append(route)
    return tuple(result)


def _route(ctx: check.Ctx, where: str, raw: Any) -> Route | None:
    data = check.mapping(ctx, where, raw, ("domains", "via", "tls", "auth"), ("domains", "via"))
    if data is None or "domains" not in data or "via" not in data:
        return None
    domains = check.domain_list(ctx, f"{where}.domains", data["domains"], nonempty=True)
    via = check.via(ctx, f"{where}.via", data["via"])
    implicit = _route_tls(ctx, f"{where}.tls", data["tls"]) if "tls" in data else False
    auth = _route_auth(ctx, f"{where}.auth", data["auth"]) if "auth" in data else None
    if domains is None or via is None or implicit is None or ("auth" in data and auth is None):
        return None
    return Route(domains, via[0], via[1], implicit_tls=implicit, auth=auth)


def _route_tls(ctx: check.Ctx, where: str, raw: Any) -> bool | None:
    """A route's ``tls``: whether the next hop speaks TLS from the first byte."""
    try:
        return ListenerTls(raw) is ListenerTls.IMPLICIT
    except ValueError:
        ctx.add(where, "must be 'starttls' or 'implicit'", raw)
        return None


def _route_auth(ctx: check.Ctx, where: str, raw: Any) -> RouteAuth | None:
    data = check.mapping(ctx, where, raw, ("username", "password"), ("username", "password"))
    if data is None or "username" not in data or "password" not in data:
        return None
    user = check.string(ctx, f"{where}.username", data["username"])
    password = data["password"]
    if not isinstance(password, str) or not password:
        ctx.add(f"{where}.password", "must be a non-empty string")  # never echo a secret
        return None
    return RouteAuth(user, password) if user else None
