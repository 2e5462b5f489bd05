"""``tls-relay audit [--since YYYY-MM-DD] [--domain D] [--json]`` and ``audit verify``.

Role: print the audit trail's records (one line each, or a JSON array), or verify its
hash chain: exit 0 with the count and the chain's head hash, or exit 1 naming the first
broken line and its file.
Not: writing records (relay.audit.trail).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from relay.audit.reader import records, verify
from relay.config import Config
from relay.domains import normalize_domain
from relay.errors import ConfigError


def run(cfg: Config, args: argparse.Namespace) -> int:
    if cfg.audit is None:
        raise ConfigError([f"{cfg.source}: audit: no audit trail configured"])
    root = cfg.audit.path
    if args.action == "verify":
        result = verify(root)
        if not result.ok:
            print(f"audit trail BROKEN: {result.problem}")
            return 1
        print(f"audit trail OK: {result.lines} records in {result.files} files under {root}")
        if result.last_hash:
            print(f"  oldest record's prev: {result.first_prev}")
            print(f"  newest record's hash: {result.last_hash} (keep a copy to detect truncation)")
        return 0
    domain = normalize_domain(args.domain) if args.domain else None
    found = list(records(root, args.since, domain))
    if args.json:
        print(json.dumps(found, indent=1, ensure_ascii=False))
    else:
        for record in found:
            print(_line(record))
    return 0


def _line(r: dict[str, Any]) -> str:
    level = f"{r.get('level_required')}/{r.get('level_met')}"
    return (
        f"{r.get('time')} {r.get('queue_id')} {r.get('recipient')} via {r.get('mx_host')}"
        f"[{r.get('mx_ip')}] {r.get('tls_version')} {r.get('cipher')} level {level}"
        f" policy {r.get('policy_source')} cert {str(r.get('cert_sha256') or '-')[:16]}"
    )
