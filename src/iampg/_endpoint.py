"""Endpoint: where to connect, whom to sign for, and which AWS service signs."""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import FrozenInstanceError
from typing import Any, Literal, NoReturn

from iampg._options import option
from iampg.errors import ConfigurationError

__all__ = ["Endpoint", "Kind"]

Kind = Literal["rds", "dsql"]
"""The service that checks the token: ``rds`` (RDS, Aurora, RDS Proxy) or ``dsql``."""

_KINDS: tuple[Kind, ...] = ("rds", "dsql")
_REGION = r"[a-z]{2}(?:-[a-z]+)+-\d+"
# <name>.<cluster-|cluster-ro-|cluster-custom-|proxy-|><id>.<region>.rds.amazonaws.com[.cn],
# RDS Proxy custom endpoints add a label: <endpoint>.endpoint.proxy-<id>.<region>...
_RDS_HOST = re.compile(
    rf"^(?:[a-z0-9-]+\.)+(?P<region>{_REGION})\.rds\.amazonaws\.com(?:\.cn)?$",
)
# <cluster id>.dsql[-<suffix>].<region>.on.aws
_DSQL_HOST = re.compile(rf"^[a-z0-9]+\.dsql(?:-[a-z0-9]+)?\.(?P<region>{_REGION})\.on\.aws$")
_DSQL_CLUSTER_ID = re.compile(r"^[a-z0-9]{20,40}$")
_REGION_ONLY = re.compile(rf"^{_REGION}$")
_DEFAULT_PORT = 5432

# Every connection keyword libpq 18 knows (PQconndefaults()), a superset of older versions'.
# Kept here, not asked of libpq, so that checking an endpoint never needs libpq loaded.
LIBPQ_KEYWORDS: frozenset[str] = frozenset(
    {
        "application_name",
        "channel_binding",
        "client_encoding",
        "connect_timeout",
        "dbname",
        "fallback_application_name",
        "gssdelegation",
        "gssencmode",
        "gsslib",
        "host",
        "hostaddr",
        "keepalives",
        "keepalives_count",
        "keepalives_idle",
        "keepalives_interval",
        "krbsrvname",
        "load_balance_hosts",
        "max_protocol_version",
        "min_protocol_version",
        "oauth_client_id",
        "oauth_client_secret",
        "oauth_issuer",
        "oauth_scope",
        "options",
        "passfile",
        "password",
        "port",
        "replication",
        "require_auth",
        "requirepeer",
        "scram_client_key",
        "scram_server_key",
        "service",
        "ssl_max_protocol_version",
        "ssl_min_protocol_version",
        "sslcert",
        "sslcertmode",
        "sslcompression",
        "sslcrl",
        "sslcrldir",
        "sslkey",
        "sslkeylogfile",
        "sslmode",
        "sslnegotiation",
        "sslpassword",
        "sslrootcert",
        "sslsni",
        "target_session_attrs",
        "tcp_user_timeout",
        "user",
    }
)
# What people write for a libpq keyword that spelling distance does not find.
_KEYWORD_ALIASES = {
    "database": "dbname",
    "db": "dbname",
    "username": "user",
    "ssl": "sslmode",
    "timeout": "connect_timeout",
    "sslca": "sslrootcert",
    "sslrootcertificate": "sslrootcert",
}
SSLMODES: tuple[str, ...] = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
# What a host name is made of (an IP address literal is checked apart).
_HOST_CHARS = re.compile(r"[a-z0-9_.-]+")
# libpq's complaints about a key it does not know, in a URL or a key=value string.
_LIBPQ_UNKNOWN = re.compile(
    r'(?:invalid URI query parameter: |invalid connection option )"(?P<key>[^"]*)"'
)
_CONNINFO = re.compile(r"^\s*[A-Za-z_]+\s*=|://")

# Keys of a connection string that cannot work with IAM tokens.
_REFUSED_KEYS = {
    "password": "iampg supplies the IAM token as the password: remove the password",
    "passfile": "iampg supplies the IAM token as the password: remove passfile",
    "service": "resolve the service file first and pass its host, port, user and dbname",
}


def _infer(host: str) -> tuple[Kind | None, str | None]:
    """Return the service kind and region a host name implies, if any."""
    if m := _DSQL_HOST.match(host):
        return "dsql", m["region"]
    if m := _RDS_HOST.match(host):
        return "rds", m["region"]
    return None, None


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


