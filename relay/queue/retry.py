"""Retry schedule: when a deferred recipient is tried next, and when it expires.

Role: pure decisions over values.  Given how many attempts a recipient has had,
when its message arrived, the current time and the ``queue`` config, say when to
try again, or that the message has run out of lifetime and must bounce.
Not: reading clocks, drawing random numbers (the caller passes ``now`` and a
``jitter`` in [-1, 1]), or touching the spool.  See relay.queue.outcomes for the caller.
"""

from __future__ import annotations

from relay.config import QueueConfig

# Spread retries of messages deferred together (e.g. one MX down for many
# messages) so they do not all come back in the same second.
JITTER_FRACTION = 0.10


def interval(attempts: int, cfg: QueueConfig) -> float:
    """Seconds to wait after attempt number *attempts* (1-based); the last step repeats."""
    index = min(max(attempts, 1) - 1, len(cfg.retry) - 1)
    return cfg.retry[index]


def expires_at(created: float, cfg: QueueConfig) -> float:
    """The moment a message stops being retried.

    RFC 5321 4.5.4.1: give up after at least 4-5 days; the config says how long.
    """
    return created + cfg.max_lifetime


def expired(created: float, now: float, cfg: QueueConfig) -> bool:
    return now >= expires_at(created, cfg)


def next_attempt(
    attempts: int, created: float, now: float, cfg: QueueConfig, jitter: float
) -> float | None:
    """When to try again after *attempts* transient failures; None if expired (bounce).

    The wait is the configured interval times (1 +/- up to 10 %), and never runs
    past the expiry moment: the final attempt happens at expiry, so a message
    is tried once more just before it is given up.
    """
    if expired(created, now, cfg):
        return None
    jitter = max(-1.0, min(1.0, jitter))
    delay = interval(attempts, cfg) * (1.0 + JITTER_FRACTION * jitter)
    return min(now + delay, expires_at(created, cfg))


def warning_due(created: float, now: float, cfg: QueueConfig, warned: bool) -> bool:
    """True once a message has waited ``delay_warning`` and no warning went out yet.

    RFC 3464 "delayed" notices are optional; ``delay_warning`` None turns them off.
    """
    if warned or cfg.delay_warning is None:
        return False
    return now >= created + cfg.delay_warning and not expired(created, now, cfg)
