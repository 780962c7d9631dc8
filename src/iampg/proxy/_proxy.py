"""The local proxy: PostgreSQL clients in, one IAM-authenticated upstream session each out."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import shutil
import socket
import ssl
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple

from iampg._connecting import is_loopback, prepare, preset_argument
from iampg._endpoint import Endpoint
from iampg._wire.lifecycle import BackgroundLoop, EventLoopKind, loop_factory
from iampg._wire.login import ScramError, ScramServer, ScramVerifier
from iampg._wire.protocol import (
    ALPN_PROTOCOL,
    AUTH_SASL,
    AUTH_SASL_CONTINUE,
    AUTH_SASL_FINAL,
    CANCEL_REQUEST,
    CLOSE_TIMEOUT,
    MAX_AUTH_MESSAGE,
    MAX_CANCEL_PACKET,
    MIN_CANCEL_PACKET,
    TLS_HANDSHAKE_BYTE,
    PeerGoneError,
    ProtocolViolationError,
    error_message,
    error_response,
    pack_message,
    quote_conninfo,
    read_message,
    startup_parameters,
)
from iampg._wire.startup import read_startup, require_alpn
from iampg._wire.streams import (
    RawChannel,
    Stream,
    abort_all,
    accept_tls,
    drain_and_shutdown,
    readable,
)
from iampg._wire.streams import beyond_loopback as _beyond_loopback
from iampg.errors import ConfigurationError

from ._upstream import Login, Refusal, Upstream

if TYPE_CHECKING:
    from iampg._tokens import TokenProvider

__all__ = ["ClientTls", "Proxy", "ProxyStats", "SessionInfo"]

logger = logging.getLogger("iampg.proxy")

ClientTls = (
    ssl.SSLContext | tuple[str | os.PathLike[str], str | os.PathLike[str]] | Literal["generate"]
)
"""TLS towards clients: an :class:`ssl.SSLContext`, a ``(certificate file, key file)``
pair of PEM files, or ``"generate"`` (a throwaway CA and certificate, see
:attr:`Proxy.ca_file`)."""

# From accept to the startup packet (and the password), as PostgreSQL's authentication_timeout.
_AUTH_TIMEOUT: Final = 60.0
_TLS_TIMEOUT: Final = 10.0
_MAX_PENDING: Final = 1024  # connections still in their client startup; more are closed at once
_NO_REPLICATION: Final = frozenset({"false", "off", "no", "0"})


class ProxyStats(NamedTuple):
    """Counts since the proxy started (see :meth:`Proxy.stats`).

    Attributes:
        opened: Sessions logged in upstream and relayed.
        closed: Of those, sessions that have ended.
        failed: Client connections that got no session: refused (bad password, upstream
            refusal, replication...), failed (upstream unreachable) or broken off.
        active: Sessions relaying now.
        bytes_from_clients: Bytes relayed from clients to the server.
        bytes_to_clients: Bytes relayed from the server to clients.
        cancels_forwarded: Cancel requests that matched a session and were sent upstream.
        cancels_ignored: Cancel requests whose key matched no session (nothing was sent).
    """

    opened: int
    closed: int
    failed: int
    active: int
    bytes_from_clients: int
    bytes_to_clients: int
    cancels_forwarded: int
    cancels_ignored: int


class SessionInfo(NamedTuple):
    """One session relaying now (see :meth:`Proxy.open_sessions`).

    Attributes:
        client: The client's address (``ip:port``, or ``unix``).
        user: The database user.
        database: The database.
        duration: Seconds since the client connected.
        bytes_from_client: Bytes relayed from the client so far.
        bytes_to_client: Bytes relayed to the client so far.
    """

    client: str
    user: str
    database: str
    duration: float
    bytes_from_client: int
    bytes_to_client: int


@dataclass(eq=False)
class _Session:
    sock: socket.socket | None
    peer: str
    loopback: bool
    started: float
    unix: bool = False
    client: Stream | None = None
    upstream: Stream | None = None
    user: str = ""
    database: str = ""
    key: bytes | None = None
    established: bool = False
    greeting: int = 0  # bytes sent to the client at login, before the relay
    outcome: str = ""

    @property
    def bytes_in(self) -> int:
        """Bytes relayed from the client to the server so far."""
        return 0 if self.client is None or not self.established else self.client.relayed

    @property
    def bytes_out(self) -> int:
        """Bytes sent to the client since its login: the greeting, then what is relayed."""
        relayed = 0 if self.upstream is None or not self.established else self.upstream.relayed
        return self.greeting + relayed

    def close_socket(self, _: object = None) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()


class _Counters:
    def __init__(self) -> None:
        self.opened = self.closed = self.failed = 0
        self.bytes_in = self.bytes_out = 0
        self.cancels_forwarded = self.cancels_ignored = 0


class Proxy(BackgroundLoop):
    """A local PostgreSQL endpoint in front of an IAM-only one, for any client.

    Every client connection gets its own upstream session (session mode), logged in with a
    token from one shared :class:`~iampg.TokenProvider`: the proxy runs for days while each
    token lasts 15 minutes. Upstream TLS is verified as iampg's defaults say
    (``sslmode=verify-full`` with the shipped CA file for the endpoint), with SNI. The
    preset's cold-start wait applies while the client waits; a refused token is forgotten
    and the login retried once. The client's startup parameters (``application_name``,
    ``options``, ``client_encoding``, protocol 3.2 negotiation) reach the server unchanged;
    replication connections are refused. The server's errors reach the client unchanged,
    with iampg's likely causes added to an authentication failure's DETAIL. Cancel requests
    work: each client gets its own cancel key, mapped to the upstream session's.

    Listening beyond loopback needs both ``client_tls`` and ``password`` (SCRAM-SHA-256):
    without them the proxy refuses to start.

    Run it in a background thread with :meth:`start`/:meth:`stop` (or ``with``), or on a
    running event loop with :meth:`astart`/:meth:`astop` (or ``async with``).

    Args:
        endpoint: The IAM endpoint (an :class:`~iampg.Endpoint`, or what
            :meth:`Endpoint.parse <iampg.Endpoint.parse>` takes).
        provider: The token provider to use (default: a new one for ``endpoint``).
        preset: The service's behaviour: ``rds``, ``aurora-serverless`` (or
            ``aurora-express``) or ``dsql``; default from the endpoint.
        host: The address to listen on.
        port: The TCP port; ``0`` picks a free one (see :attr:`port`).
        unix_socket_dir: Also listen on ``<dir>/.s.PGSQL.<port>`` (``psql -h <dir>``).
        client_tls: TLS towards clients (see :data:`ClientTls`); None for none. When given,
            every TCP client must use it, on loopback too (clients of the Unix socket need
            not: libpq does no TLS there).
        password: The password clients must give (SCRAM-SHA-256); None for none. Only its
            SCRAM verifier is kept.
        allow_insecure: Allow an upstream ``sslmode`` that may send the token unencrypted
            to a host other than loopback.
        grace: Seconds open sessions may run on after :meth:`stop` before they are closed.
        event_loop: The loop :meth:`start` runs the proxy on, in its thread: ``auto`` (the
            default: uvloop when it is installed, ``pip install 'iampg[proxy]'``, else
            asyncio's selector loop), ``asyncio`` or ``uvloop``. TLS runs in iampg's own layer
            on either; on uvloop a relayed query costs the proxy less CPU (see
            docs/performance.md). With :meth:`astart`, the proxy runs on the caller's loop,
            whatever it is.

    Raises:
        iampg.ConfigurationError: Bad endpoint or options, or beyond loopback without
            ``client_tls`` and ``password``.
    """

    _thread_name = "iampg-proxy"

    def __init__(
        self,
        endpoint: Endpoint | str,
        *,
        provider: TokenProvider | None = None,
        preset: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        unix_socket_dir: str | os.PathLike[str] | None = None,
        client_tls: ClientTls | None = None,
        password: str | None = None,
        allow_insecure: bool = False,
        grace: float = 10.0,
        event_loop: EventLoopKind = "auto",
    ) -> None:
        self._new_loop = loop_factory(event_loop)
        self._target = prepare(
            endpoint, provider, preset_argument(preset, None), allow_insecure=allow_insecure
        )
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:  # noqa: PLR2004
            raise ConfigurationError(f"port must be between 0 and 65535, not {port!r}")
        if not (isinstance(grace, (int, float)) and grace >= 0):
            raise ConfigurationError(f"grace must be 0 seconds or more, not {grace!r}")
        if password is not None and not password:
            raise ConfigurationError("password must not be empty")
        if isinstance(client_tls, str) and client_tls != "generate":
            raise ConfigurationError(
                "client_tls must be an SSLContext, a (certificate, key) pair or 'generate'"
            )
        self._listen_host = host
        self._requested_port = port
        self._beyond_loopback = beyond_loopback(host)
        if self._beyond_loopback and (client_tls is None or password is None):
            missing = " and ".join(
                what
                for what, absent in (
                    ("TLS towards clients", client_tls is None),
                    ("a client password (SCRAM-SHA-256)", password is None),
                )
                if absent
            )
            raise ConfigurationError(
                f"listening on {host or 'every address'} reaches beyond this machine: it needs "
                f"{missing}, or anyone who can reach it would use the database as "
                f"{self._target.endpoint.user}; listen on 127.0.0.1, or give both"
            )
        self._unix_dir = None if unix_socket_dir is None else Path(unix_socket_dir)
        self._client_tls = client_tls
        self._verifier = None if password is None else ScramVerifier.from_password(password)
        self._grace = float(grace)
        self._state_lock = threading.Lock()
        self._counters = _Counters()
        # Set while running:
        self._port = 0
        self._address = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listeners: list[socket.socket] = []
        self._accept_tasks: list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._open: set[_Session] = set()
        self._streams: set[Stream] = set()
        self._keys: dict[bytes, bytes] = {}  # client's cancel key -> upstream's
        self._pending = 0
        self._server_tls: ssl.SSLContext | None = None
        self._tmpdir: Path | None = None
        self._ca_file: Path | None = None
        self._cert_names: frozenset[str] = frozenset()  # a generated certificate's names
        self._unix_path: Path | None = None
        self._upstream: Upstream | None = None
        self._thread: threading.Thread | None = None
        self._thread_stop: asyncio.Event | None = None
        self._hurry = asyncio.Event()

    # --- what it reports ---

    @property
    def endpoint(self) -> Endpoint:
        """The IAM endpoint sessions log in to."""
        return self._target.endpoint

    @property
    def provider(self) -> TokenProvider:
        """The token provider every upstream login takes its token from."""
        return self._target.provider

    @property
    def host(self) -> str:
        """The address to connect to: the listening address (loopback for a wildcard)."""
        return self._address or self._listen_host

    @property
    def port(self) -> int:
        """The TCP port listened on (the bound one once started)."""
        return self._port or self._requested_port

    @property
    def unix_socket(self) -> Path | None:
        """The Unix socket listened on (``<dir>/.s.PGSQL.<port>``), or None."""
        return self._unix_path

    @property
    def ca_file(self) -> Path | None:
        """The CA file of a generated client certificate (``client_tls="generate"``), else None.

        Clients verify the proxy with it (``sslrootcert``); it is removed on stop.
        """
        return self._ca_file

    @property
    def conninfo(self) -> str:
        """A libpq connection string for the local side, without password.

        ``host=127.0.0.1 port=N user=… dbname=…`` (the endpoint's user and database), then
        what keeps libpq's ``PG*`` environment variables from changing where and how it
        connects: ``hostaddr`` (the host's address, when it is one) and ``sslmode``:
        ``disable`` without client TLS; with a generated certificate ``verify-full`` (or
        ``verify-ca`` when the host is not one of its names) and ``sslrootcert`` (the
        :attr:`ca_file`, once started); with a given certificate ``require``.
        """
        endpoint = self._target.endpoint
        host = self.host
        items = [
            ("host", host),
            ("port", str(self.port)),
            ("user", endpoint.user),
            ("dbname", endpoint.dbname),
        ]
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            items.append(("hostaddr", host))
        if self._client_tls is None:
            items.append(("sslmode", "disable"))
        elif self._ca_file is not None:
            verify = "verify-full" if host.lower() in self._cert_names else "verify-ca"
            items += [("sslmode", verify), ("sslrootcert", os.fspath(self._ca_file))]
        else:
            items.append(("sslmode", "require"))
        return " ".join(f"{key}={quote_conninfo(value)}" for key, value in items)

    @property
    def sessions(self) -> int:
        """How many sessions are relaying now."""
        return sum(1 for session in list(self._open) if session.established)

    def stats(self) -> ProxyStats:
        """Return the counts since start: sessions opened, closed and failed, bytes, cancels."""
        c = self._counters
        with self._state_lock:  # a session's bytes are in the totals or live, not both
            live = [s for s in list(self._open) if s.established]
            bytes_in = c.bytes_in + sum(s.bytes_in for s in live)
            bytes_out = c.bytes_out + sum(s.bytes_out for s in live)
        return ProxyStats(
            c.opened,
            c.closed,
            c.failed,
            len(live),
            bytes_in,
            bytes_out,
            c.cancels_forwarded,
            c.cancels_ignored,
        )

    def open_sessions(self) -> list[SessionInfo]:
        """Return the sessions relaying now: client, user, database, duration, bytes."""
        now = time.monotonic()
        return [
            SessionInfo(s.peer, s.user, s.database, now - s.started, s.bytes_in, s.bytes_out)
            for s in list(self._open)
            if s.established
        ]

    def __repr__(self) -> str:
        state = "running" if self._listeners else "stopped"
        return (
            f"<Proxy {state} {self.host}:{self.port} -> "
            f"{self._target.endpoint.host}:{self._target.endpoint.port}>"
        )

    # --- lifecycle on the caller's loop ---

    async def astart(self) -> None:
        """Start listening on the running event loop; return once connections are accepted.

        Does nothing if already started.

        Raises:
            OSError: The address cannot be listened on (port busy...).
            iampg.ConfigurationError: The client TLS files, or the upstream's root certificate
                file, cannot be used (or ``sslrootcert=system`` without ``verify-full``).
        """
        with self._state_lock:
            if self._listeners:
                return
            loop = asyncio.get_running_loop()
            self._server_tls = self._make_server_tls()
            upstream = Upstream(self._target, self._streams)  # its TLS settings checked here
            try:
                listener = _listen(self._listen_host, self._requested_port)
                bound = listener.getsockname()
                self._port = int(bound[1])
                self._listeners = [listener]
                if self._unix_dir is not None:
                    path = self._unix_dir / f".s.PGSQL.{self._port}"
                    self._listeners.append(_listen_unix(path))
                    self._unix_path = path
            except BaseException:
                for sock in self._listeners:
                    sock.close()
                self._listeners = []
                self._remove_files()
                raise
            self._address = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(bound[0], bound[0])  # noqa: S104
            self._loop = loop
            self._hurry = asyncio.Event()
            self._upstream = upstream
            self._accept_tasks = [
                loop.create_task(self._accept_loop(sock, unix=sock.family == socket.AF_UNIX))
                for sock in self._listeners
            ]
        event_loop = "asyncio" if isinstance(loop, asyncio.BaseEventLoop) else type(loop).__module__
        logger.info(
            "proxy listening on %s port %d for %s:%d (event loop: %s)",
            self._address,
            self._port,
            self._target.endpoint.host,
            self._target.endpoint.port,
            event_loop,
            extra={
                "iampg_proxy": {
                    "event": "proxy listening",
                    "address": self._address,
                    "port": self._port,
                    "unix_socket": None if self._unix_path is None else str(self._unix_path),
                    "upstream_host": self._target.endpoint.host,
                    "upstream_port": self._target.endpoint.port,
                    "event_loop": event_loop,
                }
            },
        )

    async def astop(self) -> None:
        """Stop accepting, let open sessions run for ``grace`` seconds, then close them.

        Idempotent.
        """
        with self._state_lock:
            listeners, accepting = self._listeners, self._accept_tasks
            self._listeners, self._accept_tasks = [], []
        if not listeners:
            return
        for task in accepting:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for sock in listeners:
            sock.close()
        if self._unix_path is not None:
            with contextlib.suppress(OSError):
                self._unix_path.unlink()
        pending = set(self._tasks)
        if pending and self._grace > 0:
            open_now = await self._sessions_still_open()
            if open_now:
                logger.info(
                    "proxy stopping on port %d: %d %s may finish within %g s",
                    self._port,
                    open_now,
                    "session" if open_now == 1 else "sessions",
                    self._grace,
                    extra={
                        "iampg_proxy": {
                            "event": "proxy stopping",
                            "port": self._port,
                            "sessions": open_now,
                            "grace": self._grace,
                        }
                    },
                )
            hurry = asyncio.ensure_future(self._hurry.wait())
            finished = asyncio.ensure_future(asyncio.wait(pending))
            try:
                await asyncio.wait(
                    {finished, hurry}, timeout=self._grace, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                hurry.cancel()
                finished.cancel()
            pending = {task for task in pending if not task.done()}
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=CLOSE_TIMEOUT)
        await self._drop_streams()
        self._remove_files()
        port, self._port = self._port, 0
        self._loop = None
        logger.info(
            "proxy stopped on port %d",
            port,
            extra={"iampg_proxy": {"event": "proxy stopped", "port": port}},
        )

    async def _sessions_still_open(self) -> int:
        """Return how many sessions relay on, once closes already under way are seen."""
        for _ in range(5):  # a few turns of the loop: a client's EOF that arrived is processed
            await asyncio.sleep(0)
        return sum(
            1
            for session in list(self._open)
            if session.established
            and not any(
                stream is not None and stream.closed.done()
                for stream in (session.client, session.upstream)
            )
        )

    def close_sessions_now(self) -> None:
        """End a :meth:`astop` grace period now (call on the proxy's loop): close the sessions.

        ``iampg proxy`` calls it on a second SIGINT or SIGTERM.
        """
        self._hurry.set()

    async def _drop_streams(self) -> None:
        await abort_all(self._streams)

    def _remove_files(self) -> None:
        tmpdir, self._tmpdir, self._ca_file = self._tmpdir, None, None
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
        self._unix_path = None

    def _make_server_tls(self) -> ssl.SSLContext | None:
        option = self._client_tls
        if option is None:
            return None
        if isinstance(option, ssl.SSLContext):
            return option
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols([ALPN_PROTOCOL])
        if option == "generate":
            try:
                from iampg.emulator._tls import make_certificates  # noqa: PLC0415
            except ImportError:
                raise ConfigurationError(
                    "generating a certificate needs the cryptography package: "
                    "pip install 'iampg[emulator]', or give a certificate and key"
                ) from None
            tmpdir = Path(tempfile.mkdtemp(prefix="iampg-proxy-"))
            names = [n for n in (self._listen_host, socket.gethostname()) if n]
            try:
                # a local listener: clients may dial it as localhost or its address
                files = make_certificates(names, tmpdir, loopback=True, organization="iampg proxy")
            except BaseException:
                shutil.rmtree(tmpdir, ignore_errors=True)
                raise
            self._tmpdir, self._ca_file = tmpdir, files.ca_file
            self._cert_names = frozenset(
                name.lower() for name in (*names, "localhost", "127.0.0.1", "::1")
            )
            context.load_cert_chain(files.cert_file, files.key_file)
            return context
        cert, key = option
        try:
            context.load_cert_chain(os.fspath(cert), os.fspath(key))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(
                f"cannot use the client TLS certificate and key: {exc}"
            ) from None
        return context

    # --- lifecycle in a background thread ---

    def start(self) -> None:
        """Start the proxy on its own event loop in a daemon thread.

        Returns once it accepts connections; does nothing if already started.
        """
        with self._state_lock:
            if self._thread is not None or self._listeners:
                return
        self._start_thread()

    def stop(self) -> None:
        """Stop the proxy started by :meth:`start` (after the grace period) and join it.

        Idempotent.
        """
        self._stop_thread()

    # --- serving ---

    async def _accept_loop(self, listener: socket.socket, *, unix: bool) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                await readable(loop, listener)
                continue
            except OSError as exc:
                logger.warning("proxy cannot accept a connection: %s", exc)
                await asyncio.sleep(0.1)
                continue
            sock.setblocking(False)  # noqa: FBT003
            if unix:
                peer, loopback = "unix", True
            else:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                peer = _peer_text(address)
                loopback = is_loopback(str(address[0]))
            if self._pending >= _MAX_PENDING:
                logger.warning("proxy turns away %s: too many connections logging in", peer)
                sock.close()
                continue
            session = _Session(sock, peer, loopback, time.monotonic(), unix=unix)
            self._pending += 1
            task = loop.create_task(self._serve(session))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(session.close_socket)

    async def _serve(self, session: _Session) -> None:
        try:
            try:
                await self._serve_or_explain(session)
            except asyncio.CancelledError:
                if session.established or not session.outcome:
                    session.outcome = "shutdown"
                self._close(session, abort=True)
                raise
            self._close(session, abort=False)
            if session.sock is not None and session.client is None:
                await drain_and_shutdown(session.sock, 1.0)
            for stream in (session.client, session.upstream):
                if stream is not None:
                    await stream.wait_closed(CLOSE_TIMEOUT)
        finally:
            self._finish(session)

    async def _serve_or_explain(self, session: _Session) -> None:
        """Serve a client connection; record (and for a protocol error, send) why it ended."""
        try:
            await self._serve_steps(session)
        except PeerGoneError:
            session.outcome = session.outcome or "client gone"
        except ProtocolViolationError as exc:
            session.outcome = "protocol error"
            logger.debug("protocol violation from %s: %s", session.peer, exc.message)
            await self._send_error(session, error_response(exc.sqlstate, exc.message))
        except asyncio.TimeoutError:
            session.outcome = "client timeout"
        except (OSError, ValueError) as exc:
            session.outcome = session.outcome or "failed"
            logger.debug("connection from %s failed: %r", session.peer, exc)
        except Exception:
            session.outcome = "failed"
            logger.warning("proxy session from %s failed", session.peer, exc_info=True)

    async def _serve_steps(self, session: _Session) -> None:
        pending = True
        try:
            startup = await self._client_startup(session)
            if startup is None:
                return
            self._pending -= 1
            pending = False
            await self._session(session, startup)
        finally:
            if pending:
                self._pending -= 1

    async def _send_error(self, session: _Session, error: bytes) -> None:
        if session.client is not None:
            session.client.write(error)
        elif session.sock is not None:
            loop = asyncio.get_running_loop()
            with contextlib.suppress(OSError):
                await loop.sock_sendall(session.sock, error)

    def _close(self, session: _Session, *, abort: bool) -> None:
        for stream in (session.client, session.upstream):
            if stream is not None:
                stream.abort() if abort else stream.close()
        if session.key is not None:
            self._keys.pop(session.key, None)
            session.key = None

    def _finish(self, session: _Session) -> None:
        """Count a client connection's end and log its line (once)."""
        with self._state_lock:
            if session in self._open:
                self._open.discard(session)
                if session.established:  # its bytes move from the live sessions to the totals
                    self._counters.bytes_in += session.bytes_in
                    self._counters.bytes_out += session.bytes_out
        if session.outcome in {"cancel", "logged"}:
            return
        duration = time.monotonic() - session.started
        if session.established:
            self._counters.closed += 1
        elif session.outcome:
            self._counters.failed += 1
        else:
            session.outcome = "logged"
            return  # a connection that said nothing (a port scan, a probe)
        fields: dict[str, Any] = {
            "event": "session closed",
            "client": session.peer,
            "user": session.user,
            "database": session.database,
            "duration": round(duration, 3),
            "bytes_from_client": session.bytes_in,
            "bytes_to_client": session.bytes_out,
            "outcome": session.outcome or "closed",
        }
        session.outcome = "logged"
        logger.info(
            "session closed client=%s user=%s database=%s duration=%.3fs "
            "bytes_from_client=%d bytes_to_client=%d outcome=%s",
            fields["client"],
            _printable(session.user),
            _printable(session.database),
            duration,
            fields["bytes_from_client"],
            fields["bytes_to_client"],
            fields["outcome"],
            extra={"iampg_proxy": fields},
        )

    async def _client_startup(self, session: _Session) -> tuple[bytes, dict[str, str]] | None:
        """Negotiate TLS, read the startup packet, check it and the password, in time."""
        return await asyncio.wait_for(self._negotiate(session), _AUTH_TIMEOUT)

    async def _negotiate(self, session: _Session) -> tuple[bytes, dict[str, str]] | None:
        assert session.sock is not None
        loop = asyncio.get_running_loop()
        raw = RawChannel(loop, session.sock)
        first = await raw.peek_first_byte()
        if first is None:
            return None
        if first == TLS_HANDSHAKE_BYTE and self._server_tls is not None:
            require_alpn(await self._start_tls(session))
        packet = await read_startup(
            raw,
            lambda: session.client,
            lambda: self._start_tls(session),
            lambda packet: self._forward_cancel(session, packet),
            tls=self._server_tls is not None,
        )
        if packet is None:
            return None
        if session.client is None:  # plaintext: relay through a stream all the same
            stream = Stream(loop, self._streams)
            sock, session.sock = session.sock, None
            await loop.connect_accepted_socket(lambda: stream, sock)
            session.client = stream
            encrypted = False
        else:
            encrypted = True
        params = startup_parameters(packet)
        user = params.get("user", "")
        if not user:
            raise ProtocolViolationError(
                "28000", "no PostgreSQL user name specified in startup packet"
            )
        session.user, session.database = user, params.get("database") or user
        refusal = self._check_startup(session, params, encrypted=encrypted)
        if refusal is not None:
            session.outcome = "refused"
            session.client.write(refusal)
            return None
        if self._verifier is not None and not await self._authenticate(session, session.client):
            session.outcome = "refused"
            return None
        return packet, params

    def _check_startup(
        self, session: _Session, params: dict[str, str], *, encrypted: bool
    ) -> bytes | None:
        """Return the error for a startup the proxy refuses, else None."""
        replication = params.get("replication")
        if replication is not None and replication.lower() not in _NO_REPLICATION:
            return error_response(
                "0A000",
                "iampg proxy: replication connections are not supported; "
                "connect to the database directly for replication",
            )
        if not encrypted and not session.loopback:
            return error_response(
                "28000",
                "iampg proxy: connections from other machines must use TLS "
                "(sslmode=require, verify-ca or verify-full)",
            )
        if not encrypted and not session.unix and self._server_tls is not None:
            return error_response(
                "28000",
                "iampg proxy: this proxy requires TLS on TCP connections, loopback included "
                "(sslmode=require, verify-ca or verify-full)",
            )
        expected = self._target.endpoint.user
        if session.user != expected:
            return error_response(
                "28000",
                f'iampg proxy: this proxy logs in as user "{expected}" only, not "{session.user}"',
            )
        return None

    async def _start_tls(self, session: _Session) -> Stream:
        assert session.sock is not None
        assert self._server_tls is not None
        stream = Stream(asyncio.get_running_loop(), self._streams)
        sock, session.sock = session.sock, None
        await accept_tls(sock, stream, self._server_tls, _TLS_TIMEOUT)
        session.client = stream
        return stream

    async def _authenticate(self, session: _Session, client: Stream) -> bool:
        """Run SCRAM-SHA-256 with the client; send the error and return False if it fails."""
        assert self._verifier is not None
        client.write(
            pack_message(
                b"R", struct.pack("!I", AUTH_SASL) + ScramServer.MECHANISM.encode() + b"\0\0"
            )
        )
        kind, body = await read_message(client, MAX_AUTH_MESSAGE)
        if kind != b"p":
            raise ProtocolViolationError(
                "08P01", f"expected SASL response, got message type {kind[0]}"
            )
        mechanism, _, rest = body.partition(b"\0")
        if mechanism != ScramServer.MECHANISM.encode() or len(rest) < 4:  # noqa: PLR2004
            raise ProtocolViolationError(
                "08P01", "client selected an invalid SASL authentication mechanism"
            )
        server = ScramServer(self._verifier)
        try:
            first = server.server_first(rest[4:])
        except ScramError as exc:
            raise ProtocolViolationError("08P01", str(exc)) from None
        client.write(pack_message(b"R", struct.pack("!I", AUTH_SASL_CONTINUE) + first))
        kind, body = await read_message(client, MAX_AUTH_MESSAGE)
        if kind != b"p":
            raise ProtocolViolationError(
                "08P01", f"expected SASL response, got message type {kind[0]}"
            )
        try:
            final = server.server_final(body)
        except ScramError as exc:
            if str(exc) != "wrong password":
                raise ProtocolViolationError("08P01", str(exc)) from None
            logger.info("proxy refused %s: wrong password for user %s", session.peer, session.user)
            client.write(
                error_response("28P01", f'password authentication failed for user "{session.user}"')
            )
            return False
        client.write(pack_message(b"R", struct.pack("!I", AUTH_SASL_FINAL) + final))
        return True

    async def _session(self, session: _Session, startup: tuple[bytes, dict[str, str]]) -> None:
        packet, _ = startup
        client = session.client
        assert client is not None
        assert self._upstream is not None
        result = await self._upstream.login(packet, session.user)
        if isinstance(result, Refusal):
            session.outcome = result.outcome
            client.write(error_message(result.fields))
            return
        self._relay(session, client, result)
        upstream = result.stream
        done, _ = await asyncio.wait(
            {client.closed, upstream.closed}, return_when=asyncio.FIRST_COMPLETED
        )
        session.outcome = "client closed" if client.closed in done else "server closed"

    def _relay(self, session: _Session, client: Stream, login: Login) -> None:
        upstream = login.stream
        session.upstream = upstream
        sent = 0
        for kind, body in login.messages:
            if kind == b"K":
                body = self._issue_key(session, body)  # noqa: PLW2901
            message = pack_message(kind, body)
            sent += len(message)
            client.write(message)
        session.greeting = sent
        session.established = True
        with self._state_lock:
            self._open.add(session)
        self._counters.opened += 1
        logger.info(
            "session opened client=%s user=%s database=%s",
            session.peer,
            _printable(session.user),
            _printable(session.database),
            extra={
                "iampg_proxy": {
                    "event": "session opened",
                    "client": session.peer,
                    "user": session.user,
                    "database": session.database,
                }
            },
        )
        upstream.pipe_to(client)
        client.pipe_to(upstream)

    def _issue_key(self, session: _Session, upstream_key: bytes) -> bytes:
        """Return the client's own BackendKeyData body for the upstream one; remember both."""
        pid, secret = upstream_key[:4], upstream_key[4:]
        while True:
            key = pid + secrets.token_bytes(max(len(secret), 4))
            if key not in self._keys:
                break
        self._keys[key] = upstream_key
        session.key = key
        return key

    async def _forward_cancel(self, session: _Session, packet: bytes) -> None:
        session.outcome = "cancel"
        if not MIN_CANCEL_PACKET <= len(packet) <= MAX_CANCEL_PACKET:
            raise ProtocolViolationError("08P01", "invalid length of cancel request")
        upstream_key = self._keys.get(packet[8:])
        if upstream_key is None:
            self._counters.cancels_ignored += 1
            logger.debug("cancel request from %s matches no session: ignored", session.peer)
            return
        assert self._upstream is not None
        try:
            stream = await asyncio.wait_for(self._upstream.open(), _TLS_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as exc:
            logger.warning("proxy cannot forward a cancel request: %s", exc)
            return
        stream.write(struct.pack("!II", 8 + len(upstream_key), CANCEL_REQUEST) + upstream_key)
        stream.close()
        await stream.wait_closed(CLOSE_TIMEOUT)
        self._counters.cancels_forwarded += 1
        logger.debug("cancel request from %s forwarded", session.peer)


def _printable(text: str) -> str:
    """Return a client-given name for a text log line: no line breaks or control characters."""
    if text.isprintable() and " " not in text:
        return text
    return repr(text)


def _peer_text(address: Any) -> str:
    host, port = str(address[0]), address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def beyond_loopback(listen_host: str) -> bool:
    """Tell whether listening on ``listen_host`` accepts connections from other machines.

    A name that does not resolve counts as reaching beyond (listening on it fails anyway).
    """
    return _beyond_loopback(listen_host, unresolved=True)


def _listen(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV
    )
    family = infos[0][0]
    sock = socket.create_server((host, port), family=family, backlog=512)
    sock.setblocking(False)  # noqa: FBT003
    return sock


def _listen_unix(path: Path) -> socket.socket:
    if not path.parent.is_dir():
        raise ConfigurationError(f"the Unix socket directory {path.parent} does not exist")
    with contextlib.suppress(FileNotFoundError):
        if path.is_socket():
            path.unlink()  # left by a proxy that did not stop cleanly
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(path))
        sock.listen(512)
        sock.setblocking(False)  # noqa: FBT003
    except BaseException:
        sock.close()
        raise
    return sock
