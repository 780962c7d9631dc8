"""IAM-authenticated PostgreSQL on AWS: tokens, psycopg pools and DSN helpers.

Importing iampg imports neither psycopg nor botocore: the token core (endpoints, providers,
signers, DSN helpers) runs where psycopg cannot load a libpq. psycopg is imported when a psycopg
helper (:func:`connect`, :class:`ConnectionPool` …) or an error class that derives from
psycopg's is first looked up.
"""

from typing import TYPE_CHECKING, Any

from iampg._aws import AwsSigner
from iampg._dsn import alembic_url, conninfo, env, pgpass, sqlalchemy_url, url
from iampg._endpoint import Endpoint, Kind
from iampg._retry import RETRYABLE_SQLSTATES, aretry_transaction, retry_transaction
from iampg._signer import Clock, SignedToken, Signer
from iampg._tokens import RefreshStrategy, TokenProvider, TokenStats
from iampg.errors import ConfigurationError, Error, TokenError

if TYPE_CHECKING:
    from iampg._pool import AsyncConnectionPool, ConnectionPool, aconnect, connect
    from iampg.errors import AuthenticationError, UnavailableError

__all__ = [
    "RETRYABLE_SQLSTATES",
    "AsyncConnectionPool",
    "AuthenticationError",
    "AwsSigner",
    "Clock",
    "ConfigurationError",
    "ConnectionPool",
    "Endpoint",
    "Error",
    "Kind",
    "RefreshStrategy",
    "SignedToken",
    "Signer",
    "TokenError",
    "TokenProvider",
    "TokenStats",
    "UnavailableError",
    "aconnect",
    "alembic_url",
    "aretry_transaction",
    "connect",
    "conninfo",
    "env",
    "pgpass",
    "retry_transaction",
    "sqlalchemy_url",
    "url",
]

__version__ = "0.1.0.dev0"

# Looked up on first use: each of these imports psycopg.
_LAZY = {
    "AsyncConnectionPool": "iampg._pool",
    "ConnectionPool": "iampg._pool",
    "aconnect": "iampg._pool",
    "connect": "iampg._pool",
    "AuthenticationError": "iampg.errors",
    "UnavailableError": "iampg.errors",
}


def __getattr__(name: str) -> Any:
    """Import a psycopg helper when it is first used (psycopg loads then)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'iampg' has no attribute {name!r}")
    import importlib  # noqa: PLC0415

    try:
        value = getattr(importlib.import_module(module), name)
    except ImportError as exc:
        msg = (
            f"iampg.{name} needs psycopg 3 with a libpq, which cannot be imported here ({exc}): "
            "install it (pip install 'psycopg[binary,pool]'), or use the token helpers "
            "(TokenProvider, url, env) or an integration with your driver"
        )
        raise ImportError(msg, name=exc.name) from exc
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
