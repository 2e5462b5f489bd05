"""Generic checkers for configuration files: the problem collector and typed field checks.

Role: the building blocks ``relay.config.load`` and ``relay.config.policy`` use to validate
YAML values. :class:`Ctx` collects problems as ``FILE: key.path: problem (got VALUE)``;
each checker takes a ``Ctx``, the key path and the raw value, records what is wrong
and returns the parsed value or ``None``. :func:`read_yaml` reads one file, refusing
duplicate keys. Everything here is about shapes of values (mappings, numbers,
durations, sizes, addresses, networks, domain names, readable files, TLS versions).
Not: knowing which sections or keys a relay config has, building ``Config`` objects,
or raising ``ConfigError`` (callers decide when the collected problems are fatal).
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import ssl
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from relay.config import units
from relay.domains import Domain, is_dns_name, normalize_domain
from relay.errors import InvalidDomain

MISSING: Any = object()  # "no value": key absent, file unreadable, nothing to show
_TLS_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
_OLD_TLS = {"SSLv2", "SSLv3", "TLSv1", "TLSv1.0", "TLSv1.1"}


@dataclass
class Ctx:
    """Problems found in one file, and the directory its relative paths start from."""

    file: str  # as shown in messages
    base: Path  # directory that relative paths are relative to (absolute)
    problems: list[str]

    def add(self, where: str, problem: str, got: Any = MISSING) -> None:
        line = f"{self.file}: {where}: {problem}" if where else f"{self.file}: {problem}"
        self.problems.append(line if got is MISSING else f"{line} (got {_show(got)})")

    def path(self, raw: str) -> Path:
        return (self.base / Path(raw).expanduser()).resolve()


def _show(value: Any) -> str:
    return repr(value) if not isinstance(value, Path) else repr(str(value))


def join(where: str, key: str) -> str:
    """Key path of *key* under *where*: ``limits`` + ``max_commands``."""
    return f"{where}.{key}" if where else key


def keyed(where: str, key: str) -> str:
    """Key path of a mapping entry: ``policy.domains["example.com"]``."""
    return f"{where}[{json.dumps(key)}]"


def mapping(
    ctx: Ctx, where: str, raw: Any, known: Sequence[str], required: Sequence[str] = ()
) -> dict[str, Any] | None:
    """A mapping with only *known* keys and all *required* ones, else problems."""
    if not isinstance(raw, Mapping):
        ctx.add(where, "must be a mapping of keys to values", raw)
        return None
    for key in raw:
        if key not in known:
            hint = difflib.get_close_matches(str(key), known, n=1)
            tip = f"; did you mean {hint[0]!r}?" if hint else f"; known keys: {', '.join(known)}"
            ctx.add(join(where, str(key)), f"unknown key{tip}")
    for key in required:
        if raw.get(key) is None:
            ctx.add(join(where, key), "required key is missing")
    return {str(k): v for k, v in raw.items() if k in known and v is not None}


def integer(ctx: Ctx, where: str, raw: Any, low: int = 1, high: int | None = None) -> int | None:
    if isinstance(raw, bool) or not isinstance(raw, int):
        ctx.add(where, "must be a whole number", raw)
    elif raw < low or (high is not None and raw > high):
        ctx.add(
            where, f"must be between {low} and {high}" if high else f"must be at least {low}", raw
        )
    else:
        return raw
    return None


def boolean(ctx: Ctx, where: str, raw: Any) -> bool | None:
    if isinstance(raw, bool):
        return raw
    ctx.add(where, "must be true or false", raw)
    return None


def string(ctx: Ctx, where: str, raw: Any) -> str | None:
    if isinstance(raw, str) and raw.strip():
        return raw.strip()
    ctx.add(where, "must be a non-empty string", raw)
    return None


def duration(ctx: Ctx, where: str, raw: Any, allow_zero: bool = False) -> float | None:
    try:
        seconds = units.parse_duration(raw)
    except ValueError as exc:
        ctx.add(where, str(exc), raw)
        return None
    if seconds == 0 and not allow_zero:
        ctx.add(where, "must be longer than zero", raw)
        return None
    return seconds


def size(ctx: Ctx, where: str, raw: Any) -> int | None:
    try:
        size = units.parse_size(raw)
    except ValueError as exc:
        ctx.add(where, str(exc), raw)
        return None
    if size == 0:
        ctx.add(where, "must be larger than zero", raw)
        return None
    return size


def entries(ctx: Ctx, where: str, raw: Any, nonempty: bool = False) -> list[Any] | None:
    if not isinstance(raw, list):
        ctx.add(where, "must be a list", raw)
        return None
    if nonempty and not raw:
        ctx.add(where, "must list at least one entry", raw)
        return None
    return raw


def readable_file(ctx: Ctx, where: str, raw: Any) -> Path | None:
    """A path that must name a readable file."""
    text = string(ctx, where, raw)
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


def tls_version(ctx: Ctx, where: str, raw: Any) -> ssl.TLSVersion | None:
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


def bind_address(ctx: Ctx, where: str, raw: Any) -> tuple[str, int] | None:
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
        unbindable = _unbindable(ip)
        if unbindable:
            ctx.add(where, unbindable, raw)
            return None
    except ValueError:
        if host != "localhost" or bracketed:
            ctx.add(where, shape, raw)
            return None
    return (host, port) if port is not None else None


def _unbindable(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``serve`` could never listen on *ip*, found now rather than at start."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return f"an IPv4-mapped IPv6 address cannot be bound; write {ip.ipv4_mapped}"
    if ip.is_multicast:
        return "a multicast address cannot accept connections"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_link_local:
        return "a link-local IPv6 address needs an interface; use :: or a global address"
    return None


def via(ctx: Ctx, where: str, raw: Any) -> tuple[str, int] | None:
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


def network(ctx: Ctx, where: str, raw: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
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


def domain_list(ctx: Ctx, where: str, raw: Any, nonempty: bool = False) -> tuple[str, ...] | None:
    """Domain names in their normal form (relay.domains, so ``bücher.test`` is
    ``xn--bcher-kva.test``); a leading '.' means any subdomain."""
    items = entries(ctx, where, raw, nonempty)
    if items is None:
        return None
    result: list[str] = []
    for i, item in enumerate(items):
        dot = "." if isinstance(item, str) and item.startswith(".") else ""
        name = domain(item.removeprefix(".") if isinstance(item, str) else item)
        if name is None:
            ctx.add(
                f"{where}[{i}]", "must be a domain name such as example.com or .example.com", item
            )
        else:
            result.append(dot + name)
    return tuple(result) if len(result) == len(items) else None


def domain(raw: Any) -> Domain | None:
    """*raw* as a Domain (IDNA A-labels, lower case), or None if it is not one."""
    if not isinstance(raw, str):
        return None
    try:
        name = normalize_domain(raw)
    except InvalidDomain:
        return None
    return name if is_dns_name(name) else None


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


def read_yaml(
    ctx: Ctx, path: Path, where: str = "", got: Any = MISSING, parent: Ctx | None = None
) -> Any:
    """Parse one YAML file; on failure record a problem and return MISSING."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        (parent or ctx).add(where, f"cannot read file {str(path)!r}: {reason}", got)
        return MISSING
    try:
        doc = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        ctx.add("", f"{at}not valid YAML: {problem}")
        return MISSING
    return {} if doc is None else doc
