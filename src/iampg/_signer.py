"""The signer contract, written once: what signs a token, what it returns, the service rules.

A leaf module: it imports nothing from iampg at run time, so the token provider
(``_tokens``), the botocore signer (``_aws``), the standard-library signer (``_sigv4``) and
the emulator can all import it without importing each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, NamedTuple, Protocol

if TYPE_CHECKING:
    from iampg._endpoint import Endpoint

__all__ = [
    "CREDENTIAL_OPTIONS",
    "DSQL_ADMIN_USER",
    "DSQL_MAX_LIFETIME",
    "RDS_TOKEN_LIFETIME",
    "Clock",
    "SignedToken",
    "Signer",
    "dsql_action",
]

RDS_TOKEN_LIFETIME: Final = 900.0
"""Seconds an RDS, Aurora or RDS Proxy token is valid; fixed by the service."""

DSQL_MAX_LIFETIME: Final = 604_800.0
"""The longest a DSQL token may last (``X-Amz-Expires``): one week, in seconds."""

DSQL_ADMIN_USER: Final = "admin"
"""The DSQL role that signs ``DbConnectAdmin``; every other role signs ``DbConnect``."""

CREDENTIAL_OPTIONS: Final = (
    "session",
    "profile",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "role_arn",
    "external_id",
    "role_session_name",
    "role_duration",
    "sts_region",
    "sts_endpoint_url",
)
"""The keyword arguments naming where credentials come from, in the order they are documented.

:class:`iampg.AwsSigner` takes exactly these, and :class:`iampg.TokenProvider` takes them and
hands them on unchanged (tests/test_tokens.py checks that both signatures agree with this).
"""


def dsql_action(user: str) -> str:
    """Return the IAM action a DSQL token for ``user`` signs: the admin rule, written once."""
    return "DbConnectAdmin" if user == DSQL_ADMIN_USER else "DbConnect"


class Clock(Protocol):
    """A monotonic clock: seconds as a float, never going backwards."""

    def __call__(self) -> float:
        """Return the current time in seconds."""
        ...


# SignedToken is a named tuple, not a dataclass: making a dataclass at import costs ~1 ms,
# and `import iampg` is on every cold start (benchmarks/cold.py).
class SignedToken(NamedTuple):
    """A freshly signed token and how long it is good for (an immutable named tuple).

    Attributes:
        token: The token; a bearer credential, kept out of ``repr``.
        lifetime: Seconds the token is valid from the start of signing.
        credentials_ttl: Seconds the signing credentials had left, or ``None`` when they do
            not expire.
    """

    token: str
    lifetime: float
    credentials_ttl: float | None = None

    def __repr__(self) -> str:
        return f"SignedToken(lifetime={self.lifetime!r}, credentials_ttl={self.credentials_ttl!r})"


class Signer(Protocol):
    """Something that signs tokens; blocking calls, safe to call from several threads.

    A signer may also have a ``refresh_credentials()`` method (no arguments, returns
    nothing): a :class:`iampg.TokenProvider` calls it once when the server refuses a token
    it has just signed, so credentials that were revoked or rotated are fetched again
    instead of signing with them until they expire. :class:`iampg.AwsSigner` has one.
    """

    def sign(self, endpoint: Endpoint, lifetime: float) -> SignedToken:
        """Return a new token for ``endpoint`` that lasts ``lifetime`` seconds (DSQL)."""
        ...
