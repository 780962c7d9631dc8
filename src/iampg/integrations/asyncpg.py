"""asyncpg connections and pools that authenticate every new connection with a token."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import shlex
import socket
import ssl
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar, overload

from iampg import _retry
from iampg._connecting import (
    INSECURE_SSLMODES,
    check_extra,
    connect_params,
    is_loopback,
    prepare,
)
from iampg._diagnose import certificate_advice
from iampg._endpoint import Endpoint
from iampg._tokens import TokenProvider
from iampg.errors import ConfigurationError
from iampg.integrations import EndpointOrProvider, _resolve

__all__ = ["connect", "connect_kwargs", "create_pool", "retry_transaction", "ssl_context"]

logger = logging.getLogger("iampg.integrations.asyncpg")

# libpq parameters asyncpg has no use for when they hold these values.
_HARMLESS = {"sslsni": "1"}


class _PinnedHostContext(ssl.SSLContext):
    """A client TLS context that sends SNI for, and verifies, one fixed host name.

    asyncpg has no ``hostaddr``: it verifies the certificate against the address it dials.
    When iampg dials an IP address (``hostaddr``) for a token signed for a host name, this
    context makes the handshake use the signed name, as libpq does with ``host`` +
    ``hostaddr``. asyncio (and uvloop) make their TLS objects with :meth:`wrap_bio`;
    pg8000 (through SQLAlchemy) wraps its socket with :meth:`wrap_socket`.
    """

    server_name: str
    root: str | None = None  # the CA file (or "system") it trusts, for error messages

    def wrap_socket(  # noqa: PLR0917 -- the stdlib's signature
        self,
        sock: socket.socket,
        server_side: bool = False,  # noqa: FBT001, FBT002 -- the stdlib's signature
        do_handshake_on_connect: bool = True,  # noqa: FBT001, FBT002
        suppress_ragged_eofs: bool = True,  # noqa: FBT001, FBT002
        server_hostname: str | bytes | None = None,  # noqa: ARG002
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        return super().wrap_socket(
            sock,
            server_side,
            do_handshake_on_connect,
            suppress_ragged_eofs,
            self.server_name,
            session,
        )

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,  # noqa: FBT001, FBT002 -- the stdlib's signature
        server_hostname: str | bytes | None = None,  # noqa: ARG002
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        return super().wrap_bio(incoming, outgoing, server_side, self.server_name, session)


def ssl_context(endpoint: Endpoint, params: dict[str, str] | None = None) -> ssl.SSLContext | None:
    """Return the TLS context asyncpg should use for ``endpoint``, as libpq would set it up.

    ``sslmode`` maps as in libpq: ``verify-full`` checks the chain and the host name,
    ``verify-ca`` the chain only, ``require`` encrypts without checking (unless
    ``sslrootcert`` is given, which makes it ``verify-ca``, as in libpq). ``sslrootcert``
    is a PEM file, or ``system`` (the default for the ``verify-*`` modes when absent) for the
    system's roots. SNI and the host-name check always use the signed host name, even when
    ``hostaddr`` is dialled. ``disable``, ``allow`` and ``prefer`` return ``None``.

    Args:
        endpoint: The endpoint.
        params: Its libpq parameters (default: :func:`iampg._dsn.connect_params`).

    Raises:
        ConfigurationError: An unknown ``sslmode``.
    """
    params = connect_params(endpoint) if params is None else params
    mode = params.get("sslmode", "require")
    if mode in {"disable", "allow", "prefer"}:
        return None
    if mode not in {"require", "verify-ca", "verify-full"}:
        raise ConfigurationError(f"unknown sslmode {mode!r}: use require, verify-ca or verify-full")
    root = params.get("sslrootcert")
    if mode == "require" and root and root != "system":
        mode = "verify-ca"
    context = _PinnedHostContext(ssl.PROTOCOL_TLS_CLIENT)
    context.server_name = endpoint.host
    context.root = root
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if mode == "require":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        if root and root != "system":
            context.load_verify_locations(cafile=root)
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        context.check_hostname = mode == "verify-full"
        context.verify_mode = ssl.CERT_REQUIRED
    if params.get("sslcert"):
        context.load_cert_chain(params["sslcert"], params.get("sslkey"))
    return context


def _shared_context(endpoint: Endpoint, params: dict[str, str]) -> ssl.SSLContext | None:
    """Return a TLS context for these settings, made once while its files are unchanged."""
    files = tuple(params.get(name, "") for name in ("sslrootcert", "sslcert", "sslkey"))
    stamps = tuple(_stamp(path) for path in files)
    key = (endpoint.host, params.get("sslmode", "require"), files, stamps)
    with _CONTEXTS_LOCK:
        if key in _CONTEXTS:
            return _CONTEXTS[key]
    context = ssl_context(endpoint, params)
    with _CONTEXTS_LOCK:
        if len(_CONTEXTS) >= _CONTEXTS_MAX:
            _CONTEXTS.pop(next(iter(_CONTEXTS)))
        _CONTEXTS[key] = context
    return context


def _stamp(path: str) -> tuple[int, int] | None:
    """Return a file's modification time and size, or None (no file, or ``system``)."""
    if not path or path == "system":
        return None
    try:
        info = Path(path).stat()
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size


