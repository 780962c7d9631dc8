"""IAM-authenticated PostgreSQL on AWS: tokens, psycopg pools and DSN helpers."""

from iampg._dsn import conninfo, env, url
from iampg._endpoint import Endpoint, Kind
from iampg._pool import AsyncConnectionPool, ConnectionPool, connect
from iampg._tokens import Clock, SignedToken, Signer, TokenProvider
from iampg.errors import AuthenticationError, ConfigurationError, Error, TokenError

__all__ = [
    "AsyncConnectionPool",
    "AuthenticationError",
    "Clock",
    "ConfigurationError",
    "ConnectionPool",
    "Endpoint",
    "Error",
    "Kind",
    "SignedToken",
    "Signer",
    "TokenError",
    "TokenProvider",
    "connect",
    "conninfo",
    "env",
    "url",
]

__version__ = "0.1.0.dev0"
