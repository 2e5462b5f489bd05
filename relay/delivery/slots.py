"""Concurrency limits of delivery: one slot per destination domain and one overall.

Role: :class:`Slots` hands out a per-domain slot (``delivery.per_domain_concurrency``),
then a global one (``delivery.concurrency``) - the domain first, so a delivery that
waits for its domain never holds a global slot others could use.  Per-domain
semaphores exist only while someone uses them.
Not: which domain or host to deliver to (relay.delivery.deliverer).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from relay.domains import Domain


class Slots:
    def __init__(self, total: int, per_domain: int) -> None:
        self._global = asyncio.Semaphore(total)
        self._per_domain = per_domain
        self._domains: dict[Domain, tuple[asyncio.Semaphore, int]] = {}

    @contextlib.asynccontextmanager
    async def slot(self, domain: Domain) -> AsyncIterator[None]:
        name = domain  # the one normal form: every spelling shares one slot
        sem, users = self._domains.get(name, (asyncio.Semaphore(self._per_domain), 0))
        self._domains[name] = (sem, users + 1)
        try:
            async with sem, self._global:
                yield
        finally:
            sem, users = self._domains[name]
            if users <= 1:
                del self._domains[name]
            else:
                self._domains[name] = (sem, users - 1)
