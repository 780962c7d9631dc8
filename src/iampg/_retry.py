"""Retry transactions that lost a concurrency race (Aurora DSQL) or their connection."""

from __future__ import annotations

import asyncio
import contextlib
import copy as _copy
import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, Protocol, TypeVar

from iampg import _refresh
from iampg.errors import ConfigurationError, Error

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool
    from typing_extensions import Self

__all__ = [
    "RETRYABLE_SQLSTATES",
    "AsyncDecorator",
    "Attempts",
    "Begin",
    "Decorator",
    "PoolOrConnection",
    "aretry_transaction",
    "aretrying",
    "arun",
    "call_or_decorate",
    "check_options",
    "conflict_sqlstate",
    "is_connection_lost",
    "is_retryable",
    "retry_transaction",
    "retrying",
    "run",
    "unknown_target",
]

logger = logging.getLogger("iampg.retry")

T = TypeVar("T")
C = TypeVar("C")
P = ParamSpec("P")
M_co = TypeVar("M_co", covariant=True)


class Decorator(Protocol):
    """What ``retry_transaction(target)`` returns: its function gets the target first."""

    def __call__(self, work: Callable[Concatenate[Any, P], T], /) -> Callable[P, T]:
        """Return ``work`` retried, called without its first argument."""
        ...


class AsyncDecorator(Protocol):
    """The coroutine-function form of :class:`Decorator`."""

    def __call__(
        self, work: Callable[Concatenate[Any, P], Awaitable[T]], /
    ) -> Callable[P, Awaitable[T]]:
        """Return ``work`` retried, called without its first argument."""
        ...


RETRYABLE_SQLSTATES = frozenset({"40001", "OC000", "OC001"})
"""Serialization failure, and DSQL's optimistic-concurrency conflicts on data and schema."""

# The server ended the session: an administrator, a shutdown, a crash (class 08 is the
# client's own connection exceptions, asyncpg's ConnectionDoesNotExistError included).
_LOST_SQLSTATES = frozenset({"57P01", "57P02", "57P03"})


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """Yield ``exc`` and the errors it wraps: ``orig`` (SQLAlchemy), causes and contexts.

    Drivers and ORMs re-raise the driver's error as their own (SQLAlchemy's
    ``DBAPIError.orig``, Django's ``__cause__``); a context counts unless it was suppressed
    (``raise ... from None``), as in a printed traceback. Each error is visited once.
    """
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        error = pending.pop(0)
        if id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        orig = getattr(error, "orig", None)
        linked = [orig, error.__cause__]
        if not error.__suppress_context__:
            linked.append(error.__context__)
        pending.extend(e for e in linked if isinstance(e, BaseException))


def _sqlstate(error: BaseException) -> str | None:
    """Return the SQLSTATE a driver attached to ``error``, if any.

    psycopg and asyncpg call it ``sqlstate``, psycopg2 ``pgcode``; pg8000 passes the server's
    fields as a dict whose ``C`` is the code.
    """
    for name in ("sqlstate", "pgcode"):
        value = getattr(error, name, None)
        if isinstance(value, str) and value:
            return value
    fields = error.args[0] if error.args else None
    if isinstance(fields, dict) and isinstance(fields.get("C"), str):
        return str(fields["C"])
    return None


def conflict_sqlstate(exc: BaseException) -> str | None:
    """Return the conflict SQLSTATE (``OC000``, ``OC001``, ``40001``) found in ``exc``'s chain."""
    for error in _chain(exc):
        code = _sqlstate(error)
        if code in RETRYABLE_SQLSTATES:
            return code
    return None


def is_retryable(exc: BaseException) -> bool:
    """Tell whether the error is a concurrency conflict, after which a rerun may succeed.

    The conflict may be wrapped by an ORM or driver (SQLAlchemy, Django …): the whole chain
    is searched.
    """
    return conflict_sqlstate(exc) is not None