_CONTEXTS: dict[tuple[object, ...], ssl.SSLContext | None] = {}
_CONTEXTS_LOCK = threading.Lock()
_CONTEXTS_MAX = 32


def connect_kwargs(
    target: EndpointOrProvider,
    *,
    allow_insecure: bool = False,
) -> dict[str, Any]:
    """Return keyword arguments for :func:`asyncpg.connect` or :func:`asyncpg.create_pool`.

    ``password`` is :meth:`iampg.TokenProvider.atoken` itself: asyncpg calls it (and awaits
    the result) for every new connection, so a pool keeps authenticating after the first
    token expired, and signing never blocks the event loop. TLS comes from
    :func:`ssl_context`; ``hostaddr``, when given, is dialled while TLS verifies the signed
    host name. ``connect_timeout`` becomes ``timeout`` (seconds), ``application_name`` and
    ``options`` (``-c name=value``) become ``server_settings``, ``sslnegotiation=direct``
    becomes ``direct_tls``.

    Args:
        target: The endpoint (a provider is made for it) or the :class:`iampg.TokenProvider`
            to share.
        allow_insecure: Allow an ``sslmode`` that may send the token in plaintext to a
            non-loopback host.

    Raises:
        ConfigurationError: Bad endpoint, or a libpq parameter asyncpg cannot honour.
    """
    endpoint, provider = _resolve(target)
    return _kwargs(endpoint, provider, allow_insecure=allow_insecure)


def _kwargs(
    endpoint: Endpoint, provider: TokenProvider, *, allow_insecure: bool, shared: bool = False
) -> dict[str, Any]:
    params = connect_params(endpoint, allow_insecure=allow_insecure)
    return {**_arguments(endpoint, params, shared=shared), "password": provider.atoken}


def _arguments(
    endpoint: Endpoint, params: dict[str, str], *, shared: bool = False
) -> dict[str, Any]:
    """Return asyncpg's arguments for the endpoint's libpq ``params``, without a password.

    With ``shared``, the TLS context is one kept for these settings (and these CA files, as
    long as they are unchanged) rather than a new one: making it reads the CA file, about a
    millisecond, which :func:`connect` would otherwise pay on every call.
    """
    kwargs: dict[str, Any] = {
        "host": endpoint.dialled,
        "port": endpoint.port,
        "user": endpoint.user,
        "database": endpoint.dbname,
    }
    context = _shared_context(endpoint, params) if shared else ssl_context(endpoint, params)
    kwargs["ssl"] = context if context is not None else params.get("sslmode", "disable")
    _translate(params, kwargs)
    return kwargs


