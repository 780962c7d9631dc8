"""The only module that imports botocore: credential sources and the token signer."""

from __future__ import annotations

import datetime as dt
import logging
import os
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


# Names whose values are secrets, wherever botocore or urllib3 show them: credentials in STS
# (XML), container and SSO (JSON) answers, SSO/OIDC tokens, and the session token and
# signature of the requests botocore sends (headers and query strings).
_MASKED_FIELDS = (
    "SecretAccessKey|SessionToken|Token|AccessToken|RefreshToken|IdToken|ClientSecret|"
    "X-Amz-Security-Token|X-Amz-Signature|Authorization|X-aws-ec2-metadata-token"
)
_MASK = "***"

# The loggers of botocore and urllib3 that show requests, answers or credentials at DEBUG
# (a logger's filters see only the records logged on it, so each one is named).
_MASKED_LOGGERS = (
    "botocore.auth",
    "botocore.awsrequest",
    "botocore.credentials",
    "botocore.endpoint",
    "botocore.httpsession",
    "botocore.parsers",
    "botocore.retryhandler",
    "botocore.tokens",
    "botocore.utils",
    "urllib3.connectionpool",
)


class _MaskCredentials(logging.Filter):
    """Mask secret values in botocore's and urllib3's DEBUG records; let the record through.

    With DEBUG on, botocore logs the body and headers of every answer it parses: for STS
    ``AssumeRole``, SSO and container credentials that is the role's secret key and session
    token. It also logs each request it sends, with the session token of the credentials that
    signed it. A record whose text names one of these secrets gets that value replaced by
    ``***`` (the rest of the record, useful for debugging, stays).
    """

    def __init__(self) -> None:
        super().__init__()
        import re  # noqa: PLC0415 -- compiled when the first AwsSigner is made

        names = _MASKED_FIELDS
        self._patterns = (
            # "Name": "value", 'Name': b'value', Name=value (JSON, dict reprs, query strings)
            re.compile(rf"""(?i)((?<![\w-])["']?(?:{names})["']?\s*[:=]\s*b?["']?)[^"'&\s,}}]+"""),
            # <Name>value</Name> (STS's XML)
            re.compile(rf"(?i)(<(?:{names})>)[^<]+"),
            # the signature in an Authorization header value
            re.compile(r"(?i)(Signature=)[0-9a-f]{16,}"),
        )

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 -- a broken record is logging's to report, not ours
            return True
        masked = text
        for pattern in self._patterns:
            masked = pattern.sub(rf"\g<1>{_MASK}", masked)
        if masked != text:
            record.msg, record.args = masked, ()
        return True


def _redact_botocore_signing_logs() -> None:
    auth = logging.getLogger("botocore.auth")
    if not any(isinstance(f, _DropSigningDetails) for f in auth.filters):
        auth.addFilter(_DropSigningDetails())
        _logger.debug("botocore.auth debug records with signing details are dropped")
    mask: _MaskCredentials | None = None
    for name in _MASKED_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _MaskCredentials) for f in logger.filters):
            mask = mask or _MaskCredentials()
            logger.addFilter(mask)


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


# What botocore's default chain reads from the environment to find credentials: when one of
# these changes (new keys, a new container credentials endpoint or token), a signer that
# resolved from the chain resolves again.
_CHAIN_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_CREDENTIAL_EXPIRATION",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
)


def _chain_environment() -> int:
    """Return a fingerprint of the credential variables (a hash: it holds no secret)."""
    environ = os.environ
    return hash(tuple(environ.get(name) for name in _CHAIN_VARIABLES))


_shared: weakref.WeakValueDictionary[tuple[object, ...], AwsSigner] = weakref.WeakValueDictionary()
_shared_lock = threading.Lock()
_signers: weakref.WeakSet[AwsSigner] = weakref.WeakSet()  # every signer, for the fork handler


