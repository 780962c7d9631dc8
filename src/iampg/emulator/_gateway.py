"""The emulator's gateway: TLS, IAM token checks, then a byte relay to a real PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import shutil
import socket
import struct
import tempfile
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, cast

from psycopg.conninfo import conninfo_to_dict

from iampg.errors import ConfigurationError

from ._clock import EmulatorClock
from ._credentials import FAKE_CREDENTIALS, Credentials
from ._sigv4 import MALFORMED, TokenRules, TokenVerificationError, verify_token
from ._tls import ALPN_PROTOCOL, make_certificates, server_context

if TYPE_CHECKING:
    import ssl
    from collections.abc import Sequence
    from types import TracebackType

    from typing_extensions import Self

__all__ = ["DEFAULT_HOSTNAME", "Emulator", "Event"]

logger = logging.getLogger("iampg.emulator")

#: The host name the emulator answers to unless told otherwise.
DEFAULT_HOSTNAME: Final = "iampg-emulator.cluster-emulated.us-east-1.rds.amazonaws.com"

_SSL_REQUEST: Final = 80877103
_GSSENC_REQUEST: Final = 80877104
_CANCEL_REQUEST: Final = 80877102
_TLS_HANDSHAKE_BYTE: Final = 0x16
_MAX_STARTUP_PACKET: Final = 10_000
_MIN_CANCEL_PACKET: Final = 16
_MAX_CANCEL_PACKET: Final = 8 + 256  # protocol 3.2 allows cancel keys up to 256 bytes
_MAX_AUTH_MESSAGE: Final = 65_535 + 4
_MAX_BACKEND_AUTH_MESSAGE: Final = 1 << 20
_MAX_NEGOTIATIONS: Final = 2
_READ_LIMIT: Final = 1 << 16
_AUTH_TIMEOUT: Final = 60.0  # PostgreSQL's authentication_timeout default
_HANDSHAKE_TIMEOUT: Final = 10.0
_BACKEND_CONNECT_TIMEOUT: Final = 10.0
_CLOSE_TIMEOUT: Final = 2.0
_MAX_EVENTS: Final = 10_000
_AUTH_OK: Final = 0
_AUTH_CLEARTEXT: Final = 3
_AUTH_MD5: Final = 5
_AUTH_SASL: Final = 10
_AUTH_SASL_CONTINUE: Final = 11
_AUTH_SASL_FINAL: Final = 12
_PROTOCOL_MAJOR: Final = 3

_PAM_FAILED: Final = 'PAM authentication failed for user "{user}"'
_NO_ENCRYPTION: Final = (
    'pg_hba.conf rejects connection for host "{host}", user "{user}", '
    'database "{database}", no encryption'
)


@dataclass(frozen=True)
class Event:
    """One authentication decision of the emulator; never holds the token itself.

    Attributes:
        time: When, in the emulator clock's wall time (epoch seconds, see
            :meth:`EmulatorClock.now`).
        peer: The client's IP address.
        user: The user of the startup message.
        database: The database of the startup message.
        outcome: ``"accepted"`` or ``"rejected"``.
        reason: Why it was rejected (``"signature mismatch"``, ``"token expired"``,
            ``"wrong host"``, ``"no encryption"``...), empty when accepted.
    """

    time: float
    peer: str
    user: str
    database: str
    outcome: Literal["accepted", "rejected"]
    reason: str = ""


class _ProtocolViolationError(Exception):
    """The client broke the protocol; it gets this error and the connection is closed."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message


class _PeerGoneError(Exception):
    """The other side closed the connection while a message was expected."""


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def _error_response(sqlstate: str, message: str) -> bytes:
    fields = b"".join(
        code + value.encode("utf-8", "replace") + b"\0"
        for code, value in ((b"S", "FATAL"), (b"V", "FATAL"), (b"C", sqlstate), (b"M", message))
    )
    return _message(b"E", fields + b"\0")


_AUTH_CLEARTEXT_REQUEST: Final = _message(b"R", struct.pack("!I", _AUTH_CLEARTEXT))


