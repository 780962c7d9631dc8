"""The emulator's gateway: TLS, IAM token checks, then a byte relay to a real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import socket
import struct
import tempfile
import threading
import warnings
import weakref
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, cast

from psycopg.conninfo import conninfo_to_dict

from iampg._signer import dsql_action
from iampg._wire.lifecycle import BackgroundLoop
from iampg._wire.login import BackendAuthError as _BackendAuthError
from iampg._wire.login import BackendLogin as _BackendLogin
from iampg._wire.login import ScramClient
from iampg._wire.protocol import AUTH_CLEARTEXT_REQUEST as _AUTH_CLEARTEXT_REQUEST
from iampg._wire.protocol import AUTH_OK as _AUTH_OK
from iampg._wire.protocol import CANCEL_REQUEST as _CANCEL_REQUEST
from iampg._wire.protocol import CLOSE_TIMEOUT as _CLOSE_TIMEOUT
from iampg._wire.protocol import MAX_AUTH_MESSAGE as _MAX_AUTH_MESSAGE
from iampg._wire.protocol import MAX_BACKEND_AUTH_MESSAGE as _MAX_BACKEND_AUTH_MESSAGE
from iampg._wire.protocol import MAX_CANCEL_PACKET as _MAX_CANCEL_PACKET
from iampg._wire.protocol import MIN_CANCEL_PACKET as _MIN_CANCEL_PACKET
from iampg._wire.protocol import SSL_REQUEST as _SSL_REQUEST
from iampg._wire.protocol import TLS_HANDSHAKE_BYTE as _TLS_HANDSHAKE_BYTE
from iampg._wire.protocol import PeerGoneError as _PeerGoneError
from iampg._wire.protocol import ProtocolViolationError, startup_parameters
from iampg._wire.protocol import error_response as _error_response
from iampg._wire.protocol import pack_message as _message
from iampg._wire.protocol import quote_conninfo as _quote_conninfo
from iampg._wire.protocol import read_message as _read_message
from iampg._wire.protocol import read_startup_packet as _read_startup_packet
from iampg._wire.startup import read_startup, require_alpn
from iampg._wire.streams import RawChannel as _RawChannel
from iampg._wire.streams import Stream as _Stream
from iampg._wire.streams import abort_all, accept_tls, beyond_loopback
from iampg._wire.streams import drain_and_shutdown as _drain_and_shutdown
from iampg._wire.streams import listen as _listen
from iampg._wire.streams import malloc_trim as _malloc_trim
from iampg._wire.streams import readable as _readable
from iampg.errors import ConfigurationError

from . import _authz
from . import _dsql_relay as dsql
from . import _serverless as sl
from ._backend import BackendError, RdsIamCheck
from ._clock import EmulatorClock
from ._credentials import FAKE_CREDENTIALS, CredentialLookup, Credentials, CredentialStore
from ._dsql_sql import DsqlRules
from ._policy import DEFAULT_ACCOUNT, PolicyStore
from ._profiles import Preset, PresetName, Service, dsql_hostname, get_preset
from ._sigv4 import MALFORMED, TokenRules, TokenVerificationError, verify_token
from ._tls import make_certificates, server_context

# The gateway's former names of what moved to iampg._wire (tests import them from here).
_ScramClient = ScramClient
_ProtocolViolationError = ProtocolViolationError
_startup_parameters = startup_parameters

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable, Sequence

    from typing_extensions import Unpack

    from ._profiles import PresetSettings

__all__ = ["DEFAULT_HOSTNAME", "Emulator", "Event"]

logger = logging.getLogger("iampg.emulator")

#: The host name the emulator answers to unless told otherwise.
DEFAULT_HOSTNAME: Final = "iampg-emulator.cluster-emulated.us-east-1.rds.amazonaws.com"

_AUTH_TIMEOUT: Final = 60.0  # PostgreSQL's authentication_timeout default
_TLS_TIMEOUT: Final = 10.0  # from accept to an encrypted connection
_MAX_UNAUTHENTICATED: Final = 256
_TURN_AWAY_DRAIN: Final = 1.0  # seconds a refused connection may take to read its error
_TOO_MANY_CLIENTS: Final = "sorry, too many clients already"
_BACKEND_CONNECT_TIMEOUT: Final = 10.0
_MAX_EVENTS: Final = 10_000
_TRIM_EVERY: Final = 64  # closed connections between two returns of free memory to the system
# (and once the last connection has closed)
_TRIM_DELAY: Final = 0.5  # seconds: let the closed connections' transports go first

_MONITOR_TICK: Final = 0.02  # real seconds between the monitor's looks at the clock
_CALL_TIMEOUT: Final = 10.0  # real seconds pause()/resume() wait for the emulator's loop
_PAM_FAILED: Final = 'PAM authentication failed for user "{user}"'
_BACKEND_UNREACHABLE: Final = "iampg emulator: cannot reach the backend server"
_NO_ENCRYPTION: Final = (
    'pg_hba.conf rejects connection for host "{host}", user "{user}", '
    'database "{database}", no encryption'
)


Outcome = Literal["accepted", "rejected", "closed", "paused", "resuming", "resumed"]
"""What an :class:`Event` records: a connection's fate, or the cluster's state changing."""


@dataclass(frozen=True)
class Event:
    """One decision of the emulator (the service's ``iam-db-auth-error`` log, and more).

    Never holds a token. Connection events (``accepted``, ``rejected``, ``closed``) name
    the peer, user and database; cluster events (``paused``, ``resuming``, ``resumed``)
    leave them empty.

    Attributes:
        time: When, in the emulator clock's wall time (epoch seconds, see
            :meth:`EmulatorClock.now`).
        peer: The client's IP address.
        user: The user of the startup message.
        database: The database of the startup message.
        outcome: ``"accepted"``, ``"rejected"`` (a connection refused), ``"closed"`` (an
            established session cut by the emulator), ``"paused"``, ``"resuming"`` or
            ``"resumed"``.
        reason: Why: for ``rejected`` a token check (``"signature mismatch"``, ``"token
            expired"``, ``"wrong host"``, ``"wrong action"``...), past a valid token
            ``"not granted rds_iam"``, ``"not authorized"`` or ``"explicitly denied"`` (see
            ``detail``), ``"no encryption"``,
            ``"no sni"``, ``"rate exceeded"``, ``"too many connections"``,
            ``"too many unauthenticated"`` (see ``max_unauthenticated``) or
            ``"waking up"``; for ``closed`` ``"idle timeout"``, ``"session cap"``,
            ``"transaction limit"`` or ``"paused"``; for ``paused`` ``"idle"`` or
            ``"requested"``; for ``resuming`` ``"connection"``; for ``resumed``
            ``"resume delay"`` or ``"requested"``. Empty when accepted.
        sqlstate: The SQLSTATE the client was sent, if any (``"08006"``, ``"53300"``...).
        hint: The HINT the client was sent (DSQL), without secrets; else empty.
        detail: For a refusal by the database-side or IAM rules (``"not granted
            rds_iam"``, ``"not authorized"``, ``"explicitly denied"``): what was missing,
            naming the statement, action and resource ARN, or the ``GRANT`` to run.
    """

    time: float
    peer: str
    user: str
    database: str
    outcome: Outcome
    reason: str = ""
    sqlstate: str = ""
    hint: str = ""
    detail: str = ""


# Event reasons besides the token checks' (which are in _sigv4).
NO_ENCRYPTION: Final = "no encryption"
NO_SNI: Final = "no sni"
RATE_EXCEEDED: Final = "rate exceeded"
TOO_MANY_CONNECTIONS: Final = "too many connections"
TOO_MANY_UNAUTHENTICATED: Final = "too many unauthenticated"
WAKING_UP: Final = "waking up"
IDLE_TIMEOUT: Final = "idle timeout"
SESSION_CAP: Final = "session cap"
TRANSACTION_LIMIT: Final = "transaction limit"
PAUSED: Final = "paused"
IDLE: Final = "idle"
REQUESTED: Final = "requested"
CONNECTION: Final = "connection"
RESUME_DELAY: Final = "resume delay"
ROLE_NOT_MAPPED: Final = "role not mapped"


@dataclass(frozen=True)
class _BackendTarget:
    host: str
    port: int
    unix_path: str | None
    password: str | None
    connect_timeout: float

    @classmethod
    def parse(cls, dsn: str) -> _BackendTarget:
        try:
            params = conninfo_to_dict(dsn)
        except Exception as exc:
            raise ConfigurationError(
                "backend is not a valid libpq connection string or URL"
            ) from exc
        host = _first(params.get("hostaddr")) or _first(params.get("host"))
        port_text = _first(params.get("port")) or os.environ.get("PGPORT") or "5432"
        try:
            port = int(port_text)
        except ValueError:
            raise ConfigurationError(f"backend port is not a number: {port_text!r}") from None
        host = host or os.environ.get("PGHOST") or _default_host(port)
        password = params.get("password") or os.environ.get("PGPASSWORD")
        timeout_text = str(params.get("connect_timeout") or "")
        timeout = float(timeout_text) if timeout_text.isdigit() else 0.0
        timeout = timeout if timeout > 0 else _BACKEND_CONNECT_TIMEOUT
        unix_path = None
        if host.startswith("/"):
            unix_path = f"{host}/.s.PGSQL.{port}"
        elif host.startswith("@"):  # Linux abstract namespace, as libpq spells it
            unix_path = f"\0{host[1:]}/.s.PGSQL.{port}"
        return cls(host, port, unix_path, None if password is None else str(password), timeout)


def _default_host(port: int) -> str:
    # Where libpq dials without a host: a local socket directory, else localhost.
    for directory in ("/var/run/postgresql", "/run/postgresql", "/tmp"):  # noqa: S108
        if Path(directory, f".s.PGSQL.{port}").exists():
            return directory
    return "localhost"


def _first(value: object) -> str:
    return str(value).split(",")[0].strip() if value is not None else ""


def _credential_store(
    credentials: Sequence[Credentials] | CredentialLookup,
) -> tuple[CredentialLookup, Credentials]:
    """Return the store to look keys up in and the key :meth:`Emulator.aws_env` exports."""
    if isinstance(credentials, CredentialLookup):
        default = credentials.default if isinstance(credentials, CredentialStore) else None
        return credentials, default or FAKE_CREDENTIALS
    if isinstance(credentials, Credentials):
        credentials = (credentials,)
    if not credentials:
        raise ConfigurationError("credentials must hold at least one key")
    try:
        store = CredentialStore(credentials)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    return store, credentials[0]


@dataclass
class _Door:
    """The limits on connections that have not authenticated, and their counts."""

    max_unauthenticated: int
    tls_timeout: float
    auth_timeout: float
    unauthenticated: int = 0  # accepted connections that have not authenticated yet
    turning_away: int = 0  # refused connections still being closed
    closed_since_trim: int = 0  # connections closed since memory was last given back
    trim: asyncio.TimerHandle | None = None  # the next giving back, if one is due

    @classmethod
    def checked(cls, max_unauthenticated: int, tls_timeout: float, auth_timeout: float) -> _Door:
        """Return the limits, or raise ConfigurationError for a value that cannot work."""
        if isinstance(max_unauthenticated, bool) or max_unauthenticated < 1:
            raise ConfigurationError(
                f"max_unauthenticated must be at least 1, not {max_unauthenticated!r}"
            )
        if not 0 < tls_timeout <= auth_timeout:
            raise ConfigurationError(
                "tls_timeout and auth_timeout must be more than 0 seconds, tls_timeout no "
                f"more than auth_timeout (got {tls_timeout!r} and {auth_timeout!r})"
            )
        return cls(max_unauthenticated, float(tls_timeout), float(auth_timeout))


def _resolve_profile(
    service: Service | None,
    preset: PresetName | Preset | None,
    profile: PresetName | Preset | None,
    settings: dict[str, object],
) -> Preset:
    """Return the preset asked for (``profile`` is its deprecated name), settings applied."""
    if profile is not None:
        if preset is not None:
            raise ConfigurationError("give preset=, not also its old name profile=")
        warnings.warn(
            "Emulator(profile=...) is deprecated: use preset=... (the same names)",
            DeprecationWarning,
            stacklevel=3,
        )
        preset = profile
    chosen = get_preset(preset or ("dsql" if service == "dsql" else "rds"))
    if service is not None:
        settings["service"] = service
    return chosen.replace(**settings) if settings else chosen


@dataclass(eq=False)
class _Session:
    sock: socket.socket | None
    peer: str
    client: _Stream | None = None
    backend: _Stream | None = None
    sni: str | None = None
    user: str = ""
    database: str = ""
    counted: bool = False  # admitted: counts against max_connections and auto-pause
    pending: bool = False  # not authenticated yet: counts against max_unauthenticated
    established: bool = False  # relaying to the backend
    started: float = 0.0  # emulated epoch seconds, once established
    last_activity: float = 0.0
    status: bytes = b"I"  # the last ReadyForQuery status
    transaction_started: float = 0.0
    capped: bool = False  # past the session cap, waiting for its transaction to end
    cut: bool = False
    access_key_id: str = ""  # the key that signed the token, once authenticated

    def close_socket(self, _: object = None) -> None:
        """Close the accepted socket if no transport took it over (a task's done callback)."""
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()


class Emulator(BackgroundLoop):
    """A local stand-in for an IAM-only RDS or Aurora PostgreSQL endpoint.

    A PostgreSQL wire-protocol gateway in front of a real PostgreSQL server: it terminates
    TLS with a certificate made on the fly for ``hostnames``, asks for a cleartext password
    as RDS does, verifies the password as an RDS IAM token (signature, credential scope,
    host, port, user, region and expiry against :attr:`clock`), then logs in to the backend
    as the client's user and database and relays the session unchanged. Refusals carry the
    services' texts: ``PAM authentication failed for user "<u>"`` for any bad token and
    ``pg_hba.conf rejects connection ... no encryption`` without TLS. Established sessions
    outlive their token, as on RDS.

    Run it in a background thread with :meth:`start`/:meth:`stop` (or ``with``), or on a
    running event loop with :meth:`astart`/:meth:`astop`. The gateway needs a selector event
    loop (the default on Unix). Cancel requests are relayed, plaintext or inside TLS; a client
    in the same process should cancel with psycopg's ``cancel_safe()``: libpq's legacy
    ``PQcancel`` (``cancel()``) holds the GIL while it waits, starving the gateway's thread.

    Args:
        backend: libpq connection string or URL of the real PostgreSQL server; only where to
            connect and its password (if it asks for one) are used. Cleartext, MD5 and
            SCRAM-SHA-256 backend authentication are supported; the backend link is not
            encrypted.
        hostnames: Host names the emulator answers to; tokens must be signed for one of them.
            The first one is :attr:`host`.
        region: The AWS region tokens must be scoped to.
        listen_host: The address to listen on.
        port: The port to listen on; ``0`` picks a free one (see :attr:`port`).
        credentials: The AWS keys the emulator knows, the first one being :attr:`credentials`;
            or a store to look keys up in for every token (a :class:`CredentialStore`
            shared with a :class:`CredentialsServer`, or any object with
            ``lookup(access_key_id) -> Credentials | None``), see :attr:`credential_store`.
        clock: The clock for token and credential expiry; a new one when ``None``.
        time_scale: Emulated seconds per real second, for a new clock when ``clock`` is
            ``None``.
        service: ``"rds"`` (tokens for ``rds-db``/``connect`` naming host, port and user)
            or ``"dsql"`` (``dsql``/``DbConnectAdmin`` for user ``admin``, ``DbConnect``
            for any other role; refusals as ``08006 unable to accept connection, access
            denied`` with a HINT). Defaults to the preset's.
        preset: The service's behaviour (:class:`Preset`): ``"rds"`` (tokens only, the
            default), ``"aurora-serverless"`` or ``"aurora-express"`` (auto-pause, 16 s
            resume, 3.5 s connect latency, 5-minute idle cut) or ``"dsql"`` (SNI, 1-hour
            session cap, connection limits, waking-up refusals; the default when
            ``service="dsql"``), in any spelling :func:`iampg._defaults.canonical_preset`
            accepts, or a :class:`Preset`. Durations are emulated seconds (see
            ``time_scale``).
        profile: Deprecated name of ``preset`` (warns).
        max_unauthenticated: How many connections may be open without having authenticated
            (before TLS, or waiting for the password); one more is refused with
            ``53300 sorry, too many clients already``. Bounds what a flood of idle
            connections costs.
        tls_timeout: Real seconds a connection has from being accepted to being encrypted
            (TLS handshake done); else it is closed.
        auth_timeout: Real seconds a connection has from being accepted to being
            authenticated, as PostgreSQL's ``authentication_timeout``; else it is closed.
        loopback_names: Also name ``localhost``, ``127.0.0.1`` and ``::1`` in the
            certificate. Off by default: like a production endpoint's, the certificate
            names ``hostnames`` only, so ``host=127.0.0.1 sslmode=verify-full`` fails as it
            would through a tunnel to RDS (dial with ``hostaddr`` instead).
        advertise_port: The port RDS tokens must be signed for, when clients reach the
            emulator through a tunnel or forwarded port other than the one it listens on
            (default: the listening port). RDS mode only.
        require_rds_iam: RDS mode: accept a token only for a database user granted
            ``rds_iam`` (directly or through another role; a superuser too needs the
            grant), as RDS and Aurora do; the emulator creates the role on its backend. A
            user without it is refused with ``PAM authentication failed`` (event reason
            ``"not granted rds_iam"``). Grant it with
            :meth:`Backend.ensure_role(name, iam=True) <Backend.ensure_role>`.
        account_id: The AWS account of the emulated resource's ARN (:meth:`resource_arn`).
        resource_id: RDS's ``DbiResourceId`` in :meth:`resource_arn` (an RDS Proxy's is a
            ``prx-`` id); default: a stable ``db-...`` id made from the host name.
        dsql_rules: DSQL mode only: which of DSQL's rules apply (:class:`DsqlRules`; all by
            default): its SQL refusals, transaction limits, optimistic concurrency and the
            ``AWS IAM GRANT`` role mapping. Ignored for RDS.
        **settings: Any :class:`Preset` setting, overriding the preset's
            (``auto_pause``, ``resume_delay``, ``paused_connect``, ``connect_latency``,
            ``idle_timeout``, ``idle_notice``, ``session_cap``, ``transaction_limit``,
            ``max_connections``, ``connection_rate``, ``connection_burst``,
            ``require_sni``).

    Without ``hostnames``, a DSQL emulator answers to a DSQL-shaped name
    (``<26 characters>.dsql.<region>.on.aws``), an RDS one to :data:`DEFAULT_HOSTNAME` (with
    ``region`` in place of ``us-east-1``).

    The emulator accepts tokens signed with the published example keys: on an address
    other than loopback (``listen_host="0.0.0.0"``), anyone who can reach it can log in to
    the backend. It warns (``UserWarning``) when asked to.

    Raises:
        iampg.ConfigurationError: An argument is invalid.
    """

    _thread_name = "iampg-emulator"

    def __init__(  # noqa: PLR0915
        self,
        backend: str,
        *,
        hostnames: Sequence[str] | None = None,
        region: str = "us-east-1",
        listen_host: str = "127.0.0.1",
        port: int = 0,
        credentials: Sequence[Credentials] | CredentialLookup = (FAKE_CREDENTIALS,),
        clock: EmulatorClock | None = None,
        time_scale: float = 1.0,
        service: Service | None = None,
        preset: PresetName | Preset | None = None,
        profile: PresetName | Preset | None = None,
        max_unauthenticated: int = _MAX_UNAUTHENTICATED,
        tls_timeout: float = _TLS_TIMEOUT,
        auth_timeout: float = _AUTH_TIMEOUT,
        loopback_names: bool = False,
        advertise_port: int | None = None,
        require_rds_iam: bool = True,
        account_id: str = DEFAULT_ACCOUNT,
        resource_id: str | None = None,
        dsql_rules: DsqlRules | None = None,
        **settings: Unpack[PresetSettings],
    ) -> None:
        self._profile = _resolve_profile(service, preset, profile, dict(settings))
        if dsql_rules is not None and not isinstance(dsql_rules, DsqlRules):
            raise ConfigurationError("dsql_rules must be a DsqlRules")
        self._dsql_rules = (dsql_rules or DsqlRules()) if self._profile.service == "dsql" else None
        self._forced = dsql.ForcedConflicts()
        self._dsql_prepared: set[str] = set()  # databases with sys.iam_pg_role_mappings
        self._dsql_lock = asyncio.Lock()
        self._backend_dsn = backend
        self._door = _Door.checked(max_unauthenticated, tls_timeout, auth_timeout)
        if hostnames is None:
            hostnames = (
                (dsql_hostname(region),)
                if self._profile.service == "dsql"
                else (DEFAULT_HOSTNAME.replace(".us-east-1.", f".{region}."),)
            )
        if isinstance(hostnames, str):
            hostnames = (hostnames,)
        if not hostnames or not all(hostnames):
            raise ConfigurationError("hostnames must name at least one host")
        if not region:
            raise ConfigurationError("region must not be empty")
        store, first = _credential_store(credentials)
        if clock is not None and time_scale != 1.0:
            raise ConfigurationError("give either clock or time_scale, not both")
        try:
            self._clock = clock if clock is not None else EmulatorClock(time_scale)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        self._backend, self._backend_dsn = _BackendTarget.parse(backend), backend
        self._hostnames = tuple(hostnames)
        self._region = region
        self._listen_host, self._requested_port = _listen_address(listen_host, port)
        self._keys = store
        self._first_credentials = first
        self._strict = _authz.Rules.checked(
            hostnames=self._hostnames,
            region=region,
            dsql=self._profile.service == "dsql",
            loopback_names=loopback_names,
            advertise_port=advertise_port,
            require_rds_iam=require_rds_iam,
            account_id=account_id,
            resource_id=resource_id,
        )
        self._policies, self._iam_check = PolicyStore(), cast("RdsIamCheck | None", None)
        self._events: deque[Event] = deque(maxlen=_MAX_EVENTS)
        self._events_lock = threading.Lock()
        self._state_lock = threading.Lock()
        # Set while running:
        self._port = 0
        self._address = ""
        self._tmpdir: Path | None = None
        self._ca_file: Path | None = None
        self._ssl: ssl.SSLContext | None = None
        self._rules: TokenRules | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._sessions: set[asyncio.Task[None]] = set()
        self._streams: set[_Stream] = set()  # connected, not yet lost
        self._thread: threading.Thread | None = None
        self._thread_stop: asyncio.Event | None = None
        # Serverless and DSQL behaviour (touched on the loop's thread only, but for state):
        self._state: Literal["running", "paused", "resuming"] = "running"
        self._resume_at = 0.0
        self._resumed: asyncio.Future[None] | None = None
        self._resume_task: asyncio.Task[None] | None = None
        self._monitor_task: asyncio.Task[None] | None = None
        self._open: set[_Session] = set()  # admitted, not yet closed
        self._idle_since = self._clock.now()
        self._bucket: sl.TokenBucket | None = None
        self._sni: weakref.WeakKeyDictionary[ssl.SSLObject, str] = weakref.WeakKeyDictionary()

    # --- public properties ---

    @property
    def host(self) -> str:
        """The first host name: the one to sign tokens for and to verify TLS against."""
        return self._hostnames[0]

    @property
    def hostnames(self) -> tuple[str, ...]:
        """Every host name the emulator answers to."""
        return self._hostnames

    @property
    def region(self) -> str:
        """The AWS region tokens must be scoped to."""
        return self._region

    @property
    def listen_host(self) -> str:
        """The address the emulator listens on."""
        return self._listen_host

    @property
    def port(self) -> int:
        """The port the emulator listens on (the bound one once started)."""
        return self._port or self._requested_port

    @property
    def ca_file(self) -> Path:
        """The PEM CA certificate that signed the server certificate, for ``sslrootcert``.

        Raises:
            RuntimeError: The emulator is not running (the file is removed on stop).
        """
        if self._ca_file is None:
            raise RuntimeError("the emulator is not running: start it first")
        return self._ca_file

    @property
    def advertise_port(self) -> int | None:
        """The port RDS tokens are signed for when it is not :attr:`port`, else None."""
        return self._strict.advertise_port

    @property
    def account_id(self) -> str:
        """The AWS account of :meth:`resource_arn`."""
        return self._strict.account_id

    @property
    def resource_id(self) -> str:
        """RDS's ``DbiResourceId`` (the ``<resource id>`` of ``rds-db:connect`` ARNs)."""
        return self._strict.resource_id

    @property
    def policies(self) -> PolicyStore:
        """The IAM policies of the principals whose keys sign tokens (empty: all allowed).

        Attach a :class:`Policy` to a user or role ARN (a key's
        :attr:`Credentials.principal`, or the role an assumed-role session belongs to);
        from then on a connection by that principal needs a statement allowing
        ``rds-db:connect`` on :meth:`resource_arn` (DSQL: ``dsql:DbConnect`` or
        ``dsql:DbConnectAdmin`` on the cluster ARN) and none denying it; else it is
        refused with the service's text and an event whose ``detail`` names what was
        missing.
        """
        return self._policies

    def resource_arn(self, user: str) -> str:
        """Return the resource ARN an IAM policy must allow for a connection as ``user``.

        RDS: ``arn:aws:rds-db:<region>:<account>:dbuser:<resource id>/<user>``; DSQL: the
        cluster, ``arn:aws:dsql:<region>:<account>:cluster/<cluster id>``.
        """
        return self._strict.resource_arn(user)

    def iam_action(self, user: str) -> str:
        """Return the IAM action a connection as ``user`` needs (``rds-db:connect``...)."""
        return self._strict.action(user)

    @property
    def clock(self) -> EmulatorClock:
        """The clock token and credential expiry are judged by."""
        return self._clock

    @property
    def credentials(self) -> Credentials:
        """The first AWS key the emulator knows (the one :meth:`aws_env` exports)."""
        return self._first_credentials

    @property
    def credential_store(self) -> CredentialLookup:
        """Where the gateway looks up the key of every token.

        A :class:`CredentialStore` made from the keys given, or the store given as
        ``credentials``.
        """
        return self._keys

    @property
    def events(self) -> list[Event]:
        """A snapshot of the authentication decisions so far (the last 10 000)."""
        with self._events_lock:
            return list(self._events)

    @property
    def preset(self) -> Preset:
        """The behaviour in force: the named preset with the keyword overrides applied."""
        return self._profile

    @property
    def profile(self) -> Preset:
        """Deprecated name of :attr:`preset`."""
        return self._profile

    @property
    def service(self) -> Service:
        """``"rds"`` or ``"dsql"``: which tokens and refusal texts the emulator uses."""
        return self._profile.service

    @property
    def state(self) -> Literal["running", "paused", "resuming"]:
        """The emulated cluster's state: ``running``, ``paused`` or ``resuming``."""
        return self._state

    @property
    def session_count(self) -> int:
        """How many sessions are established (relaying to the backend) right now."""
        return sum(1 for session in list(self._open) if session.established)

    @property
    def connection_count(self) -> int:
        """How many connections are open past admission (authenticating or established).

        This is what ``max_connections`` limits and what keeps the cluster from pausing.
        """
        return len(self._open)

    def pause(self) -> None:
        """Pause the emulated cluster now, closing any open session abruptly.

        New connections then wait for (``paused_connect="wait"``) or are refused during
        (``"refuse"``) a resume of ``resume_delay`` emulated seconds. Thread-safe; works
        on a stopped emulator too (it starts paused).
        """
        self._call_on_loop(lambda: self._pause_now(REQUESTED))

    def resume(self) -> None:
        """Resume the emulated cluster now, without waiting for the resume delay.

        Connections waiting for a resume proceed at once. Thread-safe.
        """
        self._call_on_loop(lambda: self._resume_now(REQUESTED))

    @property
    def dsql_rules(self) -> DsqlRules | None:
        """The DSQL rules in force (:class:`DsqlRules`); ``None`` for RDS."""
        return self._dsql_rules

    @property
    def principal(self) -> str:
        """The IAM principal (ARN) of :attr:`credentials`, for ``AWS IAM GRANT``."""
        return self.principal_of(self._first_credentials.access_key_id)

    def principal_of(self, access_key_id: str) -> str:
        """Return the IAM principal (ARN) the emulator holds a key to belong to.

        A key without a principal of its own belongs to the emulator's user,
        ``arn:aws:iam::123456789012:user/iampg-emulator``.
        """
        return dsql.principal_arn(self._keys.lookup(access_key_id))

    def force_conflict(
        self, *, backend_pid: int | None = None, user: str | None = None, schema: bool = False
    ) -> None:
        """DSQL mode: make the next ``COMMIT`` of a session fail as an OCC conflict.

        The commit is refused with ``40001 change conflicts with another transaction, please
        retry: (OC000)`` (``(OC001)``, the schema conflict, with ``schema=True``) and its
        transaction rolled back, as DSQL does for the loser of a race. Once only.
        Thread-safe.

        Args:
            backend_pid: Only the session with this backend process id (psycopg's
                ``conn.info.backend_pid``, ``SELECT pg_backend_pid()``); any when ``None``.
            user: Only a session of this database role; any when ``None``.
            schema: Report a schema conflict (``OC001``) instead of a data one.

        Raises:
            RuntimeError: Not a DSQL emulator, or optimistic concurrency is off.
        """
        if self._dsql_rules is None or not self._dsql_rules.occ:
            raise RuntimeError("force_conflict() needs a DSQL emulator with DsqlRules(occ=True)")
        self._forced.add(pid=backend_pid, user=user, schema=schema)

    def aws_env(self) -> dict[str, str]:
        """Return environment variables that make botocore sign with :attr:`credentials`."""
        env = {
            "AWS_ACCESS_KEY_ID": self._first_credentials.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self._first_credentials.secret_access_key,
            "AWS_REGION": self._region,
            "AWS_DEFAULT_REGION": self._region,
        }
        if self._first_credentials.session_token is not None:
            env["AWS_SESSION_TOKEN"] = self._first_credentials.session_token
        return env

    def conninfo(self, user: str, dbname: str = "postgres", password: str | None = None) -> str:
        """Return a libpq connection string for the running emulator.

        It names :attr:`host` (what libpq verifies the certificate against and what tokens
        are signed for) and dials the listening address through ``hostaddr``, with
        ``sslmode=verify-full`` and :attr:`ca_file` as ``sslrootcert``.

        Args:
            user: The database user.
            dbname: The database.
            password: The password (a token) to include; it then is a secret.

        Returns:
            The ``key=value`` connection string.
        """
        address = self._address or self._listen_host
        items = [
            ("host", self.host),
            ("hostaddr", address),
            ("port", str(self.port)),
            ("user", user),
            ("dbname", dbname),
            ("sslmode", "verify-full"),
            ("sslrootcert", str(self.ca_file)),
        ]
        if password is not None:
            items.append(("password", password))
        return " ".join(f"{key}={_quote_conninfo(value)}" for key, value in items)

    def __repr__(self) -> str:
        state = "running" if self._listener is not None else "stopped"
        return (
            f"<Emulator {state} host={self.host!r} region={self._region!r} "
            f"address={self._listen_host}:{self.port}>"
        )

    # --- lifecycle on the caller's loop ---

    async def astart(self) -> None:
        """Start listening on the running event loop; return once connections are accepted.

        Does nothing if already started.
        """
        with self._state_lock:
            if self._listener is not None:
                return
            loop = asyncio.get_running_loop()
            tmpdir = Path(tempfile.mkdtemp(prefix="iampg-emulator-"))
            try:
                files = make_certificates(
                    self._hostnames, tmpdir, loopback=self._strict.loopback_names
                )
                context = server_context(files)
                listener = _listen(self._listen_host, self._requested_port)
            except BaseException:
                shutil.rmtree(tmpdir, ignore_errors=True)
                raise
            self._tmpdir, self._ca_file, self._ssl = tmpdir, files.ca_file, context
            self._listener, self._loop = listener, loop
            bound = listener.getsockname()
            self._port = int(bound[1])
            self._address = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(bound[0], bound[0])  # noqa: S104
            if self._profile.service == "dsql":
                self._rules = TokenRules.dsql(region=self._region, hostnames=set(self._hostnames))
            else:
                self._rules = TokenRules.rds(
                    region=self._region,
                    hostnames=set(self._hostnames),
                    port=self._strict.advertise_port or self._port,
                )
                if self._strict.require_rds_iam:
                    self._iam_check = RdsIamCheck(
                        self._backend_dsn, connect_timeout=self._backend.connect_timeout
                    )
            context.sni_callback = self._on_sni
            profile = self._profile
            if profile.connection_rate is not None:
                self._bucket = sl.TokenBucket(
                    profile.connection_rate, profile.connection_burst, self._clock.now()
                )
            self._idle_since = self._clock.now()
            self._dsql_lock = asyncio.Lock()  # of this loop
            self._accept_task = loop.create_task(self._accept_loop(listener))
            if profile.timed:
                self._monitor_task = loop.create_task(self._monitor())
        logger.info("emulator listening on %s port %d for %s", self._address, self._port, self.host)

    async def astop(self) -> None:
        """Stop listening, close every session and remove the CA file. Idempotent."""
        with self._state_lock:
            listener, accept_task = self._listener, self._accept_task
            tmpdir = self._tmpdir
            self._listener = self._accept_task = None
            self._tmpdir = self._ca_file = None
            # self._ssl stays until the sessions are gone: one may be starting TLS right now.
        if listener is None:
            return
        background = [accept_task, self._monitor_task, self._resume_task]
        self._monitor_task = self._resume_task = None
        for task in background:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._resumed is not None and not self._resumed.done():
            self._resumed.cancel()
        self._resumed = None
        if self._state == "resuming":
            self._state = "paused"
        listener.close()
        await self._end_sessions()
        if self._iam_check is not None:
            await self._iam_check.aclose()
            self._iam_check = None
        self._ssl = None
        await self._drop_streams()
        if self._door.trim is not None:
            self._door.trim.cancel()
            self._release_memory()
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
        self._port = 0
        self._loop = None
        logger.info("emulator stopped")

    async def _end_sessions(self) -> None:
        """Cancel the session tasks until every one is done.

        On Python 3.10 and 3.11, asyncio.wait_for() swallows a cancellation that lands as the
        awaited task finishes, and the session would go on (relaying, as long as its client
        stays): so cancel again whatever is still running.
        """
        pending = set(self._sessions)
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=_CLOSE_TIMEOUT)

    async def _drop_streams(self) -> None:
        """Abort every connection still open and wait until their sockets are closed.

        A connection can outlive its session: one whose TLS handshake finished just as the
        session was cancelled, or one closing politely. Unclosed, its socket would stay open
        until garbage collection after the loop is gone. A stream leaves the registry when its
        transport has closed the socket (``connection_lost``).
        """
        await abort_all(self._streams)
        if self._streams:
            logger.warning("emulator stopped with %d connections not closed", len(self._streams))

    # --- lifecycle in a background thread ---

    def start(self) -> None:
        """Start the emulator on its own event loop in a daemon thread.

        Returns once it accepts connections; does nothing if already started.
        """
        with self._state_lock:
            if self._thread is not None or self._listener is not None:
                return
        self._start_thread()

    def stop(self) -> None:
        """Stop the emulator started by :meth:`start` and join its thread. Idempotent."""
        self._stop_thread()

    # --- serving ---

    def _record(
        self,
        session: _Session | None,
        user: str,
        database: str,
        outcome: Outcome,
        reason: str = "",
        *,
        sqlstate: str = "",
        hint: str = "",
        detail: str = "",
    ) -> None:
        peer = session.peer if session is not None else ""
        event = Event(
            self._clock.now(), peer, user, database, outcome, reason, sqlstate, hint, detail
        )
        with self._events_lock:
            self._events.append(event)
        if session is None:
            logger.debug("cluster %s: %s", outcome, reason)
        elif reason:
            logger.debug(
                "%s user %r database %r from %s: %s%s",
                outcome,
                user,
                database,
                peer,
                reason,
                f" ({detail})" if detail else "",
            )
        else:
            logger.debug("%s user %r database %r from %s", outcome, user, database, peer)

    # --- serverless and DSQL behaviour ---

    def _on_sni(self, ssl_object: ssl.SSLObject, name: str | None, context: ssl.SSLContext) -> None:
        """Remember the server name a client sent (TLS SNI); libpq sends none for an IP."""
        del context
        if name:
            self._sni[ssl_object] = name

    def _refuse(
        self,
        session: _Session,
        sqlstate: str,
        message: str,
        reason: str,
        *,
        hint: str = "",
        detail: str = "",
    ) -> None:
        """Record a refusal and send the client its FATAL error (with a HINT if given)."""
        self._record(
            session,
            session.user,
            session.database,
            "rejected",
            reason,
            sqlstate=sqlstate,
            hint=hint,
            detail=detail,
        )
        if session.client is not None:
            session.client.write(_error_response(sqlstate, message, hint or None))

    def _admit(self, session: _Session) -> bool:
        """Apply SNI, rate and connection-count rules before authentication."""
        profile = self._profile
        client = session.client
        assert client is not None
        if profile.require_sni:
            transport = client.transport
            ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
            session.sni = self._sni.get(ssl_object) if ssl_object is not None else None
            if session.sni is None:
                self._refuse(session, sl.DSQL_NO_SNI_CODE, sl.DSQL_NO_SNI, NO_SNI)
                return False
        if self._bucket is not None and not self._bucket.take(self._clock.now()):
            self._refuse(session, sl.DSQL_RATE_CODE, sl.DSQL_RATE, RATE_EXCEEDED)
            return False
        if profile.max_connections is not None and len(self._open) >= profile.max_connections:
            if profile.service == "dsql":
                self._refuse(session, sl.DSQL_TOO_MANY_CODE, sl.DSQL_TOO_MANY, TOO_MANY_CONNECTIONS)
            else:
                self._refuse(session, sl.PG_TOO_MANY_CODE, sl.PG_TOO_MANY, TOO_MANY_CONNECTIONS)
            return False
        session.counted = True
        self._open.add(session)
        return True

    def _forget(self, session: _Session) -> None:
        """Drop a closed connection from the counts; start the idle clock at zero."""
        if session in self._open:
            self._open.discard(session)
            if not self._open:
                self._idle_since = self._clock.now()

    async def _wait_until_running(self, session: _Session) -> bool:
        """Wait for (or refuse during) a resume, then add the connect latency."""
        profile = self._profile
        waited = False
        while self._state != "running":
            resumed = self._start_resume()
            if profile.paused_connect == "refuse":
                self._refuse(session, sl.DSQL_WAKING_CODE, sl.DSQL_WAKING, WAKING_UP)
                return False
            waited = True
            await asyncio.shield(resumed)
        if profile.connect_latency and not waited:
            await sl.sleep_emulated(self._clock, profile.connect_latency)
        return True

    def _start_resume(self) -> asyncio.Future[None]:
        """Start resuming a paused cluster (once); return what resolves when it runs."""
        loop = asyncio.get_running_loop()
        if self._resumed is None or self._resumed.done():
            self._resumed = loop.create_future()
        if self._state == "paused":
            self._state = "resuming"
            self._resume_at = self._clock.now() + self._profile.resume_delay
            self._record(None, "", "", "resuming", CONNECTION)
            self._resume_task = loop.create_task(self._finish_resume())
        return self._resumed

    async def _finish_resume(self) -> None:
        await sl.sleep_emulated(self._clock, max(self._resume_at - self._clock.now(), 0.0))
        self._resume_task = None
        self._resume_now(RESUME_DELAY)

    def _resume_now(self, reason: str) -> None:
        if self._state == "running":
            return
        self._state = "running"
        self._idle_since = self._clock.now()
        task, self._resume_task = self._resume_task, None
        if task is not None:
            task.cancel()
        resumed, self._resumed = self._resumed, None
        if resumed is not None and not resumed.done():
            resumed.set_result(None)
        self._record(None, "", "", "resumed", reason)

    def _pause_now(self, reason: str) -> None:
        if self._state == "paused":
            return
        task, self._resume_task = self._resume_task, None
        if task is not None:
            task.cancel()  # waiters keep waiting for the next resume
        self._state = "paused"
        self._record(None, "", "", "paused", reason)
        for session in list(self._open):
            self._cut(session, PAUSED)

    def _call_on_loop(self, action: Callable[[], None]) -> None:
        """Run ``action`` on the emulator's loop (now, if there is none or we are on it)."""
        loop = self._loop
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or loop.is_closed() or running is loop:
            action()
            return
        done = threading.Event()
        failure: list[BaseException] = []

        def call() -> None:
            try:
                action()
            except BaseException as exc:
                failure.append(exc)
                raise
            finally:
                done.set()

        try:
            loop.call_soon_threadsafe(call)
        except RuntimeError:  # the loop closed meanwhile
            action()
            return
        if not done.wait(_CALL_TIMEOUT):
            raise RuntimeError("the emulator's event loop did not respond: is it blocked?")
        if failure:
            raise failure[0]

    def _establish(self, session: _Session, client: _Stream, backend: _Stream) -> None:
        """Count a session as established; watch its traffic if anything is timed."""
        now = self._clock.now()
        session.established = True
        session.started = session.last_activity = now
        profile = self._profile
        if not profile.timed:
            return

        def touch(data: bytes) -> None:
            del data
            session.last_activity = self._clock.now()

        client.on_data = touch
        if profile.session_cap is None:
            backend.on_data = touch
            return
        scanner = sl.ReadyForQueryScanner(lambda status: self._on_status(session, status))

        def from_backend(data: bytes) -> None:
            session.last_activity = self._clock.now()
            scanner.feed(data)

        backend.on_data = from_backend

    def _on_status(self, session: _Session, status: bytes) -> None:
        """Follow a session's transaction status; close it once its capped transaction ends."""
        previous, session.status = session.status, status
        if previous == b"I" and status != b"I":
            session.transaction_started = self._clock.now()
        if status == b"I" and session.capped:
            # after the ReadyForQuery is relayed: the transaction's end reaches the client
            asyncio.get_running_loop().call_soon(
                functools.partial(self._cut, session, SESSION_CAP, graceful=True)
            )

    def _cut(
        self, session: _Session, reason: str, *, notice: bool = False, graceful: bool = False
    ) -> None:
        """Close a session: abruptly, after the 57P05 notice, or after what was relayed."""
        if session.cut:
            return
        session.cut = True
        sqlstate = sl.IDLE_TIMEOUT_CODE if notice else ""
        self._record(session, session.user, session.database, "closed", reason, sqlstate=sqlstate)
        client, backend = session.client, session.backend
        if client is not None:
            if notice:
                client.write(_error_response(sl.IDLE_TIMEOUT_CODE, sl.IDLE_TIMEOUT))
            if notice or graceful:
                client.close()  # flushes what was written first
            else:
                client.abort()
        if backend is not None:
            backend.abort()

    async def _monitor(self) -> None:
        """Apply the timed rules: idle cut, session cap, auto-pause."""
        while True:
            await asyncio.sleep(_MONITOR_TICK)
            try:
                self._check_timers()
            except Exception:  # keep watching whatever went wrong once
                logger.warning("emulator monitor failed", exc_info=True)

    def _check_timers(self) -> None:
        profile = self._profile
        now = self._clock.now()
        for session in list(self._open):
            if not session.established or session.cut:
                continue
            if (
                profile.idle_timeout is not None
                and now - session.last_activity >= profile.idle_timeout
            ):
                self._cut(session, IDLE_TIMEOUT, notice=profile.idle_notice)
                continue
            if profile.session_cap is None or now - session.started < profile.session_cap:
                continue
            if session.status == b"I":
                self._cut(session, SESSION_CAP)
                continue
            session.capped = True
            if now - session.transaction_started >= profile.transaction_limit:
                self._cut(session, TRANSACTION_LIMIT)
        if (
            profile.auto_pause is not None
            and self._state == "running"
            and not self._open
            and now - self._idle_since >= profile.auto_pause
        ):
            self._pause_now(IDLE)

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # Not loop.sock_accept(): cancelled (by stop()) just as a connection arrived, it
            # accepts the socket anyway and drops it with "InvalidStateError", open. Accepting
            # in this task's own step, the socket is ours before any cancellation can land.
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                await _readable(loop, listener)
                continue
            except OSError as exc:  # e.g. out of file descriptors: do not spin
                logger.warning("emulator cannot accept a connection: %s", exc)
                await asyncio.sleep(0.1)
                continue
            sock.setblocking(False)  # noqa: FBT003
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            session = _Session(sock, str(address[0]))
            if self._door.unauthenticated >= self._door.max_unauthenticated:
                self._turn_away(session)
                continue
            session.pending = True
            self._door.unauthenticated += 1
            task = loop.create_task(self._serve(session))
            self._sessions.add(task)
            task.add_done_callback(self._sessions.discard)
            # a task cancelled before it ran never closes the socket it was given
            task.add_done_callback(session.close_socket)

    def _turn_away(self, session: _Session) -> None:
        """Refuse a connection past ``max_unauthenticated`` with 53300, without reading it."""
        self._record(
            session, "", "", "rejected", TOO_MANY_UNAUTHENTICATED, sqlstate=sl.PG_TOO_MANY_CODE
        )
        if self._door.turning_away >= self._door.max_unauthenticated:
            session.close_socket()  # a flood: do not even say why
            return
        self._door.turning_away += 1
        task = asyncio.get_running_loop().create_task(self._send_turn_away(session))
        self._sessions.add(task)
        task.add_done_callback(self._sessions.discard)
        task.add_done_callback(session.close_socket)

    async def _send_turn_away(self, session: _Session) -> None:
        error = _error_response(sl.PG_TOO_MANY_CODE, _TOO_MANY_CLIENTS)
        try:
            await asyncio.wait_for(self._say_too_many(session, error), self._door.tls_timeout)
        except (OSError, ValueError, asyncio.TimeoutError, _PeerGoneError, _ProtocolViolationError):
            logger.debug("connection from %s refused: too many unauthenticated", session.peer)
        finally:
            self._door.turning_away -= 1
            if session.client is not None:
                session.client.abort()
            session.close_socket()

    async def _say_too_many(self, session: _Session, error: bytes) -> None:
        """Send the 53300 error where the client reads it: inside TLS if it asks for TLS.

        libpq (since 17) shows no error sent in answer to its SSLRequest, as a machine in
        the middle could forge it; so a TLS client gets the error after the handshake.
        A cancel request is still relayed: cancelling a query must work at the cap.
        """
        assert session.sock is not None
        raw = _RawChannel(asyncio.get_running_loop(), session.sock)
        first = await raw.peek_first_byte()
        if first is None:
            return
        if first != _TLS_HANDSHAKE_BYTE:
            code, packet = await _read_startup_packet(raw)
            if code == _CANCEL_REQUEST:
                await self._forward_cancel(packet)
                return
            if code != _SSL_REQUEST:
                await raw.send(error)
                await _drain_and_shutdown(session.sock, _TURN_AWAY_DRAIN)
                return
            await raw.send(b"S")
        stream = await self._start_tls(session)
        stream.write(error)
        stream.close()
        await stream.wait_closed(_TURN_AWAY_DRAIN)

    def _authenticated(self, session: _Session) -> None:
        """Stop counting a connection against ``max_unauthenticated``."""
        if session.pending:
            session.pending = False
            self._door.unauthenticated -= 1

    async def _serve(self, session: _Session) -> None:
        try:
            await self._serve_session(session)
        finally:
            self._authenticated(session)
            self._forget(session)
            self._door.closed_since_trim += 1
            quiet = len(self._sessions) <= 1  # this one's task leaves it when done
            if (quiet or self._door.closed_since_trim >= _TRIM_EVERY) and self._door.trim is None:
                loop = asyncio.get_running_loop()
                self._door.trim = loop.call_later(_TRIM_DELAY, self._release_memory)

    def _release_memory(self) -> None:
        """Give the memory closed connections held back to the system (glibc keeps it)."""
        self._door.trim = None
        self._door.closed_since_trim = 0
        if _malloc_trim is not None:
            _malloc_trim()

    async def _serve_session(self, session: _Session) -> None:
        try:
            if not await self._startup_in_time(session):
                return
            client, backend = session.client, session.backend
            if client is not None and backend is not None:
                await asyncio.wait(
                    {client.closed, backend.closed}, return_when=asyncio.FIRST_COMPLETED
                )
        except _PeerGoneError:
            logger.debug("client %s closed the connection during startup", session.peer)
        except (OSError, ValueError) as exc:
            logger.debug("connection from %s failed: %r", session.peer, exc)
        except asyncio.CancelledError:
            await self._close_session(session, abort=True)
            raise
        except Exception:
            logger.warning("emulator session from %s failed", session.peer, exc_info=True)
        await self._close_session(session, abort=False)

    async def _startup_in_time(self, session: _Session) -> bool:
        """Run the startup, encrypted within ``tls_timeout`` and done within ``auth_timeout``.

        Returns:
            False (after logging why) if it was cut for taking longer, else True.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._door.auth_timeout
        startup = loop.create_task(self._startup(session))
        try:
            done, _ = await asyncio.wait({startup}, timeout=self._door.tls_timeout)
            if not done and session.client is not None:  # encrypted in time
                done, _ = await asyncio.wait({startup}, timeout=max(deadline - loop.time(), 0))
        finally:
            if not startup.done():
                startup.cancel()
                await asyncio.wait({startup})
        if not done:
            phase = "TLS" if session.client is None else "authentication"
            logger.debug("client %s timed out waiting for %s", session.peer, phase)
            return False
        try:
            startup.result()  # its exception, if any
        finally:
            # Its traceback holds this frame, whose locals hold the task holding the exception:
            # without this, the session's streams (and their TLS) wait for the cyclic GC.
            del startup, done
        return True

    async def _close_session(self, session: _Session, *, abort: bool) -> None:
        for stream in (session.client, session.backend):
            if stream is not None:
                stream.abort() if abort else stream.close()
        # Stopped while closing politely (a TLS close waits for the client's answer)? stop()
        # aborts the streams, and the session task's done callback closes the socket.
        if session.sock is not None and not abort:
            await _drain_and_shutdown(session.sock)
        session.close_socket()
        for stream in (session.client, session.backend):
            if stream is not None:
                await stream.wait_closed(_CLOSE_TIMEOUT)

    async def _start_tls(self, session: _Session) -> _Stream:
        assert session.sock is not None
        assert self._ssl is not None
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, self._streams)
        sock, session.sock = session.sock, None  # the transport owns it from here on
        await accept_tls(sock, stream, self._ssl, self._door.tls_timeout)
        session.client = stream
        return stream

    async def _startup(self, session: _Session) -> None:
        try:
            await self._negotiate(session)
        except _ProtocolViolationError as exc:
            logger.debug("protocol violation from %s: %s", session.peer, exc.message)
            error = _error_response(exc.sqlstate, exc.message)
            if session.client is not None:
                session.client.write(error)
            elif session.sock is not None:
                loop = asyncio.get_running_loop()
                with contextlib.suppress(OSError):
                    await loop.sock_sendall(session.sock, error)

    async def _negotiate(self, session: _Session) -> None:
        assert session.sock is not None
        raw = _RawChannel(asyncio.get_running_loop(), session.sock)
        first = await raw.peek_first_byte()
        if first is None:
            return
        if first == _TLS_HANDSHAKE_BYTE:
            await self._start_direct_tls(session)
        packet = await self._read_startup(session, raw)
        if packet is None:
            return
        params = _startup_parameters(packet)
        user = params.get("user", "")
        if not user:
            raise _ProtocolViolationError(
                "28000", "no PostgreSQL user name specified in startup packet"
            )
        database = params.get("database") or user
        session.user, session.database = user, database
        if session.client is None:
            if self._profile.service == "dsql":  # no TLS, so no SNI either
                self._record(
                    session, user, database, "rejected", NO_ENCRYPTION, sqlstate=sl.DSQL_NO_SNI_CODE
                )
                await raw.send(_error_response(sl.DSQL_NO_SNI_CODE, sl.DSQL_NO_SNI))
                return
            self._record(session, user, database, "rejected", NO_ENCRYPTION, sqlstate="28000")
            message = _NO_ENCRYPTION.format(host=session.peer, user=user, database=database)
            await raw.send(_error_response("28000", message))
            return
        if not self._admit(session) or not await self._wait_until_running(session):
            return
        if await self._authenticate(session, session.client, user, database):
            await self._connect_backend(session, session.client, packet, user)

    async def _start_direct_tls(self, session: _Session) -> None:
        """Serve ``sslnegotiation=direct``: TLS from the first byte, ALPN required."""
        require_alpn(await self._start_tls(session))

    async def _read_startup(self, session: _Session, raw: _RawChannel) -> bytes | None:
        """Negotiate encryption; return the StartupMessage, or None after a CancelRequest."""
        return await read_startup(
            raw, lambda: session.client, lambda: self._start_tls(session), self._forward_cancel
        )

    async def _authenticate(
        self, session: _Session, client: _Stream, user: str, database: str
    ) -> bool:
        client.write(_AUTH_CLEARTEXT_REQUEST)
        kind, body = await _read_message(client, _MAX_AUTH_MESSAGE)
        if kind != b"p":
            raise _ProtocolViolationError(
                "08P01", f"expected password response, got message type {kind[0]}"
            )
        if not body.endswith(b"\0") or b"\0" in body[:-1]:
            raise _ProtocolViolationError("08P01", "invalid password packet size")
        assert self._rules is not None
        try:
            token = body[:-1].decode("utf-8")
        except UnicodeDecodeError:
            token = ""
            reason: str | None = MALFORMED
        else:
            try:
                verified = verify_token(
                    token,
                    rules=self._rules,
                    action=self._action_for(user),
                    user=user,
                    credentials=self._keys,
                    clock=self._clock,
                )
            except TokenVerificationError as exc:
                reason = exc.reason
            else:
                reason = None
                session.access_key_id = verified.access_key_id
                # Past the token: RDS's rds_iam grant and the IAM policies (see _authz).
                refused = await self._authorize(session, user, verified.principal)
                if refused is not None:
                    return False
        if reason is not None:
            if self._profile.service == "dsql":
                hint = sl.dsql_hint(reason, token, user=user, clock=self._clock)
                self._refuse(
                    session, sl.DSQL_ACCESS_DENIED_CODE, sl.DSQL_ACCESS_DENIED, reason, hint=hint
                )
            else:
                self._record(session, user, database, "rejected", reason, sqlstate="28000")
                client.write(_error_response("28000", _PAM_FAILED.format(user=user)))
            return False
        self._record(session, user, database, "accepted")
        self._authenticated(session)
        return True

    # --- past the token: rds_iam and IAM policies (the rules live in _authz and _policy) ---

    async def _authorize(
        self, session: _Session, user: str, principal: str | None
    ) -> _authz.Refusal | None:
        """Refuse a valid token the database or IAM would not accept; return why, or None."""
        try:
            refusal = await _authz.authorize(
                self._strict,
                user=user,
                principal=principal,
                policies=self._policies,
                iam_check=self._iam_check,
            )
        except BackendError as exc:
            logger.warning("emulator cannot reach its backend server: %s", exc)
            if session.client is not None:
                session.client.write(_error_response("08006", _BACKEND_UNREACHABLE))
            return _authz.Refusal("backend unreachable", str(exc))
        if refusal is None:
            return None
        if self._profile.service == "dsql":
            self._refuse(
                session,
                sl.DSQL_ACCESS_DENIED_CODE,
                sl.DSQL_ACCESS_DENIED,
                refusal.reason,
                hint=refusal.hint,
                detail=refusal.detail,
            )
        else:
            self._refuse(
                session,
                "28000",
                _PAM_FAILED.format(user=user),
                refusal.reason,
                detail=refusal.detail,
            )
        return refusal

    def _action_for(self, user: str) -> str:
        """Return the ``Action`` a token for ``user`` must carry."""
        if self._profile.service == "dsql":
            return dsql_action(user)
        return "connect"

    async def _open_backend(self) -> _Stream:
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, self._streams)
        target = self._backend
        if target.unix_path is not None:
            connect = loop.create_unix_connection(lambda: stream, target.unix_path)
        else:
            connect = loop.create_connection(lambda: stream, target.host, target.port)
        await asyncio.wait_for(connect, target.connect_timeout)
        return stream

    async def _connect_backend(  # noqa: C901
        self, session: _Session, client: _Stream, packet: bytes, user: str
    ) -> None:
        """Log in to the backend as the client; then relay both ways, or relay its error."""
        try:
            backend = await self._open_backend()
        except (OSError, asyncio.TimeoutError) as exc:
            logger.warning("emulator cannot reach its backend server: %s", exc)
            client.write(_error_response("08006", _BACKEND_UNREACHABLE))
            return
        session.backend = backend
        rules = self._dsql_rules
        if rules is not None and rules.occ:
            packet = dsql.startup_with_occ(packet)
        backend.write(packet)
        login = _BackendLogin(user, self._backend.password)
        while True:
            kind, body = await _read_message(backend, _MAX_BACKEND_AUTH_MESSAGE)
            if kind in (b"E", b"v", b"N"):  # error, NegotiateProtocolVersion, notice
                client.write(_message(kind, body))
                if kind == b"E":
                    return
                continue
            if kind != b"R" or len(body) < 4:  # noqa: PLR2004
                client.write(
                    _error_response("08P01", "iampg emulator: unexpected message from backend")
                )
                return
            (code,) = struct.unpack("!I", body[:4])
            if code == _AUTH_OK:
                greeting = _message(kind, body)
                if rules is not None:
                    admitted = await self._dsql_login(session, backend, body)
                    if admitted is None:
                        return
                    greeting = admitted
                # Established before the client hears it may go on: its clock and timers
                # (the session cap) start no later than the client's first statement.
                self._establish(session, client, backend)
                client.write(greeting)
                backend.pipe_to(client)
                client.pipe_to(backend)
                return
            try:
                reply = login.answer(code, body[4:])
            except _BackendAuthError as exc:
                client.write(_error_response(exc.sqlstate, exc.message))
                return
            if reply is not None:
                backend.write(reply)

    async def _dsql_login(
        self, session: _Session, backend: _Stream, auth_ok: bytes
    ) -> bytes | None:
        """DSQL mode: check the role's mapping and install the SQL filters.

        Returns:
            What to greet the client with (AuthenticationOk and the backend's login), or
            None when the session was refused.
        """
        rules = self._dsql_rules
        client = session.client
        assert rules is not None
        assert client is not None
        allowed, greeting, principal = True, b"", ""
        if rules.role_mapping:
            await self._prepare_database(session.database)
            if session.user != dsql.ADMIN:  # asks the key's store again, for its principal
                principal = self.principal_of(session.access_key_id)
            allowed, greeting = await dsql.admit_session(
                backend, backend, user=session.user, principal=principal
            )
        if not allowed:
            hint = dsql.HINT_NOT_MAPPED.format(user=session.user, arn=principal)
            self._refuse(
                session,
                sl.DSQL_ACCESS_DENIED_CODE,
                sl.DSQL_ACCESS_DENIED,
                ROLE_NOT_MAPPED,
                hint=hint,
            )
            return None
        if rules.inspects_sql:
            filters = dsql.DsqlSession(
                rules, user=session.user, clock=self._clock, forced=self._forced
            )
            client.transform = filters.from_client
            backend.transform = filters.from_backend
            greeting = filters.from_backend(greeting)
        return _message(b"R", auth_ok) + greeting

    async def _prepare_database(self, database: str) -> None:
        """Make DSQL's role-mapping view in ``database`` once (as the backend's user)."""
        if database in self._dsql_prepared:
            return
        async with self._dsql_lock:
            if database in self._dsql_prepared:
                return
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(None, dsql.prepare_database, self._backend_dsn, database)
            except Exception as exc:  # noqa: BLE001 - the login goes on; mappings then fail
                logger.warning("emulator cannot make sys.iam_pg_role_mappings: %s", exc)
            self._dsql_prepared.add(database)

    async def _forward_cancel(self, packet: bytes) -> None:
        if not _MIN_CANCEL_PACKET <= len(packet) <= _MAX_CANCEL_PACKET:
            raise _ProtocolViolationError("08P01", "invalid length of cancel request")
        try:
            backend = await self._open_backend()
        except (OSError, asyncio.TimeoutError) as exc:
            logger.warning("emulator cannot reach its backend server: %s", exc)
            return
        backend.write(packet)
        backend.close()
        await backend.wait_closed(_CLOSE_TIMEOUT)
        logger.debug("cancel request forwarded")


def _listen_address(listen_host: str, port: int) -> tuple[str, int]:
    """Check the address and port to listen on; warn if others can reach it."""
    if not 0 <= port <= 65535:  # noqa: PLR2004
        raise ConfigurationError(f"port must be between 0 and 65535, not {port}")
    if _reaches_beyond_loopback(listen_host):
        # stacklevel: the caller of Emulator(...)
        warnings.warn(exposure_warning(listen_host), UserWarning, stacklevel=3)
    return listen_host, port


def _reaches_beyond_loopback(listen_host: str) -> bool:
    """Tell whether listening on ``listen_host`` accepts connections from other machines."""
    return beyond_loopback(listen_host, unresolved=False)  # unresolved: listening will fail


def exposure_warning(listen_host: str) -> str:
    """Return the warning for an emulator listening beyond this machine."""
    return (
        f"the emulator listens on {listen_host or 'every address'}, beyond this machine: "
        "anyone who can reach it and holds the published example AWS keys can log in to "
        "its backend server; listen on 127.0.0.1 unless that is what you want"
    )
