"""When to refresh a token and how long to back off: pure functions, no I/O, no clock reads."""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["backoff", "refresh_at", "valid_until"]


def valid_until(signed_at: float, lifetime: float, credentials_ttl: float | None) -> float:
    """Return the monotonic time after which a token no longer authenticates.

    A token is worthless once the temporary credentials that signed it expire, even if its own
    lifetime has not run out, so the earlier of the two wins.

    Args:
        signed_at: Monotonic time taken just before signing began (seconds).
        lifetime: The token's own lifetime (seconds; 900 for RDS).
        credentials_ttl: Seconds the signing credentials had left when signing began, or
            ``None`` for credentials that do not expire.
    """
    ttl = lifetime if credentials_ttl is None else min(lifetime, credentials_ttl)
    return signed_at + max(ttl, 0.0)


def refresh_at(signed_at: float, valid_until: float, buffer: float) -> float:
    """Return the monotonic time from which callers should get a new token.

    Normally ``buffer`` seconds before the token stops working; when the whole validity is
    shorter than twice the buffer (credentials about to expire), halfway through it instead, so
    a token is never re-signed on every call.
    """
    window = valid_until - signed_at
    return valid_until - min(buffer, window / 2.0)


def backoff(
    failures: int,
    *,
    base: float = 1.0,
    cap: float = 60.0,
    rand: Callable[[], float] = random.random,
) -> float:
    """Return how long to wait before retrying after ``failures`` consecutive failures.

    Exponential (``base``, ``2 * base`` … up to ``cap`` seconds) with "equal jitter": the delay
    is uniformly drawn from the upper half of the step, so retries from many processes spread
    out but never come back immediately.
    """
    step = min(cap, base * 2.0 ** max(failures - 1, 0))
    return step / 2.0 + rand() * step / 2.0
