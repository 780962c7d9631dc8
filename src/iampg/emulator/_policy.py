"""IAM principals and policies: which resources a key may connect to, judged as IAM does."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "DEFAULT_ACCOUNT",
    "Decision",
    "Policy",
    "PolicyStore",
    "Statement",
    "arn_matches",
    "dsql_cluster_arn",
    "policy_principal",
    "rds_dbuser_arn",
    "rds_resource_id",
]

#: The example account id of AWS's documentation: the emulator's account unless told otherwise.
DEFAULT_ACCOUNT: Final = "123456789012"

# Event reasons of a policy refusal.
NOT_AUTHORIZED: Final = "not authorized"
EXPLICIT_DENY: Final = "explicitly denied"

Effect = Literal["Allow", "Deny"]

_ASSUMED_ROLE_RE: Final = re.compile(
    r"arn:(?P<partition>aws[\w-]*):sts::(?P<account>\d{12}):assumed-role/(?P<name>[^/]+)/[^/]+"
)
_ARN_PARTS: Final = 6
_RESOURCE_ID_ALPHABET: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


def _wildcard(pattern: str, *, ignore_case: bool) -> re.Pattern[str]:
    """Compile an IAM wildcard (``*`` any run of characters, ``?`` one character)."""
    parts = [{"*": ".*", "?": "."}.get(c) or re.escape(c) for c in pattern]
    return re.compile("".join(parts), (re.IGNORECASE | re.DOTALL) if ignore_case else re.DOTALL)


def action_matches(pattern: str, action: str) -> bool:
    """Tell whether an IAM ``Action`` pattern (``rds-db:*``, ``*``...) names ``action``.

    Actions are case-insensitive, as in IAM.
    """
    return _wildcard(pattern, ignore_case=True).fullmatch(action) is not None


def arn_matches(pattern: str, arn: str) -> bool:
    """Tell whether an IAM ``Resource`` pattern matches ``arn``.

    ``*`` alone matches everything. Otherwise the six colon-separated parts of the ARN are
    matched one by one (a wildcard does not span a colon before the resource part; the
    resource part may hold colons and slashes), case-sensitively, ``*`` standing for any run
    of characters and ``?`` for one, as IAM's ``Resource`` element does.
    """
    if pattern == "*":
        return True
    expected = pattern.split(":", _ARN_PARTS - 1)
    actual = arn.split(":", _ARN_PARTS - 1)
    if len(expected) != _ARN_PARTS or len(actual) != _ARN_PARTS:
        return False
    return all(
        _wildcard(want, ignore_case=False).fullmatch(have) is not None
        for want, have in zip(expected, actual, strict=True)
    )


@dataclass(frozen=True)
class Statement:
    """One statement of an identity-based IAM policy.

    Attributes:
        effect: ``"Allow"`` or ``"Deny"``.
        actions: ``Action`` patterns (``"rds-db:connect"``, ``"dsql:DbConnect"``, ``"*"``).
        resources: ``Resource`` ARN patterns, IAM wildcards allowed.
        sid: The statement's ``Sid``, named in refusal events; may be empty.
    """

    effect: Effect
    actions: tuple[str, ...]
    resources: tuple[str, ...]
    sid: str = ""

    def __post_init__(self) -> None:
        if self.effect not in ("Allow", "Deny"):
            raise ValueError(f"Effect must be 'Allow' or 'Deny', not {self.effect!r}")
        if not self.actions or not self.resources:
            raise ValueError("a statement needs at least one action and one resource")

    @classmethod
    def allow(cls, action: str | Iterable[str], resource: str | Iterable[str]) -> Statement:
        """Return an ``Allow`` statement for one or more actions and resources."""
        return cls("Allow", _strings(action), _strings(resource))

    @classmethod
    def deny(cls, action: str | Iterable[str], resource: str | Iterable[str]) -> Statement:
        """Return a ``Deny`` statement for one or more actions and resources."""
        return cls("Deny", _strings(action), _strings(resource))

    def applies(self, action: str, resource: str) -> bool:
        """Tell whether this statement covers ``action`` on ``resource``."""
        return any(action_matches(a, action) for a in self.actions) and any(
            arn_matches(r, resource) for r in self.resources
        )


def _strings(value: str | Iterable[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


@dataclass(frozen=True)
class Policy:
    """An identity-based IAM policy: statements attached to a user or role.

    Build one from statements (``Policy(Statement.allow("rds-db:connect", arn))``) or from
    the JSON document IAM takes (:meth:`from_json`). ``Condition``, ``NotAction``,
    ``NotResource`` and ``Principal`` are not supported and are refused.
    """

    statements: tuple[Statement, ...]

    def __init__(self, *statements: Statement) -> None:
        object.__setattr__(self, "statements", tuple(statements))

    @classmethod
    def from_json(cls, document: str | Mapping[str, object]) -> Policy:
        """Parse an IAM policy document (a JSON string or the parsed mapping).

        Raises:
            ValueError: The document is not a policy the emulator understands.
        """
        data = json.loads(document) if isinstance(document, str) else document
        if not isinstance(data, Mapping):
            raise ValueError("a policy document is a JSON object")  # noqa: TRY004
        raw = data.get("Statement")
        items = [raw] if isinstance(raw, Mapping) else raw
        if not isinstance(items, list) or not items:
            raise ValueError("a policy document needs a Statement")
        statements = []
        for item in items:
            if not isinstance(item, Mapping):
                raise ValueError("each Statement is a JSON object")  # noqa: TRY004
            unsupported = sorted(
                set(item) & {"Condition", "NotAction", "NotResource", "Principal", "NotPrincipal"}
            )
            if unsupported:
                raise ValueError(f"the emulator does not evaluate {', '.join(unsupported)}")
            statements.append(
                Statement(
                    effect=item.get("Effect"),  # type: ignore[arg-type]  # checked there
                    actions=_element(item, "Action"),
                    resources=_element(item, "Resource"),
                    sid=str(item.get("Sid", "")),
                )
            )
        return cls(*statements)


def _element(item: Mapping[str, object], name: str) -> tuple[str, ...]:
    value = item.get(name)
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"{name} must be a string or a list of strings")


@dataclass(frozen=True)
class Decision:
    """What the policies say about one connection.

    Attributes:
        allowed: Whether it may connect.
        reason: Empty when allowed; else ``"not authorized"`` (no statement allows it) or
            ``"explicitly denied"``.
        detail: Which statement was missing or denied it, naming action and resource ARN.
    """

    allowed: bool
    reason: str = ""
    detail: str = ""


def policy_principal(principal: str) -> str:
    """Return the principal whose policies apply: an assumed role's session -> its role."""
    match = _ASSUMED_ROLE_RE.fullmatch(principal)
    if match is None:
        return principal
    return f"arn:{match['partition']}:iam::{match['account']}:role/{match['name']}"