def is_connection_lost(exc: BaseException) -> bool:
    """Tell whether the error says the connection itself was lost, whoever wrapped it.

    Recognised: SQLAlchemy's ``connection_invalidated``, a SQLSTATE of class ``08`` or an
    administrator's or crash shutdown (``57P01``-``57P03``), and :class:`ConnectionError`.
    """
    for error in _chain(exc):
        if getattr(error, "connection_invalidated", False) is True:
            return True
        if isinstance(error, ConnectionError):
            return True
        code = _sqlstate(error)
        if code is not None and (code.startswith("08") or code in _LOST_SQLSTATES):
            return True
    return False


def retry_reason(
    exc: BaseException,
    *,
    broken: bool,
    replaceable: bool,
    committing: bool,
    idempotent: bool,
) -> str | None:
    """Say why the transaction may run again, or None if it must not.

    Args:
        exc: What the attempt raised.
        broken: The driver says the attempt's connection is gone, whatever ``exc`` says.
        replaceable: The next attempt gets another connection (a pool, an engine); a
            caller's own connection cannot be replaced, so its loss is not retried.
        committing: ``fn`` had returned: the break may have come after the server committed.
        idempotent: Running ``fn`` twice is harmless.
    """
    if any(isinstance(error, Error) for error in _chain(exc)):
        return None  # iampg's own verdicts (a refused token, a service still unavailable)
    code = conflict_sqlstate(exc)
    if code is not None:
        return f"conflict ({code})"
    lost = broken or is_connection_lost(exc)
    if replaceable and lost and (idempotent or not committing):
        return "connection lost" + (" during COMMIT" if committing else "")
    return None


def _retry_reason(
    exc: psycopg.Error,
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any] | None,
    *,
    committing: bool,
    idempotent: bool,
) -> str | None:
    """Say why a psycopg transaction may run again; ``conn`` is the pooled one, or None."""
    return retry_reason(
        exc,
        broken=conn is not None and conn.broken,
        replaceable=conn is not None,
        committing=committing,
        idempotent=idempotent,
    )


