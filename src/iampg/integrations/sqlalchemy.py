"""SQLAlchemy engines, sync and async, that authenticate every new connection with a token."""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeAlias, TypeVar, overload

import psycopg
import sqlalchemy
from sqlalchemy import event

from iampg import _retry
from iampg._connecting import Secret, explain, prepare
from iampg._defaults import defaults_for
from iampg._retry import check_options
from iampg.integrations import EndpointOrProvider, _resolve

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

    from sqlalchemy.engine.interfaces import DBAPIConnection, Dialect
    from sqlalchemy.ext.asyncio import (
        AsyncConnection,
        AsyncEngine,
        AsyncSession,
        async_sessionmaker,
    )
    from sqlalchemy.orm import Session, sessionmaker
    from sqlalchemy.pool import ConnectionPoolEntry

    from iampg._endpoint import Endpoint

__all__ = [
    "aretry_transaction",
    "create_async_engine",
    "create_engine",
    "install",
    "retry_transaction",
]

logger = logging.getLogger("iampg.integrations.sqlalchemy")


def _url(endpoint: Endpoint) -> sqlalchemy.URL:
    """Return a password-less URL naming the endpoint, for the dialect, logs and reprs."""
    return sqlalchemy.URL.create(
        "postgresql+psycopg",
        username=endpoint.user,
        host=endpoint.host,
        port=endpoint.port,
        database=endpoint.dbname,
    )


def _await_function() -> Callable[[Awaitable[str]], str]:
    """Return SQLAlchemy's bridge from a greenlet to the event loop (renamed in 2.1)."""
    from sqlalchemy import util  # noqa: PLC0415

    bridge: Callable[[Awaitable[str]], str] | None = getattr(util, "await_", None)
    return bridge if bridge is not None else util.await_only


def install(
    engine: sqlalchemy.Engine,
    target: EndpointOrProvider,
    *,
    preset: str | None = None,
    allow_insecure: bool = False,
) -> None:
    """Make ``engine`` open every new DBAPI connection to ``target`` with a current token.

    Adds a ``do_connect`` listener that sets the endpoint's connection parameters (host,
    ``hostaddr``, port, user, database, ``sslmode`` …; ``connect_args`` given to the engine
    win) and the password, then connects. A refused token is forgotten so the next
    connection signs a new one; the error raised (wrapped by SQLAlchemy in
    :class:`sqlalchemy.exc.OperationalError`) is an :class:`iampg.AuthenticationError`
    listing the likely causes.

    For an async engine pass ``async_engine.sync_engine``. Tokens then come from
    :meth:`iampg.TokenProvider.atoken`, awaited through SQLAlchemy's greenlet bridge, so
    signing runs in a worker thread and never blocks the event loop.

    Args:
        engine: A SQLAlchemy engine using the ``postgresql+psycopg`` dialect.
        target: The endpoint (a provider is made for it) or the provider to share.
        preset: ``rds``, ``aurora-serverless`` (or ``aurora-express``) or ``dsql``: the
            service's ``connect_timeout``; defaults to the endpoint's service.
        allow_insecure: Allow an ``sslmode`` that may send the token in plaintext to a
            non-loopback host.

    Raises:
        ConfigurationError: Bad endpoint or options, or not a psycopg engine. Parameters
            that would send the token elsewhere or unencrypted (``connect_args`` included)
            are refused when a connection is opened.
    """
    from iampg.errors import ConfigurationError  # noqa: PLC0415

    if engine.dialect.driver != "psycopg":
        raise ConfigurationError(
            f"iampg supports SQLAlchemy's psycopg driver, not {engine.dialect.driver!r}: "
            "use a postgresql+psycopg:// URL"
        )
    connecting = prepare(target, None, preset, allow_insecure=allow_insecure)
    endpoint, provider = connecting.endpoint, connecting.provider
    from_url = {"host": engine.url.host, "port": engine.url.port}
    is_async = bool(engine.dialect.is_async)
    bridge = _await_function() if is_async else None

    @event.listens_for(engine, "do_connect")
    def _connect(
        dialect: Dialect,
        conn_rec: ConnectionPoolEntry,  # noqa: ARG001
        cargs: list[Any],
        cparams: dict[str, Any],
    ) -> DBAPIConnection:
        given = {k: v for k, v in cparams.items() if not _from_url(k, v, from_url)}
        merged = connecting.merge(given)
        token = Secret(bridge(provider.atoken()) if bridge is not None else provider.token())
        try:
            return dialect.connect(*cargs, **merged, password=token.value)
        except psycopg.OperationalError as exc:
            error = explain(exc, provider, token)
            if error is exc:
                raise
            raise error from exc

    logger.debug("engine %s authenticates with tokens for %s", engine.url, endpoint.host)


