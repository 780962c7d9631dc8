"""Lost connections: when one pooled connection is found dead, drop its dead idle siblings."""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import psycopg
import psycopg_pool

__all__ = ["AsyncPurgingCheck", "PurgingCheck", "apurge", "purge"]

logger = logging.getLogger("iampg.pool")

CT = TypeVar("CT", bound="psycopg.Connection[Any]")
ACT = TypeVar("ACT", bound="psycopg.AsyncConnection[Any]")

# A restart, a failover or an idle cut kills idle connections in bunches. psycopg_pool's
# getconn() backs off 0, 1, 2, 4, 8 ... seconds between failed checks, one connection at a
# time: four dead connections cost a caller 6.8 s, six 28.9 s (nox -s bench -- --only lost);
# eight ended in PoolTimeout even with a 60 s timeout. One pool.check() (psycopg_pool's public
# sweep) after the first loss drops them all at once.
# Pools being swept now: a second caller that finds a loss meanwhile does not sweep again.
_sweeping: weakref.WeakSet[Any] = weakref.WeakSet()
_sweeping_lock = threading.Lock()


def _claim(pool: object) -> bool:
    with _sweeping_lock:
        if pool in _sweeping:
            return False
        _sweeping.add(pool)
        return True


def _release(pool: object) -> None:
    with _sweeping_lock:
        _sweeping.discard(pool)


def purge(pool: psycopg_pool.ConnectionPool[Any]) -> None:
    """Check the pool's idle connections, replacing the dead ones (one sweep at a time)."""
    if not _claim(pool):
        return
    try:
        logger.info("a connection of %r was lost; checking its idle connections", pool.name)
        pool.check()
    finally:
        _release(pool)


async def apurge(pool: psycopg_pool.AsyncConnectionPool[Any]) -> None:
    """The asynchronous twin of :func:`purge`."""
    if not _claim(pool):
        return
    try:
        logger.info("a connection of %r was lost; checking its idle connections", pool.name)
        await pool.check()
    finally:
        _release(pool)


def _lost(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """Tell whether the connection itself is gone (not merely refused by a custom check)."""
    return conn.closed or conn.broken


class PurgingCheck(Generic[CT]):
    """A pool ``check`` that, when it finds a connection lost, sweeps the pool's idle ones.

    Wraps the check the caller chose (psycopg_pool's ``check_connection`` by default); the
    connection that failed is still refused, as before. :attr:`pool` is set once the pool
    exists (a weak reference: the check does not keep its pool alive).
    """

    def __init__(self, check: Callable[[CT], None]) -> None:
        self.check = check
        self.pool: weakref.ref[psycopg_pool.ConnectionPool[Any]] | None = None

    def __call__(self, conn: CT) -> None:
        try:
            self.check(conn)
        except Exception:
            pool = self.pool() if self.pool is not None else None
            if pool is not None and _lost(conn):
                purge(pool)
            raise


class AsyncPurgingCheck(Generic[ACT]):
    """The asynchronous twin of :class:`PurgingCheck`."""

    def __init__(self, check: Callable[[ACT], Awaitable[None]]) -> None:
        self.check = check
        self.pool: weakref.ref[psycopg_pool.AsyncConnectionPool[Any]] | None = None

    async def __call__(self, conn: ACT) -> None:
        try:
            await self.check(conn)
        except Exception:
            pool = self.pool() if self.pool is not None else None
            if pool is not None and _lost(conn):
                await apurge(pool)
            raise
