"""A loopback server handing out rotating temporary AWS credentials: ECS container and STS."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import socket
import string
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import parse_qs, quote, urlsplit
from xml.sax.saxutils import escape

from iampg.errors import ConfigurationError

from ._clock import EmulatorClock
from ._credentials import Credentials, CredentialStore
from ._sigv4 import signing_key

if TYPE_CHECKING:
    from collections.abc import Mapping
    from types import TracebackType

    from typing_extensions import Self

    from ._gateway import Emulator

__all__ = ["AssumeRoleCall", "CredentialsServer", "CredentialsServerStats", "Fault"]

logger = logging.getLogger("iampg.emulator.credentials")

Fault = Literal["error", "hang", "expired"]
"""What an injected fault does to a credentials request: ``error`` answers HTTP 500,
``hang`` waits ``hang_seconds`` and closes the connection without an answer, ``expired``
hands out credentials that expired a minute ago."""

_FAULTS: Final = ("error", "hang", "expired")
_KEY_ALPHABET: Final = string.ascii_uppercase + "234567"
_SECRET_ALPHABET: Final = string.ascii_letters + string.digits + "+/"
_MAX_BODY: Final = 64 * 1024
_REQUEST_TIMEOUT: Final = 10.0  # seconds a client may take to send its request
_MAX_HANG: Final = 300.0
_EXPIRED_AGO: Final = 60.0  # emulated seconds an ``expired`` fault's credentials are past
_MAX_SIGNATURE_AGE: Final = 900.0  # real seconds, as STS allows
_ROLE_DURATION: Final = (900, 43_200)
_STS_NAMESPACE: Final = "https://sts.amazonaws.com/doc/2011-06-15/"
_AUTH_RE: Final = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/,\s]+)/(?P<scope>[^,\s]+),\s*"
    r"SignedHeaders=(?P<headers>[^,\s]+),\s*Signature=(?P<signature>[0-9a-f]{64})"
)
_ROLE_ARN_RE: Final = re.compile(
    r"arn:aws[\w-]*:iam::(?P<account>\d{12}):role/(?:.+/)?(?P<name>.+)"
)
#: The role the container endpoint's keys belong to unless told otherwise.
DEFAULT_TASK_ROLE: Final = "arn:aws:iam::123456789012:role/iampg-emulator-task"
_TASK_SESSION: Final = "iampg-emulator-task"


def assumed_role_arn(role_arn: str, session_name: str) -> str:
    """Return the principal of a session of ``role_arn`` (STS's ``AssumedRoleUser`` ARN)."""
    match = _ROLE_ARN_RE.fullmatch(role_arn)
    if match is None:
        return role_arn
    partition = role_arn.split(":", 2)[1]
    return f"arn:{partition}:sts::{match['account']}:assumed-role/{match['name']}/{session_name}"


@dataclass(frozen=True)
class AssumeRoleCall:
    """One ``AssumeRole`` request the server answered, for assertions in tests.

    Attributes:
        role_arn: The requested ``RoleArn``.
        role_session_name: The requested ``RoleSessionName``.
        external_id: The ``ExternalId`` sent, or ``None``.
        duration_seconds: The requested ``DurationSeconds`` (3600 when not sent), in emulated
            seconds.
        source_access_key_id: The access key the request was signed with.
        access_key_id: The access key id issued, or ``None`` when refused.
        error: The STS error code of a refusal (``AccessDenied``...), or ``None``.
    """

    role_arn: str
    role_session_name: str
    external_id: str | None
    duration_seconds: int
    source_access_key_id: str
    access_key_id: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class CredentialsServerStats:
    """What a :class:`CredentialsServer` has done so far.

    Attributes:
        requests: HTTP requests received (every path and outcome).
        issued: Credentials handed out, by the container endpoint and by ``AssumeRole``
            (a key served again within its rotation period counts again).
        refused: Requests refused: bad authorization token, unknown path, refused
            ``AssumeRole``, connections over the limit.
        faults: Requests answered with an injected fault.
        assume_role_calls: ``AssumeRole`` requests, answered or refused.
    """

    requests: int
    issued: int
    refused: int
    faults: int
    assume_role_calls: int


class _StsError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class CredentialsServer:
    """A loopback HTTP server that hands out temporary AWS credentials, as machines get them.

    It speaks the ECS container-credentials protocol: botocore's default chain fetches
    credentials from it when ``AWS_CONTAINER_CREDENTIALS_FULL_URI`` and
    ``AWS_CONTAINER_AUTHORIZATION_TOKEN`` are set (see :meth:`env`; static keys in
    ``AWS_ACCESS_KEY_ID`` come first in the chain, so unset them). It also answers STS
    ``AssumeRole`` (give botocore's ``sts`` client ``endpoint_url=server.url``), checking the
    request's SigV4 signature against the store.

    Every key it issues is added to ``store`` with its expiry on ``clock``: give the same
    store and clock to the :class:`Emulator` (``Emulator(dsn, credentials=store, clock=...)``,
    or use :meth:`for_emulator`) and the gateway accepts tokens signed with the keys until
    they expire, then refuses them (event reason ``credentials expired``).

    Time: ``lifetime`` and ``DurationSeconds`` are emulated seconds on ``clock``. The
    ``Expiration`` botocore reads is real wall time (botocore judges expiry by the real
    clock): issue time plus the remaining emulated lifetime divided by the clock's time
    scale. :meth:`EmulatorClock.advance` ages the keys in the store but not what botocore
    already holds.

    Generated access key ids are 20 characters, start with ``ASIA`` and contain ``EXAMPLE``.
    The server runs in a background thread (:meth:`start`/:meth:`stop`, or ``with``),
    serves at most ``max_connections`` requests at once and refuses the others.

    Args:
        store: Where issued keys go, and where ``AssumeRole`` looks up the keys that sign
            its requests; a new store knowing :data:`FAKE_CREDENTIALS` when ``None``.
        clock: The emulator's clock (expiry and rotation); a new real-time one when ``None``.
        lifetime: Emulated seconds each container credential lasts (default one hour).
        rotation: ``None`` (default) for fresh keys at every request; otherwise the emulated
            seconds during which the same key is handed out again, at most ``lifetime``.
        path: The URL path of the container-credentials endpoint.
        auth_token: The authorization token clients must send; a random one when ``None``.
        external_ids: Role ARN to the ``ExternalId`` its trust policy requires; any other
            role accepts any external id.
        role_arn: The role the container endpoint's keys are a session of: they carry the
            principal ``arn:aws:sts::<account>:assumed-role/<role>/iampg-emulator-task``
            (``AssumeRole`` keys carry the requested role's), so the role's policies
            (:attr:`Emulator.policies`) apply to them.
        hang_seconds: How long a ``hang`` fault holds a request, in real seconds (<= 300).
        max_connections: Requests served at once; more are refused.
        host: The loopback address to listen on.
        port: The port to listen on; ``0`` picks a free one.

    Raises:
        iampg.ConfigurationError: An argument is invalid.
    """

    def __init__(
        self,
        store: CredentialStore | None = None,
        *,
        clock: EmulatorClock | None = None,
        lifetime: float = 3600.0,
        rotation: float | None = None,
        path: str = "/iampg/credentials",
        auth_token: str | None = None,
        external_ids: Mapping[str, str] | None = None,
        role_arn: str = DEFAULT_TASK_ROLE,
        hang_seconds: float = 5.0,
        max_connections: int = 16,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if not (math.isfinite(lifetime) and lifetime > 0):
            raise ConfigurationError(
                f"lifetime must be a positive number of seconds, not {lifetime!r}"
            )
        if rotation is not None and not (math.isfinite(rotation) and 0 < rotation <= lifetime):
            raise ConfigurationError(
                f"rotation must be None (fresh keys every time) or from 0 to lifetime "
                f"({lifetime:g} s), not {rotation!r}"
            )
        if _ROLE_ARN_RE.fullmatch(role_arn) is None:
            raise ConfigurationError(f"role_arn is not a role ARN: {role_arn!r}")
        if not path.startswith("/") or path == "/":
            raise ConfigurationError(f"path must start with '/' and name a resource, not {path!r}")
        if auth_token is not None and (not auth_token or any(c in auth_token for c in "\r\n")):
            raise ConfigurationError("auth_token must be a non-empty header value")
        if not (math.isfinite(hang_seconds) and 0 < hang_seconds <= _MAX_HANG):
            raise ConfigurationError(
                f"hang_seconds must be from 0 to {_MAX_HANG:g} seconds, not {hang_seconds!r}"
            )
        if max_connections < 1:
            raise ConfigurationError(f"max_connections must be 1 or more, not {max_connections}")
        if not 0 <= port <= 65535:  # noqa: PLR2004
            raise ConfigurationError(f"port must be between 0 and 65535, not {port}")
        self._store = store if store is not None else CredentialStore()
        self._clock = clock if clock is not None else EmulatorClock()
        self._lifetime = float(lifetime)
        self._rotation = None if rotation is None else float(rotation)
        self._path = path
        self._auth_token = auth_token or secrets.token_urlsafe(24)
        self._external_ids = dict(external_ids or {})
        self._task_principal = assumed_role_arn(role_arn, _TASK_SESSION)
        self._hang_seconds = float(hang_seconds)
        self._max_connections = max_connections
        self._host = host
        self._requested_port = port
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        # Counters and records, under _lock.
        self._requests = 0
        self._issued_count = 0
        self._refused = 0
        self._fault_count = 0
        self._issued: list[Credentials] = []
        self._role_calls: list[AssumeRoleCall] = []
        self._fault: Fault | None = None
        self._fault_remaining: int | None = None
        self._current: Credentials | None = None  # the key of the current rotation period
        self._period = -1
        self._epoch = self._clock.now()

    @classmethod
    def for_emulator(cls, emulator: Emulator, **options: Any) -> CredentialsServer:
        """Return a server issuing keys into ``emulator``'s store, on its clock.

        Args:
            emulator: An emulator made with ``credentials=`` a :class:`CredentialStore`
                (or with a sequence of keys, from which it made one).
            **options: Any other constructor argument.

        Raises:
            iampg.ConfigurationError: The emulator's store cannot take new keys.
        """
        store = emulator.credential_store
        if not isinstance(store, CredentialStore):
            raise ConfigurationError(
                "the emulator's credential store is not a CredentialStore: "
                "make the emulator with credentials=CredentialStore(...)"
            )
        return cls(store, clock=emulator.clock, **options)

    # --- properties ---

    @property
    def store(self) -> CredentialStore:
        """Where issued keys go."""
        return self._store

    @property
    def clock(self) -> EmulatorClock:
        """The clock that expiry and rotation follow."""
        return self._clock

    @property
    def lifetime(self) -> float:
        """Emulated seconds each container credential lasts."""
        return self._lifetime

    @property
    def port(self) -> int:
        """The bound port once started, else the requested one."""
        server = self._server
        return int(server.server_address[1]) if server is not None else self._requested_port

    @property
    def url(self) -> str:
        """The server's base URL (``http://127.0.0.1:<port>``): the STS ``endpoint_url``.

        Raises:
            RuntimeError: The server is not running.
        """
        if self._server is None:
            raise RuntimeError("the credentials server is not running: start it first")
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    @property
    def credentials_url(self) -> str:
        """The container-credentials URL, for ``AWS_CONTAINER_CREDENTIALS_FULL_URI``."""
        return self.url + self._path

    @property
    def issued(self) -> list[Credentials]:
        """Every credential handed out so far, oldest first (secrets masked in reprs)."""
        with self._lock:
            return list(self._issued)

    @property
    def assume_role_calls(self) -> list[AssumeRoleCall]:
        """Every ``AssumeRole`` request so far, answered or refused, oldest first."""
        with self._lock:
            return list(self._role_calls)

    def env(self) -> dict[str, str]:
        """Return the environment variables that point botocore's default chain here.

        They hold the authorization token: treat them as a secret. Static keys
        (``AWS_ACCESS_KEY_ID``...) take precedence in botocore's chain: unset those.
        """
        return {
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": self.credentials_url,
            "AWS_CONTAINER_AUTHORIZATION_TOKEN": self._auth_token,
        }

    def stats(self) -> CredentialsServerStats:
        """Return the server's counters."""
        with self._lock:
            return CredentialsServerStats(
                requests=self._requests,
                issued=self._issued_count,
                refused=self._refused,
                faults=self._fault_count,
                assume_role_calls=len(self._role_calls),
            )

    # --- faults ---

    def inject(self, fault: Fault, *, count: int | None = None) -> None:
        """Make credential requests (container and ``AssumeRole``) fail this way.

        Args:
            fault: ``error``, ``hang`` or ``expired``; see :data:`Fault`.
            count: How many requests get it; ``None`` for every request until
                :meth:`clear_faults`.

        Raises:
            iampg.ConfigurationError: An unknown fault or a count below 1.
        """
        if fault not in _FAULTS:
            raise ConfigurationError(f"fault must be one of {', '.join(_FAULTS)}, not {fault!r}")
        if count is not None and count < 1:
            raise ConfigurationError(f"count must be 1 or more (or None), not {count}")
        with self._lock:
            self._fault, self._fault_remaining = fault, count

    def clear_faults(self) -> None:
        """Serve requests normally again."""
        with self._lock:
            self._fault, self._fault_remaining = None, None

    def _take_fault(self) -> Fault | None:
        with self._lock:
            fault = self._fault
            if fault is None:
                return None
            self._fault_count += 1
            if self._fault_remaining is not None:
                self._fault_remaining -= 1
                if self._fault_remaining <= 0:
                    self._fault, self._fault_remaining = None, None
            return fault

    # --- lifecycle ---

    def start(self) -> None:
        """Start serving in a background thread; does nothing if already started."""
        with self._lock:
            if self._server is not None:
                return
            self._stopping.clear()
            server = _HttpServer((self._host, self._requested_port), self)
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name="iampg-credentials-server",
                daemon=True,
            )
            self._server, self._thread = server, thread
        thread.start()
        logger.info("credentials server listening on %s port %d", self._host, self.port)

    def stop(self) -> None:
        """Stop serving, end hanging requests and join every thread. Idempotent."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()  # joins the request threads
        if thread is not None:
            thread.join()
        logger.info("credentials server stopped")

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

    def __repr__(self) -> str:
        state = "running" if self._server is not None else "stopped"
        return (
            f"<CredentialsServer {state} port={self.port} lifetime={self._lifetime:g} "
            f"rotation={self._rotation!r}>"
        )

    # --- issuing ---

    def _new_key(self, expiration: float, principal: str | None = None) -> Credentials:
        suffix = "".join(secrets.choice(_KEY_ALPHABET) for _ in range(9))
        secret = "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(40))
        token = "IQoJb3JpZ2luX2VjEXAMPLE" + secrets.token_urlsafe(96)
        creds = Credentials(
            f"ASIAEXAMPLE{suffix}",
            secret,
            token,
            expiration,
            principal=principal or self._task_principal,
        )
        self._store.add(creds)
        return creds

    def _real_expiration(self, creds: Credentials) -> dt.datetime:
        """The wall-clock time botocore should see for ``creds``' emulated expiry."""
        assert creds.expiration is not None
        remaining = (creds.expiration - self._clock.now()) / self._clock.time_scale
        return dt.datetime.fromtimestamp(time.time() + remaining, dt.timezone.utc)

    def _issue(self, *, expired: bool) -> Credentials:
        now = self._clock.now()
        with self._lock:
            if expired:
                creds = self._new_key(now - _EXPIRED_AGO)
            elif self._rotation is None:
                creds = self._new_key(now + self._lifetime)
            else:
                period = math.floor((now - self._epoch) / self._rotation)
                if self._current is None or period != self._period:
                    self._current = self._new_key(now + self._lifetime)
                    self._period = period
                creds = self._current
            self._issued.append(creds)
            self._issued_count += 1
        return creds

    def _issue_role(self, call: AssumeRoleCall) -> Credentials:
        creds = self._new_key(
            self._clock.now() + call.duration_seconds,
            assumed_role_arn(call.role_arn, call.role_session_name),
        )
        with self._lock:
            self._issued.append(creds)
            self._issued_count += 1
            self._role_calls.append(_replace(call, access_key_id=creds.access_key_id))
        return creds

    def _count_request(self) -> None:
        with self._lock:
            self._requests += 1

    def _count_refusal(self, call: AssumeRoleCall | None = None) -> None:
        with self._lock:
            self._refused += 1
            if call is not None:
                self._role_calls.append(call)

    # --- request handling (called from the server's threads) ---

    def _hang(self) -> None:
        self._stopping.wait(self._hang_seconds)

    def _container(self, handler: _Handler) -> None:
        sent = handler.headers.get("Authorization", "")
        if not hmac.compare_digest(sent.encode(), self._auth_token.encode()):
            self._count_refusal()
            logger.debug("container credentials refused: wrong or missing authorization token")
            handler.reply_json(
                401, {"code": "Unauthorized", "message": "wrong or missing authorization token"}
            )
            return
        fault = self._take_fault()
        if fault == "error":
            handler.reply_json(500, {"code": "InternalError", "message": "injected fault"})
            return
        if fault == "hang":
            self._hang()
            handler.close_connection = True
            return
        creds = self._issue(expired=fault == "expired")
        logger.debug("container credentials issued: %s", creds.access_key_id)
        handler.reply_json(
            200,
            {
                "AccessKeyId": creds.access_key_id,
                "SecretAccessKey": creds.secret_access_key,
                "Token": creds.session_token,
                "Expiration": _iso(self._real_expiration(creds)),
            },
        )

    def _sts(self, handler: _Handler, body: bytes) -> None:
        request_id = str(uuid.uuid4())
        try:
            form = {
                k: v[0] for k, v in parse_qs(body.decode("utf-8"), keep_blank_values=True).items()
            }
        except UnicodeDecodeError:
            form = {}
        if form.get("Action") != "AssumeRole":
            self._count_refusal()
            handler.reply_xml(
                400,
                _sts_error(
                    "InvalidAction",
                    f"could not find operation {form.get('Action', '')!r} for version 2011-06-15",
                    request_id,
                ),
            )
            return
        call = AssumeRoleCall(
            role_arn=form.get("RoleArn", ""),
            role_session_name=form.get("RoleSessionName", ""),
            external_id=form.get("ExternalId"),
            duration_seconds=_int(form.get("DurationSeconds", "3600")),
            source_access_key_id=_signing_key_id(handler.headers.get("Authorization", "")),
        )
        try:
            self._check_signature(handler, body)
            self._check_role(call)
        except _StsError as exc:
            logger.debug("AssumeRole %s refused: %s", call.role_arn, exc.code)
            self._count_refusal(_replace(call, error=exc.code))
            handler.reply_xml(exc.status, _sts_error(exc.code, exc.message, request_id))
            return
        fault = self._take_fault()
        if fault == "error":
            with self._lock:
                self._role_calls.append(_replace(call, error="InternalFailure"))
            handler.reply_xml(500, _sts_error("InternalFailure", "injected fault", request_id))
            return
        if fault == "hang":
            self._hang()
            handler.close_connection = True
            return
        if fault == "expired":
            call = _replace(call, duration_seconds=-int(_EXPIRED_AGO))
        creds = self._issue_role(call)
        logger.debug("AssumeRole %s issued %s", call.role_arn, creds.access_key_id)
        handler.reply_xml(200, self._assume_role_response(call, creds, request_id))

    def _check_signature(self, handler: _Handler, body: bytes) -> str:
        """Verify the request's SigV4 header signature; return its access key id."""
        match = _AUTH_RE.fullmatch(handler.headers.get("Authorization", "").strip())
        if match is None:
            raise _StsError(
                403, "MissingAuthenticationToken", "Request is missing Authentication Token"
            )
        key_id = match["key"]
        creds = self._store.lookup(key_id)
        if creds is None:
            raise _StsError(
                403,
                "InvalidClientTokenId",
                "The security token included in the request is invalid.",
            )
        sent_token = handler.headers.get("X-Amz-Security-Token")
        if (creds.session_token is None) != (sent_token is None) or (
            creds.session_token is not None
            and sent_token is not None
            and not hmac.compare_digest(creds.session_token.encode(), sent_token.encode())
        ):
            raise _StsError(
                403,
                "InvalidClientTokenId",
                "The security token included in the request is invalid.",
            )
        if creds.expiration is not None and self._clock.now() >= creds.expiration:
            raise _StsError(
                400, "ExpiredToken", "The security token included in the request is expired"
            )
        amz_date = handler.headers.get("X-Amz-Date", "")
        scope = match["scope"].split("/")
        try:
            signed_at = dt.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(
                tzinfo=dt.timezone.utc
            )
        except ValueError:
            signed_at = None
        if (
            signed_at is None
            or len(scope) != 4  # noqa: PLR2004
            or scope[0] != amz_date[:8]
            or scope[2] != "sts"
            or scope[3] != "aws4_request"
        ):
            raise _StsError(403, "IncompleteSignature", "The request signature is malformed.")
        if abs(time.time() - signed_at.timestamp()) > _MAX_SIGNATURE_AGE:
            raise _StsError(403, "SignatureDoesNotMatch", "Signature expired")
        expected = _header_signature(
            method=handler.command,
            target=handler.path,
            headers=handler.headers,
            signed_headers=match["headers"],
            body=body,
            amz_date=amz_date,
            scope="/".join(scope),
            key=signing_key(creds.secret_access_key, scope[0], scope[1], "sts"),
        )
        if expected is None or not hmac.compare_digest(expected, match["signature"]):
            raise _StsError(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided.",
            )
        return key_id

    def _check_role(self, call: AssumeRoleCall) -> None:
        if _ROLE_ARN_RE.fullmatch(call.role_arn) is None:
            raise _StsError(400, "ValidationError", f"{call.role_arn!r} is not a valid role ARN")
        if not re.fullmatch(r"[\w+=,.@-]{2,64}", call.role_session_name):
            raise _StsError(400, "ValidationError", "RoleSessionName is not valid")
        low, high = _ROLE_DURATION
        if not low <= call.duration_seconds <= high:
            raise _StsError(
                400,
                "ValidationError",
                f"DurationSeconds must be from {low} to {high}, not {call.duration_seconds}",
            )
        required = self._external_ids.get(call.role_arn)
        sent = call.external_id
        if required is not None and (
            sent is None or not hmac.compare_digest(required.encode(), sent.encode())
        ):
            raise _StsError(
                403,
                "AccessDenied",
                f"User: {call.source_access_key_id} is not authorized to perform: "
                f"sts:AssumeRole on resource: {call.role_arn}",
            )

    def _assume_role_response(
        self, call: AssumeRoleCall, creds: Credentials, request_id: str
    ) -> str:
        role_id = "AROAEXAMPLE" + hashlib.sha256(call.role_arn.encode()).hexdigest()[:10].upper()
        assumed_arn = assumed_role_arn(call.role_arn, call.role_session_name)
        values = {
            "AccessKeyId": creds.access_key_id,
            "SecretAccessKey": creds.secret_access_key,
            "SessionToken": creds.session_token or "",
            "Expiration": _iso(self._real_expiration(creds)),
        }
        credentials = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in values.items())
        return (
            f'<AssumeRoleResponse xmlns="{_STS_NAMESPACE}">'
            "<AssumeRoleResult>"
            f"<Credentials>{credentials}</Credentials>"
            "<AssumedRoleUser>"
            f"<Arn>{escape(assumed_arn)}</Arn>"
            f"<AssumedRoleId>{role_id}:{escape(call.role_session_name)}</AssumedRoleId>"
            "</AssumedRoleUser>"
            "</AssumeRoleResult>"
            f"<ResponseMetadata><RequestId>{request_id}</RequestId></ResponseMetadata>"
            "</AssumeRoleResponse>"
        )


