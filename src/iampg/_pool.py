"""psycopg helpers: connections and psycopg_pool pools that authenticate with tokens."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, overload

import psycopg
import psycopg_pool
from psycopg.conninfo import make_conninfo
from psycopg.rows import Row, RowFactory, TupleRow
from typing_extensions import TypeVar

from iampg._connecting import (
    Attempts,
    Secret,
    aopen_verified,
    async_class,
    final_params,
    open_verified,
    prepare,
    preset_argument,
    sync_class,
    with_root,
)
from iampg._defaults import pool_options
from iampg._endpoint import Endpoint
from iampg._forks import Opened as _Opened
from iampg._lost import AsyncLivenessCheck, AsyncPurgingCheck, PurgingCheck, purging
from iampg._tokens import TokenProvider

__all__ = ["AsyncConnectionPool", "ConnectionPool", "aconnect", "connect"]

logger = logging.getLogger("iampg.pool")

CT = TypeVar("CT", bound="psycopg.Connection[Any]", default="psycopg.Connection[TupleRow]")
ACT = TypeVar(
    "ACT", bound="psycopg.AsyncConnection[Any]", default="psycopg.AsyncConnection[TupleRow]"
)

# psycopg's classes, the pools' default connection_class (typed Any to fit any CT).
_CONNECTION: Any = psycopg.Connection
_ASYNC_CONNECTION: Any = psycopg.AsyncConnection

T = TypeVar("T")
KwargsParam = Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None
AsyncKwargsParam = (
    Mapping[str, Any]
    | Callable[[], Mapping[str, Any]]
    | Callable[[], Awaitable[Mapping[str, Any]]]
    | None
)


@overload
def connect(
    endpoint: Endpoint | str | None = ...,
    *,
    provider: TokenProvider | None = ...,
    preset: str | None = ...,
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
    preset: str | None = ...,
    profile: str | None = ...,
    wait: float | None = ...,
    allow_insecure: bool = ...,
    row_factory: RowFactory[Row],
    **kwargs: Any,
) -> psycopg.Connection[Row]: ...
@overload
def connect(
    endpoint: Endpoint | str | None = ...,
    *,
    provider: TokenProvider | None = ...,
    preset: str | None = ...,
    profile: str | None = ...,
    wait: float | None = ...,
    allow_insecure: bool = ...,
    row_factory: None = ...,
    **kwargs: Any,
) -> psycopg.Connection[TupleRow]: ...
def connect(
    endpoint: Endpoint | str | None = None,
    *,
    provider: TokenProvider | None = None,
    preset: str | None = None,
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

    The parameters libpq finally receives (the endpoint's, with ``kwargs`` on top) are
    checked before any token is signed: ``host``, ``hostaddr`` and ``port`` must be the
    endpoint's (the token is signed for them), and TLS must be on towards anything but
    loopback.

    Args:
        endpoint: Where to connect (anything :meth:`Endpoint.parse` accepts); defaults to the
            provider's endpoint.
        provider: The token cache to use; one is made for ``endpoint`` if omitted. Share one
            provider between all connections to the same endpoint.
        preset: ``rds``, ``aurora-serverless`` (or ``aurora-express``) or ``dsql``: the
            service's defaults (``connect_timeout``, ``wait``). Defaults to ``dsql`` for DSQL
            endpoints and ``rds`` otherwise.
        profile: Deprecated spelling of ``preset`` (warns).
        wait: Seconds to keep retrying a cluster that is not accepting connections yet
            (default from the preset: 30 s for RDS, 90 s for Aurora Serverless, 60 s for
            DSQL); 0 disables it.
        allow_insecure: Allow an ``sslmode`` that may send the token in plaintext to a
            non-loopback host.
        connection_class: The psycopg connection class (e.g. a subclass with a row factory).
        **kwargs: Passed to ``connection_class.connect`` (``autocommit``, ``row_factory``,
            libpq parameters …); never ``password``, which is the token.

    Raises:
        ConfigurationError: Bad endpoint or options, ``password=`` given, or parameters
            that would send the token elsewhere or unencrypted.
        TokenError: No token could be signed.
        AuthenticationError: The server refused the token twice, or TLS was off; the message
            lists the likely causes for the service.
        UnavailableError: The service was still turning connections away after ``wait``.
        psycopg.OperationalError: The connection failed for another reason.
    """
    target = prepare(
        endpoint, provider, preset_argument(preset, profile), allow_insecure=allow_insecure
    )
    params = target.merge(kwargs)
    final = final_params("", params)
    attempts = Attempts(target, wait, params)
    while True:
        token = Secret(target.provider.token())
        try:
            return open_verified(_opening(connection_class.connect, params, token), final)
        except psycopg.OperationalError as exc:
            delay = attempts.failed(exc, token)
        if delay:
            time.sleep(delay)