class PolicyStore:
    """The identity-based policies of the principals an emulator knows. Thread-safe.

    A principal without any policy may connect anywhere (as before policies existed); once
    a principal has one, a connection needs a statement allowing its action on its
    resource, and no statement denying it. Policies of a role apply to every session of
    it (``arn:aws:sts::<account>:assumed-role/<role>/<session>``).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._policies: dict[str, list[Policy]] = {}

    def attach(self, principal: str, policy: Policy) -> None:
        """Attach ``policy`` to a user or role ARN (``arn:aws:iam::<account>:role/<name>``)."""
        if not isinstance(policy, Policy):
            raise TypeError(f"attach a Policy, not {type(policy).__name__}")
        key = policy_principal(principal)
        with self._lock:
            self._policies.setdefault(key, []).append(policy)

    def detach(self, principal: str, policy: Policy | None = None) -> None:
        """Detach ``policy`` (every policy when ``None``) from a principal. Idempotent."""
        key = policy_principal(principal)
        with self._lock:
            if policy is None:
                self._policies.pop(key, None)
                return
            kept = [p for p in self._policies.get(key, []) if p is not policy and p != policy]
            if kept:
                self._policies[key] = kept
            else:
                self._policies.pop(key, None)

    def clear(self) -> None:
        """Detach every policy from every principal."""
        with self._lock:
            self._policies.clear()

    def policies(self, principal: str) -> list[Policy]:
        """Return the policies that apply to ``principal`` (its role's, for a session)."""
        with self._lock:
            return list(self._policies.get(policy_principal(principal), []))

    def evaluate(self, principal: str | None, action: str, resource: str) -> Decision:
        """Judge ``action`` on ``resource`` for ``principal`` (``None``: a key without one)."""
        if principal is None:
            return Decision(allowed=True)
        policies = self.policies(principal)
        if not policies:
            return Decision(allowed=True)
        statements: Sequence[Statement] = [s for p in policies for s in p.statements]
        for statement in statements:
            if statement.effect == "Deny" and statement.applies(action, resource):
                sid = f" (statement {statement.sid!r})" if statement.sid else ""
                return Decision(
                    allowed=False,
                    reason=EXPLICIT_DENY,
                    detail=f"a Deny statement{sid} of {principal} covers {action} on {resource}",
                )
        if any(s.effect == "Allow" and s.applies(action, resource) for s in statements):
            return Decision(allowed=True)
        return Decision(
            allowed=False,
            reason=NOT_AUTHORIZED,
            detail=f"no policy of {principal} allows {action} on {resource}",
        )

    def __repr__(self) -> str:
        with self._lock:
            count = sum(len(p) for p in self._policies.values())
        return f"<PolicyStore with {count} policies>"


def rds_resource_id(hostname: str) -> str:
    """Return a stable ``DbiResourceId``-shaped id for an endpoint (``db-`` + 26 characters)."""
    digest = hashlib.sha256(hostname.lower().encode()).digest()
    bits = int.from_bytes(digest, "big")
    chars = []
    for _ in range(26):
        bits, index = divmod(bits, 32)
        chars.append(_RESOURCE_ID_ALPHABET[index])
    return "db-" + "".join(chars)


def rds_dbuser_arn(region: str, account: str, resource_id: str, user: str) -> str:
    """Return the resource ``rds-db:connect`` is judged on for a database user."""
    return f"arn:aws:rds-db:{region}:{account}:dbuser:{resource_id}/{user}"


def dsql_cluster_arn(region: str, account: str, cluster_id: str) -> str:
    """Return the resource ``dsql:DbConnect``/``DbConnectAdmin`` is judged on."""
    return f"arn:aws:dsql:{region}:{account}:cluster/{cluster_id}"
