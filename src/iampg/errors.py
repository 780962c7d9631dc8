"""Exceptions raised by iampg.

Every exception iampg raises on purpose derives from :class:`Error`::

    iampg.Error
    ├── ConfigurationError      bad or missing settings (also a ValueError)
    ├── TokenError              no valid token could be minted
    ├── AuthenticationError     the server refused the token (also a psycopg.OperationalError)
    └── UnavailableError        the service kept turning connections away (waking up, rate
                                limited) past the deadline (also a psycopg.OperationalError)

Messages never contain a token, a password or a URL that carries one.
"""

from __future__ import annotations

import psycopg

__all__ = ["AuthenticationError", "ConfigurationError", "Error", "TokenError", "UnavailableError"]


class Error(Exception):
    """Base class of every exception iampg raises on purpose."""

    __module__ = "iampg"


class ConfigurationError(Error, ValueError):
    """A setting is missing or invalid; the message says what to supply."""

    __module__ = "iampg"


class TokenError(Error):
    """No valid authentication token could be minted; the cause is chained."""

    __module__ = "iampg"


class AuthenticationError(Error, psycopg.OperationalError):
    """The server refused the connection's credentials.

    Raised by :func:`iampg.connect` in place of psycopg's ``OperationalError`` when the
    server's message is one of the services' authentication failures, with the likely causes
    listed.
    """

    __module__ = "iampg"


class UnavailableError(Error, psycopg.OperationalError):
    """The service kept turning new connections away until the deadline.

    Raised by :func:`iampg.connect` after retrying a cluster that was waking up or
    rate-limiting connections; the last refusal is chained.
    """

    __module__ = "iampg"
