"""Endpoint: where to connect, whom to sign for, and which AWS service signs."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any, Literal

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

    Endpoints are immutable and hashable; :meth:`replace` returns a modified copy.

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
        kind, host, region = _locate(host, kind, region)
        self.host = host
        self.kind = kind
        self.region = region
        self.user = _user(user, kind)
        self.port = _port(port)
        self.dbname = dbname or ("postgres" if kind == "dsql" else self.user)
        self.hostaddr = _hostaddr(hostaddr)
        for key in params:
            if key in _REFUSED_KEYS:
                raise ConfigurationError(f"{key} given: {_REFUSED_KEYS[key]}")
        self._params: tuple[tuple[str, str], ...] = tuple(
            sorted((k, str(v)) for k, v in params.items() if v is not None)
        )

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


def _locate(host: str, kind: str | None, region: str | None) -> tuple[Kind, str, str]:
    """Validate the host; return the service kind, the full host name and the region."""
    host = (host or "").strip().lower().rstrip(".")
    if not host:
        raise ConfigurationError(
            f"no host: pass the endpoint (host name, URL or 'host=...' string) or {option('host')}"
        )
    if "," in host:
        raise ConfigurationError(
            "several hosts given: an IAM token is signed for one host; pass one endpoint"
        )
    if host.startswith(("/", "@")):
        raise ConfigurationError(
            f"host {host!r} is a Unix socket: IAM authentication needs the TCP host name"
        )
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
    fields: dict[str, Any] = {k: environ[v] for k, v in names.items() if environ.get(v)}
    region = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
    if region:
        fields["region"] = region
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
    """Parse a libpq key=value string or URL with libpq itself."""
    from psycopg import ProgrammingError  # noqa: PLC0415
    from psycopg.conninfo import conninfo_to_dict  # noqa: PLC0415

    try:
        params = conninfo_to_dict(text)
    except ProgrammingError as exc:
        # libpq's message names the offending syntax, never a value worth hiding.
        raise ConfigurationError(f"cannot parse the connection string: {exc}") from None
    fields: dict[str, Any] = {}
    for key, value in params.items():
        if value is None:
            continue
        if key in _REFUSED_KEYS:
            raise ConfigurationError(f"{key} given: {_REFUSED_KEYS[key]}")
        fields[key] = value
    return fields
