"""The MTA-STS policies the relay knows: discovered, cached durably, refreshed.

Role: :meth:`StsPolicies.for_domain` answers, for one destination domain, the
policy that applies now (RFC 8461 5.1): from memory when an unexpired one is
cached (a background refresh starts when it is due); otherwise after discovery -
the ``_mta-sts`` TXT record, then, when its ``id`` is new, the policy file.
Concurrent deliveries to one domain share one discovery.  The cache is durable
(one JSON file per domain under ``<spool>/mta-sts/``, written with the relay's one
durable write path) and survives a restart.  A failed refresh, an invalid or vanished
TXT record never drops an unexpired policy; a freshly fetched ``mode: none``
replaces it.  "No policy" (no TXT record, or discovery failed with nothing cached)
is remembered in memory for a bounded time, so a domain without MTA-STS costs one
TXT lookup per NO_POLICY_TTL, not one per message.
Not: what a policy means for a delivery (relay.tlspolicy.verdict), HTTPS
(relay.tlspolicy.stsfetch), or parsing (relay.tlspolicy.mtasts).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from relay.domains import Domain
from relay.log import event
from relay.safeio import atomic_write
from relay.tlspolicy.mtasts import Mode, StsError, StsPolicy, parse_policy, parse_txt
from relay.tlspolicy.stsfetch import FetchError

log = logging.getLogger("relay.mta_sts")

CACHE_VERSION = 1
NO_POLICY_TTL = 600.0  # seconds "no policy" is believed before the TXT record is asked again
FAILURE_TTL = 300.0  # after a failed discovery with nothing cached: when to try again
CHECK_INTERVAL = 3600.0  # an unexpired policy's TXT id is checked again after this long

TxtLookup = Callable[[str], Awaitable[tuple[str, ...] | None]]  # None: lookup failed


class Fetcher(Protocol):
    """relay.tlspolicy.stsfetch.StsFetcher as the store uses it."""

    async def fetch(self, domain: Domain) -> StsPolicy: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class Cached:
    """A policy as fetched, with the TXT id it belongs to."""

    domain: Domain
    id: str
    policy: StsPolicy
    fetched: float
    expires: float  # fetched + max_age
    checked: float  # when the TXT id was last seen to match


@dataclass(frozen=True)
class StsState:
    """What applies to a domain now: a policy (with where it came from), or none - and
    why not, when discovery failed (for logs and TLS reports)."""

    policy: StsPolicy | None
    id: str | None = None
    origin: str = "none"  # "cache", "fetched" or "none"
    failure: str | None = None  # the discovery failure, when there is one
    result_type: str | None = None  # its RFC 8460 result type


class StsPolicies:
    def __init__(
        self,
        root: Path,
        txt: TxtLookup,
        fetcher: Fetcher,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._root = root
        self._txt = txt
        self._fetcher = fetcher
        self._clock = clock
        self._cache: dict[Domain, Cached] = {}
        self._none: dict[Domain, tuple[float, StsState]] = {}  # domain -> (until, state)
        self._running: dict[Domain, asyncio.Task[StsState]] = {}
        self._loaded = False

    # -- public ---------------------------------------------------------------------------
    async def for_domain(self, domain: Domain) -> StsState:
        """The MTA-STS state of *domain* now; never raises for DNS or HTTPS trouble."""
        self._load()
        now = self._clock()
        cached = self._cache.get(domain)
        if cached is not None and cached.expires > now:
            if now - cached.checked >= min(CHECK_INTERVAL, (cached.expires - now) / 2):
                self._discover_soon(domain)  # in the background: this delivery goes on
            return _state(cached, "cache")
        negative = self._none.get(domain)
        if negative is not None and negative[0] > now:
            return negative[1]
        return await asyncio.shield(self._discover_soon(domain))

    def cached(self, domain: Domain) -> Cached | None:
        """The cached policy of *domain*, expired or not (``tls-relay policy``)."""
        self._load()
        return self._cache.get(domain)

    async def close(self) -> None:
        for task in list(self._running.values()):
            task.cancel()
        if self._running:
            await asyncio.wait(list(self._running.values()), timeout=5)
        await self._fetcher.close()

    # -- discovery (RFC 8461 5.1) -----------------------------------------------------------
    def _discover_soon(self, domain: Domain) -> asyncio.Task[StsState]:
        """One discovery per domain at a time, shared by everyone who asks."""
        task = self._running.get(domain)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._discover(domain))
            self._running[domain] = task
            task.add_done_callback(lambda _: self._running.pop(domain, None))
        return task

    async def _discover(self, domain: Domain) -> StsState:
        now = self._clock()
        cached = self._cache.get(domain)
        alive = cached if cached is not None and cached.expires > now else None
        records = await self._txt(f"_mta-sts.{domain}")
        if records is None:
            return self._keep(domain, alive, "TXT lookup of _mta-sts failed", now)
        try:
            policy_id = parse_txt(records)
        except StsError as exc:
            return self._keep(
                domain, alive, f"TXT record invalid: {exc}", now, "sts-policy-invalid"
            )
        if policy_id is None:
            # No TXT record: no policy to discover; an unexpired one stays (RFC 8461 5.1).
            if alive is not None:
                return _state(alive, "cache")
            return self._no_policy(domain, StsState(None), now + NO_POLICY_TTL)
        # RFC 8461 3.3: max_age counts from the last fetch; an unchanged id does not
        # extend it.  So the policy is fetched again in the second half of its life
        # (kept if that fails): it never lapses into a moment an attacker could pick to
        # block the fetch and get "no policy".
        young = alive is not None and alive.expires - now > alive.policy.max_age / 2
        if alive is not None and alive.id == policy_id and young:
            self._remember(dataclasses.replace(alive, checked=now))
            return _state(self._cache[domain], "cache")
        try:
            policy = await self._fetcher.fetch(domain)
        except FetchError as exc:
            return self._keep(domain, alive, str(exc), now, exc.result_type)
        fresh = Cached(domain, policy_id, policy, now, now + policy.max_age, now)
        self._remember(fresh)
        await asyncio.to_thread(self._store, fresh)  # fsyncs: never on the event loop
        event(
            log,
            "mta_sts_policy",
            domain=domain,
            id=policy_id,
            mode=policy.mode,
            max_age=policy.max_age,
            mx=",".join(policy.mx) or None,
        )
        return _state(fresh, "fetched")

    def _keep(
        self,
        domain: Domain,
        alive: Cached | None,
        why: str,
        now: float,
        result_type: str = "sts-policy-fetch-error",
    ) -> StsState:
        """Discovery failed: an unexpired policy stays; else no policy, for a while."""
        event(log, "mta_sts_failed", logging.WARNING, domain=domain, kept=bool(alive), error=why)
        if alive is not None:
            return _state(alive, "cache")
        failed = StsState(None, failure=why, result_type=result_type)
        return self._no_policy(domain, failed, now + FAILURE_TTL)

    def _no_policy(self, domain: Domain, state: StsState, until: float) -> StsState:
        self._none[domain] = (until, state)
        return state

    def _remember(self, cached: Cached) -> None:
        self._cache[cached.domain] = cached
        self._none.pop(cached.domain, None)

    # -- the durable cache ----------------------------------------------------------------
    def _path(self, domain: Domain) -> Path:
        return self._root / f"{domain}.json"

    def _store(self, cached: Cached) -> None:
        blob = json.dumps(
            {
                "version": CACHE_VERSION,
                "domain": cached.domain,
                "id": cached.id,
                "fetched": cached.fetched,
                "expires": cached.expires,
                "policy": cached.policy.text,
            },
            sort_keys=True,
        ).encode()
        try:
            self._root.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write(self._path(cached.domain), blob)
        except OSError as exc:  # the policy still applies from memory
            event(log, "mta_sts_cache_write_failed", logging.ERROR, domain=cached.domain, error=exc)

    def _load(self) -> None:
        """Read the durable cache once, at the first question."""
        if self._loaded:
            return
        self._loaded = True
        with contextlib.suppress(FileNotFoundError):
            for path in sorted(self._root.glob("*.json")):
                try:
                    cached = _read(path)
                except (OSError, ValueError, KeyError, TypeError, StsError) as exc:
                    event(log, "mta_sts_cache_unreadable", logging.WARNING, path=path, error=exc)
                    continue
                self._cache[cached.domain] = cached


def _read(path: Path) -> Cached:
    raw = json.loads(path.read_bytes())
    if raw["version"] != CACHE_VERSION:
        raise ValueError(f"unknown cache version {raw['version']!r}")
    policy = parse_policy(str(raw["policy"]).encode("ascii"))
    fetched, expires = float(raw["fetched"]), float(raw["expires"])
    # The TXT id is checked again at the first delivery after a restart.
    return Cached(Domain(raw["domain"]), str(raw["id"]), policy, fetched, expires, 0.0)


def _state(cached: Cached, origin: str) -> StsState:
    policy = cached.policy
    if policy.mode is Mode.NONE:  # a policy of mode none means: no policy (RFC 8461 5)
        return StsState(None, cached.id, origin)
    return StsState(policy, cached.id, origin)
