"""Evidence settings: the `audit:` and `tls_reports:` sections.

Role: validate where the per-delivery TLS audit trail is kept and whether it is kept
(:class:`relay.config.model.AuditConfig`), and who signs the RFC 8460 TLS reports
(:class:`relay.config.model.TlsReportsConfig`).
Not: writing or reading the trail (relay.audit), counting or sending reports
(relay.tlsrpt), or the rest of relay.yaml
(relay.config.load).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from relay.config import checks as check
from relay.config.model import AuditConfig, TlsReportsConfig


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


def tls_reports(ctx: check.Ctx, raw: Any) -> TlsReportsConfig | None:
    """`tls_reports: {organization, contact, from}`, all three required: RFC 8460 4.4
    needs the organization and a contact in every report, and mailed reports a sender."""
    keys = ("organization", "contact", "from")
    data = check.mapping(ctx, "tls_reports", raw, keys, required=keys)
    if data is None:
        return None
    values = {k: check.string(ctx, f"tls_reports.{k}", data[k]) for k in keys if k in data}
    sender = values.get("from")
    if sender is not None and ("@" not in sender or any(c.isspace() for c in sender)):
        ctx.add("tls_reports.from", "must be an address such as tlsrpt@example.com", sender)
        return None
    if len(values) != len(keys) or None in values.values():
        return None
    return TlsReportsConfig(values["organization"] or "", values["contact"] or "", sender or "")
