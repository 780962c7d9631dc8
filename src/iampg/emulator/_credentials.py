"""AWS access keys the emulator accepts, and the store the gateway and the servers share."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

__all__ = ["FAKE_CREDENTIALS", "CredentialLookup", "CredentialStore", "Credentials"]


@dataclass(frozen=True)
class Credentials:
    """An AWS access key the emulator knows, as botocore would hold it.

    Attributes:
        access_key_id: The access key id (``AKIA...`` or ``ASIA...``).
        secret_access_key: The secret key tokens are signed with; never shown in ``repr``.
        session_token: The session token of temporary credentials, or ``None`` for long-term
            keys. When set, every token signed with this key must carry exactly this session
            token; never shown in ``repr``.
        expiration: When temporary credentials expire, in wall-clock epoch seconds, compared
            with the emulator's clock (:meth:`EmulatorClock.now`); ``None`` never expires.
            Tokens signed with expired credentials are refused, even within their own
            15 minutes, as AWS does.
        principal: The IAM identity the key belongs to, as an ARN: a user
            (``arn:aws:iam::<account>:user/<name>``) or a role's session
            (``arn:aws:sts::<account>:assumed-role/<role>/<session>``). The emulator's
            policies (:attr:`Emulator.policies`) are looked up by it; a key without one is
            judged by no policy.
    """

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)
    expiration: float | None = None
    principal: str | None = None

    def __repr__(self) -> str:
        session = "None" if self.session_token is None else "'[secure]'"
        return (
            f"Credentials(access_key_id={self.access_key_id!r}, secret_access_key='[secure]', "
            f"session_token={session}, expiration={self.expiration!r}, "
            f"principal={self.principal!r})"
        )


#: The documentation example key pair from AWS: safe to publish, useless against AWS.
FAKE_CREDENTIALS = Credentials(
    "AKIAIOSFODNN7EXAMPLE",
    "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    principal="arn:aws:iam::123456789012:user/iampg-emulator",
)


@runtime_checkable
class CredentialLookup(Protocol):
    """Anything that finds the credentials of an access key id (see :class:`CredentialStore`)."""

    def lookup(self, access_key_id: str) -> Credentials | None:
        """Return the credentials of ``access_key_id``, or ``None`` for an unknown key."""
        ...


class CredentialStore:
    """The AWS keys an emulator knows, shared with the servers that issue new ones.

    Give one store to :class:`Emulator` (``credentials=store``) and to a
    :class:`CredentialsServer`: every key the server issues is then accepted by the gateway
    until its ``expiration`` (on the emulator's clock). Thread-safe.

    Args:
        credentials: The keys known from the start (default: :data:`FAKE_CREDENTIALS`); the
            first one is :attr:`default`.

    Raises:
        ValueError: An access key id is given twice.
    """

    def __init__(self, credentials: Iterable[Credentials] = (FAKE_CREDENTIALS,)) -> None:
        self._lock = threading.Lock()
        self._keys: dict[str, Credentials] = {}
        self._default: Credentials | None = None
        for creds in credentials:
            if creds.access_key_id in self._keys:
                raise ValueError(f"access key {creds.access_key_id} is given twice")
            self._keys[creds.access_key_id] = creds
            if self._default is None:
                self._default = creds

    @property
    def default(self) -> Credentials | None:
        """The first key given to the constructor, or ``None`` if it was given none."""
        return self._default

    def lookup(self, access_key_id: str) -> Credentials | None:
        """Return the credentials of ``access_key_id``, or ``None`` for an unknown key."""
        with self._lock:
            return self._keys.get(access_key_id)

    def add(self, credentials: Credentials) -> None:
        """Add a key, or replace the key with the same access key id."""
        with self._lock:
            self._keys[credentials.access_key_id] = credentials

    def remove(self, access_key_id: str) -> None:
        """Forget a key (revocation: tokens it signed are refused as unknown). Idempotent."""
        with self._lock:
            self._keys.pop(access_key_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)

    def __contains__(self, access_key_id: object) -> bool:
        with self._lock:
            return access_key_id in self._keys

    def __iter__(self) -> Iterator[Credentials]:
        with self._lock:
            return iter(list(self._keys.values()))

    def __repr__(self) -> str:
        return f"<CredentialStore with {len(self)} keys>"
