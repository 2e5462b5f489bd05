"""SIGHUP: reload relay.yaml, the TLS policy, the users file and the certificates.

Role: :func:`reload` reads the config again (the file ``serve`` started with) and, if
it is valid, puts the new listener certificate(s), users and outbound TLS policy into
the running relay: established sessions go on as they are, new connections get the new
certificate, the next delivery the new policy.  A config with any error changes
nothing and every error is logged (the lines of ``check-config``).  Changes that need
a restart - listeners, spool, workers, metrics, limits, queue, delivery, evidence
settings, the MTA-STS/DANE switches - are logged and left until then.
Not: the signal plumbing (relay.app.run, relay.workers forwards SIGHUP to workers).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from relay import config
from relay.errors import ConfigError, RelayError
from relay.intake import tlscontext
from relay.intake.auth import PasswordChecker
from relay.intake.users import UserDb
from relay.log import event
from relay.watch import warn_expiring

if TYPE_CHECKING:
    from relay.app import App

log = logging.getLogger("relay.reload")

# Top-level keys a reload applies; everything else waits for a restart.
APPLIED = ("tls", "policy", "clients")


def needs_restart(old: config.Config, new: config.Config) -> list[str]:
    """The settings that changed but only take effect after a restart."""
    keys = [f.name for f in dataclasses.fields(config.Config) if f.name not in ("source", *APPLIED)]
    changed = [k for k in keys if getattr(old, k) != getattr(new, k)]
    if old.clients.networks != new.clients.networks:
        changed.append("clients.networks")
    for flag in ("mta_sts", "dane"):
        if getattr(old.policy, flag) != getattr(new.policy, flag):
            changed.append(f"policy.{flag}")
    return changed  # tls (min_version included) is applied: part of the new server context


def reload(app: App) -> bool:
    """Apply the config file again; True when it was applied."""
    path = app.cfg.source
    try:
        new = config.load(path)
        context = tlscontext.server_context(new.tls)
        users = UserDb.load(new.clients.users_file) if new.clients.users_file else None
    except ConfigError as exc:
        return _kept(app, exc.problems)
    except RelayError as exc:
        return _kept(app, [str(exc)])
    restart = needs_restart(app.cfg, new)
    policy = dataclasses.replace(
        new.policy, mta_sts=app.cfg.policy.mta_sts, dane=app.cfg.policy.dane
    )
    passwords = PasswordChecker(users, app.passwords_executor()) if users is not None else None
    for listener in app.listeners:
        listener.reload(context, passwords)
    app.scheduler.deliverer.policy = policy  # type: ignore[attr-defined]
    app.ssl_context, app.users = context, users
    app.cfg = dataclasses.replace(
        app.cfg,
        tls=new.tls,
        policy=policy,
        clients=dataclasses.replace(app.cfg.clients, users_file=new.clients.users_file),
    )
    event(log, "reload_done", users=len(users) if users is not None else None)
    if restart:
        event(log, "reload_needs_restart", logging.WARNING, changed=",".join(restart))
    warn_expiring(new.tls, app.metrics)
    app.metrics.reloads.labels(result="ok").inc()
    app.metrics.reload_ok.set(1)
    return True


def _kept(app: App, problems: Sequence[str]) -> bool:
    """A reload that failed: every problem logged (as check-config words them)."""
    for problem in problems:
        event(log, "reload_failed", logging.ERROR, problem=problem)
    event(log, "reload_kept", logging.ERROR, reason="the running config stays")
    app.metrics.reloads.labels(result="failed").inc()
    app.metrics.reload_ok.set(0)
    return False
