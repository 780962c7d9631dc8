"""SQLAlchemy engines, sync and async, that authenticate every new connection with a token."""

from __future__ import annotations

import contextlib
import logging
import random
import re
import time
from typing import (
    TYPE_CHECKING,
    Any,
    TypeAlias,
    TypeVar,
    cast,
    overload,
)

import psycopg
import sqlalchemy
from sqlalchemy import event

from iampg import _retry
from iampg._connecting import (
    Secret,
    Target,
    explain,
    final_params,
    open_verified,
    prepare,
    with_root,
)
from iampg._defaults import ServiceDefaults, defaults_for
from iampg.errors import AuthenticationError
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
    "ASYNC_DRIVERS",
    "SYNC_DRIVERS",
    "aretry_transaction",
    "create_async_engine",
    "create_engine",
    "install",
    "retry_transaction",
]

logger = logging.getLogger("iampg.integrations.sqlalchemy")


SYNC_DRIVERS = ("psycopg", "psycopg2", "pg8000")
"""SQLAlchemy's PostgreSQL drivers :func:`create_engine` and :func:`install` support."""

ASYNC_DRIVERS = ("psycopg", "asyncpg")
"""The asyncio drivers :func:`create_async_engine` and :func:`install` support."""

_SCHEME = re.compile(r"(?i)postgres(?:ql)?\+([a-z0-9_]+)://")


def _url(endpoint: Endpoint, driver: str) -> sqlalchemy.URL:
    """Return a password-less URL naming the endpoint, for the dialect, logs and reprs."""
    return sqlalchemy.URL.create(
        f"postgresql+{driver}",
        username=endpoint.user,
        host=endpoint.host,
        port=endpoint.port,
        database=endpoint.dbname,
    )


