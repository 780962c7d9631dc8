"""AWS access keys the emulator accepts, with their secrets masked in reprs."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["FAKE_CREDENTIALS", "Credentials"]


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
    """

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)
    expiration: float | None = None

    def __repr__(self) -> str:
        session = "None" if self.session_token is None else "'[secure]'"
        return (
            f"Credentials(access_key_id={self.access_key_id!r}, secret_access_key='[secure]', "
            f"session_token={session}, expiration={self.expiration!r})"
        )


#: The documentation example key pair from AWS: safe to publish, useless against AWS.
FAKE_CREDENTIALS = Credentials(
    "AKIAIOSFODNN7EXAMPLE",
    "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
)