class Endpoint:
    """Where to connect and which host, port, user and region a token is signed for.

    The service (``kind``) and region are inferred from AWS host names:
    ``<name>.cluster-<id>.<region>.rds.amazonaws.com`` (and instance, ``cluster-ro-``,
    ``cluster-custom-``, RDS Proxy, China and GovCloud names) is ``rds``;
    ``<id>.dsql.<region>.on.aws`` is ``dsql``. Any other host name (a tunnel, a private DNS
    alias, the local emulator) needs ``region`` and, for DSQL, ``kind``.

    ``host`` is the name that is signed and that TLS verifies; ``hostaddr`` is an optional
    IP address to dial instead of resolving ``host`` (an SSH tunnel, a load balancer, the
    emulator on loopback). Any other libpq parameter (``sslmode``, ``sslrootcert``,
    ``connect_timeout``, ``application_name`` …) is kept in :attr:`params` and passed through.

    Endpoints are immutable and hashable: assigning or deleting an attribute raises
    :class:`dataclasses.FrozenInstanceError` (an :class:`AttributeError`); :meth:`replace`
    returns a modified copy.

    The constructor takes a host name; a ``postgresql://`` URL or a ``host=...`` string is
    refused with a pointer to :meth:`parse`, which reads both. Every value is checked when
    the endpoint is made, without loading libpq: a parameter libpq (up to version 18) does
    not know, an ``sslmode`` other than libpq's six, a NUL byte or text that is not valid
    Unicode (as an undecodable environment variable gives) in any field, or a host name
    with a character no host name has (``/``, ``@``, ``?``, ``#``, a space...) raises
    :class:`~iampg.ConfigurationError` naming the field and, for a misspelt parameter, the
    nearest valid one.

    Args:
        host: The database host name, or a bare DSQL cluster id with ``kind="dsql"``.
        user: The database user the token is signed for. DSQL defaults to ``admin``.
        port: The port, signed into RDS tokens. Defaults to 5432.
        dbname: The database name. Defaults to the user's name for RDS (as libpq does) and
            ``postgres`` for DSQL.
        region: The AWS region. Inferred from AWS host names.
        kind: ``rds`` or ``dsql``. Inferred from AWS host names, else ``rds``.
        hostaddr: An IP address to dial instead of resolving ``host``.
        **params: Other libpq connection parameters, as strings.

    Raises:
        ConfigurationError: A value is missing or invalid; the message says what to supply.
    """

    __slots__ = ("_params", "dbname", "host", "hostaddr", "kind", "port", "region", "user")

    host: str
    user: str
    port: int
    dbname: str
    region: str
    kind: Kind
    hostaddr: str | None
    _params: tuple[tuple[str, str], ...]

    def __init__(
        self,
        host: str,
        *,
        user: str | None = None,
        port: int | str | None = None,
        dbname: str | None = None,
        region: str | None = None,
        kind: str | None = None,
        hostaddr: str | None = None,
        **params: Any,
    ) -> None:
        for name, value in (
            ("host", host),
            ("user", user),
            ("dbname", dbname),
            ("region", region),
            ("kind", kind),
            ("hostaddr", hostaddr),
        ):
            if value is not None and not isinstance(value, str):
                raise ConfigurationError(f"{name} must be a string, not {type(value).__name__}")
            if value is not None:
                _check_text(name, value)
        if host and _CONNINFO.search(host):
            # Never echo it: a URL or connection string may carry a password.
            raise ConfigurationError(
                "Endpoint() takes a host name: read a postgresql:// URL or a 'host=...' "
                "connection string with Endpoint.parse(...)"
            )
        if isinstance(port, str):
            _check_text("port", port)
        extra = _params(params)
        kind, host, region = _locate(host, kind, region)
        user = _user(user, kind)
        _freeze(
            self,
            (
                host,
                user,
                _port(port),
                dbname or ("postgres" if kind == "dsql" else user),
                region,
                kind,
                _hostaddr(hostaddr),
                extra,
            ),
        )

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise FrozenInstanceError(
            f"cannot assign to {name!r}: an Endpoint is immutable; use replace() for a copy"
        )

    def __delattr__(self, name: str) -> NoReturn:
        raise FrozenInstanceError(
            f"cannot delete {name!r}: an Endpoint is immutable; use replace() for a copy"
        )

    def __reduce__(self) -> tuple[Any, tuple[object, ...]]:
        return _restore, self._key()

    def __copy__(self) -> Endpoint:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Endpoint:
        return self

    # -- constructors ---------------------------------------------------------------------

    @classmethod
    def parse(
        cls,
        spec: str | Endpoint,
        /,
        *,
        environ: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> Endpoint:
        """Build an endpoint from a host name, a ``postgresql://`` URL or a libpq string.

        Keyword arguments override what the string says, for example
        ``Endpoint.parse(url, region="eu-west-1", hostaddr="127.0.0.1")``. With ``environ``
        (e.g. ``os.environ``), ``PGHOST``, ``PGPORT``, ``PGUSER``, ``PGDATABASE``,
        ``PGHOSTADDR``, ``PGSSLMODE``, ``PGSSLROOTCERT`` and ``AWS_REGION`` (or
        ``AWS_DEFAULT_REGION``) fill in what neither gives, as libpq and botocore would.

        Raises:
            ConfigurationError: The string cannot be parsed or a value is missing or invalid.
        """
        if isinstance(spec, Endpoint):
            return spec.replace(**overrides) if overrides else spec
        if not isinstance(spec, str):
            raise ConfigurationError(
                f"expected a host name, URL or connection string, not {type(spec).__name__}"
            )
        _check_text("the connection string", spec)
        text = spec.strip()
        given = _parse_conninfo(text) if "://" in text or "=" in text else _parse_host(text)
        given = {k: v for k, v in given.items() if v is not None and v != ""}
        given.update({k: v for k, v in overrides.items() if v is not None})
        fields = _env_fields(environ) if environ is not None else {}
        fields.update(given)
        if fields.get("region") and "region" not in given:
            host = str(fields.get("host", "")).lower()
            if _infer(host)[1]:
                # The host name says which region it is in: a default region must not win.
                del fields["region"]
        fields.setdefault("host", "")
        if isinstance(fields["host"], str) and fields["host"].strip():
            _check_host(fields["host"].strip())  # before the constructor's "use parse()"
        return cls(**fields)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, /, **overrides: Any) -> Endpoint:
        """Build an endpoint from ``PG*`` variables and ``AWS_REGION``; see :meth:`parse`.

        Raises:
            ConfigurationError: A value is missing or invalid.
        """
        return cls.parse("", environ=os.environ if environ is None else environ, **overrides)

    def replace(self, **changes: Any) -> Endpoint:
        """Return a copy with some fields changed (``params`` keys included)."""
        fields: dict[str, Any] = {
            "host": self.host,
            "user": self.user,
            "port": self.port,
            "dbname": self.dbname,
            "kind": self.kind,
            "hostaddr": self.hostaddr,
            **dict(self._params),
        }
        if "host" not in changes:
            fields["region"] = self.region
        fields.update(changes)
        return Endpoint(**fields)

    # -- views ----------------------------------------------------------------------------

    @property
    def params(self) -> Mapping[str, str]:
        """The other libpq parameters (``sslmode``, ``connect_timeout`` …), read-only."""
        return dict(self._params)

    @property
    def dialled(self) -> str:
        """Return the address actually dialled: ``hostaddr`` when given, else ``host``."""
        return self.hostaddr or self.host

    @property
    def is_loopback(self) -> bool:
        """Whether the dialled address is on this machine (``localhost``, 127.0.0.0/8, ::1)."""
        addr = self.dialled
        if addr == "localhost":
            return True
        try:
            return ipaddress.ip_address(addr).is_loopback
        except ValueError:
            return False

    def _key(self) -> tuple[object, ...]:
        return (
            self.host,
            self.user,
            self.port,
            self.dbname,
            self.region,
            self.kind,
            self.hostaddr,
            self._params,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Endpoint):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __iter__(self) -> Iterator[tuple[str, str]]:
        """Yield the libpq parameters that describe this endpoint (no password)."""
        yield "host", self.host
        if self.hostaddr:
            yield "hostaddr", self.hostaddr
        yield "port", str(self.port)
        yield "user", self.user
        yield "dbname", self.dbname
        yield from self._params

    def __repr__(self) -> str:
        extra = "".join(
            f", {k}={'***' if 'password' in k or 'key' in k else v!r}" for k, v in self._params
        )
        addr = f", hostaddr={self.hostaddr!r}" if self.hostaddr else ""
        return (
            f"Endpoint(host={self.host!r}, port={self.port}, user={self.user!r}, "
            f"dbname={self.dbname!r}, region={self.region!r}, kind={self.kind!r}{addr}{extra})"
        )