def _from_url(key: str, value: Any, url: dict[str, Any]) -> bool:
    """Tell whether a DBAPI argument is one SQLAlchemy took from the engine's URL."""
    if key in {"user", "dbname", "password"}:
        return True
    return key in url and value is not None and str(value) == str(url[key])


def create_engine(
    target: EndpointOrProvider,
    *,
    preset: str | None = None,
    allow_insecure: bool = False,
    **engine_kwargs: Any,
) -> sqlalchemy.Engine:
    """Return a SQLAlchemy engine whose new connections each authenticate with a current token.

    The engine's pool hands out open connections as usual; only a *new* connection needs a
    token, and gets one from ``target``'s provider (cached, refreshed before it expires),
    so an engine keeps working for days. Open connections are not affected by token expiry.

    Example::

        engine = iampg.integrations.sqlalchemy.create_engine(
            "postgresql://app@mydb.cluster-abc.us-east-1.rds.amazonaws.com/app",
            pool_pre_ping=True,
        )

    Args:
        target: The endpoint (a provider is made for it) or the :class:`iampg.TokenProvider`
            to share.
        preset: See :func:`install`.
        allow_insecure: See :func:`install`.
        **engine_kwargs: Passed to :func:`sqlalchemy.create_engine` (``pool_size``,
            ``pool_recycle`` in seconds, ``pool_pre_ping``, ``connect_args`` …).

    Raises:
        ConfigurationError: Bad endpoint or options.
    """
    endpoint, provider = _resolve(target)
    defaults_for(endpoint, preset)  # an unknown preset fails before the engine is made
    engine = sqlalchemy.create_engine(_url(endpoint), **engine_kwargs)
    install(engine, provider, preset=preset, allow_insecure=allow_insecure)
    return engine


def create_async_engine(
    target: EndpointOrProvider,
    *,
    preset: str | None = None,
    allow_insecure: bool = False,
    **engine_kwargs: Any,
) -> AsyncEngine:
    """Return an asyncio SQLAlchemy engine (psycopg's async driver) that signs like the sync one.

    The asynchronous twin of :func:`create_engine`: a token cached by the provider is used at
    once; a new one is signed in a worker thread (:meth:`iampg.TokenProvider.atoken`), so the
    event loop is never blocked by botocore.

    Raises:
        ConfigurationError: Bad endpoint or options.
    """
    from sqlalchemy.ext.asyncio import create_async_engine as sa_create_async_engine  # noqa: PLC0415

    endpoint, provider = _resolve(target)
    defaults_for(endpoint, preset)
    engine = sa_create_async_engine(_url(endpoint), **engine_kwargs)
    install(engine.sync_engine, provider, preset=preset, allow_insecure=allow_insecure)
    return engine


# -- transactions that run again after a conflict or a lost connection ----------------------

P = ParamSpec("P")
T = TypeVar("T")

SyncBind: TypeAlias = "sqlalchemy.Engine | sqlalchemy.Connection | Session | sessionmaker[Any]"
AsyncBind: TypeAlias = "AsyncEngine | AsyncConnection | AsyncSession | async_sessionmaker[Any]"


