"""The proxy's upstream side: TLS as iampg's defaults say, a fresh token per login, retries."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import ssl
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from iampg import _refresh
from iampg._connecting import libpq_root_file
from iampg._diagnose import authentication_error, certificate_advice, failure_kind, transient_reason
from iampg._wire.login import BackendAuthError, BackendLogin
from iampg._wire.protocol import (
    AUTH_OK,
    MAX_BACKEND_AUTH_MESSAGE,
    SSL_REQUEST,
    PeerGoneError,
    ProtocolViolationError,
    error_fields,
    read_message,
)
from iampg._wire.streams import Stream, connect_tls
from iampg.errors import ConfigurationError, TokenError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from iampg._connecting import Target

logger = logging.getLogger("iampg.proxy")

_TLS_TIMEOUT: Final = 10.0
_PLAINTEXT_MODES: Final = frozenset({"disable", "allow", "prefer"})
_VERIFYING: Final = frozenset({"verify-ca", "verify-full"})


@dataclass
class Login:
    """An upstream session logged in: the stream and what the server said until ReadyForQuery.

    ``messages`` are ``(kind, body)`` pairs to relay to the client in order (the
    AuthenticationOk, ParameterStatus, BackendKeyData, notices, ReadyForQuery).
    """

    stream: Stream
    messages: list[tuple[bytes, bytes]] = field(default_factory=list)


@dataclass
class Refusal:
    """Why no upstream session: the ErrorResponse fields to send the client."""

    fields: dict[str, str]
    outcome: str  # "refused" (the server said no) or "failed" (it could not be reached...)


def tls_context(params: Mapping[str, str]) -> ssl.SSLContext | None:
    """Return the TLS context the libpq parameters ask for; None for ``sslmode=disable``.

    As libpq: ``verify-full`` checks the chain and the host name, ``verify-ca`` the chain;
    under a weaker mode the chain is checked all the same wherever libpq's root certificate
    file exists (``sslrootcert``, else ``PGSSLROOTCERT``, else ``~/.postgresql/root.crt``),
    so that the proxy never sends a token where libpq would have refused the server.

    Raises:
        ConfigurationError: The root file cannot be read, or ``sslrootcert=system`` is given
            with a mode weaker than ``verify-full`` (which libpq 16 and later refuse).
    """
    sslmode = params.get("sslmode") or "prefer"
    if sslmode == "disable":
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    root = libpq_root_file(params)
    if root.path == "system":
        if sslmode != "verify-full":
            raise ConfigurationError(
                f'sslrootcert=system needs sslmode=verify-full, not "{sslmode}" '
                "(as libpq 16 and later): use sslmode=verify-full"
            )
        context.load_default_certs()
    elif sslmode in _VERIFYING or os.path.exists(root.path):  # noqa: PTH110 -- libpq's stat()
        try:
            if os.path.exists(root.path):  # noqa: PTH110
                context.load_verify_locations(cafile=root.path)
            else:  # verify-ca/verify-full without a file: the system's store, as before
                context.load_default_certs()
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(
                f"cannot load the root certificates in {root.path} ({root.source}): {exc}"
            ) from None
    else:
        return _with_client_cert(context, params)  # encrypted, nothing to verify against
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = sslmode == "verify-full"
    return _with_client_cert(context, params)


def _with_client_cert(context: ssl.SSLContext, params: Mapping[str, str]) -> ssl.SSLContext:
    if params.get("sslcert"):
        context.load_cert_chain(params["sslcert"], params.get("sslkey") or None)
    return context


class Upstream:
    """Opens upstream sessions to one endpoint, each logging in with a token of the provider."""

    def __init__(self, target: Target, live: set[Stream]) -> None:
        self._target = target
        self._endpoint = target.endpoint
        self._params = target.params
        self._sslmode = target.params.get("sslmode") or "prefer"
        self._context = tls_context(target.params)
        self._live = live
        timeout = str(target.params.get("connect_timeout") or "")
        try:
            seconds = float(timeout)
        except ValueError:
            seconds = 0.0
        self._connect_timeout = seconds if seconds > 0 else float(target.defaults.connect_timeout)

    @property
    def where(self) -> str:
        """``host:port`` of the endpoint (no secret)."""
        return f"{self._endpoint.host}:{self._endpoint.port}"

    async def open(self) -> Stream:
        """Connect to the endpoint and set up TLS (SNI always); return the stream.

        Raises:
            OSError: The endpoint cannot be reached, or TLS failed (``ssl.SSLError``).
            ConnectionError: The server refused TLS where the sslmode requires it.
        """
        loop = asyncio.get_running_loop()
        sock = await self._dial(loop)
        try:
            stream = Stream(loop, self._live)
            if self._context is not None:
                await loop.sock_sendall(sock, struct.pack("!II", 8, SSL_REQUEST))
                answer = await loop.sock_recv(sock, 1)
                if answer == b"S":
                    await connect_tls(
                        sock, stream, self._context, self._endpoint.host, _TLS_TIMEOUT
                    )
                    return stream
                if answer != b"N" or self._sslmode not in _PLAINTEXT_MODES:
                    _refuse_plaintext()
            await loop.create_connection(lambda: stream, sock=sock)
        except BaseException:
            sock.close()
            raise
        return stream

    async def _dial(self, loop: asyncio.AbstractEventLoop) -> socket.socket:
        # Python's resolver, in a thread, on every loop (asyncio's loop.getaddrinfo does the
        # same): uvloop's own would go around what the process set up in socket.getaddrinfo.
        resolve = functools.partial(
            socket.getaddrinfo, self._endpoint.dialled, self._endpoint.port, type=socket.SOCK_STREAM
        )
        infos = await loop.run_in_executor(None, resolve)
        last: OSError = OSError(f"cannot resolve {self._endpoint.dialled}")
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)  # noqa: FBT003
            try:
                await loop.sock_connect(sock, address)
            except OSError as exc:
                sock.close()
                last = exc
                continue
            except BaseException:
                sock.close()
                raise
            if family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        raise last

    async def login(self, packet: bytes, user: str) -> Login | Refusal:
        """Log in as the client asked (``packet``), retrying as the preset says.

        A refused token is forgotten and the login retried once with a new one; a service
        waking up or rate-limiting connections (or, for Aurora Serverless, not answering
        while it resumes) is retried until the preset's wait is over.
        """
        defaults = self._target.defaults
        loop = asyncio.get_running_loop()
        refused = False
        failures = 0
        deadline: float | None = None
        while True:
            result, timed_out = await self._try_once(packet, user)
            if isinstance(result, Login):
                return result
            message = result.fields.get("M", "")
            kind = failure_kind(Exception(message)) if result.outcome == "refused" else None
            if kind == "token" and not refused:
                refused = True
                logger.info("token refused by %s; retrying once with a new token", self.where)
                continue
            if kind is not None:
                explanation = str(authentication_error(Exception(message), self._endpoint, kind))
                causes = explanation.partition("\n")[2]
                result.fields = _with_detail(result.fields, f"iampg proxy: {causes}")
                return result
            transient = (
                transient_reason(Exception(message)) if result.outcome == "refused" else None
            )
            retry = transient is not None or (timed_out and defaults.retry_timeouts)
            if not retry or defaults.wait <= 0:
                return result
            now = loop.time()
            if deadline is None:
                deadline = now + defaults.wait
                logger.info(
                    "%s is not accepting connections yet (%s); retrying for up to %g s",
                    self.where,
                    transient or "no answer",
                    defaults.wait,
                )
            if now >= deadline:
                return result
            failures += 1
            await asyncio.sleep(min(_refresh.backoff(failures, base=0.5, cap=5.0), deadline - now))

    async def _try_once(self, packet: bytes, user: str) -> tuple[Login | Refusal, bool]:
        """Log in once with the provider's token; return the result and whether it timed out.

        A token the server refused is forgotten (the provider signs a new one next time).
        """
        provider = self._target.provider
        try:
            token = await provider.atoken()
        except TokenError as exc:
            logger.warning("iampg proxy cannot sign a token for %s: %s", self.where, exc)
            message = f"iampg proxy: cannot sign a token for {self.where}: {exc}"
            return Refusal(_fatal("08006", message), "failed"), False
        try:
            result = await asyncio.wait_for(
                self._attempt(packet, user, token), self._connect_timeout
            )
        except asyncio.TimeoutError:
            reason = f"no answer within {self._connect_timeout:g} s"
            return Refusal(_unreachable(self.where, reason), "failed"), True
        except ssl.SSLCertVerificationError as exc:
            advice = certificate_advice(self._endpoint, self._params.get("sslrootcert"))
            message = f"iampg proxy: {exc.verify_message or exc}"
            return Refusal(_fatal("08006", message, detail=advice), "failed"), False
        except (OSError, PeerGoneError, ProtocolViolationError) as exc:
            return Refusal(_unreachable(self.where, _describe(exc)), "failed"), False
        if (
            isinstance(result, Refusal)
            and result.outcome == "refused"
            and failure_kind(Exception(result.fields.get("M", ""))) == "token"
        ):
            provider.invalidate(token)
        return result, False

    async def _attempt(self, packet: bytes, user: str, token: str) -> Login | Refusal:
        stream: Stream | None = None
        try:
            stream = await self.open()
            result = await self._authenticate(stream, packet, user, token)
        except BaseException:
            if stream is not None:
                stream.abort()
            raise
        if isinstance(result, Refusal):
            stream.abort()
        return result

    async def _authenticate(
        self, stream: Stream, packet: bytes, user: str, token: str
    ) -> Login | Refusal:
        stream.write(packet)
        answers = BackendLogin(
            user, token, who="iampg proxy", missing="the server asks for no password"
        )
        login = Login(stream)
        authenticated = False
        while True:
            kind, body = await read_message(stream, MAX_BACKEND_AUTH_MESSAGE)
            if kind == b"E":
                return Refusal(error_fields(body), "refused")
            if kind == b"R" and not authenticated:
                if len(body) < 4:  # noqa: PLR2004
                    raise ProtocolViolationError("08P01", "invalid authentication request")
                (code,) = struct.unpack("!I", body[:4])
                if code == AUTH_OK:
                    authenticated = True
                    login.messages.append((kind, body))
                    continue
                try:
                    reply = answers.answer(code, body[4:])
                except BackendAuthError as exc:
                    return Refusal(_fatal(exc.sqlstate, exc.message), "failed")
                if reply is not None:
                    stream.write(reply)
                continue
            if kind in (b"v", b"N") or (authenticated and kind in (b"S", b"K")):
                login.messages.append((kind, body))
                continue
            if authenticated and kind == b"Z":
                login.messages.append((kind, body))
                return login
            raise ProtocolViolationError("08P01", f"unexpected message {kind!r} during login")


def _refuse_plaintext() -> None:
    raise ConnectionError("the server does not support TLS")


def _fatal(sqlstate: str, message: str, *, detail: str | None = None) -> dict[str, str]:
    fields = {"S": "FATAL", "V": "FATAL", "C": sqlstate, "M": message}
    if detail:
        fields["D"] = detail
    return fields


def _unreachable(where: str, reason: str) -> dict[str, str]:
    return _fatal("08006", f"iampg proxy: cannot connect to {where}: {reason}")


def _with_detail(fields: dict[str, str], extra: str) -> dict[str, str]:
    """Return ``fields`` with ``extra`` added to the DETAIL, before the fields that follow."""
    detail = fields.get("D")
    merged = f"{detail}\n{extra}" if detail else extra
    result: dict[str, str] = {}
    for code, value in fields.items():
        if code == "D":
            continue
        result[code] = value
        if code == "M":
            result["D"] = merged
    result.setdefault("D", merged)
    return result


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ProtocolViolationError):
        return f"protocol error: {exc.message}"
    if isinstance(exc, PeerGoneError):
        return "the server closed the connection during login"
    return str(exc) or type(exc).__name__