def _replace(call: AssumeRoleCall, **changes: Any) -> AssumeRoleCall:
    fields = {**call.__dict__, **changes}
    return AssumeRoleCall(**fields)


def _signing_key_id(authorization: str) -> str:
    match = _AUTH_RE.fullmatch(authorization.strip())
    return match["key"] if match is not None else ""


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return -1


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sts_error(code: str, message: str, request_id: str) -> str:
    kind = "Receiver" if code == "InternalFailure" else "Sender"
    return (
        f'<ErrorResponse xmlns="{_STS_NAMESPACE}">'
        f"<Error><Type>{kind}</Type><Code>{code}</Code><Message>{escape(message)}</Message>"
        f"</Error><RequestId>{request_id}</RequestId></ErrorResponse>"
    )


def _uri_encode(value: str, *, path: bool = False) -> str:
    return quote(value, safe="-_.~/" if path else "-_.~")


def _header_signature(
    *,
    method: str,
    target: str,
    headers: Any,
    signed_headers: str,
    body: bytes,
    amz_date: str,
    scope: str,
    key: bytes,
) -> str | None:
    """Compute the SigV4 signature of a header-signed request; None if a header is missing."""
    parts = urlsplit(target)
    pairs = sorted(
        (_uri_encode(k), _uri_encode(v))
        for k, values in parse_qs(parts.query, keep_blank_values=True).items()
        for v in values
    )
    names = signed_headers.split(";")
    lines = []
    for name in names:
        values = headers.get_all(name)
        if not values:
            return None
        lines.append(f"{name}:{','.join(' '.join(v.split()) for v in values)}\n")
    canonical = "\n".join(
        [
            method,
            _uri_encode(parts.path or "/", path=True),
            "&".join(f"{k}={v}" for k, v in pairs),
            "".join(lines),
            signed_headers,
            hashlib.sha256(body).hexdigest(),
        ]
    )
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