@overload
def retry_transaction(
    bind: sqlalchemy.Engine | sqlalchemy.Connection,
    fn: Callable[[sqlalchemy.Connection], T],
    *,
    attempts: int = ...,
    base: float = ...,
    cap: float = ...,
    idempotent: bool = ...,
) -> T: ...
@overload
def retry_transaction(
    bind: Session | sessionmaker[Any],
    fn: Callable[[Session], T],
    *,
    attempts: int = ...,
    base: float = ...,
    cap: float = ...,
    idempotent: bool = ...,
) -> T: ...
@overload
def retry_transaction(
    bind: SyncBind,
    fn: None = ...,
    *,
    attempts: int = ...,
    base: float = ...,
    cap: float = ...,
    idempotent: bool = ...,
) -> Callable[[Callable[Concatenate[Any, P], T]], Callable[P, T]]: ...
def retry_transaction(
    bind: SyncBind,
    fn: Callable[[Any], T] | None = None,
    *,
    attempts: int = 5,
    base: float = 0.02,
    cap: float = 1.0,
    idempotent: bool = False,
) -> Any:
    """Run ``fn`` in a transaction, again if it lost a concurrency race or its connection.

    :func:`iampg.retry_transaction` for SQLAlchemy, with any dialect: the conflict
    (``OC000``, ``OC001``, ``40001``) or the lost connection is found inside SQLAlchemy's
    exception (``exc.orig`` and its causes). Each attempt runs in its own transaction:

    - on an :class:`~sqlalchemy.Engine` (``engine.begin()``) or a
      :class:`~sqlalchemy.orm.sessionmaker` (``Session.begin()``), with a new connection or
      session; ``fn`` gets the :class:`~sqlalchemy.Connection` or the
      :class:`~sqlalchemy.orm.Session`;
    - on a :class:`~sqlalchemy.Connection` or a :class:`~sqlalchemy.orm.Session` not inside
      a transaction, which ``fn`` gets, inside ``begin()``.

    A connection lost before ``COMMIT`` was sent is replaced (SQLAlchemy reconnects an
    invalidated connection) and ``fn`` runs again; lost during ``COMMIT``, the outcome is
    unknown and the error is raised unless ``idempotent=True``. ``fn`` must be safe to
    repeat: no side effects outside the database. Between attempts, waits with exponential
    backoff and jitter (``base`` doubling up to ``cap`` seconds).

    Without ``fn``, returns a decorator: the decorated function takes the connection or
    session as its first argument, which its callers leave out::

        @retry_transaction(Session)  # a sessionmaker
        def transfer(session, source, target, amount): ...

        transfer(1, 2, 10)

    Args:
        bind: Where each attempt's transaction runs.
        fn: The transaction's work; its return value is returned.
        attempts: How many times to try at most.
        base: First backoff step in seconds.
        cap: Largest backoff step in seconds.
        idempotent: Also run again when the connection broke during ``COMMIT``.

    Raises:
        sqlalchemy.exc.DBAPIError: The last attempt's error, or one that is not retryable.
        ConfigurationError: Bad ``attempts``, ``base`` or ``cap``, or an unknown ``bind``.
    """
    transaction = _transaction(bind)
    check_options(attempts, base, cap)

    def run(work: Callable[[Any], T]) -> T:
        return _retry.run(
            transaction,
            work,
            replaceable=True,
            attempts=attempts,
            base=base,
            cap=cap,
            idempotent=idempotent,
        )

    if fn is not None:
        return run(fn)

    def decorate(work: Callable[Concatenate[Any, P], T]) -> Callable[P, T]:
        @functools.wraps(work)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            return run(lambda target: work(target, *args, **kwargs))

        return wrapper

    return decorate


