"""psycopg2 connections and pools that authenticate every new connection with a token.

Three entry points, one behaviour: :func:`connect` opens a connection,
:class:`ThreadedConnectionPool` is psycopg2's own pool signing each new connection, and
:func:`connection_factory` returns a ``connection_factory`` class for code that calls
:func:`psycopg2.connect` itself. Each gives the endpoint's libpq parameters (``host``,
``hostaddr``, ``sslmode`` …; the caller's win) and a current token to every new connection,
checks the parameters libpq finally receives as :func:`iampg.connect` does (TLS towards
anything but loopback; the host, address and port the token is signed for), forgets a token
the server refused and raises :class:`AuthenticationError`, which is both a
:class:`psycopg2.OperationalError` and an :class:`iampg.AuthenticationError`.
:func:`retry_transaction` runs a transaction again after a conflict or a lost connection.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast, overload

import psycopg2
import psycopg2.extensions
import psycopg2.pool

import iampg.errors
from iampg import _narrow, _retry
from iampg._connecting import Attempts, Secret, Target, check_extra, explain, prepare, with_root
from iampg._diagnose import failure_kind
from iampg._forks import Opened as _Opened
from iampg.integrations import EndpointOrProvider

__all__ = [
    "AuthenticationError",
    "ThreadedConnectionPool",
    "UnavailableError",
    "connect",
    "connection_factory",
    "retry_transaction",
]

logger = logging.getLogger("iampg.integrations.psycopg2")

T = TypeVar("T")


# The two bases type their ``diag`` differently; at runtime each is the driver's own.
class AuthenticationError(iampg.errors.AuthenticationError, psycopg2.OperationalError):  # type: ignore[misc]
    """The server refused the connection's token (or TLS was off); the likely causes listed.

    Both a :class:`psycopg2.OperationalError`, so psycopg2 code that catches that keeps
    working, and an :class:`iampg.AuthenticationError`; the server's own error is chained.
    """

    __module__ = "iampg.integrations.psycopg2"


class UnavailableError(iampg.errors.UnavailableError, psycopg2.OperationalError):  # type: ignore[misc]
    """The service kept turning new connections away until ``wait`` ran out.

    Both a :class:`psycopg2.OperationalError` and an :class:`iampg.UnavailableError`.
    """

    __module__ = "iampg.integrations.psycopg2"


def _translated(error: Exception) -> Exception:
    """Return iampg's verdict on a failed connect as the psycopg2 flavour of its class."""
    if isinstance(error, iampg.errors.AuthenticationError):
        return AuthenticationError(str(error))
    if isinstance(error, iampg.errors.UnavailableError):
        return UnavailableError(str(error))
    return error


class _NarrowedRefused(psycopg2.OperationalError):
    """The server did not verify with the one-CA file tried: connect again with the whole file.

    psycopg2 cannot connect a connection object twice, so the connect is made again by the
    caller (:func:`connect`, :class:`ThreadedConnectionPool`), inside
    :func:`iampg._narrow.whole_file`.
    """


def _final_params(target: Target, dsn: str) -> dict[str, str]:
    """Merge the caller's DSN over the endpoint's parameters; check what libpq will receive.

    Raises:
        ConfigurationError: The parameters would send the token to another host, address or
            port than the one it is signed for, or without TLS to a non-loopback address, or
            name a password, passfile or service.
    """
    given = psycopg2.extensions.parse_dsn(dsn) if dsn else {}
    check_extra(given)
    params = {**target.params, **given}
    target.check(params)
    return params


