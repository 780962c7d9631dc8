"""Retry transactions that lost an optimistic-concurrency race (Aurora DSQL), sync and async."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
import psycopg_pool

from iampg import _refresh
from iampg.errors import ConfigurationError

__all__ = ["RETRYABLE_SQLSTATES", "aretry_transaction", "is_retryable", "retry_transaction"]

logger = logging.getLogger("iampg.retry")

T = TypeVar("T")

RETRYABLE_SQLSTATES = frozenset({"40001", "OC000", "OC001"})
"""Serialization failure, and DSQL's optimistic-concurrency conflicts on data and schema."""


def is_retryable(exc: BaseException) -> bool:
    """Tell whether running the transaction again may succeed."""
    return isinstance(exc, psycopg.Error) and exc.sqlstate in RETRYABLE_SQLSTATES


def _check(attempts: int, base: float, cap: float) -> None:
    if attempts < 1:
        raise ConfigurationError(f"attempts must be 1 or more, not {attempts!r}")
    if not (base > 0 and cap >= base):
        raise ConfigurationError(f"need 0 < base <= cap seconds, not base={base!r}, cap={cap!r}")


def retry_transaction(
    target: psycopg.Connection[Any] | psycopg_pool.ConnectionPool[Any],
    fn: Callable[[psycopg.Connection[Any]], T],
    *,
    attempts: int = 5,
    base: float = 0.02,
    cap: float = 1.0,
) -> T:
    """Run ``fn(conn)`` in a transaction, again if it lost a concurrency race.

    Aurora DSQL checks conflicts at commit (SQLSTATE ``OC000`` for data, ``OC001`` for
    schema; PostgreSQL says ``40001``): the transaction is rolled back and may simply be run
    again. ``fn`` runs inside ``conn.transaction()`` and must be safe to repeat: no side
    effects outside the database. Between attempts, waits with exponential backoff and
    jitter (``base`` doubling up to ``cap`` seconds).

    Args:
        target: A connection, or a pool to take one from for each attempt.
        fn: The transaction's work; its return value is returned.
        attempts: How many times to try at most.
        base: First backoff step in seconds.
        cap: Largest backoff step in seconds.

    Raises:
        psycopg.Error: The last attempt's error, or any error that is not retryable.
        ConfigurationError: Bad ``attempts``, ``base`` or ``cap``.
    """
    _check(attempts, base, cap)
    for attempt in range(1, attempts + 1):
        try:
            if isinstance(target, psycopg_pool.ConnectionPool):
                with target.connection() as conn, conn.transaction():
                    return fn(conn)
            with target.transaction():
                return fn(target)
        except psycopg.Error as exc:  # noqa: PERF203 -- retrying is the point
            if not is_retryable(exc) or attempt == attempts:
                raise
            delay = _refresh.backoff(attempt, base=base, cap=cap)
            logger.debug(
                "transaction conflict (%s), attempt %d of %d; retrying in %.3f s",
                exc.sqlstate,
                attempt,
                attempts,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


async def aretry_transaction(
    target: psycopg.AsyncConnection[Any] | psycopg_pool.AsyncConnectionPool[Any],
    fn: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]],
    *,
    attempts: int = 5,
    base: float = 0.02,
    cap: float = 1.0,
) -> T:
    """Run ``await fn(conn)`` in a transaction, again if it lost a concurrency race.

    The asynchronous twin of :func:`retry_transaction`.
    """
    _check(attempts, base, cap)
    for attempt in range(1, attempts + 1):
        try:
            if isinstance(target, psycopg_pool.AsyncConnectionPool):
                async with target.connection() as conn, conn.transaction():
                    return await fn(conn)
            async with target.transaction():
                return await fn(target)
        except psycopg.Error as exc:  # noqa: PERF203 -- retrying is the point
            if not is_retryable(exc) or attempt == attempts:
                raise
            delay = _refresh.backoff(attempt, base=base, cap=cap)
            logger.debug(
                "transaction conflict (%s), attempt %d of %d; retrying in %.3f s",
                exc.sqlstate,
                attempt,
                attempts,
                delay,
            )
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover
