"""IAM-authenticated PostgreSQL on AWS: tokens, psycopg pools and DSN helpers."""

from iampg._aws import AwsSigner
from iampg._dsn import alembic_url, conninfo, env, pgpass, sqlalchemy_url, url
from iampg._endpoint import Endpoint, Kind
from iampg._pool import AsyncConnectionPool, ConnectionPool, aconnect, connect
from iampg._retry import RETRYABLE_SQLSTATES, aretry_transaction, retry_transaction
from iampg._signer import Clock, SignedToken, Signer
from iampg._tokens import RefreshStrategy, TokenProvider, TokenStats
from iampg.errors import (
    AuthenticationError,
    ConfigurationError,
    Error,
    TokenError,
    UnavailableError,
)

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
