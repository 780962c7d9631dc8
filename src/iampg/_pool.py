"""psycopg helpers: connections and stock psycopg_pool pools that authenticate with tokens."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar, overload

import psycopg
import psycopg_pool
from psycopg.conninfo import make_conninfo
from psycopg.rows import TupleRow

from iampg._diagnose import authentication_error, failure_kind
from iampg._dsn import connect_params, resolve
from iampg._endpoint import Endpoint
from iampg._tokens import TokenProvider

__all__ = ["AsyncConnectionPool", "ConnectionPool", "connect"]

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


@overload
def connect(
    endpoint: Endpoint | str | None = ...,
    *,
    provider: TokenProvider | None = ...,
    allow_insecure: bool = ...,
    connection_class: type[CT],
    **kwargs: Any,
) -> CT: ...
@overload
def connect(
    endpoint: Endpoint | str | None = ...,
    *,
    provider: TokenProvider | None = ...,
    allow_insecure: bool = ...,
    **kwargs: Any,
) -> psycopg.Connection[TupleRow]: ...
def connect(
    endpoint: Endpoint | str | None = None,
    *,
    provider: TokenProvider | None = None,
    allow_insecure: bool = False,
    connection_class: type[psycopg.Connection[Any]] = psycopg.Connection,
    **kwargs: Any,
) -> psycopg.Connection[Any]:
    """Open a psycopg connection that authenticates with a current IAM token.

    Args:
        endpoint: Where to connect (anything :meth:`Endpoint.parse` accepts); defaults to the
            provider's endpoint.
        provider: The token cache to use; one is made for ``endpoint`` if omitted. Share one
            provider between all connections to the same endpoint.
        allow_insecure: Allow an ``sslmode`` that may send the token in plaintext to a
            non-loopback host.
        connection_class: The psycopg connection class (e.g. a subclass with a row factory).
        **kwargs: Passed to ``connection_class.connect`` (``autocommit``, ``row_factory`` …).

    Raises:
        ConfigurationError: Bad endpoint or options.
        TokenError: No token could be signed.
        AuthenticationError: The server refused the token twice (the first refusal makes the
            provider forget it and sign a new one), or TLS was off; the message lists the
            likely causes for the service.
        psycopg.OperationalError: The connection failed for another reason.
    """
    ep, prov = resolve(endpoint, provider)
    params = connect_params(ep, allow_insecure=allow_insecure)
    for attempt in (1, 2):
        token = prov.token()
        try:
            return connection_class.connect(**{**params, **kwargs, "password": token})
        except psycopg.OperationalError as exc:
            error = _feedback(exc, prov, token)
            if error is exc:
                raise
            if attempt == 1 and failure_kind(exc) == "token":
                logger.info("token refused by %s; retrying once with a new token", ep.host)
                continue
            raise error from exc
    raise AssertionError("unreachable")  # pragma: no cover


def _pool_setup(
    endpoint: Endpoint | str | None, provider: TokenProvider | None, *, allow_insecure: bool
) -> tuple[str, TokenProvider]:
    ep, prov = resolve(endpoint, provider)
    return make_conninfo(**connect_params(ep, allow_insecure=allow_insecure)), prov


@overload
def ConnectionPool(
    endpoint: Endpoint | str | None = ...,
    *,
    provider: TokenProvider | None = ...,
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
    allow_insecure: bool = ...,
    kwargs: KwargsParam = ...,
    **pool_kwargs: Any,
) -> psycopg_pool.ConnectionPool[psycopg.Connection[TupleRow]]: ...
def ConnectionPool(  # noqa: N802
    endpoint: Endpoint | str | None = None,
    *,
    provider: TokenProvider | None = None,
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

    Args:
        endpoint: Where to connect; defaults to the provider's endpoint.
        provider: The token cache; one is made for ``endpoint`` if omitted.
        allow_insecure: See :func:`connect`.
        kwargs: Extra connection arguments (a mapping, or a callable returning one, evaluated
            per connection); ``password`` is always the token.
        **pool_kwargs: Passed to :class:`psycopg_pool.ConnectionPool` unchanged (``min_size``,
            ``max_size``, ``open``, ``connection_class``, ``max_lifetime`` …).

    Raises:
        ConfigurationError: Bad endpoint or options.
    """
    info, prov = _pool_setup(endpoint, provider, allow_insecure=allow_insecure)

    def connection_kwargs() -> dict[str, Any]:
        extra = kwargs() if callable(kwargs) else kwargs
        return {**(extra or {}), "password": prov.token()}

    base = pool_kwargs.pop("connection_class", psycopg.Connection)
    return psycopg_pool.ConnectionPool(
        info,
        kwargs=connection_kwargs,
        connection_class=_sync_class(base, prov),
        **pool_kwargs,
    )


@overload
def AsyncConnectionPool(
    endpoint: Endpoint | str | None = ...,
    *,
    provider: TokenProvider | None = ...,
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
    allow_insecure: bool = ...,
    kwargs: AsyncKwargsParam = ...,
    **pool_kwargs: Any,
) -> psycopg_pool.AsyncConnectionPool[psycopg.AsyncConnection[TupleRow]]: ...
def AsyncConnectionPool(  # noqa: N802
    endpoint: Endpoint | str | None = None,
    *,
    provider: TokenProvider | None = None,
    allow_insecure: bool = False,
    kwargs: AsyncKwargsParam = None,
    **pool_kwargs: Any,
) -> psycopg_pool.AsyncConnectionPool[Any]:
    """Return a stock :class:`psycopg_pool.AsyncConnectionPool` whose connections use tokens.

    The asynchronous twin of :func:`ConnectionPool`: tokens come from
    :meth:`TokenProvider.atoken`, so signing never blocks the event loop. Open it with
    ``await pool.open()`` or ``async with``, as psycopg_pool asks.
    """
    info, prov = _pool_setup(endpoint, provider, allow_insecure=allow_insecure)

    async def connection_kwargs() -> dict[str, Any]:
        extra = kwargs() if callable(kwargs) else kwargs
        if isinstance(extra, Awaitable):
            extra = await extra
        return {**(extra or {}), "password": await prov.atoken()}

    base = pool_kwargs.pop("connection_class", psycopg.AsyncConnection)
    return psycopg_pool.AsyncConnectionPool(
        info,
        kwargs=connection_kwargs,
        connection_class=_async_class(base, prov),
        **pool_kwargs,
    )