def _driver(
    target: EndpointOrProvider, driver: str | None, supported: tuple[str, ...], factory: str
) -> tuple[EndpointOrProvider, str]:
    """Take the driver from a ``postgresql+<driver>://`` URL or ``driver=``; check it.

    Raises:
        ConfigurationError: An unsupported driver, or the URL and ``driver=`` disagree.
    """
    from iampg.errors import ConfigurationError  # noqa: PLC0415

    if isinstance(target, str) and (match := _SCHEME.match(target.strip())):
        named = match.group(1).lower()
        if driver is not None and driver != named:
            raise ConfigurationError(
                f"the URL names the {named!r} driver and driver={driver!r}: pass one of them"
            )
        driver = named
        target = "postgresql://" + target.strip()[match.end() :]
    driver = driver or "psycopg"
    if driver not in supported:
        other = "create_async_engine" if factory == "create_engine" else "create_engine"
        hint = f"; {driver!r} is for {other}" if driver in SYNC_DRIVERS + ASYNC_DRIVERS else ""
        raise ConfigurationError(
            f"{factory} supports the {', '.join(supported)} drivers, not {driver!r}{hint}"
        )
    return target, driver


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

    Adds a ``do_connect`` listener that gives every new connection the endpoint's connection
    parameters, in the driver's own terms, and a current token as its password; ``connect_args``
    given to the engine win, and are checked like :func:`iampg.connect`'s arguments (the token
    goes only to the host, address and port it is signed for, over TLS). The drivers:

    - ``psycopg`` (sync and asyncio) and ``psycopg2``: libpq's parameters (``host`` with
      ``hostaddr``, ``sslmode``, ``sslrootcert`` …);
    - ``asyncpg`` and ``pg8000``, which have no ``hostaddr``: the address is dialled and an
      :class:`ssl.SSLContext` sends SNI for and verifies the signed host name, as libpq does
      (see :func:`iampg.integrations.asyncpg.ssl_context`); ``application_name`` and
      ``options`` become server settings. pg8000 has no connect timeout of its own (its
      ``timeout`` limits every query too), so ``connect_timeout`` is not applied to it.

    A refused token is forgotten so the next connection signs a new one; the error raised
    (wrapped by SQLAlchemy in :class:`sqlalchemy.exc.OperationalError`) is an
    :class:`iampg.AuthenticationError`, and the driver's own ``OperationalError``, listing the
    likely causes.

    For an async engine pass ``async_engine.sync_engine``. Tokens then come from
    :meth:`iampg.TokenProvider.atoken`, awaited through SQLAlchemy's greenlet bridge, so
    signing runs in a worker thread and never blocks the event loop.

    Args:
        engine: A SQLAlchemy engine using one of :data:`SYNC_DRIVERS` or
            :data:`ASYNC_DRIVERS`.
        target: The endpoint (a provider is made for it) or the provider to share.
        preset: ``rds``, ``aurora-serverless`` (or ``aurora-express``) or ``dsql``: the
            service's ``connect_timeout``; defaults to the endpoint's service.
        allow_insecure: Allow an ``sslmode`` that may send the token in plaintext to a
            non-loopback host.

    Raises:
        ConfigurationError: Bad endpoint or options, or an unsupported driver. Parameters
            that would send the token elsewhere or unencrypted (``connect_args`` included)
            are refused when a connection is opened.
    """
    from iampg.errors import ConfigurationError  # noqa: PLC0415

    driver = engine.dialect.driver
    supported = ASYNC_DRIVERS if engine.dialect.is_async else SYNC_DRIVERS
    if driver not in supported:
        raise ConfigurationError(
            f"iampg supports SQLAlchemy's {', '.join(supported)} drivers here, not {driver!r}: "
            f"use a postgresql+{supported[0]}:// URL"
        )
    connecting = prepare(target, None, preset, allow_insecure=allow_insecure)
    endpoint, provider = connecting.endpoint, connecting.provider
    arguments = _ARGUMENTS[driver](connecting)
    libpq = _ARGUMENTS[driver] is _libpq  # libpq reads the CA file on every connection
    explained = _explained_class(engine.dialect.loaded_dbapi)
    from_url = {"host": engine.url.host, "port": engine.url.port}
    bridge = _await_function() if engine.dialect.is_async else None

    @event.listens_for(engine, "do_connect")
    def _connect(
        dialect: Dialect,
        conn_rec: ConnectionPoolEntry,  # noqa: ARG001
        cargs: list[Any],
        cparams: dict[str, Any],
    ) -> DBAPIConnection:
        given = {k: v for k, v in cparams.items() if not _from_url(k, v, from_url)}
        kwargs = arguments(given)
        token = Secret(bridge(provider.atoken()) if bridge is not None else provider.token())
        try:
            return open_verified(
                lambda root: dialect.connect(
                    *cargs, **with_root(kwargs, root), password=token.value
                ),
                final_params("", kwargs) if libpq else {},
            )
        except Exception as exc:
            server = _server_error(exc)
            error = explain(cast("Any", server), provider, token, kwargs)
            if error is server:
                raise
            raise (error if isinstance(error, explained) else explained(str(error))) from exc

    logger.debug("engine %s authenticates with tokens for %s", engine.url, endpoint.host)


def _from_url(key: str, value: Any, url: dict[str, Any]) -> bool:
    """Tell whether a DBAPI argument is one SQLAlchemy took from the engine's URL."""
    if key in {"user", "dbname", "database", "password"}:
        return True
    return key in url and value is not None and str(value) == str(url[key])


Arguments: TypeAlias = "Callable[[dict[str, Any]], dict[str, Any]]"


def _libpq(connecting: Target) -> Arguments:
    """Psycopg and psycopg2: the endpoint's libpq parameters, the caller's on top, checked."""
    return connecting.merge


def _asyncpg(connecting: Target) -> Arguments:
    """asyncpg: its own arguments for the endpoint, the caller's on top, checked."""
    from iampg.integrations import asyncpg as iampg_asyncpg  # noqa: PLC0415

    base = iampg_asyncpg._arguments(connecting.endpoint, connecting.params)  # noqa: SLF001

    def arguments(given: dict[str, Any]) -> dict[str, Any]:
        iampg_asyncpg._check_overrides(  # noqa: SLF001
            connecting.endpoint, given, allow_insecure=connecting.allow_insecure
        )
        return {**base, **given}

    return arguments