def _translate(params: dict[str, str], kwargs: dict[str, Any]) -> None:
    """Add asyncpg's equivalents of the other libpq parameters to ``kwargs``."""
    settings: dict[str, str] = {}
    unsupported: list[str] = []
    others = {k: v for k, v in params.items() if k not in _HANDLED}
    for key, value in others.items():
        if key == "connect_timeout":
            kwargs["timeout"] = float(value)
        elif key == "application_name":
            settings["application_name"] = value
        elif key == "options":
            settings.update(_options(value))
        elif key == "sslnegotiation":
            kwargs["direct_tls"] = value == "direct"
        elif key == "target_session_attrs":
            kwargs["target_session_attrs"] = value
        elif _HARMLESS.get(key) != value:
            unsupported.append(key)
    if unsupported:
        raise ConfigurationError(
            f"asyncpg has no equivalent of {', '.join(sorted(unsupported))}: "
            "remove it from the endpoint"
        )
    if settings:
        kwargs["server_settings"] = settings


# Parameters already turned into asyncpg's arguments or the TLS context.
_HANDLED = frozenset(
    {"host", "hostaddr", "port", "user", "dbname", "sslmode", "sslrootcert", "sslcert", "sslkey"}
)


def _options(value: str) -> dict[str, str]:
    """Parse libpq's ``options`` (``-c name=value`` …) into server settings."""
    words = shlex.split(value)
    settings: dict[str, str] = {}
    for index, word in enumerate(words):
        if word == "-c" and index + 1 < len(words):
            setting = words[index + 1]
        elif word.startswith(("-c", "--")) and "=" in word:
            setting = word[2:]
        else:
            continue
        name, sep, val = setting.partition("=")
        if not sep:
            raise ConfigurationError(f"cannot read options {value!r}: use -c name=value")
        settings[name.replace("-", "_")] = val
    return settings


async def connect(
    target: EndpointOrProvider,
    *,
    allow_insecure: bool = False,
    **kwargs: Any,
) -> Any:
    """Open an :class:`asyncpg.Connection` authenticated with a current token.

    A token the server refuses is forgotten, so the next connection signs a new one.

    Args:
        target: The endpoint or the provider to share.
        allow_insecure: See :func:`connect_kwargs`.
        **kwargs: Passed to :func:`asyncpg.connect`; they win over :func:`connect_kwargs`.

    Raises:
        ConfigurationError: See :func:`connect_kwargs`.
        TokenError: No token could be signed.
        asyncpg.InvalidAuthorizationSpecificationError: The server refused the token.
    """
    import asyncpg  # noqa: PLC0415

    endpoint, provider = _resolve(target)
    _check_overrides(endpoint, kwargs, allow_insecure=allow_insecure)
    return await _connect(
        asyncpg.connect,
        provider,
        **{**_kwargs(endpoint, provider, allow_insecure=allow_insecure, shared=True), **kwargs},
    )


def _check_overrides(
    endpoint: Endpoint, overrides: dict[str, Any], *, allow_insecure: bool, ssl_key: str = "ssl"
) -> None:
    """Refuse asyncpg arguments that would send the token elsewhere or without TLS.

    Raises:
        ConfigurationError: ``password``, ``dsn``, another ``host`` or ``port``, or an
            ``ssl`` that may not encrypt, or does not verify, towards a non-loopback host.
    """
    check_extra(overrides)
    if overrides.get("dsn") is not None:
        raise ConfigurationError("dsn given: pass the endpoint (target) instead of dsn=")
    for name, expected in (("host", endpoint.dialled), ("port", endpoint.port)):
        if name in overrides and str(overrides[name]).strip().lower() != str(expected):
            raise ConfigurationError(
                f"{name}={overrides[name]!r} differs from the endpoint the token is signed for "
                f"({endpoint.host}:{endpoint.port}, dialled at {endpoint.dialled}): a token must "
                f"only go to that endpoint; use another Endpoint instead of overriding {name}"
            )
    if ssl_key not in overrides or allow_insecure or is_loopback(endpoint.dialled):
        return
    value = overrides[ssl_key]
    if value in (None, False) or (isinstance(value, str) and value in INSECURE_SSLMODES):
        raise ConfigurationError(
            f"{ssl_key}={value!r} could send the IAM token unencrypted to {endpoint.dialled}: "
            f"leave {ssl_key}= out (iampg sets up TLS) or pass allow_insecure=True if you must"
        )
    if isinstance(value, ssl.SSLContext) and value.verify_mode == ssl.CERT_NONE:
        raise ConfigurationError(
            f"the ssl context does not verify {endpoint.host}'s certificate, so a machine in "
            "the middle could take the IAM token: pass a verifying context, ssl='require' "
            "(an explicit opt-out of verification), or allow_insecure=True"
        )