class _Channel:
    """What the startup code reads from and writes to: a raw socket or a TLS stream."""

    async def read_exactly(self, n: int) -> bytes:
        raise NotImplementedError

    async def send(self, data: bytes) -> None:
        raise NotImplementedError


class _RawChannel(_Channel):
    """The accepted socket before TLS: exact reads only, so nothing is read ahead."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self._loop = loop
        self._sock = sock

    async def read_exactly(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = await self._loop.sock_recv(self._sock, n - len(data))
            if not chunk:
                raise _PeerGoneError
            data += chunk
        return bytes(data)

    async def send(self, data: bytes) -> None:
        await self._loop.sock_sendall(self._sock, data)

    async def peek_first_byte(self) -> int | None:
        """Wait for the first byte and return it without consuming it; ``None`` on EOF."""
        while True:
            try:
                data = self._sock.recv(1, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                await self._readable()
                continue
            return data[0] if data else None

    def has_pending_data(self) -> bool:
        """Tell whether bytes already wait in the socket (sent without waiting for us)."""
        try:
            return bool(self._sock.recv(1, socket.MSG_PEEK))
        except (BlockingIOError, InterruptedError):
            return False

    async def _readable(self) -> None:
        fd = self._sock.fileno()
        waiter: asyncio.Future[None] = self._loop.create_future()

        def wake() -> None:
            if not waiter.done():
                waiter.set_result(None)

        self._loop.add_reader(fd, wake)
        try:
            await waiter
        finally:
            self._loop.remove_reader(fd)


class _Stream(asyncio.Protocol, _Channel):
    """A buffered connection that can be switched to piping into another one."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = loop.create_future()
        self._buffer = bytearray()
        self._eof = False
        self._reading_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._partner: _Stream | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        if self._partner is not None:
            self._partner.write(data)
            return
        self._buffer += data
        if len(self._buffer) > _READ_LIMIT and self.transport is not None:
            self.transport.pause_reading()
            self._reading_paused = True
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        del exc  # a lost connection ends the session whatever the cause
        self._eof = True
        self._wake()
        if not self.closed.done():
            self.closed.set_result(None)
        if self._partner is not None:
            self._partner.close()

    def pause_writing(self) -> None:
        if self._partner is not None and self._partner.transport is not None:
            self._partner.transport.pause_reading()

    def resume_writing(self) -> None:
        if self._partner is not None and self._partner.transport is not None:
            self._partner.transport.resume_reading()

    # reading and writing

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read_exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            if self._eof:
                raise _PeerGoneError
            if self._reading_paused and self.transport is not None:
                self._reading_paused = False
                self.transport.resume_reading()
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    async def send(self, data: bytes) -> None:
        self.write(data)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def pipe_to(self, partner: _Stream) -> None:
        """Send everything received from now on (and anything buffered) to ``partner``."""
        self._partner = partner
        if self._buffer:
            partner.write(bytes(self._buffer))
            self._buffer.clear()
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        if self._eof:
            partner.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    async def wait_closed(self, timeout: float) -> None:
        if self.transport is None:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        if not self.closed.done():
            self.transport.abort()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.closed), timeout)


async def _read_startup_packet(channel: _Channel) -> tuple[int, bytes]:
    header = await channel.read_exactly(4)
    (length,) = struct.unpack("!I", header)
    if not 8 <= length <= _MAX_STARTUP_PACKET:  # noqa: PLR2004
        raise _ProtocolViolationError("08P01", "invalid length of startup packet")
    body = await channel.read_exactly(length - 4)
    (code,) = struct.unpack("!I", body[:4])
    return code, header + body


def _startup_parameters(packet: bytes) -> dict[str, str]:
    data = packet[8:]
    if not data.endswith(b"\0"):
        raise _ProtocolViolationError(
            "08P01", "invalid startup packet layout: expected terminator as last byte"
        )
    parts = data[:-1].split(b"\0")
    items = parts[:-1]
    if parts[-1] or len(items) % 2 or not all(items[::2]):
        raise _ProtocolViolationError("08P01", "invalid startup packet layout")
    try:
        texts = [item.decode("utf-8") for item in items]
    except UnicodeDecodeError:
        raise _ProtocolViolationError("08P01", "invalid startup packet encoding") from None
    return dict(zip(texts[::2], texts[1::2], strict=True))


