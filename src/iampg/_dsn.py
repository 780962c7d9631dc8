"""Connection parameters, conninfo strings, URLs and PG* environments that carry a token."""

from __future__ import annotations

import re
from urllib.parse import quote

from iampg import _conninfo
from iampg._connecting import connect_params, resolve
from iampg._endpoint import Endpoint
from iampg._tokens import TokenProvider
from iampg.errors import ConfigurationError

__all__ = [
    "alembic_url",
    "connect_params",
    "conninfo",
    "env",
    "pgpass",
    "resolve",
    "sqlalchemy_url",
    "url",
]

_DRIVER = re.compile(r"[A-Za-z0-9_]+")

# libpq parameter -> environment variable (libpq's own table, for what iampg may pass on).
_ENV_NAMES = {
    "host": "PGHOST",
    "hostaddr": "PGHOSTADDR",
    "port": "PGPORT",
    "user": "PGUSER",
    "dbname": "PGDATABASE",
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslcrl": "PGSSLCRL",
    "sslsni": "PGSSLSNI",
    "sslnegotiation": "PGSSLNEGOTIATION",
    "sslcompression": "PGSSLCOMPRESSION",
    "ssl_min_protocol_version": "PGSSLMINPROTOCOLVERSION",
    "ssl_max_protocol_version": "PGSSLMAXPROTOCOLVERSION",
    "require_auth": "PGREQUIREAUTH",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "application_name": "PGAPPNAME",
    "options": "PGOPTIONS",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "client_encoding": "PGCLIENTENCODING",
    "gssencmode": "PGGSSENCMODE",
    "channel_binding": "PGCHANNELBINDING",
    "load_balance_hosts": "PGLOADBALANCEHOSTS",
}


def conninfo(
    endpoint: Endpoint | str | TokenProvider | None = None,
    provider: TokenProvider | None = None,
    *,
    allow_insecure: bool = False,
) -> str:
    """Return a libpq ``key=value`` string with a current token as the password.

    Takes an endpoint (anything :meth:`Endpoint.parse` accepts), a provider, or both (see
    :func:`url`); ``conninfo(provider)`` is ``conninfo(provider=provider)``.

    The result is a credential: do not log it. It stops working for *new* connections when
    the token expires (at most 15 minutes by default).

    Raises:
        ConfigurationError: See :func:`connect_params`.
        TokenError: No token could be signed.
    """
    ep, prov = resolve(endpoint, provider)
    params = connect_params(ep, allow_insecure=allow_insecure)
    return _conninfo.make(**params, password=prov.token())


def url(
    endpoint: Endpoint | str | TokenProvider | None = None,
    provider: TokenProvider | None = None,
    *,
    allow_insecure: bool = False,
) -> str:
    """Return a ``postgresql://`` URL with a current token, percent-encoded, as the password.

    The user, password and database name are percent-encoded with nothing left safe (a token
    contains ``% & / : = ?``), and every other parameter (``hostaddr``, ``sslmode``,
    ``application_name`` …) is kept as an encoded query parameter, so migration tools that
    take a URL can connect. libpq and :func:`urllib.parse.urlsplit` read every part back. The
    result is a credential valid for new connections until the token expires (at most 15
    minutes by default): do not log it.

    Args:
        endpoint: Where to connect (anything :meth:`Endpoint.parse` accepts), or a
            :class:`TokenProvider`: its endpoint, signed by it (``url(provider)`` is
            ``url(provider=provider)``, as the integrations take a provider first).
        provider: The token cache to use; one is made for ``endpoint`` if omitted. With both,
            ``endpoint`` may add libpq options (``sslmode``, ``hostaddr`` …) but not name
            another host, port, user, region or service.
        allow_insecure: See :func:`connect_params`.

    Raises:
        ConfigurationError: See :func:`connect_params`; or the endpoint and provider
            disagree, or a provider given first and a different one as ``provider``.
        TokenError: No token could be signed.
    """
    return _url("postgresql", endpoint, provider, allow_insecure=allow_insecure)


def alembic_url(
    endpoint: Endpoint | str | TokenProvider | None = None,
    provider: TokenProvider | None = None,
    *,
    driver: str | None = "psycopg",
    allow_insecure: bool = False,
) -> str:
    """Return :func:`sqlalchemy_url` with every ``%`` doubled, for ``alembic.ini``.

    Takes an endpoint, a provider, or both, or a provider in place of the endpoint, as
    :func:`url` does.

    alembic connects through SQLAlchemy, so the scheme names the driver
    (``postgresql+psycopg://``; a bare ``postgresql://`` would make SQLAlchemy look for
    psycopg2). ConfigParser's interpolation (used by ``alembic.ini`` and alembic's
    ``config.set_main_option``) reads ``%%`` as ``%``; a single ``%`` from the encoded token
    would fail with ``InterpolationSyntaxError``. After interpolation the value is exactly
    :func:`sqlalchemy_url`. The result is a credential: do not log it.

    Raises:
        ConfigurationError: See :func:`connect_params`, or a bad driver name.
        TokenError: No token could be signed.
    """
    text = sqlalchemy_url(endpoint, provider, driver=driver, allow_insecure=allow_insecure)
    return text.replace("%", "%%")