def _factory(
    connecting: Target, base: type[psycopg2.extensions.connection], *, narrow: bool = False
) -> type[psycopg2.extensions.connection]:
    """Subclass ``base``: each connection checked, signed, and its refusal explained.

    With ``narrow``, a connection may verify the server with the one certificate of the CA
    file that verifies it (see :mod:`iampg._narrow`); when that fails, it raises
    :class:`_NarrowedRefused` for the caller to connect again with the whole file.
    """
    provider = connecting.provider

    class IamConnection(base):  # type: ignore[valid-type,misc]
        def __init__(self, dsn: str, *args: Any, **kwargs: Any) -> None:
            params = _final_params(connecting, dsn)
            choice = _narrow.choose(params) if narrow else None
            token = Secret(provider.token())
            try:
                super().__init__(
                    psycopg2.extensions.make_dsn(
                        **with_root(params, None if choice is None else choice.file),
                        password=token.value,
                    ),
                    *args,
                    **kwargs,
                )
            except psycopg2.OperationalError as exc:
                if choice is not None and choice.refusal(exc):
                    choice.refused()
                    raise _NarrowedRefused(str(exc)) from exc
                if choice is not None:
                    choice.released()
                error = explain(cast("Any", exc), provider, token)
                if error is exc:
                    raise
                raise _translated(error) from exc
            except BaseException:
                if choice is not None:
                    choice.released()
                raise
            if choice is not None:
                choice.verified()

    name = base.__name__
    IamConnection.__name__ = IamConnection.__qualname__ = f"Iam{name[:1].upper()}{name[1:]}"
    return IamConnection


def connection_factory(
    target: EndpointOrProvider,
    *,
    preset: str | None = None,
    allow_insecure: bool = False,
    base: type[psycopg2.extensions.connection] = psycopg2.extensions.connection,
) -> type[psycopg2.extensions.connection]:
    """Return a psycopg2 ``connection_factory`` that signs every connection it opens.

    For code that calls :func:`psycopg2.connect` itself::

        factory = connection_factory("postgresql://app@mydb.cluster-abc.us-east-1.rds.amazonaws.com/app")
        conn = psycopg2.connect("application_name=reports", connection_factory=factory)

    Each connection gets the endpoint's libpq parameters, under those given to
    :func:`psycopg2.connect`, and a current token as its password. A token the server refuses
    is forgotten, so the next connection signs a new one, and :class:`AuthenticationError`
    is raised.

    Args:
        target: The endpoint (a provider is made for it) or the :class:`iampg.TokenProvider`
            to share.
        preset: ``rds``, ``aurora-serverless`` (or ``aurora-express``) or ``dsql``: the
            service's ``connect_timeout``; defaults to the endpoint's service.
        allow_insecure: Allow an ``sslmode`` that may send the token in plaintext to a
            non-loopback host.
        base: The connection class to extend (e.g. :class:`psycopg2.extras.DictConnection`).

    Raises:
        ConfigurationError: Bad endpoint or options (checked here, and again on each
            connection's final parameters).
    """
    return _factory(prepare(target, None, preset, allow_insecure=allow_insecure), base)


def connect(
    target: EndpointOrProvider,
    *,
    preset: str | None = None,
    wait: float | None = None,
    allow_insecure: bool = False,
    connection_factory: type[psycopg2.extensions.connection] | None = None,
    **kwargs: Any,
) -> Any:
    """Open a psycopg2 connection that authenticates with a current IAM token.

    Behaves as :func:`iampg.connect`: a refused token is forgotten and the connect tried once
    more with a new one (temporary credentials rotated since the cached token was signed,
    say); a second refusal raises :class:`AuthenticationError` with the likely causes. While
    the service says it is waking up or rate-limiting connections (DSQL), or, for Aurora
    Serverless, while a connect times out during a resume, the connect is retried with
    backoff for up to ``wait`` seconds.

    Args:
        target: The endpoint (a provider is made for it) or the :class:`iampg.TokenProvider`
            to share.
        preset: ``rds``, ``aurora-serverless`` (or ``aurora-express``) or ``dsql``: the
            service's ``connect_timeout`` and ``wait``; defaults to the endpoint's service.
        wait: Seconds to keep retrying a cluster that is not accepting connections yet
            (default from the preset); 0 disables it.
        allow_insecure: Allow an ``sslmode`` that may send the token in plaintext to a
            non-loopback host.
        connection_factory: A :class:`psycopg2.extensions.connection` subclass to extend.
        **kwargs: Passed to :func:`psycopg2.connect`: libpq parameters
            (``application_name``, ``connect_timeout`` …, winning over the endpoint's),
            ``cursor_factory``, ``async_``.

    Returns:
        A :class:`psycopg2.extensions.connection` (or of ``connection_factory``'s class).

    Raises:
        ConfigurationError: Bad endpoint or options.
        TokenError: No token could be signed.
        AuthenticationError: The server refused the token twice, or TLS was off.
        UnavailableError: The service was still turning connections away after ``wait``.
        psycopg2.OperationalError: The connection failed for another reason.
    """
    connecting = prepare(target, None, preset, allow_insecure=allow_insecure)
    base = connection_factory or psycopg2.extensions.connection
    factory = _factory(connecting, base, narrow=True)
    attempts = Attempts(connecting, wait)
    while True:
        try:
            return _connect_narrowed(lambda: psycopg2.connect(connection_factory=factory, **kwargs))
        except psycopg2.OperationalError as exc:
            server = exc.__cause__ if isinstance(exc, iampg.errors.Error) else exc
            try:
                # The factory already forgot a refused token: nothing to forget here.
                delay = attempts.failed(cast("Any", server), Secret(None))
            except iampg.errors.Error as verdict:
                raise _translated(verdict) from server
        if delay:
            time.sleep(delay)