async def _connect(open_connection: Any, provider: TokenProvider, *args: Any, **kwargs: Any) -> Any:
    """Connect with a token, forgetting it if the server refuses it."""
    import asyncpg  # noqa: PLC0415

    token = kwargs.get("password")
    if callable(token):
        token = token()
    if inspect.isawaitable(token):
        token = await token
    kwargs["password"] = token
    try:
        return await open_connection(*args, **kwargs)
    except ssl.SSLCertVerificationError as exc:
        context = kwargs.get("ssl")
        if not isinstance(context, _PinnedHostContext):
            raise  # the caller's own context: iampg does not know what it trusts
        raise ssl.SSLCertVerificationError(
            f"{exc}\n{certificate_advice(provider.endpoint, context.root)}"
        ) from exc
    except (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidPasswordError):
        if isinstance(token, str):
            provider.invalidate(token)
            logger.info(
                "token refused by %s; the next connection signs a new one", provider.endpoint.host
            )
        raise


def create_pool(
    target: EndpointOrProvider,
    *,
    preset: str | None = None,
    max_lifetime: float | None = None,
    allow_insecure: bool = False,
    **pool_kwargs: Any,
) -> Any:
    """Return an :class:`asyncpg.Pool` whose new connections each use a current token.

    Use it as asyncpg's own: ``async with create_pool(...) as pool`` or
    ``pool = await create_pool(...)``. Each new connection awaits
    :meth:`iampg.TokenProvider.atoken`; a refused token is forgotten.

    The service's settings apply where ``pool_kwargs`` say nothing (see
    :doc:`/howto/integrations`):

    - DSQL: connections are closed after ``max_lifetime`` (3300 s, under DSQL's one-hour cap,
      each shortened by up to 5 % at random so they are not replaced together), which asyncpg
      has no setting for: an idle one at once, one in use when it is released; the next
      ``acquire()`` opens a new one. A connection the service closed while it sat in the
      pool is replaced by asyncpg itself at ``acquire()``.
    - Aurora Serverless: ``min_size=0`` (an idle cluster can pause: it pauses only with no
      connection open) and ``max_inactive_connection_lifetime=240`` (idle connections are
      closed before Aurora's idle cut at about 5 minutes; asyncpg's default is 300 s).
    - every preset: ``timeout`` (asyncpg's connect timeout) 45 s for Aurora Serverless, above
      a resume, 10 s otherwise.

    Args:
        target: The endpoint or the provider to share.
        preset: ``rds``, ``aurora-serverless`` (or ``aurora-express``) or ``dsql``; defaults
            to the endpoint's service.
        max_lifetime: Seconds after which a connection is closed (up to 5 % sooner) and
            replaced; ``None`` for the preset's (3300 s for DSQL, none otherwise), ``0`` for
            never.
        allow_insecure: See :func:`connect_kwargs`.
        **pool_kwargs: Passed to :func:`asyncpg.create_pool` (``min_size``, ``max_size``,
            ``max_inactive_connection_lifetime`` in seconds, ``setup``, ``reset`` …); they win
            over the preset's and :func:`connect_kwargs`.

    Raises:
        ConfigurationError: See :func:`connect_kwargs`, or an unknown preset.
    """
    import asyncpg  # noqa: PLC0415

    connecting = prepare(target, None, preset, allow_insecure=allow_insecure)
    endpoint, provider = connecting.endpoint, connecting.provider
    _check_overrides(endpoint, pool_kwargs, allow_insecure=allow_insecure)
    pool = connecting.defaults.pool
    kwargs: dict[str, Any] = _arguments(endpoint, connecting.params)
    kwargs["password"] = provider.atoken
    if pool.get("min_size") == 0:
        kwargs["min_size"] = 0
    if "max_idle" in pool:
        kwargs["max_inactive_connection_lifetime"] = pool["max_idle"]
    kwargs.update(pool_kwargs)
    user_connect = kwargs.pop("connect", None) or asyncpg.connect
    lifetime = pool.get("max_lifetime") if max_lifetime is None else max_lifetime
    ages = _Lifetimes(float(lifetime), kwargs) if lifetime else None

    async def connect_with_feedback(*args: Any, **connect_kwargs: Any) -> Any:
        connection = await _connect(user_connect, provider, *args, **connect_kwargs)
        if ages is not None:
            ages.born(connection)
        return connection

    return asyncpg.create_pool(connect=connect_with_feedback, **kwargs)


