"""Loading relay.yaml: read once, validate once, into :mod:`relay.config.model` objects.

Role: the entry points that turn ``config/relay.yaml`` (and the TLS policy it names)
into a :class:`~relay.config.model.Config`, or raise :class:`relay.errors.ConfigError`
listing *every* problem as ``FILE: key.path: problem (got VALUE)``.  This module knows
the sections and keys of relay.yaml; generic value checks and YAML reading live in
:mod:`relay.config.checks`, the TLS policy section in :mod:`relay.config.policy`.
Not: opening sockets, reading users, or deciding TLS verdicts at delivery time.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from relay import certs
from relay.config import checks as check
from relay.config import delivery as delivery_section
from relay.config import evidence as evidence_section
from relay.config import policy as policy_section
from relay.config import units
from relay.config.model import (
    Clients,
    Config,
    DeliveryConfig,
    IPNetwork,
    Limits,
    ListenerConfig,
    ListenerTls,
    MetricsConfig,
    PolicyConfig,
    QueueConfig,
    ServerTls,
    SpoolConfig,
    TlsLevel,
)
from relay.domains import Domain, is_dns_name
from relay.errors import ConfigError
from relay.intake import users

# ---------------------------------------------------------------------------
# Sections of relay.yaml.  Each parser takes a check.Ctx (file name for messages,
# directory for relative paths, the shared problem list; see relay.config.checks)
# and the raw YAML value; it records problems and returns a value, or None when
# it cannot.  The `policy:` section is parsed by relay.config.policy, the `delivery:`
# section by relay.config.delivery.
# ---------------------------------------------------------------------------

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _listeners(ctx: check.Ctx, raw: Any) -> tuple[ListenerConfig, ...]:
    items = check.entries(ctx, "listeners", raw, nonempty=True) or []
    seen: dict[tuple[str, int], int] = {}
    result: list[ListenerConfig] = []
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
            result.append(ListenerConfig(addr[0], addr[1], tls))
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
    known = ("cert", "key", "min_version", "rsa_cert", "rsa_key")
    data = check.mapping(ctx, "tls", raw, known, ("cert", "key"))
    if data is None:
        return None
    version = check.tls_version(ctx, "tls.min_version", data.get("min_version", "TLSv1.2"))
    main = _tls_pair(ctx, data, "cert", "key")
    rsa = _tls_pair(ctx, data, "rsa_cert", "rsa_key") if _rsa_keys(ctx, data) else None
    if main is not None and rsa is not None:
        _check_key_types(ctx, data, main[0], rsa[0])
    if main is None or version is None:
        return None
    rsa_cert, rsa_key = rsa if rsa is not None else (None, None)
    return ServerTls(main[0], main[1], version, rsa_cert, rsa_key)


def _rsa_keys(ctx: check.Ctx, data: Mapping[str, Any]) -> bool:
    """tls.rsa_cert and tls.rsa_key come together; True when both are there."""
    given = [k for k in ("rsa_cert", "rsa_key") if k in data]
    if len(given) == 1:
        other = "rsa_key" if given[0] == "rsa_cert" else "rsa_cert"
        ctx.add(f"tls.{other}", f"required with tls.{given[0]}", check.MISSING)
    return len(given) == 2


def _tls_pair(
    ctx: check.Ctx, data: Mapping[str, Any], cert_key: str, key_key: str
) -> tuple[Path, Path] | None:
    cert = check.string(ctx, f"tls.{cert_key}", data[cert_key]) if cert_key in data else None
    key = check.string(ctx, f"tls.{key_key}", data[key_key]) if key_key in data else None
    if cert is None or key is None:
        return None
    cert_path, key_path = ctx.path(cert), ctx.path(key)
    names = {"cert": cert_key, "key": key_key}
    problems = certs.pair_problems(cert_path, key_path)
    for which, problem in problems:
        ctx.add(f"tls.{names[which]}", problem, data[names[which]])
    return None if problems else (cert_path, key_path)


def _check_key_types(ctx: check.Ctx, data: Mapping[str, Any], main: Path, rsa: Path) -> None:
    """OpenSSL keeps one certificate per key type: the RSA pair must be RSA, and the
    first one something else, or one would silently replace the other."""
    if certs.key_kind(rsa) != "RSA":
        ctx.add(
            "tls.rsa_cert",
            f"must hold an RSA key (it holds {certs.key_kind(rsa)})",
            data["rsa_cert"],
        )
    elif certs.key_kind(main) == "RSA":
        ctx.add(
            "tls.cert",
            "is an RSA certificate too; with tls.rsa_cert it must be ECDSA (one per key type)",
            data["cert"],
        )


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


def _workers(ctx: check.Ctx, raw: Any) -> int | None:
    """``workers``: how many ``serve`` processes share the listeners and the spool."""
    if raw == "auto":
        value: int | None = None
    elif isinstance(raw, int) and not isinstance(raw, bool) and 1 <= raw <= MAX_WORKERS:
        value = raw
    else:
        ctx.add("workers", f'must be "auto" or a whole number from 1 to {MAX_WORKERS}', raw)
        return 1
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
    "audit",
    "tls_reports",
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

    hostname = _hostname(ctx, data.get("hostname", check.MISSING))
    listeners = _listeners(ctx, data["listeners"]) if "listeners" in data else ()
    tls = _server_tls(ctx, data["tls"]) if "tls" in data else None
    clients = _clients(ctx, data.get("clients", {}))
    limits = _limits(ctx, data.get("limits", {}))
    spool = _spool(ctx, data["spool"]) if "spool" in data else None
    queue = _queue(ctx, data.get("queue", {}))
    delivery = delivery_section.section(ctx, data.get("delivery", {}))
    policy = policy_section.section(ctx, data["policy"]) if "policy" in data else PolicyConfig()
    metrics = _metrics(ctx, data["metrics"]) if "metrics" in data else None
    audit = evidence_section.audit(ctx, data.get("audit", {}), spool.path if spool else None)
    reports = (
        evidence_section.tls_reports(ctx, data["tls_reports"]) if "tls_reports" in data else None
    )
    log_level = _log_level(ctx, data["log_level"]) if "log_level" in data else "INFO"
    workers = _workers(ctx, data["workers"]) if "workers" in data else 1
    _route_auth_levels(ctx, delivery, policy)
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
        audit=audit,
        tls_reports=reports,
        log_level=log_level,
        workers=workers,
    )


def _route_auth_levels(ctx: check.Ctx, delivery: DeliveryConfig, policy: PolicyConfig) -> None:
    """A route that logs in must only ever meet an authenticated next hop: under
    `encrypt` anyone in the path could present a certificate and collect the password
    (Postfix's smtp_sasl_tls_security_options has the same concern)."""
    for i, route in enumerate(delivery.routes):
        if route.auth is None:
            continue
        for name, level in _levels_for(route.domains, policy):
            if level < TlsLevel.VERIFY:
                ctx.add(
                    f"delivery.routes[{i}].auth",
                    f"sends a password, so mail for {name} must need TLS level verify or "
                    f"secure (its policy says {level.label}); set it in the policy",
                )
                break


def _levels_for(entries: tuple[str, ...], policy: PolicyConfig) -> list[tuple[str, TlsLevel]]:
    """The configured level of each domain a route's entries cover (a ".suffix" entry:
    the default for its subdomains, and every policy domain under it)."""
    found: list[tuple[str, TlsLevel]] = []
    for entry in entries:
        if not entry.startswith("."):
            found.append((entry, policy.for_domain(Domain(entry))[0].level))
            continue
        found.append((f"*{entry}", policy.default.level))
        found += [(d, p.level) for d, p in policy.domains.items() if d.endswith(entry)]
    return found


def load_policy(path: Path) -> PolicyConfig:
    """Load a standalone TLS policy file; ConfigError with every problem."""

    return policy_section.load(path)


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