class AwsSigner:
    """Sign IAM tokens with botocore: one credential source, resolved once, for every token.

    The credentials are resolved on first use and reused for every later token; botocore's
    SigV4 query signer signs each one (~0.1 ms, with no network call unless temporary
    credentials need refreshing). No RDS or DSQL client is made: a client loads its service
    model, which costs as much as importing botocore, and a token needs none of it.

    botocore logs the parts of each signature at DEBUG, which for an IAM token amounts to
    the token: an ``AwsSigner`` adds a filter to the ``botocore.auth`` logger that
    drops those three records. It also logs the answers it parses (with a role's, SSO's or
    a container's secret key and session token) and the requests it sends (with their session
    token): those records are kept with each secret value replaced by ``***``.

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
        role_options = (external_id, role_session_name, role_duration, sts_region, sts_endpoint_url)
        if role_arn is None and any(v is not None for v in role_options):
            raise ConfigurationError(
                "external_id, role_session_name, role_duration, sts_region and sts_endpoint_url "
                "need role_arn"
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
        # Credentials found by botocore's chain follow the environment they came from.
        self._follows_environment = session is None and self._keys is None
        self._environment: int | None = None
        self._lock = threading.Lock()
        _signers.add(self)

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
        """Return the botocore credentials object that signs (made once; it refreshes itself).

        Made again when the environment the default chain read has changed since.
        """
        credentials = self._credentials_source
        environment = _chain_environment() if self._follows_environment else None
        if credentials is not None and environment == self._environment:
            return credentials
        with self._lock:
            if self._credentials_source is not None and environment != self._environment:
                _logger.info("the AWS credential variables changed: resolving credentials again")
                self._signing_session = self._credentials_source = None
            if self._credentials_source is None:
                if self._signing_session is None:
                    self._signing_session = self._make_signing_session(region)
                credentials = self._signing_session.get_credentials()
                if credentials is None:
                    import botocore.exceptions  # noqa: PLC0415

                    raise botocore.exceptions.NoCredentialsError
                self._credentials_source = credentials
                self._environment = environment
            return self._credentials_source

    def _after_fork_in_child(self) -> None:
        """Make the copy a forked child inherited usable: only the forking thread survived.

        Another thread of the parent may have held this signer's lock, or botocore's refresh
        lock of the credentials, at the moment of the fork: the child gets a new lock and
        resolves its own credentials (a session you gave keeps its credentials object, with
        a new refresh lock).
        """
        self._lock = threading.Lock()
        if self._session is None or self._role is not None:
            self._signing_session = self._credentials_source = None
        elif hasattr(self._credentials_source, "_refresh_lock"):
            self._credentials_source._refresh_lock = threading.Lock()  # noqa: SLF001

    def refresh_credentials(self) -> None:
        """Fetch the credentials again before the next token (after a refused token).

        Credentials from the default chain, a profile or a role are resolved anew: the chain
        runs again (environment, container endpoint, SSO ...) and a role is assumed again.
        Refreshable credentials of a ``session`` you gave are made to refresh now. Static
        keys have nothing to fetch.
        """
        with self._lock:
            credentials = self._credentials_source
            if self._session is None or self._role is not None:
                self._signing_session = self._credentials_source = None
                _logger.debug("%r: credentials dropped; the next token resolves them", self)
                return
        # A session of the caller's keeps its own credentials object: refresh it in place,
        # under its own lock, as botocore does when they are about to expire.
        refresh = getattr(credentials, "_protected_refresh", None)
        lock = getattr(credentials, "_refresh_lock", None)
        if callable(refresh) and lock is not None:
            with lock:
                refresh(is_mandatory=True)

    @staticmethod
    def _credentials_ttl(credentials: Any) -> float | None:
        """Return the seconds ``credentials`` have left, or None if they don't expire."""
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
            expires_in=self._credentials_ttl(credentials),
        )

    # -- signing --------------------------------------------------------------------------

    def sign(self, endpoint: Endpoint, lifetime: float = RDS_TOKEN_LIFETIME) -> SignedToken:
        """Sign a token for ``endpoint`` (blocking: may refresh credentials over the network).

        Args:
            endpoint: What to sign for.
            lifetime: Seconds a DSQL token lasts (1 to 604 800). RDS tokens last 900 s.
        """
        credentials = self._credentials(endpoint.region)
        ttl = self._credentials_ttl(credentials)
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
        after = self._credentials_ttl(credentials)
        if ttl is None or (after is not None and after > ttl):
            ttl = after
        return SignedToken(token, lifetime, ttl)


def _after_fork_in_child() -> None:
    global _shared_lock  # noqa: PLW0603 -- replaced, as the parent's may be held
    _shared_lock = threading.Lock()
    for signer in list(_signers):
        signer._after_fork_in_child()  # noqa: SLF001 -- the module's own class


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


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