def sqlalchemy_url(
    endpoint: Endpoint | str | TokenProvider | None = None,
    provider: TokenProvider | None = None,
    *,
    driver: str | None = "psycopg",
    allow_insecure: bool = False,
) -> str:
    """Return a SQLAlchemy URL, ``postgresql+<driver>://``, with a current token.

    Encoded like :func:`url`: SQLAlchemy's ``make_url`` reads back the user, the token as
    the password, the host, port and database, and every other libpq parameter as a query
    parameter, which the ``psycopg`` and ``psycopg2`` dialects pass to libpq. The engine keeps
    using this token for every new connection, so it stops connecting when the token expires
    (at most 15 minutes by default): for long-lived engines use iampg's SQLAlchemy
    integration, which signs per connection. The result is a credential: do not log it.
    A database name that a URL must escape (``shop/db``) goes in the query as ``dbname``:
    SQLAlchemy 2.0 reads the path without decoding it.

    Args:
        endpoint: Where to connect (anything :meth:`Endpoint.parse` accepts), or a
            :class:`TokenProvider` (see :func:`url`).
        provider: The token cache to use.
        driver: The SQLAlchemy driver name (default ``psycopg``); ``None`` for SQLAlchemy's
            default PostgreSQL driver (``postgresql://``).
        allow_insecure: See :func:`connect_params`.

    Raises:
        ConfigurationError: An invalid driver name, or see :func:`connect_params`.
        TokenError: No token could be signed.
    """
    if driver is not None and not _DRIVER.fullmatch(driver):
        raise ConfigurationError(
            f"driver must be a SQLAlchemy driver name such as 'psycopg', not {driver!r}"
        )
    scheme = "postgresql" if driver is None else f"postgresql+{driver}"
    return _url(scheme, endpoint, provider, allow_insecure=allow_insecure, escaped_path=False)


def pgpass(
    endpoint: Endpoint | str | TokenProvider | None = None,
    provider: TokenProvider | None = None,
    *,
    allow_insecure: bool = False,
) -> str:
    r"""Return a ``.pgpass`` line, ``host:port:dbname:user:token``, without a line break.

    Takes an endpoint, a provider, or both, or a provider in place of the endpoint, as
    :func:`url` does.

    Backslashes and colons are escaped as libpq requires (``\\`` and ``\:``), and a field
    that is exactly ``*`` (libpq's wildcard) or a host starting with ``#`` (a comment) is
    escaped too, so the line matches only this endpoint. libpq looks the line up by the
    ``host`` name (not ``hostaddr``), port, database and user, and ignores a password file
    that others can read: create it with mode ``0600``. The line is a credential valid until
    the token expires (at most 15 minutes by default): do not log it.

    Raises:
        ConfigurationError: A field contains a line break (a ``.pgpass`` line cannot hold
            one), or see :func:`connect_params`.
        TokenError: No token could be signed.
    """
    ep, prov = resolve(endpoint, provider)
    params = connect_params(ep, allow_insecure=allow_insecure)
    names = ("host", "port", "dbname", "user")
    fields = [params[name] for name in names]
    for name in names:
        if "\n" in params[name] or "\r" in params[name]:
            raise ConfigurationError(
                f"the {name} contains a line break, which a .pgpass line cannot hold: "
                "use conninfo(), url() or env() instead"
            )
    token = prov.token()
    if "\n" in token or "\r" in token:
        raise ConfigurationError(
            "the token contains a line break, which a .pgpass line cannot hold: "
            "use conninfo(), url() or env() instead"
        )
    escaped = [_pgpass_escape(value) for value in fields]
    if escaped[0].startswith("#"):
        escaped[0] = "\\" + escaped[0]
    return ":".join([*escaped, _pgpass_escape(token, wildcard=False)])


def _pgpass_escape(value: str, *, wildcard: bool = True) -> str:
    """Escape backslashes and colons for a ``.pgpass`` field, and a lone ``*`` (a wildcard)."""
    if wildcard and value == "*":
        return "\\*"
    return value.replace("\\", "\\\\").replace(":", "\\:")


def _url(
    scheme: str,
    endpoint: Endpoint | str | TokenProvider | None,
    provider: TokenProvider | None,
    *,
    allow_insecure: bool,
    escaped_path: bool = True,
) -> str:
    """Build a URL carrying a current token.

    With ``escaped_path`` false, a database name that needs escaping goes in the query as
    ``dbname`` instead of the path: SQLAlchemy 2.0 reads the path undecoded (``shop%2Fdb``
    would reach the server as is), and its dialects pass ``dbname`` on to the driver.
    """
    ep, prov = resolve(endpoint, provider)
    params = connect_params(ep, allow_insecure=allow_insecure)
    host = params.pop("host")
    host = f"[{host}]" if ":" in host else host
    port = params.pop("port")
    user = quote(params.pop("user"), safe="")
    dbname = quote(params.pop("dbname"), safe="")
    if not escaped_path and dbname != ep.dbname:
        params = {"dbname": ep.dbname, **params}
        dbname = ""
    token = quote(prov.token(), safe="")
    query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in params.items())
    return f"{scheme}://{user}:{token}@{host}:{port}/{dbname}" + (f"?{query}" if query else "")


def env(
    endpoint: Endpoint | str | TokenProvider | None = None,
    provider: TokenProvider | None = None,
    *,
    allow_insecure: bool = False,
) -> dict[str, str]:
    """Return ``PG*`` environment variables (``PGPASSWORD`` = a current token) for libpq tools.

    Takes an endpoint, a provider, or both, or a provider in place of the endpoint, as
    :func:`url` does.

    Raises:
        ConfigurationError: A parameter has no ``PG*`` variable, or see :func:`connect_params`.
        TokenError: No token could be signed.
    """
    ep, prov = resolve(endpoint, provider)
    params = connect_params(ep, allow_insecure=allow_insecure)
    unknown = sorted(set(params) - set(_ENV_NAMES))
    if unknown:
        raise ConfigurationError(
            f"no PG* environment variable exists for {', '.join(unknown)}: "
            "use conninfo() or url() instead"
        )
    out = {_ENV_NAMES[k]: v for k, v in params.items()}
    out["PGPASSWORD"] = prov.token()
    return out