async def _read_message(channel: _Channel, limit: int) -> tuple[bytes, bytes]:
    header = await channel.read_exactly(5)
    kind = header[:1]
    (length,) = struct.unpack("!I", header[1:])
    if not 4 <= length <= limit:  # noqa: PLR2004
        raise _ProtocolViolationError("08P01", "invalid message length")
    return kind, await channel.read_exactly(length - 4)


class _ScramClient:
    """The client half of SCRAM-SHA-256 (RFC 7677), without channel binding."""

    def __init__(self, password: str, *, user: str = "", nonce: str | None = None) -> None:
        self._password = password
        self._nonce = nonce or base64.b64encode(secrets.token_bytes(18)).decode()
        self._first_bare = f"n={user},r={self._nonce}"
        self._server_signature = b""

    def first_message(self) -> bytes:
        return f"n,,{self._first_bare}".encode()

    def final_message(self, server_first: bytes) -> bytes:
        text = server_first.decode()
        attrs = dict(item.split("=", 1) for item in text.split(",") if "=" in item)
        nonce, salt, iterations = attrs["r"], base64.b64decode(attrs["s"]), int(attrs["i"])
        if not nonce.startswith(self._nonce):
            raise ValueError("server nonce does not extend the client nonce")
        salted = hashlib.pbkdf2_hmac("sha256", self._password.encode(), salt, iterations)
        client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = f"c=biws,r={nonce}"
        auth_message = f"{self._first_bare},{text},{without_proof}".encode()
        signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
        self._server_signature = hmac.new(server_key, auth_message, hashlib.sha256).digest()
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify_final(self, server_final: bytes) -> None:
        attrs = dict(item.split("=", 1) for item in server_final.decode().split(",") if "=" in item)
        if "v" not in attrs or not hmac.compare_digest(
            base64.b64decode(attrs["v"]), self._server_signature
        ):
            raise ValueError("the server's SCRAM signature does not match")


