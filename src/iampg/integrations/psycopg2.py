"""psycopg2 connections and pools that authenticate every new connection with a token.

Three entry points, one behaviour: :func:`connect` opens a connection,
:class:`ThreadedConnectionPool` is psycopg2's own pool signing each new connection, and
:func:`connection_factory` returns a ``connection_factory`` class for code that calls
:func:`psycopg2.connect` itself. Each gives the endpoint's libpq parameters (``host``,
``hostaddr``, ``sslmode`` …; the caller's win) and a current token to every new connection,
checks the parameters libpq finally receives (TLS towards anything but loopback, and the host
the token is signed for), forgets a token the server refused and raises
:class:`AuthenticationError`, which is both a :class:`psycopg2.OperationalError` and an
:class:`iampg.AuthenticationError`.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

import psycopg2
import psycopg2.extensions
import psycopg2.pool

import iampg.errors
from iampg._defaults import defaults_for
from iampg._diagnose import authentication_error, failure_kind
from iampg._dsn import connect_params
from iampg._endpoint import Endpoint
from iampg._tokens import TokenProvider
from iampg.errors import ConfigurationError
from iampg.integrations import EndpointOrProvider, _resolve

__all__ = ["AuthenticationError", "ThreadedConnectionPool", "connect", "connection_factory"]

logger = logging.getLogger("iampg.integrations.psycopg2")

_INSECURE_SSLMODES = frozenset({"disable", "allow", "prefer"})


# The two bases type their ``diag`` differently; at runtime each is the driver's own.
class AuthenticationError(iampg.errors.AuthenticationError, psycopg2.OperationalError):  # type: ignore[misc]
    """The server refused the connection's token (or TLS was off); the likely causes listed.

    Both a :class:`psycopg2.OperationalError`, so psycopg2 code that catches that keeps
    working, and an :class:`iampg.AuthenticationError`; the server's own error is chained.
    """

    __module__ = "iampg.integrations.psycopg2"


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _final_params(
    endpoint: Endpoint, given: dict[str, str], *, allow_insecure: bool
) -> dict[str, str]:
    """Merge ``given`` over the endpoint's parameters and check what libpq will receive.

    Raises:
        ConfigurationError: The parameters would send the token to another host than the one
            it is signed for, or without TLS to a non-loopback address.
    """
    params = connect_params(endpoint, allow_insecure=allow_insecure)
    params.setdefault("connect_timeout", str(defaults_for(endpoint, None).connect_timeout))
    params.update(given)
    params.pop("password", None)
    host = params.get("host", "")
    if host != endpoint.host:
        raise ConfigurationError(
            f"host {host!r} is not {endpoint.host!r}, the host the token is signed for: "
            "pass that host as the endpoint, or dial another address with hostaddr="
        )
    dialled = params.get("hostaddr") or host
    sslmode = params.get("sslmode", "prefer")
    if sslmode in _INSECURE_SSLMODES and not _is_loopback(dialled) and not allow_insecure:
        raise ConfigurationError(
            f"sslmode={sslmode} could send the IAM token unencrypted to {dialled}: "
            "use sslmode=require or verify-full (or allow_insecure=True if you really must)"
        )
    return params


def _explained(
    error: psycopg2.OperationalError, provider: TokenProvider, token: str
) -> psycopg2.OperationalError:
    """Forget a refused token; return the error to raise (explained if it was the token)."""
    kind = failure_kind(error)
    if kind is None:
        return error
    if kind == "token":
        provider.invalidate(token)
        logger.info(
            "token refused by %s; the next connection signs a new one", provider.endpoint.host
        )
    explained = authentication_error(error, provider.endpoint, kind)
    return AuthenticationError(str(explained))


def connection_factory(
    target: EndpointOrProvider,
    *,
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
        allow_insecure: Allow an ``sslmode`` that may send the token in plaintext to a
            non-loopback host.
        base: The connection class to extend (e.g. :class:`psycopg2.extras.DictConnection`).

    Raises:
        ConfigurationError: Bad endpoint or options (checked here, and again on each
            connection's final parameters).
    """
    endpoint, provider = _resolve(target)
    connect_params(endpoint, allow_insecure=allow_insecure)

    class IamConnection(base):  # type: ignore[valid-type,misc]
        def __init__(self, dsn: str, *args: Any, **kwargs: Any) -> None:
            given = psycopg2.extensions.parse_dsn(dsn) if dsn else {}
            params = _final_params(endpoint, given, allow_insecure=allow_insecure)
            token = provider.token()
            try:
                super().__init__(
                    psycopg2.extensions.make_dsn(**params, password=token), *args, **kwargs
                )
            except psycopg2.OperationalError as exc:
                error = _explained(exc, provider, token)
                if error is exc:
                    raise
                raise error from exc

    name = base.__name__
    IamConnection.__name__ = IamConnection.__qualname__ = f"Iam{name[:1].upper()}{name[1:]}"
    return IamConnection


def _refused_token(error: AuthenticationError) -> bool:
    return failure_kind(error) == "token"


def connect(
    target: EndpointOrProvider,
    *,
    allow_insecure: bool = False,
    connection_factory: type[psycopg2.extensions.connection] | None = None,
    **kwargs: Any,
) -> Any:
    """Open a psycopg2 connection that authenticates with a current IAM token.

    A refused token is forgotten and the connect tried once more with a new one (temporary
    credentials rotated since the cached token was signed, say); a second refusal raises
    :class:`AuthenticationError` with the likely causes.

    Args:
        target: The endpoint (a provider is made for it) or the :class:`iampg.TokenProvider`
            to share.
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
        psycopg2.OperationalError: The connection failed for another reason.
    """
    base = connection_factory or psycopg2.extensions.connection
    factory = _factory(target, allow_insecure=allow_insecure, base=base)
    try:
        return psycopg2.connect(connection_factory=factory, **kwargs)
    except AuthenticationError as exc:
        if not _refused_token(exc):
            raise
        logger.info("retrying once with a new token")
    return psycopg2.connect(connection_factory=factory, **kwargs)


_factory = connection_factory  # connect() has a parameter of that name


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
        allow_insecure: bool = False,
        connection_factory: type[psycopg2.extensions.connection] | None = None,
        **kwargs: Any,
    ) -> None:
        base = connection_factory or psycopg2.extensions.connection
        factory = _factory(target, allow_insecure=allow_insecure, base=base)
        super().__init__(minconn, maxconn, connection_factory=factory, **kwargs)

    def _connect(self, key: Any = None) -> Any:
        """Open a new pooled connection, once more if the server refused the token."""
        try:
            return super()._connect(key)  # type: ignore[misc]
        except AuthenticationError as exc:
            if not _refused_token(exc):
                raise
            logger.info("retrying once with a new token")
        return super()._connect(key)  # type: ignore[misc]