@overload
async def aconnect(
    endpoint: Endpoint | str | None = ...,
    *,
    provider: TokenProvider | None = ...,
    preset: str | None = ...,
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
    preset: str | None = ...,
    profile: str | None = ...,
    wait: float | None = ...,
    allow_insecure: bool = ...,
    row_factory: RowFactory[Row],
    **kwargs: Any,
) -> psycopg.AsyncConnection[Row]: ...
@overload
async def aconnect(
    endpoint: Endpoint | str | None = ...,
    *,
    provider: TokenProvider | None = ...,
    preset: str | None = ...,
    profile: str | None = ...,
    wait: float | None = ...,
    allow_insecure: bool = ...,
    row_factory: None = ...,
    **kwargs: Any,
) -> psycopg.AsyncConnection[TupleRow]: ...
async def aconnect(
    endpoint: Endpoint | str | None = None,
    *,
    provider: TokenProvider | None = None,
    preset: str | None = None,
    profile: str | None = None,
    wait: float | None = None,
    allow_insecure: bool = False,
    connection_class: type[psycopg.AsyncConnection[Any]] = psycopg.AsyncConnection,
    **kwargs: Any,
) -> psycopg.AsyncConnection[Any]:
    """Open a psycopg async connection with a current IAM token; see :func:`connect`.

    Tokens come from :meth:`TokenProvider.atoken`, so signing never blocks the event loop.
    """
    target = prepare(
        endpoint, provider, preset_argument(preset, profile), allow_insecure=allow_insecure
    )
    params = target.merge(kwargs)
    final = final_params("", params)
    attempts = Attempts(target, wait, params)
    while True:
        token = Secret(await target.provider.atoken())
        try:
            return await aopen_verified(_opening(connection_class.connect, params, token), final)
        except psycopg.OperationalError as exc:
            delay = attempts.failed(exc, token)
        if delay:
            await asyncio.sleep(delay)


def _opening(
    connect: Callable[..., T], params: Mapping[str, Any], token: Secret
) -> Callable[[str | None], T]:
    """Return what opens a connection with ``params``, its ``sslrootcert`` replaced if given."""
    return lambda root: connect(**with_root(params, root), password=token.value)