@overload
def aretry_transaction(
    bind: AsyncEngine | AsyncConnection,
    fn: Callable[[AsyncConnection], Awaitable[T]],
    *,
    attempts: int = ...,
    base: float = ...,
    cap: float = ...,
    idempotent: bool = ...,
) -> Awaitable[T]: ...
@overload
def aretry_transaction(
    bind: AsyncSession | async_sessionmaker[Any],
    fn: Callable[[AsyncSession], Awaitable[T]],
    *,
    attempts: int = ...,
    base: float = ...,
    cap: float = ...,
    idempotent: bool = ...,
) -> Awaitable[T]: ...
@overload
def aretry_transaction(
    bind: AsyncBind,
    fn: None = ...,
    *,
    attempts: int = ...,
    base: float = ...,
    cap: float = ...,
    idempotent: bool = ...,
) -> Callable[[Callable[Concatenate[Any, P], Awaitable[T]]], Callable[P, Awaitable[T]]]: ...
def aretry_transaction(
    bind: AsyncBind,
    fn: Callable[[Any], Awaitable[T]] | None = None,
    *,
    attempts: int = 5,
    base: float = 0.02,
    cap: float = 1.0,
    idempotent: bool = False,
) -> Any:
    """Run ``await fn(...)`` in a transaction, again after a conflict or a lost connection.

    The asynchronous twin of :func:`retry_transaction`.

    For an :class:`~sqlalchemy.ext.asyncio.AsyncEngine` or ``async_sessionmaker`` (a new
    connection or session per attempt), or an ``AsyncConnection`` or ``AsyncSession`` not
    inside a transaction. Without ``fn``, a decorator for coroutine functions::

        @aretry_transaction(async_session)
        async def transfer(session, source, target, amount): ...

        await transfer(1, 2, 10)
    """
    transaction = _atransaction(bind)
    check_options(attempts, base, cap)

    async def run(work: Callable[[Any], Awaitable[T]]) -> T:
        return await _retry.arun(
            transaction,
            work,
            replaceable=True,
            attempts=attempts,
            base=base,
            cap=cap,
            idempotent=idempotent,
        )

    if fn is not None:
        return run(fn)

    def decorate(work: Callable[Concatenate[Any, P], Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(work)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            return await run(lambda target: work(target, *args, **kwargs))

        return wrapper

    return decorate


def _transaction(bind: object) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """Return what opens one attempt's transaction on ``bind``."""
    from sqlalchemy.orm import Session, sessionmaker  # noqa: PLC0415

    if isinstance(bind, sqlalchemy.Engine | sessionmaker):
        return bind.begin
    if isinstance(bind, sqlalchemy.Connection | Session):
        target = bind

        @contextlib.contextmanager
        def begun() -> Iterator[Any]:
            with target.begin():
                yield target

        return begun
    raise _unknown_bind(bind, "an Engine, Connection, Session or sessionmaker")


def _atransaction(bind: object) -> Callable[[], contextlib.AbstractAsyncContextManager[Any]]:
    """Return what opens one attempt's transaction on an asyncio ``bind``."""
    from sqlalchemy.ext import asyncio as sa_asyncio  # noqa: PLC0415

    if isinstance(bind, sa_asyncio.AsyncEngine | sa_asyncio.async_sessionmaker):
        return bind.begin
    if isinstance(bind, sa_asyncio.AsyncConnection | sa_asyncio.AsyncSession):
        target = bind

        @contextlib.asynccontextmanager
        async def begun() -> AsyncIterator[Any]:
            async with target.begin():
                yield target

        return begun
    raise _unknown_bind(bind, "an AsyncEngine, AsyncConnection, AsyncSession or async_sessionmaker")


def _unknown_bind(bind: object, expected: str) -> Exception:
    from iampg.errors import ConfigurationError  # noqa: PLC0415

    return ConfigurationError(f"retry_transaction needs {expected}, not {type(bind).__name__}")
