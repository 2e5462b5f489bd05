"""Client gate: who may connect, who may relay, who has failed AUTH too often.

Role: the listener's admission bookkeeping, shared by every listener of one
process - connection caps (global and per client IP), the relay decision for a
client address (``clients.networks``), and per-IP AUTH failure counting with a
sliding window.  Client addresses are normalised first: an IPv4-mapped IPv6
address (``::ffff:127.0.0.1``, seen on dual-stack sockets) counts as its IPv4
address, so caps and networks apply the same either way.

Not: sockets or replies (relay.intake.session sends them), and no clock reads except
through the injected ``clock``.
"""

from __future__ import annotations

import collections
import ipaddress
import time
from collections.abc import Callable, Iterable

from relay.config import IPNetwork, Limits

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_TRACKED_IPS = 10_000  # bound on the AUTH failure table; oldest entries go first


def client_address(host: str) -> IPAddress:
    """Parse a peer host string; unwrap IPv4-mapped IPv6 (RFC 4291 2.5.5.2)."""
    addr = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def in_networks(addr: IPAddress, networks: Iterable[IPNetwork]) -> bool:
    """True if *addr* is inside one of *networks* (families that differ never match)."""
    return any(addr.version == net.version and addr in net for net in networks)


class Gate:
    """Connection counts and AUTH failures, per normalised client address."""

    def __init__(
        self,
        limits: Limits,
        networks: Iterable[IPNetwork] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limits = limits
        self._networks = tuple(networks)
        self._clock = clock
        self._per_ip: collections.Counter[IPAddress] = collections.Counter()
        self._total = 0
        self._failures: collections.OrderedDict[IPAddress, collections.deque[float]] = (
            collections.OrderedDict()
        )
        self._auth_running: collections.Counter[IPAddress] = collections.Counter()

    @property
    def connections(self) -> int:
        return self._total

    def may_relay_unauthenticated(self, addr: IPAddress) -> bool:
        return in_networks(addr, self._networks)

    def admit(self, addr: IPAddress) -> bool:
        """Count a new connection, or return False when a cap is reached."""
        if self._total >= self._limits.max_connections:
            return False
        if self._per_ip[addr] >= self._limits.max_connections_per_ip:
            return False
        self._total += 1
        self._per_ip[addr] += 1
        return True

    def release(self, addr: IPAddress) -> None:
        if self._per_ip[addr] <= 0:
            return
        self._total -= 1
        self._per_ip[addr] -= 1
        if not self._per_ip[addr]:
            del self._per_ip[addr]

    def _recent(self, addr: IPAddress) -> collections.deque[float]:
        window_start = self._clock() - self._limits.auth_failure_window
        stamps = self._failures.get(addr)
        if stamps is None:
            return collections.deque()
        while stamps and stamps[0] < window_start:
            stamps.popleft()
        if not stamps:
            del self._failures[addr]
        return stamps

    def auth_failures(self, addr: IPAddress) -> int:
        """AUTH failures from *addr* inside the window."""
        return len(self._recent(addr))

    def auth_blocked(self, addr: IPAddress) -> bool:
        return self.auth_failures(addr) >= self._limits.max_auth_failures

    def auth_begin(self, addr: IPAddress) -> bool:
        """Admit one password check from *addr*, or False when its failures in the window
        plus the checks still running reach the limit.  Counting the running ones is what
        makes the limit hold against many parallel connections from one address: each
        would otherwise pass the check before any of them had failed."""
        running = self._auth_running[addr]
        if self.auth_failures(addr) + running >= self._limits.max_auth_failures:
            return False
        self._auth_running[addr] = running + 1
        return True

    def auth_end(self, addr: IPAddress, failed: bool) -> int:
        """A check admitted by auth_begin is over; returns the failures in the window."""
        self._auth_running[addr] -= 1
        if self._auth_running[addr] <= 0:
            del self._auth_running[addr]
        return self.auth_failed(addr) if failed else self.auth_failures(addr)

    def auth_failed(self, addr: IPAddress) -> int:
        """Record one failure; returns the count inside the window, this one included."""
        stamps = self._recent(addr)
        if addr not in self._failures:
            stamps = collections.deque(maxlen=max(1, self._limits.max_auth_failures))
            self._failures[addr] = stamps
        self._failures.move_to_end(addr)
        stamps.append(self._clock())
        while len(self._failures) > MAX_TRACKED_IPS:
            self._failures.popitem(last=False)
        return len(stamps)