_JITTER = 0.05  # the share of a connection's lifetime taken off at random, as psycopg_pool does


class _Lifetimes:
    """Close each connection of an asyncpg pool once it is older than its lifetime.

    asyncpg has no maximum connection age. A timer per connection closes it when due if it is
    idle in the pool (as asyncpg's own ``max_inactive_connection_lifetime`` closes idle
    connections); a connection in use is closed right after it is released. asyncpg's pool
    opens a new connection at the next ``acquire()`` for a closed one. Which connections
    are in use is told by the pool's public ``setup`` and ``reset`` hooks (the caller's own,
    if any, still run) and a subclass of ``connection_class``.
    """

    def __init__(self, lifetime: float, kwargs: dict[str, Any]) -> None:
        import asyncpg  # noqa: PLC0415

        self.lifetime = lifetime
        self._setup = kwargs.get("setup")
        self._reset = kwargs.get("reset")
        base = kwargs.get("connection_class", asyncpg.Connection)
        kwargs["connection_class"] = type(f"Aged{base.__name__}", (base, _Aged), {})
        kwargs["setup"] = self.setup
        kwargs["reset"] = self.reset

    def born(self, connection: Any) -> None:
        """Arm the timer of a new connection."""
        share = 1.0 - _JITTER * random.random()  # noqa: S311 -- spreading, not secrecy
        loop = asyncio.get_running_loop()
        loop.call_later(self.lifetime * share, self._due, weakref.ref(connection))

    def _due(self, ref: weakref.ref[Any]) -> None:
        connection = ref()
        if connection is None or connection.is_closed():
            return
        connection.iampg_due = True
        if not connection.iampg_busy:
            logger.debug("closing an idle connection past its lifetime (%g s)", self.lifetime)
            connection.terminate()

    async def setup(self, proxy: Any) -> None:
        """Mark the connection in use (``proxy`` passes the call on to it)."""
        proxy.iampg_acquired()
        if self._setup is not None:
            await self._setup(proxy)

    async def reset(self, connection: Any) -> None:
        """Reset as asyncpg does by default (or the caller's ``reset``); close it if due."""
        if self._reset is not None:
            await self._reset(connection)
        else:
            query = connection.get_reset_query()
            if query:
                await connection.execute(query)
        connection.iampg_busy = False
        if connection.iampg_due:
            # After the pool has taken it back, unless an acquire() took it again at once.
            asyncio.get_running_loop().call_soon(self._close_if_idle, weakref.ref(connection))

    def _close_if_idle(self, ref: weakref.ref[Any]) -> None:
        connection = ref()
        if connection is not None and not connection.is_closed() and not connection.iampg_busy:
            logger.debug("closing a released connection past its lifetime (%g s)", self.lifetime)
            connection.terminate()


class _Aged:
    """Mixed into the pool's connection class: whether a connection is in use, or due."""

    iampg_busy = False
    iampg_due = False

    def iampg_acquired(self) -> None:
        """Mark the connection in use (called by the pool's ``setup`` through its proxy)."""
        self.iampg_busy = True