def _connect_narrowed(open_: Callable[[], T]) -> T:
    """Call ``open_``; when the one-CA file it tried did not verify, again with the whole file."""
    try:
        return open_()
    except _NarrowedRefused:
        logger.debug("connecting again with the whole CA file")
    with _narrow.whole_file():
        return open_()


class ThreadedConnectionPool(psycopg2.pool.ThreadedConnectionPool):
    """psycopg2's thread-safe pool, each new connection signed with a current token.

    ``getconn()`` hands out pooled connections as usual; each new physical connection (the
    ``minconn`` opened by the constructor, and those opened later up to ``maxconn``) asks
    the provider for a token, so the pool keeps authenticating after the first token
    expired. Open connections are not affected by token expiry. A refused token is forgotten
    and the connect tried once more with a new one; a second refusal raises
    :class:`AuthenticationError`.

    Example::

        pool = ThreadedConnectionPool(
            1, 10, "postgresql://app@mydb.cluster-abc.us-east-1.rds.amazonaws.com/app"
        )
        conn = pool.getconn()
        ...
        pool.putconn(conn)

    Args:
        minconn: Connections opened at once.
        maxconn: Most connections open at a time.
        target: The endpoint (a provider is made for it) or the :class:`iampg.TokenProvider`
            to share.
        preset: See :func:`connection_factory`.
        allow_insecure: See :func:`connect`.
        connection_factory: A :class:`psycopg2.extensions.connection` subclass to extend.
        **kwargs: Passed to :func:`psycopg2.connect` for every connection (libpq parameters,
            ``cursor_factory`` …).

    Raises:
        ConfigurationError: Bad endpoint or options.
    """

    def __init__(
        self,
        minconn: int,
        maxconn: int,
        target: EndpointOrProvider,
        *,
        preset: str | None = None,
        allow_insecure: bool = False,
        connection_factory: type[psycopg2.extensions.connection] | None = None,
        **kwargs: Any,
    ) -> None:
        connecting = prepare(target, None, preset, allow_insecure=allow_insecure)
        base = connection_factory or psycopg2.extensions.connection
        factory = _factory(connecting, base, narrow=True)
        self._iampg_opened = _Opened()
        super().__init__(minconn, maxconn, connection_factory=factory, **kwargs)

    def getconn(self, key: Any = None) -> Any:
        """Take a connection, as psycopg2's pool does.

        Raises:
            iampg.ConfigurationError: The pool was made in a parent process, before a fork:
                its connections are that process's (make the pool after the fork).
        """
        self._iampg_opened.refuse(self, "use", reopenable=False)
        return super().getconn(key)

    def closeall(self) -> None:
        """Close every connection; in a child process, leave the parent's sessions alone."""
        if self._iampg_opened.inherited():
            logger.debug("not closing a pool made before a fork: its connections are not ours")
            return
        super().closeall()

    def _connect(self, key: Any = None) -> Any:
        """Open a new pooled connection, once more if the server refused the token."""
        connect = super()._connect  # type: ignore[misc]
        try:
            return _connect_narrowed(lambda: connect(key))
        except AuthenticationError as exc:
            if failure_kind(exc) != "token":
                raise
            logger.info("token refused; retrying once with a new token")
        return _connect_narrowed(lambda: connect(key))


