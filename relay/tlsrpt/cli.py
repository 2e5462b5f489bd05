"""``tls-relay tls-reports list [--json]`` and ``tls-reports send [--include-today]``.

Role: show the RFC 8460 counts not yet reported (per UTC day and policy domain), or
build and send the due reports now - mailed ones are stored in the spool and the
running ``serve`` is asked to pick them up; HTTPS posts are tried once here, and a
failed one is left for ``serve`` to retry.
Not: counting or the report format (relay.tlsrpt.counts, relay.tlsrpt.report).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from relay.config import Config
from relay.delivery.mx import MxResolver
from relay.errors import ConfigError
from relay.queue.spool import Spool
from relay.tlsrpt import counts


def run(cfg: Config, args: argparse.Namespace) -> int:
    if cfg.tls_reports is None:
        raise ConfigError([f"{cfg.source}: tls_reports: not configured, so nothing is counted"])
    root = cfg.spool.path / "tlsrpt"
    if args.reports_command == "list":
        pending = _pending(root)
        if args.json:
            print(json.dumps(pending, indent=1))
        else:
            for item in pending:
                for p in item["policies"]:
                    failed = sum(f["count"] for f in p["failures"])
                    print(
                        f"{item['day']} {item['domain']} {p['policy']['policy-type']}: "
                        f"{p['success']} successful, {failed} failed sessions"
                    )
        return 0
    return asyncio.run(_send(cfg, args.include_today))


def _pending(root: Any) -> list[dict[str, Any]]:
    out = []
    for day in counts.days(root):
        for domain, policies in sorted(counts.load_day(root, day).items()):
            out.append(
                {
                    "day": day,
                    "domain": domain,
                    "policies": [p.to_json() for p in policies],
                }
            )
    return out


async def _send(cfg: Config, include_today: bool) -> int:
    from relay.app import report_sender  # the same wiring as serve

    spool = Spool(cfg.spool.path)
    resolver = MxResolver(cfg.delivery.resolver)
    queued: list[str] = []
    sender = report_sender(cfg, resolver, spool, queued.append)
    for line in await sender.send_due(include_today=include_today):
        print(line)
    if queued and not spool.kick():
        print(f"{len(queued)} report(s) queued; serve is not running and will send them at start")
    return 0