class ConnectionPool(psycopg_pool.ConnectionPool[CT]):
    """A :class:`psycopg_pool.ConnectionPool` whose connections authenticate with IAM tokens.

    Every new physical connection, retries included, asks ``provider`` for a token through
    psycopg_pool's callable ``kwargs``: connections opened hours after the pool keep
    authenticating, and open connections are unaffected by token expiry. When the server
    refuses a token, the provider forgets it, so the pool's next attempt signs a new one, and
    the failure is raised (and logged by psycopg_pool) as :class:`iampg.AuthenticationError`.
    Connections are instances of a subclass of ``connection_class`` that does just that, and
    that checks the parameters libpq finally receives (see :func:`connect`): a ``kwargs``
    callable's result is checked at every connection attempt.

    The service's defaults apply where the caller passes nothing (see ``preset``):
    Aurora Serverless pools keep ``min_size=0`` so the cluster can pause and close idle
    connections after 240 s, before Aurora's own idle cut; DSQL pools recycle connections
    after 3300 s, under DSQL's one-hour cap, and check them at checkout; every preset sets a
    finite ``connect_timeout`` (45 s for Aurora Serverless, above a resume). ``min_size=0``
    without ``max_size`` gives ``max_size=4``.

    When the checkout check (DSQL's, or any ``check`` passed) finds a connection lost, the
    pool's other idle connections are checked at once with psycopg_pool's ``check()``: a
    restart or failover kills them together, and psycopg_pool alone would back off 0, 1, 2,
    4 … seconds between dead connections within one checkout (measured: 6.8 s for four, 28.9 s
    for six, :exc:`~psycopg_pool.PoolTimeout` for eight even with a 60 s ``timeout``).

    A pool opened before ``os.fork()`` is refused in the child: ``getconn()`` (and so
    ``connection()``), ``open()`` and ``check()`` raise :class:`iampg.ConfigurationError`,
    since its connections are the parent's (see :doc:`/howto/fork`).

    Args:
        endpoint: Where to connect; defaults to the provider's endpoint.
        provider: The token cache; one is made for ``endpoint`` if omitted.
        preset: ``rds``, ``aurora-serverless`` (or ``aurora-express``) or ``dsql``; defaults
            to ``dsql`` for DSQL endpoints and ``rds`` otherwise.
        profile: Deprecated spelling of ``preset`` (warns).
        allow_insecure: See :func:`connect`.
        kwargs: Extra connection arguments (a mapping, or a callable returning one, evaluated
            per connection); never ``password``, which is the token.
        connection_class: The psycopg connection class (e.g. ``psycopg.Connection[DictRow]``
            with ``kwargs={"row_factory": dict_row}``).
        **pool_kwargs: Passed to :class:`psycopg_pool.ConnectionPool` unchanged (``min_size``,
            ``max_size``, ``open``, ``max_lifetime`` …).

    Raises:
        ConfigurationError: Bad endpoint or options, pool sizes that do not fit, or
            ``kwargs`` that would send the token elsewhere or unencrypted.
    """

    def __init__(
        self,
        endpoint: Endpoint | str | None = None,
        *,
        provider: TokenProvider | None = None,
        preset: str | None = None,
        profile: str | None = None,
        allow_insecure: bool = False,
        kwargs: KwargsParam = None,
        connection_class: type[CT] = _CONNECTION,
        **pool_kwargs: Any,
    ) -> None:
        target = prepare(
            endpoint, provider, preset_argument(preset, profile), allow_insecure=allow_insecure
        )
        options = pool_options(target.defaults, pool_kwargs)
        if kwargs is not None and not callable(kwargs):
            target.merge(kwargs)  # a fixed mapping is refused now, not at the first connect

        def connection_kwargs() -> dict[str, Any]:
            extra = kwargs() if callable(kwargs) else kwargs
            target.merge(extra)
            return {**(extra or {}), "password": target.provider.token()}

        check = options.get("check")
        if check is not None:
            options["check"] = check = purging(check, PurgingCheck)
        self._iampg_opened: _Opened | None = None
        super().__init__(
            make_conninfo(**target.params),
            kwargs=connection_kwargs,
            connection_class=sync_class(connection_class, target),
            **options,
        )
        if not self.closed:
            self._iampg_opened = _Opened()
            self._iampg_opened.guard(self)
        if check is not None:
            check.pool = weakref.ref(self)

    def open(self, wait: bool = False, timeout: float = 30.0) -> None:  # noqa: FBT001, FBT002 -- psycopg_pool's signature
        """Open the pool; see :meth:`psycopg_pool.ConnectionPool.open`.

        Raises:
            ConfigurationError: The pool was opened in a parent process, before a fork.
        """
        if self._iampg_opened is not None:
            self._iampg_opened.refuse(self, "open")
        super().open(wait=wait, timeout=timeout)
        if self._iampg_opened is None:
            self._iampg_opened = _Opened()
            self._iampg_opened.guard(self)

    def check(self) -> None:
        """Check the idle connections; see :meth:`psycopg_pool.ConnectionPool.check`.

        Raises:
            ConfigurationError: The pool was opened in a parent process, before a fork.
        """
        if self._iampg_opened is not None:
            self._iampg_opened.refuse(self, "check")
        super().check()

    def close(self, timeout: float = 5.0) -> None:
        """Close the pool; in a child process, leave the parent's connections alone.

        A pool inherited across a fork is not closed in the child: closing its connections
        would end the parent's sessions. The child forgets it; the parent closes it.
        """
        if self._iampg_opened is not None and self._iampg_opened.inherited():
            logger.debug(
                "not closing a pool opened before a fork: its connections are the parent's"
            )
            return
        super().close(timeout)
        self._iampg_opened = None


