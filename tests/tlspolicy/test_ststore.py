"""relay.tlspolicy.ststore: discovery, the durable cache and refresh (RFC 8461 5.1),
with a scripted TXT lookup and fetch and a fake clock."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from relay.domains import Domain
from relay.tlspolicy.mtasts import StsPolicy, parse_policy
from relay.tlspolicy.stsfetch import FETCH_ERROR, FetchError
from relay.tlspolicy.ststore import (
    CHECK_INTERVAL,
    FAILURE_TTL,
    NO_POLICY_TTL,
    StsPolicies,
)

D = Domain("example.test")
T0 = 1_700_000_000.0


def policy(mode: str = "enforce", max_age: int = 86400) -> StsPolicy:
    body = f"version: STSv1\nmode: {mode}\nmx: mx.example.test\nmax_age: {max_age}\n"
    return parse_policy(body.encode())


@dataclass
class World:
    """The DNS and HTTPS the store sees; every call is counted."""

    now: float = T0
    txt: tuple[str, ...] | None = ("v=STSv1; id=1",)
    served: StsPolicy | FetchError = field(default_factory=policy)
    txt_calls: int = 0
    fetches: int = 0
    gate: asyncio.Event | None = None

    def clock(self) -> float:
        return self.now

    async def lookup(self, name: str) -> tuple[str, ...] | None:
        assert name == "_mta-sts.example.test"
        self.txt_calls += 1
        return self.txt

    async def close(self) -> None:
        return None

    async def fetch(self, domain: Domain) -> StsPolicy:
        self.fetches += 1
        if self.gate is not None:
            await self.gate.wait()
        if isinstance(self.served, FetchError):
            raise self.served
        return self.served


@pytest.fixture
def world() -> World:
    return World()


def store(world: World, root: Path) -> StsPolicies:
    return StsPolicies(root, world.lookup, world, clock=world.clock)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_discovered_once_then_from_the_cache(world: World, tmp_path: Path) -> None:
    s = store(world, tmp_path)
    first = await s.for_domain(D)
    assert first.policy == policy() and first.origin == "fetched" and first.id == "1"
    world.now += 60
    again = await s.for_domain(D)
    assert again.origin == "cache" and (world.txt_calls, world.fetches) == (1, 1)


async def test_concurrent_deliveries_share_one_discovery(world: World, tmp_path: Path) -> None:
    world.gate = asyncio.Event()
    s = store(world, tmp_path)
    waiting = [asyncio.create_task(s.for_domain(D)) for _ in range(10)]
    await settle()
    world.gate.set()
    states = await asyncio.gather(*waiting)
    assert all(st.policy == policy() for st in states)
    assert (world.txt_calls, world.fetches) == (1, 1)


async def test_no_policy_is_remembered_for_a_while(world: World, tmp_path: Path) -> None:
    world.txt = ()
    s = store(world, tmp_path)
    assert (await s.for_domain(D)).policy is None
    world.now += NO_POLICY_TTL - 1
    assert (await s.for_domain(D)).policy is None and world.txt_calls == 1
    world.now += 2
    world.txt = ("v=STSv1; id=1",)  # published meanwhile
    assert (await s.for_domain(D)).policy == policy() and world.txt_calls == 2


async def test_a_failed_fetch_keeps_an_unexpired_policy(world: World, tmp_path: Path) -> None:
    s = store(world, tmp_path)
    await s.for_domain(D)
    world.txt = ("v=STSv1; id=2",)  # a new id, but the server is down
    world.served = FetchError("https://...: connection refused", FETCH_ERROR)
    world.now += CHECK_INTERVAL
    state = await s.for_domain(D)  # the cached one, refresh in the background
    await settle()
    assert state.policy == policy() and world.fetches == 2
    assert (await s.for_domain(D)).policy == policy()


async def test_a_vanished_txt_record_never_drops_an_unexpired_policy(
    world: World, tmp_path: Path
) -> None:
    s = store(world, tmp_path)
    await s.for_domain(D)
    world.txt = ()
    world.now += CHECK_INTERVAL
    await s.for_domain(D)
    await settle()
    assert (await s.for_domain(D)).policy == policy()


async def test_a_new_id_is_fetched_and_mode_none_replaces_the_policy(
    world: World, tmp_path: Path
) -> None:
    s = store(world, tmp_path)
    await s.for_domain(D)
    world.txt = ("v=STSv1; id=2",)
    world.served = policy("none")
    world.now += CHECK_INTERVAL
    await s.for_domain(D)  # still the old one; the refresh runs meanwhile
    await settle()
    state = await s.for_domain(D)
    assert state.policy is None and state.id == "2" and world.fetches == 2


async def test_nothing_cached_and_the_fetch_fails(world: World, tmp_path: Path) -> None:
    world.served = FetchError("https://mta-sts.example.test/...: HTTP 404, not 200", FETCH_ERROR)
    s = store(world, tmp_path)
    state = await s.for_domain(D)
    assert state.policy is None and state.result_type == FETCH_ERROR
    assert "HTTP 404" in str(state.failure)
    world.now += FAILURE_TTL - 1
    await s.for_domain(D)
    assert world.fetches == 1  # not hammered
    world.now += 2
    world.served = policy()
    assert (await s.for_domain(D)).policy == policy()


async def test_the_cache_survives_a_restart(world: World, tmp_path: Path) -> None:
    await store(world, tmp_path).for_domain(D)
    assert (tmp_path / "example.test.json").exists()
    world.txt = None  # DNS down after the restart: the cached policy still applies
    world.now += 3600
    restarted = store(world, tmp_path)
    state = await restarted.for_domain(D)
    await settle()
    assert state.policy == policy() and state.origin == "cache" and world.fetches == 1


async def test_an_expired_policy_is_not_used(world: World, tmp_path: Path) -> None:
    s = store(world, tmp_path)
    await s.for_domain(D)
    world.now += 86400 + 1
    world.txt = None  # and nothing can be learnt now
    assert (await s.for_domain(D)).policy is None


async def test_an_unreadable_cache_file_is_skipped(world: World, tmp_path: Path) -> None:
    (tmp_path / "broken.test.json").write_text("{not json")
    s = store(world, tmp_path)
    assert (await s.for_domain(D)).policy == policy()


async def test_an_unchanged_id_is_refetched_before_the_policy_expires(
    world: World, tmp_path: Path
) -> None:
    """RFC 8461 3.3: max_age counts from the last fetch.  In the second half of its life
    the policy is fetched again (same id), so it never lapses; found in review: without
    this it expired every max_age, and a blocked fetch then meant no policy."""
    s = store(world, tmp_path)
    await s.for_domain(D)
    world.now += 13 * 3600  # 11 h left of 24 h
    await s.for_domain(D)
    await settle()
    assert world.fetches == 2
    world.now += 23 * 3600  # 36 h after the first fetch, 23 h after the second
    world.txt = None  # DNS down, the policy server unreachable
    world.served = FetchError("https://...: connection refused", FETCH_ERROR)
    assert (await s.for_domain(D)).policy == policy()
