"""What the emulator requires past a valid token: RDS's ``rds_iam`` grant, IAM policies."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from iampg._signer import dsql_action
from iampg.errors import ConfigurationError

from ._policy import dsql_cluster_arn, rds_dbuser_arn, rds_resource_id

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._backend import RdsIamCheck
    from ._policy import PolicyStore

__all__ = ["NOT_GRANTED_RDS_IAM", "Refusal", "Rules", "authorize"]

#: Event reason: the database user is not a member of ``rds_iam``.
NOT_GRANTED_RDS_IAM: Final = "not granted rds_iam"
#: Unconfirmed: DSQL's HINT when IAM denies the connection. AWS's usual AccessDenied text.
HINT_NOT_AUTHORIZED: Final = (
    "User: {principal} is not authorized to perform: {action} on resource: {resource}"
)

_ACCOUNT_RE: Final = re.compile(r"\d{12}")
_RESOURCE_ID_RE: Final = re.compile(r"[A-Za-z0-9-]+")
_MAX_PORT: Final = 65535


@dataclass(frozen=True)
class Refusal:
    """Why a connection with a valid token is refused (event reason and detail, DSQL hint)."""

    reason: str
    detail: str
    hint: str = ""


@dataclass(frozen=True)
class Rules:
    """The emulator's settings for what comes after the token check.

    Attributes:
        region: The emulator's region, in resource ARNs.
        dsql: DSQL mode (cluster ARN, ``dsql:DbConnect[Admin]``) rather than RDS's.
        loopback_names: Whether the certificate also names ``localhost``, ``127.0.0.1``
            and ``::1``.
        advertise_port: The port tokens must carry when it differs from the one listened
            on (a tunnel's), else ``None``.
        require_rds_iam: RDS mode: refuse users not granted ``rds_iam``.
        account_id: The account of resource ARNs.
        resource_id: RDS's ``DbiResourceId`` (or an RDS Proxy's ``prx-`` id).
        cluster_id: DSQL's cluster id, the host name's first label.
    """

    region: str
    dsql: bool
    loopback_names: bool
    advertise_port: int | None
    require_rds_iam: bool
    account_id: str
    resource_id: str
    cluster_id: str

    @classmethod
    def checked(
        cls,
        *,
        hostnames: Sequence[str],
        region: str,
        dsql: bool,
        loopback_names: bool,
        advertise_port: int | None,
        require_rds_iam: bool,
        account_id: str,
        resource_id: str | None,
    ) -> Rules:
        """Return the rules, or raise ConfigurationError for a value that cannot work."""
        if advertise_port is not None:
            if isinstance(advertise_port, bool) or not 1 <= advertise_port <= _MAX_PORT:
                raise ConfigurationError(
                    f"advertise_port must be from 1 to 65535, not {advertise_port!r}"
                )
            if dsql:
                raise ConfigurationError(
                    "advertise_port applies to RDS tokens only: DSQL tokens carry no port"
                )
        if not _ACCOUNT_RE.fullmatch(account_id):
            raise ConfigurationError(f"account_id must be 12 digits, not {account_id!r}")
        host = hostnames[0] if hostnames else ""
        if resource_id is None:
            resource_id = rds_resource_id(host)
        elif not _RESOURCE_ID_RE.fullmatch(resource_id):
            raise ConfigurationError(
                f"resource_id must be letters, digits and '-' (db-..., prx-...), "
                f"not {resource_id!r}"
            )
        return cls(
            region=region,
            dsql=dsql,
            loopback_names=bool(loopback_names),
            advertise_port=advertise_port,
            require_rds_iam=bool(require_rds_iam),
            account_id=account_id,
            resource_id=resource_id,
            cluster_id=host.partition(".")[0].lower(),
        )

    def action(self, user: str) -> str:
        """Return the IAM action a connection as ``user`` needs."""
        if self.dsql:
            return f"dsql:{dsql_action(user)}"
        return "rds-db:connect"

    def resource_arn(self, user: str) -> str:
        """Return the resource ARN a policy must allow :meth:`action` on, for ``user``."""
        if self.dsql:
            return dsql_cluster_arn(self.region, self.account_id, self.cluster_id)
        return rds_dbuser_arn(self.region, self.account_id, self.resource_id, user)


async def authorize(
    rules: Rules,
    *,
    user: str,
    principal: str | None,
    policies: PolicyStore,
    iam_check: RdsIamCheck | None,
) -> Refusal | None:
    """Apply the rules past a valid token; return why the connection is refused, or None.

    RDS first looks at the database user (a member of ``rds_iam`` goes to IAM
    authentication at all), then IAM at the caller's policies.

    Raises:
        BackendError: The backend could not be asked about ``rds_iam``.
    """
    needs_grant = not rules.dsql and rules.require_rds_iam and iam_check is not None
    if needs_grant and iam_check is not None and not await iam_check.is_member(user):
        ident = '"' + user.replace('"', '""') + '"'
        if not await iam_check.exists(user):  # a GRANT alone would fail: create it first
            return Refusal(
                NOT_GRANTED_RDS_IAM,
                f"no such database user: CREATE ROLE {ident} LOGIN; GRANT rds_iam TO {ident}",
            )
        return Refusal(NOT_GRANTED_RDS_IAM, f"GRANT rds_iam TO {ident}")
    action, resource = rules.action(user), rules.resource_arn(user)
    decision = policies.evaluate(principal, action, resource)
    if decision.allowed:
        return None
    hint = HINT_NOT_AUTHORIZED.format(principal=principal, action=action, resource=resource)
    return Refusal(decision.reason, decision.detail, hint)