# -- transactions that run again after a conflict or a lost connection ----------------------


@overload
def retry_transaction(
    target: Any,
    fn: Callable[[Any], T],
    *,
    attempts: int = ...,
    base: float = ...,
    cap: float = ...,
    idempotent: bool = ...,
) -> T: ...
@overload
def retry_transaction(
    target: Any,
    fn: None = ...,
    *,
    attempts: int = ...,
    base: float = ...,
    cap: float = ...,
    idempotent: bool = ...,
) -> _retry.Decorator: ...
def retry_transaction(
    target: Any,
    fn: Callable[[Any], T] | None = None,
    *,
    attempts: int = 5,
    base: float = 0.02,
    cap: float = 1.0,
    idempotent: bool = False,
) -> Any:
    """Run ``fn(conn)`` in a transaction, again if it lost a race or its connection.

    :func:`iampg.retry_transaction` for psycopg2: a conflict (``OC000``, ``OC001``,
    ``40001``, psycopg2's ``pgcode``) rolls back and ``fn`` runs again, with exponential
    backoff and jitter (``base`` doubling up to ``cap`` seconds). Each attempt is ``with
    conn:`` (psycopg2's transaction block: commit on success, rollback on error).

    With a psycopg2 pool (:class:`ThreadedConnectionPool`, or any of psycopg2's), each
    attempt takes a connection with ``getconn()``, so one lost before ``COMMIT`` was sent is
    closed (``putconn(conn, close=True)``) and ``fn`` runs again on another; lost during
    ``COMMIT``, the outcome is unknown and the error is raised unless ``idempotent=True``. A
    connection of your own cannot be replaced: its loss is raised. ``fn`` must be safe to
    repeat: no side effects outside the database.

    Without ``fn``, returns a decorator: the decorated function takes the connection as its
    first argument, which its callers leave out::

        @retry_transaction(pool)
        def transfer(conn, source, target, amount): ...

        transfer(1, 2, 10)

    Args:
        target: A psycopg2 pool, or a connection not inside a transaction.
        fn: The transaction's work; its return value is returned.
        attempts: How many times to try at most.
        base: First backoff step in seconds.
        cap: Largest backoff step in seconds.
        idempotent: Also run again when the connection broke during ``COMMIT``.

    Raises:
        psycopg2.Error: The last attempt's error, or one that is not retryable.
        ConfigurationError: Bad ``attempts``, ``base`` or ``cap``, or an unknown ``target``.
    """
    return _retry.retrying(
        _Attempt(target),
        fn,
        attempts=attempts,
        base=base,
        cap=cap,
        idempotent=idempotent,
    )


class _Attempt(_retry.PoolOrConnection):
    """Opens each attempt's transaction on a pool or a connection; tells if it was lost."""

    def __init__(self, target: Any) -> None:
        super().__init__(
            target,
            pool=psycopg2.pool.AbstractConnectionPool,
            connection=psycopg2.extensions.connection,
            expected="a psycopg2 pool or connection",
        )

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        """Run one attempt in ``with conn:``; a pooled connection found closed is discarded."""
        self.lost = False
        if not self.replaceable:
            with self.target:
                yield self.target
            return
        conn = self.target.getconn()
        try:
            with conn:
                yield conn
        except Exception:
            self.lost = bool(conn.closed)
            raise
        finally:
            self.target.putconn(conn, close=bool(conn.closed))
