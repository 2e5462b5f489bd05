"""Configuration: YAML loaded once, validated once, into frozen typed objects.

Role: the typed settings every other module uses (:class:`Config` and its parts),
and the entry points that turn ``config/relay.yaml`` (and the TLS policy it names)
into them, or raise :class:`relay.errors.ConfigError` listing *every* problem as
``FILE: key.path: problem (got VALUE)``. This module knows the sections and keys of
relay.yaml; generic value checks and YAML reading live in ``relay.configcheck``,
the TLS policy part in ``relay.configpolicy``. Other modules import only from here.
Not: opening sockets, reading users, or deciding TLS verdicts at delivery time.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay import certs, units, users
from relay import configcheck as check
from relay.configcheck import is_dns_name as is_dns_name  # public API, re-exported
from relay.errors import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

KIB = 1024
MIB = 1024 * 1024


class ListenerTls(enum.Enum):
    STARTTLS = "starttls"  # plaintext greeting, STARTTLS required before MAIL
    IMPLICIT = "implicit"  # TLS from the first byte (RFC 8314)


class TlsLevel(enum.IntEnum):
    """Outbound TLS levels; ordered so ``observed < required`` reads as English.

    There is deliberately no NONE/MAY: a config asking for plaintext is rejected.
    """

    ENCRYPT = 1  # STARTTLS completed, certificate not checked
    VERIFY = 2  # + chain valid, name matches the MX host name
    SECURE = 3  # + name matches the recipient domain or a `match` entry
    DANE = 4  # TLSA from a DNSSEC-validated answer (RFC 7672)
    DANE_ONLY = 5

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


@dataclass(frozen=True)
class Listener:
    host: str  # "0.0.0.0", "::", "127.0.0.1"
    port: int
    tls: ListenerTls

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ServerTls:
    cert: Path
    key: Path
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2


@dataclass(frozen=True)
class Clients:
    networks: tuple[IPNetwork, ...] = ()
    users_file: Path | None = None


@dataclass(frozen=True)
class Limits:
    max_message_size: int = 25 * MIB
    max_recipients: int = 100
    max_connections: int = 500
    max_connections_per_ip: int = 50
    max_commands: int = 1000  # per session, so NOOP loops cannot hold a slot forever
    max_auth_failures: int = 5  # per client IP within auth_failure_window, then refused
    auth_failure_window: float = 300.0
    # RFC 5321 4.5.3.2: server timeout 5 minutes waiting for the next command,
    # and the DATA block must keep moving (we bound the whole DATA phase).
    command_timeout: float = 300.0
    data_timeout: float = 600.0


@dataclass(frozen=True)
class SpoolConfig:
    path: Path


@dataclass(frozen=True)
class QueueConfig:
    retry: tuple[float, ...] = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)
    max_lifetime: float = 5 * 86400.0  # RFC 5321 4.5.4.1: give up after 4-5 days
    delay_warning: float | None = None  # send a "delayed" DSN after this long; off by default
    shutdown_grace: float = 30.0  # SIGTERM: how long in-flight deliveries may finish


@dataclass(frozen=True)
class ResolverConfig:
    nameservers: tuple[str, ...]
    port: int = 53
    timeout: float = 5.0


@dataclass(frozen=True)
class RouteAuth:
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class Route:
    domains: tuple[str, ...]  # lower-case; ".example.com" matches subdomains
    host: str
    port: int
    implicit_tls: bool = False
    auth: RouteAuth | None = None


@dataclass(frozen=True)
class DeliveryConfig:
    port: int = 25
    resolver: ResolverConfig | None = None  # None: the system resolver
    concurrency: int = 200
    per_domain_concurrency: int = 20
    routes: tuple[Route, ...] = ()
    max_mx_hosts: int = 5
    connection_reuse: bool = True
    max_messages_per_connection: int = 100
    ca_file: Path | None = None  # CA bundle for verify/secure; None: the system bundle
    # RFC 5321 4.5.3.2 client timeouts, plus an overall deadline per attempt.
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    attempt_deadline: float = 600.0


@dataclass(frozen=True)
class DomainPolicy:
    level: TlsLevel = TlsLevel.ENCRYPT
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    match: tuple[str, ...] = ()  # extra names for `secure`; ".example.com" = any subdomain


@dataclass(frozen=True)
class PolicyConfig:
    default: DomainPolicy = DomainPolicy()
    mta_sts: bool = True
    dane: bool = True
    domains: Mapping[str, DomainPolicy] = field(default_factory=dict)
    source: Path | None = None  # file it came from, None if inline

    def for_domain(self, domain: str) -> tuple[DomainPolicy, str]:
        """The configured policy for *domain* and where it came from."""
        domain = domain.lower().rstrip(".")
        if domain in self.domains:
            return self.domains[domain], f"static policy domains[{domain!r}]"
        return self.default, "static policy default"


@dataclass(frozen=True)
class MetricsConfig:
    host: str
    port: int


@dataclass(frozen=True)
class Config:
    source: Path
    hostname: str
    listeners: tuple[Listener, ...]
    tls: ServerTls
    clients: Clients
    limits: Limits
    spool: SpoolConfig
    queue: QueueConfig
    delivery: DeliveryConfig
    policy: PolicyConfig
    metrics: MetricsConfig | None = None
    log_level: str = "INFO"
    workers: int | None = 1  # serve processes; None = "auto", one per usable CPU


# ---------------------------------------------------------------------------
# Sections of relay.yaml.  Each parser takes a check.Ctx (file name for messages,
# directory for relative paths, the shared problem list; see relay.configcheck)
# and the raw YAML value; it records problems and returns a value, or None when
# it cannot.  The `policy:` section is parsed by relay.configpolicy.
# ---------------------------------------------------------------------------

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _listeners(ctx: check.Ctx, raw: Any) -> tuple[Listener, ...]:
    items = check.entries(ctx, "listeners", raw, nonempty=True) or []
    seen: dict[tuple[str, int], int] = {}
    result: list[Listener] = []
    for i, item in enumerate(items):
        where = f"listeners[{i}]"
        data = check.mapping(ctx, where, item, ("address", "tls"), required=("address",))
        if data is None:
            continue
        addr = (
            check.bind_address(ctx, f"{where}.address", data["address"])
            if "address" in data
            else None
        )
        tls = _listener_tls(ctx, f"{where}.tls", data.get("tls", check.MISSING))
        if addr in seen:
            ctx.add(f"{where}.address", f"duplicate of listeners[{seen[addr]}]", data["address"])
        elif addr is not None:
            seen[addr] = i
        if addr is not None and tls is not None:
            result.append(Listener(addr[0], addr[1], tls))
    return tuple(result)


def _listener_tls(ctx: check.Ctx, where: str, raw: Any) -> ListenerTls | None:
    if raw is check.MISSING:
        ctx.add(where, "required key is missing; every listener needs TLS: starttls or implicit")
        return None
    try:
        return ListenerTls(raw)
    except ValueError:
        ctx.add(where, "must be 'starttls' or 'implicit'", raw)
        return None


def _server_tls(ctx: check.Ctx, raw: Any) -> ServerTls | None:
    data = check.mapping(ctx, "tls", raw, ("cert", "key", "min_version"), ("cert", "key"))
    if data is None:
        return None
    cert = check.string(ctx, "tls.cert", data["cert"]) if "cert" in data else None
    key = check.string(ctx, "tls.key", data["key"]) if "key" in data else None
    version = check.tls_version(ctx, "tls.min_version", data.get("min_version", "TLSv1.2"))
    if cert is None or key is None:
        return None
    cert_path, key_path = ctx.path(cert), ctx.path(key)
    for which, problem in certs.pair_problems(cert_path, key_path):
        ctx.add(f"tls.{which}", problem, data[which])
    if version is None:
        return None
    return ServerTls(cert=cert_path, key=key_path, min_version=version)


def _clients(ctx: check.Ctx, raw: Any) -> Clients:
    data = check.mapping(ctx, "clients", raw, ("networks", "users_file")) or {}
    networks: list[IPNetwork] = []
    for i, item in enumerate(
        check.entries(ctx, "clients.networks", data.get("networks", [])) or []
    ):
        net = check.network(ctx, f"clients.networks[{i}]", item)
        if net is not None:
            networks.append(net)
    users_file = None
    if "users_file" in data:
        users_file = check.readable_file(ctx, "clients.users_file", data["users_file"])
        problem = users.check_file(users_file) if users_file else None
        if problem:
            ctx.add("clients.users_file", problem, data["users_file"])
    return Clients(networks=tuple(networks), users_file=users_file)


_LIMIT_INTS = (
    "max_recipients",
    "max_connections",
    "max_connections_per_ip",
    "max_commands",
    "max_auth_failures",
)
_LIMIT_DURATIONS = ("auth_failure_window", "command_timeout", "data_timeout")


def _limits(ctx: check.Ctx, raw: Any) -> Limits:
    known = ("max_message_size", *_LIMIT_INTS, *_LIMIT_DURATIONS)
    data = check.mapping(ctx, "limits", raw, known) or {}
    kwargs: dict[str, Any] = {}
    if "max_message_size" in data:
        kwargs["max_message_size"] = check.size(
            ctx, "limits.max_message_size", data["max_message_size"]
        )
    for key in _LIMIT_INTS:
        if key in data:
            kwargs[key] = check.integer(ctx, f"limits.{key}", data[key])
    for key in _LIMIT_DURATIONS:
        if key in data:
            kwargs[key] = check.duration(ctx, f"limits.{key}", data[key])
    limits = Limits(**{k: v for k, v in kwargs.items() if v is not None})
    if limits.max_connections_per_ip > limits.max_connections:
        where = "limits.max_connections_per_ip"
        ctx.add(where, "must not exceed limits.max_connections", limits.max_connections_per_ip)
    return limits


def _spool(ctx: check.Ctx, raw: Any) -> SpoolConfig | None:
    data = check.mapping(ctx, "spool", raw, ("path",), required=("path",))
    text = check.string(ctx, "spool.path", data["path"]) if data and "path" in data else None
    return SpoolConfig(path=ctx.path(text)) if text else None


def _queue(ctx: check.Ctx, raw: Any) -> QueueConfig:
    known = ("retry", "max_lifetime", "delay_warning", "shutdown_grace")
    data = check.mapping(ctx, "queue", raw, known) or {}
    kwargs: dict[str, Any] = {}
    if "retry" in data:
        steps = check.entries(ctx, "queue.retry", data["retry"], nonempty=True)
        parsed = [check.duration(ctx, f"queue.retry[{i}]", v) for i, v in enumerate(steps or [])]
        if steps and None not in parsed:
            kwargs["retry"] = tuple(p for p in parsed if p is not None)
    for key in ("max_lifetime", "delay_warning"):
        if key in data:
            kwargs[key] = check.duration(ctx, f"queue.{key}", data[key])
    if "shutdown_grace" in data:
        kwargs["shutdown_grace"] = check.duration(
            ctx, "queue.shutdown_grace", data["shutdown_grace"], True
        )
    queue = QueueConfig(**{k: v for k, v in kwargs.items() if v is not None})
    if queue.max_lifetime < queue.retry[0]:
        first = units.format_duration(queue.retry[0])
        got = data.get("max_lifetime", units.format_duration(queue.max_lifetime))
        ctx.add("queue.max_lifetime", f"must be at least the first retry interval ({first})", got)
    return queue


_DELIVERY_INTS = (
    "concurrency",
    "per_domain_concurrency",
    "max_mx_hosts",
    "max_messages_per_connection",
)
_DELIVERY_DURATIONS = ("connect_timeout", "command_timeout", "attempt_deadline")


def _delivery(ctx: check.Ctx, raw: Any) -> DeliveryConfig:
    known = ("port", "resolver", "routes", "connection_reuse", "ca_file")
    data = (
        check.mapping(ctx, "delivery", raw, (*known, *_DELIVERY_INTS, *_DELIVERY_DURATIONS)) or {}
    )
    kwargs: dict[str, Any] = {}
    if "port" in data:
        kwargs["port"] = check.integer(ctx, "delivery.port", data["port"], 1, 65535)
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
    tls = _listener_tls(ctx, f"{where}.tls", data["tls"]) if "tls" in data else ListenerTls.STARTTLS
    auth = _route_auth(ctx, f"{where}.auth", data["auth"]) if "auth" in data else None
    if domains is None or via is None or tls is None or ("auth" in data and auth is None):
        return None
    return Route(domains, via[0], via[1], implicit_tls=tls is ListenerTls.IMPLICIT, auth=auth)


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


def _metrics(ctx: check.Ctx, raw: Any) -> MetricsConfig | None:
    data = check.mapping(ctx, "metrics", raw, ("address",), ("address",))
    if not data or "address" not in data:
        return None
    addr = check.bind_address(ctx, "metrics.address", data["address"])
    return MetricsConfig(addr[0], addr[1]) if addr else None


def _hostname(ctx: check.Ctx, raw: Any) -> str:
    if raw is check.MISSING:
        name = socket.getfqdn()
        if not is_dns_name(name):
            ctx.add(
                "hostname", "not set, and this machine's name is not a valid DNS name; set it", name
            )
        return name
    if not isinstance(raw, str) or not is_dns_name(raw):
        ctx.add("hostname", "must be a valid DNS name such as relay.example.com", raw)
        return ""
    return raw.lower().rstrip(".")


def _log_level(ctx: check.Ctx, raw: Any) -> str:
    if isinstance(raw, str) and raw.upper() in _LOG_LEVELS:
        return raw.upper()
    ctx.add("log_level", f"must be one of {', '.join(_LOG_LEVELS)}", raw)
    return "INFO"


MAX_WORKERS = 64


def _workers(ctx: check.Ctx, raw: Any, metrics: bool) -> int | None:
    """``workers``: how many ``serve`` processes share the listeners and the spool."""
    if raw == "auto":
        value: int | None = None
    elif isinstance(raw, int) and not isinstance(raw, bool) and 1 <= raw <= MAX_WORKERS:
        value = raw
    else:
        ctx.add("workers", f'must be "auto" or a whole number from 1 to {MAX_WORKERS}', raw)
        return 1
    if value != 1 and metrics:
        # Each process counts only its own traffic: a scrape would see a part of it.
        ctx.add("workers", "must be 1 when metrics are enabled (counters are per process)", raw)
    return value


# --- entry points -----------------------------------------------------------

_TOP_KEYS = (
    "hostname",
    "listeners",
    "tls",
    "clients",
    "limits",
    "spool",
    "queue",
    "delivery",
    "policy",
    "metrics",
    "log_level",
    "workers",
)


def _config_ctx(path: Path) -> check.Ctx:
    return check.Ctx(str(path), path.expanduser().resolve().parent, [])


def load(path: Path) -> Config:
    """Read *path* once and validate everything; ConfigError lists every problem."""
    ctx = _config_ctx(path)
    doc = check.read_yaml(ctx, path)
    if doc is check.MISSING:
        raise ConfigError(ctx.problems)
    data = check.mapping(ctx, "", doc, _TOP_KEYS, required=("listeners", "tls", "spool"))
    if data is None:
        raise ConfigError(ctx.problems)
    cfg = _build(ctx, data, path)
    if ctx.problems or cfg is None:
        raise ConfigError(ctx.problems)
    return cfg


def _build(ctx: check.Ctx, data: dict[str, Any], path: Path) -> Config | None:
    from relay import configpolicy  # it imports the dataclasses above, so not at the top

    hostname = _hostname(ctx, data.get("hostname", check.MISSING))
    listeners = _listeners(ctx, data["listeners"]) if "listeners" in data else ()
    tls = _server_tls(ctx, data["tls"]) if "tls" in data else None
    clients = _clients(ctx, data.get("clients", {}))
    limits = _limits(ctx, data.get("limits", {}))
    spool = _spool(ctx, data["spool"]) if "spool" in data else None
    queue = _queue(ctx, data.get("queue", {}))
    delivery = _delivery(ctx, data.get("delivery", {}))
    policy = configpolicy.section(ctx, data["policy"]) if "policy" in data else PolicyConfig()
    metrics = _metrics(ctx, data["metrics"]) if "metrics" in data else None
    log_level = _log_level(ctx, data["log_level"]) if "log_level" in data else "INFO"
    workers = _workers(ctx, data["workers"], metrics is not None) if "workers" in data else 1
    if tls is None or spool is None or not listeners:
        return None
    return Config(
        source=path.expanduser().resolve(),
        hostname=hostname,
        listeners=listeners,
        tls=tls,
        clients=clients,
        limits=limits,
        spool=spool,
        queue=queue,
        delivery=delivery,
        policy=policy,
        metrics=metrics,
        log_level=log_level,
        workers=workers,
    )


def load_policy(path: Path) -> PolicyConfig:
    """Load a standalone TLS policy file; ConfigError with every problem."""
    from relay import configpolicy  # it imports the dataclasses above, so not at the top

    return configpolicy.load(path)


def load_users_file_path(path: Path) -> Path:
    """Only `clients.users_file` (absolute), for `tls-relay passwd`; the file may not exist yet."""
    ctx = _config_ctx(path)
    doc = check.read_yaml(ctx, path)
    clients = doc.get("clients") if isinstance(doc, Mapping) else None
    raw = clients.get("users_file") if isinstance(clients, Mapping) else None
    if doc is not check.MISSING and raw is None:
        ctx.add("clients.users_file", "required key is missing; passwd needs a users file")
    elif isinstance(raw, str) and raw.strip():
        return ctx.path(raw.strip())
    elif doc is not check.MISSING:
        ctx.add("clients.users_file", "must be a non-empty string", raw)
    raise ConfigError(ctx.problems)


def summary(cfg: Config) -> str:
    """A few lines for `check-config`: what this config will do."""
    nets = len(cfg.clients.networks)
    users_file = str(cfg.clients.users_file) if cfg.clients.users_file else "none (no AUTH)"
    queue = cfg.queue
    lines = [
        f"{cfg.source}: OK",
        f"hostname: {cfg.hostname}",
        "listeners: " + ", ".join(f"{x.address} ({x.tls.value})" for x in cfg.listeners),
        f"tls: {cfg.tls.cert} (minimum {cfg.tls.min_version.name.replace('_', '.')})",
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
    if cfg.policy.mta_sts or cfg.policy.dane:
        lines.append(
            "note: MTA-STS and DANE lookups are not implemented yet in this version; "
            "the static policy above is what applies"
        )
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