def _pg8000(connecting: Target) -> Arguments:
    """pg8000: its own arguments for the endpoint, the caller's on top, checked."""
    from iampg.errors import ConfigurationError  # noqa: PLC0415
    from iampg.integrations import asyncpg as iampg_asyncpg  # noqa: PLC0415

    endpoint, params = connecting.endpoint, connecting.params
    base: dict[str, Any] = {
        "host": endpoint.dialled,
        "port": endpoint.port,
        "user": endpoint.user,
        "database": endpoint.dbname,
    }
    context = iampg_asyncpg.ssl_context(endpoint, params)
    # pg8000 uses an SSLContext as is; None asks for TLS and falls back to plaintext (allow,
    # prefer); False never asks (disable).
    if context is not None:
        base["ssl_context"] = context
    else:
        base["ssl_context"] = False if params.get("sslmode") == "disable" else None
    startup: dict[str, str] = {}
    unsupported: list[str] = []
    for key, value in params.items():
        if key in _PG8000_HANDLED or (key == "sslsni" and value == "1"):
            continue
        if key == "application_name":
            base["application_name"] = value
        elif key == "options":
            startup.update(iampg_asyncpg._options(value))  # noqa: SLF001
        else:
            unsupported.append(key)
    if unsupported:
        raise ConfigurationError(
            f"pg8000 has no equivalent of {', '.join(sorted(unsupported))}: "
            "remove it from the endpoint, or use the psycopg driver"
        )
    if startup:
        base["startup_params"] = startup

    def arguments(given: dict[str, Any]) -> dict[str, Any]:
        iampg_asyncpg._check_overrides(  # noqa: SLF001
            endpoint, given, allow_insecure=connecting.allow_insecure, ssl_key="ssl_context"
        )
        return {**base, **given}

    return arguments


# Parameters pg8000 gets in its own terms, or (connect_timeout) cannot honour safely.
_PG8000_HANDLED = frozenset(
    {
        "host",
        "hostaddr",
        "port",
        "user",
        "dbname",
        "sslmode",
        "sslrootcert",
        "sslcert",
        "sslkey",
        "connect_timeout",
    }
)

_ARGUMENTS: dict[str, Callable[[Target], Arguments]] = {
    "psycopg": _libpq,
    "psycopg2": _libpq,
    "asyncpg": _asyncpg,
    "pg8000": _pg8000,
}

_EXPLAINED: dict[type[BaseException], type[Exception]] = {}


def _explained_class(dbapi: Any) -> type[Exception]:
    """Return the class of an explained refusal: iampg's, and the driver's OperationalError.

    SQLAlchemy wraps an error of the driver's DBAPI in :class:`sqlalchemy.exc.OperationalError`
    (``orig`` is it); iampg users catch :class:`iampg.AuthenticationError`: the class is both.
    """
    operational: type[BaseException] = getattr(dbapi, "OperationalError", psycopg.OperationalError)
    if issubclass(AuthenticationError, operational):
        return AuthenticationError  # psycopg's: iampg's own class already is one
    if operational.__module__.startswith("psycopg2"):
        from iampg.integrations.psycopg2 import AuthenticationError as Psycopg2Error  # noqa: PLC0415

        return Psycopg2Error
    if operational not in _EXPLAINED:
        _EXPLAINED[operational] = type(
            "AuthenticationError",
            (AuthenticationError, operational),
            {"__module__": "iampg.integrations.sqlalchemy", "__doc__": AuthenticationError.__doc__},
        )
    return _EXPLAINED[operational]


def _server_error(exc: BaseException) -> BaseException:
    """Return what the server said, readably: pg8000 carries its fields as a dict."""
    fields = exc.args[0] if exc.args else None
    if isinstance(fields, dict) and isinstance(fields.get("M"), str):
        hint = f"\nHINT:  {fields['H']}" if isinstance(fields.get("H"), str) else ""
        return Exception(f"FATAL:  {fields['M']}{hint}")
    return exc


def _dsql_dialect_options(endpoint: Endpoint, driver: str, engine_kwargs: dict[str, Any]) -> None:
    """Keep the psycopg dialects from looking hstore up on DSQL, which has no extensions.

    The lookup runs inside SQLAlchemy's first transaction, in a SAVEPOINT, which DSQL
    refuses: the first connection would fail.
    """
    if endpoint.kind == "dsql" and driver in ("psycopg", "psycopg2"):
        engine_kwargs.setdefault("use_native_hstore", False)


