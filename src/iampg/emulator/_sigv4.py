"""SigV4 presigned-URL tokens: verification as the services do it, and signing for tests."""

from __future__ import annotations

import calendar
import hashlib
import hmac
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final
from urllib.parse import quote, unquote

from iampg._signer import DSQL_MAX_LIFETIME, RDS_TOKEN_LIFETIME

if TYPE_CHECKING:
    from ._clock import EmulatorClock
    from ._credentials import CredentialLookup, Credentials

__all__ = [
    "ALGORITHM",
    "TokenRules",
    "TokenVerificationError",
    "VerifiedToken",
    "parse_amz_date",
    "presign",
    "token_parameters",
    "verify_token",
]

ALGORITHM: Final = "AWS4-HMAC-SHA256"
#: SHA-256 of the empty payload: presigned connect tokens sign no body.
EMPTY_SHA256: Final = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
#: How far in the future a token may be dated (clock skew AWS tolerates), in seconds.
MAX_CLOCK_SKEW: Final = 300.0
RDS_MAX_EXPIRES: Final = int(RDS_TOKEN_LIFETIME)
DSQL_MAX_EXPIRES: Final = int(DSQL_MAX_LIFETIME)

# Reasons a token is refused: written to the event log and the DEBUG log, never to clients.
MALFORMED: Final = "malformed token"
WRONG_ALGORITHM: Final = "wrong algorithm"
WRONG_SIGNED_HEADERS: Final = "wrong signed headers"
WRONG_SCOPE: Final = "wrong credential scope"
WRONG_REGION: Final = "wrong region"
WRONG_SERVICE: Final = "wrong service"
UNKNOWN_KEY: Final = "unknown access key"
MISSING_SESSION_TOKEN: Final = "missing session token"  # noqa: S105
UNEXPECTED_SESSION_TOKEN: Final = "unexpected session token"  # noqa: S105
WRONG_SESSION_TOKEN: Final = "wrong session token"  # noqa: S105
CREDENTIALS_EXPIRED: Final = "credentials expired"
WRONG_HOST: Final = "wrong host"
WRONG_PORT: Final = "wrong port"
WRONG_ACTION: Final = "wrong action"
WRONG_USER: Final = "wrong user"
INVALID_EXPIRES: Final = "invalid expiry"
TOKEN_EXPIRED: Final = "token expired"  # noqa: S105
NOT_YET_VALID: Final = "token not yet valid"
SIGNATURE_MISMATCH: Final = "signature mismatch"

_SAFE: Final = "-_.~"
_DATE_RE: Final = re.compile(r"\d{8}T\d{6}Z")
_SIGNATURE_RE: Final = re.compile(r"[0-9a-f]{64}")
_REQUIRED: Final = (
    "Action",
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
)


