"""Lost connections: find a dead pooled connection cheaply, then drop its dead idle siblings."""

from __future__ import annotations

import logging
import select
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import psycopg
import psycopg_pool

__all__ = [
    "RECENT_USE",
    "AsyncLivenessCheck",
    "AsyncPurgingCheck",
    "LivenessCheck",
    "PurgingCheck",
    "apurge",
    "purge",
]

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


# -- the checkout check that costs no round trip when it cannot find anything ---------------

RECENT_USE = 1.0
"""Seconds since a connection's previous checkout within which the checkout check trusts it.

A connection handed out less than this long ago has been idle in the pool for less than this
long (its idle time is at most the time since that checkout). The window is what is left to a
server-side close that sends nothing, e.g. a network path that drops silently: the query then
fails as it would have a moment later, and ``retry_transaction`` runs it again. Anything the
server sends while the connection sits in the pool (DSQL's one-hour close, an idle cut, a
restart, a failover: a FATAL message or an end of stream) makes the socket readable, which the
check notices without a round trip.
"""


def _quiet(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """Tell whether the server sent nothing since the last result, with no round trip.

    An idle session receives nothing unless the server closes it (a FATAL ErrorResponse, an end
    of stream) or has something to say (a notice, a notification): any of those makes the
    socket readable, and the caller then checks with a real query.
    """
    if conn.closed or conn.broken:
        return False
    try:
        fd = conn.fileno()
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(fd, select.POLLIN | select.POLLPRI)
            return not poller.poll(0)
        readable, _, _ = select.select([fd], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return False
    return not readable


class _Recent:
    """When each connection was last handed out (weakly keyed: no connection kept alive)."""

    def __init__(self, recent: float, clock: Callable[[], float]) -> None:
        if not recent >= 0:
            raise ValueError(f"recent must be zero or more seconds, not {recent!r}")
        self.recent = recent
        self._clock = clock
        self._lock = threading.Lock()
        self._used: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()

    def trusted(self, conn: Any) -> bool:
        """Record this checkout; tell whether the connection needs no round trip."""
        now = self._clock()
        with self._lock:
            last = self._used.get(conn)
            self._used[conn] = now
        return last is not None and now - last < self.recent and _quiet(conn)


class LivenessCheck(_Recent, Generic[CT]):
    """A pool ``check`` that queries the server only when a connection may have died unseen.

    psycopg_pool's ``check_connection`` costs a round trip per checkout (a pool of 8 threads
    running ``SELECT 1`` ran at 0.75x a pool without it). This check skips the round trip for a
    connection handed out less than ``recent`` seconds ago whose socket has nothing to read, and
    runs ``check_connection`` otherwise: for a connection that sat idle, that is new to the
    check, or that the server has written to (a close, a notice).

    Args:
        recent: Seconds within which a connection's previous checkout makes it trusted
            (default :data:`RECENT_USE`; 0 checks every checkout with a round trip).
        clock: The monotonic clock (seconds).
    """

    def __init__(
        self, recent: float = RECENT_USE, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(recent, clock)

    def __call__(self, conn: CT) -> None:
        if not self.trusted(conn):
            psycopg_pool.ConnectionPool.check_connection(conn)


class AsyncLivenessCheck(_Recent, Generic[ACT]):
    """The asynchronous twin of :class:`LivenessCheck`."""

    def __init__(
        self, recent: float = RECENT_USE, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(recent, clock)

    async def __call__(self, conn: ACT) -> None:
        if not self.trusted(conn):
            await psycopg_pool.AsyncConnectionPool.check_connection(conn)
