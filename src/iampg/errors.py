"""Exceptions raised by iampg.

Every exception iampg raises on purpose derives from :class:`Error`::

    iampg.Error
    ├── ConfigurationError      bad or missing settings (also a ValueError)
    ├── TokenError              no valid token could be minted
    ├── AuthenticationError     the server refused the token (also a psycopg.OperationalError
    │                           where psycopg can be imported)
    └── UnavailableError        the service kept turning connections away (waking up, rate
                                limited) past the deadline (also a psycopg.OperationalError
                                where psycopg can be imported)

``AuthenticationError`` and ``UnavailableError`` are made when first looked up: with psycopg
importable, they also derive from :class:`psycopg.OperationalError`, so code that catches
psycopg's error keeps catching them; without it (an image with asyncpg only, or no libpq),
they derive from :class:`Error` alone and looking them up does not fail. Importing this
module imports no psycopg.

Messages never contain a token, a password or a URL that carries one.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

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


_AUTHENTICATION_DOC = """The server refused the connection's credentials.

    Raised by :func:`iampg.connect` in place of psycopg's ``OperationalError`` when the
    server's message is one of the services' authentication failures, with the likely causes
    listed. Also a :class:`psycopg.OperationalError` where psycopg can be imported.
    """

_UNAVAILABLE_DOC = """The service kept turning new connections away until the deadline.

    Raised by :func:`iampg.connect` after retrying a cluster that was waking up or
    rate-limiting connections; the last refusal is chained. Also a
    :class:`psycopg.OperationalError` where psycopg can be imported.
    """

if TYPE_CHECKING:
    import psycopg

    class AuthenticationError(Error, psycopg.OperationalError):
        """The server refused the connection's credentials."""

    class UnavailableError(Error, psycopg.OperationalError):
        """The service kept turning new connections away until the deadline."""

else:
    _made: dict[str, type[Error]] = {}
    _lock = threading.Lock()

    def _psycopg_base() -> tuple[type[Exception], ...]:
        """Return ``(psycopg.OperationalError,)``, or nothing where psycopg cannot load."""
        try:
            import psycopg  # noqa: PLC0415 -- psycopg loads on first use
        except ImportError:
            return ()
        return (psycopg.OperationalError,)

    def _make(name: str) -> type[Error]:
        with _lock:
            if name not in _made:
                doc = _AUTHENTICATION_DOC if name == "AuthenticationError" else _UNAVAILABLE_DOC
                namespace: dict[str, Any] = {"__module__": "iampg", "__doc__": doc}
                made = type(name, (Error, *_psycopg_base()), namespace)
                made.__qualname__ = name
                _made[name] = made
                globals()[name] = made  # later lookups skip __getattr__
            return _made[name]

    def __getattr__(name: str) -> Any:
        if name in ("AuthenticationError", "UnavailableError"):
            return _make(name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