class AsyncConnectionPool(psycopg_pool.AsyncConnectionPool[ACT]):
    """The asynchronous twin of :class:`ConnectionPool`.

    Tokens come from :meth:`TokenProvider.atoken`, so signing never blocks the event loop;
    ``kwargs`` may also be an async callable. The pool is made closed (``open=False``, where
    psycopg_pool's own default of opening in the constructor is deprecated): open it with
    ``await pool.open()`` or ``async with``.
    """

    def __init__(
        self,
        endpoint: Endpoint | str | None = None,
        *,
        provider: TokenProvider | None = None,
        preset: str | None = None,
        profile: str | None = None,
        allow_insecure: bool = False,
        kwargs: AsyncKwargsParam = None,
        connection_class: type[ACT] = _ASYNC_CONNECTION,
        **pool_kwargs: Any,
    ) -> None:
        target = prepare(
            endpoint, provider, preset_argument(preset, profile), allow_insecure=allow_insecure
        )
        options = pool_options(target.defaults, pool_kwargs)
        if kwargs is not None and not callable(kwargs):
            target.merge(kwargs)

        async def connection_kwargs() -> dict[str, Any]:
            extra = kwargs() if callable(kwargs) else kwargs
            if isinstance(extra, Awaitable):
                extra = await extra
            target.merge(extra)
            return {**(extra or {}), "password": await target.provider.atoken()}

        if "check" in options and "check" not in pool_kwargs:
            options["check"] = AsyncLivenessCheck()
        options.setdefault("open", False)
        check = options.get("check")
        if check is not None:
            options["check"] = check = purging(check, AsyncPurgingCheck)
        self._iampg_opened: _Opened | None = None
        super().__init__(
            make_conninfo(**target.params),
            kwargs=connection_kwargs,
            connection_class=async_class(connection_class, target),
            **options,
        )
        if not self.closed:
            self._iampg_opened = _Opened()
            self._iampg_opened.guard(self)
        if check is not None:
            check.pool = weakref.ref(self)

    async def open(self, wait: bool = False, timeout: float = 30.0) -> None:  # noqa: FBT001, FBT002 -- psycopg_pool's signature
        """Open the pool; see :meth:`ConnectionPool.open`."""
        if self._iampg_opened is not None:
            self._iampg_opened.refuse(self, "open")
        await super().open(wait=wait, timeout=timeout)
        if self._iampg_opened is None:
            self._iampg_opened = _Opened()
            self._iampg_opened.guard(self)

    async def check(self) -> None:
        """Check the idle connections; see :meth:`ConnectionPool.check`."""
        if self._iampg_opened is not None:
            self._iampg_opened.refuse(self, "check")
        await super().check()

    async def close(self, timeout: float = 5.0) -> None:
        """Close the pool; in a child process, leave the parent's connections alone."""
        if self._iampg_opened is not None and self._iampg_opened.inherited():
            logger.debug(
                "not closing a pool opened before a fork: its connections are the parent's"
            )
            return
        await super().close(timeout)
        self._iampg_opened = None
