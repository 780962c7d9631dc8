"""psycopg helpers: connections and stock psycopg_pool pools that authenticate with tokens."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar, overload

import psycopg
import psycopg_pool
from psycopg.conninfo import make_conninfo
from psycopg.rows import TupleRow

from iampg import _refresh
from iampg._defaults import ServiceDefaults, defaults_for, pool_options
from iampg._diagnose import authentication_error, failure_kind, transient_reason
from iampg._dsn import connect_params, resolve
from iampg._endpoint import Endpoint
from iampg._lost import AsyncLivenessCheck, AsyncPurgingCheck, PurgingCheck
from iampg._tokens import TokenProvider
from iampg.errors import UnavailableError

__all__ = ["AsyncConnectionPool", "ConnectionPool", "aconnect", "connect"]

logger = logging.getLogger("iampg.pool")

CT = TypeVar("CT", bound="psycopg.Connection[Any]")
ACT = TypeVar("ACT", bound="psycopg.AsyncConnection[Any]")

KwargsParam = Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None
AsyncKwargsParam = (
    Mapping[str, Any]
    | Callable[[], Mapping[str, Any]]
    | Callable[[], Awaitable[Mapping[str, Any]]]
    | None
)


def _feedback(error: psycopg.OperationalError, provider: TokenProvider, token: object) -> Exception:
    """Forget a refused token; return the error to raise (explained if it was the token)."""
    kind = failure_kind(error)
    if kind is None:
        return error
    if kind == "token" and isinstance(token, str):
        provider.invalidate(token)
    return authentication_error(error, provider.endpoint, kind)


def _sync_class(base: type[CT], provider: TokenProvider) -> type[CT]:
    """Subclass ``base`` so that a refused token is forgotten and the error explained."""

    class IamConnection(base):  # type: ignore[valid-type,misc]
        @classmethod
        def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:
            try:
                return super().connect(conninfo, **kwargs)
            except psycopg.OperationalError as exc:
                error = _feedback(exc, provider, kwargs.get("password"))
                if error is exc:
                    raise
                raise error from exc

    IamConnection.__name__ = IamConnection.__qualname__ = f"Iam{base.__name__}"
    return IamConnection


def _async_class(base: type[ACT], provider: TokenProvider) -> type[ACT]:
    """The asynchronous twin of :func:`_sync_class`."""

    class IamAsyncConnection(base):  # type: ignore[valid-type,misc]
        @classmethod
        async def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:
            try:
                return await super().connect(conninfo, **kwargs)
            except psycopg.OperationalError as exc:
                error = _feedback(exc, provider, kwargs.get("password"))
                if error is exc:
                    raise
                raise error from exc

    IamAsyncConnection.__name__ = IamAsyncConnection.__qualname__ = f"Iam{base.__name__}"
    return IamAsyncConnection


class _Attempts:
    """What to do after a failed connect: retry at once, wait and retry, or raise."""

    def __init__(
        self, endpoint: Endpoint, provider: TokenProvider, defaults: ServiceDefaults, wait: float
    ) -> None:
        self._endpoint = endpoint
        self._provider = provider
        self._defaults = defaults
        self._wait = wait
        self._refused = False
        self._failures = 0
        self._deadline: float | None = None

    def failed(self, exc: psycopg.OperationalError, token: str) -> float:
        """Return the seconds to wait before the next attempt, or raise the error to surface."""
        kind = failure_kind(exc)
        if kind is not None:
            error = _feedback(exc, self._provider, token)
            if kind == "token" and not self._refused:
                self._refused = True
                logger.info(
                    "token refused by %s; retrying once with a new token", self._endpoint.host
                )
                return 0.0
            raise error from exc
        reason = transient_reason(exc, timeouts=self._defaults.retry_timeouts)
        if reason is None or self._wait <= 0:
            raise exc
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self._wait
            logger.info(
                "%s is not accepting connections yet (%s); retrying for up to %g s",
                self._endpoint.host,
                reason,
                self._wait,
            )
        if now >= self._deadline:
            raise UnavailableError(
                f"{self._endpoint.host} did not accept a connection within {self._wait:g} s: "
                f"{reason}. Retry later, or pass a longer wait="
            ) from exc
        self._failures += 1
        step = _refresh.backoff(self._failures, base=0.5, cap=5.0)
        return min(step, self._deadline - now)


def _prepare(
    endpoint: Endpoint | str | None,
    provider: TokenProvider | None,
    profile: str | None,
    *,
    allow_insecure: bool,
) -> tuple[Endpoint, TokenProvider, ServiceDefaults, dict[str, str]]:
    ep, prov = resolve(endpoint, provider)
    defaults = defaults_for(ep, profile)
    params = connect_params(ep, allow_insecure=allow_insecure)
    params.setdefault("connect_timeout", str(defaults.connect_timeout))
    return ep, prov, defaults, params


@overload
def connect(
    endpoint: Endpoint | str | None = ...,
    *,
    provider: TokenProvider | None = ...,
    profile: str | None = ...,
    wait: float | None = ...,
    allow_insecure: bool = ...,
    connection_class: type[CT],
    **kwargs: Any,
) -> CT: ...
@overload
def connect(
    endpoint: Endpoint | str | None = ...,
    *,
    provider: TokenProvider | None = ...,
    profile: str | None = ...,
    wait: float | None = ...,
    allow_insecure: bool = ...,
    **kwargs: Any,
) -> psycopg.Connection[TupleRow]: ...
def connect(
    endpoint: Endpoint | str | None = None,
    *,
    provider: TokenProvider | None = None,
    profile: str | None = None,
    wait: float | None = None,
    allow_insecure: bool = False,
    connection_class: type[psycopg.Connection[Any]] = psycopg.Connection,
    **kwargs: Any,
) -> psycopg.Connection[Any]:
    """Open a psycopg connection that authenticates with a current IAM token.

    A refused token is forgotten and the connect retried once with a new one. While the
    service says it is waking up or rate-limiting connections (DSQL), or, for Aurora
    Serverless, while a connect times out during a resume, the connect is retried with
    backoff for up to ``wait`` seconds, logging one line that says what it waits for.

    Args:
        endpoint: Where to connect (anything :meth:`Endpoint.parse` accepts); defaults to the
            provider's endpoint.
        provider: The token cache to use; one is made for ``endpoint`` if omitted. Share one
            provider between all connections to the same endpoint.
        profile: ``rds``, ``aurora-serverless`` (or ``aurora-express``) or ``dsql``: the
            service's defaults (``connect_timeout``, ``wait``). Defaults to ``dsql`` for DSQL
            endpoints and ``rds`` otherwise.
        wait: Seconds to keep retrying a cluster that is not accepting connections yet
            (default from the profile: 30 s for RDS, 90 s for Aurora Serverless, 60 s for
            DSQL); 0 disables it.
        allow_insecure: Allow an ``sslmode`` that may send the token in plaintext to a
            non-loopback host.
        connection_class: The psycopg connection class (e.g. a subclass with a row factory).
        **kwargs: Passed to ``connection_class.connect`` (``autocommit``, ``row_factory`` …).

    Raises:
        ConfigurationError: Bad endpoint or options.
        TokenError: No token could be signed.
        AuthenticationError: The server refused the token twice, or TLS was off; the message
            lists the likely causes for the service.
        UnavailableError: The service was still turning connections away after ``wait``.
        psycopg.OperationalError: The connection failed for another reason.
    """
    ep, prov, defaults, params = _prepare(
        endpoint, provider, profile, allow_insecure=allow_insecure
    )
    attempts = _Attempts(ep, prov, defaults, defaults.wait if wait is None else wait)
    while True:
        token = prov.token()
        try:
            return connection_class.connect(**{**params, **kwargs, "password": token})
        except psycopg.OperationalError as exc:
            delay = attempts.failed(exc, token)
        if delay:
            time.sleep(delay)


@overload
async def aconnect(
    endpoint: Endpoint | str | None = ...,
    *,
    provider: TokenProvider | None = ...,
    profile: str | None = ...,
    wait: float | None = ...,
    allow_insecure: bool = ...,
    connection_class: type[ACT],
    **kwargs: Any,
) -> ACT: ...
@overload
async def aconnect(
    endpoint: Endpoint | str | None = ...,
    *,
    provider: TokenProvider | None = ...,
    profile: str | None = ...,
    wait: float | None = ...,
    allow_insecure: bool = ...,
    **kwargs: Any,
) -> psycopg.AsyncConnection[TupleRow]: ...
async def aconnect(
    endpoint: Endpoint | str | None = None,
    *,
    provider: TokenProvider | None = None,
    profile: str | None = None,
    wait: float | None = None,
    allow_insecure: bool = False,
    connection_class: type[psycopg.AsyncConnection[Any]] = psycopg.AsyncConnection,
    **kwargs: Any,
) -> psycopg.AsyncConnection[Any]:
    """Open a psycopg async connection with a current IAM token; see :func:`connect`.

    Tokens come from :meth:`TokenProvider.atoken`, so signing never blocks the event loop.
    """
    ep, prov, defaults, params = _prepare(
        endpoint, provider, profile, allow_insecure=allow_insecure
    )
    attempts = _Attempts(ep, prov, defaults, defaults.wait if wait is None else wait)
    while True:
        token = await prov.atoken()
        try:
            return await connection_class.connect(**{**params, **kwargs, "password": token})
        except psycopg.OperationalError as exc:
            delay = attempts.failed(exc, token)
        if delay:
            await asyncio.sleep(delay)


def _pool_setup(
    endpoint: Endpoint | str | None,
    provider: TokenProvider | None,
    profile: str | None,
    pool_kwargs: dict[str, Any],
    *,
    allow_insecure: bool,
) -> tuple[str, TokenProvider, dict[str, Any]]:
    _, prov, defaults, params = _prepare(endpoint, provider, profile, allow_insecure=allow_insecure)
    return make_conninfo(**params), prov, pool_options(defaults, pool_kwargs)


@overload
def ConnectionPool(
    endpoint: Endpoint | str | None = ...,
    *,
    provider: TokenProvider | None = ...,
    profile: str | None = ...,
    allow_insecure: bool = ...,
    kwargs: KwargsParam = ...,
    connection_class: type[CT],
    **pool_kwargs: Any,
) -> psycopg_pool.ConnectionPool[CT]: ...
@overload
def ConnectionPool(
    endpoint: Endpoint | str | None = ...,
    *,
    provider: TokenProvider | None = ...,
    profile: str | None = ...,
    allow_insecure: bool = ...,
    kwargs: KwargsParam = ...,
    **pool_kwargs: Any,
) -> psycopg_pool.ConnectionPool[psycopg.Connection[TupleRow]]: ...
def ConnectionPool(  # noqa: N802
    endpoint: Endpoint | str | None = None,
    *,
    provider: TokenProvider | None = None,
    profile: str | None = None,
    allow_insecure: bool = False,
    kwargs: KwargsParam = None,
    **pool_kwargs: Any,
) -> psycopg_pool.ConnectionPool[Any]:
    """Return a stock :class:`psycopg_pool.ConnectionPool` whose connections use IAM tokens.

    Every new physical connection, retries included, asks ``provider`` for a token through
    psycopg_pool's callable ``kwargs``: connections opened hours after the pool keep
    authenticating, and open connections are unaffected by token expiry. When the server
    refuses a token, the provider forgets it, so the pool's next attempt signs a new one, and
    the failure is raised (and logged by psycopg_pool) as :class:`iampg.AuthenticationError`.
    Connections are instances of a subclass of ``connection_class`` that does just that.

    The service's defaults apply where the caller passes nothing (see ``profile``):
    Aurora Serverless pools keep ``min_size=0`` so the cluster can pause and close idle
    connections after 240 s, before Aurora's own idle cut; DSQL pools recycle connections
    after 3300 s, under DSQL's one-hour cap, and check them at checkout; every profile sets a
    finite ``connect_timeout`` (45 s for Aurora Serverless, above a resume).

    When the checkout check (DSQL's, or any ``check`` passed) finds a connection lost, the
    pool's other idle connections are checked at once with psycopg_pool's ``check()``: a
    restart or failover kills them together, and psycopg_pool alone would back off 0, 1, 2,
    4 … seconds between dead connections within one checkout (measured: 6.8 s for four, 28.9 s
    for six, :exc:`~psycopg_pool.PoolTimeout` for eight even with a 60 s ``timeout``).

    Args:
        endpoint: Where to connect; defaults to the provider's endpoint.
        provider: The token cache; one is made for ``endpoint`` if omitted.
        profile: ``rds``, ``aurora-serverless`` (or ``aurora-express``) or ``dsql``; defaults
            to ``dsql`` for DSQL endpoints and ``rds`` otherwise.
        allow_insecure: See :func:`connect`.
        kwargs: Extra connection arguments (a mapping, or a callable returning one, evaluated
            per connection); ``password`` is always the token.
        **pool_kwargs: Passed to :class:`psycopg_pool.ConnectionPool` unchanged (``min_size``,
            ``max_size``, ``open``, ``connection_class``, ``max_lifetime`` …).

    Raises:
        ConfigurationError: Bad endpoint or options.
    """
    info, prov, options = _pool_setup(
        endpoint, provider, profile, pool_kwargs, allow_insecure=allow_insecure
    )

    def connection_kwargs() -> dict[str, Any]:
        extra = kwargs() if callable(kwargs) else kwargs
        return {**(extra or {}), "password": prov.token()}

    base = options.pop("connection_class", psycopg.Connection)
    check = options.get("check")
    if check is not None:
        options["check"] = check = PurgingCheck(check)
    pool = psycopg_pool.ConnectionPool(
        info,
        kwargs=connection_kwargs,
        connection_class=_sync_class(base, prov),
        **options,
    )
    if check is not None:
        check.pool = weakref.ref(pool)
    return pool


@overload
def AsyncConnectionPool(
    endpoint: Endpoint | str | None = ...,
    *,
    provider: TokenProvider | None = ...,
    profile: str | None = ...,
    allow_insecure: bool = ...,
    kwargs: AsyncKwargsParam = ...,
    connection_class: type[ACT],
    **pool_kwargs: Any,
) -> psycopg_pool.AsyncConnectionPool[ACT]: ...
@overload
def AsyncConnectionPool(
    endpoint: Endpoint | str | None = ...,
    *,
    provider: TokenProvider | None = ...,
    profile: str | None = ...,
    allow_insecure: bool = ...,
    kwargs: AsyncKwargsParam = ...,
    **pool_kwargs: Any,
) -> psycopg_pool.AsyncConnectionPool[psycopg.AsyncConnection[TupleRow]]: ...
def AsyncConnectionPool(  # noqa: N802
    endpoint: Endpoint | str | None = None,
    *,
    provider: TokenProvider | None = None,
    profile: str | None = None,
    allow_insecure: bool = False,
    kwargs: AsyncKwargsParam = None,
    **pool_kwargs: Any,
) -> psycopg_pool.AsyncConnectionPool[Any]:
    """Return a stock :class:`psycopg_pool.AsyncConnectionPool` whose connections use tokens.

    The asynchronous twin of :func:`ConnectionPool`: tokens come from
    :meth:`TokenProvider.atoken`, so signing never blocks the event loop. It is made closed
    (``open=False``, where psycopg_pool's own default of opening in the constructor is
    deprecated): open it with ``await pool.open()`` or ``async with``.
    """
    info, prov, options = _pool_setup(
        endpoint, provider, profile, pool_kwargs, allow_insecure=allow_insecure
    )

    async def connection_kwargs() -> dict[str, Any]:
        extra = kwargs() if callable(kwargs) else kwargs
        if isinstance(extra, Awaitable):
            extra = await extra
        return {**(extra or {}), "password": await prov.atoken()}

    if "check" in options and "check" not in pool_kwargs:
        options["check"] = AsyncLivenessCheck()
    base = options.pop("connection_class", psycopg.AsyncConnection)
    options.setdefault("open", False)
    check = options.get("check")
    if check is not None:
        options["check"] = check = AsyncPurgingCheck(check)
    pool = psycopg_pool.AsyncConnectionPool(
        info,
        kwargs=connection_kwargs,
        connection_class=_async_class(base, prov),
        **options,
    )
    if check is not None:
        check.pool = weakref.ref(pool)
    return pool
