"""Configuration: YAML loaded once, validated once, into frozen typed objects.

Role: turn ``config/relay.yaml`` (and the TLS policy it names) into a
:class:`Config`, or raise :class:`relay.errors.ConfigError` listing *every*
problem as ``FILE: key.path: problem (got VALUE)``.
Not: opening sockets, reading users, or deciding TLS verdicts at delivery time.
"""

from __future__ import annotations

import difflib
import enum
import ipaddress
import json
import re
import socket
import ssl
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from relay import certs, units, users
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


# ---------------------------------------------------------------------------
# Loading.  Each section parser takes a _Ctx (file name for messages, directory
# for relative paths, the shared problem list), the key path and the raw YAML
# value; it records problems and returns a value, or None when it cannot.
# ---------------------------------------------------------------------------

_MISSING: Any = object()
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_TLS_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
_OLD_TLS = {"SSLv2", "SSLv3", "TLSv1", "TLSv1.0", "TLSv1.1"}
_LEVELS = {"encrypt": TlsLevel.ENCRYPT, "verify": TlsLevel.VERIFY, "secure": TlsLevel.SECURE}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_PLAINTEXT_MSG = "plaintext is never allowed; use encrypt, verify or secure"
_DANE_MSG = (
    "DANE is not implemented in this version; refusing rather than pretending to enforce it "
    "(use encrypt, verify or secure)"
)


@dataclass
class _Ctx:
    file: str  # as shown in messages
    base: Path  # directory that relative paths are relative to (absolute)
    problems: list[str]

    def add(self, where: str, problem: str, got: Any = _MISSING) -> None:
        line = f"{self.file}: {where}: {problem}" if where else f"{self.file}: {problem}"
        self.problems.append(line if got is _MISSING else f"{line} (got {_show(got)})")

    def path(self, raw: str) -> Path:
        return (self.base / Path(raw).expanduser()).resolve()


def _show(value: Any) -> str:
    return repr(value) if not isinstance(value, Path) else repr(str(value))


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _keyed(where: str, key: str) -> str:
    return f"{where}[{json.dumps(key)}]"


def _mapping(
    ctx: _Ctx, where: str, raw: Any, known: Sequence[str], required: Sequence[str] = ()
) -> dict[str, Any] | None:
    """A mapping with only *known* keys and all *required* ones, else problems."""
    if not isinstance(raw, Mapping):
        ctx.add(where, "must be a mapping of keys to values", raw)
        return None
    for key in raw:
        if key not in known:
            hint = difflib.get_close_matches(str(key), known, n=1)
            tip = f"; did you mean {hint[0]!r}?" if hint else f"; known keys: {', '.join(known)}"
            ctx.add(_join(where, str(key)), f"unknown key{tip}")
    for key in required:
        if raw.get(key) is None:
            ctx.add(_join(where, key), "required key is missing")
    return {str(k): v for k, v in raw.items() if k in known and v is not None}


def _int(ctx: _Ctx, where: str, raw: Any, low: int = 1, high: int | None = None) -> int | None:
    if isinstance(raw, bool) or not isinstance(raw, int):
        ctx.add(where, "must be a whole number", raw)
    elif raw < low or (high is not None and raw > high):
        ctx.add(
            where, f"must be between {low} and {high}" if high else f"must be at least {low}", raw
        )
    else:
        return raw
    return None


def _bool(ctx: _Ctx, where: str, raw: Any) -> bool | None:
    if isinstance(raw, bool):
        return raw
    ctx.add(where, "must be true or false", raw)
    return None


def _str(ctx: _Ctx, where: str, raw: Any) -> str | None:
    if isinstance(raw, str) and raw.strip():
        return raw.strip()
    ctx.add(where, "must be a non-empty string", raw)
    return None


def _duration(ctx: _Ctx, where: str, raw: Any, allow_zero: bool = False) -> float | None:
    try:
        seconds = units.parse_duration(raw)
    except ValueError as exc:
        ctx.add(where, str(exc), raw)
        return None
    if seconds == 0 and not allow_zero:
        ctx.add(where, "must be longer than zero", raw)
        return None
    return seconds


