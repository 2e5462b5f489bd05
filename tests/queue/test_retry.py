"""retry.py: the schedule as a table, plus properties that hold for any input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.config import QueueConfig
from relay.queue import retry

CFG = QueueConfig(retry=(60.0, 300.0, 900.0), max_lifetime=86400.0, delay_warning=None)
T0 = 1_700_000_000.0


@pytest.mark.parametrize(
    ("attempts", "now", "jitter", "expected"),
    [
        (1, T0, 0.0, T0 + 60),  # first failure: first interval
        (2, T0 + 60, 0.0, T0 + 60 + 300),
        (3, T0 + 400, 0.0, T0 + 400 + 900),
        (9, T0 + 5000, 0.0, T0 + 5000 + 900),  # past the table: the last interval repeats
        (0, T0, 0.0, T0 + 60),  # defensive: no attempts yet counts as the first
        (1, T0, 1.0, T0 + 66),  # +10 % jitter
        (1, T0, -1.0, T0 + 54),  # -10 % jitter
        (1, T0, 5.0, T0 + 66),  # jitter is clamped to [-1, 1]
        (3, T0 + 86000, 0.0, T0 + 86400),  # clipped: the final attempt happens at expiry
        (3, T0 + 86400, 0.0, None),  # at expiry: give up
        (3, T0 + 99999, 0.0, None),
    ],
)
def test_next_attempt_table(
    attempts: int, now: float, jitter: float, expected: float | None
) -> None:
    got = retry.next_attempt(attempts, T0, now, CFG, jitter)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_expired() -> None:
    assert not retry.expired(T0, T0 + 86399.9, CFG)
    assert retry.expired(T0, T0 + 86400, CFG)


@pytest.mark.parametrize(
    ("delay_warning", "now", "warned", "expected"),
    [
        (None, T0 + 99999, False, False),  # off by default
        (3600.0, T0 + 3599, False, False),
        (3600.0, T0 + 3600, False, True),
        (3600.0, T0 + 7200, True, False),  # only once
        (3600.0, T0 + 86400, False, False),  # expired: a bounce, not a warning
    ],
)
def test_warning_due(delay_warning: float | None, now: float, warned: bool, expected: bool) -> None:
    cfg = QueueConfig(retry=CFG.retry, max_lifetime=CFG.max_lifetime, delay_warning=delay_warning)
    assert retry.warning_due(T0, now, cfg, warned) is expected


durations = st.floats(min_value=1.0, max_value=10 * 86400.0)
sorted_steps = st.lists(durations, min_size=1, max_size=8).map(lambda s: tuple(sorted(s)))


@given(
    steps=sorted_steps,
    lifetime=durations,
    attempts=st.integers(min_value=1, max_value=50),
    elapsed=st.floats(min_value=0.0, max_value=20 * 86400.0),
    jitter=st.floats(min_value=-1.0, max_value=1.0),
)
def test_next_attempt_is_bounded(
    steps: tuple[float, ...], lifetime: float, attempts: int, elapsed: float, jitter: float
) -> None:
    cfg = QueueConfig(retry=steps, max_lifetime=lifetime)
    now = T0 + elapsed
    got = retry.next_attempt(attempts, T0, now, cfg, jitter)
    if now >= T0 + lifetime:  # compare as retry does (float sums)
        assert got is None
        return
    assert got is not None
    assert now < got <= T0 + lifetime  # always in the future, never past expiry
    assert got - now <= max(steps) * 1.1 + 1e-6


@given(
    steps=sorted_steps,
    attempts=st.integers(min_value=1, max_value=20),
    elapsed=st.floats(min_value=0.0, max_value=5 * 86400.0),
    jitter=st.floats(min_value=-1.0, max_value=1.0),
)
def test_next_attempt_is_monotone(
    steps: tuple[float, ...], attempts: int, elapsed: float, jitter: float
) -> None:
    """With the same jitter, more attempts (sorted table) or a later now never retry sooner."""
    cfg = QueueConfig(retry=steps, max_lifetime=6 * 86400.0)
    now = T0 + elapsed
    here = retry.next_attempt(attempts, T0, now, cfg, jitter)
    more = retry.next_attempt(attempts + 1, T0, now, cfg, jitter)
    later = retry.next_attempt(attempts, T0, now + 1.0, cfg, jitter)
    assert here is not None and more is not None and later is not None
    assert more >= here
    assert later >= here