class TokenVerificationError(Exception):
    """A token was refused; ``reason`` says why in a few words and never quotes the token."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class TokenRules:
    """What a service requires of the tokens it accepts.

    Attributes:
        service: The SigV4 signing service (``rds-db`` or ``dsql``).
        region: The region the credential scope must name.
        hostnames: Accepted host names, lower-case.
        port: The port the token's host part must carry, or ``None`` when it must carry none
            (DSQL signs the bare host name).
        max_expires: The largest ``X-Amz-Expires`` accepted, in seconds.
        user_parameter: The query parameter naming the database user (``DBUser``), or
            ``None`` when the token names none.
    """

    service: str
    region: str
    hostnames: frozenset[str]
    port: int | None
    max_expires: int
    user_parameter: str | None

    @classmethod
    def rds(cls, *, region: str, hostnames: frozenset[str] | set[str], port: int) -> TokenRules:
        """Return the rules of RDS, Aurora and RDS Proxy (``rds-db``, ``Action=connect``)."""
        return cls(
            service="rds-db",
            region=region,
            hostnames=frozenset(h.lower() for h in hostnames),
            port=port,
            max_expires=RDS_MAX_EXPIRES,
            user_parameter="DBUser",
        )

    @classmethod
    def dsql(cls, *, region: str, hostnames: frozenset[str] | set[str]) -> TokenRules:
        """Return the rules of Aurora DSQL (``dsql``, ``DbConnect``/``DbConnectAdmin``)."""
        return cls(
            service="dsql",
            region=region,
            hostnames=frozenset(h.lower() for h in hostnames),
            port=None,
            max_expires=DSQL_MAX_EXPIRES,
            user_parameter=None,
        )


@dataclass(frozen=True)
class VerifiedToken:
    """What an accepted token says.

    Attributes:
        access_key_id: The key that signed it.
        signed_at: ``X-Amz-Date``, in wall-clock epoch seconds.
        expires: ``X-Amz-Expires``, in seconds.
        action: The ``Action`` parameter.
        principal: The IAM principal of the signing key (:attr:`Credentials.principal`).
    """

    access_key_id: str
    signed_at: float
    expires: int
    action: str
    principal: str | None = None


def _encode(value: str) -> str:
    return quote(value, safe=_SAFE)


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def signing_key(secret_access_key: str, date: str, region: str, service: str) -> bytes:
    """Derive the SigV4 signing key for one day, region and service."""
    k_date = _hmac(f"AWS4{secret_access_key}".encode(), date)
    k_region = _hmac(k_date, region)
    k_service = _hmac(k_region, service)
    return _hmac(k_service, "aws4_request")


def _canonical_host(host: str, port: int | None, *, as_given: bool = False) -> str:
    # botocore signs urlsplit(url).hostname (lower-case) and drops https' default port; the
    # JavaScript SDK's signers sign the host header as given, upper-case letters included.
    host = host if as_given else host.lower()
    if ":" in host:
        host = f"[{host}]"
    return host if port is None or port == 443 else f"{host}:{port}"  # noqa: PLR2004


def _signature(
    *,
    params: list[tuple[str, str]],
    canonical_host: str,
    amz_date: str,
    scope: str,
    secret_access_key: str,
    region: str,
    service: str,
) -> str:
    query = "&".join(f"{k}={v}" for k, v in sorted((_encode(k), _encode(v)) for k, v in params))
    canonical_request = "\n".join(
        ("GET", "/", query, f"host:{canonical_host}", "", "host", EMPTY_SHA256)
    )
    string_to_sign = "\n".join(
        (ALGORITHM, amz_date, scope, hashlib.sha256(canonical_request.encode()).hexdigest())
    )
    key = signing_key(secret_access_key, amz_date[:8], region, service)
    return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


def _split_authority(authority: str) -> tuple[str, int | None]:
    if authority.startswith("["):
        host, sep, rest = authority[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise TokenVerificationError(MALFORMED)
        port_text = rest[1:] if rest else None
    elif ":" in authority:
        host, _, port_text = authority.rpartition(":")
    else:
        host, port_text = authority, None
    if not host:
        raise TokenVerificationError(MALFORMED)
    if port_text is None:
        return host, None
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:  # noqa: PLR2004
        raise TokenVerificationError(MALFORMED)
    return host, int(port_text)


def _parse(token: str) -> tuple[str, int | None, list[tuple[str, str]]]:
    authority, sep, query = token.partition("/?")
    if not sep or not authority or "/" in authority or not query:
        raise TokenVerificationError(MALFORMED)
    host, port = _split_authority(authority)
    params: list[tuple[str, str]] = []
    seen: set[str] = set()
    for pair in query.split("&"):
        key, eq, value = pair.partition("=")
        key, value = unquote(key), unquote(value)
        if not eq or not key or key in seen:
            raise TokenVerificationError(MALFORMED)
        seen.add(key)
        params.append((key, value))
    return host, port, params


def _check_shape(params: dict[str, str], rules: TokenRules) -> float:
    """Check the fixed parameters; return ``X-Amz-Date`` in epoch seconds."""
    required = _REQUIRED if rules.user_parameter is None else (*_REQUIRED, rules.user_parameter)
    if any(name not in params for name in required):
        raise TokenVerificationError(MALFORMED)
    if params["X-Amz-Algorithm"] != ALGORITHM:
        raise TokenVerificationError(WRONG_ALGORITHM)
    if params["X-Amz-SignedHeaders"] != "host":
        raise TokenVerificationError(WRONG_SIGNED_HEADERS)
    amz_date = params["X-Amz-Date"]
    if not _DATE_RE.fullmatch(amz_date):
        raise TokenVerificationError(MALFORMED)
    try:
        return float(calendar.timegm(time.strptime(amz_date, "%Y%m%dT%H%M%SZ")))
    except ValueError:
        raise TokenVerificationError(MALFORMED) from None


def _check_scope(params: dict[str, str], rules: TokenRules) -> tuple[str, str]:
    """Check the credential scope; return the access key id and the scope without it."""
    parts = params["X-Amz-Credential"].split("/")
    if len(parts) != 5:  # noqa: PLR2004
        raise TokenVerificationError(WRONG_SCOPE)
    key_id, date, region, service, terminator = parts
    if date != params["X-Amz-Date"][:8] or terminator != "aws4_request":
        raise TokenVerificationError(WRONG_SCOPE)
    if region != rules.region:
        raise TokenVerificationError(WRONG_REGION)
    if service != rules.service:
        raise TokenVerificationError(WRONG_SERVICE)
    return key_id, "/".join(parts[1:])


def _check_key(
    params: dict[str, str],
    key_id: str,
    credentials: Mapping[str, Credentials] | CredentialLookup,
    clock: EmulatorClock,
) -> Credentials:
    """Find the signing key; check its session token and expiry."""
    if isinstance(credentials, Mapping):
        creds = credentials.get(key_id)
    else:
        creds = credentials.lookup(key_id)
    if creds is None:
        raise TokenVerificationError(UNKNOWN_KEY)
    session_token = params.get("X-Amz-Security-Token")
    if creds.session_token is None:
        if session_token is not None:
            raise TokenVerificationError(UNEXPECTED_SESSION_TOKEN)
    elif session_token is None:
        raise TokenVerificationError(MISSING_SESSION_TOKEN)
    elif not hmac.compare_digest(session_token.encode(), creds.session_token.encode()):
        raise TokenVerificationError(WRONG_SESSION_TOKEN)
    if creds.expiration is not None and clock.now() >= creds.expiration:
        raise TokenVerificationError(CREDENTIALS_EXPIRED)
    return creds


def _check_target(
    params: dict[str, str],
    rules: TokenRules,
    *,
    host: str,
    port: int | None,
    action: str,
    user: str,
) -> None:
    """Check that the token is for this host, port, action and user."""
    if host.lower() not in rules.hostnames:
        raise TokenVerificationError(WRONG_HOST)
    if port != rules.port:
        raise TokenVerificationError(WRONG_PORT)
    if params["Action"] != action:
        raise TokenVerificationError(WRONG_ACTION)
    if rules.user_parameter is not None and params[rules.user_parameter] != user:
        raise TokenVerificationError(WRONG_USER)


def _check_time(
    params: dict[str, str], rules: TokenRules, clock: EmulatorClock, signed_at: float
) -> int:
    """Check ``X-Amz-Expires`` and the token's age; return ``X-Amz-Expires``."""
    text = params["X-Amz-Expires"]
    if not (text.isascii() and text.isdigit()) or len(text) > 9:  # noqa: PLR2004
        raise TokenVerificationError(INVALID_EXPIRES)
    expires = int(text)
    if not 1 <= expires <= rules.max_expires:
        raise TokenVerificationError(INVALID_EXPIRES)
    age = clock.token_age(signed_at)
    if age > expires:
        raise TokenVerificationError(TOKEN_EXPIRED)
    if age < -MAX_CLOCK_SKEW:
        raise TokenVerificationError(NOT_YET_VALID)
    return expires


