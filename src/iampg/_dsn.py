"""Connection parameters, conninfo strings, URLs and PG* environments that carry a token."""

from __future__ import annotations

from urllib.parse import quote

from iampg._endpoint import Endpoint
from iampg._tokens import TokenProvider
from iampg.errors import ConfigurationError

__all__ = ["connect_params", "conninfo", "env", "resolve", "url"]

_INSECURE_SSLMODES = frozenset({"disable", "allow", "prefer"})
_SYSTEM_ROOTS_LIBPQ = 160000  # sslrootcert=system needs libpq 16

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


def resolve(
    endpoint: Endpoint | str | None, provider: TokenProvider | None
) -> tuple[Endpoint, TokenProvider]:
    """Return the endpoint to dial and the provider that signs for it.

    ``endpoint`` may add connection options (``sslmode``, ``hostaddr`` …) to the provider's
    endpoint, but must not name another host, port, user, region or service.

    Raises:
        ConfigurationError: Neither was given, or they disagree on what is signed.
    """
    if provider is None:
        if endpoint is None:
            raise ConfigurationError("pass an endpoint (host name, URL or Endpoint) or provider=")
        ep = Endpoint.parse(endpoint)
        return ep, TokenProvider(ep)
    if endpoint is None:
        return provider.endpoint, provider
    ep = Endpoint.parse(endpoint)
    signed = provider.endpoint
    for name in ("host", "port", "user", "region", "kind"):
        if getattr(ep, name) != getattr(signed, name):
            raise ConfigurationError(
                f"the endpoint's {name} ({getattr(ep, name)!r}) differs from the one the "
                f"provider signs for ({getattr(signed, name)!r}): pass one of them"
            )
    return ep, provider


def connect_params(endpoint: Endpoint, *, allow_insecure: bool = False) -> dict[str, str]:
    """Return the libpq parameters for ``endpoint``, without the password.

    TLS is on unless asked otherwise: ``sslmode=require`` for RDS and Aurora, and
    ``verify-full`` against the system's root certificates for DSQL (with libpq 16 or later;
    ``require`` before). A token is a bearer credential, so a ``sslmode`` that may send it in
    plaintext (``disable``, ``allow``, ``prefer``) is refused towards anything but loopback
    unless ``allow_insecure`` is true.

    Raises:
        ConfigurationError: An insecure ``sslmode`` towards a non-loopback host.
    """
    params = dict(endpoint)
    sslmode = params.get("sslmode")
    if sslmode is None:
        if endpoint.kind == "dsql" and _libpq_version() >= _SYSTEM_ROOTS_LIBPQ:
            params["sslmode"] = "verify-full"
            params.setdefault("sslrootcert", "system")
        else:
            params["sslmode"] = "require"
    elif sslmode in _INSECURE_SSLMODES and not endpoint.is_loopback and not allow_insecure:
        raise ConfigurationError(
            f"sslmode={sslmode} could send the IAM token unencrypted to {endpoint.dialled}: "
            "use sslmode=require or verify-full (or allow_insecure=True if you really must)"
        )
    return params


def conninfo(
    endpoint: Endpoint | str | None = None,
    provider: TokenProvider | None = None,
    *,
    allow_insecure: bool = False,
) -> str:
    """Return a libpq ``key=value`` string with a current token as the password.

    The result is a credential: do not log it. It stops working for *new* connections when
    the token expires (at most 15 minutes by default).

    Raises:
        ConfigurationError: See :func:`connect_params`.
        TokenError: No token could be signed.
    """
    from psycopg.conninfo import make_conninfo  # noqa: PLC0415

    ep, prov = resolve(endpoint, provider)
    params = connect_params(ep, allow_insecure=allow_insecure)
    return make_conninfo(**params, password=prov.token())


def url(
    endpoint: Endpoint | str | None = None,
    provider: TokenProvider | None = None,
    *,
    allow_insecure: bool = False,
) -> str:
    """Return a ``postgresql://`` URL with a current token, percent-encoded, as the password.

    Every part is encoded with nothing left safe (a token contains ``% & / : = ?``), and every
    other parameter is kept as a query parameter, so migration tools that take a URL can
    connect. The result is a credential: do not log it.

    Raises:
        ConfigurationError: See :func:`connect_params`.
        TokenError: No token could be signed.
    """
    ep, prov = resolve(endpoint, provider)
    params = connect_params(ep, allow_insecure=allow_insecure)
    host = params.pop("host")
    host = f"[{host}]" if ":" in host else host
    port = params.pop("port")
    user = quote(params.pop("user"), safe="")
    dbname = quote(params.pop("dbname"), safe="")
    token = quote(prov.token(), safe="")
    query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in params.items())
    return f"postgresql://{user}:{token}@{host}:{port}/{dbname}" + (f"?{query}" if query else "")


def env(
    endpoint: Endpoint | str | None = None,
    provider: TokenProvider | None = None,
    *,
    allow_insecure: bool = False,
) -> dict[str, str]:
    """Return ``PG*`` environment variables (``PGPASSWORD`` = a current token) for libpq tools.

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


def _libpq_version() -> int:
    from psycopg import pq  # noqa: PLC0415

    return pq.version()