def create_engine(
    target: EndpointOrProvider,
    *,
    driver: str | None = None,
    preset: str | None = None,
    max_idle: float | None = None,
    allow_insecure: bool = False,
    **engine_kwargs: Any,
) -> sqlalchemy.Engine:
    """Return a SQLAlchemy engine whose new connections each authenticate with a current token.

    The engine's pool hands out open connections as usual; only a *new* connection needs a
    token, and gets one from ``target``'s provider (cached, refreshed before it expires),
    so an engine keeps working for days. Open connections are not affected by token expiry.

    The driver is named as SQLAlchemy users write it, in the URL's scheme
    (``postgresql+psycopg2://…``), or with ``driver=``; psycopg by default.

    Example::

        engine = iampg.integrations.sqlalchemy.create_engine(
            "postgresql+psycopg://app@mydb.cluster-abc.us-east-1.rds.amazonaws.com/app",
            pool_pre_ping=True,
        )

    The service's pool settings apply where ``engine_kwargs`` say nothing (see ``preset``
    and :doc:`/howto/integrations`):

    - DSQL: ``pool_recycle=3300`` (under DSQL's one-hour cap; each connection's lifetime is
      shortened by up to 5 % at random, so connections opened together are not replaced
      together) and ``pool_pre_ping=True`` (a connection the cap closed while it sat in the
      pool is replaced at checkout, not handed out);
    - Aurora Serverless: ``pool_timeout=60`` (a checkout outlives a resume) and connections
      idle for 240 s are replaced at checkout (``max_idle``), before Aurora's idle cut at
      about 5 minutes could have closed them; SQLAlchemy's pool opens connections only when
      asked, so it already lets an idle cluster pause;
    - every preset: libpq's ``connect_timeout`` (asyncpg's ``timeout``; 45 s for Aurora
      Serverless, 10 s otherwise), through :func:`install`.

    Args:
        target: The endpoint (a provider is made for it; a URL may name the driver) or the
            :class:`iampg.TokenProvider` to share.
        driver: ``psycopg``, ``psycopg2`` or ``pg8000`` (see :func:`install`).
        preset: ``rds``, ``aurora-serverless`` (or ``aurora-express``) or ``dsql``; defaults
            to the endpoint's service.
        max_idle: Replace, at checkout, a connection that sat unused in the pool this many
            seconds or more; ``None`` for the preset's (240 s for Aurora Serverless, none
            otherwise), ``0`` for no limit.
        allow_insecure: See :func:`install`.
        **engine_kwargs: Passed to :func:`sqlalchemy.create_engine` (``pool_size``,
            ``pool_recycle`` in seconds, ``-1`` for never; ``pool_pre_ping``,
            ``connect_args`` …); they win over the preset's.

    Raises:
        ConfigurationError: Bad endpoint, driver or options.
    """
    target, driver = _driver(target, driver, SYNC_DRIVERS, "create_engine")
    endpoint, provider = _resolve(target)
    defaults = defaults_for(endpoint, preset)  # an unknown preset fails before the engine
    _dsql_dialect_options(endpoint, driver, engine_kwargs)
    options, checks = _pool_options(defaults, engine_kwargs, max_idle)
    engine = sqlalchemy.create_engine(_url(endpoint, driver), **options)
    install(engine, provider, preset=preset, allow_insecure=allow_insecure)
    checks.install(engine)
    return engine


def create_async_engine(
    target: EndpointOrProvider,
    *,
    driver: str | None = None,
    preset: str | None = None,
    max_idle: float | None = None,
    allow_insecure: bool = False,
    **engine_kwargs: Any,
) -> AsyncEngine:
    """Return an asyncio SQLAlchemy engine that signs like the sync one.

    The asynchronous twin of :func:`create_engine`, with psycopg's async driver or asyncpg
    (``postgresql+asyncpg://…`` or ``driver="asyncpg"``): a token cached by the provider is
    used at once; a new one is signed in a worker thread
    (:meth:`iampg.TokenProvider.atoken`), so the event loop is never blocked by botocore.
    The service's pool settings and ``max_idle`` are :func:`create_engine`'s.

    Raises:
        ConfigurationError: Bad endpoint, driver or options.
    """
    from sqlalchemy.ext.asyncio import create_async_engine as sa_create_async_engine  # noqa: PLC0415

    target, driver = _driver(target, driver, ASYNC_DRIVERS, "create_async_engine")
    endpoint, provider = _resolve(target)
    defaults = defaults_for(endpoint, preset)
    _dsql_dialect_options(endpoint, driver, engine_kwargs)
    options, checks = _pool_options(defaults, engine_kwargs, max_idle)
    engine = sa_create_async_engine(_url(endpoint, driver), **options)
    install(engine.sync_engine, provider, preset=preset, allow_insecure=allow_insecure)
    checks.install(engine.sync_engine)
    return engine


# -- the service's pool settings ------------------------------------------------------------

_JITTER = 0.05  # the share of a connection's lifetime taken off at random, as psycopg_pool does


