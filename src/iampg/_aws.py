"""The only module that imports botocore: credential sources and the token signer."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import weakref
from typing import Any, NamedTuple

from iampg._endpoint import Endpoint
from iampg._options import option, options
from iampg._signer import RDS_TOKEN_LIFETIME, SignedToken, dsql_action
from iampg.errors import ConfigurationError

__all__ = ["RDS_TOKEN_LIFETIME", "AwsSigner", "CredentialsInfo", "describe_signing_error"]

_ROLE_DURATION = (900, 43200)  # STS AssumeRole DurationSeconds bounds

_logger = logging.getLogger("iampg.aws")


class _DropSigningDetails(logging.Filter):
    """Drop botocore's DEBUG records that carry a token's parts.

    botocore logs the canonical request (with any session token), the string to sign and the
    signature of every request it signs. For an IAM token, the canonical request and the
    signature together are the token: a bearer credential must not reach debug logs.
    """

    _SECRET_MESSAGES = frozenset({"CanonicalRequest:\n%s", "StringToSign:\n%s", "Signature:\n%s"})

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in self._SECRET_MESSAGES


def _redact_botocore_signing_logs() -> None:
    auth = logging.getLogger("botocore.auth")
    if not any(isinstance(f, _DropSigningDetails) for f in auth.filters):
        auth.addFilter(_DropSigningDetails())
        _logger.debug("botocore.auth debug records with signing details are dropped")


# botocore's name for where credentials came from, and what it means to a reader.
_SOURCES = {
    "env": "environment variables (AWS_ACCESS_KEY_ID)",
    "shared-credentials-file": "shared credentials file",
    "config-file": "AWS config file",
    "sso": "IAM Identity Center (SSO)",
    "container-role": "container credentials (ECS/EKS)",
    "iam-role": "EC2 instance role",
    "assume-role": "assumed role",
    "assume-role-with-web-identity": "web identity (EKS IRSA)",
    "custom-process": "credential_process",
    "explicit": "explicit keys",
}
_SHOWN_KEY = 4  # characters of an access key id shown: its last four
_SHORT_KEY = 8  # an access key id this short is not shown at all


class CredentialsInfo(NamedTuple):
    """What signs, without any secret: from :meth:`AwsSigner.describe_credentials`.

    Attributes:
        method: botocore's name for the source (``env``, ``sso``, ``assume-role`` ...).
        source: The same, in words (``assumed role``, ``IAM Identity Center (SSO)`` ...).
        temporary: Whether the keys carry a session token (they expire).
        key_suffix: The last four characters of the access key id, or ``""`` for a key too
            short to show any of it.
        expires_in: Seconds until the credentials expire, or ``None`` when botocore does not
            refresh them.
    """

    method: str
    source: str
    temporary: bool
    key_suffix: str
    expires_in: float | None


_shared: weakref.WeakValueDictionary[tuple[object, ...], AwsSigner] = weakref.WeakValueDictionary()
_shared_lock = threading.Lock()


class AwsSigner:
    """Sign IAM tokens with botocore: one credential source, resolved once, for every token.

    The credentials are resolved on first use and reused for every later token; botocore's
    SigV4 query signer signs each one (~0.1 ms, with no network call unless temporary
    credentials need refreshing). No RDS or DSQL client is made: a client loads its service
    model, which costs as much as importing botocore, and a token needs none of it.

    botocore logs the parts of each signature at DEBUG, which for an IAM token amounts to
    the token: an ``AwsSigner`` adds a filter to the ``botocore.auth`` logger that
    drops those three records, and nothing else.

    An ``AwsSigner`` is thread-safe and may serve any number of providers: providers made
    with the same credential arguments share one automatically.

    Credentials come from exactly one of: a ``session`` (``boto3.Session`` or
    ``botocore.session.Session``), a ``profile``, static keys, or botocore's default chain
    (environment, config files, SSO, container and instance roles). With ``role_arn``, those
    credentials assume the role, and the role's temporary credentials refresh themselves
    before they expire.

    Args:
        session: A boto3 or botocore session to take credentials from.
        profile: A profile from the AWS config files.
        aws_access_key_id: A static access key id (with ``aws_secret_access_key``).
        aws_secret_access_key: Its secret key.
        aws_session_token: The session token of temporary static keys.
        role_arn: A role to assume with the credentials above.
        external_id: The external id the role's trust policy asks for.
        role_session_name: The role session name (default ``iampg``).
        role_duration: Seconds each role session lasts, 900 to 43 200 (default 3600).
        sts_region: The region of the STS endpoint for ``role_arn`` (default: the token's).
        sts_endpoint_url: A custom STS endpoint (VPC endpoint, or a local stand-in in tests).

    Raises:
        ConfigurationError: Conflicting or incomplete arguments.
    """

    def __init__(
        self,
        *,
        session: Any = None,
        profile: str | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        aws_session_token: str | None = None,
        role_arn: str | None = None,
        external_id: str | None = None,
        role_session_name: str | None = None,
        role_duration: int | None = None,
        sts_region: str | None = None,
        sts_endpoint_url: str | None = None,
    ) -> None:
        sources = [
            name
            for name, given in (
                ("session", session is not None),
                ("profile", profile is not None),
                ("static keys", aws_access_key_id is not None or aws_secret_access_key is not None),
            )
            if given
        ]
        if len(sources) > 1:
            raise ConfigurationError(
                f"pass one credential source, not {' and '.join(sources)}: "
                "a session already carries its profile and keys"
            )
        if (aws_access_key_id is None) != (aws_secret_access_key is None):
            raise ConfigurationError(
                "static keys need both aws_access_key_id and aws_secret_access_key"
            )
        if aws_session_token is not None and aws_access_key_id is None:
            raise ConfigurationError("aws_session_token needs aws_access_key_id and its secret")
        role_options = (external_id, role_session_name, role_duration, sts_endpoint_url)
        if role_arn is None and any(v is not None for v in role_options):
            raise ConfigurationError(
                "external_id, role_session_name, role_duration and sts_endpoint_url need role_arn"
            )
        if role_arn is not None and not role_arn.startswith("arn:"):
            raise ConfigurationError(
                f"role_arn must be a role ARN (arn:aws:iam::<account>:role/<name>), "
                f"not {role_arn!r}"
            )
        if role_duration is not None and not (
            _ROLE_DURATION[0] <= role_duration <= _ROLE_DURATION[1]
        ):
            raise ConfigurationError(
                f"role_duration must be from {_ROLE_DURATION[0]} to {_ROLE_DURATION[1]} "
                f"seconds, not {role_duration!r}"
            )
        self._session = session
        self._profile = profile
        self._keys = (
            (aws_access_key_id, aws_secret_access_key, aws_session_token)
            if aws_access_key_id is not None
            else None
        )
        self._role = (
            {
                "RoleArn": role_arn,
                "RoleSessionName": role_session_name or "iampg",
                "DurationSeconds": role_duration or 3600,
                **({"ExternalId": external_id} if external_id else {}),
            }
            if role_arn
            else None
        )
        self._sts = (sts_region, sts_endpoint_url)
        _redact_botocore_signing_logs()
        self._signing_session: Any = None
        self._credentials_source: Any = None
        self._lock = threading.Lock()

    @classmethod
    def shared(cls, **options: Any) -> AwsSigner:
        """Return the signer for these options, shared by every provider in the process.

        Providers made with equal arguments (the same session object, profile, keys or role)
        then share one credential source instead of each resolving its own.
        """
        key = _share_key(options)
        with _shared_lock:
            signer = _shared.get(key)
            if signer is None:
                signer = cls(**options)
                _shared[key] = signer
            return signer

    def __repr__(self) -> str:
        if self._session is not None:
            source = type(self._session).__name__
        elif self._profile is not None:
            source = f"profile={self._profile!r}"
        elif self._keys is not None:
            source = f"static keys {self._keys[0][:4]}…"
        else:
            source = "default chain"
        role = f", role_arn={self._role['RoleArn']!r}" if self._role else ""
        return f"AwsSigner({source}{role})"

    # -- credentials ----------------------------------------------------------------------

    def _base_session(self) -> Any:
        if self._session is not None:
            return self._session
        import botocore.session  # noqa: PLC0415 -- keep `import iampg` cheap

        session = botocore.session.Session(profile=self._profile)
        if self._keys is not None:
            session.set_credentials(*self._keys)
        return session

    def _make_signing_session(self, region: str | None) -> Any:
        base = self._base_session()
        if self._role is None:
            return base
        import botocore.credentials  # noqa: PLC0415
        import botocore.session  # noqa: PLC0415

        make = getattr(base, "create_client", None) or base.client
        sts_region, sts_url = self._sts

        def client_creator(service: str, **kwargs: Any) -> Any:
            kwargs.setdefault("region_name", sts_region or region)
            if sts_url:
                kwargs.setdefault("endpoint_url", sts_url)
            return make(service, **kwargs)

        source = base.get_credentials()
        if source is None:
            import botocore.exceptions  # noqa: PLC0415

            raise botocore.exceptions.NoCredentialsError
        fetcher = botocore.credentials.AssumeRoleCredentialFetcher(
            client_creator=client_creator,
            source_credentials=source,
            role_arn=self._role["RoleArn"],
            extra_args={k: v for k, v in self._role.items() if k != "RoleArn"},
        )
        credentials = botocore.credentials.DeferredRefreshableCredentials(
            refresh_using=fetcher.fetch_credentials, method="assume-role"
        )
        session = botocore.session.Session()
        session.register_component(
            "credential_provider",
            botocore.credentials.CredentialResolver([_Fixed(credentials)]),
        )
        return session

    def _credentials(self, region: str | None) -> Any:
        """Return the botocore credentials object that signs (made once; it refreshes itself)."""
        credentials = self._credentials_source
        if credentials is not None:
            return credentials
        with self._lock:
            if self._credentials_source is None:
                if self._signing_session is None:
                    self._signing_session = self._make_signing_session(region)
                credentials = self._signing_session.get_credentials()
                if credentials is None:
                    import botocore.exceptions  # noqa: PLC0415

                    raise botocore.exceptions.NoCredentialsError
                self._credentials_source = credentials
            return self._credentials_source

    def _credentials_ttl(self) -> float | None:
        """Return the seconds the signing credentials have left, or None if they don't expire."""
        credentials = self._credentials_source
        # botocore keeps the expiry of refreshable credentials here; static ones have none.
        expiry = getattr(credentials, "_expiry_time", None)
        if not isinstance(expiry, dt.datetime):
            return None
        if expiry.tzinfo is None:
            expiry = expiry.replace(tzinfo=dt.timezone.utc)
        return (expiry - dt.datetime.now(dt.timezone.utc)).total_seconds()

    def describe_credentials(self, region: str | None = None) -> CredentialsInfo:
        """Resolve the credentials (as signing would) and say what they are, without secrets.

        Args:
            region: The region of the STS endpoint when a role is assumed (default: the
                ``sts_region`` given, else botocore's).

        Raises:
            Exception: What botocore raises when there are no usable credentials;
                :func:`describe_signing_error` explains it.
        """
        credentials = self._credentials(region)
        frozen = credentials.get_frozen_credentials()
        method = str(getattr(credentials, "method", None) or "unknown")
        key = str(frozen.access_key or "")
        return CredentialsInfo(
            method=method,
            source=_SOURCES.get(method, method),
            temporary=bool(frozen.token),
            key_suffix=key[-_SHOWN_KEY:] if len(key) > _SHORT_KEY else "",
            expires_in=self._credentials_ttl(),
        )

    # -- signing --------------------------------------------------------------------------

    def sign(self, endpoint: Endpoint, lifetime: float = RDS_TOKEN_LIFETIME) -> SignedToken:
        """Sign a token for ``endpoint`` (blocking: may refresh credentials over the network).

        Args:
            endpoint: What to sign for.
            lifetime: Seconds a DSQL token lasts (1 to 604 800). RDS tokens last 900 s.
        """
        credentials = self._credentials(endpoint.region)
        ttl = self._credentials_ttl()
        if endpoint.kind == "dsql":
            token = _presign(
                credentials,
                f"https://{endpoint.host}",
                {"Action": dsql_action(endpoint.user)},
                service="dsql",
                region=endpoint.region,
                expires=int(lifetime),
            )
        else:
            lifetime = RDS_TOKEN_LIFETIME
            token = _presign(
                credentials,
                f"https://{endpoint.host}:{endpoint.port}",
                {"Action": "connect", "DBUser": endpoint.user},
                service="rds-db",
                region=endpoint.region,
                expires=int(RDS_TOKEN_LIFETIME),
            )
        # Read again: signing may have refreshed the credentials (a later expiry).
        after = self._credentials_ttl()
        if ttl is None or (after is not None and after > ttl):
            ttl = after
        return SignedToken(token, lifetime, ttl)


def _presign(
    credentials: Any, url: str, params: dict[str, str], *, service: str, region: str, expires: int
) -> str:
    """Presign a GET of ``url`` with botocore's SigV4 query signer; return it without scheme.

    This is what ``generate_db_auth_token`` and ``generate_db_connect_auth_token`` do inside
    a botocore client, minus the client: making an RDS or DSQL client loads its service model,
    which costs as much as importing botocore, and the token needs none of it. The result is
    byte-identical to the clients' tokens (tests/test_aws.py proves it with frozen time).
    """
    import botocore.auth  # noqa: PLC0415
    import botocore.awsrequest  # noqa: PLC0415

    request_dict: dict[str, Any] = {
        "url_path": "/",
        "query_string": "",
        "headers": {},
        "body": params,
        "method": "GET",
    }
    botocore.awsrequest.prepare_request_dict(request_dict, url)
    request = botocore.awsrequest.create_request_object(request_dict)
    # get_frozen_credentials() refreshes temporary credentials that are about to expire.
    frozen = credentials.get_frozen_credentials()
    botocore.auth.SigV4QueryAuth(frozen, service, region, expires=expires).add_auth(request)
    request.prepare()
    url_out: str = request.url
    return url_out[len("https://") :]


class _Fixed:
    """A botocore credential provider that always returns the same credentials object."""

    METHOD = "iampg-assume-role"
    CANONICAL_NAME = "iampg-assume-role"

    def __init__(self, credentials: Any) -> None:
        self._credentials = credentials

    def load(self) -> Any:
        return self._credentials


def _share_key(options: dict[str, Any]) -> tuple[object, ...]:
    items: list[tuple[str, object]] = []
    for name, value in sorted(options.items()):
        if value is None:
            continue
        if name == "session":
            items.append((name, id(value)))
        elif name == "aws_secret_access_key":
            import hashlib  # noqa: PLC0415 -- rarely needed; keep `import iampg` lean

            items.append((name, hashlib.sha256(str(value).encode()).hexdigest()))
        else:
            items.append((name, value))
    return tuple(items)


# (exception class name or error code, explanation); the first match wins.
_EXPLANATIONS: tuple[tuple[frozenset[str], str], ...] = (
    (
        frozenset({"NoCredentialsError"}),
        (
            "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or "
            "AWS_PROFILE, or pass {sources}"
        ),
    ),
    (
        frozenset({"ProfileNotFound"}),
        "AWS profile not found ({text}): check {profile}",
    ),
    (
        frozenset({"PartialCredentialsError", "InvalidConfigError"}),
        "the AWS configuration is incomplete or invalid: {text}",
    ),
    (
        frozenset({"ExpiredToken", "ExpiredTokenException"}),
        (
            "the AWS credentials have expired ({what}): renew them (aws sso login, a new role "
            "session), or check the local clock"
        ),
    ),
    (
        frozenset({"AccessDenied"}),
        "not allowed to assume the role ({what}): check its trust policy and external id",
    ),
    (
        frozenset({"InvalidClientTokenId", "SignatureDoesNotMatch"}),
        "AWS rejected the credentials ({what}): check the access key and secret",
    ),
    (
        frozenset({"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError"}),
        "cannot reach the AWS credentials service ({what}): check the network",
    ),
    (
        frozenset({"CredentialRetrievalError"}),
        "the credentials provider failed ({text}): check the container or instance role",
    ),
)


def describe_signing_error(exc: BaseException) -> str:
    """Name the likely reason a token could not be signed, with what to do about it."""
    name = type(exc).__name__
    text = str(exc)
    response = getattr(exc, "response", None)
    code = str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
    if "still expired" in text:
        code = "ExpiredToken"
    if code == "SignatureDoesNotMatch" and "expired" in text.lower():
        return "clock skew: the local clock is too far from AWS time; synchronise it (NTP)"
    for names, explanation in _EXPLANATIONS:
        if name in names or code in names:
            return explanation.format(
                text=text,
                what=code or name,
                sources=options("session", "profile", "aws_access_key_id"),
                profile=option("profile"),
            )
    return f"signing failed with {name}: {text}"
