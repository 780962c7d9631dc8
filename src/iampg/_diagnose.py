"""Recognise the services' authentication failures and explain their likely causes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from iampg._endpoint import Endpoint

if TYPE_CHECKING:
    from iampg.errors import AuthenticationError

__all__ = [
    "authentication_error",
    "certificate_advice",
    "certificate_error",
    "failure_kind",
    "transient_reason",
]

FailureKind = Literal["token", "tls", "certificate"]

# How the services word a refused token (FACTS.md): RDS/Aurora, DSQL, plain PostgreSQL.
_TOKEN_REFUSED = (
    "PAM authentication failed for user",
    "unable to accept connection, access denied",
    "password authentication failed for user",
)
_NO_TLS = "no encryption"
# How libpq words a server certificate that did not verify (chain or host name).
_CERTIFICATE = ("certificate verify failed", "does not match host name")


def failure_kind(exc: BaseException) -> FailureKind | None:
    """Tell whether a failed connect was the token being refused, or TLS being off."""
    text = str(exc)
    if any(marker in text for marker in _TOKEN_REFUSED):
        return "token"
    if "pg_hba.conf rejects connection" in text and _NO_TLS in text:
        return "tls"
    if any(marker in text for marker in _CERTIFICATE):
        return "certificate"
    return None


# Refusals that go away by themselves: (marker in the server's text, what is happening).
_TRANSIENT = (
    ("waking up cluster", "the cluster is waking up"),
    ("rate exceeded", "the cluster's connection rate limit was exceeded"),
)


def transient_reason(exc: BaseException, *, timeouts: bool = False) -> str | None:
    """Say what is going on when a failed connect is worth retrying shortly, else None.

    With ``timeouts``, a connect that timed out counts too: a paused Aurora Serverless
    cluster blocks new connections while it resumes.
    """
    text = str(exc)
    for marker, reason in _TRANSIENT:
        if marker in text:
            return reason
    if timeouts and "timeout expired" in text:
        return "the connection timed out, as while a paused cluster resumes"
    return None


def _causes(endpoint: Endpoint, kind: FailureKind) -> list[str]:
    user, region = endpoint.user, endpoint.region
    if kind == "tls":
        return [
            (
                "the connection did not use TLS: IAM users may only log in over TLS; "
                "use sslmode=require or verify-full"
            )
        ]
    common = [
        (
            "the token expired (tokens last 15 minutes) or was signed for another host, port, "
            f"user or region than {endpoint.host}:{endpoint.port}, user {user!r}, {region}"
        ),
        "the temporary AWS credentials that signed it expired or were rotated",
        (
            "clock skew: the local clock is more than a few minutes off, and SigV4 checks "
            "the signing time; synchronise it (NTP)"
        ),
    ]
    if endpoint.kind == "dsql":
        action = "dsql:DbConnectAdmin" if user == "admin" else "dsql:DbConnect"
        return [
            *common,
            f"the IAM policy does not allow {action} on the cluster",
            (
                "the user/action mapping: 'admin' needs a DbConnectAdmin token, any other role "
                "a DbConnect token and an AWS IAM GRANT mapping the IAM role to it"
            ),
        ]
    return [
        *common,
        (
            "the IAM policy does not allow rds-db:connect on "
            f"arn:aws:rds-db:{region}:<account>:dbuser:<resource id>/{user}"
        ),
        f'the database user lacks the rds_iam role: GRANT rds_iam TO "{user}"',
        "IAM database authentication is not enabled on the cluster, instance or RDS Proxy",
    ]


def certificate_advice(endpoint: Endpoint, rootcert: str | None) -> str:
    """Say which CA set failed to verify the server as the endpoint, and what to do."""
    from iampg import _trust  # noqa: PLC0415

    if rootcert in (None, ""):
        used = "libpq's default root certificate file (~/.postgresql/root.crt)"
    elif rootcert == "system":
        used = "the operating system's CA store (sslrootcert=system)"
    else:
        summary = _trust.describe(str(rootcert))
        used = f"{rootcert} ({summary})" if summary else f"{rootcert} (your own CA file)"
    missing = ""
    if (
        rootcert is not None
        and _trust.describe(str(rootcert))
        and not _trust.covers(endpoint.region)
    ):
        missing = (
            f"  - iampg's trust store holds no CA set for {endpoint.region} (GovCloud, China "
            "and regions newer than the store are not in it): download the region's bundle "
            f"from AWS (https://truststore.pki.rds.amazonaws.com/{endpoint.region}/"
            f"{endpoint.region}-bundle.pem; GovCloud and China have their own trust store "
            "addresses in the RDS documentation) and point IAMPG_SSLROOTCERT at it\n"
        )
    return (
        f"the server's certificate did not verify as {endpoint.host} against {used}.\n"
        f"{missing}"
        "  - if the database's CA is newer than that set, point IAMPG_SSLROOTCERT "
        "(or sslrootcert=) at a current bundle, such as AWS's "
        "https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem\n"
        "  - through a tunnel or load balancer, keep the database's name as host and dial "
        "the other address with hostaddr\n"
        "  - sslmode=require encrypts without checking who answers (an explicit opt-out)"
    )


def certificate_error(exc: BaseException, endpoint: Endpoint, rootcert: str | None) -> Exception:
    """Return libpq's certificate error with :func:`certificate_advice` added.

    The error is a :class:`psycopg.OperationalError`, as libpq's was.
    """
    import psycopg  # noqa: PLC0415

    server = " ".join(str(exc).split())
    return psycopg.OperationalError(f"{server}\n{certificate_advice(endpoint, rootcert)}")


def authentication_error(
    exc: BaseException, endpoint: Endpoint, kind: FailureKind
) -> AuthenticationError:
    """Return an :class:`AuthenticationError` quoting the server and listing likely causes."""
    from iampg.errors import AuthenticationError  # noqa: PLC0415 -- made on first use

    server = " ".join(str(exc).split())
    causes = "\n".join(f"  - {cause}" for cause in _causes(endpoint, kind))
    return AuthenticationError(f"{server}\nlikely causes:\n{causes}")
