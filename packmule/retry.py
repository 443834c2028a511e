"""Backoff as pure functions: the delay before a failed job's next attempt."""

from __future__ import annotations

import random


def backoff_seconds(
    attempt: int, *, base: float, cap: float, rand: random.Random | None = None
) -> float:
    """Exponential backoff with full jitter for ``attempt`` (1 = first retry).

    Jitter spreads the retries of many jobs that failed together (a server
    blip) so they do not all come back in the same second.
    """
    ceiling = min(cap, base * 2 ** max(0, attempt - 1))
    return (rand or random).uniform(ceiling / 2, ceiling)


def doubling(first: float, cap: float) -> list[float]:
    """The waits ``first, 2*first, ...`` up to ``cap``, then ``cap`` forever after."""
    waits = [first]
    while waits[-1] * 2 < cap:
        waits.append(waits[-1] * 2)
    return [*waits, cap]
