"""Background watches of a running relay: the resolver's DNSSEC, the listener certificate.

Role: :func:`watch_dnssec` probes the resolver at start and again and again (Postfix's
dnssec_probe: DANE only while it proves it validates), logging when the verdict
changes; :func:`watch_certificates` warns at start and once a day while a listener
certificate expires within 30 days, and keeps the expiry-time metric current.
Not: what DNSSEC or the certificate is used for (relay.delivery, relay.intake).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence

from relay import certs
from relay.config import ServerTls
from relay.delivery.mx import DnssecState, MxResolver
from relay.log import event
from relay.metrics import Metrics

log = logging.getLogger("relay.app")

CERT_CHECK_EVERY = 86400.0  # seconds between certificate expiry checks
DNSSEC_REPROBE = 300.0  # seconds between DNSSEC probes of the resolver (DANE)
DNSSEC_RETRY = 30.0  # ... while no probe has been answered (deliveries wait meanwhile)


def reprobe_after(state: DnssecState) -> float:
    return DNSSEC_RETRY if state is DnssecState.UNKNOWN else DNSSEC_REPROBE


async def probe_dnssec(
    resolver: MxResolver, dane_only: Sequence[str], log_unchanged: bool = False
) -> None:
    """One probe; logged when the verdict changes (and at start); a probe without an
    answer keeps the verdict and is logged on its own."""
    was = resolver.dnssec_state
    why = await resolver.probe_dnssec()
    state = resolver.dnssec_state
    if state is DnssecState.VALIDATING:
        if state is not was or log_unchanged:
            event(log, "dane_enabled", reason="the resolver validates ('. NS' with AD)")
        return
    if state is was and not log_unchanged and state is not DnssecState.UNKNOWN:
        return
    unknown = state is DnssecState.UNKNOWN
    event(
        log,
        "dnssec_probe_failed" if why and state is was and not unknown else "dane_disabled",
        logging.WARNING,
        reason=why,
        # Never answered yet: mail to MX hosts waits rather than go without DANE.
        deferred="all MX deliveries" if unknown else ",".join(dane_only) or None,
        retry=f"in {reprobe_after(state):g}s",
    )


async def watch_dnssec(resolver: MxResolver, dane_only: Sequence[str]) -> None:
    """Probe again now and then: a resolver started after the relay turns DANE on, one
    that stopped validating turns it off (and says so)."""
    await probe_dnssec(resolver, dane_only, log_unchanged=True)
    while True:
        await asyncio.sleep(reprobe_after(resolver.dnssec_state))
        try:
            await probe_dnssec(resolver, dane_only)
        except Exception:  # never let the watch die silently: DANE would freeze
            log.exception("dnssec_probe_error")


def warn_expiring(tls: ServerTls, metrics: Metrics) -> None:
    """Log each listener certificate that expires within 30 days (start, daily, reload);
    set each one's expiry time in *metrics*."""
    for warning in certs.expiry_warnings(tls.cert, tls.rsa_cert):
        event(log, "certificate_expiring", logging.WARNING, warning=warning)
    for key, path in (("cert", tls.cert), ("rsa_cert", tls.rsa_cert)):
        until = certs.not_after(path) if path is not None else None
        # A certificate no longer configured reads +Inf: never "about to expire".
        metrics.cert_expiry.labels(certificate=key).set(math.inf if until is None else until)


async def watch_certificates(tls: Callable[[], ServerTls], metrics: Metrics) -> None:
    """A warning at start and once a day while a listener certificate (as configured
    now: *tls* follows reloads) expires within 30 days."""
    while True:
        warn_expiring(tls(), metrics)
        await asyncio.sleep(CERT_CHECK_EVERY)