# -- transactions that run again after a conflict or a lost connection ----------------------

T = TypeVar("T")


@overload
def retry_transaction(
    target: Any,
    fn: Callable[[Any], Awaitable[T]],
    *,
    attempts: int = ...,
    base: float = ...,
    cap: float = ...,
    idempotent: bool = ...,
) -> Awaitable[T]: ...
@overload
def retry_transaction(
    target: Any,
    fn: None = ...,
    *,
    attempts: int = ...,
    base: float = ...,
    cap: float = ...,
    idempotent: bool = ...,
) -> _retry.AsyncDecorator: ...
def retry_transaction(
    target: Any,
    fn: Callable[[Any], Awaitable[T]] | None = None,
    *,
    attempts: int = 5,
    base: float = 0.02,
    cap: float = 1.0,
    idempotent: bool = False,
) -> Any:
    """Run ``await fn(conn)`` in a transaction, again if it lost a race or its connection.

    :func:`iampg.aretry_transaction` for asyncpg: a conflict (``OC000``, ``OC001``,
    ``40001``: asyncpg's ``SerializationError`` among them) rolls back and ``fn`` runs again,
    with exponential backoff and jitter (``base`` doubling up to ``cap`` seconds). Each
    attempt is ``async with conn.transaction()``; ``fn`` may begin with ``SET TRANSACTION
    ISOLATION LEVEL …``.

    With an :class:`asyncpg.Pool`, each attempt acquires a connection, so a connection lost
    before ``COMMIT`` was sent (a failover, an idle cut, DSQL's one-hour cap) is replaced and
    ``fn`` runs again; lost during ``COMMIT``, the outcome is unknown and the error is raised
    unless ``idempotent=True``. A connection (or one acquired from a pool) cannot be replaced:
    its loss is raised. ``fn`` must be safe to repeat: no side effects outside the database.

    Without ``fn``, returns a decorator for coroutine functions whose first argument is the
    connection, which their callers leave out::

        @retry_transaction(pool)
        async def transfer(conn, source, target, amount): ...

        await transfer(1, 2, 10)

    Args:
        target: An :class:`asyncpg.Pool`, or a connection not inside a transaction.
        fn: The transaction's work; its return value is returned.
        attempts: How many times to try at most.
        base: First backoff step in seconds.
        cap: Largest backoff step in seconds.
        idempotent: Also run again when the connection broke during ``COMMIT``.

    Raises:
        asyncpg.PostgresError: The last attempt's error, or one that is not retryable.
        ConfigurationError: Bad ``attempts``, ``base`` or ``cap``, or an unknown ``target``.
    """
    return _retry.aretrying(
        _Attempt(target),
        fn,
        attempts=attempts,
        base=base,
        cap=cap,
        idempotent=idempotent,
    )


class _Attempt(_retry.PoolOrConnection):
    """Opens each attempt's transaction on a pool or a connection; tells if it was lost.

    asyncpg reports a pooled connection lost mid-transaction as ``InterfaceError``
    ("released back to the pool", "the underlying connection is closed") with no SQLSTATE:
    the pool has already detached it. Seen from inside the attempt, a detached connection
    is a lost one.
    """

    def __init__(self, target: Any) -> None:
        import asyncpg  # noqa: PLC0415
        import asyncpg.pool  # noqa: PLC0415

        super().__init__(
            target,
            pool=asyncpg.Pool,
            connection=(asyncpg.Connection, asyncpg.pool.PoolConnectionProxy),
            expected="an asyncpg Pool or Connection",
        )

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        """Run one attempt's transaction, noting whether its connection was lost."""
        self.lost = False
        if not self.replaceable:
            async with self.target.transaction():
                yield self.target
            return
        async with self.target.acquire() as conn:
            try:
                async with conn.transaction():
                    yield conn
            except Exception:
                self.lost = _detached(conn)
                raise


def _detached(conn: Any) -> bool:
    """Tell whether asyncpg took a pooled connection back because it was lost."""
    import asyncpg  # noqa: PLC0415

    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:  # released back to the pool while still held
        return True