def _size(ctx: _Ctx, where: str, raw: Any) -> int | None:
    try:
        size = units.parse_size(raw)
    except ValueError as exc:
        ctx.add(where, str(exc), raw)
        return None
    if size == 0:
        ctx.add(where, "must be larger than zero", raw)
        return None
    return size


def _list(ctx: _Ctx, where: str, raw: Any, nonempty: bool = False) -> list[Any] | None:
    if not isinstance(raw, list):
        ctx.add(where, "must be a list", raw)
        return None
    if nonempty and not raw:
        ctx.add(where, "must list at least one entry", raw)
        return None
    return raw


def is_dns_name(name: str) -> bool:
    """RFC 1035 section 2.3.1 host name (letters, digits, hyphens), not an IP literal."""
    name = name[:-1] if name.endswith(".") else name
    if not name or len(name) > 253 or name.replace(".", "").isdigit():
        return False
    return all(_LABEL.fullmatch(label) for label in name.split("."))


def _file(ctx: _Ctx, where: str, raw: Any) -> Path | None:
    """A path that must name a readable file."""
    text = _str(ctx, where, raw)
    if text is None:
        return None
    path = ctx.path(text)
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        ctx.add(where, f"file is unreadable: {exc.strerror or exc}", raw)
        return None
    return path


def _tls_version(ctx: _Ctx, where: str, raw: Any) -> ssl.TLSVersion | None:
    if isinstance(raw, str) and raw in _TLS_VERSIONS:
        return _TLS_VERSIONS[raw]
    if isinstance(raw, str) and raw in _OLD_TLS:
        ctx.add(where, "versions below TLSv1.2 are not allowed (RFC 8996)", raw)
    else:
        ctx.add(where, "must be 'TLSv1.2' or 'TLSv1.3'", raw)
    return None


# --- addresses --------------------------------------------------------------