class _BackendAuthError(Exception):
    """The gateway cannot log in to the backend; the client gets this error."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message


class _BackendLogin:
    """Answers the backend's authentication requests with the backend DSN's password."""

    def __init__(self, user: str, password: str | None) -> None:
        self._user = user
        self._password = password
        self._scram: _ScramClient | None = None

    def answer(self, code: int, data: bytes) -> bytes | None:
        """Return the message answering AuthenticationRequest ``code``, or None for none."""
        if code == _AUTH_SASL_CONTINUE and self._scram is not None:
            return _message(b"p", self._scram.final_message(data))
        if code == _AUTH_SASL_FINAL and self._scram is not None:
            try:
                self._scram.verify_final(data)
            except ValueError:
                raise _BackendAuthError(
                    "28000", "iampg emulator: the backend server failed SCRAM verification"
                ) from None
            return None
        if code not in (_AUTH_CLEARTEXT, _AUTH_MD5, _AUTH_SASL):
            raise _BackendAuthError(
                "28000",
                f"iampg emulator: the backend server asks for an unsupported "
                f"authentication method ({code})",
            )
        password = self._password
        if password is None:
            raise _BackendAuthError(
                "28P01",
                "iampg emulator: the backend server asks for a password "
                "and the backend connection string has none",
            )
        if code == _AUTH_CLEARTEXT:
            return _password_message(password)
        if code == _AUTH_MD5:
            inner = hashlib.md5((password + self._user).encode()).hexdigest()  # noqa: S324
            outer = hashlib.md5(inner.encode() + data[:4]).hexdigest()  # noqa: S324
            return _password_message(f"md5{outer}")
        if b"SCRAM-SHA-256" not in data.split(b"\0"):
            raise _BackendAuthError(
                "28000", "iampg emulator: the backend server offers no SCRAM-SHA-256"
            )
        self._scram = _ScramClient(password)
        first = self._scram.first_message()
        return _message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!I", len(first)) + first)


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


def _password_message(password: str | bytes) -> bytes:
    data = password.encode() if isinstance(password, str) else password
    return _message(b"p", data + b"\0")


@dataclass
class _Session:
    sock: socket.socket | None
    peer: str
    client: _Stream | None = None
    backend: _Stream | None = None


class Emulator:
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
        credentials: The AWS keys the emulator knows; the first one is :attr:`credentials`.
        clock: The clock for token and credential expiry; a new one when ``None``.
        time_scale: Emulated seconds per real second, for a new clock when ``clock`` is
            ``None``.

    Raises:
        iampg.ConfigurationError: An argument is invalid.
    """

    def __init__(
        self,
        backend: str,
        *,
        hostnames: Sequence[str] = (DEFAULT_HOSTNAME,),
        region: str = "us-east-1",
        listen_host: str = "127.0.0.1",
        port: int = 0,
        credentials: Sequence[Credentials] = (FAKE_CREDENTIALS,),
        clock: EmulatorClock | None = None,
        time_scale: float = 1.0,
    ) -> None:
        if isinstance(hostnames, str):
            hostnames = (hostnames,)
        if not hostnames or not all(hostnames):
            raise ConfigurationError("hostnames must name at least one host")
        if not region:
            raise ConfigurationError("region must not be empty")
        if not 0 <= port <= 65535:  # noqa: PLR2004
            raise ConfigurationError(f"port must be between 0 and 65535, not {port}")
        if not credentials:
            raise ConfigurationError("credentials must hold at least one key")
        keys: dict[str, Credentials] = {}
        for creds in credentials:
            if creds.access_key_id in keys:
                raise ConfigurationError(f"access key {creds.access_key_id} is given twice")
            keys[creds.access_key_id] = creds
        if clock is not None and time_scale != 1.0:
            raise ConfigurationError("give either clock or time_scale, not both")
        try:
            self._clock = clock if clock is not None else EmulatorClock(time_scale)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        self._backend = _BackendTarget.parse(backend)
        self._hostnames = tuple(hostnames)
        self._region = region
        self._listen_host = listen_host
        self._requested_port = port
        self._keys = keys
        self._first_credentials = credentials[0]
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
        self._thread: threading.Thread | None = None
        self._thread_stop: asyncio.Event | None = None

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
    def clock(self) -> EmulatorClock:
        """The clock token and credential expiry are judged by."""
        return self._clock

    @property
    def credentials(self) -> Credentials:
        """The first AWS key the emulator knows (the one :meth:`aws_env` exports)."""
        return self._first_credentials

    @property
    def events(self) -> list[Event]:
        """A snapshot of the authentication decisions so far (the last 10 000)."""
        with self._events_lock:
            return list(self._events)

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
                files = make_certificates(self._hostnames, tmpdir)
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
            self._rules = TokenRules.rds(
                region=self._region, hostnames=set(self._hostnames), port=self._port
            )
            self._accept_task = loop.create_task(self._accept_loop(listener))
        logger.info("emulator listening on %s port %d for %s", self._address, self._port, self.host)

    async def astop(self) -> None:
        """Stop listening, close every session and remove the CA file. Idempotent."""
        with self._state_lock:
            listener, accept_task = self._listener, self._accept_task
            tmpdir = self._tmpdir
            self._listener = self._accept_task = None
            self._tmpdir = self._ca_file = None
            self._ssl = None
        if listener is None:
            return
        if accept_task is not None:
            accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await accept_task
        listener.close()
        sessions = list(self._sessions)
        for task in sessions:
            task.cancel()
        await asyncio.gather(*sessions, return_exceptions=True)
        for _ in range(3):  # let transports run their connection_lost callbacks
            await asyncio.sleep(0)
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
        self._port = 0
        self._loop = None
        logger.info("emulator stopped")

    # --- lifecycle in a background thread ---

    def start(self) -> None:
        """Start the emulator on its own event loop in a daemon thread.

        Returns once it accepts connections; does nothing if already started.
        """
        with self._state_lock:
            if self._thread is not None or self._listener is not None:
                return
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.SelectorEventLoop()

        async def main() -> None:
            self._thread_stop = asyncio.Event()
            try:
                await self.astart()
            except BaseException as exc:
                failure.append(exc)
                raise
            finally:
                ready.set()
            try:
                await self._thread_stop.wait()
            finally:
                await self.astop()

        def run() -> None:
            try:
                loop.run_until_complete(main())
            except BaseException:  # reported to start() through failure
                if not failure:
                    logger.debug("emulator thread failed", exc_info=True)
            finally:
                with contextlib.suppress(Exception):
                    loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        thread = threading.Thread(target=run, name="iampg-emulator", daemon=True)
        self._thread = thread
        thread.start()
        ready.wait()
        if failure:
            thread.join()
            self._thread = None
            raise failure[0]

    def stop(self) -> None:
        """Stop the emulator started by :meth:`start` and join its thread. Idempotent."""
        thread, loop, stop_event = self._thread, self._loop, self._thread_stop
        if thread is None:
            return
        if loop is not None and stop_event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop may have just closed
                loop.call_soon_threadsafe(stop_event.set)
        thread.join()
        self._thread = None
        self._thread_stop = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        await self.astart()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.astop()

    # --- serving ---

    def _record(
        self,
        session: _Session,
        user: str,
        database: str,
        outcome: Literal["accepted", "rejected"],
        reason: str = "",
    ) -> None:
        event = Event(self._clock.now(), session.peer, user, database, outcome, reason)
        with self._events_lock:
            self._events.append(event)
        if reason:
            logger.debug(
                "%s user %r database %r from %s: %s", outcome, user, database, session.peer, reason
            )
        else:
            logger.debug("%s user %r database %r from %s", outcome, user, database, session.peer)

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, address = await loop.sock_accept(listener)
            except OSError as exc:  # e.g. out of file descriptors: do not spin
                logger.warning("emulator cannot accept a connection: %s", exc)
                await asyncio.sleep(0.1)
                continue
            sock.setblocking(False)  # noqa: FBT003
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(self._serve(_Session(sock, str(address[0]))))
            self._sessions.add(task)
            task.add_done_callback(self._sessions.discard)

    async def _serve(self, session: _Session) -> None:
        try:
            try:
                await asyncio.wait_for(self._startup(session), _AUTH_TIMEOUT)
            except asyncio.TimeoutError:
                logger.debug("client %s timed out during startup", session.peer)
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

    async def _close_session(self, session: _Session, *, abort: bool) -> None:
        for stream in (session.client, session.backend):
            if stream is not None:
                stream.abort() if abort else stream.close()
        sock, session.sock = session.sock, None
        if sock is not None:
            if not abort:
                await _drain_and_shutdown(sock)
            sock.close()
        for stream in (session.client, session.backend):
            if stream is not None:
                await stream.wait_closed(_CLOSE_TIMEOUT)

    async def _start_tls(self, session: _Session) -> _Stream:
        assert session.sock is not None
        assert self._ssl is not None
        loop = asyncio.get_running_loop()
        stream = _Stream(loop)
        sock, session.sock = session.sock, None  # the transport owns it from here on
        await loop.connect_accepted_socket(
            lambda: stream, sock, ssl=self._ssl, ssl_handshake_timeout=_HANDSHAKE_TIMEOUT
        )
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
        if session.client is None:
            self._record(session, user, database, "rejected", "no encryption")
            message = _NO_ENCRYPTION.format(host=session.peer, user=user, database=database)
            await raw.send(_error_response("28000", message))
            return
        if await self._authenticate(session, session.client, user, database):
            await self._connect_backend(session, session.client, packet, user)

    async def _start_direct_tls(self, session: _Session) -> None:
        """Serve ``sslnegotiation=direct``: TLS from the first byte, ALPN required."""
        stream = await self._start_tls(session)
        transport = stream.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        if ssl_object is None or ssl_object.selected_alpn_protocol() != ALPN_PROTOCOL:
            raise _ProtocolViolationError(
                "08P01",
                "received direct SSL connection request without ALPN protocol "
                "negotiation extension",
            )

    async def _read_startup(self, session: _Session, raw: _RawChannel) -> bytes | None:
        """Negotiate encryption; return the StartupMessage, or None after a CancelRequest."""
        negotiations = 0
        while True:
            channel: _Channel = raw if session.client is None else session.client
            code, packet = await _read_startup_packet(channel)
            if code == _CANCEL_REQUEST:
                await self._forward_cancel(packet)
                return None
            if code not in (_SSL_REQUEST, _GSSENC_REQUEST):
                major, minor = code >> 16, code & 0xFFFF
                if major != _PROTOCOL_MAJOR:
                    raise _ProtocolViolationError(
                        "0A000",
                        f"unsupported frontend protocol {major}.{minor}: "
                        "server supports 3.0 to 3.2",
                    )
                return packet
            negotiations += 1
            if session.client is not None or negotiations > _MAX_NEGOTIATIONS:
                raise _ProtocolViolationError(
                    "08P01", "encryption requested on an encrypted connection"
                )
            if len(packet) != 8:  # noqa: PLR2004
                raise _ProtocolViolationError("08P01", "invalid length of startup packet")
            if code == _GSSENC_REQUEST:
                await raw.send(b"N")
                continue
            if raw.has_pending_data():
                raise _ProtocolViolationError(
                    "08P01", "received unencrypted data after SSL request"
                )
            await raw.send(b"S")
            await self._start_tls(session)

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
            reason: str | None = MALFORMED
        else:
            try:
                verify_token(
                    token,
                    rules=self._rules,
                    action="connect",
                    user=user,
                    credentials=self._keys,
                    clock=self._clock,
                )
            except TokenVerificationError as exc:
                reason = exc.reason
            else:
                reason = None
        if reason is not None:
            self._record(session, user, database, "rejected", reason)
            client.write(_error_response("28000", _PAM_FAILED.format(user=user)))
            return False
        self._record(session, user, database, "accepted")
        return True

    async def _open_backend(self) -> _Stream:
        loop = asyncio.get_running_loop()
        stream = _Stream(loop)
        target = self._backend
        if target.unix_path is not None:
            connect = loop.create_unix_connection(lambda: stream, target.unix_path)
        else:
            connect = loop.create_connection(lambda: stream, target.host, target.port)
        await asyncio.wait_for(connect, target.connect_timeout)
        return stream

    async def _connect_backend(
        self, session: _Session, client: _Stream, packet: bytes, user: str
    ) -> None:
        """Log in to the backend as the client; then relay both ways, or relay its error."""
        try:
            backend = await self._open_backend()
        except (OSError, asyncio.TimeoutError) as exc:
            logger.warning("emulator cannot reach its backend server: %s", exc)
            client.write(
                _error_response("08006", "iampg emulator: cannot reach the backend server")
            )
            return
        session.backend = backend
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
                client.write(_message(kind, body))
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


async def _drain_and_shutdown(sock: socket.socket) -> None:
    """Half-close, then read what the client still sends, so closing sends no RST.

    Closing a socket with unread input makes the kernel reset the connection, which can
    destroy the error message just sent before the client reads it.
    """
    loop = asyncio.get_running_loop()
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    channel = _RawChannel(loop, sock)
    deadline = loop.time() + _CLOSE_TIMEOUT
    drained = 0
    with contextlib.suppress(OSError, asyncio.TimeoutError):
        while drained < _READ_LIMIT * 16:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            chunk = await asyncio.wait_for(loop.sock_recv(sock, _READ_LIMIT), remaining)
            if not chunk:
                break
            drained += len(chunk)
    del channel


def _listen(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV
    )
    family = infos[0][0]
    sock = socket.create_server((host, port), family=family, backlog=128)
    sock.setblocking(False)  # noqa: FBT003
    return sock


def _quote_conninfo(value: str) -> str:
    if value and not any(c in value for c in " '\\\t\n\r"):
        return value
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"