_FIELDS = ("host", "user", "port", "dbname", "region", "kind", "hostaddr", "_params")


def _freeze(ep: Endpoint, key: tuple[object, ...]) -> None:
    """Set an endpoint's fields, in :meth:`Endpoint._key` order, past its immutability."""
    for name, value in zip(_FIELDS, key, strict=True):
        object.__setattr__(ep, name, value)


def _restore(*key: object) -> Endpoint:
    """Rebuild a pickled endpoint from its fields, as they were checked when it was made."""
    ep = object.__new__(Endpoint)
    _freeze(ep, key)
    return ep


def _check_text(name: str, value: str) -> None:
    """Refuse a NUL byte or an unencodable character; the message names, never shows, it."""
    # A field is named as the caller gives it (user=... or --user); else by its name.
    given = f" (given as {option(name)})" if name in _FIELDS or name in _ENV_SETTINGS else ""
    if "\0" in value:
        raise ConfigurationError(
            f"{name}{given} contains a NUL byte, which libpq would silently cut the "
            "connection string at: remove it"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigurationError(
            f"{name}{given} holds bytes that are not UTF-8 (as an environment variable in "
            "another encoding gives): set it to valid text"
        ) from None


# Parameters the iampg command and the environment give besides the fields.
_ENV_SETTINGS = frozenset({"sslmode", "sslrootcert"})


def _nearest_keyword(key: str) -> str | None:
    """Return the libpq keyword ``key`` was probably meant to be, if any."""
    lowered = key.lower().replace("-", "_")
    if lowered in LIBPQ_KEYWORDS:
        return lowered
    if lowered in _KEYWORD_ALIASES:
        return _KEYWORD_ALIASES[lowered]
    close = difflib.get_close_matches(lowered, sorted(LIBPQ_KEYWORDS), n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_keyword(key: str) -> ConfigurationError:
    """Return the error for a connection parameter libpq does not know."""
    nearest = _nearest_keyword(key)
    advice = (
        f"did you mean {nearest!r}?"
        if nearest
        else "see the parameter key words in libpq's documentation"
    )
    return ConfigurationError(f"unknown connection parameter {key[:64]!r}: {advice}")


def _params(params: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """Check the extra libpq parameters; return them sorted, as strings, ``None`` dropped."""
    items: list[tuple[str, str]] = []
    for key, raw in params.items():
        if key in _REFUSED_KEYS:
            raise ConfigurationError(f"{key} given: {_REFUSED_KEYS[key]}")
        if key not in LIBPQ_KEYWORDS:
            raise unknown_keyword(key)
        if raw is None:
            continue
        value = str(raw)
        _check_text(key, value)
        if key == "sslmode" and value not in SSLMODES:
            nearest = difflib.get_close_matches(value.lower(), SSLMODES, n=1, cutoff=0.5)
            advice = (
                f"did you mean {nearest[0]!r}?" if nearest else f"use one of {', '.join(SSLMODES)}"
            )
            raise ConfigurationError(f"sslmode {value[:32]!r} is not a libpq SSL mode: {advice}")
        items.append((key, value))
    return tuple(sorted(items))


def _locate(host: str, kind: str | None, region: str | None) -> tuple[Kind, str, str]:
    """Validate the host; return the service kind, the full host name and the region."""
    host = (host or "").strip().lower().rstrip(".")
    if not host:
        raise ConfigurationError(
            f"no host: pass the endpoint (host name, URL or 'host=...' string) or {option('host')}"
        )
    _check_host(host)
    if kind is not None and kind not in _KINDS:
        raise ConfigurationError(f"kind must be 'rds' or 'dsql', not {kind!r}")
    inferred_kind, inferred_region = _infer(host)
    kind = kind or inferred_kind or "rds"
    if region is not None:
        region = region.strip().lower()
        if not _REGION_ONLY.match(region):
            raise ConfigurationError(
                f"region {region!r} is not an AWS region name such as 'us-east-1'"
            )
        if inferred_region and region != inferred_region:
            raise ConfigurationError(
                f"region {region!r} contradicts host {host!r}, which is in "
                f"{inferred_region!r}: drop {option('region')} or fix the host"
            )
    if kind == "dsql" and "." not in host:
        host = _dsql_host(host, region)
    region = region or inferred_region
    if not region:
        raise ConfigurationError(
            f"cannot infer the AWS region from host {host!r}: give the cluster's region "
            f"({option('region', 'us-east-1')})"
        )
    return kind, host, region


def _check_host(host: str) -> None:
    """Refuse a Unix socket or a character no host name has (it would also break a URL)."""
    if "," in host:
        raise ConfigurationError(
            "several hosts given: an IAM token is signed for one host; pass one endpoint"
        )
    if host.startswith(("/", "@")):
        raise ConfigurationError(
            f"host {host!r} is a Unix socket: IAM authentication needs the TCP host name"
        )
    if not _HOST_CHARS.fullmatch(host) and not _is_ip(host):
        # Not echoed: it may be a URL with a password in it.
        raise ConfigurationError(
            "host contains a character no host name has (such as '/', '@', '?', '#', ':', a "
            "quote or a space): pass the bare host name (letters, digits, '-', '_', '.') or an "
            "IP address; a URL goes to Endpoint.parse"
        )


def _dsql_host(cluster_id: str, region: str | None) -> str:
    """Expand a bare DSQL cluster id to its host name."""
    if not _DSQL_CLUSTER_ID.match(cluster_id):
        raise ConfigurationError(
            f"{cluster_id!r} is neither a host name nor a DSQL cluster id: pass the cluster's "
            "host name, <id>.dsql.<region>.on.aws"
        )
    if not region:
        raise ConfigurationError(
            f"DSQL cluster id {cluster_id!r} needs {option('region')} to expand to its host name"
        )
    return f"{cluster_id}.dsql.{region}.on.aws"


def _user(user: str | None, kind: Kind) -> str:
    if user is None:
        if kind != "dsql":
            raise ConfigurationError(
                f"no user: pass {option('user')} (the database user the token is signed for)"
            )
        return "admin"
    if not isinstance(user, str) or not user.strip():
        raise ConfigurationError("user is empty: pass the database user to sign for")
    return user


def _hostaddr(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if value and not _is_ip(value):
        raise ConfigurationError(
            f"hostaddr must be an IP address, not {value!r}: put names in host"
        )
    return value or None


def _port(value: int | str | None) -> int:
    if value is None or value == "":
        return _DEFAULT_PORT
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigurationError(f"port must be a number from 1 to 65535, not {value!r}")
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"port must be a number from 1 to 65535, not {value!r}") from None
    if not 0 < port < 65536:  # noqa: PLR2004
        raise ConfigurationError(f"port must be a number from 1 to 65535, not {port}")
    return port


def _env_fields(environ: Mapping[str, str]) -> dict[str, Any]:
    """Return the endpoint fields that libpq's and botocore's variables give."""
    names = {
        "host": "PGHOST",
        "port": "PGPORT",
        "user": "PGUSER",
        "dbname": "PGDATABASE",
        "hostaddr": "PGHOSTADDR",
        "sslmode": "PGSSLMODE",
        "sslrootcert": "PGSSLROOTCERT",
    }
    fields: dict[str, Any] = {}
    for field, name in names.items():
        if value := environ.get(name):
            _check_text(name, value)
            fields[field] = value
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        if region := environ.get(name):
            _check_text(name, region)
            fields["region"] = region
            break
    return fields


def _parse_host(text: str) -> dict[str, Any]:
    """Parse ``host`` or ``host:port`` (``[v6]:port`` too)."""
    if not text:
        return {}
    if text.startswith("["):
        addr, _, rest = text[1:].partition("]")
        return {"host": addr, "port": rest[1:] if rest.startswith(":") else None}
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return {"host": host, "port": port}
    return {"host": text}


def _parse_conninfo(text: str) -> dict[str, Any]:
    """Parse a libpq key=value string or URL with libpq (or libpq's rules where it is absent)."""
    from iampg import _conninfo  # noqa: PLC0415

    try:
        params = _conninfo.parse(text)
    except ConfigurationError as exc:
        # libpq's message names the offending syntax, never a value worth hiding.
        if m := _LIBPQ_UNKNOWN.search(str(exc)):
            raise unknown_keyword(m["key"]) from None
        raise
    fields: dict[str, Any] = {}
    for key, value in params.items():
        if key in _REFUSED_KEYS:
            raise ConfigurationError(f"{key} given: {_REFUSED_KEYS[key]}")
        fields[key] = value
    return fields