def _split_hostport(text: str) -> tuple[str, str, bool] | None:
    """'[h]:p' or 'h:p' -> (host, port text, bracketed); None if not of that shape."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            return None
        return host, rest[1:], True
    host, sep, port = text.rpartition(":")
    if not sep or ":" in host:
        return None
    return host, port, False


def _port(text: str) -> int | None:
    if text.isdigit() and 1 <= int(text) <= 65535:
        return int(text)
    return None


def _bind_address(ctx: _Ctx, where: str, raw: Any) -> tuple[str, int] | None:
    """Listener/metrics address: IP literal or localhost, with a port; [v6]:port form."""
    shape = "must be HOST:PORT with an IP address or localhost, and '[::1]:587' for IPv6"
    parts = _split_hostport(raw) if isinstance(raw, str) else None
    if parts is None:
        ctx.add(where, shape, raw)
        return None
    host, port_text, bracketed = parts
    port = _port(port_text)
    if port is None:
        ctx.add(where, "port must be a number from 1 to 65535", raw)
    try:
        ip = ipaddress.ip_address(host)
        if (ip.version == 6) != bracketed:
            ctx.add(where, shape, raw)
            return None
    except ValueError:
        if host != "localhost" or bracketed:
            ctx.add(where, shape, raw)
            return None
    return (host, port) if port is not None else None


def _via(ctx: _Ctx, where: str, raw: Any) -> tuple[str, int] | None:
    """Route next hop: '[host]:port' (no MX lookup) or 'host:port'."""
    parts = _split_hostport(raw) if isinstance(raw, str) else None
    port = _port(parts[1]) if parts else None
    if parts is None or port is None or not _route_host_ok(parts[0], parts[2]):
        ctx.add(where, "must be '[host]:port' or 'host:port' with a port from 1 to 65535", raw)
        return None
    return parts[0].lower(), port


def _route_host_ok(host: str, bracketed: bool) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return is_dns_name(host)
    return bracketed or ip.version == 4


def _network(ctx: _Ctx, where: str, raw: Any) -> IPNetwork | None:
    text = raw if isinstance(raw, str) else ""
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        pass
    try:
        fixed = ipaddress.ip_network(text, strict=False)
    except ValueError:
        ctx.add(where, "must be a network in CIDR form such as 10.0.0.0/8 or ::1/128", raw)
        return None
    ctx.add(where, f"host bits are set; did you mean {fixed}?", raw)
    return None


# --- sections ---------------------------------------------------------------


def _listeners(ctx: _Ctx, raw: Any) -> tuple[Listener, ...]:
    items = _list(ctx, "listeners", raw, nonempty=True) or []
    seen: dict[tuple[str, int], int] = {}
    result: list[Listener] = []
    for i, item in enumerate(items):
        where = f"listeners[{i}]"
        data = _mapping(ctx, where, item, ("address", "tls"), required=("address",))
        if data is None:
            continue
        addr = (
            _bind_address(ctx, f"{where}.address", data["address"]) if "address" in data else None
        )
        tls = _listener_tls(ctx, f"{where}.tls", data.get("tls", _MISSING))
        if addr in seen:
            ctx.add(f"{where}.address", f"duplicate of listeners[{seen[addr]}]", data["address"])
        elif addr is not None:
            seen[addr] = i
        if addr is not None and tls is not None:
            result.append(Listener(addr[0], addr[1], tls))
    return tuple(result)


def _listener_tls(ctx: _Ctx, where: str, raw: Any) -> ListenerTls | None:
    if raw is _MISSING:
        ctx.add(where, "required key is missing; every listener needs TLS: starttls or implicit")
        return None
    try:
        return ListenerTls(raw)
    except ValueError:
        ctx.add(where, "must be 'starttls' or 'implicit'", raw)
        return None


def _server_tls(ctx: _Ctx, raw: Any) -> ServerTls | None:
    data = _mapping(ctx, "tls", raw, ("cert", "key", "min_version"), ("cert", "key"))
    if data is None:
        return None
    cert = _str(ctx, "tls.cert", data["cert"]) if "cert" in data else None
    key = _str(ctx, "tls.key", data["key"]) if "key" in data else None
    version = _tls_version(ctx, "tls.min_version", data.get("min_version", "TLSv1.2"))
    if cert is None or key is None:
        return None
    cert_path, key_path = ctx.path(cert), ctx.path(key)
    for which, problem in certs.pair_problems(cert_path, key_path):
        ctx.add(f"tls.{which}", problem, data[which])
    if version is None:
        return None
    return ServerTls(cert=cert_path, key=key_path, min_version=version)


def _clients(ctx: _Ctx, raw: Any) -> Clients:
    data = _mapping(ctx, "clients", raw, ("networks", "users_file")) or {}
    networks: list[IPNetwork] = []
    for i, item in enumerate(_list(ctx, "clients.networks", data.get("networks", [])) or []):
        net = _network(ctx, f"clients.networks[{i}]", item)
        if net is not None:
            networks.append(net)
    users_file = None
    if "users_file" in data:
        users_file = _file(ctx, "clients.users_file", data["users_file"])
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


def _limits(ctx: _Ctx, raw: Any) -> Limits:
    known = ("max_message_size", *_LIMIT_INTS, *_LIMIT_DURATIONS)
    data = _mapping(ctx, "limits", raw, known) or {}
    kwargs: dict[str, Any] = {}
    if "max_message_size" in data:
        kwargs["max_message_size"] = _size(ctx, "limits.max_message_size", data["max_message_size"])
    for key in _LIMIT_INTS:
        if key in data:
            kwargs[key] = _int(ctx, f"limits.{key}", data[key])
    for key in _LIMIT_DURATIONS:
        if key in data:
            kwargs[key] = _duration(ctx, f"limits.{key}", data[key])
    limits = Limits(**{k: v for k, v in kwargs.items() if v is not None})
    if limits.max_connections_per_ip > limits.max_connections:
        where = "limits.max_connections_per_ip"
        ctx.add(where, "must not exceed limits.max_connections", limits.max_connections_per_ip)
    return limits


def _spool(ctx: _Ctx, raw: Any) -> SpoolConfig | None:
    data = _mapping(ctx, "spool", raw, ("path",), required=("path",))
    text = _str(ctx, "spool.path", data["path"]) if data and "path" in data else None
    return SpoolConfig(path=ctx.path(text)) if text else None


def _queue(ctx: _Ctx, raw: Any) -> QueueConfig:
    known = ("retry", "max_lifetime", "delay_warning", "shutdown_grace")
    data = _mapping(ctx, "queue", raw, known) or {}
    kwargs: dict[str, Any] = {}
    if "retry" in data:
        steps = _list(ctx, "queue.retry", data["retry"], nonempty=True)
        parsed = [_duration(ctx, f"queue.retry[{i}]", v) for i, v in enumerate(steps or [])]
        if steps and None not in parsed:
            kwargs["retry"] = tuple(p for p in parsed if p is not None)
    for key in ("max_lifetime", "delay_warning"):
        if key in data:
            kwargs[key] = _duration(ctx, f"queue.{key}", data[key])
    if "shutdown_grace" in data:
        kwargs["shutdown_grace"] = _duration(
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


def _delivery(ctx: _Ctx, raw: Any) -> DeliveryConfig:
    known = ("port", "resolver", "routes", "connection_reuse", "ca_file")
    data = _mapping(ctx, "delivery", raw, (*known, *_DELIVERY_INTS, *_DELIVERY_DURATIONS)) or {}
    kwargs: dict[str, Any] = {}
    if "port" in data:
        kwargs["port"] = _int(ctx, "delivery.port", data["port"], 1, 65535)
    for key in _DELIVERY_INTS:
        if key in data:
            kwargs[key] = _int(ctx, f"delivery.{key}", data[key])
    for key in _DELIVERY_DURATIONS:
        if key in data:
            kwargs[key] = _duration(ctx, f"delivery.{key}", data[key])
    if "connection_reuse" in data:
        kwargs["connection_reuse"] = _bool(
            ctx, "delivery.connection_reuse", data["connection_reuse"]
        )
    if "ca_file" in data:
        kwargs["ca_file"] = _file(ctx, "delivery.ca_file", data["ca_file"])
    if "resolver" in data:
        kwargs["resolver"] = _resolver(ctx, data["resolver"])
    if "routes" in data:
        kwargs["routes"] = _routes(ctx, data["routes"])
    return DeliveryConfig(**{k: v for k, v in kwargs.items() if v is not None})


def _resolver(ctx: _Ctx, raw: Any) -> ResolverConfig | None:
    where = "delivery.resolver"
    data = _mapping(ctx, where, raw, ("nameservers", "port", "timeout"), ("nameservers",))
    if data is None or "nameservers" not in data:
        return None
    servers: list[str] = []
    for i, item in enumerate(_list(ctx, f"{where}.nameservers", data["nameservers"], True) or []):
        try:
            servers.append(str(ipaddress.ip_address(item)))
        except ValueError:
            ctx.add(f"{where}.nameservers[{i}]", "must be an IP address", item)
    port = _int(ctx, f"{where}.port", data["port"], 1, 65535) if "port" in data else 53
    timeout = _duration(ctx, f"{where}.timeout", data["timeout"]) if "timeout" in data else 5.0
    if not servers or port is None or timeout is None:
        return None
    return ResolverConfig(nameservers=tuple(servers), port=port, timeout=timeout)


def _routes(ctx: _Ctx, raw: Any) -> tuple[Route, ...]:
    result: list[Route] = []
    for i, item in enumerate(_list(ctx, "delivery.routes", raw) or []):
        route = _route(ctx, f"delivery.routes[{i}]", item)
        if route is not None:
            result.append(route)
    return tuple(result)


def _route(ctx: _Ctx, where: str, raw: Any) -> Route | None:
    data = _mapping(ctx, where, raw, ("domains", "via", "tls", "auth"), ("domains", "via"))
    if data is None or "domains" not in data or "via" not in data:
        return None
    domains = _domain_list(ctx, f"{where}.domains", data["domains"], nonempty=True)
    via = _via(ctx, f"{where}.via", data["via"])
    tls = _listener_tls(ctx, f"{where}.tls", data["tls"]) if "tls" in data else ListenerTls.STARTTLS
    auth = _route_auth(ctx, f"{where}.auth", data["auth"]) if "auth" in data else None
    if domains is None or via is None or tls is None or ("auth" in data and auth is None):
        return None
    return Route(domains, via[0], via[1], implicit_tls=tls is ListenerTls.IMPLICIT, auth=auth)


def _route_auth(ctx: _Ctx, where: str, raw: Any) -> RouteAuth | None:
    data = _mapping(ctx, where, raw, ("username", "password"), ("username", "password"))
    if data is None or "username" not in data or "password" not in data:
        return None
    user = _str(ctx, f"{where}.username", data["username"])
    password = data["password"]
    if not isinstance(password, str) or not password:
        ctx.add(f"{where}.password", "must be a non-empty string")  # never echo a secret
        return None
    return RouteAuth(user, password) if user else None


def _domain_list(ctx: _Ctx, where: str, raw: Any, nonempty: bool = False) -> tuple[str, ...] | None:
    """Lower-cased domain names; a leading '.' means any subdomain."""
    items = _list(ctx, where, raw, nonempty)
    if items is None:
        return None
    result: list[str] = []
    for i, item in enumerate(items):
        name = item.lower().rstrip(".") if isinstance(item, str) else ""
        if not is_dns_name(name.removeprefix(".")):
            ctx.add(
                f"{where}[{i}]", "must be a domain name such as example.com or .example.com", item
            )
        else:
            result.append(name)
    return tuple(result) if len(result) == len(items) else None


def _metrics(ctx: _Ctx, raw: Any) -> MetricsConfig | None:
    data = _mapping(ctx, "metrics", raw, ("address",), ("address",))
    if not data or "address" not in data:
        return None
    addr = _bind_address(ctx, "metrics.address", data["address"])
    return MetricsConfig(addr[0], addr[1]) if addr else None


def _hostname(ctx: _Ctx, raw: Any) -> str:
    if raw is _MISSING:
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


def _log_level(ctx: _Ctx, raw: Any) -> str:
    if isinstance(raw, str) and raw.upper() in _LOG_LEVELS:
        return raw.upper()
    ctx.add("log_level", f"must be one of {', '.join(_LOG_LEVELS)}", raw)
    return "INFO"


# --- TLS policy (config/tls-policy.yaml or inline `policy:`) -----------------


def _level(ctx: _Ctx, where: str, raw: Any) -> TlsLevel | None:
    text = raw.lower() if isinstance(raw, str) else raw
    if text in _LEVELS:
        return _LEVELS[text]
    if text in ("none", "may") or raw is False:
        ctx.add(where, _PLAINTEXT_MSG, raw)
    elif text in ("dane", "dane-only"):
        ctx.add(where, _DANE_MSG, raw)
    else:
        ctx.add(where, "must be encrypt, verify or secure", raw)
    return None


def _domain_policy(
    ctx: _Ctx, where: str, raw: Any, base: DomainPolicy, allow_match: bool
) -> DomainPolicy | None:
    known = ("level", "min_version", "match") if allow_match else ("level", "min_version")
    data = _mapping(ctx, where, raw, known)
    if data is None:
        return None
    level = _level(ctx, f"{where}.level", raw.get("level")) if "level" in raw else base.level
    version = base.min_version
    if "min_version" in data:
        version = _tls_version(ctx, f"{where}.min_version", data["min_version"]) or version
    match = _domain_list(ctx, f"{where}.match", data["match"]) if "match" in data else ()
    if level is None or match is None:
        return None
    return DomainPolicy(level=level, min_version=version, match=match)


def _policy_domains(ctx: _Ctx, where: str, raw: Any, base: DomainPolicy) -> dict[str, DomainPolicy]:
    if not isinstance(raw, Mapping):
        ctx.add(where, "must be a mapping of domain names to policies", raw)
        return {}
    result: dict[str, DomainPolicy] = {}
    for key, value in raw.items():
        here = _keyed(where, str(key))
        name = key.lower().rstrip(".") if isinstance(key, str) else ""
        if not is_dns_name(name):
            ctx.add(here, "must be a domain name such as example.com", key)
            continue
        if name in result:
            ctx.add(here, "the same domain appears twice (domain names are case-insensitive)", key)
            continue
        policy = _domain_policy(ctx, here, value, base, allow_match=True)
        if policy is not None:
            result[name] = policy
    return result


def _policy_body(ctx: _Ctx, where: str, raw: Any, source: Path | None) -> PolicyConfig:
    known = ("default", "mta_sts", "dane", "domains")
    data = _mapping(ctx, where, raw, known) or {}
    default = DomainPolicy()
    if "default" in data:
        default = (
            _domain_policy(ctx, _join(where, "default"), data["default"], default, False) or default
        )
    flags = {k: _bool(ctx, _join(where, k), data[k]) for k in ("mta_sts", "dane") if k in data}
    domains = _policy_domains(ctx, _join(where, "domains"), data.get("domains", {}), default)
    return PolicyConfig(
        default=default,
        mta_sts=flags.get("mta_sts") is not False,
        dane=flags.get("dane") is not False,
        domains=MappingProxyType(domains),
        source=source,
    )


def _policy(ctx: _Ctx, raw: Any) -> PolicyConfig:
    """`policy:` is a file path relative to the config file, or an inline mapping."""
    if isinstance(raw, Mapping):
        return _policy_body(ctx, "policy", raw, None)
    text = _str(ctx, "policy", raw)
    if text is None:
        return PolicyConfig()
    shown = str(Path(ctx.file).parent / text) if not Path(text).is_absolute() else text
    sub = _Ctx(shown, ctx.path(text).parent, ctx.problems)
    doc = _read_yaml(sub, ctx.path(text), where="policy", got=raw, parent=ctx)
    return _policy_body(sub, "", doc, ctx.path(text)) if doc is not _MISSING else PolicyConfig()


def load_policy(path: Path) -> PolicyConfig:
    """Load a standalone TLS policy file; ConfigError with every problem."""
    ctx = _Ctx(str(path), path.expanduser().resolve().parent, [])
    doc = _read_yaml(ctx, path)
    policy = _policy_body(ctx, "", {} if doc is _MISSING else doc, path.resolve())
    if ctx.problems:
        raise ConfigError(ctx.problems)
    return policy


# --- files ------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of silently keeping the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(
    ctx: _Ctx, path: Path, where: str = "", got: Any = _MISSING, parent: _Ctx | None = None
) -> Any:
    """Parse one YAML file; on failure record a problem and return _MISSING."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        (parent or ctx).add(where, f"cannot read file {str(path)!r}: {reason}", got)
        return _MISSING
    try:
        doc = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        ctx.add("", f"{at}not valid YAML: {problem}")
        return _MISSING
    return {} if doc is None else doc


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
)


