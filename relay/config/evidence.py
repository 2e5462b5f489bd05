"""Evidence settings: the `audit:` section (and, next, `tls_reports:`).

Role: validate where the per-delivery TLS audit trail is kept and whether it is kept,
into :class:`relay.config.model.AuditConfig`.
Not: writing or reading the trail (relay.audit), or the rest of relay.yaml
(relay.config.load).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from relay.config import checks as check
from relay.config.model import AuditConfig


def audit(ctx: check.Ctx, raw: Any, spool: Path | None) -> AuditConfig | None:
    """`audit: {path: DIR, enabled: true}`; the default path is `<spool.path>/audit`."""
    data = check.mapping(ctx, "audit", raw, ("path", "enabled")) or {}
    enabled = check.boolean(ctx, "audit.enabled", data["enabled"]) if "enabled" in data else True
    if "path" in data:
        text = check.string(ctx, "audit.path", data["path"])
        path = ctx.path(text) if text else None
    else:
        path = spool / "audit" if spool is not None else None
    if path is None:
        return None
    return AuditConfig(path=path, enabled=enabled is not False)