def verify_token(
    token: str,
    *,
    rules: TokenRules,
    action: str,
    user: str,
    credentials: Mapping[str, Credentials] | CredentialLookup,
    clock: EmulatorClock,
) -> VerifiedToken:
    """Check a presigned-URL token the way the service does.

    The checks run in this order, the first failure giving the reason: shape and algorithm,
    credential scope (date, region, service), access key and session token, credential
    expiry, host and port, action, user, ``X-Amz-Expires`` and age, and last the signature.

    Host names compare case-insensitively. A token whose host has upper-case letters is
    accepted when signed over the lower-case host (botocore, the AWS CLI) or over the host
    as written in the token (the JavaScript SDK's ``@aws-sdk/rds-signer`` and
    ``@aws-sdk/dsql-signer`` keep the case they were given): both forms are tried, as
    neither is refused by the services as far as users report (unconfirmed).

    Args:
        token: The password the client sent.
        rules: The service's requirements (signing service, region, host names, port).
        action: The ``Action`` the token must carry (``connect``, ``DbConnect``...).
        user: The user of the startup message, which the token must name when
            ``rules.user_parameter`` is set.
        credentials: Known access keys, by access key id, or a store to look them up in
            (:class:`CredentialStore`), consulted for every token.
        clock: The emulator's clock, for token age and credential expiry.

    Returns:
        What the token says, once every check passed.

    Raises:
        TokenVerificationError: The token is refused; ``reason`` names the first failed check.
    """
    host, port, pairs = _parse(token)
    params = dict(pairs)
    signed_at = _check_shape(params, rules)
    key_id, scope = _check_scope(params, rules)
    creds = _check_key(params, key_id, credentials, clock)
    _check_target(params, rules, host=host, port=port, action=action, user=user)
    expires = _check_time(params, rules, clock, signed_at)
    signature = params["X-Amz-Signature"]
    if not _SIGNATURE_RE.fullmatch(signature):
        raise TokenVerificationError(SIGNATURE_MISMATCH)
    forms = (False, True) if host != host.lower() else (False,)
    matched = False
    for as_given in forms:
        expected = _signature(
            params=[(k, v) for k, v in pairs if k != "X-Amz-Signature"],
            canonical_host=_canonical_host(host, port, as_given=as_given),
            amz_date=params["X-Amz-Date"],
            scope=scope,
            secret_access_key=creds.secret_access_key,
            region=rules.region,
            service=rules.service,
        )
        matched = hmac.compare_digest(signature, expected) or matched
    if not matched:
        raise TokenVerificationError(SIGNATURE_MISMATCH)
    return VerifiedToken(
        access_key_id=key_id,
        signed_at=signed_at,
        expires=expires,
        action=params["Action"],
        principal=creds.principal,
    )