def check_options(attempts: int, base: float, cap: float) -> None:
    """Refuse ``attempts`` below 1 and backoff steps that are not ``0 < base <= cap``."""
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

    Aurora DSQL checks conflicts at commit (SQLSTATE ``40001``, with ``OC000`` for data or
    ``OC001`` for schema in the message; ``OC000``/``OC001`` as the SQLSTATE itself are
    recognised too, as is PostgreSQL's own ``40001``): the transaction is rolled back and may
    simply be run again. With a pool, a transaction whose connection broke (an idle cut, DSQL's
    one-hour cap, a failover, a restart) before its ``COMMIT`` was sent was rolled back too, and
    runs again on another connection. A connection that broke *during* ``COMMIT`` leaves the
    outcome unknown: the error is raised, unless ``idempotent=True`` says running ``fn`` twice
    is harmless (reads, upserts). A caller's own connection cannot be replaced, so its loss is
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
    import psycopg  # noqa: PLC0415 -- psycopg loads when a psycopg helper is used
    import psycopg_pool  # noqa: PLC0415

    from iampg._lost import purge  # noqa: PLC0415

    check_options(attempts, base, cap)
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
    import psycopg  # noqa: PLC0415 -- psycopg loads when a psycopg helper is used
    import psycopg_pool  # noqa: PLC0415

    from iampg._lost import apurge  # noqa: PLC0415

    check_options(attempts, base, cap)
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


def run(
    transaction: Callable[[], contextlib.AbstractContextManager[C]],
    fn: Callable[[C], T],
    *,
    replaceable: bool,
    broken: Callable[[], bool] | None = None,
    lost: Callable[[], None] | None = None,
    attempts: int = 5,
    base: float = 0.02,
    cap: float = 1.0,
    idempotent: bool = False,
) -> T:
    """Run ``fn`` in ``transaction()`` with the retry policy of :func:`retry_transaction`.

    The driver-neutral loop the integrations use: ``transaction()`` opens one attempt's
    transaction (committing on a normal exit) and yields what ``fn`` receives.

    Args:
        transaction: Opens one attempt's transaction.
        fn: The transaction's work.
        replaceable: See :func:`retry_reason`.
        broken: Called after a failed attempt: whether the driver found its connection gone.
        lost: Called after an attempt lost its connection, before the next one (to check
            the pool's idle connections, say).
        attempts: How many times to try at most.
        base: First backoff step in seconds.
        cap: Largest backoff step in seconds.
        idempotent: Also run again when the connection broke during ``COMMIT``.

    Raises:
        ConfigurationError: Bad ``attempts``, ``base`` or ``cap``.
    """
    check_options(attempts, base, cap)
    policy = _Policy(attempts, broken, replaceable, idempotent)
    for attempt in range(1, attempts + 1):
        committing = False
        try:
            with transaction() as target:
                result = fn(target)
                committing = True
        except Exception as exc:
            reason = policy.again(exc, attempt, committing=committing)
            if reason is None:
                raise
            if lost is not None and reason.startswith("connection lost"):
                lost()
            time.sleep(_next_delay(reason, attempt, attempts, base, cap))
        else:
            return result
    raise AssertionError("unreachable")  # pragma: no cover


async def arun(
    transaction: Callable[[], contextlib.AbstractAsyncContextManager[C]],
    fn: Callable[[C], Awaitable[T]],
    *,
    replaceable: bool,
    broken: Callable[[], bool] | None = None,
    lost: Callable[[], Awaitable[None]] | None = None,
    attempts: int = 5,
    base: float = 0.02,
    cap: float = 1.0,
    idempotent: bool = False,
) -> T:
    """The asynchronous twin of :func:`run`."""
    check_options(attempts, base, cap)
    policy = _Policy(attempts, broken, replaceable, idempotent)
    for attempt in range(1, attempts + 1):
        committing = False
        try:
            async with transaction() as target:
                result = await fn(target)
                committing = True
        except Exception as exc:
            reason = policy.again(exc, attempt, committing=committing)
            if reason is None:
                raise
            if lost is not None and reason.startswith("connection lost"):
                await lost()
            await asyncio.sleep(_next_delay(reason, attempt, attempts, base, cap))
        else:
            return result
    raise AssertionError("unreachable")  # pragma: no cover


@dataclasses.dataclass(frozen=True)
class _Policy:
    """What :func:`run` and :func:`arun` were told about retrying."""

    attempts: int
    broken: Callable[[], bool] | None
    replaceable: bool
    idempotent: bool

    def again(self, exc: Exception, attempt: int, *, committing: bool) -> str | None:
        """Say why the loop tries again after ``exc``, or None if it must raise it."""
        if attempt == self.attempts:
            return None
        return retry_reason(
            exc,
            broken=self.broken() if self.broken is not None else False,
            replaceable=self.replaceable,
            committing=committing,
            idempotent=self.idempotent,
        )


def call_or_decorate(
    once: Callable[[Callable[[Any], T]], T],
    fn: Callable[[Any], T] | None,
    *,
    with_target: bool = True,
) -> Any:
    """Return ``once(fn)``, or without ``fn`` a decorator whose functions run through ``once``.

    The two forms of the integrations' ``retry_transaction``. ``once(work)`` runs ``work``
    (with retries) and returns its result; the decorated function is called as
    ``work(target, *args, **kwargs)`` with what ``once`` hands it, or without the target
    when ``with_target`` is false.
    """
    if fn is not None:
        return once(fn)

    def decorate(work: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(work)
        def wrapper(*args: Any, **kwargs: Any) -> T:
            if with_target:
                return once(lambda target: work(target, *args, **kwargs))
            return once(lambda _: work(*args, **kwargs))

        return wrapper

    return decorate


def acall_or_decorate(
    once: Callable[[Callable[[Any], Awaitable[T]]], Awaitable[T]],
    fn: Callable[[Any], Awaitable[T]] | None,
) -> Any:
    """The asynchronous twin of :func:`call_or_decorate`: the decorator makes coroutines."""
    if fn is not None:
        return once(fn)

    def decorate(work: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        @functools.wraps(work)
        async def wrapper(*args: Any, **kwargs: Any) -> T:
            return await once(lambda target: work(target, *args, **kwargs))

        return wrapper

    return decorate


class Attempts(Protocol[M_co]):
    """Where a retried transaction's attempts run: what :func:`retrying` needs to know."""

    @property
    def replaceable(self) -> bool:
        """Whether each attempt gets another connection (a pool, an engine)."""
        ...

    def transaction(self) -> M_co:
        """Open one attempt's transaction: a context manager yielding what ``fn`` receives."""
        ...

    def broken(self) -> bool:
        """Tell whether the driver found the last attempt's connection gone."""
        ...

    def fresh(self) -> Attempts[M_co]:
        """Return attempts for one run: no state shared with another run, concurrent or not."""
        ...


class PoolOrConnection:
    """Attempts on a driver's pool (a connection each) or on one connection of the caller's.

    Subclasses define ``transaction()`` and set ``lost`` when it finds that an attempt's
    pooled connection was lost.
    """

    def __init__(
        self,
        target: Any,
        *,
        pool: type[Any] | tuple[type[Any], ...],
        connection: type[Any] | tuple[type[Any], ...],
        expected: str,
    ) -> None:
        if isinstance(target, pool):
            self.replaceable = True
        elif isinstance(target, connection):
            self.replaceable = False
        else:
            raise unknown_target(target, expected)
        self.target = target
        self.lost = False

    def broken(self) -> bool:
        """Tell whether the last attempt's pooled connection was lost."""
        return self.lost

    def fresh(self) -> Self:
        """Return a copy for one run, nothing lost yet (calls of a decorated function overlap)."""
        copy = _copy.copy(self)
        copy.lost = False
        return copy


@dataclasses.dataclass(frozen=True)
class Begin(Generic[M_co]):
    """Attempts that each begin a transaction on something that replaces lost connections."""

    transaction: Callable[[], M_co]
    replaceable: bool = True

    def broken(self) -> bool:
        """Say no: the error itself tells whether the connection was lost."""
        return False

    def fresh(self) -> Begin[M_co]:
        """Return itself: it holds no state between runs."""
        return self


def unknown_target(target: object, expected: str) -> ConfigurationError:
    """Return the error for a ``retry_transaction`` target that is not ``expected``."""
    return ConfigurationError(f"retry_transaction needs {expected}, not {type(target).__name__}")


def retrying(
    attempt: Attempts[contextlib.AbstractContextManager[Any]],
    fn: Callable[[Any], T] | None,
    *,
    attempts: int,
    base: float,
    cap: float,
    idempotent: bool,
) -> Any:
    """Check the options, then :func:`run` ``fn`` or return a decorator for it.

    The body of an integration's ``retry_transaction(target, fn=None, ...)``: see
    :func:`run` for the options and :func:`call_or_decorate` for the two forms.

    Raises:
        ConfigurationError: Bad ``attempts``, ``base`` or ``cap``.
    """
    options = {"attempts": attempts, "base": base, "cap": cap, "idempotent": idempotent}
    return call_or_decorate(_bound(run, attempt, options), fn)


def aretrying(
    attempt: Attempts[contextlib.AbstractAsyncContextManager[Any]],
    fn: Callable[[Any], Awaitable[T]] | None,
    *,
    attempts: int,
    base: float,
    cap: float,
    idempotent: bool,
) -> Any:
    """The asynchronous twin of :func:`retrying`, with :func:`arun`."""
    options = {"attempts": attempts, "base": base, "cap": cap, "idempotent": idempotent}
    return acall_or_decorate(_bound(arun, attempt, options), fn)


def _bound(
    runner: Callable[..., Any], attempt: Attempts[Any], options: dict[str, Any]
) -> Callable[[Any], Any]:
    """Check ``options``; return ``runner`` (:func:`run`, :func:`arun`) for one ``work``.

    Each call gets its own :meth:`Attempts.fresh` copy of ``attempt``, so the calls of a
    decorated function running at once do not share what one of them found.
    """
    check_options(options["attempts"], options["base"], options["cap"])

    def once(work: Any) -> Any:
        own = attempt.fresh()
        return runner(
            own.transaction, work, replaceable=own.replaceable, broken=own.broken, **options
        )

    return once


def _next_delay(reason: str, attempt: int, attempts: int, base: float, cap: float) -> float:
    delay = _refresh.backoff(attempt, base=base, cap=cap)
    logger.debug(
        "transaction %s, attempt %d of %d; retrying in %.3f s", reason, attempt, attempts, delay
    )
    return delay