def _pool_options(
    defaults: ServiceDefaults, given: dict[str, Any], max_idle: float | None
) -> tuple[dict[str, Any], _CheckoutChecks]:
    """Put the preset's pool settings under the caller's engine arguments.

    DSQL: ``pool_recycle`` 3300 s and ``pool_pre_ping``; Aurora Serverless: ``pool_timeout``
    60 s and a 240 s idle limit. What the caller passes wins; ``pool_recycle=-1`` turns the
    recycling off, ``max_idle=0`` the idle limit.
    """
    options = dict(given)
    pool = defaults.pool
    if "max_lifetime" in pool:
        options.setdefault("pool_recycle", pool["max_lifetime"])
        options.setdefault("pool_pre_ping", True)
    if "timeout" in pool and "poolclass" not in options:
        options.setdefault("pool_timeout", pool["timeout"])
    recycle = options.get("pool_recycle")
    lifetime = float(recycle) if isinstance(recycle, (int, float)) and recycle > 0 else None
    idle = pool.get("max_idle") if max_idle is None else max_idle
    return options, _CheckoutChecks(lifetime, float(idle) if idle else None)


class _CheckoutChecks:
    """Replace a pooled connection at checkout when it is too old or sat idle too long.

    SQLAlchemy recycles after exactly ``pool_recycle`` seconds, so connections opened together
    (a pool filled at start-up) are all replaced together, and each reconnect pays a token
    and TLS; this takes up to 5 % off each connection's lifetime at random, as psycopg_pool
    does. SQLAlchemy has no idle limit: a connection that sat unused longer than ``max_idle``
    is replaced before the server's idle cut could have closed it. Raising
    :class:`sqlalchemy.exc.DisconnectionError` in the ``checkout`` event is SQLAlchemy's way
    to have the pool open a new connection in its place.
    """

    def __init__(self, lifetime: float | None, max_idle: float | None) -> None:
        self.lifetime = lifetime
        self.max_idle = max_idle

    def install(self, engine: sqlalchemy.Engine) -> None:
        if self.lifetime is None and self.max_idle is None:
            return
        event.listen(engine, "connect", self._connected)
        event.listen(engine, "checkout", self._checkout)
        if self.max_idle is not None:
            event.listen(engine, "checkin", self._checkin)

    def _connected(self, dbapi_connection: Any, record: ConnectionPoolEntry) -> None:  # noqa: ARG002
        if self.lifetime is not None:
            share = 1.0 - _JITTER * random.random()  # noqa: S311 -- spreading, not secrecy
            record.info["iampg_expires"] = time.monotonic() + self.lifetime * share
        record.info.pop("iampg_idle_since", None)

    def _checkin(self, dbapi_connection: Any, record: ConnectionPoolEntry) -> None:  # noqa: ARG002
        record.info["iampg_idle_since"] = time.monotonic()

    def _checkout(
        self,
        dbapi_connection: Any,  # noqa: ARG002
        record: ConnectionPoolEntry,
        proxy: Any,  # noqa: ARG002
    ) -> None:
        now = time.monotonic()
        expires = record.info.get("iampg_expires")
        if expires is not None and now >= expires:
            logger.debug("replacing a connection past its lifetime (%g s)", self.lifetime)
            raise sqlalchemy.exc.DisconnectionError("connection past its lifetime")
        idle_since = record.info.get("iampg_idle_since")
        idle = None if idle_since is None else now - idle_since
        if self.max_idle is not None and idle is not None and idle >= self.max_idle:
            logger.debug("replacing a connection idle for %g s or more", self.max_idle)
            raise sqlalchemy.exc.DisconnectionError("connection idle too long")


# -- transactions that run again after a conflict or a lost connection ----------------------

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
) -> _retry.Decorator: ...
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
    return _retry.retrying(
        _retry.Begin(_transaction(bind)),
        fn,
        attempts=attempts,
        base=base,
        cap=cap,
        idempotent=idempotent,
    )


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
) -> _retry.AsyncDecorator: ...
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
    return _retry.aretrying(
        _retry.Begin(_atransaction(bind)),
        fn,
        attempts=attempts,
        base=base,
        cap=cap,
        idempotent=idempotent,
    )


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
    raise _retry.unknown_target(bind, "an Engine, Connection, Session or sessionmaker")


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
    raise _retry.unknown_target(
        bind, "an AsyncEngine, AsyncConnection, AsyncSession or async_sessionmaker"
    )