class _HttpServer(ThreadingHTTPServer):
    """The HTTP server: one thread per request, at most ``max_connections`` at once."""

    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], owner: CredentialsServer) -> None:
        self.owner = owner
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._slots = threading.BoundedSemaphore(owner._max_connections)  # noqa: SLF001
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.owner._count_request()  # noqa: SLF001
            self.owner._count_refusal()  # noqa: SLF001
            logger.debug("credentials server busy: connection refused")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        del request
        logger.debug("credentials server request from %s failed", client_address, exc_info=True)  # noqa: LOG014 -- called from the except clause in socketserver


class _Handler(BaseHTTPRequestHandler):
    """One HTTP request: the container endpoint (GET) or STS (POST /)."""

    server: _HttpServer
    timeout = _REQUEST_TIMEOUT
    server_version = "iampg-credentials"
    sys_version = ""

    def do_GET(self) -> None:
        owner = self.server.owner
        owner._count_request()  # noqa: SLF001
        if urlsplit(self.path).path != owner._path:  # noqa: SLF001
            owner._count_refusal()  # noqa: SLF001
            self.reply_json(404, {"code": "NotFound", "message": "no such resource"})
            return
        owner._container(self)  # noqa: SLF001

    def do_POST(self) -> None:
        owner = self.server.owner
        owner._count_request()  # noqa: SLF001
        length_text = self.headers.get("Content-Length", "")
        if not length_text.isdigit() or int(length_text) > _MAX_BODY:
            owner._count_refusal()  # noqa: SLF001
            self.reply_xml(400, _sts_error("InvalidRequest", "bad Content-Length", "0"))
            return
        body = self.rfile.read(int(length_text))
        if urlsplit(self.path).path != "/":
            owner._count_refusal()  # noqa: SLF001
            self.reply_xml(404, _sts_error("NotFound", "no such resource", "0"))
            return
        owner._sts(self, body)  # noqa: SLF001

    def reply_json(self, status: int, payload: Mapping[str, object]) -> None:
        self._reply(status, "application/json", json.dumps(payload).encode())

    def reply_xml(self, status: int, text: str) -> None:
        self._reply(status, "text/xml", text.encode())

    def _reply(self, status: int, content_type: str, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        logger.debug("credentials server: " + format, *args)  # noqa: G003
