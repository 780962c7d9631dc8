"""Retry transactions that lost a concurrency race (Aurora DSQL) or their connection."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
import psycopg_pool

from iampg import _refresh
from iampg._lost import apurge, purge
from iampg.errors import ConfigurationError

__all__ = ["RETRYABLE_SQLSTATES", "aretry_transaction", "is_retryable", "retry_transaction"]

logger = logging.getLogger("iampg.retry")

T = TypeVar("T")

RETRYABLE_SQLSTATES = frozenset({"40001", "OC000", "OC001"})
"""Serialization failure, and DSQL's optimistic-concurrency conflicts on data and schema."""


def is_retryable(exc: BaseException) -> bool:
    """Tell whether the error is a concurrency conflict, after which a rerun may succeed."""
    return isinstance(exc, psycopg.Error) and exc.sqlstate in RETRYABLE_SQLSTATES


def _retry_reason(
    exc: psycopg.Error,
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any] | None,
    *,
    committing: bool,
    idempotent: bool,
) -> str | None:
    """Say why the transaction may run again, or None if it must not.

    ``conn`` is the pooled connection the attempt used (None for a caller's own connection,
    which cannot be replaced); ``committing`` tells that ``fn`` had returned, so the break
    may have come after the server committed.
    """
    if is_retryable(exc):
        return f"conflict ({exc.sqlstate})"
    if conn is not None and conn.broken and (idempotent or not committing):
        return "connection lost" + (" during COMMIT" if committing else "")
    return None


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
    idempotent: bool = False,
) -> T:
    """Run ``fn(conn)`` in a transaction, again if it lost a concurrency race or its connection.

    Aurora DSQL checks conflicts at commit (SQLSTATE ``OC000`` for data, ``OC001`` for
    schema; PostgreSQL says ``40001``): the transaction is rolled back and may simply be run
    again. With a pool, a transaction whose connection broke (an idle cut, DSQL's one-hour
    cap, a failover, a restart) before its ``COMMIT`` was sent was rolled back too, and runs
    again on another connection. A connection that broke *during* ``COMMIT`` leaves the outcome
    unknown: the error is raised, unless ``idempotent=True`` says running ``fn`` twice is
    harmless (reads, upserts). A caller's own connection cannot be replaced, so its loss is
    raised. What broke one pooled connection (a restart, a failover) often broke its idle
    siblings too: before the next attempt the pool checks its idle connections once
    (psycopg_pool's ``check()``), so the rerun does not meet them one by one.

    ``fn`` runs inside ``conn.transaction()`` and must be safe to repeat: no side effects
    outside the database. Between attempts, waits with exponential backoff and jitter
    (``base`` doubling up to ``cap`` seconds).

    Args:
        target: A connection, or a pool to take one from for each attempt.
        fn: The transaction's work; its return value is returned.
        attempts: How many times to try at most.
        base: First backoff step in seconds.
        cap: Largest backoff step in seconds.
        idempotent: Also run again when the connection broke during ``COMMIT``.

    Raises:
        psycopg.Error: The last attempt's error, or any error that is not retryable.
        ConfigurationError: Bad ``attempts``, ``base`` or ``cap``.
    """
    _check(attempts, base, cap)
    for attempt in range(1, attempts + 1):
        conn: psycopg.Connection[Any] | None = None
        committing = False
        try:
            if isinstance(target, psycopg_pool.ConnectionPool):
                with target.connection() as conn, conn.transaction():
                    result = fn(conn)
                    committing = True
            else:
                with target.transaction():
                    result = fn(target)
                    committing = True
        except psycopg.Error as exc:
            reason = _retry_reason(exc, conn, committing=committing, idempotent=idempotent)
            if reason is None or attempt == attempts:
                raise
            if conn is not None and conn.broken and isinstance(target, psycopg_pool.ConnectionPool):
                purge(target)  # what killed this connection may have killed its idle siblings
            time.sleep(_next_delay(reason, attempt, attempts, base, cap))
        else:
            return result
    raise AssertionError("unreachable")  # pragma: no cover


async def aretry_transaction(
    target: psycopg.AsyncConnection[Any] | psycopg_pool.AsyncConnectionPool[Any],
    fn: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]],
    *,
    attempts: int = 5,
    base: float = 0.02,
    cap: float = 1.0,
    idempotent: bool = False,
) -> T:
    """Run ``await fn(conn)`` in a transaction, again if it lost a race or its connection.

    The asynchronous twin of :func:`retry_transaction`.
    """
    _check(attempts, base, cap)
    for attempt in range(1, attempts + 1):
        conn: psycopg.AsyncConnection[Any] | None = None
        committing = False
        try:
            if isinstance(target, psycopg_pool.AsyncConnectionPool):
                async with target.connection() as conn, conn.transaction():
                    result = await fn(conn)
                    committing = True
            else:
                async with target.transaction():
                    result = await fn(target)
                    committing = True
        except psycopg.Error as exc:
            reason = _retry_reason(exc, conn, committing=committing, idempotent=idempotent)
            if reason is None or attempt == attempts:
                raise
            if (
                conn is not None
                and conn.broken
                and isinstance(target, psycopg_pool.AsyncConnectionPool)
            ):
                await apurge(target)
            await asyncio.sleep(_next_delay(reason, attempt, attempts, base, cap))
        else:
            return result
    raise AssertionError("unreachable")  # pragma: no cover


def _next_delay(reason: str, attempt: int, attempts: int, base: float, cap: float) -> float:
    delay = _refresh.backoff(attempt, base=base, cap=cap)
    logger.debug(
        "transaction %s, attempt %d of %d; retrying in %.3f s", reason, attempt, attempts, delay
    )
    return delay
