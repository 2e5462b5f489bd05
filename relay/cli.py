"""Command line front end: ``tls-relay SUBCOMMAND ...``.

Role: parse arguments, find the config file, call one function per subcommand and
turn RelayErrors into a message on stderr and an exit code.
Not: any mail logic; each subcommand's work lives in the module named below.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from relay.errors import ConfigError, RelayError

if TYPE_CHECKING:
    from relay.config import Config

DEFAULT_CONFIG = "config/relay.yaml"


def config_path(args: argparse.Namespace) -> Path:
    """-c FILE, else $TLS_RELAY_CONFIG, else config/relay.yaml."""
    chosen = getattr(args, "config", None) or os.environ.get("TLS_RELAY_CONFIG") or DEFAULT_CONFIG
    return Path(chosen)


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c", "--config", metavar="FILE", help=f"config file (default {DEFAULT_CONFIG})"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tls-relay", description=__doc__.splitlines()[0] if __doc__ else None
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run listeners, queue manager and delivery")
    _add_config(p)

    p = sub.add_parser("check-config", help="validate config and TLS policy")
    _add_config(p)

    p = sub.add_parser("policy", help="show what delivery to DOMAIN would require")
    p.add_argument("domain")
    p.add_argument("--json", action="store_true", help="one JSON object")
    _add_config(p)

    p = sub.add_parser("audit", help="list the TLS audit trail, or verify its hash chain")
    p.add_argument("action", nargs="?", choices=["verify"], help="verify the hash chain")
    p.add_argument("--since", type=_day, metavar="YYYY-MM-DD", help="records from this UTC day")
    p.add_argument("--domain", help="records for recipients in this domain")
    p.add_argument("--json", action="store_true", help="print a JSON array")
    _add_config(p)

    _add_reports(sub)
    _add_queue(sub)
    _add_gen_cert(sub)

    p = sub.add_parser("passwd", help="add or change a user in the users file")
    p.add_argument("user")
    _add_config(p)
    return parser


def _add_reports(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("tls-reports", help="RFC 8460 TLS reports: list unsent data, send")
    _add_config(p)
    rsub = p.add_subparsers(dest="reports_command", required=True)
    r = rsub.add_parser("list", help="counts not yet reported, per UTC day and domain")
    r.add_argument("--json", action="store_true", help="print a JSON array")
    _add_config(r)
    r = rsub.add_parser("send", help="build and send the due reports now")
    r.add_argument(
        "--include-today", action="store_true", help="also the current, partial day (labs)"
    )
    _add_config(r)


def _add_queue(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("queue", help="inspect and manage the spool")
    _add_config(p)
    qsub = p.add_subparsers(dest="queue_command", required=True)
    q = qsub.add_parser("list", help="list queued messages")
    q.add_argument("--json", action="store_true", help="print a JSON array")
    _add_config(q)
    for name, helptext in (
        ("show", "envelope, headers and per-recipient history"),
        ("hold", "keep a message from being delivered"),
        ("release", "release a held message"),
        ("delete", "remove a message without a bounce"),
        ("bounce", "bounce a message to its sender now"),
    ):
        q = qsub.add_parser(name, help=helptext)
        q.add_argument("id")
        _add_config(q)
    q = qsub.add_parser("retry", help="make a message (or all) due now")
    q.add_argument("id", nargs="?")
    q.add_argument("--all", action="store_true")
    _add_config(q)


def _add_gen_cert(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "gen-cert",
        help="self-signed ECDSA P-256 certificate and key, valid 365 days",
        description="A self-signed certificate for a lab or a first run, valid 365 days.",
    )
    p.add_argument("--hostname", default="localhost")
    p.add_argument("--out", default=".", help="directory for cert.pem and key.pem")
    p.add_argument(
        "--ip",
        action="append",
        default=[],
        metavar="ADDR",
        help="an IP address the certificate is also valid for (repeatable)",
    )
    p.add_argument(
        "--rsa",
        action="store_true",
        help="RSA 2048 instead, as rsa-cert.pem / rsa-key.pem (tls.rsa_cert / tls.rsa_key)",
    )


def _read_password() -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("New password: ")
        if getpass.getpass("Repeat: ") != first:
            raise RelayError("passwords do not match")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def run(args: argparse.Namespace) -> int:
    from relay import config as configmod

    cmd = args.command
    if cmd == "gen-cert":
        from relay import certs

        cert, key = certs.gen_cert(args.hostname, Path(args.out), args.ip, args.rsa)
        kind = "RSA 2048" if args.rsa else "ECDSA P-256"
        sans = ", ".join([args.hostname, *args.ip])
        days = certs.VALIDITY.days
        print(f"wrote {cert} and {key} ({kind}, SAN {sans}, valid {days} days)")
        return 0
    path = config_path(args)
    if cmd in ("serve", "check-config"):
        from relay import internals

        internals.require()  # a library without what we borrow: stop now, say why
    if cmd == "check-config":
        cfg = configmod.load(path)
        print(configmod.summary(cfg, dane=_dane_line(cfg) if cfg.policy.dane else None))
        return 0
    if cmd == "passwd":
        from relay.intake import users

        cfg_users = configmod.load_users_file_path(path)
        users.set_password(cfg_users, args.user, _read_password())
        print(f"{cfg_users}: password for {args.user} set")
        return 0
    cfg = configmod.load(path)
    if cmd == "serve":
        from relay import app

        return app.serve(cfg)
    if cmd == "policy":
        from relay.tlspolicy import explain

        if args.json:
            print(json.dumps(explain.report_json(cfg, args.domain), indent=2))
        else:
            print(explain.report(cfg, args.domain))
        return 0
    if cmd == "queue":
        from relay.queue import cli as queue_cli

        return queue_cli.run(cfg, args)
    if cmd == "tls-reports":
        from relay.tlsrpt import cli as reports_cli

        return reports_cli.run(cfg, args)
    if cmd == "audit":
        from relay.audit import cli as audit_cli

        return audit_cli.run(cfg, args)
    raise AssertionError(f"unhandled command {cmd}")


def _day(text: str) -> str:
    """argparse type for YYYY-MM-DD."""
    import datetime as dt

    try:
        return dt.date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a day as YYYY-MM-DD: {text!r}") from None


def _dane_line(cfg: Config) -> str:
    """Probe the resolver as `serve` does at start (DANE needs a validating resolver
    on loopback) and say what that means; a warning, not an error (exit 0)."""
    import asyncio

    from relay.delivery.mx import MxResolver

    resolver = MxResolver(cfg.delivery.resolver, dnssec=True)
    why = asyncio.run(resolver.probe_dnssec())
    if why is None:
        return "dane: on (the resolver validates: '. NS' came back with the AD bit)"
    return f"warning: dane: true, but DANE stays off until the resolver validates: {why}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    except RelayError as exc:
        print(f"tls-relay: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
