"""Lost connections: find a dead pooled connection cheaply, then drop its dead idle siblings."""

from __future__ import annotations

import copy
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
    "Closed",
    "Expired",
    "LivenessCheck",
    "PurgingCheck",
    "apurge",
    "purge",
    "purging",
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


def _expired(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """Tell whether the connection is past the ``max_lifetime`` its pool gave it.

    psycopg_pool draws each connection's deadline when it opens it (``max_lifetime`` minus up
    to 5 %, so a pool's connections do not all expire together) but looks at it only when the
    connection is returned or swept, not when it is handed out: one that sat idle past its
    deadline would otherwise be handed out.
    """
    expire_at = getattr(conn, "_expire_at", None)
    return expire_at is not None and expire_at <= time.monotonic()


class Expired(psycopg.OperationalError):
    """A pooled connection is past its ``max_lifetime``: the pool replaces it."""


class Closed(psycopg.OperationalError):
    """The server closed a pooled connection while it sat in the pool: the pool replaces it."""


def _swept(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """Tell whether a refused connection calls for a sweep of its pool's idle ones."""
    return _lost(conn) or _expired(conn)


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
            if pool is not None and _swept(conn):
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
            if pool is not None and _swept(conn):
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
restart, a failover: a FATAL message, then an end of stream or a reset) shows on the socket,
which the check reads without a round trip: a closed connection is refused and replaced at
once, one with data waiting (a notice, a notification) is checked with a query.
"""


# Kept on each connection: conn._iampg_checked_out, the check's clock at its last checkout, and
# conn._iampg_poller, a select.poll object registered for its socket.
_POLLER = "_iampg_poller"
_HAS_POLL = hasattr(select, "poll")
# An end of stream (the server closed: POLLRDHUP, Linux) or a reset (POLLHUP, POLLERR) shows
# the session is gone; data alone (a notice, a notification, a FATAL message whose end of
# stream is still on its way) calls for a round trip.
_GONE = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR if _HAS_POLL else 0
_EVENTS = select.POLLIN | select.POLLPRI | _GONE if _HAS_POLL else 0
_OK = psycopg.pq.ConnStatus.OK


def _poller(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> Any:
    """Return the connection's poll object, made once and kept on the connection.

    None where the platform has no ``poll()``. A connection whose status is OK keeps the
    socket it was opened with, so the registration stays valid for its whole life.
    """
    poller = getattr(conn, _POLLER, None)
    if poller is None and _HAS_POLL:
        poller = select.poll()
        poller.register(conn.fileno(), _EVENTS)
        setattr(conn, _POLLER, poller)
    return poller


_DATA = 1  # select.POLLIN, also where the platform has no poll()


def _ready(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> list[Any]:
    """Return ``poll(0)`` on the connection's socket: empty when nothing came, no round trip.

    Each entry is a descriptor and its flags: ``POLLIN``, and where the server closed,
    ``POLLRDHUP``, ``POLLHUP`` or ``POLLERR``. Without ``poll()``, a readable socket reads as
    data. So does an error: the round trip that follows tells.
    """
    try:
        poller = _poller(conn)
        if poller is None:
            readable, _, _ = select.select([conn.fileno()], [], [], 0)
            return [(conn.fileno(), _DATA)] if readable else []
        ready: list[Any] = poller.poll(0)
    except (OSError, ValueError, psycopg.Error):
        return [(-1, _DATA)]
    return ready


def _quiet(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """Tell whether the server sent nothing since the last result, with no round trip.

    An idle session receives nothing unless the server closes it (a FATAL ErrorResponse, an end
    of stream) or has something to say (a notice, a notification): any of those makes the
    socket readable. A connection closed or broken on the client's side is not quiet either.
    """
    try:
        return conn.pgconn.status == _OK and not _ready(conn)
    except (OSError, ValueError, psycopg.Error):
        return False


def _gone(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any], events: int) -> bool:
    """Tell whether ``events`` say the server closed the session; if so, drop it (no I/O wait).

    The connection is finished on the client's side (libpq sends its goodbye and closes the
    socket, without waiting for anything): psycopg_pool then counts it lost and replaces it,
    and the check's sweep looks at the pool's other idle connections.
    """
    if not events & _GONE:
        return False
    conn.pgconn.finish()
    return True


class _Recent:
    """When each connection was last handed out, kept on the connection itself.

    An attribute of the connection rather than a table of the check's: no lock and no weak
    reference per checkout, and nothing outlives the connection. A connection is checked by
    one caller at a time (it is out of the pool meanwhile), so the attribute needs no lock.

    :meth:`trusted` runs on every checkout of a busy pool, so it is written for speed: a clock
    read, three attribute reads, one write and one ``poll`` system call, with :func:`_quiet`
    inlined and the sweep built into the check rather than wrapped around it. Plain attribute
    access, never ``conn.__dict__``: on CPython 3.11, touching an object's ``__dict__`` turns
    its inline attribute values into a real dictionary, and every later attribute access
    psycopg makes on that connection takes a slower path (measured with callgrind: +12,000
    instructions per checkout, for one ``__dict__`` write). The check costs a checkout about
    4,900 instructions (1,200 of them the ``poll``), of about 205,000 that a checkout and
    ``SELECT 1`` cost the client.

    The ``poll`` releases the GIL for its system call, like every blocking call in CPython. A
    probe that keeps it, ``getsockopt(TCP_INFO)`` on a socket object made for libpq's
    descriptor and detached at once, was measured in a pool of 8 threads: no fewer context
    switches per checkout than ``poll`` (3.45 against 3.33, plain psycopg_pool 3.30), 2,100
    more instructions (the socket object, and the ``getsockname`` that validates its
    descriptor) and a second system call. ``poll`` stayed.
    """

    def __init__(self, recent: float, clock: Callable[[], float]) -> None:
        if not recent >= 0:
            raise ValueError(f"recent must be zero or more seconds, not {recent!r}")
        self.recent = recent
        self._clock = clock
        self._monotonic = clock is time.monotonic

    def trusted(self, conn: Any) -> bool:
        """Record this checkout; tell whether the connection needs no round trip.

        Raises:
            Expired: The connection is past its pool's ``max_lifetime``.
            Closed: The server closed the connection while it sat in the pool (seen on its
                socket, without a round trip).
        """
        now = self._clock()
        # Attributes read directly (a miss raises, once per connection): a getattr() call
        # with a default costs more than the rest of the check.
        try:
            last = conn._iampg_checked_out  # noqa: SLF001 -- iampg's own attribute
        except AttributeError:  # new to the check
            last = None
        try:
            expire_at = conn._expire_at  # noqa: SLF001 -- psycopg_pool's deadline, jittered
        except AttributeError:  # not a psycopg_pool connection
            expire_at = None
        if expire_at is not None and expire_at <= (now if self._monotonic else time.monotonic()):
            raise Expired("connection past the pool's max_lifetime: replaced")
        conn._iampg_checked_out = now  # noqa: SLF001
        try:  # _quiet(conn), inlined
            if conn.pgconn.status != _OK:
                return False
            ready = conn._iampg_poller.poll(0)  # noqa: SLF001
        except AttributeError:  # no poll object yet
            ready = _ready(conn)
        except (OSError, ValueError, psycopg.Error):
            return False
        if not ready:
            return last is not None and now - last < self.recent
        if _gone(conn, ready[0][1]):
            raise Closed("the server closed the connection while it was idle in the pool")
        return False


class LivenessCheck(_Recent, PurgingCheck[CT]):
    """A pool ``check`` that queries the server only when a connection may have died unseen.

    psycopg_pool's ``check_connection`` costs a round trip per checkout (a pool of 8 threads
    running ``SELECT 1`` ran at 0.75x a pool without it). This check skips the round trip for a
    connection handed out less than ``recent`` seconds ago whose socket has nothing to read, and
    runs ``check_connection`` otherwise: for a connection that sat idle, that is new to the
    check, or that the server has written to (a notice, a notification). A connection whose
    socket shows the server closed it (an end of stream or a reset: the cap, an idle cut, a
    restart) is refused without a round trip, as is one past the ``max_lifetime`` its pool
    gave it (psycopg_pool enforces that only on return), so the pool replaces it before the
    server's own cap. Like :class:`PurgingCheck`, which it is, it sweeps the pool's idle
    connections when it finds one lost, closed or expired (once :attr:`pool` is set; iampg's
    pools set it).

    Args:
        recent: Seconds within which a connection's previous checkout makes it trusted
            (default :data:`RECENT_USE`; 0 checks every checkout with a round trip).
        clock: The monotonic clock (seconds) for ``recent``.
    """

    def __init__(
        self, recent: float = RECENT_USE, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        _Recent.__init__(self, recent, clock)
        PurgingCheck.__init__(self, psycopg_pool.ConnectionPool.check_connection)

    def __call__(self, conn: CT) -> None:
        try:
            if self.trusted(conn):
                return
            self.check(conn)
        except Exception:
            pool = self.pool() if self.pool is not None else None
            if pool is not None and _swept(conn):
                purge(pool)
            raise


class AsyncLivenessCheck(_Recent, AsyncPurgingCheck[ACT]):
    """The asynchronous twin of :class:`LivenessCheck`."""

    def __init__(
        self, recent: float = RECENT_USE, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        _Recent.__init__(self, recent, clock)
        AsyncPurgingCheck.__init__(self, psycopg_pool.AsyncConnectionPool.check_connection)

    async def __call__(self, conn: ACT) -> None:
        try:
            if self.trusted(conn):
                return
            await self.check(conn)
        except Exception:
            pool = self.pool() if self.pool is not None else None
            if pool is not None and _swept(conn):
                await apurge(pool)
            raise


def purging(check: Any, wrapper: type[PurgingCheck[Any] | AsyncPurgingCheck[Any]]) -> Any:
    """Return ``check`` able to sweep its pool: iampg's own check as it is, any other wrapped.

    A liveness check that another pool already uses is copied (its state lives on the
    connections, so the copy checks the same way).
    """
    if isinstance(check, (LivenessCheck, AsyncLivenessCheck)):
        return copy.copy(check) if check.pool is not None else check
    return wrapper(check)
