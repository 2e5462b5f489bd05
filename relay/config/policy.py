"""TLS policy settings: `policy:` inline in relay.yaml, or a policy file it names.

Role: validate the static outbound TLS policy (default level and minimum TLS version,
per-domain overrides with extra `match` names, MTA-STS/DANE switches) into a
:class:`relay.config.model.PolicyConfig`. Plaintext levels are refused with a sentence
saying why.
Not: deciding verdicts at delivery time (``relay.tlspolicy.verdict``), fetching MTA-STS
policies or TLSA records, or parsing the rest of relay.yaml (``relay.config.load``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from relay.config import checks as check
from relay.config.model import DomainPolicy, PolicyConfig, TlsLevel
from relay.domains import Domain
from relay.errors import ConfigError

_LEVELS = {
    "encrypt": TlsLevel.ENCRYPT,
    "verify": TlsLevel.VERIFY,
    "secure": TlsLevel.SECURE,
    "dane-only": TlsLevel.DANE_ONLY,
}
_PLAINTEXT_MSG = "plaintext is never allowed; use encrypt, verify, secure or dane-only"
_DANE_MSG = (
    "there is no level dane: with `dane: true` DANE applies at every level wherever an MX "
    "host publishes TLSA records; use dane-only to require it"
)


def _level(ctx: check.Ctx, where: str, raw: Any) -> TlsLevel | None:
    text = raw.lower() if isinstance(raw, str) else raw
    if text in _LEVELS:
        return _LEVELS[text]
    if text in ("none", "may") or raw is False:
        ctx.add(where, _PLAINTEXT_MSG, raw)
    elif text == "dane":
        ctx.add(where, _DANE_MSG, raw)
    else:
        ctx.add(where, "must be encrypt, verify, secure or dane-only", raw)
    return None


def _domain_policy(
    ctx: check.Ctx, where: str, raw: Any, base: DomainPolicy, allow_match: bool
) -> DomainPolicy | None:
    known = ("level", "min_version", "match") if allow_match else ("level", "min_version")
    data = check.mapping(ctx, where, raw, known)
    if data is None:
        return None
    level = _level(ctx, f"{where}.level", raw.get("level")) if "level" in raw else base.level
    version = base.min_version
    if "min_version" in data:
        version = check.tls_version(ctx, f"{where}.min_version", data["min_version"]) or version
    match = check.domain_list(ctx, f"{where}.match", data["match"]) if "match" in data else ()
    if level is None or match is None:
        return None
    return DomainPolicy(level=level, min_version=version, match=match)


def _policy_domains(
    ctx: check.Ctx, where: str, raw: Any, base: DomainPolicy
) -> dict[Domain, DomainPolicy]:
    if not isinstance(raw, Mapping):
        ctx.add(where, "must be a mapping of domain names to policies", raw)
        return {}
    result: dict[Domain, DomainPolicy] = {}
    written: dict[Domain, str] = {}  # how the first key for each domain was spelt
    for key, value in raw.items():
        here = check.keyed(where, str(key))
        name = check.domain(key)  # U-label or A-label, any case: one key (relay.domains)
        if name is None:
            ctx.add(here, "must be a domain name such as example.com", key)
            continue
        if name in written:
            first = check.keyed(where, written[name])
            ctx.add(here, f"the same domain as {first} (both are {name})", key)
            continue
        written[name] = str(key)
        policy = _domain_policy(ctx, here, value, base, allow_match=True)
        if policy is not None:
            result[name] = policy
    return result


def _policy_body(ctx: check.Ctx, where: str, raw: Any, source: Path | None) -> PolicyConfig:
    known = ("default", "mta_sts", "dane", "honor_tls_required_no", "domains")
    data = check.mapping(ctx, where, raw, known) or {}
    default = DomainPolicy()
    if "default" in data:
        default = (
            _domain_policy(ctx, check.join(where, "default"), data["default"], default, False)
            or default
        )
    flags = {
        k: check.boolean(ctx, check.join(where, k), data[k])
        for k in ("mta_sts", "dane", "honor_tls_required_no")
        if k in data
    }
    domains = _policy_domains(ctx, check.join(where, "domains"), data.get("domains", {}), default)
    if flags.get("dane") is False:
        # dane-only with DANE switched off could never deliver: say so now, not per message.
        keyed = {check.join(where, "default"): default} | {
            check.keyed(check.join(where, "domains"), d): p for d, p in domains.items()
        }
        for here, policy in keyed.items():
            if policy.level is TlsLevel.DANE_ONLY:
                ctx.add(f"{here}.level", "dane-only needs `dane: true` in the policy", "dane-only")
    return PolicyConfig(
        default=default,
        mta_sts=flags.get("mta_sts") is not False,
        dane=flags.get("dane") is not False,
        honor_tls_required_no=flags.get("honor_tls_required_no") is not False,
        domains=MappingProxyType(domains),
        source=source,
    )


def section(ctx: check.Ctx, raw: Any) -> PolicyConfig:
    """`policy:` is a file path relative to the config file, or an inline mapping."""
    if isinstance(raw, Mapping):
        return _policy_body(ctx, "policy", raw, None)
    text = check.string(ctx, "policy", raw)
    if text is None:
        return PolicyConfig()
    shown = str(Path(ctx.file).parent / text) if not Path(text).is_absolute() else text
    sub = check.Ctx(shown, ctx.path(text).parent, ctx.problems)
    doc = check.read_yaml(sub, ctx.path(text), where="policy", got=raw, parent=ctx)
    return (
        _policy_body(sub, "", doc, ctx.path(text)) if doc is not check.MISSING else PolicyConfig()
    )


def load(path: Path) -> PolicyConfig:
    """Load a standalone TLS policy file; ConfigError with every problem."""
    ctx = check.Ctx(str(path), path.expanduser().resolve().parent, [])
    doc = check.read_yaml(ctx, path)
    policy = _policy_body(ctx, "", {} if doc is check.MISSING else doc, path.resolve())
    if ctx.problems:
        raise ConfigError(ctx.problems)
    return policy