def _config_ctx(path: Path) -> _Ctx:
    return _Ctx(str(path), path.expanduser().resolve().parent, [])


def load(path: Path) -> Config:
    """Read *path* once and validate everything; ConfigError lists every problem."""
    ctx = _config_ctx(path)
    doc = _read_yaml(ctx, path)
    if doc is _MISSING:
        raise ConfigError(ctx.problems)
    data = _mapping(ctx, "", doc, _TOP_KEYS, required=("listeners", "tls", "spool"))
    if data is None:
        raise ConfigError(ctx.problems)
    cfg = _build(ctx, data, path)
    if ctx.problems or cfg is None:
        raise ConfigError(ctx.problems)
    return cfg


def _build(ctx: _Ctx, data: dict[str, Any], path: Path) -> Config | None:
    hostname = _hostname(ctx, data.get("hostname", _MISSING))
    listeners = _listeners(ctx, data["listeners"]) if "listeners" in data else ()
    tls = _server_tls(ctx, data["tls"]) if "tls" in data else None
    clients = _clients(ctx, data.get("clients", {}))
    limits = _limits(ctx, data.get("limits", {}))
    spool = _spool(ctx, data["spool"]) if "spool" in data else None
    queue = _queue(ctx, data.get("queue", {}))
    delivery = _delivery(ctx, data.get("delivery", {}))
    policy = _policy(ctx, data["policy"]) if "policy" in data else PolicyConfig()
    metrics = _metrics(ctx, data["metrics"]) if "metrics" in data else None
    log_level = _log_level(ctx, data["log_level"]) if "log_level" in data else "INFO"
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
    )


def load_users_file_path(path: Path) -> Path:
    """Only `clients.users_file` (absolute), for `tls-relay passwd`; the file may not exist yet."""
    ctx = _config_ctx(path)
    doc = _read_yaml(ctx, path)
    clients = doc.get("clients") if isinstance(doc, Mapping) else None
    raw = clients.get("users_file") if isinstance(clients, Mapping) else None
    if doc is not _MISSING and raw is None:
        ctx.add("clients.users_file", "required key is missing; passwd needs a users file")
    elif isinstance(raw, str) and raw.strip():
        return ctx.path(raw.strip())
    elif doc is not _MISSING:
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