def presign(
    *,
    host: str,
    port: int | None,
    credentials: Credentials,
    region: str,
    signed_at: float,
    service: str = "rds-db",
    action: str = "connect",
    user: str | None = None,
    user_parameter: str = "DBUser",
    expires: int = RDS_MAX_EXPIRES,
    host_as_given: bool = False,
) -> str:
    """Sign a token the way botocore's ``generate_db_auth_token`` does.

    The emulator's own signer, for tests that need tokens botocore cannot make (a chosen
    ``X-Amz-Date``, another service or action). The result is a bearer credential: do not
    log it.

    Args:
        host: The host name to sign.
        port: The port of the token's host part, or ``None`` for none (DSQL).
        credentials: The key to sign with.
        region: The region of the credential scope.
        signed_at: ``X-Amz-Date``, in wall-clock epoch seconds.
        service: The signing service.
        action: The ``Action`` parameter.
        user: The database user, sent as ``user_parameter``; ``None`` sends none.
        user_parameter: The query parameter naming the user.
        expires: ``X-Amz-Expires``, in seconds.
        host_as_given: Sign the host name as given, upper-case letters included, as the
            JavaScript SDK's signers do (botocore signs it lower-cased).

    Returns:
        The token: ``host[:port]/?Action=...&X-Amz-Signature=...``.
    """
    amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(signed_at))
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    params = [("Action", action)]
    if user is not None:
        params.append((user_parameter, user))
    params += [
        ("X-Amz-Algorithm", ALGORITHM),
        ("X-Amz-Credential", f"{credentials.access_key_id}/{scope}"),
        ("X-Amz-Date", amz_date),
        ("X-Amz-Expires", str(expires)),
        ("X-Amz-SignedHeaders", "host"),
    ]
    if credentials.session_token is not None:
        params.append(("X-Amz-Security-Token", credentials.session_token))
    signature = _signature(
        params=params,
        canonical_host=_canonical_host(host, port, as_given=host_as_given),
        amz_date=amz_date,
        scope=scope,
        secret_access_key=credentials.secret_access_key,
        region=region,
        service=service,
    )
    params.append(("X-Amz-Signature", signature))
    authority = f"[{host}]" if ":" in host else host
    if port is not None:
        authority = f"{authority}:{port}"
    return authority + "/?" + "&".join(f"{_encode(k)}={_encode(v)}" for k, v in params)


#: Token parameters that carry no secret, safe to read back into hints and events.
_PUBLIC_PARAMETERS: Final = frozenset({"Action", "X-Amz-Date", "X-Amz-Expires"})


def token_parameters(token: str) -> dict[str, str]:
    """Return a token's ``Action``, ``X-Amz-Date`` and ``X-Amz-Expires`` (those present).

    Never returns the signature, credential or session token. A malformed token gives
    what could be read, possibly nothing.
    """
    try:
        _, _, pairs = _parse(token)
    except TokenVerificationError:
        return {}
    return {k: v for k, v in pairs if k in _PUBLIC_PARAMETERS}


def parse_amz_date(text: str) -> float | None:
    """Return an ``X-Amz-Date`` (``YYYYMMDDTHHMMSSZ``) in epoch seconds, or None if invalid."""
    if not _DATE_RE.fullmatch(text):
        return None
    try:
        return float(calendar.timegm(time.strptime(text, "%Y%m%dT%H%M%SZ")))
    except ValueError:
        return None
